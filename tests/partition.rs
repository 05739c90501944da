//! Placement on the example graph of `docs/placement.md`, and the
//! partitioner under concurrent callers.
//!
//! ```text
//!            node0 ──────20────── node1
//!           /     \              /     \
//!         10       10          10       10
//!         /         \          /         \
//!      zip0         sec0 ─4─ zip1        sec1
//! ```
//!
//! zip* compress, sec* hash. sec0 is local to node0 and zip1 to node1, yet the
//! two share a link of 4: the closest compression+hashing pair spans both
//! NUMA nodes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wdvirt::accel::Pasid;
use wdvirt::partition::{
    AcceleratorSpec, Allocation, DrainTicket, FunctionRequest, LinkSpec, Node, NumaSpec,
    Partitioner, PlacementError, PlacementRequest, Reason, Rejection, Topology, TopologySpec,
};
use wdvirt_abi::Opcode;

const ZIP: u32 = Opcode::DeflateCompress.bit()
    | Opcode::DeflateDecompress.bit()
    | Opcode::ZlibCompress.bit()
    | Opcode::ZlibDecompress.bit()
    | Opcode::GzipCompress.bit()
    | Opcode::GzipDecompress.bit();
const SEC: u32 = Opcode::Sha256.bit() | Opcode::Crc32c.bit();

fn accel(name: &str, ops: u32, queue_pairs: u32, pasids: u32) -> AcceleratorSpec {
    AcceleratorSpec {
        name: name.into(),
        backend: "soft".into(),
        engines: 2,
        queue_pairs,
        ops,
        pasids,
    }
}

fn link(a: Node, b: Node, distance: i64) -> LinkSpec {
    LinkSpec { a, b, distance }
}

fn acc(name: &str) -> Node {
    Node::Accelerator(name.into())
}

fn example() -> Topology {
    Topology::new(TopologySpec {
        numa_nodes: vec![
            NumaSpec {
                id: 0,
                cpus: vec![0, 1],
            },
            NumaSpec {
                id: 1,
                cpus: vec![2, 3],
            },
        ],
        accelerators: vec![
            accel("zip0", ZIP, 64, 1024),
            accel("sec0", SEC, 16, 16),
            accel("zip1", ZIP, 16, 16),
            accel("sec1", SEC, 16, 4),
        ],
        links: vec![
            link(Node::Numa(0), Node::Numa(1), 20),
            link(acc("zip0"), Node::Numa(0), 10),
            link(acc("sec0"), Node::Numa(0), 10),
            link(acc("zip1"), Node::Numa(1), 10),
            link(acc("sec1"), Node::Numa(1), 10),
            link(acc("sec0"), acc("zip1"), 4),
        ],
    })
    .unwrap()
}

fn function(queues: u32, op: Opcode) -> FunctionRequest {
    FunctionRequest {
        queues,
        ops: op.bit(),
    }
}

/// Compression queues from one accelerator, hashing from another, close.
fn zip_and_hash(max_distance: Option<u64>, numa_node: Option<u32>) -> PlacementRequest {
    PlacementRequest {
        functions: vec![
            function(2, Opcode::DeflateCompress),
            function(2, Opcode::Sha256),
        ],
        max_distance,
        accelerators: None,
        numa_node,
    }
}

fn only(names: &[&str], functions: Vec<FunctionRequest>) -> PlacementRequest {
    PlacementRequest {
        functions,
        accelerators: Some(names.iter().map(|n| n.to_string()).collect()),
        ..PlacementRequest::default()
    }
}

fn accelerators(a: &Allocation) -> Vec<&str> {
    a.functions.iter().map(|f| f.accelerator.as_str()).collect()
}

