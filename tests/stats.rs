//! Statistics as an operator and a monitoring system see them: a real
//! daemon, in-process VMMs whose guest drivers count every completion by
//! status, then `wdvirt stats` (by VM, by instance, `--json`), `/metrics`
//! on the API socket and on `--metrics-addr` parsed back, bad filters
//! refused by name, and `wdvirt top` in a real terminal (tmux).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_abi::{JobStatus, Opcode, SubmissionEntry};
use wdvirt_guest::Device;

mod common;

use common::daemon::Daemon;

const HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 2
    queue_pairs: 16
    operations: [all]
    pasids: 8
qos_policies:
  - name: silver
    weight: 100
types:
  - name: quad
    queues: 4
    operations: [all]
    max_depth: 256
    qos: silver
  - name: hash
    queues: 1
    operations: [sha256, crc32c]
    qos: silver
"#;

/// The daemon on [`HOST`], serving `/metrics` at `127.0.0.1:PORT` too when
/// asked.
fn daemon(metrics: Option<u16>) -> Daemon {
    let mut b = Daemon::builder(HOST);
    if let Some(port) = metrics {
        b = b.arg("--metrics-addr").arg(port.to_string());
    }
    b.start()
}

/// What a guest driver counted: completions by status name.
type Counted = BTreeMap<String, u64>;

/// A VMM on `socket` whose driver runs `good` CRC32C jobs of 4 KiB on
/// queue `qi`, plus jobs the device must refuse: `bad_addr` with a source
/// outside guest RAM and `bad_op` with an unknown opcode. Returns the VMM
/// (kept attached) and the completions it saw, by status.
fn drive(
    socket: &Path,
    qi: u32,
    good: u32,
    bad_addr: u32,
    bad_op: u32,
) -> (Arc<LoopbackVmm>, Counted) {
    let vmm = Arc::new(
        LoopbackVmm::connect(socket, GuestRam::new(common::RAM_BASE, 4 << 20).unwrap()).unwrap(),
    );
    let dev = Device::probe(vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool = vmm.dma_pool().unwrap();
    let mut q = dev
        .queue(qi, 64, dev.queue_cap_ops(qi).unwrap(), &pool)
        .unwrap();
    let buf = pool.alloc(4096, 64).unwrap();
    buf.write(0, &[0x5a; 4096]).unwrap();
    let mut jobs = Vec::new();
    for i in 0..good + bad_addr + bad_op {
        let mut e = SubmissionEntry {
            opcode: Opcode::Crc32c as u8,
            tag: i,
            src: buf.addr(),
            src_len: 4096,
            ..Default::default()
        };
        if i >= good && i < good + bad_addr {
            e.src = 0x1000; // below guest RAM: never mapped
        } else if i >= good + bad_addr {
            e.opcode = 0xee;
        }
        jobs.push(e);
    }
    let mut counted = Counted::new();
    let mut out = Vec::new();
    let mut sent = 0;
    while sent < jobs.len() || q.outstanding() > 0 {
        sent += q.submit(&jobs[sent..]).unwrap();
        out.clear();
        q.wait(&mut out, Duration::from_secs(10)).unwrap();
        for c in &out {
            let s = JobStatus::from_code(c.status).unwrap();
            *counted.entry(s.name().to_string()).or_default() += 1;
        }
    }
    (vmm, counted)
}

fn failed(c: &Counted) -> u64 {
    c.iter().filter(|(k, _)| *k != "Ok").map(|(_, v)| v).sum()
}

/// `GET path` over the daemon's UNIX socket: (status line, headers, body).
fn http_unix(api: &Path, path: &str) -> (String, String, String) {
    let mut s = std::os::unix::net::UnixStream::connect(api).unwrap();
    http(&mut s, path)
}

fn http(s: &mut (impl Read + Write), path: &str) -> (String, String, String) {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: wdvirt\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

/// One sample of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The Prometheus text format, parsed by its grammar: `# ` lines are
/// metadata, every other line `name{label="value",...} number` with `\"`,
/// `\\` and `\n` escapes in values.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, rest) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => {
                let (n, v) = line.split_once(' ').unwrap();
                out.push(Sample {
                    name: n.into(),
                    labels: BTreeMap::new(),
                    value: v.parse().unwrap(),
                });
                continue;
            }
        };
        let mut labels = BTreeMap::new();
        let mut chars = rest.chars();
        loop {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "in {line}");
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(c) => value.push(c),
                        None => panic!("dangling escape in {line}"),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key.trim_start_matches(',').to_string(), value);
            match chars.next() {
                Some(',') => {
                    // A label follows; put back nothing (the key reader
                    // trims the comma it would have seen).
                }
                Some('}') => break,
                other => panic!("unexpected {other:?} in {line}"),
            }
        }
        let value = chars.as_str().trim();
        out.push(Sample {
            name: name.into(),
            labels,
            value: value
                .parse()
                .unwrap_or_else(|_| panic!("value {value:?} in {line}")),
        });
    }
    out
}

