//! Discovery, the host graph and `wdvirt topology` / `wdvirt plan`, on the
//! recorded sysfs trees of `tests/sysfs/` (built from the kernel's ABI by
//! `tests/sysfs/make-trees.py`), on malformed trees made here, on this
//! machine's own `/sys`, and through a daemon whose YAML declares no
//! accelerator.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use wdvirt::config;
use wdvirt::partition::{Partitioner, PlacementRequest};
use wdvirt::topology::host::{self, Host};
use wdvirt::topology::{self, Detail, Discovery, Interface, PasidCap, ProblemKind, Sysfs};
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_guest::Device;

mod common;

fn tree(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sysfs")
        .join(name)
}

fn types_yaml() -> PathBuf {
    tree("types.yaml")
}

/// Discovery of a recorded tree with every reader but the software engines
/// (which would otherwise take every type: they run everything).
fn hardware(name: &str) -> Discovery {
    let sources: Vec<Box<dyn topology::Source>> = topology::all_sources()
        .into_iter()
        .filter(|s| s.name() != "soft")
        .collect();
    topology::discover_with(&Sysfs::new(tree(name)), &sources)
}

fn names(d: &Discovery) -> Vec<&str> {
    d.accelerators.iter().map(|a| a.name.as_str()).collect()
}

fn problem<'a>(d: &'a Discovery, path_end: &str) -> &'a topology::Problem {
    d.problems
        .iter()
        .find(|p| p.path.ends_with(path_end))
        .unwrap_or_else(|| panic!("no problem at {path_end}: {:#?}", d.problems))
}

fn wdvirt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wdvirt"));
    // No daemon here unless a test starts one.
    c.arg("--api").arg("/nonexistent/wdvirt-api.sock");
    c
}

fn run(args: &[&str]) -> Output {
    wdvirt().args(args).output().unwrap()
}

fn ok_json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "wdvirt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn discovery_finds_what_the_two_socket_hisilicon_host_holds() {
    let d = hardware("kunpeng920-2s");
    assert_eq!(d.numa.len(), 4);
    assert_eq!(d.numa[2].cpus, (48..72).collect::<Vec<u32>>());
    assert_eq!(d.numa[0].distances[&3], 22);
    assert_eq!(d.numa[3].memory_kib, Some(64 << 20));
    assert_eq!(d.cpus_online.len(), 96);
    // HPRE runs nothing wdvirt offers: skipped, and said so by path.
    assert_eq!(
        names(&d),
        ["hisi_sec2-2", "hisi_sec2-3", "hisi_zip-0", "hisi_zip-1"]
    );
    let p = problem(&d, "class/uacce/hisi_hpre-4");
    assert!(
        p.to_string()
            .contains("runs none of wdvirt's operations (algorithms: rsa, dh")
    );
    let zip1 = d.accelerator("hisi_zip-1").unwrap();
    assert_eq!(zip1.interface, Interface::Uacce);
    assert_eq!(zip1.queue_pairs, 40, "available_instances");
    assert_eq!(zip1.numa_node, Some(2));
    assert_eq!(zip1.pci.as_deref(), Some("0000:b5:00.0"));
    assert_eq!(zip1.pasids, (1 << 20) - 1, "20-bit PASID capability");
    let Detail::Uacce {
        api,
        flags,
        algorithms,
        region_mmio_size,
        region_dus_size,
        isolate,
        ..
    } = &zip1.detail
    else {
        panic!("{:?}", zip1.detail)
    };
    assert_eq!((api.as_str(), *flags), ("hisi_qm_v2", 1));
    assert_eq!(algorithms, &["zlib", "gzip", "deflate", "lz77_zstd"]);
    assert_eq!(
        (*region_mmio_size, *region_dus_size),
        (Some(8192), Some(151552))
    );
    assert_eq!(*isolate, Some(false));
    let sec = d.accelerator("hisi_sec2-2").unwrap();
    assert_eq!(sec.ops, wdvirt_abi::Opcode::Sha256.bit());
    assert_eq!(sec.numa_node, Some(1), "ZIP and SEC on different nodes");
    let f = d.pci_function("0000:75:00.0").unwrap();
    assert_eq!((f.vendor, f.device), (Some(0x19e5), Some(0xa250)));
    assert_eq!(f.iommu_group, Some(31));
    assert!(matches!(f.pasid, PasidCap::Present { max_width: 20, .. }));
    assert_eq!(
        d.pci_function("0000:74:00.0").unwrap().pasid,
        PasidCap::Absent
    );
}

#[test]
fn discovery_finds_dsa_and_iaa_work_queues() {
    let d = hardware("spr-dsa-iaa");
    assert_eq!(names(&d), ["dsa0", "dsa2", "iax1", "iax3"]);
    use wdvirt_abi::Opcode::*;
    let dsa0 = d.accelerator("dsa0").unwrap();
    assert_eq!(dsa0.interface, Interface::Idxd);
    assert_eq!(
        dsa0.ops,
        Copy.bit() | Fill.bit() | Compare.bit() | Crc32c.bit()
    );
    assert_eq!(dsa0.queue_pairs, 2, "two enabled user work queues");
    assert_eq!(dsa0.engines, 4);
    let dsa2 = d.accelerator("dsa2").unwrap();
    assert_eq!(
        dsa2.queue_pairs, 1,
        "a kernel wq and a disabled wq do not count"
    );
    let Detail::Idxd { work_queues, .. } = &dsa2.detail else {
        panic!()
    };
    let usable: Vec<&str> = work_queues
        .iter()
        .filter(|w| w.usable())
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(usable, ["wq2.1"]);
    assert_eq!(work_queues.len(), 3);
    let iax3 = d.accelerator("iax3").unwrap();
    assert_eq!(iax3.ops, DeflateCompress.bit() | DeflateDecompress.bit());
    assert_eq!(iax3.numa_node, Some(1));
    assert!(d.problems.is_empty(), "{:#?}", d.problems);
}

