//! The host's topology as a weighted graph: NUMA nodes and accelerators are
//! vertices; links (NUMA–NUMA distances, accelerator–NUMA locality,
//! accelerator–accelerator links such as a shared HBM or switch) are
//! undirected edges. The distance between any two vertices is the shortest
//! path, through any vertex (Floyd–Warshall, computed once at build time).
//!
//! Why a graph and not a tree (an accelerator under one NUMA node): two
//! accelerators can each be local to a different CPU node and still be close
//! to each other (Alan Cox on the WarpDrive RFC, `../shared/seed/`: "It's not
//! a hierarchy, it's a graph"). A tree would price such a pair at
//! accel–node–node–accel and miss the short link between them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use wdvirt_abi::Opcode;

use super::pasid::PASID_MAX;

/// Most queue pairs one accelerator may declare. Hardware has hundreds to a
/// thousand or so (a HiSilicon ZIP PF: 1024); the pool keeps one entry per
/// queue pair, so an absurd value in a config must not become an absurd
/// allocation.
pub const MAX_QUEUE_PAIRS: u32 = 65_536;

/// Every operation bit this build knows (bit n = opcode n): the ABI's.
pub use wdvirt_abi::ALL_OPS as KNOWN_OPS;

/// Names of the operations in `mask`, joined by `/` (`sha256/crc32c`);
/// unknown bits print as `op<N>`.
pub fn ops_names(mask: u32) -> String {
    let known = Opcode::in_mask(mask).map(|op| op.name().to_string());
    let unknown = (0..32)
        .filter(|bit| mask & !KNOWN_OPS & (1 << bit) != 0)
        .map(|bit| format!("op{bit}"));
    known.chain(unknown).collect::<Vec<_>>().join("/")
}

/// A vertex of the topology as the caller names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Node {
    /// A NUMA node by its id (as in `/sys/devices/system/node/nodeN`).
    Numa(u32),
    /// An accelerator by its name.
    Accelerator(String),
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Numa(id) => write!(f, "node{id}"),
            Node::Accelerator(name) => f.write_str(name),
        }
    }
}

/// One NUMA node of the input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaSpec {
    pub id: u32,
    /// CPUs local to the node; may be empty (a memory-only node).
    pub cpus: Vec<u32>,
}

/// One accelerator of the input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceleratorSpec {
    pub name: String,
    /// Backend kind (`soft` today); carried for listings, not interpreted here.
    pub backend: String,
    /// Engines (worker threads or hardware engines); at least 1.
    pub engines: u32,
    /// Queue pairs in the accelerator's pool; at least 1.
    pub queue_pairs: u32,
    /// Operations it runs: bit n = opcode n (`wdvirt_abi::Opcode::bit`).
    pub ops: u32,
    /// How many PASIDs it can hold bound at once (live + draining), 1..=2^20-1.
    pub pasids: u32,
}

/// One undirected link of the input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSpec {
    pub a: Node,
    pub b: Node,
    /// Positive. Signed so that a negative value from a config file reaches
    /// this validator and is refused by name rather than wrapping.
    pub distance: i64,
}

/// The whole input: what the config layer hands to [`Topology::new`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologySpec {
    pub numa_nodes: Vec<NumaSpec>,
    pub accelerators: Vec<AcceleratorSpec>,
    pub links: Vec<LinkSpec>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TopologyError {
    #[error("NUMA node {0} is listed twice")]
    DuplicateNumaNode(u32),
    #[error("CPU {cpu} is listed in NUMA nodes {first} and {second}")]
    CpuInTwoNodes { cpu: u32, first: u32, second: u32 },
    #[error("an accelerator has an empty name")]
    EmptyAcceleratorName,
    #[error("accelerator {0:?} is listed twice")]
    DuplicateAccelerator(String),
    #[error("accelerator name {0:?} would read as a NUMA node in messages; choose another")]
    ReservedAcceleratorName(String),
    #[error("accelerator {0}: needs at least one engine")]
    NoEngines(String),
    #[error("accelerator {0}: needs at least one queue pair")]
    NoQueuePairs(String),
    #[error("accelerator {name}: {queue_pairs} queue pairs, at most {max} are supported", max = MAX_QUEUE_PAIRS)]
    TooManyQueuePairs { name: String, queue_pairs: u32 },
    #[error("accelerator {name}: PASID capacity {capacity} is outside 1..={max}", max = PASID_MAX)]
    PasidCapacity { name: String, capacity: u32 },
    #[error("accelerator {0}: runs no operation")]
    NoOperations(String),
    #[error("accelerator {name}: unknown operation bits {bits:#x}")]
    UnknownOperations { name: String, bits: u32 },
    #[error("link {a}–{b}: {node} is not a known NUMA node or accelerator")]
    UnknownNode { a: Node, b: Node, node: Node },
    #[error("link {0}–{0}: a node cannot link to itself")]
    SelfLink(Node),
    #[error("link {a}–{b} is given twice")]
    DuplicateLink { a: Node, b: Node },
    #[error("link {a}–{b}: distance must be positive, got {distance}")]
    BadDistance { a: Node, b: Node, distance: i64 },
}