/// The sum of `name` over samples whose labels include `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[test]
fn counters_equal_what_each_driver_counted_by_vm_and_metrics_say_the_same() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = daemon(Some(port));
    d.json(&["define", "--type", "quad", "--name", "web-0", "--vm", "web"]);
    d.json(&["define", "--type", "hash", "--name", "web-1", "--vm", "web"]);
    d.json(&["define", "--type", "hash", "--name", "batch-0"]);
    for n in ["web-0", "web-1", "batch-0"] {
        d.json(&["start", n]);
    }
    let (_a, web0) = drive(&d.socket("web-0"), 2, 150, 7, 3);
    let (_b, web1) = drive(&d.socket("web-1"), 0, 40, 0, 2);
    let (_c, batch) = drive(&d.socket("batch-0"), 0, 25, 5, 0);
    assert_eq!(web0["Ok"], 150, "the driver saw its good jobs succeed");
    assert_eq!(web0["BadAddress"], 7);
    assert_eq!(web0["BadOpcode"], 3);
    // The VM is named after its VMM attached, as a libvirt hook does at `started`.
    d.json(&["modify", "batch-0", "--vm", "batch vm \"2\""]);

    let s = d.json(&["stats"]);
    let vm = |name: &str| {
        s["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == name)
            .unwrap_or_else(|| panic!("no VM {name} in {s}"))
            .clone()
    };
    let web = vm("web");
    assert_eq!(web["instances"], serde_json::json!(["web-0", "web-1"]));
    let t = &web["totals"];
    assert_eq!(t["jobs_ok"], web0["Ok"] + web1["Ok"], "{t}");
    assert_eq!(t["jobs_failed"], failed(&web0) + failed(&web1), "{t}");
    assert_eq!(t["jobs_submitted"], 150 + 7 + 3 + 40 + 2, "{t}");
    assert_eq!(t["failed_by_status"]["BadAddress"], 7, "{t}");
    assert_eq!(t["failed_by_status"]["BadOpcode"], 5, "{t}");
    assert_eq!(t["bytes_in"], (150 + 40) * 4096, "{t}");
    assert_eq!(
        (t["in_flight"].as_u64(), t["ring_waiting"].as_u64()),
        (Some(0), Some(0))
    );
    // Jobs refused by the descriptor check never reach an engine, so are not timed.
    assert_eq!(web["latency"]["count"], 150 + 40, "{web}");
    let p50 = web["latency"]["p50_ns"].as_u64().unwrap();
    let p99 = web["latency"]["p99_ns"].as_u64().unwrap();
    assert!(p50 > 0 && p50 <= p99 && p99 < 10_000_000_000, "{web}");
    let b = vm("batch vm \"2\"");
    assert_eq!(b["totals"]["jobs_ok"], batch["Ok"]);
    assert_eq!(b["totals"]["failed_by_status"]["BadAddress"], 5);

    // One VM alone, one instance alone, the queue the driver used.
    let only = d.json(&["stats", "--vm", "web"]);
    assert_eq!(only["instances"].as_array().unwrap().len(), 2);
    assert_eq!(only["vms"].as_array().unwrap().len(), 1);
    let one = d.json(&["stats", "--instance", "web-0"]);
    let q = &one["instances"][0]["queues"];
    assert_eq!(q.as_array().unwrap().len(), 4);
    assert_eq!(q[2]["jobs_ok"], 150, "{q}");
    assert_eq!(q[0]["jobs_submitted"], 0, "{q}");
    // The QoS scheduler's side: engine time its jobs used, and its share
    // (three instances of equal weight on soft0: a third each).
    let sched = &one["instances"][0]["scheduler"];
    assert!(sched["engine_ns"].as_u64().unwrap() > 0, "{sched}");
    let entitled = sched["entitlement"].as_f64().unwrap();
    assert!((entitled - 1.0 / 3.0).abs() < 1e-9, "{sched}");
    let table = String::from_utf8(d.cli(&["stats", "--vm", "web"]).stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web ") && l.contains(" 190 ")),
        "the VM's row shows its OK jobs:\n{table}"
    );

    // /metrics on the API socket and on the TCP address: the same counts.
    let (status, headers, body) = http_unix(&d.api(), "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"));
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (tstatus, _, tbody) = http(&mut tcp, "/metrics");
    assert!(tstatus.contains("200"), "{tstatus}");
    let fds = d.json(&["stats"])["process"]["vmm_fds"].clone();
    for text in [&body, &tbody] {
        let m = parse_metrics(text);
        // The daemon's own figures: one unlabelled sample each, the JSON's.
        for k in ["queued", "closed", "leaked", "closed_here"] {
            let name = format!("wdvirt_vmm_fds_{k}_total");
            let s: Vec<&Sample> = m.iter().filter(|s| s.name == name).collect();
            assert_eq!(s.len(), 1, "{name}");
            assert!(s[0].labels.is_empty(), "{name}: {:?}", s[0]);
            assert_eq!(s[0].value, fds[k].as_f64().unwrap(), "{name}: {fds}");
        }
        for s in m.iter().filter(|s| s.name.starts_with("wdvirt_queue_")) {
            for l in ["vm", "instance", "instance_name", "queue"] {
                assert!(s.labels.contains_key(l), "{s:?} lacks {l}");
            }
        }
        let ok = sum(
            &m,
            "wdvirt_queue_jobs_completed_total",
            &[("vm", "web"), ("status", "Ok")],
        );
        assert_eq!(ok, 190.0);
        let bad = sum(
            &m,
            "wdvirt_queue_jobs_completed_total",
            &[("status", "BadAddress")],
        );
        assert_eq!(bad, 12.0);
        let q2 = [("instance_name", "web-0"), ("queue", "2")];
        assert_eq!(sum(&m, "wdvirt_queue_jobs_submitted_total", &q2), 160.0);
        assert_eq!(sum(&m, "wdvirt_queue_latency_seconds_count", &q2), 150.0);
        // Buckets are cumulative and end at the count.
        let buckets: Vec<&Sample> = m
            .iter()
            .filter(|s| s.name == "wdvirt_queue_latency_seconds_bucket")
            .filter(|s| q2.iter().all(|(k, v)| s.labels[*k] == *v))
            .collect();
        assert!(
            buckets.windows(2).all(|w| w[0].value <= w[1].value),
            "{buckets:?}"
        );
        assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
        assert_eq!(buckets.last().unwrap().value, 150.0);
        let name = sum(
            &m,
            "wdvirt_queue_jobs_completed_total",
            &[("vm", "batch vm \"2\""), ("status", "Ok")],
        );
        assert_eq!(
            name, 25.0,
            "a VM name with a space and quotes survives escaping"
        );
        let uuid = one["instances"][0]["uuid"].as_str().unwrap();
        assert_eq!(
            sum(
                &m,
                "wdvirt_queue_jobs_completed_total",
                &[("instance", uuid), ("status", "Ok")]
            ),
            150.0
        );
    }
    let (status, _, _) = http(
        &mut std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
        "/v1/instances",
    );
    assert!(
        status.contains("404"),
        "the TCP address serves only /metrics: {status}"
    );
}

