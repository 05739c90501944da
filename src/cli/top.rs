//! `wdvirt top`: a live view of what each VM gets, refreshed in place —
//! throughput, its share (of engine time when the QoS scheduler reports it,
//! else of jobs completed), latency, and who holds the engines while whose
//! jobs wait. One `GET /v1/stats` per refresh; rates are the difference of
//! two answers. Drawn with ratatui on crossterm; `q` (or Esc, Ctrl-C) quits.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use uuid::Uuid;

use super::client::ApiClient;
use super::stats::fmt_ns;
use crate::daemon::action::Action;
use crate::stats::report::{InstanceStatsView, Interference, StatsReport, Throttled};

/// What one refresh asks the daemon for: every started instance.
const ALL_STATS: Action = Action::Stats {
    vm: None,
    instance: None,
};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Seconds between refreshes (0.1 to 60).
    #[arg(long, default_value = "1", value_name = "SECONDS", value_parser = parse_interval)]
    pub interval: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=60.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a number of seconds from 0.1 to 60")),
    }
}

/// What the share column measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareBasis {
    /// Engine time, as the QoS scheduler reports it.
    EngineTime,
    /// Jobs completed (no scheduler reports engine time).
    Jobs,
}

/// One VM (or an instance no VM claims, shown as `(name)`) over one
/// refresh interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmRow {
    pub name: String,
    pub instances: usize,
    pub jobs_per_s: f64,
    pub mb_in_per_s: f64,
    pub mb_out_per_s: f64,
    pub failed_per_s: f64,
    pub share: Option<f64>,
    pub entitled: Option<f64>,
    /// Mean latency of the jobs completed in the interval.
    pub avg_latency_ns: Option<u64>,
    /// p99 since the instances started (merged histograms).
    pub p99_ns: Option<u64>,
    pub in_flight: u64,
    pub waiting: u64,
    /// Seconds per second its jobs were throttled (all reasons).
    pub throttled: Option<f64>,
}

/// Who held the engines while whose jobs waited, over the interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Interfering {
    pub victim: String,
    pub neighbour: String,
    /// Seconds held per second of the interval.
    pub held_per_s: f64,
}

/// The VM an instance's figures count under.
fn group(i: &InstanceStatsView) -> String {
    i.vm.clone().unwrap_or_else(|| format!("({})", i.name))
}

/// One instance's change over an interval: the difference of two answers,
/// from zero when it is new or was restarted in between (counters lower
/// than before).
struct Delta<'a> {
    now: &'a InstanceStatsView,
    jobs: u64,
    failed: u64,
    bytes_in: u64,
    bytes_out: u64,
    lat_count: u64,
    lat_sum: u64,
    /// Queues that completed a job in the interval.
    busy_queues: usize,
    /// Engine and throttled nanoseconds, when the scheduler reports.
    engine: Option<u64>,
    throttled: Option<u64>,
    /// Nanoseconds each neighbour held the engines while its jobs waited.
    held: Vec<(&'a Interference, u64)>,
}

