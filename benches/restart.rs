//! What a restart of the daemon costs the VMs: the release-built `wdvirt
//! daemon` (its fd holder keeping every instance's sockets and memory)
//! with 1, 16 and 256 instances of a one-queue type (depth 64), each with
//! a guest in this process (the library's verified load, `wdvirt::vmm::load`,
//! one queue of depth 32 over 2 MiB of memfd RAM, on the instance's real
//! socket through `LoopbackVmm::connect_migratable`).
//!
//! * **Recovery after SIGKILL**: the daemon is SIGKILLed and started again
//!   with the same arguments. Measured from the new process's spawn: when
//!   its API socket is bound, when its API answers a request (`GET
//!   /v1/types`; every instance is taken over before the API serves), and,
//!   for each instance, when its guest verifies its next job. 5 kills per
//!   size (3 from 256 up). How long a `list` (`GET /v1/instances`, what
//!   `wdvirt upgrade` polls) then takes is printed beside.
//! * **Upgrade pause**: `wdvirt upgrade --exe <the same binary> --json`;
//!   each guest's verified count is sampled every 200 µs, and its pause is
//!   the longest time without a verified completion that overlaps the
//!   command's run (from its start until it has seen the new program's API
//!   answer). The command's own `api_back_ms` is reported beside. 3
//!   upgrades per size. For comparison, the same sampling over 200 ms
//!   without any restart gives each guest's ordinary longest gap.
//!
//! Every guest finishes with every job it submitted completed exactly once
//! with the right result, and the daemon's counters equal the guests'.
//!
//! ```text
//! cargo bench --bench restart
//! WDVIRT_BENCH_SIZES=1,16 cargo bench --bench restart       # only these sizes
//! WDVIRT_BENCH_SIZES=256/8 cargo bench --bench restart      # guests' ring depth 8
//! WDVIRT_BENCH_KILLS=2 WDVIRT_BENCH_UPGRADES=1 ...          # fewer restarts
//! WDVIRT_BENCH_PIN=1 ...                 # daemon and fd holder on CPU 0, guests on CPU 1
//! WDVIRT_BENCH_LOGS=/tmp/logs ...        # keep the daemons' info logs, print each start's phases
//! ```
//!
//! `docs/performance.md` ("Restart and upgrade") records a run.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use wdvirt::cli::client::ApiClient;
use wdvirt::daemon::action::Action;
use wdvirt::restart::holder::HolderClient;
use wdvirt::vmm::load::{Load, LoadCounters, LoadOptions, LoadSummary};
use wdvirt::vmm::migrate::Vm;
use wdvirt::vmm::{GuestRam, LoopbackVmm};

/// The wdvirt binary Cargo built (release, for `cargo bench`).
const EXE: &str = env!("CARGO_BIN_EXE_wdvirt");
const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 2 << 20;
const GUEST_DEPTH: u32 = 32;
/// The issue's targets.
const SERVING_TARGET: Duration = Duration::from_millis(100);
const PAUSE_TARGET: Duration = Duration::from_millis(50);
/// How often a guest's counter is read.
const SAMPLE: Duration = Duration::from_micros(200);
/// The window the ordinary longest gap is taken over.
const NORMAL_WINDOW: Duration = Duration::from_millis(200);

/// As `tests/restart.rs`: one software engine (two cores here), a QoS cap
/// so that the scheduler holds jobs back, and room for 256 one-queue
/// instances.
const HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 1
    queue_pairs: 512
    operations: [all]
    pasids: 512
qos_policies:
  - name: capped
    weight: 100
    max_in_flight: 16
types:
  - name: one
    queues: 1
    operations: [all]
    max_depth: 64
    qos: capped
"#;

/// A `wdvirt daemon` on a temporary directory, driven as an operator does.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Where its stderr goes (`--log info`), if the logs are kept.
    log: Option<PathBuf>,
}

/// When a started daemon answered, from its spawn.
struct Answered {
    /// The API socket accepted a connection (bound; not serving yet).
    bound: Duration,
    /// `GET /v1/types` answered: the daemon serves.
    answered: Duration,
    /// How long the `list` right after took.
    list: Duration,
    /// The daemon's main thread (the one that takes instances over) until
    /// then: on a CPU, and runnable but waiting for one.
    main: Sched,
}

/// A thread's `/proc/.../schedstat`: time on a CPU, time runnable and
/// waiting for one.
#[derive(Clone, Copy, Default)]
struct Sched {
    cpu: Duration,
    waiting: Duration,
}

