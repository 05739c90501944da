//! The daemon killed under load and started again: every instance is taken
//! over from the fd holder with its VMM still connected, and every job the
//! guests submitted completes exactly once with a verified result.
//!
//! The guests are the real driver (`wdvirt::vmm::load`, the library's
//! verified mixed load) over in-process VMMs' memfd RAM, each on its own
//! instance's real socket. `WDVIRT_KILLS=100 cargo test --test restart` is
//! the recorded long run (`docs/restart.md`); CI runs 10.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::Value;
use wdvirt::vmm::load::{Load, LoadOptions, LoadSummary};
use wdvirt::vmm::migrate::Vm;
use wdvirt::vmm::{GuestRam, LoopbackVmm};

const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 16 << 20;
const QUEUES: u32 = 4;

/// One engine (the tests share two cores), a QoS cap so that the scheduler
/// holds jobs back (some are with the scheduler, some running, some done
/// at each kill).
const HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 1
    queue_pairs: 64
    operations: [all]
    pasids: 16
qos_policies:
  - name: capped
    weight: 100
    max_in_flight: 16
types:
  - name: quad
    queues: 4
    operations: [all]
    max_depth: 256
    qos: capped
  - name: one
    queues: 1
    operations: [all]
    max_depth: 64
    qos: capped
"#;

struct Guest {
    load: Option<Load>,
    _vm: Arc<Vm>,
}

impl Guest {
    fn boot(socket: &std::path::Path) -> Guest {
        Guest::boot_with(socket, QUEUES, RAM_SIZE)
    }

    fn boot_with(socket: &std::path::Path, queues: u32, ram: u64) -> Guest {
        let ram = GuestRam::new(RAM_BASE, ram).unwrap();
        let vm = Vm::new(LoopbackVmm::connect_migratable(socket, ram).unwrap());
        let load = Load::start(&vm, LoadOptions { queues, depth: 32 }).unwrap();
        Guest {
            load: Some(load),
            _vm: vm,
        }
    }

    fn verified(&self) -> u64 {
        let load = self.load.as_ref().unwrap();
        let s = load.stats();
        assert!(load.is_running(), "the guest failed: {:?}", load.failure());
        assert!(
            s.failed == 0 && s.repeated == 0,
            "{s:?}: {:?}",
            load.failure()
        );
        s.verified
    }

    fn finish(mut self) -> LoadSummary {
        let s = self.load.take().unwrap().finish();
        assert_eq!(s.failure, None);
        assert_eq!(
            (s.stats.failed, s.stats.repeated, s.never_completed),
            (0, 0, 0),
            "every job once"
        );
        assert_eq!(s.stats.verified, s.stats.jobs);
        assert_eq!(s.device_completed, Some(s.completed), "Q_COMPLETED went on");
        s
    }
}