fn deltas<'a>(prev: &'a StatsReport, now: &'a StatsReport) -> Vec<Delta<'a>> {
    let before: BTreeMap<Uuid, &InstanceStatsView> =
        prev.instances.iter().map(|i| (i.uuid, i)).collect();
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let throttled = |t: &Throttled| t.rate_ns + t.cap_ns + t.share_ns;
    now.instances
        .iter()
        .map(|i| {
            let p = before
                .get(&i.uuid)
                .copied()
                .filter(|p| p.totals.jobs_submitted <= i.totals.jobs_submitted);
            let was = |f: fn(&InstanceStatsView) -> u64| p.map_or(0, f);
            let delta = |f: fn(&InstanceStatsView) -> u64| d(f(i), was(f));
            let busy_queues = i
                .queues
                .iter()
                .filter(|q| {
                    let before = p
                        .and_then(|p| p.queues.iter().find(|x| x.queue == q.queue))
                        .map_or(0, |x| x.counts.jobs_completed);
                    q.counts.jobs_completed > before
                })
                .count();
            let s = i.scheduler.as_ref();
            let ps = p.and_then(|p| p.scheduler.as_ref());
            Delta {
                now: i,
                jobs: delta(|i| i.totals.jobs_completed),
                failed: delta(|i| i.totals.jobs_failed),
                bytes_in: delta(|i| i.totals.bytes_in),
                bytes_out: delta(|i| i.totals.bytes_out),
                lat_count: delta(|i| i.latency.count),
                lat_sum: delta(|i| i.latency.sum_ns),
                busy_queues,
                engine: s.map(|s| d(s.engine_ns, ps.map_or(0, |x| x.engine_ns))),
                throttled: s.map(|s| {
                    d(
                        throttled(&s.throttled),
                        ps.map_or(0, |x| throttled(&x.throttled)),
                    )
                }),
                held: s
                    .into_iter()
                    .flat_map(|s| &s.interference)
                    .map(|n| {
                        let was = ps
                            .and_then(|x| {
                                x.interference.iter().find(|m| m.neighbour == n.neighbour)
                            })
                            .map_or(0, |m| m.held_ns);
                        (n, d(n.held_ns, was))
                    })
                    .filter(|(_, ns)| *ns > 0)
                    .collect(),
            }
        })
        .collect()
}

#[derive(Default)]
struct Acc {
    instances: usize,
    jobs: u64,
    failed: u64,
    bytes_in: u64,
    bytes_out: u64,
    lat_count: u64,
    lat_sum: u64,
    engine: u64,
    entitled: Option<f64>,
    throttled: Option<u64>,
    in_flight: u64,
    waiting: u64,
    p99: Option<u64>,
}

impl ShareBasis {
    /// What a group's share is measured in.
    fn of(self, g: &Acc) -> u64 {
        match self {
            ShareBasis::EngineTime => g.engine,
            ShareBasis::Jobs => g.jobs,
        }
    }
}

/// Rows for the interval from `prev` to `now`, `dt` seconds apart. An
/// instance restarted in between (counters lower than before) counts from zero.
pub fn rows(
    prev: &StatsReport,
    now: &StatsReport,
    dt: f64,
) -> (Vec<VmRow>, ShareBasis, Vec<Interfering>) {
    let basis = if now.instances.iter().any(|i| i.scheduler.is_some()) {
        ShareBasis::EngineTime
    } else {
        ShareBasis::Jobs
    };
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    let mut held = Vec::new();
    let names: BTreeMap<Uuid, String> = now.instances.iter().map(|i| (i.uuid, group(i))).collect();
    for x in deltas(prev, now) {
        let i = x.now;
        let g = groups.entry(group(i)).or_default();
        g.instances += 1;
        g.jobs += x.jobs;
        g.failed += x.failed;
        g.bytes_in += x.bytes_in;
        g.bytes_out += x.bytes_out;
        g.lat_count += x.lat_count;
        g.lat_sum += x.lat_sum;
        g.in_flight += i.totals.in_flight;
        g.waiting += i.totals.ring_waiting;
        // Replaced below by the VM's merged p99 when the report has it.
        if i.latency.count > 0 {
            g.p99 = Some(g.p99.unwrap_or(0).max(i.latency.p99_ns));
        }
        if let Some(e) = i.scheduler.as_ref().and_then(|s| s.entitlement) {
            *g.entitled.get_or_insert(0.0) += e;
        }
        g.engine += x.engine.unwrap_or(0);
        if let Some(t) = x.throttled {
            *g.throttled.get_or_insert(0) += t;
        }
        for (n, ns) in x.held {
            held.push(Interfering {
                victim: group(i),
                neighbour: names.get(&n.neighbour).cloned().unwrap_or_else(|| {
                    n.neighbour_vm
                        .clone()
                        .unwrap_or_else(|| n.neighbour_name.clone())
                }),
                held_per_s: ns as f64 / 1e9 / dt,
            });
        }
    }
    // A VM's p99 is its merged histogram's, when the daemon gave one.
    for v in &now.vms {
        if let Some(g) = groups.get_mut(&v.vm)
            && v.latency.count > 0
        {
            g.p99 = Some(v.latency.p99_ns);
        }
    }
    let total: u64 = groups.values().map(|g| basis.of(g)).sum();
    let mb = |b: u64| b as f64 / 1e6 / dt;
    let out = groups
        .into_iter()
        .map(|(name, g)| VmRow {
            share: (total > 0).then(|| basis.of(&g) as f64 / total as f64),
            name,
            instances: g.instances,
            jobs_per_s: g.jobs as f64 / dt,
            mb_in_per_s: mb(g.bytes_in),
            mb_out_per_s: mb(g.bytes_out),
            failed_per_s: g.failed as f64 / dt,
            entitled: g.entitled,
            avg_latency_ns: g.lat_sum.checked_div(g.lat_count),
            p99_ns: g.p99,
            in_flight: g.in_flight,
            waiting: g.waiting,
            throttled: g.throttled.map(|ns| ns as f64 / 1e9 / dt),
        })
        .collect();
    held.sort_by(|a, b| b.held_per_s.total_cmp(&a.held_per_s));
    (out, basis, held)
}

