//! What `wdvirt stats` shows (and `wdvirt top` and `/metrics` read): per
//! queue, per instance and per VM, the same counts added up, latency
//! summaries from histograms merged (never averaged percentiles), and what
//! the QoS scheduler says about each instance when it reports.

use std::collections::BTreeMap;

use histogram::Histogram;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::latency::{LatencySummary, merge};
use super::{InstanceSnapshot, QueueSnapshot, QueueStats};

/// Counts that add up from queues to instances to VMs: the queue counters
/// (read through `Deref`: `c.jobs_ok`) and what is derived from them and
/// the ring.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    #[serde(flatten)]
    pub counters: QueueSnapshot,
    /// Completions written (OK and failed).
    pub jobs_completed: u64,
    /// Failed completions by status name (`BadAddress`, ...).
    #[serde(default)]
    pub failed_by_status: BTreeMap<String, u64>,
    /// Taken and not yet completed (with the scheduler or an engine).
    pub in_flight: u64,
    /// Posted by the guest, not yet taken (at the device's last look).
    pub ring_waiting: u64,
}

impl std::ops::Deref for Counts {
    type Target = QueueSnapshot;
    fn deref(&self) -> &QueueSnapshot {
        &self.counters
    }
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.counters.add(&o.counters);
        self.jobs_completed += o.jobs_completed;
        for (k, v) in &o.failed_by_status {
            *self.failed_by_status.entry(k.clone()).or_default() += v;
        }
        self.in_flight += o.in_flight;
        self.ring_waiting += o.ring_waiting;
    }
}

/// Time an instance's (or a queue's) jobs were held back by the scheduler,
/// by reason, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttled {
    /// Its jobs/s or bytes/s token bucket was empty.
    pub rate_ns: u64,
    /// It had its cap of jobs in flight.
    pub cap_ns: u64,
    /// Other instances were owed engine time first (fair sharing).
    pub share_ns: u64,
}

impl Throttled {
    pub fn add(&mut self, o: &Throttled) {
        self.rate_ns += o.rate_ns;
        self.cap_ns += o.cap_ns;
        self.share_ns += o.share_ns;
    }
}

/// Of the time this instance's jobs waited for an engine, how long one
/// neighbour's jobs held it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interference {
    pub neighbour: Uuid,
    /// The neighbour's instance name and VM (the scheduler knows instances
    /// by UUID; whoever builds the sample adds the names).
    #[serde(default)]
    pub neighbour_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour_vm: Option<String>,
    pub held_ns: u64,
}

/// What the QoS scheduler (`src/qos`) reports for one instance. Absent
/// (`None` in the views) while no scheduler reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerStats {
    /// Engine time its jobs used.
    pub engine_ns: u64,
    /// Its entitled share of engine time now (0..=1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entitlement: Option<f64>,
    pub throttled: Throttled,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interference: Vec<Interference>,
}

/// One queue's counters read at once (with its histogram, for merging).
#[derive(Clone, Debug)]
pub struct QueueSample {
    pub queue: u32,
    pub counts: Counts,
    pub histogram: Option<Histogram>,
    pub latency_sum_ns: u64,
}

impl QueueSample {
    pub fn take(queue: u32, s: &QueueStats) -> QueueSample {
        let c = s.snapshot();
        // The counters, then the histogram: not one atomic read. `completed`
        // counts a job before it times it, so the two can differ by the jobs
        // completing while they are read (the counts are not ordered with
        // the latency count).
        let histogram = s.latency.load();
        let latency_sum_ns = s.latency.sum_ns();
        let completed = c.jobs_ok + c.jobs_failed;
        let dropped = c.jobs_dropped;
        QueueSample {
            queue,
            counts: Counts {
                counters: c,
                jobs_completed: completed,
                failed_by_status: s.failed_by_status(),
                // (The worker counts a batch taken after the refusals in it
                // were completed, so a reader can see completions first.)
                in_flight: c.jobs_submitted.saturating_sub(completed + dropped),
                ring_waiting: s.ring_waiting.load(std::sync::atomic::Ordering::Relaxed),
            },
            histogram,
            latency_sum_ns,
        }
    }
}