#[test]
fn bad_filters_are_refused_by_name_and_change_nothing() {
    let d = daemon(None);
    d.json(&["define", "--type", "hash", "--name", "h1", "--vm", "web"]);
    d.json(&["define", "--type", "hash", "--name", "h2"]);
    d.json(&["start", "h1"]);
    // The API's answer to each, as the table in docs/statistics.md gives it.
    let api_refuses = |query: &str, code: &str, kind: &str| {
        let (status, _, body) = http_unix(&d.api(), &format!("/v1/stats?{query}"));
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(status.contains(code), "{query}: {status} {body}");
        assert_eq!(v["kind"], kind, "{query}: {body}");
    };
    api_refuses("vm=nope", "404", "no-such-vm");
    api_refuses("instance=zz", "404", "no-such-instance");
    api_refuses("instance=h2", "409", "wrong-state");
    api_refuses("vm=web&bogus=1", "400", "invalid");
    let e = d.refused(&["stats", "--vm", "nope"]);
    assert!(e.contains("no VM named 'nope'"), "{e}");
    let e = d.refused(&["stats", "--instance", "zz"]);
    assert!(e.contains("no instance named or with UUID 'zz'"), "{e}");
    let e = d.refused(&["stats", "--instance", "h2"]);
    assert!(
        e.contains("'h2' is defined") && e.contains("only while it is started"),
        "{e}"
    );
    // Started, but another VM's (none's): named as not the VM's.
    d.json(&["start", "h2"]);
    api_refuses("vm=web&instance=h2", "400", "invalid");
    let e = d.refused(&["stats", "--vm", "web", "--instance", "h2"]);
    assert!(
        e.contains("instance 'h2' is not attached to VM 'web'"),
        "{e}"
    );
    let e = d.refused(&["modify", "h2", "--vm", "bad\nname"]);
    assert!(e.contains("control characters"), "{e}");
    let (status, _, body) = http_unix(&d.api(), "/v1/stats?vm=web&bogus=1");
    assert!(
        status.contains("400") && body.contains("unknown field `bogus`"),
        "{status} {body}"
    );
    // A VM whose instances are all stopped is known, with nothing running.
    d.json(&["stop", "h1"]);
    let s = d.json(&["stats", "--vm", "web"]);
    assert_eq!(s["instances"], serde_json::json!([]));
    assert_eq!(s["vms"][0]["vm"], "web");
    assert_eq!(s["vms"][0]["totals"]["jobs_submitted"], 0);
    // And the definitions still read as before.
    let l = d.json(&["list", "--defined"]);
    assert_eq!(l[0]["vm"], "web");
    assert_eq!(l[1].get("vm"), None, "{l}");
}

