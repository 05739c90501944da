//! One graph of the host: what discovery found, merged with what the YAML
//! declares. The rules (`docs/topology.md`):
//!
//! * **NUMA nodes**: every node found is kept. A YAML node with the same id
//!   overrides it (its `cpus` if given, each distance it gives); a YAML node
//!   with a new id is added. A YAML node claiming a CPU that the host puts
//!   in another node (one the YAML does not redefine) is a conflict.
//! * **Hardware accelerators** (UACCE, IDXD) are always added. A YAML entry
//!   of the same name (`backend: uacce` or `idxd`) restricts or overrides
//!   it: fewer queue pairs, fewer PASIDs, a subset of its operations, another
//!   NUMA node, extra links. Asking for more than the device has, another
//!   backend than the interface it was found behind, or naming a device the
//!   host does not have, is a conflict.
//! * **Software engines** are discovered only when the YAML declares no
//!   `backend: soft` accelerator: declared ones are the operator's own
//!   description of them and replace discovery's.
//!
//! A conflict is a [`ConfigErrors`] placed at the YAML entry, like every
//! other configuration error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::model::{Discovery, FoundAccelerator, Interface, Problem};
use super::sources::{Source, discover_with};
use super::sysfs::{ProblemKind, Sysfs};
use crate::config::{
    Backend, Config, ConfigError, ConfigErrors, Endpoint, HostNames, Located, Place,
};
use crate::partition::{
    AcceleratorSpec, LinkSpec, Node, NumaSpec, Topology, TopologyError, TopologySpec, ops_names,
};

/// The distance from an accelerator to its NUMA node when nothing says
/// otherwise (ACPI SLIT's "local").
pub const LOCAL_DISTANCE: u32 = 10;

/// Where a vertex or an edge of the graph comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Discovered,
    Yaml,
    /// Found, then restricted or overridden by the YAML.
    Merged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostNuma {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory_kib: Option<u64>,
    /// `cpus+memory`, `memory-only`, `initiator`, `empty`, or `declared` for
    /// a node only the YAML knows.
    pub role: &'static str,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostAccelerator {
    pub name: String,
    pub backend: Backend,
    pub engines: u32,
    pub queue_pairs: u32,
    pub ops: u32,
    pub pasids: u32,
    pub numa_node: Option<u32>,
    pub origin: Origin,
    /// `backend.drivable()`, kept for the JSON listings: whether this build
    /// runs it. The daemon places instances on these; `wdvirt plan` shows
    /// every one.
    pub drivable: bool,
    /// What discovery read, when it was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<FoundAccelerator>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostLink {
    pub a: Node,
    pub b: Node,
    pub distance: u32,
    pub origin: Origin,
}

/// The merged host: the graph placement runs on, with where each part came
/// from and what discovery had to skip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    pub numa: Vec<HostNuma>,
    pub accelerators: Vec<HostAccelerator>,
    pub links: Vec<HostLink>,
    pub problems: Vec<Problem>,
}

/// Why the host could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "sysfs root {}: not a directory (give --sysfs the running machine's /sys or a recorded tree)",
        .0.display()
    )]
    NoSysfs(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigErrors),
}

/// What a command starts from: the configuration, what discovery read and
/// the merged graph.
#[derive(Debug, Clone)]
pub struct OnHost {
    pub cfg: Config,
    pub found: Discovery,
    pub host: Host,
}

/// Discovers the host under `sysfs` with `sources`, loads the configuration
/// with `config` (which is given the names discovery found, for the YAML to
/// use) and merges the two. The one way the daemon, `wdvirt validate`,
/// `topology` and `plan` see a host. A root that is not a directory fails:
/// an empty host is never what was meant.
pub fn load(
    sysfs: &Path,
    sources: &[Box<dyn Source>],
    config: impl FnOnce(&HostNames) -> Result<Config, ConfigErrors>,
) -> Result<OnHost, LoadError> {
    let sys = Sysfs::new(sysfs);
    if !sys.exists() {
        return Err(LoadError::NoSysfs(sysfs.to_path_buf()));
    }
    let found = discover_with(&sys, sources);
    let cfg = config(&found.names())?;
    let host = merge(&cfg, &found)?;
    Ok(OnHost { cfg, found, host })
}

fn pair(a: Node, b: Node) -> (Node, Node) {
    if a <= b { (a, b) } else { (b, a) }
}

fn conflict(place: &Place, message: String) -> Located {
    Located::at(place.clone(), ConfigError::HostConflict { message })
}

