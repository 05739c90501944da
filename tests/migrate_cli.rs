//! `wdvirt vm` and `wdvirt migrate` as an operator runs them: a VM process
//! (guest RAM, an instance of a real `wdvirt daemon`, the guest driver's
//! verified load on 4 queues) moved over TCP to a `wdvirt vm --incoming`
//! process on another daemon's instance and back, with the progress
//! `wdvirt migrate` shows; the VM's last process sums up the jobs of its
//! whole life. Destinations that refuse or are not there leave the source
//! running.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, wdvirt};
use parking_lot::Mutex;
use serde_json::Value;

/// As tests/migration.rs: one engine, a QoS cap (jobs held back at the
/// stops move as pending), and a second type of another shape.
const HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 1
    queue_pairs: 16
    operations: [all]
    pasids: 4
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
  - name: pair
    queues: 2
    operations: [all]
    max_depth: 256
    qos: capped
"#;

fn host(ty: &str) -> (Daemon, PathBuf) {
    let d = Daemon::start(HOST);
    d.json(&["define", "--type", ty, "--name", "vm"]);
    d.json(&["start", "vm"]);
    let s = d.socket("vm");
    (d, s)
}

/// A `wdvirt vm --json` process, its JSON lines gathered as they come.
struct VmProc {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    control: PathBuf,
}