/// Waits until every guest has verified `more` further jobs.
fn progress(guests: &[Guest], more: u64, what: &str) {
    let want: Vec<u64> = guests.iter().map(|g| g.verified() + more).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while guests.iter().zip(&want).any(|(g, &w)| g.verified() < w) {
        assert!(
            Instant::now() < deadline,
            "{what}: the guests made no progress"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn instance_jobs(d: &Daemon, name: &str) -> (u64, u64) {
    let list = d.json(&["list"]);
    let inst = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list}"));
    let queues = inst["report"]["queues"].as_array().expect("queue counters");
    let sum = |f: &str| queues.iter().map(|q| q[f].as_u64().unwrap()).sum::<u64>();
    (sum("jobs_ok"), sum("jobs_failed"))
}

#[test]
fn sigkill_under_load_every_instance_is_taken_over_and_every_job_completes_once() {
    use rand::{Rng, SeedableRng};
    let kills: u32 = std::env::var("WDVIRT_KILLS")
        .ok()
        .map(|v| v.parse().expect("WDVIRT_KILLS is a number"))
        .unwrap_or(10);
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut d = Daemon::start(HOST);
    let names = ["a", "b", "c"];
    for n in names {
        d.json(&["define", "--type", "quad", "--name", n]);
        d.json(&["start", n]);
    }
    let guests: Vec<Guest> = names.iter().map(|n| Guest::boot(&d.socket(n))).collect();
    progress(&guests, 50, "before the first kill");
    let mut down = Duration::ZERO;
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
        d.kill9();
        let killed = Instant::now();
        d.spawn();
        down += killed.elapsed();
        progress(&guests, 30, &format!("after kill {k} (seed {seed})"));
    }
    // Each instance was taken over with its VMM by the last daemon.
    let list: Value = d.json(&["list"]);
    for v in list.as_array().unwrap() {
        assert_eq!(v["state"], "attached", "{v}");
        assert!(v["report"]["adopted"].is_object(), "{v}");
    }
    let summaries: Vec<LoadSummary> = guests.into_iter().map(Guest::finish).collect();
    // The daemon's counters went on across every restart: they are the
    // jobs the guests counted.
    for (n, s) in names.iter().zip(&summaries) {
        let (ok, failed) = instance_jobs(&d, n);
        assert_eq!((ok, failed), (s.stats.jobs, 0), "instance {n}'s counters");
    }
    eprintln!(
        "{kills} kills, {} jobs checked, {:?} per restart (until the API answered)",
        summaries.iter().map(|s| s.stats.jobs).sum::<u64>(),
        down / kills.max(1),
    );
}

/// `wdvirt upgrade` with every one of 16 instances running jobs: the daemon
/// execs its program again, takes every instance over, and no job fails,
/// repeats or goes missing. The longest time any guest saw no completion
/// is measured and printed (docs/restart.md records it).
#[test]
fn a_live_upgrade_under_jobs_on_16_instances_loses_nothing_and_its_pause_is_measured() {
    let d = Daemon::start(HOST);
    let names: Vec<String> = (0..16).map(|i| format!("u{i}")).collect();
    for n in &names {
        d.json(&["define", "--type", "one", "--name", n]);
        d.json(&["start", n]);
    }
    let guests: Vec<Guest> = names
        .iter()
        .map(|n| Guest::boot_with(&d.socket(n), 1, 4 << 20))
        .collect();
    progress(&guests, 20, "before the upgrade");
    // Each guest's verified count, sampled every 200 µs from before the
    // upgrade until well after it.
    let counters: Vec<_> = guests
        .iter()
        .map(|g| g.load.as_ref().unwrap().counters())
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut last: Vec<(u64, Instant)> = counters
                .iter()
                .map(|c| (c.stats().verified, Instant::now()))
                .collect();
            let mut worst = vec![Duration::ZERO; counters.len()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, c) in counters.iter().enumerate() {
                    let v = c.stats().verified;
                    if v != last[i].0 {
                        worst[i] = worst[i].max(last[i].1.elapsed());
                        last[i] = (v, Instant::now());
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            worst
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let out = d.cli(&["upgrade", "--exe", env!("CARGO_BIN_EXE_wdvirt"), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(up["instances"], 16, "{up}");
    assert_eq!(up["attached"], 16, "{up}");
    progress(&guests, 20, "after the upgrade");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst = sampler.join().unwrap();
    // The same process, a new program: every instance taken over.
    let list = d.json(&["list"]);
    for v in list.as_array().unwrap() {
        assert_eq!(v["state"], "attached", "{v}");
        assert!(v["report"]["adopted"].is_object(), "{v}");
    }
    let pid = d.child.as_ref().unwrap().id();
    assert_eq!(up["pid"], pid, "the daemon's pid stays");
    let summaries: Vec<LoadSummary> = guests.into_iter().map(Guest::finish).collect();
    for (n, s) in names.iter().zip(&summaries) {
        assert_eq!(instance_jobs(&d, n), (s.stats.jobs, 0), "{n}'s counters");
    }
    eprintln!(
        "upgrade: API back after {} ms; longest pause a guest saw {:?} (median of the 16 {:?})",
        up["api_back_ms"],
        worst.iter().max().unwrap(),
        {
            let mut w = worst.clone();
            w.sort();
            w[w.len() / 2]
        }
    );
}

/// What cannot be taken over is said and harms no other instance: a VMM
/// that left while the daemon was down, a state memfd that fails its
/// checks, and the fd holder itself gone.
#[test]
fn what_cannot_be_taken_over_is_reported_and_harms_no_other_instance() {
    use wdvirt::restart::holder::HolderClient;
    let mut d = Daemon::builder(HOST).capture_stderr().start();
    let names = ["keep", "left", "torn"];
    for n in names {
        d.json(&["define", "--type", "one", "--name", n]);
        d.json(&["start", n]);
    }
    // "left" has a VMM that maps its memory and enables the device, and
    // runs no jobs: it goes away while no daemon runs.
    let left = LoopbackVmm::connect_migratable(
        &d.socket("left"),
        GuestRam::new(RAM_BASE, 4 << 20).unwrap(),
    )
    .unwrap();
    let mut guests: Vec<Guest> = ["keep", "torn"]
        .iter()
        .map(|n| Guest::boot_with(&d.socket(n), 1, 4 << 20))
        .collect();
    progress(&guests, 20, "before the kill");
    let uuid = |n: &str| -> String {
        let v = d.json(&["list"]);
        let i = v
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap();
        i["uuid"].as_str().unwrap().to_string()
    };
    let torn_uuid = uuid("torn");
    d.kill9();
    let torn = guests.pop().unwrap();
    drop(left);
    // "torn"'s state memfd loses its header.
    {
        let mut h = HolderClient::connect(&d.holder()).unwrap();
        let fds = h.take(&format!("inst/{torn_uuid}/state")).unwrap();
        let map = wdvirt::vdev::wd::journal::SharedMap::map(&fds[0].1).unwrap();
        map.zero(0, 4096);
    }
    d.spawn();
    progress(&guests, 20, "the untouched instance after the restart");
    let list = d.json(&["list"]);
    let by = |n: &str| -> Value {
        (list.as_array().unwrap().iter())
            .find(|v| v["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by("keep")["state"], "attached");
    assert!(by("keep")["report"]["adopted"].is_object());
    // The one whose VMM left is started, free for its next VMM.
    assert_eq!(by("left")["state"], "started", "{}", by("left"));
    guests.push(Guest::boot_with(&d.socket("left"), 1, 4 << 20));
    progress(&guests, 10, "a new VMM on the instance whose VMM left");
    // The torn one is started afresh; its VMM lost the device (EOF).
    assert!(by("torn")["report"]["adopted"].is_null(), "{}", by("torn"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while torn.load.as_ref().unwrap().is_running() {
        assert!(
            Instant::now() < deadline,
            "the torn instance's VMM never noticed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(torn);
    // The holder dies under a running daemon: the VMs run on, and the
    // daemon says a new VMM's device would not survive a restart.
    let info = HolderClient::connect(&d.holder()).unwrap().hello().unwrap();
    let pid = rustix::process::Pid::from_raw(info.pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    guests.push(Guest::boot_with(&d.socket("torn"), 1, 4 << 20));
    progress(&guests, 10, "with the holder gone");
    let (status, err) = d.term();
    assert!(status.success());
    assert!(
        err.contains("cannot be taken over") && err.contains("no wdvirt header"),
        "the torn state is named: {err}"
    );
    assert!(
        err.contains("will not survive a restart of the daemon"),
        "the holder's death is said: {err}"
    );
}

/// An upgrade the daemon cannot carry out is refused before anything
/// changes, with the reason: a program that is not wdvirt, one that does
/// not run, and a daemon without the fd holder. The daemon serves on.
#[test]
fn an_upgrade_the_daemon_cannot_carry_out_is_refused_and_it_serves_on() {
    let d = Daemon::start(HOST);
    d.json(&["define", "--type", "one", "--name", "a"]);
    d.json(&["start", "a"]);
    let e = d.refused(&["upgrade", "--exe", "/bin/true"]);
    assert!(e.contains("is not a wdvirt program"), "{e}");
    let e = d.refused(&["upgrade", "--exe", "/nonexistent/wdvirt"]);
    assert!(e.contains("does not run"), "{e}");
    // Still the same daemon, still changing things.
    d.json(&["define", "--type", "one", "--name", "b"]);
    assert_eq!(d.json(&["list"]).as_array().unwrap().len(), 1);
    let bare = Daemon::builder(HOST).arg("--no-holder").start();
    let e = bare.refused(&["upgrade"]);
    assert!(e.contains("--no-holder"), "{e}");
}