/// A validated NUMA node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    pub id: u32,
    pub cpus: Vec<u32>,
}

/// A validated accelerator (same fields as [`AcceleratorSpec`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Accelerator {
    pub name: String,
    pub backend: String,
    pub engines: u32,
    pub queue_pairs: u32,
    pub ops: u32,
    pub pasids: u32,
}

/// The validated graph with all-pairs shortest distances.
///
/// Vertex indexes: NUMA nodes first (in input order), then accelerators (in
/// input order). Accelerator index `i` in this module's APIs means the i-th
/// accelerator, i.e. vertex `numa.len() + i`.
#[derive(Clone, Debug)]
pub struct Topology {
    numa: Vec<NumaNode>,
    accels: Vec<Accelerator>,
    numa_index: HashMap<u32, usize>,
    accel_index: HashMap<String, usize>,
    /// `dist[u][v]`: shortest path length, `None` if not connected.
    dist: Vec<Vec<Option<u64>>>,
}

impl Topology {
    /// Validates `spec` and computes every shortest distance.
    pub fn new(spec: TopologySpec) -> Result<Topology, TopologyError> {
        let mut numa_index = HashMap::new();
        let mut cpu_owner: BTreeMap<u32, u32> = BTreeMap::new();
        let mut numa = Vec::new();
        for n in spec.numa_nodes {
            if numa_index.insert(n.id, numa.len()).is_some() {
                return Err(TopologyError::DuplicateNumaNode(n.id));
            }
            for &cpu in &n.cpus {
                if let Some(&first) = cpu_owner.get(&cpu) {
                    // A CPU listed twice in one node is harmless; in two is not.
                    if first != n.id {
                        return Err(TopologyError::CpuInTwoNodes {
                            cpu,
                            first,
                            second: n.id,
                        });
                    }
                }
                cpu_owner.insert(cpu, n.id);
            }
            numa.push(NumaNode {
                id: n.id,
                cpus: n.cpus,
            });
        }
        let mut accel_index = HashMap::new();
        let mut accels = Vec::new();
        for a in spec.accelerators {
            validate_accelerator(&a)?;
            if accel_index.insert(a.name.clone(), accels.len()).is_some() {
                return Err(TopologyError::DuplicateAccelerator(a.name));
            }
            accels.push(Accelerator {
                name: a.name,
                backend: a.backend,
                engines: a.engines,
                queue_pairs: a.queue_pairs,
                ops: a.ops,
                pasids: a.pasids,
            });
        }
        let n = numa.len() + accels.len();
        let mut dist = vec![vec![None; n]; n];
        for (v, row) in dist.iter_mut().enumerate() {
            row[v] = Some(0);
        }
        let mut seen = BTreeSet::new();
        for link in &spec.links {
            let vertex = |node: &Node| match node {
                Node::Numa(id) => numa_index.get(id).copied(),
                Node::Accelerator(name) => accel_index.get(name).map(|i| numa.len() + i),
            };
            let unknown = |node: &Node| TopologyError::UnknownNode {
                a: link.a.clone(),
                b: link.b.clone(),
                node: node.clone(),
            };
            let u = vertex(&link.a).ok_or_else(|| unknown(&link.a))?;
            let v = vertex(&link.b).ok_or_else(|| unknown(&link.b))?;
            if u == v {
                return Err(TopologyError::SelfLink(link.a.clone()));
            }
            if link.distance <= 0 {
                return Err(TopologyError::BadDistance {
                    a: link.a.clone(),
                    b: link.b.clone(),
                    distance: link.distance,
                });
            }
            if !seen.insert((u.min(v), u.max(v))) {
                return Err(TopologyError::DuplicateLink {
                    a: link.a.clone(),
                    b: link.b.clone(),
                });
            }
            let d = link.distance as u64;
            dist[u][v] = Some(d);
            dist[v][u] = Some(d);
        }
        // Floyd–Warshall: the graphs are tens of vertices, and the result is
        // read on every placement, so compute it once.
        for k in 0..n {
            let via = dist[k].clone();
            for row in dist.iter_mut() {
                let Some(ik) = row[k] else { continue };
                for (cell, kj) in row.iter_mut().zip(&via) {
                    if let Some(kj) = kj {
                        let through = ik.saturating_add(*kj);
                        if cell.is_none_or(|d| through < d) {
                            *cell = Some(through);
                        }
                    }
                }
            }
        }
        Ok(Topology {
            numa,
            accels,
            numa_index,
            accel_index,
            dist,
        })
    }

