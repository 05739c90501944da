//! The libvirt hook as libvirt runs it: `wdvirt hook qemu NAME OPERATION
//! SUBOPERATION EXTRA` as a process, the domain XML libvirt 11.3 passed to
//! a hook here (recorded in `tests/libvirt/`) on stdin, against a real
//! `wdvirt daemon`; what the daemon holds afterwards is read back with the
//! CLI. The `#[ignore]`d test at the end runs a real libvirtd (see there).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wdvirt::vmm::{GuestRam, LoopbackVmm};

mod common;

use common::daemon::{Daemon, wdvirt};

/// One soft accelerator of 8 queue pairs: two `quad` instances fit.
const SMALL_HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 1
    queue_pairs: 8
    operations: [all]
    pasids: 8
qos_policies:
  - name: silver
    weight: 100
  - name: gold
    weight: 400
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

fn recorded(file: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/libvirt")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A recorded domain's XML with its wdvirt metadata asking for `count` of
/// `ty`, and its `<qemu:commandline>` naming their sockets in `run_dir`.
fn asking(file: &str, ty: &str, count: u32, run_dir: &Path) -> String {
    let xml = recorded(file);
    let name = xml
        .split_once("<name>")
        .and_then(|(_, r)| r.split_once("</name>"))
        .unwrap()
        .0
        .to_string();
    let xml = replace_between(
        &xml,
        "<wdvirt:instance ",
        "/>",
        &format!("<wdvirt:instance type='{ty}' count='{count}'/>"),
    );
    let args: String = (0..count)
        .map(|i| {
            let path = run_dir.join(format!("{name}-wd{i}.sock"));
            format!(
                "<qemu:arg value='-device'/><qemu:arg value='{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{}\"}}}}'/>",
                path.display()
            )
        })
        .collect();
    let cmdline = format!("<qemu:commandline>{args}</qemu:commandline>");
    if xml.contains("<qemu:commandline>") {
        replace_between(&xml, "<qemu:commandline>", "</qemu:commandline>", &cmdline)
    } else {
        xml.replacen(
            "<domain ",
            "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' ",
            1,
        )
        .replacen("</domain>", &format!("{cmdline}</domain>"), 1)
    }
}

/// `s` with the first `start ... end` (inclusive) replaced.
fn replace_between(s: &str, start: &str, end: &str, with: &str) -> String {
    let a = s.find(start).unwrap_or_else(|| panic!("no {start} in {s}"));
    let b = a + s[a..].find(end).unwrap() + end.len();
    format!("{}{with}{}", &s[..a], &s[b..])
}

fn daemon() -> Daemon {
    Daemon::start(SMALL_HOST)
}

impl Daemon {
    fn hook(&self, name: &str, op: &str, sub: &str, xml: &str) -> Output {
        hook_at(&self.api(), &[name, op, sub, "-"], xml)
    }
}

/// The hook as a process with `xml` on stdin, against the API at `api`.
fn hook_at(api: &Path, args: &[&str], xml: &str) -> Output {
    let mut child = wdvirt()
        .arg("--api")
        .arg(api)
        .args(["hook", "qemu"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "the hook failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libvirt reads a hook's stdout as XML for some operations.
    assert!(out.stdout.is_empty(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn refused(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An API socket path nothing listens on: a hook that reaches for the
/// daemon there fails to connect, so succeeding proves it did not.
fn no_daemon() -> PathBuf {
    PathBuf::from("/nonexistent/wdvirt/api.sock")
}

fn attach(socket: &Path) -> LoopbackVmm {
    LoopbackVmm::connect(socket, GuestRam::new(common::RAM_BASE, 1 << 20).unwrap()).unwrap()
}

fn wait_state(d: &Daemon, name: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = d.json(&["list", "--defined"]);
        if let Some(i) = v.as_array().unwrap().iter().find(|i| i["name"] == name)
            && i["state"] == state
        {
            return i.clone();
        }
        assert!(Instant::now() < deadline, "{name} never {state}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn prepare_started_release_define_start_record_and_remove_the_domains_instances() {
    let d = daemon();
    assert_eq!(d.available("quad"), 2);
    let xml = asking("prepare-begin.xml", "quad", 1, &d.run_dir());
    let said = ok(&d.hook("rec1", "prepare", "begin", &xml));
    assert!(
        said.contains("started rec1-wd0 (quad) for domain 'rec1'"),
        "{said}"
    );
    let list = d.json(&["list"]);
    let inst = &list[0];
    assert_eq!(inst["name"], "rec1-wd0");
    assert_eq!(inst["vm"], "rec1", "{inst}");
    assert_eq!(inst["state"], "started");
    assert_eq!(inst["auto"], false);
    let socket = d.run_dir().join("rec1-wd0.sock");
    assert_eq!(inst["socket"], socket.to_str().unwrap());
    assert_eq!(d.available("quad"), 1);

    // QEMU connects, then libvirt says the domain has started.
    let vmm = attach(&socket);
    wait_state(&d, "rec1-wd0", "attached");
    let started = asking("started-begin.xml", "quad", 1, &d.run_dir()).replace("rec2", "rec1");
    let said = ok(&d.hook("rec1", "started", "begin", &started));
    assert!(
        said.contains("rec1-wd0 attached to domain 'rec1'"),
        "{said}"
    );
    assert_eq!(d.json(&["list"])[0]["vm"], "rec1");

    // QEMU gone, libvirt releases the domain.
    drop(vmm);
    let release = asking("release-end.xml", "quad", 1, &d.run_dir());
    let said = ok(&d.hook("rec1", "release", "end", &release));
    assert!(said.contains("released rec1-wd0"), "{said}");
    assert!(d.defined().is_empty(), "nothing left defined");
    assert_eq!(d.available("quad"), 2, "its queues back in the pool");
    // A second release (libvirt calls it after a failed prepare too) is
    // harmless.
    let said = ok(&d.hook("rec1", "release", "end", &release));
    assert!(said.contains("already gone"), "{said}");
}

#[test]
fn restore_prepares_like_prepare_and_a_leftover_from_an_earlier_run_is_made_afresh() {
    let d = daemon();
    let xml = asking("prepare-begin.xml", "hash", 2, &d.run_dir());
    ok(&d.hook("rec1", "restore", "begin", &xml));
    let first: Vec<_> = d.defined().iter().map(|i| i["uuid"].clone()).collect();
    assert_eq!(first.len(), 2);
    // libvirtd died before `release`: the next prepare finds them.
    let said = ok(&d.hook("rec1", "prepare", "begin", &xml));
    assert!(
        said.contains("removed rec1-wd0 left from an earlier run"),
        "{said}"
    );
    let again = d.defined();
    assert_eq!(again.len(), 2);
    assert!(
        again
            .iter()
            .all(|i| i["state"] == "started" && !first.contains(&i["uuid"]))
    );
}

#[test]
fn a_domain_asking_for_more_than_fits_fails_and_leaves_nothing_allocated() {
    let d = daemon();
    let xml = asking("prepare-begin.xml", "quad", 3, &d.run_dir());
    let err = refused(&d.hook("rec1", "prepare", "begin", &xml));
    assert!(err.contains("prepare begin refused"), "{err}");
    assert!(
        err.contains("instance rec1-wd2: cannot place instance 'rec1-wd2'"),
        "{err}"
    );
    // The two that fitted were undone.
    assert!(d.defined().is_empty(), "{:?}", d.defined());
    assert_eq!(d.available("quad"), 2);
    assert_eq!(d.json(&["accelerators"])[0]["pasids"]["used"], 0);
}

#[test]
fn unknown_types_and_policies_fail_prepare_with_the_daemons_message() {
    let d = daemon();
    let xml = asking("prepare-begin.xml", "nosuch", 1, &d.run_dir());
    let err = refused(&d.hook("rec1", "prepare", "begin", &xml));
    assert!(
        err.contains("unknown instance type 'nosuch' (known: hash, quad)"),
        "{err}"
    );
    let xml = asking("prepare-begin.xml", "quad", 1, &d.run_dir())
        .replace("count='1'/>", "count='1' qos='platinum'/>");
    let err = refused(&d.hook("rec1", "prepare", "begin", &xml));
    assert!(err.contains("unknown QoS policy 'platinum'"), "{err}");
    // The VM's name lands in listings and logs: bounded, no control
    // characters (XML allows a tab in a name).
    let snippet = |domain: &str| {
        let out = wdvirt()
            .args(["libvirt", "snippet", "--type", "hash", "--domain", domain])
            .arg("--run-dir")
            .arg(d.run_dir())
            .output()
            .unwrap();
        format!(
            "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>{domain}</name>{}</domain>",
            String::from_utf8(out.stdout).unwrap()
        )
    };
    let err = refused(&d.hook("a\tb", "prepare", "begin", &snippet("a\tb")));
    assert!(err.contains("no control characters"), "{err}");
    let long = "v".repeat(300);
    let err = refused(&d.hook(&long, "prepare", "begin", &snippet(&long)));
    assert!(err.contains("must be 1-256 bytes"), "{err}");
    assert!(d.defined().is_empty());
}

#[test]
fn bad_metadata_and_bad_xml_fail_prepare_and_spare_a_running_domain_before_any_daemon_call() {
    let run = PathBuf::from("/run/wdvirt");
    let good = asking("prepare-begin.xml", "quad", 1, &run);
    let cases = [
        (
            good[..good.len() / 2].to_string(),
            "the domain XML is not well-formed",
        ),
        (
            good.replace("count='1'", "count='lots'"),
            "count=\"lots\": a whole number from 1 to 16",
        ),
        (
            good.replace("count='1'", "count='1' colour='red'"),
            "unknown attribute 'colour'",
        ),
        (
            good.replace("type='quad' ", ""),
            "has no type=\"...\" attribute",
        ),
        (
            good.replace("<wdvirt:instance ", "<wdvirt:device "),
            "<wdvirt:device> is not a wdvirt metadata element",
        ),
        (
            replace_between(&good, "<memoryBacking>", "</memoryBacking>", ""),
            "its guest RAM is not shared",
        ),
        (
            replace_between(&good, "<qemu:commandline>", "</qemu:commandline>", ""),
            "adds no vfio-user-pci device at a socket named rec1-wd0.sock",
        ),
        (String::new(), "not well-formed"),
    ];
    for (xml, want) in cases {
        for op in ["prepare", "restore"] {
            let err = refused(&hook_at(&no_daemon(), &["rec1", op, "begin", "-"], &xml));
            assert!(err.contains(want), "{op}: {want:?} not in {err}");
            assert!(
                err.contains("domain 'rec1'") || err.contains("domain rec1"),
                "{err}"
            );
            assert!(!err.contains("cannot reach"), "no daemon call: {err}");
            // The parser's message once, not again as its cause.
            if let Some((_, tail)) = err.split_once("not well-formed: ") {
                let detail = tail.trim().split(": ").next().unwrap();
                assert_eq!(err.matches(detail).count(), 1, "{err}");
            }
        }
        // Under a running domain (its metadata changed live, or it started
        // before the hook was installed) the hook says so and succeeds:
        // libvirt would kill the domain for a failing `started` or
        // `reconnect`.
        let prepare_only = want.contains("not shared") || want.contains("adds no vfio-user-pci");
        for op in ["started", "reconnect"]
            .into_iter()
            .filter(|_| !prepare_only)
        {
            let said = ok(&hook_at(&no_daemon(), &["rec1", op, "begin", "-"], &xml));
            assert!(said.contains(want), "{op}: {want:?} not in {said}");
            assert!(said.contains("nothing done"), "{said}");
            assert!(!said.contains("cannot reach"), "no daemon call: {said}");
        }
    }
}

#[test]
fn a_domain_without_wdvirt_metadata_costs_no_daemon_call_in_any_operation() {
    let plain = replace_between(
        &recorded("prepare-begin.xml"),
        "<metadata>",
        "</metadata>",
        "",
    );
    for (op, sub) in [
        ("prepare", "begin"),
        ("start", "begin"),
        ("started", "begin"),
        ("stopped", "end"),
        ("release", "end"),
        ("reconnect", "begin"),
        ("restore", "begin"),
        ("migrate", "begin"),
        ("attach", "begin"),
    ] {
        let said = ok(&hook_at(&no_daemon(), &["rec1", op, sub, "-"], &plain));
        assert!(said.is_empty(), "{op}: {said}");
    }
    // Operations the hook does not act on do not even read the XML.
    ok(&hook_at(
        &no_daemon(),
        &["rec1", "stopped", "end", "-"],
        "<<garbage",
    ));
}

#[test]
fn prepare_with_no_daemon_says_where_it_looked() {
    let xml = asking("prepare-begin.xml", "quad", 1, Path::new("/run/wdvirt"));
    let err = refused(&hook_at(
        &no_daemon(),
        &["rec1", "prepare", "begin", "-"],
        &xml,
    ));
    assert!(
        err.contains("cannot reach the wdvirt daemon at /nonexistent/wdvirt/api.sock"),
        "{err}"
    );
}

#[test]
fn migrate_is_refused_with_the_reason_and_no_daemon_call() {
    let xml = asking("prepare-begin.xml", "quad", 2, Path::new("/run/wdvirt"));
    let err = refused(&hook_at(
        &no_daemon(),
        &["rec1", "migrate", "begin", "-"],
        &xml,
    ));
    assert!(
        err.contains("migrate begin refused: domain 'rec1' cannot be migrated"),
        "{err}"
    );
    assert!(err.contains("rec1-wd0, rec1-wd1"), "{err}");
    assert!(
        err.contains("QEMU 11.1's vfio-user-pci cannot carry a vfio-user device's state"),
        "{err}"
    );
}

#[test]
fn reconnect_leaves_running_instances_alone_adopts_known_ones_and_never_fails() {
    let d = daemon();
    let xml = asking("prepare-begin.xml", "quad", 1, &d.run_dir());
    ok(&d.hook("rec1", "prepare", "begin", &xml));
    let socket = d.run_dir().join("rec1-wd0.sock");
    let vmm = attach(&socket);
    let before = wait_state(&d, "rec1-wd0", "attached");
    let reconnect = asking("reconnect-begin.xml", "quad", 1, &d.run_dir()).replace("rec2", "rec1");
    let said = ok(&d.hook("rec1", "reconnect", "begin", &reconnect));
    assert!(
        said.contains("rec1-wd0 is attached; left as it is"),
        "{said}"
    );
    let after = wait_state(&d, "rec1-wd0", "attached");
    for k in ["uuid", "pasid", "socket", "placement"] {
        assert_eq!(before[k], after[k], "{k}");
    }
    assert_eq!(
        after["report"]["connections"], 1,
        "the VMM's connection kept"
    );
    drop(vmm);

    // An instance the daemon knows under the domain's name but without a
    // VM (defined by hand) is adopted; a missing one is reported.
    let out = wdvirt()
        .arg("--api")
        .arg(d.api())
        .args(["define", "--type", "hash", "--name", "rec2-wd0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rec2 = asking("reconnect-begin.xml", "hash", 2, &d.run_dir());
    let said = ok(&d.hook("rec2", "reconnect", "begin", &rec2));
    assert!(said.contains("adopted rec2-wd0 (defined)"), "{said}");
    assert!(
        said.contains("rec2-wd1: the daemon has no such instance"),
        "{said}"
    );
    let adopted = d
        .defined()
        .into_iter()
        .find(|i| i["name"] == "rec2-wd0")
        .unwrap();
    assert_eq!(adopted["vm"], "rec2");

    // With no daemon at all, reconnect still succeeds (a failing reconnect
    // hook makes libvirt kill the domain).
    let said = ok(&hook_at(
        &no_daemon(),
        &["rec1", "reconnect", "begin", "-"],
        &reconnect,
    ));
    assert!(said.contains("cannot ask the daemon"), "{said}");
}

#[test]
fn an_instance_not_made_for_the_domain_is_never_taken_or_released() {
    let d = daemon();
    let out = wdvirt()
        .arg("--api")
        .arg(d.api())
        .args(["define", "--type", "hash", "--name", "rec1-wd0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let xml = asking("prepare-begin.xml", "quad", 1, &d.run_dir());
    let err = refused(&d.hook("rec1", "prepare", "begin", &xml));
    assert!(
        err.contains(
            "the wdvirt instance name rec1-wd0 is taken by an instance an operator defined"
        ),
        "{err}"
    );
    let said = ok(&d.hook("rec1", "release", "end", &xml));
    assert!(
        said.contains("rec1-wd0: not made for domain 'rec1'; left alone"),
        "{said}"
    );
    let left = d.defined();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["type"], "hash", "the operator's instance as it was");
}

#[test]
fn started_labels_only_an_instance_of_its_own_domain_or_of_none() {
    let d = daemon();
    d.json(&[
        "define", "--type", "hash", "--name", "rec1-wd0", "--vm", "other",
    ]);
    let xml = asking("prepare-begin.xml", "quad", 1, &d.run_dir());
    let said = ok(&d.hook("rec1", "started", "begin", &xml));
    assert!(
        said.contains("rec1-wd0: belongs to VM 'other', not 'rec1'; left alone"),
        "{said}"
    );
    assert_eq!(
        d.defined()[0]["vm"],
        "other",
        "another VM's instance keeps its VM"
    );
    // One of no VM's is the domain's from now on (as at reconnect).
    d.json(&["modify", "rec1-wd0", "--no-vm"]);
    let said = ok(&d.hook("rec1", "started", "begin", &xml));
    assert!(said.contains("rec1-wd0 is defined, not attached"), "{said}");
    assert_eq!(d.defined()[0]["vm"], "rec1");
}

#[test]
fn an_operator_labels_an_instance_with_its_vm_through_the_cli() {
    let d = daemon();
    let cli = |args: &[&str]| {
        wdvirt()
            .arg("--api")
            .arg(d.api())
            .args(args)
            .output()
            .unwrap()
    };
    assert!(
        cli(&["define", "--type", "hash", "--name", "h1", "--vm", "db 1"])
            .status
            .success()
    );
    assert_eq!(d.defined()[0]["vm"], "db 1");
    assert!(cli(&["modify", "h1", "--vm", "db-2"]).status.success());
    assert_eq!(d.defined()[0]["vm"], "db-2");
    assert!(cli(&["modify", "h1", "--no-vm"]).status.success());
    assert!(d.defined()[0].get("vm").is_none(), "{:?}", d.defined());
    let bad = cli(&["modify", "h1", "--vm", ""]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be 1-256 bytes"));
    let both = cli(&["modify", "h1", "--vm", "x", "--no-vm"]);
    assert_eq!(both.status.code(), Some(2), "clap refuses both");
}

#[test]
fn the_snippet_gives_a_domain_that_the_hook_prepares_at_the_sockets_it_names() {
    let d = daemon();
    let out = wdvirt()
        .args([
            "libvirt", "snippet", "--type", "hash", "--count", "2", "--domain", "web 1", "--qos",
            "gold",
        ])
        .arg("--run-dir")
        .arg(d.run_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let snippet = String::from_utf8(out.stdout).unwrap();
    let xml = format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>web 1</name>{snippet}</domain>"
    );
    ok(&d.hook("web 1", "prepare", "begin", &xml));
    let list = d.json(&["list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    for i in list {
        assert_eq!(i["vm"], "web 1");
        assert_eq!(i["qos"], "gold");
        let socket = PathBuf::from(i["socket"].as_str().unwrap());
        assert!(
            snippet.contains(socket.to_str().unwrap()),
            "{socket:?} in\n{snippet}"
        );
        assert!(socket.exists());
    }
    let bad = wdvirt()
        .args(["libvirt", "snippet", "--type", "hash", "--count", "17"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("17 is not in 1..=16"),
        "{bad:?}"
    );
}

#[test]
fn install_hook_writes_a_script_that_libvirt_can_run_and_is_idempotent() {
    let d = daemon();
    let hooks = tempfile::tempdir().unwrap();
    let install = || {
        wdvirt()
            .arg("--api")
            .arg(d.api())
            .args(["libvirt", "install-hook", "--hooks-dir"])
            .arg(hooks.path())
            .output()
            .unwrap()
    };
    let first = install();
    assert!(first.status.success(), "{first:?}");
    let script = hooks.path().join("qemu.d/wdvirt");
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        script.to_str().unwrap()
    );
    assert!(String::from_utf8_lossy(&first.stderr).contains("installed"));
    let second = install();
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("is up to date"),
        "{second:?}"
    );

    // Run as libvirt runs it: argv, XML on stdin, an environment of its own.
    let xml = asking("prepare-begin.xml", "hash", 1, &d.run_dir());
    let mut child = Command::new(&script)
        .args(["rec1", "prepare", "begin", "-"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    ok(&child.wait_with_output().unwrap());
    assert_eq!(d.json(&["list"])[0]["vm"], "rec1");
}

// ---------------------------------------------------------------------
// A real libvirtd: libvirt 11.3 in the trixie chroot beside QEMU 11.1
// (`scripts/qemu-chroot.sh libvirt`), the hook installed there with
// `wdvirt libvirt install-hook`, a `wdvirt daemon` on the host serving its
// API and instance sockets inside the chroot's /run, the wdvirt binary
// linked into the same directory so the hook (run by libvirtd inside the
// chroot) finds both.

/// What QEMU boots (`scripts/guest-image.sh`), as seen inside the chroot.
const IMAGE_IN: &str = "/var/lib/wdvirt-guest";
const GUEST_JOBS: &str = "crc32c,sha256,gzip";
/// The destination libvirtd's host name.
const DESTINATION: &str = "wdvirt-dst";

fn chroot_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("WDVIRT_CHROOT").unwrap_or_else(|| "/var/tmp/wdvirt-trixie".into()),
    )
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// CMD inside the chroot (`scripts/qemu-chroot.sh run`, with sysfs).
fn in_chroot(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("bash")
        .arg(repo().join("scripts/qemu-chroot.sh"))
        .args(["run", "--"])
        .args(args)
        .env("SYSFS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn virsh(args: &[&str]) -> Output {
    let mut a = vec!["virsh", "-c", "qemu:///system"];
    a.extend_from_slice(args);
    in_chroot(&a, None)
}

fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(out.status.success(), "virsh {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The process a pid file names, if it is alive.
fn running_pid(pidfile: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn stop_pid(pid: i32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::TERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}/exe")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Libvirt {
    chroot: PathBuf,
    /// The test's directory, on the host and inside the chroot.
    dir: tempfile::TempDir,
    dir_in: String,
    daemon: Child,
    hook: PathBuf,
    recorder: PathBuf,
    domains: Vec<String>,
}

impl Libvirt {
    fn start() -> Libvirt {
        let chroot = chroot_dir();
        assert!(
            chroot.join("var/lib/wdvirt-guest/initrd.cpio").exists(),
            "no guest image: run `bash scripts/guest-image.sh` (scripts/test.sh does)"
        );
        assert!(
            chroot.join("usr/sbin/libvirtd").exists(),
            "no libvirt in the chroot: run `bash scripts/qemu-chroot.sh libvirt` (scripts/test.sh does)"
        );
        // A libvirtd left by an earlier run would not see the hooks below.
        if let Some(pid) = running_pid(&chroot.join("run/libvirtd.pid")) {
            stop_pid(pid);
        }
        let dir = tempfile::Builder::new()
            .prefix("wdvirt-lv-")
            .tempdir_in(chroot.join("run"))
            .unwrap();
        let dir_in = format!("/run/{}", dir.path().file_name().unwrap().to_str().unwrap());
        std::fs::write(dir.path().join("host.yaml"), SMALL_HOST).unwrap();
        // The hook runs inside the chroot: the binary goes where it can see it.
        let bin = dir.path().join("wdvirt");
        std::fs::hard_link(env!("CARGO_BIN_EXE_wdvirt"), &bin)
            .or_else(|_| std::fs::copy(env!("CARGO_BIN_EXE_wdvirt"), &bin).map(drop))
            .unwrap();
        let daemon = wdvirt()
            .arg("daemon")
            .arg("--config")
            .arg(dir.path().join("host.yaml"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path())
            .arg("--api")
            .arg(dir.path().join("api.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let hooks = chroot.join("etc/libvirt/hooks");
        let out = wdvirt()
            .arg("--api")
            .arg(format!("{dir_in}/api.sock"))
            .args(["libvirt", "install-hook", "--hooks-dir"])
            .arg(&hooks)
            .arg("--wdvirt")
            .arg(format!("{dir_in}/wdvirt"))
            .output()
            .unwrap();
        assert!(out.status.success(), "install-hook: {out:?}");
        let hook = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        // Beside it, a recorder of every call libvirt makes (libvirt runs
        // every script in qemu.d in name order; this one first, so that it
        // sees the calls wdvirt's hook fails too).
        let recorder = hooks.join("qemu.d/00-wdvirt-test-calls");
        std::fs::write(
            &recorder,
            format!(
                "#!/bin/sh\ncat >/dev/null\necho \"$(hostname) $*\" >>{dir_in}/hook-calls.log\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&recorder, std::fs::Permissions::from_mode(0o755)).unwrap();
        let lv = Libvirt {
            chroot,
            dir,
            dir_in,
            daemon,
            hook,
            recorder,
            domains: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(lv.api()).is_err() {
            assert!(Instant::now() < deadline, "the daemon never answered");
            std::thread::sleep(Duration::from_millis(10));
        }
        lv.start_libvirtd();
        lv
    }

    fn api(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn start_libvirtd(&self) {
        let out = in_chroot(
            &["/bin/sh", "-c", "virtlogd -d 2>/dev/null; libvirtd -d"],
            None,
        );
        assert!(out.status.success(), "libvirtd -d: {out:?}");
        let sock = self.chroot.join("run/libvirt/libvirt-sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "libvirtd never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_libvirtd(&self) {
        if let Some(pid) = running_pid(&self.chroot.join("run/libvirtd.pid")) {
            stop_pid(pid);
        }
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = wdvirt()
            .arg("--api")
            .arg(self.api())
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn defined(&self) -> Vec<String> {
        let v = self.json(&["list", "--defined"]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn instance(&self, name: &str) -> Value {
        let v = self.json(&["list", "--defined"]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {v}"))
            .clone()
    }

    fn available(&self) -> u64 {
        let types = self.json(&["types"]);
        types
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "quad")
            .unwrap()["available_instances"]
            .as_u64()
            .unwrap()
    }

    /// Defines a domain whose fragments come from `wdvirt libvirt snippet`
    /// (then `edit`ed), with the guest tool running `params`.
    fn define(&mut self, name: &str, count: u32, params: &str, edit: impl Fn(String) -> String) {
        let out = wdvirt()
            .args(["libvirt", "snippet", "--type", "quad", "--domain", name])
            .args(["--count", &count.to_string(), "--run-dir", &self.dir_in])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let snippet = edit(String::from_utf8(out.stdout).unwrap());
        let dir_in = &self.dir_in;
        let xml = format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <cpu mode='maximum'/>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{IMAGE_IN}/vmlinuz</kernel>
    <initrd>{IMAGE_IN}/initrd.cpio</initrd>
    <cmdline>console=ttyS0 quiet loglevel=1 panic=-1 hugepages=8 {params}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{dir_in}/{name}.console'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
{snippet}</domain>
"
        );
        let file = self.dir.path().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        virsh_ok(&["define", &format!("{}/{name}.xml", self.dir_in)]);
        self.domains.push(name.into());
    }

    fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.console"))).unwrap_or_default()
    }

    /// Waits for a console line starting with `prefix`.
    fn wait_console(&self, name: &str, prefix: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let text = self.console(name);
            if let Some(l) = text.lines().find(|l| l.starts_with(prefix)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} on {name}'s console after {secs} s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A second libvirtd in the chroot, standing in for another host: its
    /// own UTS namespace (host name), and tmpfs over libvirt's state and
    /// configuration directories (a copy, with another host UUID and its
    /// sockets in the test's directory). Returns its URI.
    fn start_destination(&self) -> String {
        let dst_in = format!("{}/dst", self.dir_in);
        std::fs::create_dir_all(self.dir.path().join("dst")).unwrap();
        let script = format!(
            "set -e
hostname {DESTINATION}
cp -a /etc/libvirt {dst_in}/etc
for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /etc/libvirt; do
  mkdir -p $d && mount -t tmpfs tmpfs $d
done
cp -a {dst_in}/etc/. /etc/libvirt/
echo 'host_uuid = \"6b1f0c1e-6a4e-4d0e-9a57-2d1e0e5f0a01\"' >>/etc/libvirt/libvirtd.conf
echo 'unix_sock_dir = \"{dst_in}\"' >>/etc/libvirt/libvirtd.conf
mkdir -p /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu /run/libvirt/qemu
virtlogd -d -p {dst_in}/virtlogd.pid
libvirtd -d -p {dst_in}/libvirtd.pid
"
        );
        let out = in_chroot(&["unshare", "--uts", "/bin/sh", "-c", &script], None);
        assert!(out.status.success(), "the destination libvirtd: {out:?}");
        let sock = self.dir.path().join("dst/libvirt-sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the destination never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        format!("qemu+unix:///system?socket={dst_in}/libvirt-sock")
    }

    fn wait_call(&self, call: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.calls().contains(call) {
            assert!(
                Instant::now() < deadline,
                "libvirt never called the hook with {call:?}:\n{}",
                self.calls()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hook-calls.log")).unwrap_or_default()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for d in &self.domains {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d]);
        }
        self.stop_libvirtd();
        let dst = self.dir.path().join("dst");
        for pidfile in [
            self.chroot.join("run/virtlogd.pid"),
            dst.join("libvirtd.pid"),
            dst.join("virtlogd.pid"),
        ] {
            if let Some(pid) = running_pid(&pidfile) {
                stop_pid(pid);
            }
        }
        let _ = std::fs::remove_file(&self.hook);
        let _ = std::fs::remove_file(&self.recorder);
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The daemon's jobs for one instance: completed ok and failed.
fn host_jobs(inst: &Value) -> (u64, u64) {
    inst["report"]["queues"]
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

/// The guest's results equal what the host computes for the same bytes.
fn assert_guest_results(result: &Value, seed: u64, size: usize) -> u64 {
    use wdvirt::accel::ops;
    assert_eq!(result["ok"], true, "{result}");
    let data = wdvirt_guest::workload::gen_data(seed, size);
    let jobs: Vec<&str> = result["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert_eq!(jobs, GUEST_JOBS.split(',').collect::<Vec<_>>());
    for job in result["results"].as_array().unwrap() {
        assert_eq!(job["ok"], true, "{job}");
        match job["job"].as_str().unwrap() {
            "crc32c" => assert_eq!(job["crc32c"], format!("{:08x}", ops::crc32c(&data))),
            "sha256" => {
                let mut digest = [0u8; 32];
                ops::sha256(&data, &mut digest).unwrap();
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(job["sha256"], hex);
            }
            _ => assert_eq!(job["roundtrip_ok"], true, "{job}"),
        }
    }
    result["totals"]["device_jobs"].as_u64().unwrap()
}

#[test]
#[ignore = "runs libvirtd and a Linux guest in the trixie chroot: needs root, scripts/qemu-chroot.sh libvirt and scripts/guest-image.sh; scripts/test.sh runs it"]
fn a_real_libvirtd_gives_a_guest_its_instance_and_refuses_what_wdvirt_cannot_do() {
    let mut lv = Libvirt::start();
    let before = lv.available();
    assert_eq!(before, 2);

    // 1. A domain asking for one instance starts; the guest finds the
    // device and runs jobs. libvirtd is restarted while it does.
    let a = "wdvirt-lv-a";
    let params = format!(
        "wdvirt.mode=run wdvirt.jobs={GUEST_JOBS} wdvirt.size=2M wdvirt.seed=9 wdvirt.shell=1"
    );
    lv.define(a, 1, &params, |s| s);
    let t = Instant::now();
    virsh_ok(&["start", a]);
    let inst = format!("{a}-wd0");
    let first = lv.instance(&inst);
    assert_eq!(first["vm"], a);
    assert_eq!(lv.available(), before - 1);
    lv.wait_console(a, "wdvirt-guest: found", 120);
    let attached = lv.instance(&inst);
    assert_eq!(attached["state"], "attached", "{attached}");

    lv.stop_libvirtd();
    lv.start_libvirtd();
    // libvirtd reconnects to its domains in threads of their own, after it
    // answers on its socket.
    lv.wait_call(&format!("{a} reconnect begin"));
    assert_eq!(virsh_ok(&["domstate", a]).trim(), "running");

    let line = lv.wait_console(a, "WDVIRT-RESULT ", 240);
    let result: Value = serde_json::from_str(line.strip_prefix("WDVIRT-RESULT ").unwrap()).unwrap();
    let device_jobs = assert_guest_results(&result, 9, 2 << 20);
    eprintln!(
        "guest started by libvirtd ran {device_jobs} device jobs, verified, in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let after = lv.instance(&inst);
    assert_eq!(after["vm"], a, "listed under the domain's name");
    assert_eq!(after["state"], "attached");
    for k in ["uuid", "pasid", "socket", "placement"] {
        assert_eq!(after[k], first[k], "{k} changed across libvirtd's restart");
    }
    assert_eq!(after["report"]["connections"], 1, "QEMU's one connection");
    assert_eq!(host_jobs(&after), (device_jobs, 0));
    // `wdvirt stats --vm` shows the guest's jobs under the domain's name.
    let stats = lv.json(&["stats", "--vm", a]);
    let vm = &stats["vms"][0];
    assert_eq!(vm["vm"], a, "{stats}");
    assert_eq!(vm["instances"], serde_json::json!([inst]), "{stats}");
    assert_eq!(vm["totals"]["jobs_ok"], device_jobs, "{stats}");
    assert_eq!(vm["totals"]["jobs_failed"], 0, "{stats}");

    // 2. More than fits: one quad is left, this asks for two.
    let b = "wdvirt-lv-b";
    lv.define(b, 2, "", |s| s);
    let out = virsh(&["start", b]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("cannot place instance '{b}-wd1'")),
        "{err}"
    );
    eprintln!("virsh start {b} (more than fits):\n{}", err.trim());
    assert_eq!(
        lv.defined(),
        std::slice::from_ref(&inst),
        "nothing of {b} left"
    );
    assert_eq!(lv.available(), before - 1);

    // 3. Bad metadata.
    let c = "wdvirt-lv-c";
    lv.define(c, 1, "", |s| {
        s.replace("type='quad'", "type='quad' count='lots'")
    });
    let out = virsh(&["start", c]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("count=\"lots\": a whole number from 1 to 16"),
        "{err}"
    );
    eprintln!("virsh start {c} (bad metadata):\n{}", err.trim());
    assert_eq!(lv.defined(), std::slice::from_ref(&inst));

    // 4. `virsh migrate` of the running domain to a second libvirtd (its
    // own host name, host UUID and state, the same hooks): the destination's
    // hook refuses it, and the source runs on.
    let uri = lv.start_destination();
    let out = virsh(&["migrate", "--live", a, &uri]);
    assert!(!out.status.success(), "{out:?}");
    lv.wait_call(&format!("{DESTINATION} {a} migrate begin -"));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("virsh migrate {a}:\n{}", err.trim());
    assert!(
        err.contains(&format!("domain '{a}' cannot be migrated")),
        "{err}"
    );
    assert!(
        err.contains("QEMU 11.1's vfio-user-pci cannot carry"),
        "{err}"
    );
    assert_eq!(virsh_ok(&["domstate", a]).trim(), "running");
    let kept = lv.instance(&inst);
    assert_eq!(kept["state"], "attached");
    assert_eq!(
        (&kept["uuid"], &kept["pasid"]),
        (&first["uuid"], &first["pasid"])
    );
    assert_eq!(host_jobs(&kept), (device_jobs, 0));
    assert_eq!(
        lv.defined(),
        std::slice::from_ref(&inst),
        "the destination made nothing"
    );

    // 5. virsh destroy releases the instance.
    virsh_ok(&["destroy", a]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lv.defined().is_empty() {
        assert!(
            Instant::now() < deadline,
            "not released: {:?}",
            lv.defined()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lv.available(), before);
    let calls = lv.calls();
    for want in [
        format!("{a} prepare begin -"),
        format!("{a} started begin -"),
        format!("{a} reconnect begin -"),
        format!("{a} release end destroyed"),
        format!("{b} release end failed"),
    ] {
        assert!(calls.contains(&want), "{want:?} not in\n{calls}");
    }
}