/// A tmux server of our own (its own socket), killed at the end.
struct Tmux(String);

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("tmux is missing: run scripts/setup.sh")
    }
    fn capture(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_in_a_real_terminal_shows_each_vm_live_and_quits_on_q() {
    let d = daemon(None);
    d.json(&["define", "--type", "quad", "--name", "w", "--vm", "web"]);
    d.json(&[
        "define", "--type", "hash", "--name", "idle", "--vm", "batch",
    ]);
    d.json(&["start", "w"]);
    d.json(&["start", "idle"]);
    // A guest that keeps its queue busy for as long as the test looks.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (socket, stop) = (d.socket("w"), stop.clone());
        std::thread::spawn(move || {
            let vmm = Arc::new(
                LoopbackVmm::connect(&socket, GuestRam::new(common::RAM_BASE, 4 << 20).unwrap())
                    .unwrap(),
            );
            let dev = Device::probe(vmm.clone()).unwrap();
            dev.enable().unwrap();
            let pool = vmm.dma_pool().unwrap();
            let mut q = dev.queue(0, 16, dev.info().cap_ops, &pool).unwrap();
            let data = vec![7u8; 16 << 10];
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                assert_eq!(q.crc32c(&data).unwrap(), wdvirt_guest::crc::crc32c(&data));
            }
        })
    };
    let tmux = Tmux(format!("wdvirt-stats-test-{}", std::process::id()));
    let exe = env!("CARGO_BIN_EXE_wdvirt");
    let shell = format!(
        "{exe} --api {} top --interval 0.3; echo TOP-EXITED $?; sleep 30",
        d.api().display()
    );
    let out = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "150",
        "-y",
        "24",
        &shell,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Wait for a refresh that shows web's jobs moving.
    let deadline = Instant::now() + Duration::from_secs(20);
    let screen = loop {
        let s = tmux.capture();
        let web_rate = s
            .lines()
            .find(|l| l.trim_start_matches('│').starts_with("web "))
            .and_then(|l| {
                l.trim_start_matches('│')
                    .split_whitespace()
                    .nth(2)?
                    .parse::<f64>()
                    .ok()
            });
        if web_rate.is_some_and(|r| r > 0.0) && s.contains("refresh 2") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "top never showed web's jobs:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for want in [
        "wdvirt top",
        "JOBS/S",
        "SHARE",
        "AVG LAT",
        "P99",
        "batch",
        "per instance",
        "who waits on whom",
        "q quits",
    ] {
        assert!(screen.contains(want), "no {want:?} on screen:\n{screen}");
    }
    let batch = screen
        .lines()
        .find(|l| l.trim_start_matches('│').starts_with("batch "))
        .unwrap();
    assert_eq!(
        batch.trim_start_matches('│').split_whitespace().nth(2),
        Some("0"),
        "the idle VM runs nothing: {batch}"
    );
    let web = screen
        .lines()
        .find(|l| l.trim_start_matches('│').starts_with("web "))
        .unwrap();
    assert!(web.contains("100.0%"), "web has all of the jobs: {web}");
    let w = screen
        .lines()
        .find(|l| l.trim_start_matches('│').starts_with("w "))
        .unwrap();
    let cells: Vec<&str> = w.trim_start_matches('│').split_whitespace().collect();
    assert_eq!(
        cells[..3],
        ["w", "web", "1"],
        "one busy queue on instance w: {w}"
    );
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("top-capture.txt");
    std::fs::write(&target, &screen).unwrap();
    // The screen is redrawn in place: still one title line after refreshes.
    std::thread::sleep(Duration::from_millis(700));
    let later = tmux.capture();
    assert_eq!(later.matches("wdvirt top").count(), 1, "{later}");
    tmux.cmd(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = tmux.capture();
        if s.contains("TOP-EXITED 0") {
            assert!(
                !s.contains("JOBS/S"),
                "the terminal is restored after q:\n{s}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "q did not quit top:\n{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
}

#[test]
fn a_vmm_gone_mid_flight_leaves_every_taken_job_counted_once() {
    let d = daemon(None);
    d.json(&["define", "--type", "quad", "--name", "z", "--vm", "zip"]);
    d.json(&["start", "z"]);
    let submitted = {
        let vmm = Arc::new(
            LoopbackVmm::connect(
                &d.socket("z"),
                GuestRam::new(common::RAM_BASE, 4 << 20).unwrap(),
            )
            .unwrap(),
        );
        let dev = Device::probe(vmm.clone()).unwrap();
        dev.enable().unwrap();
        let pool = vmm.dma_pool().unwrap();
        let mut q = dev
            .queue(1, 64, dev.queue_cap_ops(1).unwrap(), &pool)
            .unwrap();
        let src = pool.alloc(256 << 10, 64).unwrap();
        let data: Vec<u8> = (0..256u32 << 10)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        src.write(0, &data).unwrap();
        let dst = pool.alloc(320 << 10, 64).unwrap();
        // Level-12 deflate of 256 KiB: tens of ms each, far more work than
        // the two engines finish before the VMM goes.
        let jobs: Vec<SubmissionEntry> = (0..48)
            .map(|i| SubmissionEntry {
                opcode: Opcode::DeflateCompress as u8,
                tag: i,
                src: src.addr(),
                src_len: 256 << 10,
                dst: dst.addr(),
                dst_len: 320 << 10,
                param: 12,
                ..Default::default()
            })
            .collect();
        assert_eq!(q.submit(&jobs).unwrap(), 48);
        // Let the device take them all, then leave without waiting.
        let deadline = Instant::now() + Duration::from_secs(10);
        while q.device_sq_head().unwrap() != 48 {
            assert!(Instant::now() < deadline, "the device never took the jobs");
            std::thread::sleep(Duration::from_millis(5));
        }
        48u64
    };
    // The reset that follows the VMM's departure drains (at most 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let t = loop {
        let s = d.json(&["stats", "--vm", "zip"]);
        let t = s["vms"][0]["totals"].clone();
        if t["in_flight"] == 0 {
            break t;
        }
        assert!(Instant::now() < deadline, "jobs stayed in flight: {t}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let n = |k: &str| t[k].as_u64().unwrap();
    assert_eq!(n("jobs_submitted"), submitted, "{t}");
    assert!(n("jobs_dropped") > 0, "the reset dropped queued jobs: {t}");
    assert_eq!(
        n("jobs_ok") + n("jobs_failed") + n("jobs_dropped"),
        submitted,
        "each taken job is completed or dropped, once: {t}"
    );
}
