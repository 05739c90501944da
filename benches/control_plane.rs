//! The control plane's costs, measured on a real daemon process through its
//! API (the same HTTP the CLI speaks, without a process spawn per call):
//!
//! * define + start + stop of N instances (default 1000), and each phase;
//! * the daemon's memory per idle started instance (RSS and threads before
//!   and after starting N);
//! * CPU time and context switches (wake-ups) of the whole daemon while N
//!   instances sit idle.
//!
//! Run: `cargo bench --bench control_plane` (`WDVIRT_BENCH_N`, `WDVIRT_IDLE_SECS`).
//! Figures and the command are recorded in docs/performance.md.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use wdvirt::cli::client::ApiClient;
use wdvirt::daemon::action::DefineRequest;
use wdvirt::daemon::view::InstanceView;

const HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 2
    queue_pairs: 4096
    operations: [all]
    pasids: 4096
qos_policies:
  - name: silver
    weight: 100
types:
  - name: one
    queues: 1
    operations: [all]
    qos: silver
"#;

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/{file}"))
}

/// utime + stime of the whole process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Context switches of each thread, by thread id: each one is a wake-up or
/// a preemption.
fn switches(pid: u32) -> std::collections::BTreeMap<u64, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_string_lossy().parse().ok()?;
            let s = std::fs::read_to_string(t.path().join("status")).ok()?;
            let n = s
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
            Some((tid, n))
        })
        .collect()
}

/// Switches between two samples: threads alive at both count their
/// difference, threads born in between count all of theirs (threads that
/// exited in between, e.g. an idle tokio blocking thread, are not counted:
/// their last switches were their exit).
fn switches_between(
    before: &std::collections::BTreeMap<u64, u64>,
    after: &std::collections::BTreeMap<u64, u64>,
) -> (u64, usize) {
    let n = after
        .iter()
        .map(|(tid, &a)| a - before.get(tid).copied().unwrap_or(0).min(a))
        .sum();
    let exited = before.keys().filter(|t| !after.contains_key(t)).count();
    (n, exited)
}

/// The run directory: on tmpfs, as `/run/wdvirt` is on a real host (an
/// ext4 directory makes each socket's inode allocation the largest cost of
/// a start, measured with `perf`).
fn run_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wdvirt-bench-run-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

fn spawn_daemon(dir: &Path, run: &Path) -> Child {
    std::fs::write(dir.join("host.yaml"), HOST).unwrap();
    let api = dir.join("api.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .arg("daemon")
        .arg("--config")
        .arg(dir.join("host.yaml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--run-dir")
        .arg(run)
        .arg("--api")
        .arg(&api)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&api).is_err() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn main() {
    let n: usize = std::env::var("WDVIRT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let idle_secs: u64 = std::env::var("WDVIRT_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let run = run_dir();
    let mut child = spawn_daemon(dir.path(), run.path());
    let pid = child.id();
    let api = ApiClient::new(&dir.path().join("api.sock"));
    let post = |path: &str| -> InstanceView { api.send(Method::POST, path, None::<&()>).unwrap() };

    let rss0 = proc_field(pid, "status", "VmRSS:");
    let threads0 = proc_field(pid, "status", "Threads:");
    let t = Instant::now();
    for i in 0..n {
        let req = DefineRequest {
            type_name: "one".into(),
            name: Some(format!("i{i}")),
            uuid: None,
            auto: false,
            numa: None,
            qos: None,
            vm: None,
            owner: None,
        };
        let _: InstanceView = api.send(Method::POST, "/v1/instances", Some(&req)).unwrap();
    }
    let define = t.elapsed();
    let t = Instant::now();
    for i in 0..n {
        post(&format!("/v1/instances/i{i}/start"));
    }
    let start = t.elapsed();
    // The API's own round trip: a read that changes nothing.
    let t = Instant::now();
    for i in 0..n {
        let _: InstanceView = api.get(&format!("/v1/instances/i{i}")).unwrap();
    }
    let get = t.elapsed();
    let rss1 = proc_field(pid, "status", "VmRSS:");
    let threads1 = proc_field(pid, "status", "Threads:");

    // Idle: nothing calls, no VMM connects.
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, sw0) = (cpu_ticks(pid), switches(pid));
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (cpu1, sw1) = (cpu_ticks(pid), switches(pid));
    let (woke, exited) = switches_between(&sw0, &sw1);

    let t = Instant::now();
    for i in 0..n {
        post(&format!("/v1/instances/i{i}/stop"));
    }
    let stop = t.elapsed();
    let total = define + start + stop;

    println!(
        "control plane, {n} instances of 1 queue on the soft accelerator (one API call each, sequential)"
    );
    println!(
        "  define {:>8.1} ms  ({:.0} µs each; each an fsync'd file)",
        define.as_secs_f64() * 1e3,
        define.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "  start  {:>8.1} ms  ({:.0} µs each)",
        start.as_secs_f64() * 1e3,
        start.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "  stop   {:>8.1} ms  ({:.0} µs each)",
        stop.as_secs_f64() * 1e3,
        stop.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "  get    {:>8.1} ms  ({:.0} µs each; the API round trip alone)",
        get.as_secs_f64() * 1e3,
        get.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "  define+start+stop {:.2} s (target < 2 s)",
        total.as_secs_f64()
    );
    println!(
        "  memory per idle started instance: {:.1} KiB RSS (target < 256 KiB); threads {} -> {}",
        (rss1.saturating_sub(rss0)) as f64 / n as f64,
        threads0,
        threads1
    );
    println!(
        "  idle {idle_secs} s with {n} started: {} CPU ticks, {woke} context switches in the daemon's threads (target 0 wake-ups; {exited} idle pool threads exited)",
        cpu1 - cpu0,
    );
    let _ = child.kill();
    let _ = child.wait();
}