#[test]
fn two_functions_go_to_the_closest_pair_not_the_greedy_or_tree_choice() {
    let t = example();
    // Shortest paths cross NUMA nodes through the sec0–zip1 link.
    assert_eq!(t.distance(&acc("sec0"), &acc("zip1")), Some(4));
    assert_eq!(t.distance(&acc("zip0"), &acc("sec0")), Some(20));
    assert_eq!(t.distance(&acc("zip1"), &acc("sec1")), Some(20));
    assert_eq!(t.distance(&Node::Numa(0), &acc("zip1")), Some(14));
    let p = Partitioner::new(t);
    // A greedy choice takes the compressor with the most room first (zip0,
    // 64 queue pairs), then its nearest hasher (sec0, 20 away): over the
    // maximum of 15. A tree (each accelerator under one NUMA node) prices
    // zip1–sec0 at 10 + 20 + 10 = 40 and finds nothing. The graph has a pair
    // at 4.
    let a = p.place(&zip_and_hash(Some(15), None)).unwrap();
    assert_eq!(accelerators(&a), ["zip1", "sec0"]);
    assert_eq!((a.distance.total, a.distance.max), (4, 4));
    assert_eq!(a.functions[0].queue_pairs, [0, 1]);
    assert_eq!(a.functions[1].queue_pairs, [0, 1]);
    assert_eq!(a.functions[1].ops, Opcode::Sha256.bit());
    // With no maximum it is still the best (4 < 20 for either local pair).
    let b = p.place(&zip_and_hash(None, None)).unwrap();
    assert_eq!(accelerators(&b), ["zip1", "sec0"]);
    assert_eq!(b.functions[0].queue_pairs, [2, 3]);
    assert_ne!(a.pasid, b.pasid);
    // For a VM on node0: zip1+sec0 costs 4 + 14 + 10 = 28, zip0+sec0 costs
    // 20 + 10 + 10 = 40; zip1 is 14 from node0, within 15.
    let c = p.place(&zip_and_hash(Some(15), Some(0))).unwrap();
    assert_eq!(accelerators(&c), ["zip1", "sec0"]);
    assert_eq!(c.distance.total, 28);
    assert_eq!(c.functions[0].numa_distance, Some(14));
    assert_eq!(c.functions[1].numa_distance, Some(10));
    // A maximum of 25 between everything, with the VM on node1: zip0 is 30
    // from node1, sec1 pairs at 20 only with zip1 (total 20+10+10 = 40)
    // while zip1+sec0 costs 4 + 10 + 14 = 28.
    let d = p.place(&zip_and_hash(Some(25), Some(1))).unwrap();
    assert_eq!(accelerators(&d), ["zip1", "sec0"]);
    assert_eq!((d.distance.total, d.distance.max), (28, 14));
}

#[test]
fn an_unsatisfiable_constraint_is_named_per_accelerator() {
    let p = Partitioner::new(example());
    // Distance: the closest pair is 4 apart.
    let e = p.place(&zip_and_hash(Some(3), None)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no placement fits: zip0–sec0 distance 20 > max 3; zip0–sec1 distance 40 > max 3; \
         sec0–zip1 distance 4 > max 3; zip1–sec1 distance 20 > max 3"
    );
    let PlacementError::NoFit { rejections } = &e else {
        panic!("{e:?}")
    };
    assert!(rejections.contains(&Rejection {
        accelerator: "sec0".into(),
        function: None,
        reason: Reason::PairDistance {
            other: "zip1".into(),
            distance: Some(4),
            max: 3
        },
    }));
    // Operations: nothing fills.
    let e = p
        .place(&only(&["zip0", "sec0"], vec![function(1, Opcode::Fill)]))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "no placement fits: zip0: no fill; sec0: no fill; zip1: not in the accelerator list; \
         sec1: not in the accelerator list"
    );
    // Operations, in a two-function type: only the function that fits
    // nowhere is explained, and named.
    let mut r = only(
        &["zip0", "zip1"],
        vec![
            function(1, Opcode::GzipCompress),
            function(1, Opcode::Sha256),
        ],
    );
    let e = p.place(&r).unwrap_err().to_string();
    assert_eq!(
        e,
        "no placement fits: zip0: no sha256 (function 1); sec0: not in the accelerator list; \
         zip1: no sha256 (function 1); sec1: not in the accelerator list"
    );
    // NUMA distance: zip0 is 30 from node1.
    r = only(&["zip0"], vec![function(1, Opcode::DeflateCompress)]);
    r.numa_node = Some(1);
    r.max_distance = Some(25);
    let e = p.place(&r).unwrap_err().to_string();
    assert!(e.contains("zip0–node1 distance 30 > max 25"), "{e}");
    // Queue pairs: no accelerator has 17 for one function but zip0.
    let e = p
        .place(&only(&["sec0", "sec1"], vec![function(17, Opcode::Crc32c)]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sec0: 16 of 16 queue pairs free, need 17"),
        "{e}"
    );
    assert!(
        e.contains("sec1: 16 of 16 queue pairs free, need 17"),
        "{e}"
    );
    // A type no accelerator can ever host is caught before any instance.
    assert!(
        p.topology()
            .check_hostable(&zip_and_hash(Some(3), None))
            .is_err()
    );
    assert!(
        p.topology()
            .check_hostable(&zip_and_hash(Some(4), None))
            .is_ok()
    );
    assert_eq!(p.snapshot().host_pasids.used, 0, "refusals take nothing");
}