#[test]
fn discovery_finds_the_memory_only_node_and_the_initiators() {
    let d = hardware("hbm-shared");
    let roles: Vec<&str> = d.numa.iter().map(|n| n.role()).collect();
    assert_eq!(
        roles,
        [
            "cpus+memory",
            "cpus+memory",
            "memory-only",
            "initiator",
            "initiator"
        ]
    );
    assert!(d.numa[2].memory_only());
    assert_eq!(d.accelerator("hisi_zip-0").unwrap().numa_node, Some(3));
    assert_eq!(d.accelerator("hisi_sec2-1").unwrap().numa_node, Some(4));
    assert!(d.problems.is_empty(), "{:#?}", d.problems);
}

/// The host graph of a recorded tree (no YAML) and a partitioner on it.
fn partitioner(tree_name: &str) -> (Host, Partitioner) {
    let h = host::merge(&config::Config::default(), &hardware(tree_name)).unwrap();
    let p = Partitioner::new(h.topology(false).unwrap());
    (h, p)
}

/// The type `name` of tests/sysfs/types.yaml, near `node`.
fn request(name: &str, node: u32) -> PlacementRequest {
    let cfg = config::load_paths(&[types_yaml()]).unwrap();
    let t = cfg.instance_type(name).unwrap();
    let mut r = wdvirt::daemon::catalog::TypeDef::from_config(t).placement;
    r.numa_node = Some(node);
    r
}

fn placed(p: &Partitioner, r: &PlacementRequest) -> Vec<String> {
    p.place(r)
        .unwrap()
        .functions
        .into_iter()
        .map(|f| f.accelerator)
        .collect()
}