impl Sched {
    fn of(pid: u32) -> Sched {
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat"))
            .unwrap_or_default();
        let mut f = text
            .split_whitespace()
            .map(|v| Duration::from_nanos(v.parse().unwrap_or(0)));
        Sched {
            cpu: f.next().unwrap_or_default(),
            waiting: f.next().unwrap_or_default(),
        }
    }
    fn since(self, before: Sched) -> Sched {
        Sched {
            cpu: self.cpu.saturating_sub(before.cpu),
            waiting: self.waiting.saturating_sub(before.waiting),
        }
    }
}

impl Daemon {
    fn start(log: Option<PathBuf>) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("host.yaml"), HOST).expect("host.yaml");
        let mut d = Daemon {
            dir,
            child: None,
            log,
        };
        let t0 = d.spawn();
        d.wait_api(t0);
        d
    }

    fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    fn socket(&self, name: &str) -> PathBuf {
        self.run_dir().join(format!("{name}.sock"))
    }

    /// A line in the daemon's log (if kept), stamped as its own lines are.
    fn mark(&self, what: &str) {
        if let Some(path) = &self.log {
            let mut f = File::options()
                .create(true)
                .append(true)
                .open(path)
                .expect("log file");
            writeln!(f, "{} bench: {what}", utc_stamp()).unwrap();
        }
    }

    /// Starts the daemon process (the same arguments every time) and
    /// returns the instant just before the spawn.
    fn spawn(&mut self) -> Instant {
        assert!(self.child.is_none(), "a daemon runs already");
        let mut cmd = Command::new(EXE);
        cmd.arg("daemon")
            .arg("--config")
            .arg(self.dir.path().join("host.yaml"))
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--api")
            .arg(self.api())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match &self.log {
            Some(path) => {
                self.mark("spawn");
                let f = File::options().append(true).open(path).expect("log file");
                cmd.arg("--log").arg("info").stderr(f);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        // The daemon (and the fd holder it starts) runs where it is pinned,
        // the guests where this process is: a child inherits the affinity
        // of the thread that forks it.
        if let Some(p) = pin() {
            pin_to(p.daemon)
        }
        let t0 = Instant::now();
        let child = cmd.spawn();
        if let Some(p) = pin() {
            pin_to(p.guests)
        }
        self.child = Some(child.expect("spawn wdvirt daemon"));
        t0
    }

    /// Waits until the API answers, from `t0`. A connection made while the
    /// new daemon is still taking instances over waits in the listener's
    /// backlog, so the answer comes the moment it serves.
    fn wait_api(&mut self, t0: Instant) -> Answered {
        let api = ApiClient::new(&self.api());
        let deadline = t0 + Duration::from_secs(60);
        let mut bound = None;
        loop {
            if bound.is_none() && std::os::unix::net::UnixStream::connect(self.api()).is_ok() {
                bound = Some(t0.elapsed());
            }
            if let Some(bound) = bound
                && api.get::<Value>("/v1/types").is_ok()
            {
                let answered = t0.elapsed();
                let main = Sched::of(self.child.as_ref().unwrap().id());
                let t = Instant::now();
                api.act::<Value>(&Action::ListInstances { defined: false })
                    .expect("list");
                return Answered {
                    bound,
                    answered,
                    list: t.elapsed(),
                    main,
                };
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({status}) before answering");
            }
            assert!(Instant::now() < deadline, "the daemon never answered");
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(EXE)
            .arg("--api")
            .arg(self.api())
            .args(args)
            .output()
            .expect("run wdvirt")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "wdvirt {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    /// Ends the fd holder (and checks that its process is gone).
    fn quit_holder(&self) {
        let path = self.run_dir().join("holder.sock");
        let Ok(mut c) = HolderClient::connect(&path) else {
            return;
        };
        let pid = c.hello().ok().map(|i| i.pid);
        let _ = c.quit();
        if let Some(pid) = pid {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            let deadline = Instant::now() + Duration::from_secs(5);
            while proc.exists() && !zombie(&proc) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if proc.exists() && !zombie(&proc) {
                eprintln!("the fd holder (pid {pid}) is still running after quit");
            }
        }
    }

    /// The phases of the daemon's last start, from its log (if kept).
    fn phases(&self, n: usize) -> Option<Phases> {
        let text = std::fs::read_to_string(self.log.as_ref()?).ok()?;
        Phases::of_last_start(&text, n)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        self.quit_holder();
    }
}

fn zombie(proc: &Path) -> bool {
    std::fs::read_to_string(proc.join("stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// `WDVIRT_BENCH_PIN=1`: the daemon and its fd holder on CPU 0, the guests
/// (this process, and the CLI commands it runs) on CPU 1.
#[derive(Clone, Copy)]
struct Pin {
    daemon: usize,
    guests: usize,
}

fn pin() -> Option<Pin> {
    static PIN: std::sync::OnceLock<Option<Pin>> = std::sync::OnceLock::new();
    *PIN.get_or_init(|| {
        std::env::var("WDVIRT_BENCH_PIN")
            .is_ok_and(|v| v == "1")
            .then_some(Pin {
                daemon: 0,
                guests: 1,
            })
    })
}

/// Pins the calling thread (and what it forks from now on) to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (the machine's CPUs are 0 and 1).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a cpu_set_t of the size given.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

/// Now as the daemon's log stamps its lines (UTC, microseconds); only the
/// time of day is compared.
fn utc_stamp() -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let day = t.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}Z",
        day / 3600,
        day / 60 % 60,
        day % 60,
        t.subsec_micros()
    )
}

/// Seconds since midnight (UTC) of a log line's stamp: `...THH:MM:SS.ffffffZ`
/// at the line's start (colours stripped), or the bench's own `HH:MM:SS.ffffffZ`.
fn stamp_of(line: &str) -> Option<f64> {
    let clean: String = {
        let mut out = String::new();
        let mut esc = false;
        for c in line.chars() {
            match (esc, c) {
                (false, '\x1b') => esc = true,
                (true, 'm') => esc = false,
                (true, _) => {}
                (false, c) => out.push(c),
            }
        }
        out
    };
    let head = clean.split_whitespace().next()?;
    let time = head.rsplit('T').next()?.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Where a daemon's start went, from its log: each figure from the spawn
/// (after a kill) or the exec (an upgrade).
struct Phases {
    /// Its first line (the fd limit raised): the process runs `main`.
    first_line: Duration,
    /// The fd holder answered: the catalog, the registry and the API
    /// socket are done.
    holder: Duration,
    /// Its first and last instance taken over.
    first_takeover: Duration,
    last_takeover: Duration,
    /// Between two instances taken over (median).
    per_instance: Duration,
    /// The device rebuild each one logged (median).
    rebuilt: Duration,
    /// An upgrade: from the bench's `wdvirt upgrade` to the exec.
    exec_after_request: Option<Duration>,
}

impl Phases {
    fn of_last_start(text: &str, n: usize) -> Option<Phases> {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .rposition(|l| l.contains("bench: spawn") || l.contains("upgrade: exec"))?;
        let t0 = stamp_of(lines[start])?;
        let at = |pat: &str| {
            lines[start + 1..]
                .iter()
                .find(|l| l.contains(pat))
                .and_then(|l| stamp_of(l))
        };
        let first_line = at("fd limit")?;
        let holder = at("fd holder already running")?;
        let taken: Vec<(f64, f64)> = lines[start + 1..]
            .iter()
            .filter(|l| l.contains("taken over with its VMM"))
            .filter_map(|l| {
                let rebuilt = l.split("rebuilt in ").nth(1)?.split(')').next()?;
                Some((stamp_of(l)?, parse_debug_duration(rebuilt)?))
            })
            .collect();
        if taken.len() < n || n == 0 {
            return None;
        }
        let d = |s: f64| Duration::from_secs_f64((s - t0).max(0.0));
        let mut steps: Vec<f64> = std::iter::once(holder)
            .chain(taken.iter().map(|t| t.0))
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect();
        steps.sort_by(f64::total_cmp);
        let mut rebuilt: Vec<f64> = taken.iter().map(|t| t.1).collect();
        rebuilt.sort_by(f64::total_cmp);
        let exec_after_request = lines[start]
            .contains("upgrade: exec")
            .then(|| {
                let asked = lines[..start]
                    .iter()
                    .rev()
                    .find(|l| l.contains("bench: upgrade"))?;
                Some(d(2.0 * t0 - stamp_of(asked)?))
            })
            .flatten();
        Some(Phases {
            exec_after_request,
            first_line: d(first_line),
            holder: d(holder),
            first_takeover: d(taken[0].0),
            last_takeover: d(taken[taken.len() - 1].0),
            per_instance: Duration::from_secs_f64(steps[steps.len() / 2]),
            rebuilt: Duration::from_secs_f64(rebuilt[rebuilt.len() / 2]),
        })
    }

    fn line(&self) -> String {
        format!(
            "{}main {:.1} ms, holder answered {:.1} ms, first taken over {:.1} ms, last {:.1} ms ({:.2} ms each, rebuild {:.3} ms)",
            self.exec_after_request
                .map(|d| format!("(exec {:.1} ms after the command started) ", ms(d)))
                .unwrap_or_default(),
            ms(self.first_line),
            ms(self.holder),
            ms(self.first_takeover),
            ms(self.last_takeover),
            ms(self.per_instance),
            ms(self.rebuilt)
        )
    }
}

/// Seconds in a `Duration`'s `Debug` form (`169.305µs`, `1.5ms`, `2s`).
fn parse_debug_duration(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "ns" => v * 1e-9,
        "µs" => v * 1e-6,
        "ms" => v * 1e-3,
        "s" => v,
        _ => return None,
    })
}

/// A VM with the verified load on one queue.
struct Guest {
    load: Option<Load>,
    _vm: Arc<Vm>,
    /// Its instance, and the daemon's API (to say what the daemon saw of
    /// a guest that failed).
    name: String,
    api: PathBuf,
}

impl Guest {
    fn boot(d: &Daemon, name: &str, depth: u32) -> Guest {
        let ram = GuestRam::new(RAM_BASE, RAM_SIZE).expect("guest RAM");
        let vm = Vm::new(LoopbackVmm::connect_migratable(&d.socket(name), ram).expect("connect"));
        let load = Load::start(&vm, LoadOptions { queues: 1, depth }).expect("load");
        Guest {
            load: Some(load),
            _vm: vm,
            name: name.to_string(),
            api: d.api(),
        }
    }

    fn verified(&self) -> u64 {
        let load = self.load.as_ref().unwrap();
        let s = load.stats();
        if !load.is_running() || s.failed != 0 || s.repeated != 0 {
            self.failed(&format!("{s:?}: {:?}", load.failure()));
        }
        s.verified
    }

    /// What the daemon says of this guest's instance: its queue's counters
    /// and device latency, its place in the QoS scheduler.
    fn seen_by_daemon(&self) -> String {
        let api = ApiClient::new(&self.api);
        api.act::<Value>(&Action::Stats {
            vm: None,
            instance: Some(self.name.clone()),
        })
        .map(|mut v| {
            strip(&mut v, &["buckets", "interference", "device"]);
            v.to_string()
        })
        .unwrap_or_else(|e| format!("(the API: {e})"))
    }

    /// Panics with what the daemon says of this guest's instance.
    fn failed(&self, why: &str) -> ! {
        panic!(
            "the guest of {} failed: {why}\nthe daemon's view of it: {}",
            self.name,
            self.seen_by_daemon()
        )
    }

    fn counters(&self) -> LoadCounters {
        self.load.as_ref().unwrap().counters()
    }

    fn finish(mut self) -> LoadSummary {
        let s = self.load.take().unwrap().finish();
        assert_eq!(s.failure, None, "the guest of {}", self.name);
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

/// The guests of one size. Dropped (a size that failed), they stop all at
/// once: one after the other, each would drain while the rest keep the
/// engine busy.
struct Guests(Vec<Guest>);

impl std::ops::Deref for Guests {
    type Target = [Guest];
    fn deref(&self) -> &[Guest] {
        &self.0
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        let all = std::mem::take(&mut self.0);
        std::thread::scope(|s| {
            for g in all {
                s.spawn(move || drop(g));
            }
        });
    }
}

/// `v` without the (long) fields named.
fn strip(v: &mut Value, keys: &[&str]) {
    match v {
        Value::Object(m) => {
            for k in keys {
                m.remove(*k);
            }
            m.values_mut().for_each(|v| strip(v, keys));
        }
        Value::Array(a) => a.iter_mut().for_each(|v| strip(v, keys)),
        _ => {}
    }
}

/// Waits until every guest has verified `more` further jobs.
fn progress(guests: &[Guest], more: u64, what: &str) {
    let want: Vec<u64> = guests.iter().map(|g| g.verified() + more).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    // A guest without a verified job for 5 s is described while its jobs
    // are still stuck (the load gives up at 10 s and resets its queue).
    let mut last: Vec<(u64, Instant, bool)> = guests
        .iter()
        .map(|g| (g.verified(), Instant::now(), false))
        .collect();
    while let Some(g) = guests.iter().zip(&want).find(|(g, w)| g.verified() < **w) {
        if Instant::now() > deadline {
            g.0.failed(&format!("{what}: no progress for 60 s"));
        }
        for (g, l) in guests.iter().zip(&mut last) {
            let v = g.verified();
            if v != l.0 {
                *l = (v, Instant::now(), false);
            } else if !l.2 && l.1.elapsed() > Duration::from_secs(5) {
                l.2 = true;
                eprintln!(
                    "{what}: the guest of {} has verified nothing for 5 s ({:?}); the daemon says {}",
                    g.name,
                    g.load.as_ref().unwrap().stats(),
                    g.seen_by_daemon()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Each guest's verified count once none moves any more (after a kill: the
/// guests have read every completion the dead daemon wrote).
fn settled(guests: &[Guest]) -> Vec<u64> {
    let mut last: Vec<u64> = guests.iter().map(Guest::verified).collect();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now: Vec<u64> = guests.iter().map(Guest::verified).collect();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// One SIGKILL and start: when the new daemon answered, and each guest's
/// first verified job, from its spawn.
fn kill_and_restart(d: &mut Daemon, guests: &[Guest]) -> (Answered, Vec<Duration>) {
    d.kill9();
    let base = settled(guests);
    let counters: Vec<LoadCounters> = guests.iter().map(Guest::counters).collect();
    let t0 = d.spawn();
    // The guests are watched from here while the API is polled beside.
    let watcher = std::thread::spawn(move || {
        let mut first = vec![None; counters.len()];
        let mut left = counters.len();
        let deadline = t0 + Duration::from_secs(60);
        while left > 0 {
            for (i, c) in counters.iter().enumerate() {
                if first[i].is_none() && c.stats().verified > base[i] {
                    first[i] = Some(t0.elapsed());
                    left -= 1;
                }
            }
            if Instant::now() > deadline {
                return Err(left);
            }
            std::thread::sleep(SAMPLE);
        }
        Ok(first.into_iter().map(Option::unwrap).collect::<Vec<_>>())
    });
    let answered = d.wait_api(t0);
    match watcher.join().expect("watcher") {
        Ok(first) => (answered, first),
        Err(left) => {
            // A guest whose load gave up says why.
            guests.iter().for_each(|g| {
                g.verified();
            });
            panic!("{left} guests verified nothing for 60 s after the restart")
        }
    }
}

/// Every guest's gaps between verified completions, as (start, end).
type Gaps = Vec<Vec<(Instant, Instant)>>;

/// Samples each guest's counter every [`SAMPLE`] from 100 ms before
/// `during` runs until every guest has verified `after` more jobs; every
/// gap between two changes of a guest's count.
fn sample_gaps<T>(guests: &[Guest], after: u64, during: impl FnOnce() -> T) -> (T, Gaps) {
    let counters: Vec<LoadCounters> = guests.iter().map(Guest::counters).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut last: Vec<(u64, Instant)> = counters
                .iter()
                .map(|c| (c.stats().verified, Instant::now()))
                .collect();
            let mut gaps: Gaps = vec![Vec::new(); counters.len()];
            while !stop.load(Ordering::Relaxed) {
                for (i, c) in counters.iter().enumerate() {
                    let v = c.stats().verified;
                    if v != last[i].0 {
                        let now = Instant::now();
                        gaps[i].push((last[i].1, now));
                        last[i] = (v, now);
                    }
                }
                std::thread::sleep(SAMPLE);
            }
            gaps
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let out = during();
    progress(guests, after, "after the sampled window");
    stop.store(true, Ordering::Relaxed);
    (out, sampler.join().expect("sampler"))
}

/// Each guest's longest gap that overlaps `[from, to]`.
fn longest_overlapping(gaps: &Gaps, from: Instant, to: Instant) -> Vec<Duration> {
    gaps.iter()
        .map(|g| {
            g.iter()
                .filter(|(s, e)| *e >= from && *s <= to)
                .map(|(s, e)| *e - *s)
                .max()
                .unwrap_or_default()
        })
        .collect()
}

/// `wdvirt upgrade`: (its `api_back_ms`, when it started and ended).
fn upgrade(d: &Daemon, n: usize) -> (f64, Instant, Instant) {
    d.mark("upgrade");
    let started = Instant::now();
    let out = d.cli(&["upgrade", "--exe", EXE, "--json"]);
    let ended = Instant::now();
    assert!(
        out.status.success(),
        "wdvirt upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up: Value = serde_json::from_slice(&out.stdout).expect("upgrade JSON");
    assert_eq!(up["instances"], n, "{up}");
    assert_eq!(up["attached"], n, "{up}");
    assert_eq!(
        up["pid"],
        d.child.as_ref().unwrap().id(),
        "the daemon's pid stays"
    );
    let back = up["api_back_ms"].as_f64().expect("api_back_ms");
    (back, started, ended)
}

/// Each instance's (jobs_ok, jobs_failed), as the daemon counts them.
fn jobs_by_instance(d: &Daemon) -> std::collections::HashMap<String, (u64, u64)> {
    let list = d.json(&["list"]);
    let mut out = std::collections::HashMap::new();
    for v in list.as_array().expect("list") {
        let queues = v["report"]["queues"].as_array().expect("queue counters");
        let sum = |f: &str| queues.iter().map(|q| q[f].as_u64().unwrap()).sum::<u64>();
        out.insert(
            v["name"].as_str().unwrap().to_string(),
            (sum("jobs_ok"), sum("jobs_failed")),
        );
    }
    out
}

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}
fn median(v: &[Duration]) -> Duration {
    v[v.len() / 2]
}
fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
fn med_max(v: &[Duration]) -> String {
    let v = sorted(v.to_vec());
    format!("{:.1} / {:.1}", ms(median(&v)), ms(max(&v)))
}

struct Row {
    n: usize,
    depth: u32,
    kills: usize,
    bound: Vec<Duration>,
    api_back: Vec<Duration>,
    list: Vec<Duration>,
    first: Vec<Duration>,
    start_main: Vec<Sched>,
    upgrades: usize,
    up_main: Vec<Sched>,
    up_cmd: Vec<Duration>,
    up_api: Vec<Duration>,
    pause: Vec<Duration>,
    normal: Vec<Duration>,
    jobs: u64,
}

fn measure(n: usize, depth: u32, kills: usize, upgrades: usize) -> Row {
    let log = std::env::var_os("WDVIRT_BENCH_LOGS").map(|dir| {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("log dir");
        dir.join(format!("daemon-{n}-{depth}.log"))
    });
    let t = Instant::now();
    let mut d = Daemon::start(log);
    let names: Vec<String> = (0..n).map(|i| format!("i{i}")).collect();
    for name in &names {
        d.json(&["define", "--type", "one", "--name", name]);
        d.json(&["start", name]);
    }
    let mut guests = Guests(
        names
            .iter()
            .map(|name| Guest::boot(&d, name, depth))
            .collect(),
    );
    progress(&guests, 20, "before the first kill");
    eprintln!("{n} instances: set up in {:.1?}", t.elapsed());

    // The ordinary longest gap, without any restart.
    let (window, gaps) = sample_gaps(&guests, 20, || {
        let from = Instant::now();
        std::thread::sleep(NORMAL_WINDOW);
        (from, Instant::now())
    });
    let normal = longest_overlapping(&gaps, window.0, window.1);

    let (mut bound, mut api_back, mut list, mut first, mut start_main) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(100));
        let (a, f) = kill_and_restart(&mut d, &guests);
        eprintln!(
            "{n} instances, kill {k}: API socket bound {:.1} ms, API answered {:.1} ms (its main thread {:.1} ms on a CPU, {:.1} ms waiting for one; a list then took {:.1} ms), first completions {:.1}..{:.1} ms",
            ms(a.bound),
            ms(a.answered),
            ms(a.main.cpu),
            ms(a.main.waiting),
            ms(a.list),
            ms(*f.iter().min().unwrap()),
            ms(max(&f)),
        );
        if let Some(p) = d.phases(n) {
            eprintln!("    from the spawn: {}", p.line());
        }
        start_main.push(a.main);
        bound.push(a.bound);
        api_back.push(a.answered);
        list.push(a.list);
        first.extend(f);
        progress(&guests, 20, &format!("after kill {k}"));
    }

    let (mut up_api, mut pause, mut up_main, mut up_cmd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for u in 0..upgrades {
        std::thread::sleep(Duration::from_millis(100));
        let pid = d.child.as_ref().unwrap().id();
        let before = Sched::of(pid);
        let ((back, from, to), gaps) = sample_gaps(&guests, 20, || {
            let r = upgrade(&d, n);
            up_main.push(Sched::of(pid).since(before));
            r
        });
        let worst = longest_overlapping(&gaps, from, to);
        let main = up_main.last().unwrap();
        eprintln!(
            "{n} instances, upgrade {u}: API back {back:.1} ms (the command ran {:.1} ms; the daemon's main thread {:.1} ms on a CPU, {:.1} ms waiting for one), longest pause {:.1} ms",
            ms(to - from),
            ms(main.cpu),
            ms(main.waiting),
            ms(max(&worst))
        );
        // The longest pause: when it began and ended, from the command's start.
        let (who, _) = (worst.iter().enumerate()).max_by_key(|(_, d)| **d).unwrap();
        if let Some((s, e)) = (gaps[who].iter())
            .filter(|(s, e)| *e >= from && *s <= to)
            .max_by_key(|(s, e)| *e - *s)
        {
            let rel = |t: Instant| {
                if t >= from {
                    ms(t - from)
                } else {
                    -ms(from - t)
                }
            };
            eprintln!(
                "    the longest: {}'s, from {:+.1} to {:+.1} ms of the command's start",
                guests[who].name,
                rel(*s),
                rel(*e)
            );
        }
        if let Some(p) = d.phases(n) {
            eprintln!("    from the exec: {}", p.line());
        }
        up_api.push(Duration::from_secs_f64(back / 1e3));
        up_cmd.push(to - from);
        pause.extend(worst);
    }

    // Each instance was taken over with its VMM by the last daemon.
    for v in d.json(&["list"]).as_array().expect("list") {
        assert_eq!(v["state"], "attached", "{v}");
        assert!(v["report"]["adopted"].is_object(), "{v}");
    }
    // All stop at once: one after the other, each would drain while the
    // others keep the engine busy.
    let summaries: Vec<LoadSummary> = std::thread::scope(|s| {
        let finishing: Vec<_> = std::mem::take(&mut guests.0)
            .into_iter()
            .map(|g| s.spawn(move || g.finish()))
            .collect();
        finishing
            .into_iter()
            .map(|h| h.join().expect("a guest failed"))
            .collect()
    });
    // The daemon's counters went on across every restart: they are the
    // jobs the guests counted.
    let counted = jobs_by_instance(&d);
    let mut jobs = 0;
    for (name, s) in names.iter().zip(&summaries) {
        assert_eq!(
            counted[name],
            (s.stats.jobs, 0),
            "instance {name}'s counters against its guest's"
        );
        jobs += s.stats.jobs;
    }
    drop(d);
    Row {
        n,
        depth,
        kills,
        bound,
        api_back,
        list,
        first,
        start_main,
        upgrades,
        up_main,
        up_cmd,
        up_api,
        pause,
        normal,
        jobs,
    }
}

fn env_count(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")))
}

fn main() {
    // Each guest's VMM holds its socket, RAM memfd and eventfds here.
    let (soft, _) = wdvirt::transport::rlimit::raise_fd_limit().expect("RLIMIT_NOFILE");
    if let Some(p) = pin() {
        pin_to(p.guests);
    }
    // `N` or `N/DEPTH` (the guests' ring depth).
    let sizes: Vec<(usize, u32)> = std::env::var("WDVIRT_BENCH_SIZES")
        .unwrap_or_else(|_| "1,16,256".into())
        .split(',')
        .map(|s| {
            let bad = || format!("WDVIRT_BENCH_SIZES: N or N/DEPTH, comma-separated: {s:?}");
            let mut p = s.trim().split('/');
            let n: usize = p
                .next()
                .unwrap_or("")
                .parse()
                .unwrap_or_else(|_| panic!("{}", bad()));
            let depth: u32 = p
                .next()
                .map_or(Ok(GUEST_DEPTH), str::parse)
                .unwrap_or_else(|_| panic!("{}", bad()));
            (n, depth)
        })
        .collect();
    eprintln!("wdvirt: {EXE}; fd limit {soft}");
    let mut rows = Vec::new();
    let mut failed: Vec<(usize, u32, String)> = Vec::new();
    for &(n, depth) in &sizes {
        let kills = env_count("WDVIRT_BENCH_KILLS").unwrap_or(if n >= 256 { 3 } else { 5 });
        let upgrades = env_count("WDVIRT_BENCH_UPGRADES").unwrap_or(3);
        // A size that fails (a guest's job lost, repeated or wrong, or a
        // guest stalled) is reported in the table; the bench then fails.
        match std::panic::catch_unwind(|| measure(n, depth, kills, upgrades)) {
            Ok(row) => rows.push(row),
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| e.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic")
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                failed.push((n, depth, why));
            }
        }
    }
    println!();
    println!(
        "one-queue instances (depth 64), each with a guest: the verified load on 1 queue, {} MiB RAM; one soft engine; {}",
        RAM_SIZE >> 20,
        match pin() {
            Some(p) => format!(
                "daemon and fd holder on CPU {}, guests on CPU {}",
                p.daemon, p.guests
            ),
            None => "not pinned".into(),
        }
    );
    println!(
        "{:>9} | {:>5} | {:>5} | {:>11} | {:>15} | {:>12} | {:>19} | {:>8} | {:>15} | {:>16} | {:>16} | {:>9}",
        "instances",
        "guest",
        "kills",
        "API bound",
        "API back after",
        "list after",
        "first completion",
        "upgrades",
        "upgrade: API",
        "upgrade: longest",
        "no restart:",
        "jobs"
    );
    println!(
        "{:>9} | {:>5} | {:>5} | {:>11} | {:>15} | {:>12} | {:>19} | {:>8} | {:>15} | {:>16} | {:>16} | {:>9}",
        "",
        "depth",
        "",
        "(ms) median",
        "kill (ms) med/max",
        "(ms) median",
        "after kill med/max",
        "",
        "back med/max",
        "pause med/max",
        "longest gap",
        "verified"
    );
    for r in &rows {
        println!(
            "{:>9} | {:>5} | {:>5} | {:>11.1} | {:>15} | {:>12.1} | {:>19} | {:>8} | {:>15} | {:>16} | {:>16} | {:>9}",
            r.n,
            r.depth,
            r.kills,
            ms(median(&sorted(r.bound.clone()))),
            med_max(&r.api_back),
            ms(median(&sorted(r.list.clone()))),
            med_max(&r.first),
            r.upgrades,
            if r.upgrades > 0 {
                med_max(&r.up_api)
            } else {
                "-".into()
            },
            if r.upgrades > 0 {
                med_max(&r.pause)
            } else {
                "-".into()
            },
            med_max(&r.normal),
            r.jobs
        );
    }
    for (n, depth, why) in &failed {
        println!("{n:>9} | {depth:>5} | failed: {why}");
    }
    println!();
    println!(
        "where the start's time went: the daemon's main thread (it takes every instance over, then serves the API), medians"
    );
    for r in &rows {
        let part = |v: &[Sched], f: fn(&Sched) -> Duration| {
            let d: Vec<Duration> = v.iter().map(f).collect();
            if d.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", ms(median(&sorted(d))))
            }
        };
        println!(
            "{:>4} instances: after a kill, API back in {} ms: {} ms on a CPU, {} ms waiting for one; an upgrade: {} ms on a CPU, {} ms waiting (the command ran {} ms)",
            r.n,
            if r.api_back.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", ms(median(&sorted(r.api_back.clone()))))
            },
            part(&r.start_main, |s| s.cpu),
            part(&r.start_main, |s| s.waiting),
            part(&r.up_main, |s| s.cpu),
            part(&r.up_main, |s| s.waiting),
            if r.up_cmd.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", ms(median(&sorted(r.up_cmd.clone()))))
            },
        );
    }
    println!();
    for r in rows.iter().filter(|r| r.kills > 0 && r.upgrades > 0) {
        let serving = max(&r.first);
        let pause = max(&r.pause);
        let verdict = |d: Duration, target: Duration| if d <= target { "met" } else { "missed" };
        println!(
            "{:>4} instances: every instance serving within {:.1} ms of the new daemon's spawn (target {} ms{}: {}); longest upgrade pause {:.1} ms (target {} ms: {})",
            r.n,
            ms(serving),
            SERVING_TARGET.as_millis(),
            if r.n == 16 { "" } else { ", set for 16" },
            verdict(serving, SERVING_TARGET),
            ms(pause),
            PAUSE_TARGET.as_millis(),
            verdict(pause, PAUSE_TARGET),
        );
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