/// One running instance as the daemon sees it, for [`StatsReport::build`].
#[derive(Clone, Debug)]
pub struct InstanceSample {
    pub uuid: Uuid,
    pub name: String,
    pub vm: Option<String>,
    pub qos: String,
    pub device: InstanceSnapshot,
    pub queues: Vec<QueueSample>,
    pub scheduler: Option<SchedulerStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    pub queue: u32,
    #[serde(flatten)]
    pub counts: Counts,
    pub latency: LatencySummary,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatsView {
    pub uuid: Uuid,
    pub name: String,
    /// The VM the instance is attached to, when one was named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub qos: String,
    /// Its queues added up.
    pub totals: Counts,
    pub latency: LatencySummary,
    pub device: InstanceSnapshot,
    pub queues: Vec<QueueView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatsView {
    pub vm: String,
    /// Names of its running instances.
    pub instances: Vec<String>,
    pub totals: Counts,
    pub latency: LatencySummary,
    /// Its instances' engine time and throttling added up, when the
    /// scheduler reports for any of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled: Option<Throttled>,
}

/// The answer to `GET /v1/stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Running instances, by name.
    pub instances: Vec<InstanceStatsView>,
    /// VMs named by the instances above (and a VM asked for by name even
    /// when none of its instances runs), by name.
    pub vms: Vec<VmStatsView>,
    /// The daemon process's own figures, shared by every instance.
    #[serde(default)]
    pub process: ProcessView,
}

/// What the daemon process did that belongs to no one instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessView {
    /// Fds VMMs sent that the daemon refused or gave up, by how each was
    /// closed (`crate::transport::closer`: one that might block goes to
    /// the closer thread, never to the thread serving a VMM).
    pub vmm_fds: crate::transport::closer::CloserTotals,
}

impl StatsReport {
    /// Views of `samples`; `vms` adds VMs to show even without a running
    /// instance (a VM asked for by name).
    pub fn build(samples: Vec<InstanceSample>, vms: &[String]) -> StatsReport {
        let mut by_vm: BTreeMap<String, (VmStatsView, Option<Histogram>)> = vms
            .iter()
            .map(|v| (v.clone(), (empty_vm(v), None)))
            .collect();
        let mut instances = Vec::with_capacity(samples.len());
        for s in samples {
            let mut totals = Counts::default();
            let mut merged = None;
            let mut sum = 0;
            let queues = s
                .queues
                .iter()
                .map(|q| {
                    totals.add(&q.counts);
                    merge(&mut merged, q.histogram.as_ref());
                    sum += q.latency_sum_ns;
                    QueueView {
                        queue: q.queue,
                        counts: q.counts.clone(),
                        latency: LatencySummary::of(q.histogram.as_ref(), q.latency_sum_ns),
                    }
                })
                .collect();
            if let Some(vm) = &s.vm {
                let (v, h) = by_vm
                    .entry(vm.clone())
                    .or_insert_with(|| (empty_vm(vm), None));
                v.instances.push(s.name.clone());
                v.totals.add(&totals);
                v.latency.sum_ns += sum;
                merge(h, merged.as_ref());
                if let Some(x) = &s.scheduler {
                    *v.engine_ns.get_or_insert(0) += x.engine_ns;
                    v.throttled.get_or_insert_default().add(&x.throttled);
                }
            }
            instances.push(InstanceStatsView {
                uuid: s.uuid,
                name: s.name,
                vm: s.vm,
                qos: s.qos,
                totals,
                latency: LatencySummary::of(merged.as_ref(), sum),
                device: s.device,
                queues,
                scheduler: s.scheduler,
            });
        }
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        let vms = by_vm
            .into_values()
            .map(|(mut v, h)| {
                v.latency = LatencySummary::of(h.as_ref(), v.latency.sum_ns);
                v.instances.sort();
                v
            })
            .collect();
        StatsReport {
            instances,
            vms,
            process: ProcessView::default(),
        }
    }
}