#[test]
fn compression_close_to_hashing_goes_to_the_right_pair_on_each_tree() {
    // Two sockets: the ZIP and SEC of the VM's socket.
    let (_, p) = partitioner("kunpeng920-2s");
    assert_eq!(
        placed(&p, &request("zip-hash", 0)),
        ["hisi_zip-0", "hisi_sec2-2"]
    );
    assert_eq!(
        placed(&p, &request("zip-hash", 3)),
        ["hisi_zip-1", "hisi_sec2-3"]
    );
    // Within 20 of each other and of node 3, nothing fits, and each
    // accelerator that could have served says why not.
    let e = p
        .place(&request("zip-hash-near", 3))
        .unwrap_err()
        .to_string();
    assert!(e.contains("hisi_zip-1–node3 distance 22 > max 20"), "{e}");
    assert!(e.contains("hisi_zip-0–node3 distance 32 > max 20"), "{e}");
    assert!(e.contains("hisi_sec2-2–node3 distance 34 > max 20"), "{e}");

    // DSA + IAA: the IAA and DSA of the VM's node.
    let (_, p) = partitioner("spr-dsa-iaa");
    assert_eq!(placed(&p, &request("deflate-crc", 0)), ["iax1", "dsa0"]);
    assert_eq!(placed(&p, &request("deflate-crc", 1)), ["iax3", "dsa2"]);
    // dsa2 has one user work queue, dsa0 is 31 from node 1 (on an empty host).
    let (_, p) = partitioner("spr-dsa-iaa");
    let e = p
        .place(&request("deflate-crc2", 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dsa2: 1 of 1 queue pairs free, need 2 (function 1)"),
        "{e}"
    );
    assert!(e.contains("dsa0–node1 distance 31 > max 25"), "{e}");

    // The seed's graph: the VM's memory in HBM (node 2, no CPU). The pair of
    // generic initiators sharing the HBM wins (86) over the pair on the
    // CPU packages (111) and the mixed pairs (102), though the two are 40
    // apart, more than either package pair's members are from each other.
    let (h, p) = partitioner("hbm-shared");
    let t = h.topology(false).unwrap();
    use wdvirt::partition::Node;
    let acc = |s: &str| Node::Accelerator(s.into());
    assert_eq!(
        t.distance(&acc("hisi_zip-0"), &acc("hisi_sec2-1")),
        Some(40)
    );
    assert_eq!(t.distance(&acc("hisi_zip-0"), &Node::Numa(2)), Some(23));
    assert_eq!(t.distance(&acc("hisi_zip-2"), &Node::Numa(2)), Some(35));
    let a = p.place(&request("zip-hash", 2)).unwrap();
    let got: Vec<&str> = a.functions.iter().map(|f| f.accelerator.as_str()).collect();
    assert_eq!(got, ["hisi_zip-0", "hisi_sec2-1"]);
    assert_eq!(a.distance.total, 86);
    let e = p
        .place(&request("zip-hash-near", 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("hisi_zip-0–node2 distance 23 > max 20"), "{e}");
    // Near a package instead, its own pair wins.
    assert_eq!(
        placed(&p, &request("zip-hash", 0)),
        ["hisi_zip-2", "hisi_sec2-3"]
    );
}

/// A file under `root`, its directories made.
fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn uacce_dev(root: &Path, name: &str, attrs: &[(&str, &str)]) {
    for (k, v) in attrs {
        put(root, &format!("class/uacce/{name}/{k}"), v);
    }
}

#[test]
fn malformed_trees_give_per_entry_problems_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    let good = [
        ("api", "hisi_qm_v2\n"),
        ("flags", "1\n"),
        ("available_instances", "8\n"),
        ("algorithms", "deflate\n"),
    ];
    // NUMA: a good node, one with a garbage cpulist, an absurd id, and one
    // whose distance row has the wrong length.
    put(r, "devices/system/cpu/online", "0-3\n");
    put(r, "devices/system/node/node0/cpulist", "0-1\n");
    put(r, "devices/system/node/node0/distance", "10 20\n");
    put(r, "devices/system/node/node1/cpulist", "2-x\n");
    put(r, "devices/system/node/node7/cpulist", "2-3\n");
    put(r, "devices/system/node/node7/distance", "10\n");
    put(r, "devices/system/node/node7/meminfo", "garbage\n");
    put(r, "devices/system/node/node99999999999/cpulist", "0\n");
    // A CPU listed by two nodes: kept in the first.
    put(r, "devices/system/node/node8/cpulist", "1\n");
    // UACCE: one good device, then every way an entry can be bad.
    uacce_dev(r, "good-0", &good);
    uacce_dev(
        r,
        "absurd-1",
        &[
            ("available_instances", "99999999999999999999999\n"),
            ("api", "x\n"),
            ("flags", "1\n"),
            ("algorithms", "deflate\n"),
        ],
    );
    uacce_dev(
        r,
        "garbage-2",
        &[
            ("flags", "lots\n"),
            ("api", "x\n"),
            ("available_instances", "1\n"),
            ("algorithms", "deflate\n"),
        ],
    );
    uacce_dev(r, "missing-3", &[("flags", "1\n")]);
    uacce_dev(
        r,
        "isolated-4",
        &[
            ("isolate", "1\n"),
            ("api", "x\n"),
            ("flags", "1\n"),
            ("available_instances", "1\n"),
            ("algorithms", "zlib\n"),
        ],
    );
    uacce_dev(r, "binary-5", &good);
    std::fs::write(r.join("class/uacce/binary-5/api"), [0xff, 0x00, 0xfe]).unwrap();
    std::os::unix::fs::symlink("loop-b", r.join("class/uacce/loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", r.join("class/uacce/loop-b")).unwrap();
    std::os::unix::fs::symlink("/etc", r.join("class/uacce/escape-6")).unwrap();
    uacce_dev(r, "bad name!", &good);
    // A FIFO where an attribute should be: refused, not waited on.
    uacce_dev(r, "fifo-7", &good);
    std::fs::remove_file(r.join("class/uacce/fifo-7/flags")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        r.join("class/uacce/fifo-7/flags"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // A software engine's name taken by a device: the second one is left out.
    uacce_dev(r, "soft0", &good);
    // IDXD: garbage op_cap.
    put(r, "bus/dsa/devices/dsa0/state", "enabled\n");
    put(r, "bus/dsa/devices/dsa0/op_cap", "not a bitmap\n");
    // IDXD: a DSA whose only work queue is the kernel's; a disabled one,
    // whose (garbage) work queue is not read.
    put(r, "bus/dsa/devices/dsa1/state", "enabled\n");
    put(r, "bus/dsa/devices/dsa1/op_cap", "0x18 0x0 0x0 0x0\n");
    for (k, v) in [
        ("type", "kernel"),
        ("mode", "dedicated"),
        ("state", "enabled"),
        ("size", "16"),
    ] {
        put(r, &format!("bus/dsa/devices/wq1.0/{k}"), &format!("{v}\n"));
    }
    put(r, "bus/dsa/devices/dsa2/state", "disabled\n");
    put(r, "bus/dsa/devices/dsa2/op_cap", "0x18 0x0 0x0 0x0\n");
    put(r, "bus/dsa/devices/wq2.0/size", "lots\n");
    // PCI: a loop in the extended capability list, a numa_node of 5000.
    let mut cfg = vec![0u8; 4096];
    cfg[0x100..0x104].copy_from_slice(&(0x000f_u32 | 1 << 16 | 0x100 << 20).to_le_bytes());
    std::fs::create_dir_all(r.join("bus/pci/devices/0000:01:00.0")).unwrap();
    std::fs::write(r.join("bus/pci/devices/0000:01:00.0/config"), &cfg).unwrap();
    put(r, "bus/pci/devices/0000:01:00.0/numa_node", "5000\n");
    put(r, "bus/pci/devices/not-an-address/vendor", "0x8086\n");

    let d = topology::discover(r);
    let kind = |end: &str| &problem(&d, end).kind;
    // Every bad entry is named, with what was wrong; the good ones are kept.
    assert!(matches!(kind("node1/cpulist"), ProblemKind::Garbage { .. }));
    assert!(matches!(
        kind("node99999999999"),
        ProblemKind::OutOfRange { .. }
    ));
    assert!(matches!(
        kind("node7/distance"),
        ProblemKind::Garbage { .. }
    ));
    assert!(matches!(kind("node7/meminfo"), ProblemKind::Garbage { .. }));
    assert!(matches!(
        kind("absurd-1/available_instances"),
        ProblemKind::OutOfRange { .. }
    ));
    assert_eq!(
        problem(&d, "garbage-2/flags").to_string(),
        "class/uacce/garbage-2/flags: expected a flags word, found \"lots\""
    );
    assert_eq!(kind("missing-3/api"), &ProblemKind::Missing);
    assert!(
        problem(&d, "isolated-4")
            .to_string()
            .contains("isolated by the kernel")
    );
    assert_eq!(kind("binary-5/api"), &ProblemKind::NotText);
    assert_eq!(kind("loop-a"), &ProblemKind::LinkLoop);
    assert!(matches!(kind("escape-6"), ProblemKind::OutsideRoot(_)));
    assert!(matches!(kind("bad name!"), ProblemKind::Skipped(_)));
    assert_eq!(kind("fifo-7/flags"), &ProblemKind::NotAFile);
    assert!(matches!(kind("dsa0/op_cap"), ProblemKind::Garbage { .. }));
    assert!(
        problem(&d, "0000:01:00.0/config")
            .to_string()
            .contains("broken at 0x100")
    );
    assert!(matches!(
        kind("0000:01:00.0/numa_node"),
        ProblemKind::OutOfRange { .. }
    ));
    assert!(matches!(
        kind("not-an-address"),
        ProblemKind::Garbage { .. }
    ));
    assert_eq!(
        problem(&d, "node8/cpulist").to_string(),
        "devices/system/node/node8/cpulist: CPU 1 is already in node0; left out of node8"
    );
    assert_eq!(
        problem(&d, "bus/dsa/devices/dsa1").to_string(),
        "bus/dsa/devices/dsa1: no enabled user work queue (configure one with accel-config)"
    );
    assert_eq!(
        problem(&d, "bus/dsa/devices/dsa2").to_string(),
        "bus/dsa/devices/dsa2: device state is \"disabled\", not enabled"
    );
    assert!(
        !d.problems.iter().any(|p| p.path.contains("wq2.0")),
        "a disabled device's work queues are not read: {:#?}",
        d.problems
    );
    let nodes: Vec<u32> = d.numa.iter().map(|n| n.id).collect();
    assert_eq!(nodes, [0, 7, 8]);
    assert!(d.numa[2].cpus.is_empty());
    assert!(d.numa[1].distances.is_empty());
    let found: Vec<&str> = d
        .accelerators
        .iter()
        .filter(|a| a.interface == Interface::Uacce)
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(found, ["good-0", "soft0"]);
    assert!(
        problem(&d, "devices/system/node/node0")
            .to_string()
            .contains("another accelerator is already named 'soft0'")
    );
    // And the command line shows the same, without failing.
    let out = run(&["topology", "--offline", "--sysfs", r.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SKIPPED ("), "{text}");
    assert!(
        text.contains("class/uacce/loop-a: a symlink loop"),
        "{text}"
    );
    // A root that does not exist is one problem, not a failure.
    let d = topology::discover(&r.join("nope"));
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.problems[0].kind, ProblemKind::Missing);
}

/// CPUs in a cpu list, for reading this machine's files.
fn cpus_in(text: &str) -> Vec<u32> {
    config::parse_cpu_list(text.trim()).unwrap()
}

#[test]
fn this_machine_shows_its_nodes_cpus_memory_and_software_engines() {
    let d = topology::discover(Path::new("/sys"));
    let nodes = std::fs::read_dir("/sys/devices/system/node")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_prefix("node")
                        .is_some_and(|x| x.parse::<u32>().is_ok())
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(d.numa.len(), nodes);
    let online = cpus_in(&std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap());
    assert_eq!(d.cpus_online, online);
    let mut in_nodes: Vec<u32> = d.numa.iter().flat_map(|n| n.cpus.clone()).collect();
    in_nodes.sort();
    if nodes > 0 {
        assert!(
            online.iter().all(|c| in_nodes.contains(c)),
            "every online CPU is in a node: {online:?} {in_nodes:?}"
        );
        assert!(d.numa.iter().any(|n| n.memory_kib.is_some_and(|m| m > 0)));
    }
    // No hardware accelerator here (none of UACCE or IDXD is loaded).
    if !Path::new("/sys/class/uacce").exists() && !Path::new("/sys/bus/dsa").exists() {
        assert!(
            d.accelerators
                .iter()
                .all(|a| a.interface == Interface::Soft)
        );
    }
    // The software engines: one per usable CPU, over the nodes.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = cpus_in(
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap(),
    );
    let usable = online.iter().filter(|c| allowed.contains(c)).count() as u32;
    let engines: u32 = d
        .accelerators
        .iter()
        .filter(|a| a.interface == Interface::Soft)
        .map(|a| a.engines)
        .sum();
    assert!(engines >= 1);
    let per_node: u32 = if d.numa.is_empty() {
        usable.clamp(1, 64)
    } else {
        d.numa
            .iter()
            .map(|n| {
                n.cpus
                    .iter()
                    .filter(|c| online.contains(c) && allowed.contains(c))
                    .count() as u32
            })
            .filter(|&k| k > 0)
            .map(|k| k.min(64))
            .sum()
    };
    assert_eq!(engines, per_node);
    assert!(engines <= usable.max(1));
    // The CLI says the same.
    let v = ok_json(&["topology", "--json"]);
    let soft: Vec<&Value> = v["host"]["accelerators"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["backend"] == "soft")
        .collect();
    assert!(!soft.is_empty(), "{v}");
    assert_eq!(soft[0]["drivable"], true);
    assert_eq!(v["usage_from"], "a fresh partition (nothing placed)");
    let out = run(&["plan", "zip", "--count", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 of 3 fit now"), "{text}");
    assert!(text.contains("#3: soft"), "{text}");
}

#[test]
fn topology_prints_text_json_dot_and_an_svg_of_a_recorded_tree() {
    let t = tree("hbm-shared");
    let t = t.to_str().unwrap();
    let base = [
        "topology",
        "--offline",
        "--sysfs",
        t,
        "--sources",
        "numa,pci,uacce",
    ];
    let out = run(&base);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "node2  memory-only",
        "node3  initiator",
        "hisi_zip-0   uacce (no backend)  node3  0000:31:00.0  5      20-bit     64/64",
        "node2–node3        13",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let v = ok_json(&[&base[..], &["--json"]].concat());
    assert_eq!(v["host"]["numa"][2]["role"], "memory-only");
    assert_eq!(v["usage"]["hisi_sec2-1"]["free_queue_pairs"], 256);
    assert_eq!(v["discovered"]["pci"].as_array().unwrap().len(), 8);
    let out = run(&[&base[..], &["--dot"]].concat());
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("graph host {"), "{dot}");
    assert!(
        dot.contains("\"hisi_zip-0\" -- \"node3\" [label=\"10\"")
            || dot.contains("\"node3\" -- \"hisi_zip-0\" [label=\"10\""),
        "{dot}"
    );
    // An IDXD device's work queues are vertices of their own.
    let t2 = tree("spr-dsa-iaa");
    let out = run(&[
        "topology",
        "--offline",
        "--dot",
        "--sysfs",
        t2.to_str().unwrap(),
    ]);
    let dot2 = String::from_utf8_lossy(&out.stdout);
    assert!(dot2.contains("\"dsa2/wq2.0\" [label=\"wq2.0\\nkernel dedicated enabled\\nsize 32\", shape=box, style=dashed]"), "{dot2}");
    assert!(
        dot2.contains("\"dsa2\" -- \"dsa2/wq2.1\" [style=dotted]"),
        "{dot2}"
    );
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("host.svg");
    let out = run(&[&base[..], &["--svg", svg.to_str().unwrap()]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.contains("<svg") && picture.contains("hisi_sec2-1"));
    let beside = std::fs::read_to_string(dir.path().join("host.dot")).unwrap();
    assert_eq!(beside, dot, "the DOT the picture was drawn from, beside it");
    // Bad arguments get a clear message.
    let out = run(&["topology", "--sources", "numa,gpu"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("unknown source 'gpu' (known: numa, pci, uacce, idxd, soft)")
    );
}

#[test]
fn plan_says_where_and_how_many_fit_and_why_not() {
    let t = tree("kunpeng920-2s");
    let y = types_yaml();
    let args = |ty: &str, extra: &[&str]| {
        let mut a = vec![
            "plan",
            ty,
            "--offline",
            "--sysfs",
            t.to_str().unwrap(),
            "--sources",
            "numa,pci,uacce",
            "--config",
            y.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let v: Value = {
        let a = args("zip-hash", &["--near", "3", "--count", "2", "--json"]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        ok_json(&a)
    };
    assert_eq!(v["fits"], true);
    assert_eq!(
        v["plan"]["placed"][0]["accelerators"],
        serde_json::json!(["hisi_zip-1", "hisi_sec2-3"])
    );
    // hisi_zip-1 has 40 free queue pairs: 20 of 2 there, then hisi_zip-0's 32.
    assert_eq!(v["plan"]["fit"], 52);
    // Counted past the two listed, with no refusal: two fit.
    assert_eq!(v["plan"]["placed"].as_array().unwrap().len(), 2);
    assert_eq!(v["plan"]["refusal"], Value::Null);
    assert_eq!(v["no_backend"].as_array().unwrap().len(), 4);
    let a = args("zip-hash-near", &["--near", "3"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run(&a);
    assert_eq!(out.status.code(), Some(2), "fewer than asked fit");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 of 1 fit now; 0 in all"), "{text}");
    assert!(
        text.contains("next instance refused; per accelerator:"),
        "{text}"
    );
    assert!(
        text.contains("  hisi_zip-1–node3 distance 22 > max 20"),
        "{text}"
    );
    let a = args("nosuch", &[]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run(&a);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "unknown type 'nosuch' (known: zip-hash, zip-hash-near, deflate-crc, deflate-crc2)"
    ));
}

#[test]
fn yaml_restricts_and_overrides_and_conflicts_are_placed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let t = tree("kunpeng920-2s");
    let topo = |yaml: &str| {
        let f = dir.path().join("host.yaml");
        std::fs::write(&f, yaml).unwrap();
        run(&[
            "topology",
            "--offline",
            "--json",
            "--sysfs",
            t.to_str().unwrap(),
            "--config",
            f.to_str().unwrap(),
        ])
    };
    // Restrict a device, add a link, override a distance, add a software
    // accelerator (which replaces the discovered ones).
    let out = topo(
        "numa_nodes:\n  - {id: 0, distances: {1: 15}}\n  - {id: 1}\n\
         accelerators:\n  - name: hisi_zip-0\n    backend: uacce\n    engines: 1\n    queue_pairs: 16\n    \
         operations: [deflate-compress]\n    pasids: 64\n    links: [{to: hisi_sec2-3, distance: 5}]\n  \
         - {name: mine, backend: soft, engines: 1, queue_pairs: 4, operations: [all], pasids: 8, numa_node: 3}\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let accels = v["host"]["accelerators"].as_array().unwrap();
    let zip0 = accels.iter().find(|a| a["name"] == "hisi_zip-0").unwrap();
    assert_eq!(
        (zip0["queue_pairs"].as_u64(), zip0["pasids"].as_u64()),
        (Some(16), Some(64))
    );
    assert_eq!(zip0["origin"], "merged");
    assert!(
        accels
            .iter()
            .any(|a| a["name"] == "mine" && a["origin"] == "yaml")
    );
    assert!(
        !accels.iter().any(|a| a["name"] == "soft0"),
        "declared soft replaces discovered"
    );
    let links = v["host"]["links"].as_array().unwrap();
    let link = |a: &str, b: &str| {
        links
            .iter()
            .find(|l| {
                let (x, y) = (l["a"].to_string(), l["b"].to_string());
                (x.contains(a) && y.contains(b)) || (x.contains(b) && y.contains(a))
            })
            .cloned()
    };
    // A link to a device the YAML does not declare, a node only the host has.
    assert_eq!(link("hisi_zip-0", "hisi_sec2-3").unwrap()["distance"], 5);
    assert_eq!(link("mine", "\"numa\":3").unwrap()["origin"], "yaml");
    assert_eq!(link("hisi_zip-0", "hisi_sec2-3").unwrap()["origin"], "yaml");
    let n01 = links
        .iter()
        .find(|l| {
            l["a"] == serde_json::json!({"numa": 0}) && l["b"] == serde_json::json!({"numa": 1})
        })
        .unwrap();
    assert_eq!(
        (n01["distance"].as_u64(), n01["origin"].as_str()),
        (Some(15), Some("merged"))
    );

    // Conflicts: more than the device has, another backend, a device the
    // host does not have, a CPU the host puts in another node.
    let out = topo(
        "numa_nodes:\n  - {id: 1, cpus: \"0-3\"}\n\
         accelerators:\n  - {name: hisi_zip-1, backend: uacce, engines: 1, queue_pairs: 41, operations: [sha256], pasids: 1}\n  \
         - {name: hisi_sec2-2, backend: soft, engines: 1, queue_pairs: 1, operations: [all], pasids: 1}\n  \
         - {name: hisi_zip-9, backend: uacce, engines: 1, queue_pairs: 1, operations: [all], pasids: 1}\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = dir.path().join("host.yaml").display().to_string();
    for want in [
        format!(
            "{f}:2:10: error: conflicts with this host: NUMA node 1 lists CPU 0, which this host puts in node0"
        ),
        format!(
            "{f}:4:12: error: conflicts with this host: 'hisi_zip-1' (class/uacce/hisi_zip-1) can only be restricted: queue_pairs 41 but the device has 40 free; operations sha256 the device does not run"
        ),
        format!(
            "{f}:5:12: error: conflicts with this host: 'hisi_sec2-2' is a uacce device on this host (class/uacce/hisi_sec2-2), declared here with backend soft"
        ),
        format!(
            "{f}:6:12: error: conflicts with this host: no uacce device named 'hisi_zip-9' on this host (found: hisi_sec2-2, hisi_sec2-3, hisi_zip-0, hisi_zip-1)"
        ),
    ] {
        assert!(err.contains(&want), "missing {want:?} in\n{err}");
    }
    assert!(err.contains("^"), "a caret under the column: {err}");
}

/// A daemon whose YAML has no accelerator section, on this machine's /sys.
struct Daemon {
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn cli(&self, args: &[&str]) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
            .arg("--api")
            .arg(self.dir.path().join("api.sock"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wdvirt {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

#[test]
fn a_daemon_with_no_accelerator_section_serves_on_the_discovered_engines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("types.yaml"),
        "qos_policies: [{name: std, weight: 100}]\n\
         types:\n  - {name: pair, queues: 2, operations: [crc32c, sha256, zlib-compress], qos: std}\n",
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .arg("--api")
        .arg(dir.path().join("api.sock"))
        .args(["daemon", "--sysfs", "/sys", "--config"])
        .arg(dir.path().join("types.yaml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon { dir, child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(d.dir.path().join("api.sock")).is_err() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let accels = d.cli(&["accelerators", "--json"]);
    let found = topology::discover(Path::new("/sys"));
    let soft: Vec<&str> = found
        .accelerators
        .iter()
        .filter(|a| a.interface == Interface::Soft)
        .map(|a| a.name.as_str())
        .collect();
    let served: Vec<&str> = accels
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(served, soft, "the daemon serves what discovery found");
    d.cli(&["define", "--type", "pair", "--name", "vm1", "--json"]);
    let v = d.cli(&["start", "vm1", "--json"]);
    let socket = PathBuf::from(v["socket"].as_str().unwrap());
    assert_eq!(v["placement"][0]["accelerator"], soft[0]);
    let vmm = Arc::new(
        LoopbackVmm::connect(&socket, GuestRam::new(common::RAM_BASE, 4 << 20).unwrap()).unwrap(),
    );
    let dev = Device::probe(vmm.clone()).unwrap();
    assert_eq!(dev.info().num_queues, 2);
    dev.enable().unwrap();
    let pool = vmm.dma_pool().unwrap();
    let mut q = dev.queue(0, 8, dev.info().cap_ops, &pool).unwrap();
    assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
    // `wdvirt topology` reads the daemon's pools: one PASID in use.
    let out = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .arg("--api")
        .arg(d.dir.path().join("api.sock"))
        .args(["topology", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["usage_from"]
            .as_str()
            .unwrap()
            .starts_with("the daemon at "),
        "{v}"
    );
    let u = &v["usage"][soft[0]];
    assert_eq!(
        u["free_pasids"].as_u64().unwrap() + 1,
        u["pasids"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(
        u["free_queue_pairs"].as_u64().unwrap() + 2,
        u["queue_pairs"].as_u64().unwrap(),
        "{v}"
    );
    // `wdvirt plan` plans against the daemon's pools: one instance fewer fits.
    let plan = |offline: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_wdvirt"));
        c.arg("--api").arg(d.dir.path().join("api.sock"));
        c.args(["plan", "pair", "--json", "--config"]);
        c.arg(d.dir.path().join("types.yaml"));
        if offline {
            c.arg("--offline");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let (live, fresh) = (plan(false), plan(true));
    assert!(
        live["usage_from"]
            .as_str()
            .unwrap()
            .starts_with("the daemon at "),
        "{live}"
    );
    assert_eq!(
        live["plan"]["fit"].as_u64().unwrap() + 1,
        fresh["plan"]["fit"].as_u64().unwrap(),
        "{live} {fresh}"
    );
}

#[test]
fn the_daemons_catalog_places_only_on_what_this_build_drives() {
    // The seed's host with its software engines: the daemon's catalog has
    // soft0 and soft1; the UACCE devices are in the graph, not placed on.
    let cfg = config::load_str(
        "t.yaml",
        "qos_policies: [{name: std, weight: 1}]\ntypes: [{name: z, queues: 1, operations: [deflate-compress], qos: std}]\n",
    )
    .unwrap();
    let found = topology::discover(&tree("hbm-shared"));
    let h = host::merge(&cfg, &found).unwrap();
    assert_eq!(h.accelerators.len(), 6);
    let catalog = wdvirt::daemon::catalog::Catalog::from_config(&cfg, &h).unwrap();
    let served: Vec<String> = catalog.accelerators().into_iter().map(|a| a.name).collect();
    assert_eq!(served, ["soft0", "soft1"]);
    let types = catalog.types();
    assert_eq!(
        types[0].available_instances, 512,
        "256 queue pairs on each soft"
    );
}

/// A small recorded host made here: node0 (CPUs 0-3) and node1 (4-7) with
/// the SLIT rows given, and one UACCE device `zip-0` without SVA (so it
/// holds one PASID) on the PCI function 0000:01:00.0 of node `pci_node`.
fn small_tree(root: &Path, row0: &str, row1: &str, pci_node: u32) {
    put(root, "devices/system/cpu/online", "0-7\n");
    put(root, "devices/system/node/node0/cpulist", "0-3\n");
    put(root, "devices/system/node/node0/distance", row0);
    put(root, "devices/system/node/node1/cpulist", "4-7\n");
    put(root, "devices/system/node/node1/distance", row1);
    let pci = "devices/pci0000:00/0000:01:00.0";
    put(root, &format!("{pci}/numa_node"), &format!("{pci_node}\n"));
    std::fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
    std::os::unix::fs::symlink(root.join(pci), root.join("bus/pci/devices/0000:01:00.0")).unwrap();
    let dev = root.join(pci).join("uacce/zip-0");
    for (k, v) in [
        ("api", "hisi_qm_v2\n"),
        ("flags", "0\n"),
        ("available_instances", "4\n"),
        ("algorithms", "deflate\n"),
    ] {
        put(&dev, k, v);
    }
    std::os::unix::fs::symlink("../..", dev.join("device")).unwrap();
    std::fs::create_dir_all(root.join("class/uacce")).unwrap();
    std::os::unix::fs::symlink(&dev, root.join("class/uacce/zip-0")).unwrap();
}

/// `wdvirt topology --json` of `root` merged with `yaml` (written to a file
/// in `root`'s parent).
fn topology_with(root: &Path, yaml: &str) -> (Output, String) {
    let f = root.parent().unwrap().join("host.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = run(&[
        "topology",
        "--offline",
        "--json",
        "--sysfs",
        root.to_str().unwrap(),
        "--config",
        f.to_str().unwrap(),
    ]);
    (out, f.display().to_string())
}

#[test]
fn merge_rules_each_give_their_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sys");
    // An asymmetric SLIT, and a device on node 5, which the host lacks.
    small_tree(&root, "10 20\n", "21 10\n", 5);

    // YAML cpus override a found node's; a new id adds a node.
    let (out, _) = topology_with(
        &root,
        "numa_nodes:\n  - {id: 0, cpus: \"0-1\"}\n  - {id: 9, cpus: \"100-101\"}\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = |id: u64| {
        v["host"]["numa"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no node{id}: {v:#}"))
    };
    assert_eq!(node(0)["cpus"], serde_json::json!([0, 1]));
    assert_eq!(node(0)["origin"], "merged");
    assert_eq!(node(1)["cpus"], serde_json::json!([4, 5, 6, 7]));
    assert_eq!(
        (
            node(9)["cpus"].clone(),
            node(9)["role"].as_str(),
            node(9)["origin"].as_str()
        ),
        (
            serde_json::json!([100, 101]),
            Some("declared"),
            Some("yaml")
        )
    );
    // The two merge problems, each named once, with what was done.
    let problems: Vec<String> = v["host"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{}: {}", p["path"].as_str().unwrap(), p["detail"]))
        .collect();
    let has = |want: &str| problems.iter().filter(|p| p.contains(want)).count();
    assert_eq!(
        has("node0–node1 is 20 one way and 21 the other; using 21"),
        1,
        "{problems:#?}"
    );
    assert_eq!(
        has("zip-0 is on NUMA node 5, which the host graph does not have; left unlinked"),
        1,
        "{problems:#?}"
    );
    assert!(v["discovered"].get("problems").is_none(), "problems once");
    let links = v["host"]["links"].as_array().unwrap();
    let n01 = links
        .iter()
        .find(|l| {
            l["a"] == serde_json::json!({"numa": 0}) && l["b"] == serde_json::json!({"numa": 1})
        })
        .unwrap();
    assert_eq!(n01["distance"], 21);
    assert!(
        !links.iter().any(|l| l.to_string().contains("zip-0")),
        "zip-0 left unlinked: {links:#?}"
    );

    // More PASIDs than a device without SVA holds (one).
    let (out, f) = topology_with(
        &root,
        "accelerators:\n  - {name: zip-0, backend: uacce, engines: 1, queue_pairs: 2, operations: [deflate-compress], pasids: 2}\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{f}:2:12: error: conflicts with this host: 'zip-0' (class/uacce/zip-0) can only be restricted: pasids 2 but the device can hold 1"
    );
    assert!(err.contains(&want), "missing {want:?} in\n{err}");

    // A declared software accelerator linking to a discovered one, which
    // the declared ones replace: refused at the accelerator.
    let (out, f) = topology_with(
        &root,
        "accelerators:\n  - name: mine\n    backend: soft\n    engines: 1\n    queue_pairs: 4\n    \
         operations: [all]\n    pasids: 8\n    links: [{to: soft0, distance: 5}]\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{f}:2:11: error: conflicts with this host: 'mine' links to 'soft0', which the host graph does not have"
    );
    assert!(err.contains(&want), "missing {want:?} in\n{err}");
}

#[test]
fn a_daemon_on_a_sysfs_root_that_is_not_a_directory_exits_1_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    // Like /nonexistent, but sure not to exist.
    let missing = dir.path().join("nonexistent");
    let out = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .arg("--api")
        .arg(dir.path().join("api.sock"))
        .args(["daemon", "--sysfs"])
        .arg(&missing)
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.yaml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "wdvirt: error: sysfs root {}: not a directory",
            missing.display()
        )),
        "{err}"
    );
    assert!(!dir.path().join("api.sock").exists());
}

#[test]
fn a_type_never_placeable_on_the_merged_graph_is_refused_by_validate_and_the_daemon() {
    // No accelerator section: the discovered software engines serve, and
    // none is within distance 5 of node0 (its own is at 10).
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("types.yaml");
    std::fs::write(
        &f,
        "qos_policies: [{name: s, weight: 1}]\ntypes:\n  \
         - {name: far, queues: 1, operations: [deflate-compress], qos: s, placement: {numa_node: 0, max_distance: 5}}\n",
    )
    .unwrap();
    let t = tree("kunpeng920-2s");
    let out = run(&[
        "validate",
        "--sysfs",
        t.to_str().unwrap(),
        f.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:3:12: error: type 'far' can never be placed on this host: no placement fits: soft0–node0 distance 10 > max 5",
        f.display()
    );
    assert!(err.contains(&want), "missing {want:?} in\n{err}");
    // The recorded tree's own types fit it.
    let out = run(&[
        "validate",
        "--sysfs",
        t.to_str().unwrap(),
        types_yaml().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok: 0 accelerators, 4 types, 1 policies\n"
    );
    // The daemon refuses the same file on the same tree.
    let out = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .arg("--api")
        .arg(dir.path().join("api.sock"))
        .args([
            "daemon",
            "--sysfs",
            t.to_str().unwrap(),
            "--config",
            f.to_str().unwrap(),
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("type 'far' can never be placed"), "{err}");
}

#[test]
fn placement_reads_only_the_pci_functions_behind_accelerators() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sys");
    small_tree(&root, "10 20\n", "20 10\n", 1);
    // A function no accelerator sits on, with a config space that would
    // file a problem if it were read.
    put(&root, "bus/pci/devices/0000:02:00.0/numa_node", "0\n");
    put(&root, "bus/pci/devices/0000:02:00.0/config", "short");
    put(&root, "bus/pci/devices/0000:02:00.0/vendor", "garbage\n");
    let addresses =
        |d: &Discovery| -> Vec<String> { d.pci.iter().map(|f| f.address.clone()).collect() };
    // The daemon's and validate's discovery: the one function, on demand.
    let d = topology::discover_with(&Sysfs::new(&root), &topology::placement_sources());
    assert_eq!(addresses(&d), ["0000:01:00.0"]);
    assert_eq!(d.accelerator("zip-0").unwrap().numa_node, Some(1));
    assert!(
        d.problems.iter().all(|p| !p.path.contains("0000:02:00.0")),
        "{:#?}",
        d.problems
    );
    // `wdvirt topology`'s: every function, each read once.
    let d = topology::discover(&root);
    let mut all = addresses(&d);
    all.sort();
    assert_eq!(all, ["0000:01:00.0", "0000:02:00.0"]);
    assert_eq!(d.accelerator("zip-0").unwrap().numa_node, Some(1));
    assert!(matches!(
        problem(&d, "0000:02:00.0/vendor").kind,
        ProblemKind::Garbage { .. }
    ));
}

#[test]
fn the_daemon_logs_each_discovery_problem_once_at_warn() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .arg("--api")
        .arg(dir.path().join("api.sock"))
        .env_remove("WDVIRT_LOG")
        .args(["daemon", "--sysfs"])
        .arg(tree("kunpeng920-2s"))
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.yaml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("daemon ready") || Instant::now() > deadline {
            break text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the daemon exited ({status}): {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("daemon ready"), "{text}");
    for dev in ["hisi_hpre-4", "hisi_hpre-5"] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("discovery: class/uacce/{dev}: runs none")))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("WARN"), "{text}");
    }
}