/// One instance over one refresh interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstRow {
    pub name: String,
    pub vm: String,
    /// Queues that completed a job in the interval.
    pub busy_queues: usize,
    pub jobs_per_s: f64,
    pub mb_in_per_s: f64,
    pub avg_latency_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub in_flight: u64,
    pub waiting: u64,
    pub failed_per_s: f64,
}

/// Per-instance rows for the interval from `prev` to `now`.
pub fn instance_rows(prev: &StatsReport, now: &StatsReport, dt: f64) -> Vec<InstRow> {
    deltas(prev, now)
        .into_iter()
        .map(|x| {
            let i = x.now;
            InstRow {
                name: i.name.clone(),
                vm: i.vm.clone().unwrap_or_else(|| "-".into()),
                busy_queues: x.busy_queues,
                jobs_per_s: x.jobs as f64 / dt,
                mb_in_per_s: x.bytes_in as f64 / 1e6 / dt,
                avg_latency_ns: x.lat_sum.checked_div(x.lat_count),
                p99_ns: (i.latency.count > 0).then_some(i.latency.p99_ns),
                in_flight: i.totals.in_flight,
                waiting: i.totals.ring_waiting,
                failed_per_s: x.failed as f64 / dt,
            }
        })
        .collect()
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

fn draw(
    f: &mut ratatui::Frame,
    now: &StatsReport,
    (vms, basis, held): &(Vec<VmRow>, ShareBasis, Vec<Interfering>),
    instances: &[InstRow],
    interval: Duration,
    status: &str,
) {
    let [title, vm_area, inst_area, held_area, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(vms.len() as u16 + 3),
        Constraint::Min(4),
        Constraint::Length((held.len().min(8) + 2).max(3) as u16),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(format!(
            "wdvirt top  {} instances, {} VMs  every {:.1}s  q quits",
            now.instances.len(),
            vms.len(),
            interval.as_secs_f64()
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );
    let header = Row::new([
        "VM",
        "INST",
        "JOBS/S",
        "MB/S IN",
        "MB/S OUT",
        "SHARE",
        "ENTITLED",
        "AVG LAT",
        "P99",
        "FAILED/S",
        "INFLIGHT",
        "WAITING",
        "THROTTLED",
    ])
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let body = vms.iter().map(|v| {
        Row::new([
            v.name.clone(),
            v.instances.to_string(),
            format!("{:.0}", v.jobs_per_s),
            format!("{:.1}", v.mb_in_per_s),
            format!("{:.1}", v.mb_out_per_s),
            pct(v.share),
            pct(v.entitled),
            v.avg_latency_ns.map_or("-".into(), fmt_ns),
            v.p99_ns.map_or("-".into(), fmt_ns),
            format!("{:.0}", v.failed_per_s),
            v.in_flight.to_string(),
            v.waiting.to_string(),
            v.throttled
                .map_or("-".into(), |t| format!("{:.0}%", t * 100.0)),
        ])
    });
    let widths = [
        Constraint::Min(12),
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(9),
    ];
    f.render_widget(
        Table::new(body, widths)
            .header(header)
            .block(Block::bordered().title(" per VM ")),
        vm_area,
    );
    let header = Row::new([
        "INSTANCE", "VM", "BUSY Q", "JOBS/S", "MB/S IN", "AVG LAT", "P99", "FAILED/S", "INFLIGHT",
        "WAITING",
    ])
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let body = instances.iter().map(|i| {
        Row::new([
            i.name.clone(),
            i.vm.clone(),
            i.busy_queues.to_string(),
            format!("{:.0}", i.jobs_per_s),
            format!("{:.1}", i.mb_in_per_s),
            i.avg_latency_ns.map_or("-".into(), fmt_ns),
            i.p99_ns.map_or("-".into(), fmt_ns),
            format!("{:.0}", i.failed_per_s),
            i.in_flight.to_string(),
            i.waiting.to_string(),
        ])
    });
    let widths = [
        Constraint::Min(12),
        Constraint::Min(12),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
    ];
    f.render_widget(
        Table::new(body, widths)
            .header(header)
            .block(Block::bordered().title(" per instance ")),
        inst_area,
    );
    let lines: Vec<Line> = if held.is_empty() {
        vec![Line::from(match basis {
            ShareBasis::EngineTime => "no job waited on a neighbour's in this interval",
            ShareBasis::Jobs => "no QoS scheduler reports interference yet",
        })]
    } else {
        held.iter()
            .take(8)
            .map(|h| {
                Line::from(format!(
                    "{:<20} waited {:>5.0}% of the time on {}",
                    h.victim,
                    h.held_per_s * 100.0,
                    h.neighbour
                ))
            })
            .collect()
    };
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" who waits on whom ")),
        held_area,
    );
    let basis = match basis {
        ShareBasis::EngineTime => "share: of engine time",
        ShareBasis::Jobs => "share: of jobs completed (no scheduler reports engine time)",
    };
    f.render_widget(Paragraph::new(format!("{basis}  {status}")), foot);
}