#[test]
fn available_instances_falls_and_rises() {
    let p = Partitioner::new(example());
    let r = zip_and_hash(Some(15), None);
    // zip1 and sec0 (16 queue pairs each, 2 per function) hold 8 pairs; no
    // other pair is within 15.
    let avail = p.available_instances(&r).unwrap();
    assert_eq!(avail.total, 8);
    assert_eq!(
        avail
            .per_accelerator
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect::<Vec<_>>(),
        [("sec0", 8), ("sec1", 0), ("zip0", 0), ("zip1", 8)]
    );
    let placed: Vec<Allocation> = (0..3).map(|_| p.place(&r).unwrap()).collect();
    let avail = p.available_instances(&r).unwrap();
    assert_eq!((avail.total, avail.per_accelerator["sec0"]), (5, 5));
    // Another type on sec0 eats into the same pool.
    let hash = only(&["sec0"], vec![function(4, Opcode::Sha256)]);
    assert_eq!(p.available_instances(&hash).unwrap().total, 2);
    let h = p.place(&hash).unwrap();
    assert_eq!(p.available_instances(&r).unwrap().total, 3);
    // Released but draining: nothing comes back yet.
    let tickets: Vec<DrainTicket> = placed.iter().map(|a| p.release(a).unwrap()).collect();
    assert_eq!(p.available_instances(&r).unwrap().total, 3);
    let usage = &p.snapshot().accelerators[1];
    assert_eq!(usage.name, "sec0");
    assert_eq!(
        (
            usage.queue_pairs.used,
            usage.queue_pairs.draining,
            usage.queue_pairs.free
        ),
        (4, 6, 6)
    );
    assert_eq!((usage.pasids.used, usage.pasids.draining), (1, 3));
    for t in tickets {
        t.drained().unwrap();
    }
    assert_eq!(p.available_instances(&r).unwrap().total, 6);
    p.release_idle(&h).unwrap();
    assert_eq!(p.available_instances(&r).unwrap().total, 8);
}

#[test]
fn asking_for_more_than_fits_names_the_resource_and_the_accelerator() {
    let p = Partitioner::new(example());
    // Queue pairs: sec0 has 16, four instances of 4 take them all.
    let hash = only(&["sec0"], vec![function(4, Opcode::Sha256)]);
    assert_eq!(
        p.available_instances(&hash).unwrap().per_accelerator["sec0"],
        4
    );
    for _ in 0..4 {
        p.place(&hash).unwrap();
    }
    assert_eq!(p.available_instances(&hash).unwrap().total, 0);
    let e = p.place(&hash).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no placement fits: zip0: not in the accelerator list; \
         sec0: 0 of 16 queue pairs free, need 4; zip1: not in the accelerator list; \
         sec1: not in the accelerator list"
    );
    // PASIDs: sec1 holds 4, although 12 of its queue pairs stay free.
    let crc = only(&["sec1"], vec![function(1, Opcode::Crc32c)]);
    for _ in 0..4 {
        p.place(&crc).unwrap();
    }
    let e = p.place(&crc).unwrap_err().to_string();
    assert!(e.contains("sec1: PASIDs exhausted (4)"), "{e}");
    assert!(
        !e.contains("sec1: 12"),
        "queue pairs are not the problem: {e}"
    );
    assert_eq!(p.snapshot().accelerators[3].queue_pairs.free, 12);
}

/// What the test has seen handed out, to check against every new placement.
#[derive(Default)]
struct Ledger {
    live: HashSet<Pasid>,
    draining: HashSet<Pasid>,
    /// Queue pairs held by live or draining instances, and by which PASID.
    queue_pairs: HashMap<(String, u32), Pasid>,
    handed_out: HashMap<Pasid, u32>,
    placed_while_draining: u32,
}

fn forget_draining(ledger: &Mutex<Ledger>, pasid: Pasid) {
    let mut l = ledger.lock();
    assert!(l.draining.remove(&pasid));
    l.queue_pairs.retain(|_, owner| *owner != pasid);
}

