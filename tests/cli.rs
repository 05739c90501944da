//! The `wdvirt` binary driven as an operator would: arguments, exit codes,
//! messages, `--json`, and a VMM talking to `wdvirt serve`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_guest::Device;

fn wdvirt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wdvirt"))
}

fn wait_for(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn help_teaches_the_subcommands() {
    let out = wdvirt().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("demo") && text.contains("serve"), "{text}");
    let out = wdvirt().args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("vfio-user-pci") && text.contains("--max-depth"),
        "{text}"
    );
}

#[test]
fn bad_arguments_are_named_in_the_error() {
    for (args, needle) in [
        (
            vec!["serve", "--socket", "/tmp/x.sock", "--max-depth", "3"],
            "power of two",
        ),
        (
            vec!["serve", "--socket", "/tmp/x.sock", "--ops", "crc32c,bogus"],
            "unknown operation 'bogus'",
        ),
        (
            vec!["serve", "--socket", "/tmp/x.sock", "--queues", "0"],
            "--queues",
        ),
        (vec!["serve"], "--socket"),
        (vec!["demo", "--size", "0"], "--size"),
        (vec!["frobnicate"], "frobnicate"),
    ] {
        let out = wdvirt().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// `wdvirt serve --help` states each limit's range in words; the ranges
/// live in `Limits`. The help must say the range the parser enforces: the
/// end of each range is accepted by the parser and one past it refused
/// with the range in the message.
#[test]
fn serve_help_states_the_limit_ranges_the_parser_enforces() {
    use wdvirt::transport::Limits;
    let help = wdvirt().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let ranges: [(&str, u64, u64); 4] = [
        (
            "--max-msg-fds",
            *Limits::MSG_FDS_RANGE.start() as u64,
            *Limits::MSG_FDS_RANGE.end() as u64,
        ),
        (
            "--max-dma-maps",
            *Limits::DMA_MAPS_RANGE.start() as u64,
            *Limits::DMA_MAPS_RANGE.end() as u64,
        ),
        (
            "--max-message-size",
            u64::from(*Limits::MESSAGE_SIZE_RANGE.start()),
            u64::from(*Limits::MESSAGE_SIZE_RANGE.end()),
        ),
        (
            "--message-timeout-ms",
            *Limits::MESSAGE_TIMEOUT_MS_RANGE.start(),
            *Limits::MESSAGE_TIMEOUT_MS_RANGE.end(),
        ),
    ];
    for (flag, lo, hi) in ranges {
        let words = format!("({lo}..={hi})");
        let at = help
            .find(flag)
            .unwrap_or_else(|| panic!("{flag} not in help"));
        let next = help[at + flag.len()..]
            .find("\n  -")
            .map_or(help.len(), |n| at + flag.len() + n);
        assert!(
            help[at..next]
                .split_whitespace()
                .collect::<String>()
                .contains(&words),
            "{flag}'s help does not say {words}: {}",
            &help[at..next]
        );
        let past = (hi + 1).to_string();
        let out = wdvirt()
            .args(["serve", "--socket", "/nonexistent/x.sock", flag, &past])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {past}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains(&format!("{lo}..={hi}")),
            "{flag} {past}: {err}"
        );
    }
}

#[test]
fn demo_json_reports_every_job_verified_and_counted_by_the_device() {
    let out = wdvirt()
        .args([
            "demo",
            "--instances",
            "2",
            "--rounds",
            "2",
            "--size",
            "65536",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let mut pasids = Vec::new();
    for inst in list {
        let jobs = inst["guest"]["jobs"].as_u64().unwrap();
        assert_eq!(jobs, 22);
        assert_eq!(inst["guest"]["verified"], jobs);
        let ok: u64 = inst["device"]["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["jobs_ok"].as_u64().unwrap())
            .sum();
        assert_eq!(ok, jobs, "the device counted what the guest ran");
        pasids.push(inst["device"]["pasid"].as_u64().unwrap());
    }
    assert_ne!(pasids[0], pasids[1], "each instance has its own PASID");
}

#[test]
fn serve_runs_jobs_for_a_vmm_and_reports_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("wd.sock");
    let mut child = wdvirt()
        .args(["serve", "--json", "--queues", "2", "--socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&socket);
    // A second server on the same live socket is refused.
    let second = wdvirt()
        .args(["serve", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    {
        let vmm = Arc::new(
            LoopbackVmm::connect(&socket, GuestRam::new(0x1_0000_0000, 4 << 20).unwrap()).unwrap(),
        );
        let dev = Device::probe(vmm.clone()).unwrap();
        assert_eq!(dev.info().num_queues, 2);
        dev.enable().unwrap();
        let pool = vmm.dma_pool().unwrap();
        let mut q = dev.queue(1, 8, dev.info().cap_ops, &pool).unwrap();
        assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
    }
    let v = common::stop_serve(&mut child);
    assert_eq!(v[0]["name"], "wd", "named after the socket file");
    assert_eq!(v[0]["queues"][1]["jobs_ok"], 1);
    // The refused second server's liveness probe was a connection too.
    assert_eq!(v[0]["connections"], 2);
    assert!(!socket.exists(), "socket removed on exit");
}

#[test]
fn serve_runs_several_instances_on_one_accelerator() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = [dir.path().join("a.sock"), dir.path().join("b.sock")];
    let mut child = wdvirt()
        .args(["serve", "--json", "--engines", "1"])
        .args(
            sockets
                .iter()
                .flat_map(|s| [std::ffi::OsStr::new("--socket"), s.as_os_str()]),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sockets.iter().for_each(|s| wait_for(s));
    // Both guests at once: 3 jobs on a, 5 on b.
    std::thread::scope(|scope| {
        for (socket, jobs) in sockets.iter().zip([3usize, 5]) {
            scope.spawn(move || {
                let ram = GuestRam::new(0x1_0000_0000, 4 << 20).unwrap();
                let vmm = Arc::new(LoopbackVmm::connect(socket, ram).unwrap());
                let dev = Device::probe(vmm.clone()).unwrap();
                dev.enable().unwrap();
                let pool = vmm.dma_pool().unwrap();
                let mut q = dev.queue(0, 8, dev.info().cap_ops, &pool).unwrap();
                for _ in 0..jobs {
                    assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
                }
            });
        }
    });
    let list = common::stop_serve(&mut child);
    assert_eq!(list.len(), 2);
    assert_eq!(
        (&list[0]["name"], &list[1]["name"]),
        (&"a".into(), &"b".into())
    );
    assert_ne!(
        list[0]["pasid"], list[1]["pasid"],
        "each instance has its own PASID"
    );
    assert_eq!(list[0]["queues"][0]["jobs_ok"], 3);
    assert_eq!(list[1]["queues"][0]["jobs_ok"], 5);
}

#[test]
fn serve_refuses_ambiguous_instance_names() {
    for (args, message) in [
        (
            vec![
                "--name",
                "x",
                "--socket",
                "/tmp/a.sock",
                "--socket",
                "/tmp/b.sock",
            ],
            "--name names one instance",
        ),
        (
            vec![
                "--socket",
                "/tmp/one/wd.sock",
                "--socket",
                "/tmp/two/wd.sock",
            ],
            "both name an instance \"wd\"",
        ),
    ] {
        let out = wdvirt().arg("serve").args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

#[test]
fn install_stages_the_binary_unit_man_pages_completions_and_config_and_keeps_an_operators_config() {
    let dest = tempfile::tempdir().unwrap();
    let install = || {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
            .env("DESTDIR", dest.path())
            .env("PREFIX", "/usr")
            .env("WDVIRT_BIN", env!("CARGO_BIN_EXE_wdvirt"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    install();
    let root = dest.path();
    let bin = root.join("usr/bin/wdvirt");
    let help = Command::new(&bin).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("define"));
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/wdvirt.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/wdvirt daemon "), "{unit}");
    for page in [
        "wdvirt.1",
        "wdvirt-daemon.1",
        "wdvirt-define.1",
        "wdvirt-list.1",
    ] {
        let p = root.join("usr/share/man/man1").join(page);
        assert!(
            std::fs::read_to_string(&p).unwrap().contains(".TH"),
            "{}",
            p.display()
        );
    }
    let bash =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/wdvirt")).unwrap();
    assert!(
        bash.contains("undefine") && bash.contains("--defined"),
        "bash completion"
    );
    assert!(root.join("usr/share/zsh/site-functions/_wdvirt").exists());
    assert!(
        root.join("usr/share/fish/vendor_completions.d/wdvirt.fish")
            .exists()
    );
    let config = root.join("etc/wdvirt/default.yaml");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/default.yaml"
    ))
    .unwrap();
    assert_eq!(std::fs::read_to_string(&config).unwrap(), shipped);
    // Run again over an operator's own configuration: it stays.
    let own = shipped.replace("engines: 2", "engines: 1");
    std::fs::write(&config, &own).unwrap();
    install();
    assert_eq!(std::fs::read_to_string(&config).unwrap(), own);
}