fn empty_vm(name: &str) -> VmStatsView {
    VmStatsView {
        vm: name.to_string(),
        instances: Vec::new(),
        totals: Counts::default(),
        latency: LatencySummary::default(),
        engine_ns: None,
        throttled: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::latency::Latency;

    fn queue(queue: u32, ok: u64, failed: u64, lat_ns: u64) -> QueueSample {
        let l = Latency::default();
        for _ in 0..ok + failed {
            l.record(lat_ns);
        }
        QueueSample {
            queue,
            counts: Counts {
                counters: QueueSnapshot {
                    jobs_submitted: ok + failed,
                    jobs_ok: ok,
                    jobs_failed: failed,
                    bytes_out: ok * 10,
                    ..Default::default()
                },
                jobs_completed: ok + failed,
                failed_by_status: if failed > 0 {
                    [("BadAddress".to_string(), failed)].into()
                } else {
                    BTreeMap::new()
                },
                ..Default::default()
            },
            histogram: l.load(),
            latency_sum_ns: l.sum_ns(),
        }
    }

    fn instance(name: &str, vm: Option<&str>, queues: Vec<QueueSample>) -> InstanceSample {
        InstanceSample {
            uuid: Uuid::new_v4(),
            name: name.into(),
            vm: vm.map(String::from),
            qos: "silver".into(),
            device: InstanceSnapshot::default(),
            queues,
            scheduler: None,
        }
    }

    #[test]
    fn counts_add_up_from_queues_to_instances_to_vms() {
        let r = StatsReport::build(
            vec![
                instance(
                    "b",
                    Some("web"),
                    vec![queue(0, 5, 1, 1_000), queue(1, 4, 0, 1_000)],
                ),
                instance("a", Some("web"), vec![queue(0, 100, 2, 1_000_000)]),
                instance("c", None, vec![queue(0, 7, 0, 1_000)]),
            ],
            &["idle-vm".to_string()],
        );
        assert_eq!(
            r.instances
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        let b = &r.instances[1];
        assert_eq!((b.totals.jobs_ok, b.totals.jobs_failed), (9, 1));
        assert_eq!(b.totals.failed_by_status["BadAddress"], 1);
        assert_eq!(b.latency.count, 10);
        assert_eq!(r.vms.len(), 2, "{:?}", r.vms);
        let (idle, web) = (&r.vms[0], &r.vms[1]);
        assert_eq!((idle.vm.as_str(), idle.instances.len()), ("idle-vm", 0));
        assert_eq!(web.instances, ["a", "b"]);
        assert_eq!(web.totals.jobs_ok, 109);
        assert_eq!(web.totals.failed_by_status["BadAddress"], 3);
        assert_eq!(web.totals.bytes_out, 1090);
        // Merged histograms: 102 of 112 jobs took 1 ms, so the VM's p50 is
        // 1 ms although instance b's is 1 µs.
        assert_eq!(web.latency.count, 112);
        assert!(
            (1_000_000..1_040_000).contains(&web.latency.p50_ns),
            "{:?}",
            web.latency
        );
        assert!(b.latency.p50_ns < 1_100, "{:?}", b.latency);
    }

    #[test]
    fn scheduler_figures_add_up_per_vm() {
        let mut i = instance("a", Some("vm"), vec![queue(0, 1, 0, 1), queue(1, 1, 0, 1)]);
        i.scheduler = Some(SchedulerStats {
            engine_ns: 500,
            throttled: Throttled {
                rate_ns: 1,
                cap_ns: 2,
                share_ns: 3,
            },
            ..Default::default()
        });
        let r = StatsReport::build(vec![i], &[]);
        assert_eq!(r.vms[0].engine_ns, Some(500));
        assert_eq!(r.vms[0].throttled.unwrap().share_ns, 3);
        let json = serde_json::to_value(&r).unwrap();
        let back: StatsReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, r, "the CLI reads back what the daemon wrote");
    }
}