    pub fn numa_nodes(&self) -> &[NumaNode] {
        &self.numa
    }

    pub fn accelerators(&self) -> &[Accelerator] {
        &self.accels
    }

    pub fn accelerator(&self, name: &str) -> Option<&Accelerator> {
        self.accel_index.get(name).map(|&i| &self.accels[i])
    }

    /// Index of accelerator `name` in [`Self::accelerators`].
    pub fn accelerator_index(&self, name: &str) -> Option<usize> {
        self.accel_index.get(name).copied()
    }

    pub(crate) fn has_numa(&self, id: u32) -> bool {
        self.numa_index.contains_key(&id)
    }

    /// Shortest distance between two vertices; `None` if either is unknown
    /// or no path joins them.
    pub fn distance(&self, a: &Node, b: &Node) -> Option<u64> {
        self.dist[self.vertex(a)?][self.vertex(b)?]
    }

    /// Distance between accelerators `a` and `b` (indexes).
    pub(crate) fn accel_distance(&self, a: usize, b: usize) -> Option<u64> {
        let base = self.numa.len();
        self.dist[base + a][base + b]
    }

    /// Distance from accelerator `a` (index) to NUMA node `id`.
    pub(crate) fn numa_distance(&self, a: usize, id: u32) -> Option<u64> {
        let n = *self.numa_index.get(&id)?;
        self.dist[self.numa.len() + a][n]
    }

    fn vertex(&self, node: &Node) -> Option<usize> {
        match node {
            Node::Numa(id) => self.numa_index.get(id).copied(),
            Node::Accelerator(name) => self.accel_index.get(name).map(|i| self.numa.len() + i),
        }
    }
}

