//! A real Linux guest drives the device: QEMU 11.1's `vfio-user-pci` (TCG,
//! in the trixie chroot) boots the trixie kernel with a busybox initramfs,
//! whose init runs the static `wdvirt-guest` tool against instances a
//! `wdvirt daemon` started.
//! Everything the guest reports is checked against what the host computes
//! for the same bytes and against the daemon's own per-instance counters.
//!
//! These tests need root and the guest image that `scripts/guest-image.sh`
//! builds, so plain `cargo test` skips them; `scripts/test.sh` (the README's
//! test command, and CI) builds the image and runs them with `--ignored`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use serde_json::Value;
use wdvirt::accel::ops;
use wdvirt_abi::{Format, pci};
use wdvirt_guest::workload::gen_data;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chroot() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var_os("WDVIRT_CHROOT").unwrap_or_else(|| "/var/tmp/wdvirt-trixie".into()),
    );
    let image = dir.join("var/lib/wdvirt-guest/initrd.cpio");
    assert!(
        image.exists(),
        "no guest image at {}: run `bash scripts/guest-image.sh` first (scripts/test.sh does)",
        image.display()
    );
    dir
}

/// A `wdvirt daemon` on the shipped default configuration
/// (`policies/default.yaml`), with one `all-4q` instance per name defined and
/// started through the CLI; sockets inside the chroot.
struct Server {
    child: Child,
    names: Vec<String>,
    sockets: Vec<PathBuf>,
    api: PathBuf,
    dir: tempfile::TempDir,
}

