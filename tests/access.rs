//! Who may use a `wdvirt daemon` and its instances, tried as other users
//! would: the CLI and a VMM (`wdvirt demo --connect`) run as `nobody` or
//! `daemon` through `setpriv` (util-linux), against a daemon run as root.
//!
//! * The API socket is 0660 to the API group; a caller outside it is refused
//!   by the filesystem, and, where the socket has been made reachable to
//!   it anyway, by the daemon (403 `forbidden`, counted).
//! * An instance socket is 0600, owned by the VMM's user: that user's VMM
//!   runs jobs, anyone else's is refused at `connect(2)`.
//!
//! * What a VMM may map ends below 2^64: the transport and the device hold
//!   one rule for the address space's last page.
//!
//! Needs root (to switch users), as the rest of the suite does.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;

use serde_json::Value;

mod common;
mod transport_support;

use common::daemon::Daemon;

const HOST: &str = r#"
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
types:
  - name: one
    queues: 1
    operations: [all]
    max_depth: 256
    qos: silver
"#;

/// `nobody`, in `nogroup` only.
const NOBODY: &[&str] = &["--reuid=nobody", "--regid=nogroup", "--clear-groups"];
/// `nobody` with `daemon` as its group and `nogroup` as a supplementary one.
const NOBODY_SUPPLEMENTARY: &[&str] = &["--reuid=nobody", "--regid=daemon", "--groups=nogroup"];
/// `daemon`, in `daemon` only: neither the API group nor an instance owner.
const OUTSIDER: &[&str] = &["--reuid=daemon", "--regid=daemon", "--clear-groups"];

const NOBODY_UID: u32 = 65534;
const NOGROUP_GID: u32 = 65534;

fn needs_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "tests/access.rs switches users with setpriv: run it as root"
    );
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A GET on the API as this (root) process, raw: status and JSON body.
fn get(api: &Path, path: &str) -> (u16, Value) {
    let mut s = std::os::unix::net::UnixStream::connect(api).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: wdvirt\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = &out[out.find("\r\n\r\n").unwrap() + 4..];
    (status, serde_json::from_str(body).unwrap())
}