#[test]
fn pasids_stay_unique_over_1000_random_cycles_from_four_threads() {
    const THREADS: u64 = 4;
    const CYCLES_PER_THREAD: u32 = 250;
    let p = Partitioner::new(example());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let types = [
        zip_and_hash(Some(15), None),
        zip_and_hash(None, Some(1)),
        only(&["sec1"], vec![function(1, Opcode::Crc32c)]),
        only(&["zip0"], vec![function(3, Opcode::ZlibCompress)]),
        PlacementRequest {
            functions: vec![function(1, Opcode::Sha256)],
            numa_node: Some(0),
            ..PlacementRequest::default()
        },
    ];
    std::thread::scope(|s| {
        for seed in 0..THREADS {
            let (p, ledger, types) = (p.clone(), ledger.clone(), &types);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut mine: Vec<Allocation> = Vec::new();
                let mut pending: Vec<DrainTicket> = Vec::new();
                let mut cycles = 0;
                let mut steps = 0;
                while cycles < CYCLES_PER_THREAD {
                    steps += 1;
                    assert!(steps < 100_000, "no progress");
                    match rng.random_range(0..3) {
                        0 => {
                            let r = &types[rng.random_range(0..types.len())];
                            let Ok(a) = p.place(r) else { continue };
                            let mut l = ledger.lock();
                            assert!(
                                !l.live.contains(&a.pasid),
                                "PASID {} handed out twice",
                                a.pasid
                            );
                            assert!(
                                !l.draining.contains(&a.pasid),
                                "draining PASID {} handed out",
                                a.pasid
                            );
                            assert!((1..1 << 20).contains(&a.pasid));
                            if !l.draining.is_empty() {
                                l.placed_while_draining += 1;
                            }
                            l.live.insert(a.pasid);
                            *l.handed_out.entry(a.pasid).or_default() += 1;
                            for f in &a.functions {
                                for &q in &f.queue_pairs {
                                    let qp = (f.accelerator.clone(), q);
                                    assert!(
                                        !l.queue_pairs.contains_key(&qp),
                                        "queue pair {q} of {} handed out twice",
                                        f.accelerator
                                    );
                                    l.queue_pairs.insert(qp, a.pasid);
                                }
                            }
                            drop(l);
                            mine.push(a);
                        }
                        1 if !mine.is_empty() => {
                            let a = mine.swap_remove(rng.random_range(0..mine.len()));
                            let ticket = p.release(&a).unwrap();
                            let mut l = ledger.lock();
                            assert!(l.live.remove(&a.pasid));
                            l.draining.insert(a.pasid);
                            drop(l);
                            pending.push(ticket);
                            cycles += 1;
                        }
                        _ if !pending.is_empty() => {
                            let ticket = pending.swap_remove(rng.random_range(0..pending.len()));
                            // Forget it in the ledger *before* it is free:
                            // from then on the partitioner may hand it out.
                            forget_draining(&ledger, ticket.pasid());
                            ticket.drained().unwrap();
                        }
                        _ => {}
                    }
                    let snap = p.snapshot();
                    for acc in &snap.accelerators {
                        let q = acc.queue_pairs;
                        assert_eq!(q.used + q.draining + q.free, q.total, "{}", acc.name);
                        let s = acc.pasids;
                        assert_eq!(s.used + s.draining + s.free, s.capacity, "{}", acc.name);
                    }
                }
                for a in mine {
                    let t = p.release(&a).unwrap();
                    let mut l = ledger.lock();
                    l.live.remove(&a.pasid);
                    l.draining.insert(a.pasid);
                    drop(l);
                    pending.push(t);
                }
                for t in pending {
                    forget_draining(&ledger, t.pasid());
                    t.drained().unwrap();
                }
            });
        }
    });
    let l = ledger.lock();
    assert!(l.live.is_empty() && l.draining.is_empty() && l.queue_pairs.is_empty());
    // The run did what it is meant to test: PASIDs were reused, and
    // placements happened while others were draining.
    assert!(l.handed_out.values().any(|&n| n > 1), "no PASID was reused");
    assert!(l.placed_while_draining > 100, "{}", l.placed_while_draining);
    let snap = p.snapshot();
    assert_eq!((snap.host_pasids.used, snap.host_pasids.draining), (0, 0));
    for acc in &snap.accelerators {
        assert_eq!(acc.queue_pairs.free, acc.queue_pairs.total, "{}", acc.name);
        assert_eq!(acc.pasids.free, acc.pasids.capacity, "{}", acc.name);
    }
}

#[test]
fn a_restarted_daemon_takes_back_multi_accelerator_allocations() {
    let p = Partitioner::new(example());
    let placed: Vec<Allocation> = [zip_and_hash(Some(15), Some(0)), zip_and_hash(None, Some(1))]
        .iter()
        .map(|r| p.place(r).unwrap())
        .collect();
    let q = Partitioner::new(example());
    for a in &placed {
        // Distances recomputed on the topology match what placement said.
        assert_eq!(&q.restore(a).unwrap(), a);
    }
    assert_eq!(q.snapshot(), p.snapshot());
}

#[test]
fn rejections_serialise_for_the_api() {
    let p = Partitioner::new(example());
    let e = p
        .place(&only(&["sec1"], vec![function(17, Opcode::Crc32c)]))
        .unwrap_err();
    let PlacementError::NoFit { rejections } = e else {
        panic!("{e:?}")
    };
    let json = serde_json::to_value(&rejections).unwrap();
    assert_eq!(
        json[3],
        serde_json::json!({
            "accelerator": "sec1",
            "function": null,
            "constraint": "queue_pairs",
            "free": 16,
            "total": 16,
            "need": 17
        })
    );
    assert_eq!(json[0]["constraint"], "not_allowed");
}
