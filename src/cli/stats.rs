//! `wdvirt stats`: per VM, instance and queue, what the daemon's counters
//! say now (one `GET /v1/stats` call; `--json` prints its answer as it came).

use clap::Args;

use super::client::ApiClient;
use super::ctl::JsonFlag;
use crate::daemon::action::Action;
use crate::stats::latency::LatencySummary;
use crate::stats::report::{Counts, StatsReport};

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Only this VM's instances (the VM named by `define/modify --vm`).
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// Only this instance (name or UUID); it must be started.
    #[arg(long, value_name = "NAME|UUID")]
    pub instance: Option<String>,
    #[command(flatten)]
    pub out: JsonFlag,
}

pub fn run(api: &ApiClient, a: StatsArgs) -> anyhow::Result<()> {
    let r: StatsReport = api.act(&Action::Stats {
        vm: a.vm,
        instance: a.instance,
    })?;
    if a.out.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    print!("{}", render(&r));
    Ok(())
}

/// `1.23ms`: three significant digits at most, in the unit that fits.
pub fn fmt_ns(ns: u64) -> String {
    let (v, unit) = match ns {
        0..1_000 => return format!("{ns}ns"),
        1_000..1_000_000 => (ns as f64 / 1e3, "µs"),
        1_000_000..1_000_000_000 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{unit}")
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

fn lat(l: &LatencySummary, f: fn(&LatencySummary) -> u64) -> String {
    if l.count == 0 {
        "-".into()
    } else {
        fmt_ns(f(l))
    }
}

fn statuses(c: &Counts) -> String {
    c.failed_by_status
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One row of counts: from SUBMITTED to the failures by status.
fn count_cells(c: &Counts, l: &LatencySummary) -> Vec<String> {
    vec![
        c.jobs_submitted.to_string(),
        c.jobs_ok.to_string(),
        c.jobs_failed.to_string(),
        c.jobs_dropped.to_string(),
        c.in_flight.to_string(),
        c.ring_waiting.to_string(),
        mib(c.bytes_in),
        mib(c.bytes_out),
        lat(l, |l| l.p50_ns),
        lat(l, |l| l.p99_ns),
        lat(l, |l| l.max_ns),
        statuses(c),
    ]
}

const COUNT_HEADERS: [&str; 12] = [
    "SUBMITTED",
    "OK",
    "FAILED",
    "DROPPED",
    "INFLIGHT",
    "WAITING",
    "MiB_IN",
    "MiB_OUT",
    "P50",
    "P99",
    "MAX",
    "FAILURES",
];

/// The tables: VMs, then each instance with a row per queue.
pub fn render(r: &StatsReport) -> String {
    let mut out = String::new();
    let table = |out: &mut String, rows: &[Vec<String>]| {
        out.push_str(&super::ctl::columns(rows));
        out.push('\n');
    };
    if !r.vms.is_empty() {
        let mut rows = vec![
            ["VM", "INSTANCES"]
                .into_iter()
                .chain(COUNT_HEADERS)
                .map(String::from)
                .collect::<Vec<_>>(),
        ];
        for v in &r.vms {
            let mut row = vec![v.vm.clone(), v.instances.join(",")];
            if row[1].is_empty() {
                row[1] = "-".into();
            }
            row.extend(count_cells(&v.totals, &v.latency));
            rows.push(row);
        }
        table(&mut out, &rows);
    }
    let mut rows = vec![
        ["INSTANCE", "VM", "QUEUE"]
            .into_iter()
            .chain(COUNT_HEADERS)
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    for i in &r.instances {
        let vm = i.vm.clone().unwrap_or_else(|| "-".into());
        let mut row = vec![i.name.clone(), vm.clone(), "all".into()];
        row.extend(count_cells(&i.totals, &i.latency));
        rows.push(row);
        for q in &i.queues {
            let mut row = vec![i.name.clone(), vm.clone(), q.queue.to_string()];
            row.extend(count_cells(&q.counts, &q.latency));
            rows.push(row);
        }
    }
    if r.instances.is_empty() {
        out.push_str("no started instance matches\n");
    } else {
        table(&mut out, &rows);
    }
    let sched: Vec<_> = r
        .instances
        .iter()
        .filter_map(|i| Some((i, i.scheduler.as_ref()?)))
        .collect();
    if !sched.is_empty() {
        let mut rows = vec![
            [
                "INSTANCE",
                "ENGINE",
                "ENTITLED",
                "THROTTLED_RATE",
                "THROTTLED_CAP",
                "THROTTLED_SHARE",
                "HELD_BY",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for (i, s) in sched {
            let held: Vec<String> = s
                .interference
                .iter()
                .map(|n| format!("{}={}", n.neighbour_name, fmt_ns(n.held_ns)))
                .collect();
            rows.push(vec![
                i.name.clone(),
                fmt_ns(s.engine_ns),
                s.entitlement
                    .map_or("-".into(), |e| format!("{:.1}%", e * 100.0)),
                fmt_ns(s.throttled.rate_ns),
                fmt_ns(s.throttled.cap_ns),
                fmt_ns(s.throttled.share_ns),
                held.join(","),
            ]);
        }
        table(&mut out, &rows);
    }
    // Only once a VMM has sent fds the daemon refused: a quiet line
    // otherwise would be noise.
    let f = &r.process.vmm_fds;
    if f.queued > 0 || f.leaked > 0 || f.closed_here > 0 {
        out.push_str(&format!(
            "VMM fds refused or given up: {} closed by the closer thread, {} waiting, {} leaked (its queue full), {} closed while serving\n",
            f.closed,
            f.queued.saturating_sub(f.closed),
            f.leaked,
            f.closed_here
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_the_unit_that_fits() {
        assert_eq!(fmt_ns(850), "850ns");
        assert_eq!(fmt_ns(12_345), "12.3µs");
        assert_eq!(fmt_ns(4_560_000), "4.56ms");
        assert_eq!(fmt_ns(250_000_000), "250ms");
        assert_eq!(fmt_ns(1_500_000_000), "1.50s");
    }
}