fn wdvirt_cli(api: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wdvirt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Server {
    fn start(names: &[&str]) -> Server {
        let run = chroot().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("wdvirt-test-")
            .tempdir_in(&run)
            .unwrap();
        let api = dir.path().join("api.sock");
        let child = Server::spawn(dir.path(), &api);
        let sockets = names
            .iter()
            .map(|n| {
                wdvirt_cli(&api, &["define", "--type", "all-4q", "--name", n]);
                PathBuf::from(wdvirt_cli(&api, &["start", n]).trim())
            })
            .collect();
        Server {
            child,
            names: names.iter().map(|n| n.to_string()).collect(),
            sockets,
            api,
            dir,
        }
    }

    /// `wdvirt daemon` on `dir`, once its API answers.
    fn spawn(dir: &Path, api: &Path) -> Child {
        let _ = std::fs::remove_file(api);
        let mut child = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
            .arg("daemon")
            .arg("--config")
            .arg(repo().join("policies/default.yaml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir)
            .arg("--api")
            .arg(api)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(api).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "wdvirt daemon exited");
            assert!(Instant::now() < deadline, "wdvirt daemon never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// SIGKILL the daemon and start it again on the same directory: it
    /// takes its instances back from the fd holder.
    fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Server::spawn(self.dir.path(), &self.api);
    }

    /// Each instance's report as the daemon lists it, then SIGTERM (after
    /// every guest has powered off: QEMU 11.1 aborts if the server closes a
    /// socket in use).
    fn stop(mut self) -> Vec<Value> {
        let list: Value =
            serde_json::from_str(&wdvirt_cli(&self.api, &["list", "--json"])).unwrap();
        let reports = self
            .names
            .iter()
            .map(|n| {
                let v = list
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == n.as_str())
                    .unwrap_or_else(|| panic!("{n} is not listed: {list}"));
                v["report"].clone()
            })
            .collect();
        common::stop_daemon(&mut self.child);
        reports
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed daemon's fd holder keeps its instances: this test is over.
        if let Ok(c) =
            wdvirt::restart::holder::HolderClient::connect(&self.dir.path().join("holder.sock"))
        {
            let _ = c.quit();
        }
    }
}

/// What one guest printed.
struct Guest {
    console: String,
    /// `scripts/guest-boot.sh`'s exit status: the tool's.
    status: Option<i32>,
    result: Value,
}

/// A guest booting: `scripts/guest-boot.sh` running, its console collected
/// line by line as it arrives.
struct Booting {
    child: Child,
    /// QEMU's standard input: the guest's serial console input.
    stdin: Option<std::process::ChildStdin>,
    /// Console lines with the time each arrived.
    console: Arc<Mutex<Vec<(Instant, String)>>>,
    readers: Vec<std::thread::JoinHandle<String>>,
}

impl Booting {
    /// Boots a guest with one device on `socket` and `params` on its kernel
    /// command line (`mode=run jobs=... size=...`).
    fn start(socket: &Path, params: &[&str]) -> Booting {
        let mut child = Command::new("bash")
            .arg(repo().join("scripts/guest-boot.sh"))
            .args(["--no-build", "--timeout", "240", "--socket"])
            .arg(socket)
            .args(params)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let console = Arc::new(Mutex::new(Vec::new()));
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let sink = console.clone();
        let console_reader = std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
            String::new()
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Booting {
            child,
            stdin,
            console,
            readers: vec![console_reader, stderr_reader],
        }
    }

    fn text(&self) -> String {
        let lines = self.console.lock().unwrap();
        lines.iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// When the first console line starting with `prefix` arrived; waits
    /// for it.
    fn line_time(&self, prefix: &str) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let found = self
                .console
                .lock()
                .unwrap()
                .iter()
                .find_map(|(t, l)| l.starts_with(prefix).then_some(*t));
            if let Some(t) = found {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} on the console:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types a line on the guest's serial console.
    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the guest to power off; its console and result.
    fn finish(mut self) -> Guest {
        let status = self.child.wait().unwrap().code();
        let said: String = self.readers.drain(..).map(|r| r.join().unwrap()).collect();
        // The console, then what the boot script said (shown on a failure).
        let console = format!("{}\n-- scripts/guest-boot.sh:\n{said}", self.text());
        let line = console
            .lines()
            .find_map(|l| l.strip_prefix("WDVIRT-RESULT "))
            .unwrap_or_else(|| panic!("the guest printed no result:\n{console}"));
        let result = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("bad result line ({e}):\n{console}"));
        Guest {
            console,
            status,
            result,
        }
    }
}

/// Boots a guest and waits for it to power off.
fn boot(socket: &Path, params: &[&str]) -> Guest {
    Booting::start(socket, params).finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The device as the guest's kernel enumerated it is the one the spec documents.
fn assert_identity(guest: &Guest, queues: u64) {
    let d = &guest.result["device"];
    // The tool looks for the IDs, so its own report cannot show them wrong;
    // init lists every PCI function from sysfs before the tool runs.
    let listed = format!(
        "  {} {:#06x}:{:#06x} class {:#08x}",
        d["bdf"].as_str().unwrap(),
        pci::VENDOR_ID,
        pci::DEVICE_ID,
        pci::CLASS_CODE
    );
    assert!(
        guest.console.lines().any(|l| l == listed),
        "no {listed:?} in init's PCI list:\n{}",
        guest.console
    );
    assert_eq!(d["class"], format!("{:06x}", pci::CLASS_CODE));
    let bars: Vec<(u64, u64, bool)> = d["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let field = |k: &str| b[k].as_u64().unwrap();
            (field("bar"), field("size"), b["mem"] == true)
        })
        .collect();
    let want = vec![
        (u64::from(pci::BAR_CONTROL), pci::BAR0_SIZE, true),
        (
            u64::from(pci::BAR_DOORBELL),
            pci::bar2_size(queues as u32),
            true,
        ),
    ];
    assert_eq!(bars, want, "BARs in the guest");
    assert_eq!(d["num_queues"], queues);
}

/// Every result of a `run` guest equals what the host computes for the same
/// bytes (the tool's data is a pure function of seed and size). Returns the
/// jobs the guest's driver submitted.
fn assert_run_matches_host(guest: &Guest, jobs: &str, seed: u64, size: usize) -> u64 {
    let r = &guest.result;
    assert_eq!(r["ok"], true, "guest run failed:\n{}", guest.console);
    assert_eq!(guest.status, Some(0), "{}", guest.console);
    let names: Vec<&str> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    let asked: Vec<&str> = jobs.trim_start_matches("jobs=").split(',').collect();
    assert_eq!(names, asked, "every job asked for, in order");
    assert_eq!(r["totals"]["ok"], asked.len());
    assert_eq!(
        (r["seed"].as_u64(), r["size"].as_u64()),
        (Some(seed), Some(size as u64))
    );
    let data = gen_data(seed, size);
    let mut scratch = ops::Scratch::new();
    for job in r["results"].as_array().unwrap() {
        let name = job["job"].as_str().unwrap();
        assert_eq!(job["ok"], true, "{name} failed in the guest: {job}");
        match name {
            "crc32c" => assert_eq!(job["crc32c"], format!("{:08x}", ops::crc32c(&data))),
            "sha256" => {
                let mut digest = [0u8; 32];
                ops::sha256(&data, &mut digest).unwrap();
                assert_eq!(job["sha256"], hex(&digest));
            }
            _ if name.starts_with("stream-") => {
                let format = Format::from_name(&name["stream-".len()..]).unwrap();
                common::assert_stream_job_matches_host(job, format, &data);
            }
            _ => {
                let Some(format) = Format::from_name(name) else {
                    continue;
                };
                // Each chunk is its own stream, compressed at the device's
                // default level: the host makes the same bytes (a chunk
                // over 64 KiB the engine compresses in slices).
                let chunk = job["chunk_bytes"].as_u64().unwrap() as usize;
                let level = ops::compression_level(0).unwrap();
                let mut streams = Vec::new();
                for piece in data.chunks(chunk) {
                    let mut dst = vec![0u8; piece.len() + piece.len() / 8 + 1024];
                    let n = wdvirt::accel::soft::compress_as_engine(
                        format,
                        level,
                        piece,
                        &mut dst,
                        &mut scratch,
                    )
                    .unwrap();
                    streams.extend_from_slice(&dst[..n as usize]);
                }
                let mut digest = [0u8; 32];
                ops::sha256(&streams, &mut digest).unwrap();
                assert_eq!(job["streams_sha256"], hex(&digest), "{name} output");
                assert_eq!(job["compressed"], streams.len());
                assert_eq!(job["roundtrip_ok"], true);
            }
        }
    }
    r["totals"]["device_jobs"].as_u64().unwrap()
}

/// The daemon's counters for one instance: jobs completed ok and failed.
fn host_jobs(report: &Value) -> (u64, u64) {
    report["queues"]
        .as_array()
        .unwrap()
        .iter()
        .fold((0, 0), |(ok, failed), q| {
            (
                ok + q["jobs_ok"].as_u64().unwrap(),
                failed + q["jobs_failed"].as_u64().unwrap(),
            )
        })
}

/// The stream jobs' size in CI, or `WDVIRT_GUEST_STREAM_SIZE` (`256M`,
/// say: docs/linux-guest.md records that run).
fn stream_size() -> String {
    std::env::var("WDVIRT_GUEST_STREAM_SIZE").unwrap_or_else(|_| "32M".into())
}

const ALL_JOBS: &str = "jobs=deflate,zlib,gzip,crc32c,sha256,copy,fill,compare";
const PAIR_JOBS: &str = "jobs=gzip,sha256,crc32c";
const CHECK_JOBS: &str = "jobs=crc32c,sha256";
const STREAM_JOBS: &str = "jobs=stream-gzip,stream-zlib";

#[test]
#[ignore = "boots Linux guests under QEMU: needs root and scripts/guest-image.sh; scripts/test.sh runs it"]
fn a_linux_guest_runs_jobs_whose_results_equal_the_hosts() {
    let server = Server::start(&["wd0"]);
    let guest = boot(
        &server.sockets[0],
        &["mode=run", ALL_JOBS, "size=4M", "seed=7"],
    );
    assert_identity(&guest, 4);
    let submitted = assert_run_matches_host(&guest, ALL_JOBS, 7, 4 << 20);
    let reports = server.stop();
    assert_eq!(reports[0]["connections"], 1);
    assert_eq!(
        host_jobs(&reports[0]),
        (submitted, 0),
        "host counters vs the guest's job count"
    );
    assert!(submitted >= 8, "several MiB take many jobs: {submitted}");
}

#[test]
#[ignore = "boots Linux guests under QEMU: needs root and scripts/guest-image.sh; scripts/test.sh runs it"]
fn a_linux_guest_streams_gzip_and_zlib_through_the_device_and_zlib_agrees() {
    let server = Server::start(&["wd0"]);
    let word = stream_size();
    let size = wdvirt_guest::cli::parse_size(&word).unwrap() as usize;
    // Four hugepages of DMA memory (8 MiB) and 256 MiB of RAM: the tool
    // makes, compresses, decompresses and hashes the stream piece by piece.
    let started = Instant::now();
    let guest = boot(
        &server.sockets[0],
        &["mode=run", STREAM_JOBS, &format!("size={word}"), "seed=31"],
    );
    let booted = started.elapsed();
    let submitted = assert_run_matches_host(&guest, STREAM_JOBS, 31, size);
    eprintln!(
        "guest booted, ran {submitted} device jobs and powered off in {:.1} s; the host's checks took {:.1} s",
        booted.as_secs_f64(),
        (started.elapsed() - booted).as_secs_f64()
    );
    for job in guest.result["results"].as_array().unwrap() {
        let pieces = job["pieces"].as_u64().unwrap();
        assert!(
            pieces as usize >= size >> 20,
            "one stream of many pieces: {job}"
        );
        eprintln!(
            "{}: {size} bytes, {pieces} pieces, {} compressed, {} ms in the guest",
            job["job"],
            job["compressed"],
            job["micros"].as_u64().unwrap() / 1000
        );
    }
    let reports = server.stop();
    assert_eq!(
        host_jobs(&reports[0]),
        (submitted, 0),
        "host counters vs the guest's job count"
    );
}

#[test]
#[ignore = "boots Linux guests under QEMU: needs root and scripts/guest-image.sh; scripts/test.sh runs it"]
fn two_guests_at_once_on_two_instances_each_match_the_host() {
    let server = Server::start(&["wd-a", "wd-b"]);
    let runs = [
        (&server.sockets[0], 11u64, "3M"),
        (&server.sockets[1], 12, "5M"),
    ];
    let guests: Vec<Guest> = std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|&(socket, seed, size)| {
                s.spawn(move || {
                    let seed = format!("seed={seed}");
                    let size = format!("size={size}");
                    boot(socket, &["mode=run", PAIR_JOBS, &seed, &size])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let submitted: Vec<u64> = guests
        .iter()
        .zip([(11, 3 << 20), (12, 5 << 20)])
        .map(|(g, (seed, size))| {
            assert_identity(g, 4);
            assert_run_matches_host(g, PAIR_JOBS, seed, size)
        })
        .collect();
    let reports = server.stop();
    assert_ne!(reports[0]["pasid"], reports[1]["pasid"]);
    for (report, jobs) in reports.iter().zip(&submitted) {
        assert_eq!(report["connections"], 1, "{}", report["name"]);
        assert_eq!(host_jobs(report), (*jobs, 0), "{}", report["name"]);
    }
}

#[test]
#[ignore = "boots Linux guests under QEMU: needs root and scripts/guest-image.sh; scripts/test.sh runs it"]
fn a_guest_writing_garbage_gets_error_codes_while_another_guest_verifies() {
    let server = Server::start(&["good", "noisy"]);
    // The garbage guest first; the good guest boots once the garbage guest's
    // tool has found its device, and the garbage goes on (`until=stdin`)
    // until the test types a line on its console after the good guest has
    // powered off. So the garbage spans all of the good guest's jobs by
    // construction, however TCG shares the host's cores (counts and head
    // starts lost that race in CI).
    let mut noisy = Booting::start(
        &server.sockets[1],
        &[
            "mode=garbage",
            "count=100000",
            "until=stdin",
            "widths=1,2,4",
            "seed=99",
        ],
    );
    let garbage_started = noisy.line_time("wdvirt-guest: found");
    let good = Booting::start(
        &server.sockets[0],
        &["mode=run", ALL_JOBS, "size=4M", "seed=21"],
    );
    let first_job = good.line_time("wdvirt-guest: DMA hugepage");
    let good_result = good.line_time("WDVIRT-RESULT ");
    let good = good.finish();
    noisy.type_line("stop");
    let garbage_ended = noisy.line_time("WDVIRT-RESULT ");
    let noisy = noisy.finish();
    assert!(
        garbage_started < first_job && good_result < garbage_ended,
        "the garbage did not span the good guest's jobs:\n{}\n{}",
        noisy.console,
        good.console
    );
    let submitted = assert_run_matches_host(&good, ALL_JOBS, 21, 4 << 20);

    // The noisy guest's refused accesses were latched as error codes, and the
    // device still answered and reset afterwards.
    let n = &noisy.result;
    assert_eq!(n["ok"], true, "{}", noisy.console);
    assert!(n["accesses"].as_u64().unwrap() >= 100000, "{n}");
    assert_eq!(n["err_latched"], true, "{n}");
    assert!(n["err_code"].as_u64().unwrap() > 0, "{n}");
    assert_ne!(n["err_name"], "unknown", "{n}");
    assert_eq!(n["reset_ok"], true);

    // The same instance serves its next VM.
    let again = boot(
        &server.sockets[1],
        &["mode=run", CHECK_JOBS, "size=1M", "seed=5"],
    );
    let again_jobs = assert_run_matches_host(&again, CHECK_JOBS, 5, 1 << 20);

    let reports = server.stop();
    assert_eq!(
        host_jobs(&reports[0]),
        (submitted, 0),
        "the good guest's instance"
    );
    let noisy_report = &reports[1];
    // Every refusal the guest saw counted (ERR_COUNT) is one the host counted.
    assert!(n["err_count"].as_u64().unwrap() > 0, "{n}");
    assert_eq!(noisy_report["device"]["register_errors"], n["err_count"]);
    assert_eq!(noisy_report["connections"], 2);
    // Only the second guest ran jobs there: the garbage guest never enables
    // a queue (the tool strips Q_CTRL.ENABLE from its random writes).
    assert_eq!(host_jobs(noisy_report), (again_jobs, 0));
}

#[test]
#[ignore = "boots Linux guests under QEMU: needs root and scripts/guest-image.sh; scripts/test.sh runs it"]
fn the_daemon_sigkilled_under_a_linux_guests_jobs_is_taken_over_and_the_guest_verifies_them_all() {
    let mut server = Server::start(&["wd0"]);
    let guest = Booting::start(
        &server.sockets[0],
        &["mode=run", ALL_JOBS, "size=16M", "seed=31"],
    );
    guest.line_time("wdvirt-guest: DMA hugepage");
    // Three kills while the guest's jobs run (TCG makes 16 MiB of jobs
    // take seconds); each daemon takes the instance over from the holder.
    let mut kills = 0;
    for pause in [300, 700, 500] {
        std::thread::sleep(Duration::from_millis(pause));
        if guest
            .console
            .lock()
            .unwrap()
            .iter()
            .any(|(_, l)| l.starts_with("WDVIRT-RESULT "))
        {
            break;
        }
        server.kill_and_restart();
        kills += 1;
    }
    let guest = guest.finish();
    assert!(
        kills >= 1,
        "the guest finished before the first kill:\n{}",
        guest.console
    );
    // QEMU never saw the device fail: the guest's run is whole and right.
    let submitted = assert_run_matches_host(&guest, ALL_JOBS, 31, 16 << 20);
    let complaints: Vec<&str> = (guest.console.lines())
        .filter(|l| l.starts_with("qemu-system") && l.contains("vfio"))
        .collect();
    assert!(
        complaints.is_empty(),
        "QEMU reported the device: {complaints:?}"
    );
    let reports = server.stop();
    assert!(reports[0]["adopted"].is_object(), "{}", reports[0]);
    assert_eq!(
        host_jobs(&reports[0]),
        (submitted, 0),
        "the host's counters across {kills} restarts vs the guest's job count"
    );
}

/// `scripts/guest-boot.sh` with bad arguments: exit 2 and a message naming
/// the problem, before any QEMU starts.
fn boot_refused(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts/guest-boot.sh"))
        .arg("--no-build")
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    assert!(out.stdout.is_empty(), "no console: QEMU never started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "boots Linux guests under QEMU: needs root and scripts/guest-image.sh; scripts/test.sh runs it"]
fn bad_boot_arguments_and_bad_guest_job_lists_get_clear_errors() {
    let server = Server::start(&["wd0"]);
    let socket = server.sockets[0].to_str().unwrap();
    let outside = std::env::temp_dir().join("wd.sock");
    for (args, message) in [
        (vec!["--frobnicate"], "unknown argument '--frobnicate'"),
        (vec!["mode=run jobs"], "bad parameter"),
        (vec!["Mode=run"], "bad parameter"),
        (vec!["--mem", "lots"], "--mem needs a number"),
        (vec!["--wait", "soon"], "--wait needs a number"),
        (
            vec!["--socket", socket, "hugepages=200"],
            "does not fit in --mem 256",
        ),
        (
            vec!["--socket", outside.to_str().unwrap()],
            "is outside the chroot",
        ),
        (
            vec!["--wait", "0", "--socket", &format!("{socket}.missing")],
            "no socket at",
        ),
    ] {
        let err = boot_refused(&args);
        assert!(err.contains(message), "{args:?}: {err}");
    }

    let image = Command::new("bash")
        .arg(repo().join("scripts/guest-image.sh"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(image.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&image.stderr).contains("unknown argument '--frobnicate'"));

    // A job list the guest tool cannot parse: the guest still boots, reports
    // the error as its result, powers off, and the instance ran nothing.
    // Booted from another directory: `--log` is taken from there, and
    // `--append` reaches the kernel command line the tool reads.
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .current_dir(cwd.path())
        .arg(repo().join("scripts/guest-boot.sh"))
        .args(["--no-build", "--socket", socket, "--log", "console.txt"])
        .args([
            "--append",
            "wdvirt.seed=3",
            "mode=run",
            "jobs=gzip,bogus",
            "size=1M",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let console = std::fs::read_to_string(cwd.path().join("console.txt")).unwrap();
    assert_eq!(
        console,
        String::from_utf8_lossy(&out.stdout),
        "--log holds the console"
    );
    assert!(
        console.contains("from /proc/cmdline: run --jobs gzip,bogus --size 1M --seed 3"),
        "{console}"
    );
    let line = console
        .lines()
        .find_map(|l| l.strip_prefix("WDVIRT-RESULT "))
        .unwrap_or_else(|| panic!("no result:\n{console}"));
    let result: Value = serde_json::from_str(line).unwrap();
    assert_eq!(result["ok"], false);
    let error = result["error"].as_str().unwrap();
    assert!(error.contains("unknown job \"bogus\""), "{error}");
    let reports = server.stop();
    assert_eq!(host_jobs(&reports[0]), (0, 0));
}
