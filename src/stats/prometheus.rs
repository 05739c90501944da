//! A [`StatsReport`] in the Prometheus/OpenMetrics text format, written by
//! the official `prometheus-client` encoder (names, `_total` suffixes,
//! label escaping, `# EOF`). Every series is labelled by `vm` (empty when
//! no VM was named), `instance` (the UUID), `instance_name`, and per-queue
//! series by `queue`. The report is read once per scrape, so the metrics are
//! exactly what `wdvirt stats --json` shows at that moment.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::latency::BOUNDS_NS;
use super::report::{Counts, InstanceStatsView, QueueView, StatsReport, Throttled};

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The text exposition of `report` (taken whole: the registry owns its
/// collectors).
pub fn encode(report: StatsReport) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReportCollector(report)));
    let mut out = String::new();
    // Writing into a String cannot fail, and no value of ours is refused.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!("cannot encode the metrics: {e}");
    }
    out
}

#[derive(Debug)]
struct ReportCollector(StatsReport);

type Labels = Vec<(&'static str, String)>;

fn instance_labels(i: &InstanceStatsView) -> Labels {
    vec![
        ("vm", i.vm.clone().unwrap_or_default()),
        ("instance", i.uuid.to_string()),
        ("instance_name", i.name.clone()),
    ]
}

fn queue_labels(i: &InstanceStatsView, q: &QueueView) -> Labels {
    let mut l = instance_labels(i);
    l.push(("queue", q.queue.to_string()));
    l
}

fn counter(m: &mut MetricEncoder<'_>, labels: &Labels, v: u64) -> std::fmt::Result {
    m.encode_family(labels)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One counter or gauge family over every queue of every instance.
fn per_queue(
    enc: &mut DescriptorEncoder<'_>,
    report: &StatsReport,
    (name, help, unit, kind): (&str, &str, Option<&Unit>, MetricType),
    value: impl Fn(&Counts) -> u64,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for i in &report.instances {
        for q in &i.queues {
            let labels = queue_labels(i, q);
            match kind {
                MetricType::Gauge => m
                    .encode_family(&labels)?
                    .encode_gauge(&(value(&q.counts) as i64))?,
                _ => counter(&mut m, &labels, value(&q.counts))?,
            }
        }
    }
    Ok(())
}

fn throttled(m: &mut MetricEncoder<'_>, labels: &Labels, t: &Throttled) -> std::fmt::Result {
    for (reason, ns) in [
        ("rate", t.rate_ns),
        ("cap", t.cap_ns),
        ("share", t.share_ns),
    ] {
        let mut l = labels.clone();
        l.push(("reason", reason.to_string()));
        m.encode_family(&l)?
            .encode_counter::<NoLabelSet, _, u64>(&seconds(ns), None)?;
    }
    Ok(())
}

impl Collector for ReportCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let r = &self.0;
        let (c, g) = (MetricType::Counter, MetricType::Gauge);
        let bytes = Some(&Unit::Bytes);
        per_queue(
            &mut enc,
            r,
            (
                "wdvirt_queue_jobs_submitted",
                "Descriptors taken from the submission ring.",
                None,
                c,
            ),
            |x| x.jobs_submitted,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "wdvirt_queue_jobs_completed",
                "Completions written, by status (Ok or the failure's JobStatus name).",
                None,
                c,
            )?;
            for i in &r.instances {
                for q in &i.queues {
                    let mut l = queue_labels(i, q);
                    l.push(("status", "Ok".into()));
                    counter(&mut m, &l, q.counts.jobs_ok)?;
                    for (status, n) in &q.counts.failed_by_status {
                        l.pop();
                        l.push(("status", status.clone()));
                        counter(&mut m, &l, *n)?;
                    }
                }
            }
        }
        per_queue(
            &mut enc,
            r,
            (
                "wdvirt_queue_jobs_dropped",
                "Jobs taken but never completed: the queue was stopped or reset first.",
                None,
                c,
            ),
            |x| x.jobs_dropped,
        )?;
        per_queue(
            &mut enc,
            r,
            (
                "wdvirt_queue_jobs_in_flight",
                "Jobs taken and not yet completed.",
                None,
                g,
            ),
            |x| x.in_flight,
        )?;
        per_queue(
            &mut enc,
            r,
            (
                "wdvirt_queue_ring_waiting",
                "Submissions posted by the guest and not yet taken, at the device's last look.",
                None,
                g,
            ),
            |x| x.ring_waiting,
        )?;
        per_queue(
            &mut enc,
            r,
            (
                "wdvirt_queue_in",
                "Source bytes of jobs handed to an engine.",
                bytes,
                c,
            ),
            |x| x.bytes_in,
        )?;
        per_queue(
            &mut enc,
            r,
            (
                "wdvirt_queue_out",
                "Bytes written by jobs completed OK.",
                bytes,
                c,
            ),
            |x| x.bytes_out,
        )?;
        per_queue(
            &mut enc,
            r,
            (
                "wdvirt_queue_doorbells",
                "Doorbell writes received.",
                None,
                c,
            ),
            |x| x.doorbells,
        )?;
        per_queue(
            &mut enc,
            r,
            (
                "wdvirt_queue_interrupts",
                "MSI-X interrupts raised.",
                None,
                c,
            ),
            |x| x.interrupts,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "wdvirt_queue_latency",
                "Time from a job's fetch from the ring to its completion.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for i in &r.instances {
                for q in &i.queues {
                    let l = &q.latency;
                    let mut buckets = Vec::with_capacity(BOUNDS_NS.len() + 1);
                    let mut below = 0;
                    for (bound, &cum) in BOUNDS_NS.iter().zip(&l.buckets) {
                        buckets.push((seconds(*bound), cum.saturating_sub(below)));
                        below = below.max(cum);
                    }
                    buckets.push((f64::INFINITY, l.count.saturating_sub(below)));
                    m.encode_family(&queue_labels(i, q))?
                        .encode_histogram::<NoLabelSet>(
                            seconds(l.sum_ns),
                            l.count,
                            &buckets,
                            None,
                        )?;
                }
            }
        }
        type Field = fn(&InstanceStatsView) -> u64;
        let per_instance: [(&str, &str, Field); 7] = [
            (
                "wdvirt_instance_register_errors",
                "BAR0 accesses refused.",
                |i| i.device.register_errors,
            ),
            (
                "wdvirt_instance_stray_doorbells",
                "Doorbell writes to a queue that is not enabled.",
                |i| i.device.stray_doorbells,
            ),
            (
                "wdvirt_instance_dma_maps",
                "DMA_MAP messages applied.",
                |i| i.device.dma_maps,
            ),
            (
                "wdvirt_instance_dma_unmaps",
                "DMA_UNMAP messages applied.",
                |i| i.device.dma_unmaps,
            ),
            ("wdvirt_instance_resets", "Device resets.", |i| {
                i.device.resets
            }),
            (
                "wdvirt_instance_engine_dma_failures",
                "Bus Master changes the engines did not take.",
                |i| i.device.engine_dma_failures,
            ),
            (
                "wdvirt_instance_unquiesced_unmaps",
                "Unmap-alls done without the engines quiesced.",
                |i| i.device.unquiesced_unmaps,
            ),
        ];
        for (name, help, value) in per_instance {
            let mut m = enc.encode_descriptor(name, help, None, c)?;
            for i in &r.instances {
                counter(&mut m, &instance_labels(i), value(i))?;
            }
        }
        let sched = || {
            r.instances
                .iter()
                .filter_map(|i| Some((i, i.scheduler.as_ref()?)))
        };
        {
            let mut m = enc.encode_descriptor(
                "wdvirt_instance_engine",
                "Engine time the instance's jobs used (reported by the QoS scheduler).",
                Some(&Unit::Seconds),
                c,
            )?;
            for (i, s) in sched() {
                m.encode_family(&instance_labels(i))?
                    .encode_counter::<NoLabelSet, _, u64>(&seconds(s.engine_ns), None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "wdvirt_instance_entitlement",
                "The instance's entitled share of engine time now (0 to 1).",
                None,
                g,
            )?;
            for (i, s) in sched() {
                if let Some(e) = s.entitlement {
                    m.encode_family(&instance_labels(i))?.encode_gauge(&e)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "wdvirt_instance_throttled",
                "Time the instance's jobs were held back by the scheduler, by reason (rate, cap, share).",
                Some(&Unit::Seconds),
                c,
            )?;
            for (i, s) in sched() {
                throttled(&mut m, &instance_labels(i), &s.throttled)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "wdvirt_instance_interference",
                "Of the time the instance's jobs waited for an engine, how long a neighbour's jobs held it.",
                Some(&Unit::Seconds),
                c,
            )?;
            for (i, s) in sched() {
                for n in &s.interference {
                    let mut l = instance_labels(i);
                    l.push(("neighbour", n.neighbour.to_string()));
                    l.push(("neighbour_name", n.neighbour_name.clone()));
                    l.push(("neighbour_vm", n.neighbour_vm.clone().unwrap_or_default()));
                    m.encode_family(&l)?
                        .encode_counter::<NoLabelSet, _, u64>(&seconds(n.held_ns), None)?;
                }
            }
        }
        let fds = &r.process.vmm_fds;
        for (name, help, v) in [
            (
                "wdvirt_vmm_fds_queued",
                "Fds VMMs sent that the daemon refused or gave up, handed to its closer thread (one that might block is never closed on a thread serving a VMM).",
                fds.queued,
            ),
            (
                "wdvirt_vmm_fds_closed",
                "Of the queued fds, those the closer thread has closed.",
                fds.closed,
            ),
            (
                "wdvirt_vmm_fds_leaked",
                "Fds left open because the closer's queue was full, as when it is stuck on a fd a VMM controls (at most the leak cap).",
                fds.leaked,
            ),
            (
                "wdvirt_vmm_fds_closed_here",
                "Fds closed on the serving thread: the closer's queue full and the leak cap reached.",
                fds.closed_here,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, c)?;
            counter(&mut m, &Vec::new(), v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::latency::Latency;
    use crate::stats::report::{InstanceSample, QueueSample, SchedulerStats};

    #[test]
    fn every_family_is_labelled_and_histograms_are_cumulative() {
        let l = Latency::default();
        l.record(3_000);
        l.record(3_000_000);
        let q = QueueSample {
            queue: 1,
            counts: Counts {
                counters: crate::stats::QueueSnapshot {
                    jobs_submitted: 3,
                    jobs_ok: 2,
                    jobs_failed: 1,
                    ..Default::default()
                },
                jobs_completed: 3,
                failed_by_status: [("BadAddress".to_string(), 1)].into(),
                ..Default::default()
            },
            histogram: l.load(),
            latency_sum_ns: l.sum_ns(),
        };
        let mut r = StatsReport::build(
            vec![InstanceSample {
                uuid: uuid::Uuid::nil(),
                name: "a\"b".into(),
                vm: Some("web".into()),
                qos: "gold".into(),
                device: Default::default(),
                queues: vec![q],
                scheduler: Some(SchedulerStats {
                    engine_ns: 1_500_000_000,
                    ..Default::default()
                }),
            }],
            &[],
        );
        r.process.vmm_fds = crate::transport::closer::CloserTotals {
            queued: 5,
            closed: 4,
            leaked: 1,
            closed_here: 0,
        };
        let text = encode(r);
        let labels = r#"vm="web",instance="00000000-0000-0000-0000-000000000000",instance_name="a\"b",queue="1""#;
        for line in [
            format!("wdvirt_queue_jobs_submitted_total{{{labels}}} 3"),
            format!("wdvirt_queue_jobs_completed_total{{{labels},status=\"Ok\"}} 2"),
            format!("wdvirt_queue_jobs_completed_total{{{labels},status=\"BadAddress\"}} 1"),
            format!("wdvirt_queue_latency_seconds_count{{{labels}}} 2"),
            // (The encoder puts `le` first.)
            format!("wdvirt_queue_latency_seconds_bucket{{le=\"0.000002\",{labels}}} 0"),
            format!("wdvirt_queue_latency_seconds_bucket{{le=\"0.000005\",{labels}}} 1"),
            format!("wdvirt_queue_latency_seconds_bucket{{le=\"0.005\",{labels}}} 2"),
            format!("wdvirt_queue_latency_seconds_bucket{{le=\"+Inf\",{labels}}} 2"),
            "# TYPE wdvirt_queue_in_bytes counter".to_string(),
            "wdvirt_vmm_fds_queued_total 5".to_string(),
            "wdvirt_vmm_fds_closed_total 4".to_string(),
            "wdvirt_vmm_fds_leaked_total 1".to_string(),
            "wdvirt_vmm_fds_closed_here_total 0".to_string(),
            "wdvirt_instance_engine_seconds_total{vm=\"web\",instance=\"00000000-0000-0000-0000-000000000000\",instance_name=\"a\\\"b\"} 1.5".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