fn validate_accelerator(a: &AcceleratorSpec) -> Result<(), TopologyError> {
    let name = || a.name.clone();
    if a.name.is_empty() {
        return Err(TopologyError::EmptyAcceleratorName);
    }
    if a.name
        .strip_prefix("node")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(TopologyError::ReservedAcceleratorName(name()));
    }
    if a.engines == 0 {
        return Err(TopologyError::NoEngines(name()));
    }
    if a.queue_pairs == 0 {
        return Err(TopologyError::NoQueuePairs(name()));
    }
    if a.queue_pairs > MAX_QUEUE_PAIRS {
        return Err(TopologyError::TooManyQueuePairs {
            name: name(),
            queue_pairs: a.queue_pairs,
        });
    }
    if a.pasids == 0 || a.pasids > PASID_MAX {
        return Err(TopologyError::PasidCapacity {
            name: name(),
            capacity: a.pasids,
        });
    }
    if a.ops == 0 {
        return Err(TopologyError::NoOperations(name()));
    }
    if a.ops & !KNOWN_OPS != 0 {
        return Err(TopologyError::UnknownOperations {
            name: name(),
            bits: a.ops & !KNOWN_OPS,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accel(name: &str) -> AcceleratorSpec {
        AcceleratorSpec {
            name: name.into(),
            backend: "soft".into(),
            engines: 1,
            queue_pairs: 4,
            ops: Opcode::Copy.bit(),
            pasids: 8,
        }
    }

    fn link(a: Node, b: Node, distance: i64) -> LinkSpec {
        LinkSpec { a, b, distance }
    }

    fn acc(name: &str) -> Node {
        Node::Accelerator(name.into())
    }

    fn two_nodes(accels: Vec<AcceleratorSpec>, links: Vec<LinkSpec>) -> TopologySpec {
        TopologySpec {
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
            accelerators: accels,
            links,
        }
    }

    #[test]
    fn distances_are_shortest_paths_through_any_vertex() {
        // a is local to node0, b to node1, and a–b share a short link: the
        // tree path a–node0–node1–b (40) loses to the direct link (4), and
        // node0–b goes through a (14), not through node1 (30).
        let t = Topology::new(two_nodes(
            vec![accel("a"), accel("b"), accel("lonely")],
            vec![
                link(Node::Numa(0), Node::Numa(1), 20),
                link(acc("a"), Node::Numa(0), 10),
                link(acc("b"), Node::Numa(1), 10),
                link(acc("a"), acc("b"), 4),
            ],
        ))
        .unwrap();
        assert_eq!(t.distance(&acc("a"), &acc("b")), Some(4));
        assert_eq!(t.distance(&Node::Numa(0), &acc("b")), Some(14));
        assert_eq!(t.distance(&Node::Numa(0), &Node::Numa(1)), Some(20));
        assert_eq!(t.distance(&acc("a"), &acc("a")), Some(0));
        assert_eq!(t.distance(&acc("a"), &acc("lonely")), None);
        assert_eq!(t.distance(&acc("a"), &acc("nope")), None);
        assert_eq!(t.accel_distance(0, 1), Some(4));
        assert_eq!(t.numa_distance(1, 0), Some(14));
        assert_eq!(t.numa_distance(1, 7), None);
    }

    #[test]
    fn inconsistent_input_is_refused_by_name() {
        let base_links = || vec![link(Node::Numa(0), Node::Numa(1), 20)];
        let cases: Vec<(TopologySpec, TopologyError)> = vec![
            (
                two_nodes(vec![accel("a")], vec![link(acc("a"), Node::Numa(5), 10)]),
                TopologyError::UnknownNode {
                    a: acc("a"),
                    b: Node::Numa(5),
                    node: Node::Numa(5),
                },
            ),
            (
                two_nodes(vec![accel("a")], vec![link(acc("zz"), acc("a"), 1)]),
                TopologyError::UnknownNode {
                    a: acc("zz"),
                    b: acc("a"),
                    node: acc("zz"),
                },
            ),
            (
                two_nodes(vec![accel("a"), accel("a")], base_links()),
                TopologyError::DuplicateAccelerator("a".into()),
            ),
            (
                two_nodes(vec![accel("a")], vec![link(acc("a"), Node::Numa(0), 0)]),
                TopologyError::BadDistance {
                    a: acc("a"),
                    b: Node::Numa(0),
                    distance: 0,
                },
            ),
            (
                two_nodes(vec![accel("a")], vec![link(acc("a"), Node::Numa(0), -3)]),
                TopologyError::BadDistance {
                    a: acc("a"),
                    b: Node::Numa(0),
                    distance: -3,
                },
            ),
            (
                two_nodes(vec![accel("a")], vec![link(acc("a"), acc("a"), 3)]),
                TopologyError::SelfLink(acc("a")),
            ),
            (
                two_nodes(
                    vec![],
                    vec![
                        link(Node::Numa(0), Node::Numa(1), 20),
                        link(Node::Numa(1), Node::Numa(0), 21),
                    ],
                ),
                TopologyError::DuplicateLink {
                    a: Node::Numa(1),
                    b: Node::Numa(0),
                },
            ),
            (
                two_nodes(
                    vec![AcceleratorSpec {
                        queue_pairs: 0,
                        ..accel("a")
                    }],
                    vec![],
                ),
                TopologyError::NoQueuePairs("a".into()),
            ),
            (
                two_nodes(
                    vec![AcceleratorSpec {
                        queue_pairs: MAX_QUEUE_PAIRS + 1,
                        ..accel("a")
                    }],
                    vec![],
                ),
                TopologyError::TooManyQueuePairs {
                    name: "a".into(),
                    queue_pairs: MAX_QUEUE_PAIRS + 1,
                },
            ),
            (
                two_nodes(
                    vec![AcceleratorSpec {
                        engines: 0,
                        ..accel("a")
                    }],
                    vec![],
                ),
                TopologyError::NoEngines("a".into()),
            ),
            (
                two_nodes(
                    vec![AcceleratorSpec {
                        pasids: 0,
                        ..accel("a")
                    }],
                    vec![],
                ),
                TopologyError::PasidCapacity {
                    name: "a".into(),
                    capacity: 0,
                },
            ),
            (
                two_nodes(
                    vec![AcceleratorSpec {
                        pasids: PASID_MAX + 1,
                        ..accel("a")
                    }],
                    vec![],
                ),
                TopologyError::PasidCapacity {
                    name: "a".into(),
                    capacity: PASID_MAX + 1,
                },
            ),
            (
                two_nodes(
                    vec![AcceleratorSpec {
                        ops: 0,
                        ..accel("a")
                    }],
                    vec![],
                ),
                TopologyError::NoOperations("a".into()),
            ),
            (
                two_nodes(
                    vec![AcceleratorSpec {
                        ops: 1 << 31 | 1,
                        ..accel("a")
                    }],
                    vec![],
                ),
                TopologyError::UnknownOperations {
                    name: "a".into(),
                    bits: 1 << 31,
                },
            ),
            (
                two_nodes(vec![accel("")], vec![]),
                TopologyError::EmptyAcceleratorName,
            ),
            (
                two_nodes(vec![accel("node1")], vec![]),
                TopologyError::ReservedAcceleratorName("node1".into()),
            ),
            (
                TopologySpec {
                    numa_nodes: vec![
                        NumaSpec {
                            id: 0,
                            cpus: vec![0],
                        },
                        NumaSpec {
                            id: 0,
                            cpus: vec![1],
                        },
                    ],
                    ..TopologySpec::default()
                },
                TopologyError::DuplicateNumaNode(0),
            ),
            (
                TopologySpec {
                    numa_nodes: vec![
                        NumaSpec {
                            id: 0,
                            cpus: vec![0, 1],
                        },
                        NumaSpec {
                            id: 1,
                            cpus: vec![1, 2],
                        },
                    ],
                    ..TopologySpec::default()
                },
                TopologyError::CpuInTwoNodes {
                    cpu: 1,
                    first: 0,
                    second: 1,
                },
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(Topology::new(spec).unwrap_err(), want);
        }
        // Names that merely start with "node" are fine.
        assert!(Topology::new(two_nodes(vec![accel("nodeA"), accel("node")], vec![])).is_ok());
    }

    #[test]
    fn errors_read_well() {
        let e = TopologyError::BadDistance {
            a: acc("zip0"),
            b: Node::Numa(1),
            distance: -3,
        };
        assert_eq!(
            e.to_string(),
            "link zip0–node1: distance must be positive, got -3"
        );
        let e = TopologyError::UnknownNode {
            a: acc("zip0"),
            b: Node::Numa(9),
            node: Node::Numa(9),
        };
        assert_eq!(
            e.to_string(),
            "link zip0–node9: node9 is not a known NUMA node or accelerator"
        );
    }

    #[test]
    fn ops_names_list_every_bit() {
        assert_eq!(ops_names(Opcode::Sha256.bit()), "sha256");
        assert_eq!(
            ops_names(Opcode::Crc32c.bit() | Opcode::Sha256.bit() | 1 << 30),
            "crc32c/sha256/op30"
        );
        assert_eq!(KNOWN_OPS.count_ones() as usize, Opcode::ALL.len());
    }
}