impl VmProc {
    fn start(control: &Path, args: &[&str]) -> VmProc {
        let mut child = wdvirt()
            .arg("vm")
            .args(args)
            .arg("--control")
            .arg(control)
            .args(["--json", "--status-every", "0.2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (out, l) = (child.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                l.lock().push(v);
            }
        });
        VmProc {
            child,
            lines,
            control: control.to_path_buf(),
        }
    }

    /// The first line of `event`, waited for.
    fn event(&mut self, event: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.lines.lock().iter().find(|v| v["event"] == event) {
                return v.clone();
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                // Its last lines may still be on their way.
                std::thread::sleep(Duration::from_millis(200));
                if let Some(v) = self.lines.lock().iter().find(|v| v["event"] == event) {
                    return v.clone();
                }
                panic!(
                    "wdvirt vm exited ({s}) before '{event}': {:?}",
                    self.lines.lock()
                );
            }
            assert!(Instant::now() < deadline, "no '{event}' line");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The control socket's answer to `status`.
    fn status(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut c = loop {
            match UnixStream::connect(&self.control) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "control socket: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        c.write_all(b"{\"op\":\"status\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// Waits until `more` further jobs have been verified, none failed.
    fn progress(&self, more: u64) {
        let s = self.status();
        let want = s["verified"].as_u64().unwrap() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status();
            assert_eq!(s["event"], "status", "{s}");
            assert_eq!(
                (s["failed"].as_u64(), s["repeated"].as_u64()),
                (Some(0), Some(0)),
                "{s}"
            );
            if s["verified"].as_u64().unwrap() >= want {
                return;
            }
            assert!(Instant::now() < deadline, "the guest made no progress: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: the exit status and the summary line.
    fn term(mut self) -> (std::process::ExitStatus, Value) {
        let status = common::terminate(&mut self.child);
        let v = self.event("summary");
        (status, v)
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "wdvirt vm did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for VmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn migrate(control: &Path, to: &str, json: bool) -> Output {
    let mut c = wdvirt();
    c.arg("migrate").arg("--vm").arg(control).args(["--to", to]);
    if json {
        c.arg("--json");
    }
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_vm_process_under_load_migrates_over_tcp_and_back_every_job_verified_once() {
    let (_a, sa) = host("quad");
    let (_b, sb) = host("quad");
    let dir = tempfile::tempdir().unwrap();
    let ctl = |i: usize| dir.path().join(format!("vm{i}.ctl"));
    let mut vm = VmProc::start(&ctl(0), &["--connect", sa.to_str().unwrap()]);
    vm.progress(40);
    let sockets = [&sa, &sb];
    // `WDVIRT_MIGRATIONS=20 cargo test --test migrate_cli a_vm -- --nocapture`
    // for the recorded run.
    let moves: usize = std::env::var("WDVIRT_MIGRATIONS")
        .ok()
        .map(|v| v.parse().expect("WDVIRT_MIGRATIONS is a number"))
        .unwrap_or(4);
    let mut downtimes = Vec::new();
    for i in 1..=moves {
        let to = sockets[i % 2].to_str().unwrap();
        // Over TCP, and once over a UNIX socket (the same-host way).
        let listen = if i % 4 == 3 {
            format!("unix:{}", dir.path().join("incoming.sock").display())
        } else {
            "tcp:127.0.0.1:0".to_string()
        };
        let mut dest = VmProc::start(&ctl(i), &["--incoming", &listen, "--connect", to]);
        let at = dest.event("listening")["at"].as_str().unwrap().to_string();
        if i % 4 == 3 {
            assert_eq!(at, listen);
        } else {
            assert!(at.starts_with("tcp:127.0.0.1:"), "{at}");
        }
        // Work in flight on every queue at each stop.
        vm.progress(40);
        let json = i % 2 == 0;
        let out = migrate(&vm.control, &at, json);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "move {i}: {stderr}");
        if json {
            let lines: Vec<Value> = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let phases: Vec<&str> = lines
                .iter()
                .filter(|l| l["event"] == "progress")
                .map(|l| l["phase"].as_str().unwrap())
                .collect();
            assert_eq!(phases.first(), Some(&"connecting to the destination"));
            for p in ["PRE_COPY", "copying RAM", "STOP_COPY", "done"] {
                assert!(phases.contains(&p), "no {p} in {phases:?}");
            }
            let done = lines.last().unwrap();
            downtimes.push(done["downtime_ms"].as_f64().unwrap());
            assert_eq!(done["event"], "done", "{stdout}");
            assert!(done["ram_bytes"].as_u64().unwrap() >= 16 << 20, "{done}");
            assert!(done["stream_bytes"].as_u64().unwrap() > 0, "{done}");
        } else {
            eprintln!("move {i}:\n{stdout}");
            for want in [
                "migrating to ",
                "PRE_COPY: ",
                "compatibility accepted",
                "copying RAM, round 0: 4096 pages, 16.0 MiB so far",
                "copying RAM, round 1: ",
                "STOP_COPY: ",
                "migrated to ",
                "downtime ",
            ] {
                assert!(stdout.contains(want), "no '{want}' in:\n{stdout}");
            }
            let ms = stdout
                .split("downtime ")
                .nth(1)
                .and_then(|r| r.split(" ms").next());
            downtimes.push(ms.unwrap().parse::<f64>().unwrap());
        }
        // The source hands over and exits; the destination's guest goes on
        // from the migrated rings (tags, counters and all).
        assert_eq!(vm.event("migrated")["to"], at.as_str());
        assert!(vm.wait().success());
        let incoming = dest.event("incoming");
        assert!(
            incoming["ram_bytes"].as_u64().unwrap() >= 16 << 20,
            "{incoming}"
        );
        dest.progress(40);
        vm = dest;
    }
    vm.progress(40);
    let (status, summary) = vm.term();
    assert!(status.success(), "{summary}");
    assert_eq!(summary["all_verified"], true, "{summary}");
    let s = &summary["summary"];
    let jobs = s["stats"]["jobs"].as_u64().unwrap();
    assert_eq!(s["stats"]["verified"].as_u64(), Some(jobs), "{s}");
    assert_eq!(
        (
            s["stats"]["failed"].as_u64(),
            s["stats"]["repeated"].as_u64(),
            s["stats"]["reordered"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "no job failed, none completed twice, and (one engine) none before an older job of its queue: {s}"
    );
    assert_eq!(s["never_completed"].as_u64(), Some(0));
    // Q_COMPLETED travelled with the device through every move and equals
    // the completions the driver read over the VM's life.
    assert_eq!(s["device_completed"], s["completed"], "{s}");
    assert!(jobs > 40 * (moves as u64 + 2), "{s}");
    let mean = downtimes.iter().sum::<f64>() / downtimes.len().max(1) as f64;
    let worst = downtimes.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "{moves} moves between VM processes, {jobs} jobs verified once: downtime mean {mean:.1} ms, worst {worst:.1} ms"
    );
}

#[test]
fn a_destination_that_refuses_or_is_not_there_leaves_the_source_vm_verifying() {
    let (_a, sa) = host("quad");
    let (_b, sb) = host("pair");
    let dir = tempfile::tempdir().unwrap();
    let vm = VmProc::start(
        &dir.path().join("src.ctl"),
        &["--connect", sa.to_str().unwrap()],
    );
    vm.progress(40);

    // Another type (2 queues, not 4): its instance refuses the
    // compatibility block; the source runs on, the destination waits on.
    let mut dest = VmProc::start(
        &dir.path().join("dst.ctl"),
        &[
            "--incoming",
            "tcp:127.0.0.1:0",
            "--connect",
            sb.to_str().unwrap(),
        ],
    );
    let at = dest.event("listening")["at"].as_str().unwrap().to_string();
    let out = migrate(&vm.control, &at, false);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("(refused)")
            && err.contains("compatibility block")
            && err.contains("a device of type 'quad' cannot become this instance (4 queues in the stream, 2 here)")
            && err.contains("the source runs on"),
        "{err}"
    );
    assert!(text(&out.stdout).contains("migrating to"));
    vm.progress(100);
    assert!(
        dest.child.try_wait().unwrap().is_none(),
        "the destination waits on"
    );
    let (status, _) = (common::terminate(&mut dest.child), ());
    assert!(status.success());

    // Nobody listening there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = migrate(&vm.control, &format!("tcp:127.0.0.1:{port}"), true);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("(unreachable)")
            && err.contains("cannot reach")
            && err.contains("the source runs on"),
        "{err}"
    );
    let last: Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["kind"], "unreachable");
    vm.progress(100);

    let (status, summary) = vm.term();
    assert!(status.success(), "{summary}");
    assert_eq!(summary["all_verified"], true, "{summary}");
}

#[test]
fn bad_arguments_and_a_missing_vm_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("nobody.ctl");
    let out = migrate(&ctl, "tcp:127.0.0.1:1", false);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot reach the VM's control socket"),
        "{err}"
    );

    for bad in ["127.0.0.1:4444", "tcp:nohost", "unix:"] {
        let out = migrate(&ctl, bad, false);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = text(&out.stderr);
        assert!(
            err.contains("expected tcp:HOST:PORT") || err.contains("expected unix:PATH"),
            "{bad}: {err}"
        );
    }

    // A VM whose instance is not there.
    let out = wdvirt()
        .args(["vm", "--connect"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot connect to the instance at"), "{err}");

    // A control path or a UNIX listen path that names a file which is
    // not a socket: refused by name, and the file is left as it was.
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "mine").unwrap();
    for args in [
        vec!["--control".to_string(), notes.display().to_string()],
        vec!["--incoming".into(), format!("unix:{}", notes.display())],
    ] {
        let out = wdvirt()
            .args(["vm", "--connect"])
            .arg(dir.path().join("none.sock"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("not a socket"), "{args:?}: {err}");
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "mine", "{args:?}");
    }

    let out = wdvirt()
        .args(["vm", "--connect", "/nowhere", "--status-every", "inf"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--status-every inf: expected seconds"));

    // Rounds past MAX_ROUNDS: refused by the parser, with the range.
    let out = wdvirt()
        .args(["migrate", "--vm"])
        .arg(&ctl)
        .args(["--to", "tcp:127.0.0.1:1", "--max-rounds", "1001"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("--max-rounds") && err.contains("0..=1000"),
        "{err}"
    );

    let help = wdvirt().args(["migrate", "--help"]).output().unwrap();
    let help = text(&help.stdout);
    assert!(
        help.contains("wdvirt vm --incoming tcp:") && help.contains("wdvirt migrate --vm"),
        "{help}"
    );
}

/// The control socket's `status` of the VM at `control`.
fn status_at(control: &Path) -> Value {
    let mut c = UnixStream::connect(control).unwrap();
    c.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Has process `pid` (not a child of this one) ended? (A zombie counts:
/// whoever adopted it may not reap it at once.)
fn ended(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn to_daemon_prepares_the_destination_instance_and_vm_process_or_undoes_it() {
    let (_a, sa) = host("quad");
    let b = Daemon::start(HOST);
    let dir = tempfile::tempdir().unwrap();
    let mut vm = VmProc::start(
        &dir.path().join("src.ctl"),
        &["--connect", sa.to_str().unwrap()],
    );
    vm.progress(40);
    let new_ctl = dir.path().join("moved.ctl");
    let to_b = |ty: &str, json: bool| {
        let mut c = wdvirt();
        c.args(["migrate", "--vm"])
            .arg(&vm.control)
            .arg("--to-daemon")
            .arg(b.api());
        c.args(["--type", ty, "--name", "moved", "--new-control"])
            .arg(&new_ctl);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };

    // Another type: refused; the instance and the process it made are undone.
    let out = to_b("pair", false);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("(refused)") && err.contains("stopped and undefined"),
        "{err}"
    );
    assert!(text(&out.stdout).contains("prepared instance moved"));
    assert!(
        b.defined().iter().all(|d| d["name"] != "moved"),
        "undefined"
    );
    vm.progress(100);

    // Its own type: the VM moves to a process this command started.
    let out = to_b("quad", true);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "prepared", "{lines:?}");
    assert_eq!(lines.last().unwrap()["event"], "done");
    let pid = lines[0]["pid"].as_u64().unwrap();
    assert!(vm.wait().success());
    let list = b.json(&["list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "moved"),
        "{list}"
    );
    let want = status_at(&new_ctl)["verified"].as_u64().unwrap() + 100;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status_at(&new_ctl);
        assert_eq!(
            (s["failed"].as_u64(), s["repeated"].as_u64()),
            (Some(0), Some(0)),
            "{s}"
        );
        if s["verified"].as_u64().unwrap() >= want {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ended(pid) {
        assert!(
            Instant::now() < deadline,
            "the destination VM process did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(dir.path().join("moved.ctl.log")).unwrap();
    let summary: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary in {log}"));
    assert_eq!(summary["all_verified"], true, "{summary}");
}

#[test]
fn a_vm_whose_instance_is_stopped_under_it_says_so_and_exits_1() {
    let (a, sa) = host("quad");
    let dir = tempfile::tempdir().unwrap();
    let mut vm = VmProc::start(
        &dir.path().join("vm.ctl"),
        &["--connect", sa.to_str().unwrap()],
    );
    vm.progress(40);
    a.json(&["stop", "vm"]);
    let summary = vm.event("summary");
    assert_eq!(vm.wait().code(), Some(1), "{summary}");
    assert_eq!(summary["all_verified"], false);
    let failure = summary["summary"]["failure"].as_str().unwrap();
    eprintln!("the VM says: {failure}");
    // A doorbell or a poll of the device fails at once; a guest that only
    // polls its completion ring sees nothing more and calls it a stall.
    assert!(
        failure.contains("register access failed") || failure.contains("no completion for 10 s"),
        "{failure}"
    );
}

#[test]
fn a_client_that_goes_away_cancels_the_migration_and_the_vm_runs_on() {
    let (_a, sa) = host("quad");
    let (_b, sb) = host("quad");
    let dir = tempfile::tempdir().unwrap();
    let mut vm = VmProc::start(
        &dir.path().join("src.ctl"),
        &["--connect", sa.to_str().unwrap()],
    );
    let mut dest = VmProc::start(
        &dir.path().join("dst.ctl"),
        &[
            "--incoming",
            "tcp:127.0.0.1:0",
            "--connect",
            sb.to_str().unwrap(),
        ],
    );
    let at = dest.event("listening")["at"].as_str().unwrap().to_string();
    vm.progress(40);
    // What `wdvirt migrate` does, then gone after the first progress line
    // (as when it is interrupted): the VM's next report fails and cancels.
    {
        let mut c = UnixStream::connect(&vm.control).unwrap();
        let req = serde_json::json!({"op": "migrate", "to": at});
        c.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        let first: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(first["event"], "progress", "{first}");
    }
    vm.progress(100);
    assert!(vm.child.try_wait().unwrap().is_none(), "the source runs on");
    assert!(
        dest.lines.lock().iter().all(|l| l["event"] != "incoming"),
        "the destination did not resume"
    );
    // The destination waits for the next attempt, which goes through.
    let out = migrate(&vm.control, &at, false);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(vm.wait().success());
    dest.event("incoming");
    dest.progress(40);
    let (status, summary) = dest.term();
    assert!(status.success());
    assert_eq!(summary["all_verified"], true, "{summary}");
}