/// Merges `found` with `cfg` (see the module doc for the rules).
pub fn merge(cfg: &Config, found: &Discovery) -> Result<Host, ConfigErrors> {
    let mut errors = Vec::new();
    let mut problems = found.problems.clone();

    // NUMA nodes.
    let mut numa: BTreeMap<u32, HostNuma> = found
        .numa
        .iter()
        .map(|n| {
            let h = HostNuma {
                id: n.id,
                cpus: n.cpus.clone(),
                memory_kib: n.memory_kib,
                role: n.role(),
                origin: Origin::Discovered,
            };
            (n.id, h)
        })
        .collect();
    let mut edges: BTreeMap<(Node, Node), (u32, Origin)> = BTreeMap::new();
    for n in &found.numa {
        for (&to, &d) in &n.distances {
            if to == n.id {
                continue;
            }
            let back = found
                .numa_node(to)
                .and_then(|m| m.distances.get(&n.id))
                .copied();
            if n.id > to && back.is_some() {
                continue; // taken from the lower node's row
            }
            let d = match back {
                Some(b) if b != d => {
                    problems.push(Problem {
                        path: format!("devices/system/node/node{}/distance", n.id),
                        reader: "numa",
                        kind: ProblemKind::Skipped(format!(
                            "node{}–node{to} is {d} one way and {b} the other; using {}",
                            n.id,
                            d.max(b)
                        )),
                    });
                    d.max(b)
                }
                _ => d,
            };
            edges.insert(
                pair(Node::Numa(n.id), Node::Numa(to)),
                (d, Origin::Discovered),
            );
        }
    }
    let yaml_ids: Vec<u32> = cfg.numa_nodes.iter().map(|n| n.id).collect();
    for y in &cfg.numa_nodes {
        if !y.cpus.is_empty() {
            // A CPU the host puts in a node the YAML leaves alone.
            for other in found.numa.iter().filter(|o| !yaml_ids.contains(&o.id)) {
                if let Some(cpu) = y.cpus.iter().find(|c| other.cpus.contains(c)) {
                    errors.push(conflict(
                        &y.origin,
                        format!(
                            "NUMA node {} lists CPU {cpu}, which this host puts in node{} \
                             (devices/system/node/node{}/cpulist); redefine node{} too, or leave CPU {cpu} out",
                            y.id, other.id, other.id, other.id
                        ),
                    ));
                }
            }
        }
        match numa.get_mut(&y.id) {
            Some(h) => {
                if !y.cpus.is_empty() {
                    h.cpus = y.cpus.clone();
                }
                h.origin = Origin::Merged;
            }
            None => {
                numa.insert(
                    y.id,
                    HostNuma {
                        id: y.id,
                        cpus: y.cpus.clone(),
                        memory_kib: None,
                        role: "declared",
                        origin: Origin::Yaml,
                    },
                );
            }
        }
        for (&to, &d) in &y.distances {
            if to != y.id {
                let key = pair(Node::Numa(y.id), Node::Numa(to));
                let origin = if edges.contains_key(&key) {
                    Origin::Merged
                } else {
                    Origin::Yaml
                };
                edges.insert(key, (d, origin));
            }
        }
    }
    // An accelerator's distance to its own node: the node's SLIT self
    // distance (YAML's first, then the host's), else LOCAL_DISTANCE.
    let local = |n: u32| {
        cfg.numa_node(n)
            .and_then(|y| y.distances.get(&n).copied())
            .or_else(|| {
                found
                    .numa_node(n)
                    .and_then(|f| f.distances.get(&n).copied())
            })
            .unwrap_or(LOCAL_DISTANCE)
    };

    // Accelerators.
    let declares_soft = cfg.accelerators.iter().any(|a| a.backend == Backend::Soft);
    let mut accels: Vec<HostAccelerator> = found
        .accelerators
        .iter()
        .filter(|f| !(declares_soft && f.interface == Interface::Soft))
        .map(|f| HostAccelerator {
            name: f.name.clone(),
            backend: f.interface.backend(),
            engines: f.engines,
            queue_pairs: f.queue_pairs,
            ops: f.ops,
            pasids: f.pasids,
            numa_node: f.numa_node,
            origin: Origin::Discovered,
            drivable: f.interface.backend().drivable(),
            found: Some(f.clone()),
        })
        .collect();
    let hardware: Vec<String> = found
        .accelerators
        .iter()
        .filter(|f| f.interface != Interface::Soft)
        .map(|f| f.name.clone())
        .collect();
    for y in &cfg.accelerators {
        let existing = accels.iter_mut().find(|a| a.name == y.name);
        match (y.backend, existing) {
            (Backend::Soft, None) => accels.push(HostAccelerator {
                name: y.name.clone(),
                backend: Backend::Soft,
                engines: y.engines,
                queue_pairs: y.queue_pairs,
                ops: y.ops,
                pasids: y.pasids,
                numa_node: y.numa_node,
                origin: Origin::Yaml,
                drivable: Backend::Soft.drivable(),
                found: None,
            }),
            (backend, Some(a)) => {
                let f = a.found.clone();
                let path = f.as_ref().map_or(String::new(), |f| f.path.clone());
                if a.backend != backend {
                    errors.push(conflict(
                        &y.origin,
                        format!(
                            "'{}' is a {} device on this host ({path}), declared here with backend {}",
                            y.name,
                            a.backend, backend
                        ),
                    ));
                    continue;
                }
                let mut over = Vec::new();
                if y.queue_pairs > a.queue_pairs {
                    over.push(format!(
                        "queue_pairs {} but the device has {} free",
                        y.queue_pairs, a.queue_pairs
                    ));
                }
                if y.pasids > a.pasids {
                    over.push(format!(
                        "pasids {} but the device can hold {}",
                        y.pasids, a.pasids
                    ));
                }
                if y.ops & !a.ops != 0 {
                    over.push(format!(
                        "operations {} the device does not run (it runs {})",
                        ops_names(y.ops & !a.ops),
                        ops_names(a.ops)
                    ));
                }
                if !over.is_empty() {
                    errors.push(conflict(
                        &y.origin,
                        format!(
                            "'{}' ({path}) can only be restricted: {}",
                            y.name,
                            over.join("; ")
                        ),
                    ));
                    continue;
                }
                a.queue_pairs = y.queue_pairs;
                a.pasids = y.pasids;
                a.ops = y.ops;
                a.engines = y.engines;
                if y.numa_node.is_some() {
                    a.numa_node = y.numa_node;
                }
                a.origin = Origin::Merged;
            }
            (backend, None) => errors.push(conflict(
                &y.origin,
                format!(
                    "no {} device named '{}' on this host (found: {})",
                    backend.name(),
                    y.name,
                    if hardware.is_empty() {
                        "none".to_string()
                    } else {
                        hardware.join(", ")
                    }
                ),
            )),
        }
    }
    for a in &accels {
        let Some(n) = a.numa_node else { continue };
        if !numa.contains_key(&n) {
            problems.push(Problem {
                path: a.found.as_ref().map_or(a.name.clone(), |f| f.path.clone()),
                reader: "merge",
                kind: ProblemKind::Skipped(format!(
                    "{} is on NUMA node {n}, which the host graph does not have; left unlinked",
                    a.name
                )),
            });
            continue;
        }
        // The YAML's when it moved the accelerator to another node.
        let origin = if a.origin != Origin::Discovered
            && cfg.accelerator(&a.name).and_then(|y| y.numa_node).is_some()
        {
            Origin::Yaml
        } else {
            Origin::Discovered
        };
        edges.insert(
            pair(Node::Accelerator(a.name.clone()), Node::Numa(n)),
            (local(n), origin),
        );
    }
    for y in &cfg.accelerators {
        if !accels.iter().any(|a| a.name == y.name) {
            continue; // refused above
        }
        let accels = &accels;
        for l in &y.links {
            let to = match &l.to {
                Endpoint::Accelerator(x) => {
                    if !accels.iter().any(|a| &a.name == x) {
                        // Found, but left out (a discovered software engine
                        // the YAML's own replace).
                        errors.push(conflict(
                            &y.origin,
                            format!(
                                "'{}' links to '{x}', which the host graph does not have",
                                y.name
                            ),
                        ));
                        continue;
                    }
                    Node::Accelerator(x.clone())
                }
                Endpoint::NumaNode(x) => Node::Numa(*x),
            };
            let key = pair(Node::Accelerator(y.name.clone()), to);
            let origin = if edges.contains_key(&key) {
                Origin::Merged
            } else {
                Origin::Yaml
            };
            edges.insert(key, (l.distance, origin));
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Host {
        numa: numa.into_values().collect(),
        accelerators: accels,
        links: edges
            .into_iter()
            .map(|((a, b), (distance, origin))| HostLink {
                a,
                b,
                distance,
                origin,
            })
            .collect(),
        problems,
    })
}

impl Host {
    /// The partition layer's input: every accelerator, or only those this
    /// build can drive (what the daemon places on).
    pub fn spec(&self, drivable_only: bool) -> TopologySpec {
        let keep = |name: &str| {
            self.accelerators
                .iter()
                .any(|a| a.name == name && (a.drivable || !drivable_only))
        };
        TopologySpec {
            numa_nodes: self
                .numa
                .iter()
                .map(|n| NumaSpec {
                    id: n.id,
                    cpus: n.cpus.clone(),
                })
                .collect(),
            accelerators: self
                .accelerators
                .iter()
                .filter(|a| keep(&a.name))
                .map(|a| AcceleratorSpec {
                    name: a.name.clone(),
                    backend: a.backend.name().to_string(),
                    engines: a.engines.max(1),
                    queue_pairs: a.queue_pairs,
                    ops: a.ops,
                    pasids: a.pasids,
                })
                .collect(),
            links: self
                .links
                .iter()
                .filter(|l| {
                    [&l.a, &l.b].iter().all(|n| match n {
                        Node::Numa(_) => true,
                        Node::Accelerator(x) => keep(x),
                    })
                })
                .map(|l| LinkSpec {
                    a: l.a.clone(),
                    b: l.b.clone(),
                    distance: i64::from(l.distance),
                })
                .collect(),
        }
    }

    /// The graph with shortest distances (see [`Self::spec`]).
    pub fn topology(&self, drivable_only: bool) -> Result<Topology, TopologyError> {
        Topology::new(self.spec(drivable_only))
    }
}