pub fn run(api: &ApiClient, a: TopArgs) -> anyhow::Result<()> {
    // Errors (no daemon, no terminal) are reported before the screen changes.
    // The last answer, shown and differenced against the next one.
    let mut now: StatsReport = api.act(&ALL_STATS)?;
    let mut now_at = Instant::now();
    let mut terminal = ratatui::try_init().context("wdvirt top needs a terminal")?;
    let result = (|| -> anyhow::Result<()> {
        let mut view = rows(&now, &now, 1.0);
        let mut insts = instance_rows(&now, &now, 1.0);
        let mut status = String::from("waiting for the first interval");
        let mut next = Instant::now() + a.interval;
        let mut refreshes = 0u64;
        loop {
            terminal.draw(|f| draw(f, &now, &view, &insts, a.interval, &status))?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                if let Event::Key(k) = event::read()?
                    && k.kind == KeyEventKind::Press
                    && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                        || (k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL)))
                {
                    return Ok(());
                }
                continue;
            }
            next = Instant::now() + a.interval;
            match api.act::<StatsReport>(&ALL_STATS) {
                Ok(r) => {
                    let at = Instant::now();
                    let dt = at.duration_since(now_at).as_secs_f64().max(1e-3);
                    view = rows(&now, &r, dt);
                    insts = instance_rows(&now, &r, dt);
                    (now, now_at) = (r, at);
                    refreshes += 1;
                    status = format!("refresh {refreshes}");
                }
                Err(e) => status = format!("cannot refresh: {e:#}"),
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::report::{Counts, SchedulerStats};

    fn inst(name: &str, vm: Option<&str>, jobs: u64, lat_sum: u64) -> InstanceStatsView {
        InstanceStatsView {
            uuid: Uuid::from_u128(name.bytes().fold(0u128, |h, b| h * 131 + b as u128)),
            name: name.into(),
            vm: vm.map(String::from),
            qos: "q".into(),
            totals: Counts {
                counters: crate::stats::QueueSnapshot {
                    jobs_submitted: jobs,
                    jobs_ok: jobs,
                    bytes_in: jobs * 1_000_000,
                    ..Default::default()
                },
                jobs_completed: jobs,
                ..Default::default()
            },
            latency: crate::stats::latency::LatencySummary {
                count: jobs,
                sum_ns: lat_sum,
                ..Default::default()
            },
            device: Default::default(),
            queues: vec![],
            scheduler: None,
        }
    }

    #[test]
    fn rates_shares_and_latency_come_from_the_difference_of_two_answers() {
        let prev = StatsReport {
            instances: vec![inst("a", Some("web"), 100, 1_000), inst("b", None, 10, 0)],
            vms: vec![],
            ..Default::default()
        };
        let now = StatsReport {
            instances: vec![
                inst("a", Some("web"), 400, 1_000 + 300 * 2_000),
                inst("b", None, 110, 100 * 5_000),
            ],
            vms: vec![],
            ..Default::default()
        };
        let (rows, basis, held) = rows(&prev, &now, 2.0);
        assert_eq!(basis, ShareBasis::Jobs);
        assert!(held.is_empty());
        let names: Vec<_> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["(b)", "web"]);
        let web = &rows[1];
        assert_eq!(web.jobs_per_s, 150.0);
        assert_eq!(web.mb_in_per_s, 150.0);
        assert_eq!(web.share, Some(0.75));
        assert_eq!(web.avg_latency_ns, Some(2_000));
        assert_eq!(rows[0].share, Some(0.25));
        let inst = instance_rows(&prev, &now, 2.0);
        assert_eq!(inst[0].name, "a");
        assert_eq!(inst[0].jobs_per_s, 150.0);
        assert_eq!(inst[0].avg_latency_ns, Some(2_000));
        assert_eq!((inst[1].vm.as_str(), inst[1].jobs_per_s), ("-", 50.0));
    }

    #[test]
    fn with_a_scheduler_shares_are_of_engine_time_and_neighbours_are_named() {
        let mut a0 = inst("a", Some("web"), 0, 0);
        let mut b0 = inst("b", Some("batch"), 0, 0);
        let sched = |engine, held: Vec<Interference>| {
            Some(SchedulerStats {
                engine_ns: engine,
                entitlement: Some(0.5),
                interference: held,
                ..Default::default()
            })
        };
        a0.scheduler = sched(0, vec![]);
        b0.scheduler = sched(0, vec![]);
        let prev = StatsReport {
            instances: vec![a0.clone(), b0.clone()],
            vms: vec![],
            ..Default::default()
        };
        let (mut a1, mut b1) = (
            inst("a", Some("web"), 10, 0),
            inst("b", Some("batch"), 1, 0),
        );
        a1.scheduler = sched(
            250_000_000,
            vec![Interference {
                neighbour: b0.uuid,
                held_ns: 500_000_000,
                ..Default::default()
            }],
        );
        b1.scheduler = sched(750_000_000, vec![]);
        let now = StatsReport {
            instances: vec![a1, b1],
            vms: vec![],
            ..Default::default()
        };
        let (rows, basis, held) = rows(&prev, &now, 1.0);
        assert_eq!(basis, ShareBasis::EngineTime);
        assert_eq!(rows[0].name, "batch");
        assert_eq!((rows[0].share, rows[1].share), (Some(0.75), Some(0.25)));
        assert_eq!(rows[1].entitled, Some(0.5));
        assert_eq!(
            held,
            [Interfering {
                victim: "web".into(),
                neighbour: "batch".into(),
                held_per_s: 0.5
            }]
        );
    }

    #[test]
    fn intervals_out_of_range_are_refused_by_name() {
        assert!(parse_interval("0.5").is_ok());
        assert!(parse_interval("0").unwrap_err().contains("'0'"));
        assert!(parse_interval("x").is_err());
    }
}