/// `curl` as another user: the HTTP status and the body.
fn curl_as(who: &[&str], api: &Path, path: &str) -> (String, String) {
    let out = std::process::Command::new("setpriv")
        .args(who)
        .args(["curl", "-sS", "--unix-socket"])
        .arg(api)
        .args(["-w", "\n%{http_code}", &format!("http://wdvirt{path}")])
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = all.rsplit_once('\n').unwrap_or(("", &all));
    (
        code.to_string(),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn the_api_socket_is_0660_to_its_group_and_callers_outside_it_are_refused() {
    needs_root();
    let d = Daemon::builder(HOST)
        .arg("--api-group")
        .arg("nogroup")
        .start();
    d.open_to_other_users();
    let meta = std::fs::metadata(d.api()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(
        meta.gid(),
        NOGROUP_GID,
        "the socket's group is the API group"
    );
    assert_eq!(meta.uid(), 0);

    // In the group, as its primary or as a supplementary group: served.
    for who in [NOBODY, NOBODY_SUPPLEMENTARY] {
        let out = d.cli_as(who, &["types", "--json"]);
        assert!(out.status.success(), "{who:?}: {}", text(&out));
        let types: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(types[0]["name"], "one", "{types}");
    }
    // Outside it: the filesystem refuses the connect, the daemon never
    // hears of the caller.
    let out = d.cli_as(OUTSIDER, &["types"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("cannot reach the wdvirt daemon") && e.contains("Permission denied"),
        "{e}"
    );
    assert_eq!(get(&d.api(), "/v1/access").1["refused_callers"], 0);

    // Made reachable anyway (a chmod, a bind mount into a container): the
    // daemon refuses by the caller's credentials, with the rule, and
    // counts it. Every path, changes and reads alike.
    std::fs::set_permissions(d.api(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = d.cli_as(OUTSIDER, &["types"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("uid 1 (gid 1) may not use the wdvirt API")
            && e.contains("in its API group 'nogroup' (gid 65534)")
            && e.contains("--api-group"),
        "{e}"
    );
    let out = d.cli_as(OUTSIDER, &["define", "--type", "one", "--name", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let (code, body) = curl_as(OUTSIDER, &d.api(), "/metrics");
    assert_eq!(code, "403", "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["kind"], "forbidden", "{body}");
    let (code, _) = curl_as(OUTSIDER, &d.api(), "/no/such/path");
    assert_eq!(code, "403", "refused before routing");
    // Nothing was defined, and the refusals are counted.
    assert!(d.defined().is_empty());
    let (status, access) = get(&d.api(), "/v1/access");
    assert_eq!(status, 200);
    assert_eq!(access["refused_callers"], 4, "{access}");
    assert_eq!(access["api_group"]["name"], "nogroup", "{access}");
    // Root and the group still pass.
    let out = d.cli_as(NOBODY, &["define", "--type", "one", "--name", "ok"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(d.defined().len(), 1);
}

#[test]
fn without_api_group_the_daemons_own_group_is_the_rule() {
    needs_root();
    let d = Daemon::start(HOST);
    d.open_to_other_users();
    let meta = std::fs::metadata(d.api()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);
    std::fs::set_permissions(d.api(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = d.cli_as(NOBODY, &["list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("in its API group 'root' (gid 0)"), "{e}");
    let (_, access) = get(&d.api(), "/v1/access");
    assert_eq!(access["refused_callers"], 1, "{access}");
    assert_eq!(access["instance_owner"]["name"], "root", "{access}");
}

/// `wdvirt demo --connect SOCKET` (an in-process VMM running verified
/// jobs) as another user.
fn vmm_as(who: &[&str], socket: &str) -> Output {
    std::process::Command::new("setpriv")
        .args(who)
        .arg(env!("CARGO_BIN_EXE_wdvirt"))
        .args(["demo", "--json", "--rounds", "1", "--size", "4096"])
        .args(["--connect", socket])
        .output()
        .unwrap()
}

#[test]
fn instance_sockets_are_0600_owned_by_the_vmms_user_and_refuse_everyone_else() {
    needs_root();
    let d = Daemon::builder(HOST)
        .arg("--instance-owner")
        .arg("nobody")
        .start();
    // The daemon's default owner, and one a definition names.
    d.json(&["define", "--type", "one", "--name", "vm1"]);
    d.json(&[
        "define", "--type", "one", "--name", "vm2", "--owner", "daemon",
    ]);
    let v1 = d.json(&["start", "vm1"]);
    let v2 = d.json(&["start", "vm2"]);
    d.open_to_other_users();
    assert_eq!(v1["socket_owner"], "nobody", "{v1}");
    assert_eq!(v2["socket_owner"], "daemon", "{v2}");
    assert_eq!(v2["owner"], "daemon", "{v2}");
    for (v, uid) in [(&v1, NOBODY_UID), (&v2, 1)] {
        let meta = std::fs::metadata(v["socket"].as_str().unwrap()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{v}");
        assert_eq!(meta.uid(), uid, "{v}");
    }
    let s1 = v1["socket"].as_str().unwrap();
    let s2 = v2["socket"].as_str().unwrap();

    // Its owner's VMM connects and runs verified jobs.
    let out = vmm_as(NOBODY, s1);
    assert!(out.status.success(), "{}", text(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r[0]["guest"]["jobs"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r[0]["guest"]["verified"], r[0]["guest"]["jobs"], "{r}");
    // Anyone else's VMM is refused by the filesystem at connect, in
    // either direction; the instance never sees it.
    for (who, socket) in [(OUTSIDER, s1), (NOBODY, s2)] {
        let out = vmm_as(who, socket);
        assert!(!out.status.success(), "{}", text(&out));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("Permission denied"), "{who:?} on {socket}: {e}");
    }
    let list = d.json(&["list"]);
    let connections = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["report"]["connections"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(connections("vm1"), 1, "only its owner's VMM: {list}");
    assert_eq!(connections("vm2"), 0, "{list}");
    let out = vmm_as(OUTSIDER, s2);
    assert!(out.status.success(), "vm2's own user: {}", text(&out));

    // An owner the host does not know is refused at define and modify.
    let e = d.refused(&["define", "--type", "one", "--owner", "no-such-user-wdvirt"]);
    assert!(e.contains("no user named 'no-such-user-wdvirt'"), "{e}");
    let e = d.refused(&["modify", "vm2", "--owner", "no-such-user-wdvirt"]);
    assert!(e.contains("no user named 'no-such-user-wdvirt'"), "{e}");
    // A changed owner holds from the next start: back to the daemon's.
    let v = d.json(&["modify", "vm2", "--default-owner"]);
    assert_eq!(v["owner"], Value::Null, "{v}");
    assert_eq!(v["socket_owner"], "daemon", "until the next start: {v}");
    d.json(&["stop", "vm2"]);
    let v = d.json(&["start", "vm2"]);
    assert_eq!(v["socket_owner"], "nobody", "{v}");
    let meta = std::fs::metadata(v["socket"].as_str().unwrap()).unwrap();
    assert_eq!(meta.uid(), NOBODY_UID);
}

#[test]
fn the_configurations_daemon_section_sets_both_and_flags_override_it() {
    needs_root();
    let yaml = format!("{HOST}daemon:\n  api_group: nogroup\n  instance_owner: nobody\n");
    let d = Daemon::start(&yaml);
    assert_eq!(std::fs::metadata(d.api()).unwrap().gid(), NOGROUP_GID);
    let v = d.json(&["define", "--type", "one", "--name", "vm1"]);
    assert_eq!(v["owner"], Value::Null);
    let v = d.json(&["start", "vm1"]);
    let socket = v["socket"].as_str().unwrap();
    assert_eq!(std::fs::metadata(socket).unwrap().uid(), NOBODY_UID);
    drop(d);
    let d = Daemon::builder(&yaml)
        .arg("--api-group")
        .arg("root")
        .arg("--instance-owner")
        .arg("0")
        .start();
    assert_eq!(std::fs::metadata(d.api()).unwrap().gid(), 0);
    d.json(&["define", "--type", "one", "--name", "vm1"]);
    let v = d.json(&["start", "vm1"]);
    let socket = v["socket"].as_str().unwrap();
    assert_eq!(std::fs::metadata(socket).unwrap().uid(), 0);
    assert_eq!(v["socket_owner"], "root");
}

#[test]
fn an_unknown_api_group_or_owner_stops_the_daemon_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("host.yaml"), HOST).unwrap();
    for (flag, value, says) in [
        (
            "--api-group",
            "no-such-group-wdvirt",
            "the API group (--api-group, daemon: api_group): no group named 'no-such-group-wdvirt'",
        ),
        (
            "--instance-owner",
            "no-such-user-wdvirt",
            "the instance owner (--instance-owner, daemon: instance_owner): no user named 'no-such-user-wdvirt'",
        ),
    ] {
        let out = common::daemon::wdvirt()
            .arg("--api")
            .arg(dir.path().join("api.sock"))
            .arg("daemon")
            .arg("--config")
            .arg(dir.path().join("host.yaml"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .args([flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{}", text(&out));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(says), "{e}");
        assert!(!dir.path().join("api.sock").exists());
    }
    // `--help` says what each does and where else it is set.
    let out = common::daemon::wdvirt()
        .args(["daemon", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--api-group <GROUP|GID>",
        "403",
        "--instance-owner <USER|UID>",
        "0600",
    ] {
        assert!(help.contains(needle), "{needle} not in:\n{help}");
    }
}

/// The last page of the 64-bit address space, through a served instance's
/// socket: refused by the transport with EINVAL (fd-backed or not, the
/// device's own verdict), while the page below it is mapped by both the
/// transport and the device, and unmapped again.
#[test]
fn a_dma_map_reaching_the_end_of_the_address_space_is_refused_and_the_page_below_is_not() {
    use transport_support::{RawClient, borrow, sealed_memfd};
    let dir = tempfile::tempdir().unwrap();
    let accel: wdvirt::accel::SharedAccelerator = wdvirt::accel::soft::SoftAccel::new(1);
    let inst = common::instance(&accel, dir.path(), "edge", 1, Default::default());
    let mut c = RawClient::new(std::os::unix::net::UnixStream::connect(inst.socket()).unwrap());
    c.version();
    const RW: u32 = 3;
    let top = u64::MAX - 0xfff;
    let below = top - 0x1000;
    let ram = [sealed_memfd(0x1000)];
    for (iova, size) in [(top, 0x1000), (below, 0x2000)] {
        assert_eq!(
            c.dma_map(RW, 0, iova, size, &borrow(&ram)).errno(),
            libc::EINVAL
        );
        assert_eq!(c.dma_map(RW, 0, iova, size, &[]).errno(), libc::EINVAL);
    }
    assert_eq!(inst.report().device.dma_maps, 0);
    c.dma_map(RW, 0, below, 0x1000, &borrow(&ram)).ok();
    assert_eq!(inst.report().device.dma_maps, 1, "the device mapped it too");
    c.dma_unmap(0, below, 0x1000).ok();
    assert_eq!(inst.report().device.dma_unmaps, 1);
}

/// A libvirt domain whose XML names the user QEMU runs as (a static DAC
/// label) gets instance sockets owned by that user through the hook; one
/// that does not (libvirt generates a dynamic label only after `prepare`,
/// see `tests/libvirt/prepare-begin.xml`) gets the daemon's
/// `--instance-owner`.
#[test]
fn the_libvirt_hook_gives_a_domains_sockets_to_the_user_its_dac_label_names() {
    needs_root();
    let d = Daemon::start(HOST);
    let domain = |name: &str, seclabel: &str| {
        let socket = d.run_dir().join(format!("{name}-wd0.sock"));
        format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
             <name>{name}</name>\
             <metadata><wdvirt:instances xmlns:wdvirt='http://wdvirt.org/xmlns/libvirt/1'>\
             <wdvirt:instance type='one' count='1'/></wdvirt:instances></metadata>\
             <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\
             {seclabel}\
             <qemu:commandline><qemu:arg value='-device'/>\
             <qemu:arg value='{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{}\"}}}}'/>\
             </qemu:commandline></domain>",
            socket.display()
        )
    };
    let hook = |name: &str, xml: &str| {
        let mut child = common::daemon::wdvirt()
            .arg("--api")
            .arg(d.api())
            .args(["hook", "qemu", name, "prepare", "begin", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(xml.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    hook(
        "dom1",
        &domain(
            "dom1",
            "<seclabel type='static' model='dac' relabel='yes'><label>nobody:nogroup</label></seclabel>",
        ),
    );
    hook("dom2", &domain("dom2", ""));
    let owner = |name: &str| {
        std::fs::metadata(d.run_dir().join(format!("{name}-wd0.sock")))
            .unwrap()
            .uid()
    };
    assert_eq!(owner("dom1"), NOBODY_UID);
    assert_eq!(owner("dom2"), 0);
    let list = d.json(&["list"]);
    assert_eq!(list[0]["name"], "dom1-wd0", "{list}");
    assert_eq!(list[0]["owner"], "nobody", "{list}");
    assert_eq!(list[1]["socket_owner"], "root", "{list}");
}
