//! What the daemon can make: instance types and QoS policies from the
//! configuration, the accelerators with their running backends, and
//! placement on the host's graph (the partition layer). The adapter between
//! `config` and `partition` below and the registry above.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::accel::{Pasid, SharedAccelerator};
use crate::config::{self, Config, InstanceType};
use crate::partition::{
    Allocation, FunctionRequest, Node, Partitioner, PlacementRequest, Topology,
};
use crate::qos::{Policy, ScheduledAccel, TenantSnapshot};
use crate::topology::{self, host::Host};

use crate::vdev::wd::WdConfig;
use crate::vdev::wd::backends::Backends;

use super::view::{AcceleratorView, FunctionView, PlacedFunction, TypeView, Usage};

/// Checks what the YAML loader cannot see alone: the host graph (what
/// discovery found merged with the configuration) is consistent, and every
/// type can be placed on the accelerators this build drives when nothing
/// else is placed (distances included). Errors point at the type.
pub fn check_placeable(cfg: &Config, host: &Host) -> Result<Topology, CatalogError> {
    let topo = host.topology(true)?;
    let errors: Vec<config::Located> = cfg
        .types
        .iter()
        .filter_map(|t| {
            let req = TypeDef::from_config(t).placement;
            let reason = topo.check_hostable(&req).err()?.to_string();
            Some(config::Located::at(
                t.origin.clone(),
                config::ConfigError::NeverPlaceable {
                    name: t.name.clone(),
                    reason,
                },
            ))
        })
        .collect();
    if errors.is_empty() {
        Ok(topo)
    } else {
        Err(config::ConfigErrors(errors).into())
    }
}

/// The host as the daemon sees it: discovery under `sysfs` merged with the
/// configuration (`docs/topology.md`).
pub fn host(cfg: &Config, found: &topology::Discovery) -> Result<Host, CatalogError> {
    Ok(topology::host::merge(cfg, found)?)
}

/// The configuration at `paths` on the host whose sysfs is `sysfs`: the
/// files may name what discovery found there.
/// Each problem discovery or the merge met is logged once, at warn.
pub fn load_on(paths: &[PathBuf], sysfs: &Path) -> Result<(Config, Host), CatalogError> {
    let on = topology::host::load(sysfs, &topology::placement_sources(), |names| {
        config::load_paths_on(paths, names)
    })
    .map_err(|e| match e {
        topology::host::LoadError::Config(e) => CatalogError::Config(e),
        e => CatalogError::Host(e),
    })?;
    let mut logged = std::collections::BTreeSet::new();
    for p in &on.host.problems {
        if logged.insert(p.to_string()) {
            tracing::warn!(reader = p.reader, "discovery: {p}");
        }
    }
    Ok((on.cfg, on.host))
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Config(#[from] config::ConfigErrors),
    #[error("the configuration's topology: {0}")]
    Topology(#[from] crate::partition::TopologyError),
    #[error(transparent)]
    Host(topology::host::LoadError),
    #[error("accelerator {name}: cannot start its engines: {source}")]
    Backend {
        name: String,
        source: std::io::Error,
    },
}

/// One instance type, resolved: its functions are its placement request's.
#[derive(Clone, Debug)]
pub struct TypeDef {
    pub name: String,
    pub max_depth: u32,
    pub qos: String,
    pub placement: PlacementRequest,
}

impl TypeDef {
    pub fn from_config(t: &InstanceType) -> TypeDef {
        TypeDef {
            name: t.name.clone(),
            max_depth: t.max_depth,
            qos: t.qos.clone(),
            placement: PlacementRequest {
                functions: t
                    .functions
                    .iter()
                    .map(|f| FunctionRequest {
                        queues: f.queues,
                        ops: f.ops,
                    })
                    .collect(),
                max_distance: t.placement.max_distance.map(u64::from),
                accelerators: t.placement.accelerators.clone(),
                numa_node: t.placement.numa_node,
            },
        }
    }

    pub fn functions(&self) -> &[FunctionRequest] {
        &self.placement.functions
    }

    pub fn queues(&self) -> u32 {
        self.functions().iter().map(|f| f.queues).sum()
    }

    /// The request for one instance near `numa` (the definition's hint wins
    /// over the type's).
    fn request(&self, numa: Option<u32>) -> PlacementRequest {
        PlacementRequest {
            numa_node: numa.or(self.placement.numa_node),
            ..self.placement.clone()
        }
    }
}

/// What placement gave one started instance, in the device's terms; the
/// allocation goes back at stop.
pub struct Placed {
    pub allocation: Allocation,
    /// The instance's shape: its type's, each queue advertising its
    /// function's operations.
    pub config: WdConfig,
    /// Each queue's accelerator.
    pub backends: Backends,
    pub functions: Vec<PlacedFunction>,
}

impl Placed {
    pub fn pasid(&self) -> Pasid {
        self.allocation.pasid
    }
}

/// The accelerators an allocation's functions are on, each once (whatever
/// the order of its functions).
fn accelerators_of(allocation: &Allocation) -> BTreeSet<&str> {
    allocation
        .functions
        .iter()
        .map(|f| f.accelerator.as_str())
        .collect()
}

/// What every scheduler reported at one moment, by accelerator name (see
/// [`Catalog::qos_accounts`]).
pub struct QosAccounts(BTreeMap<String, Vec<TenantSnapshot>>);

impl QosAccounts {
    /// The instance of `placed`'s accounting on each accelerator it uses,
    /// with its entitled share there: its weight over the weights of every
    /// instance that scheduler holds.
    pub fn of(&self, placed: &Placed) -> Vec<(&TenantSnapshot, Option<f64>)> {
        accelerators_of(&placed.allocation)
            .into_iter()
            .filter_map(|n| {
                let all = self.0.get(n)?;
                let mine = all.iter().find(|t| t.pasid == placed.pasid())?;
                let total: u64 = all.iter().map(|t| u64::from(t.policy.weight)).sum();
                let share = (total > 0).then(|| f64::from(mine.policy.weight) / total as f64);
                Some((mine, share))
            })
            .collect()
    }
}

pub struct Catalog {
    types: BTreeMap<String, TypeDef>,
    /// QoS policies by name, in file order.
    policies: Vec<(String, Policy)>,
    backends: BTreeMap<String, SharedAccelerator>,
    /// Each accelerator's scheduler (the same object as its backend).
    schedulers: BTreeMap<String, Arc<ScheduledAccel>>,
    partitioner: Partitioner,
    /// The configuration's `daemon:` section.
    daemon: crate::config::DaemonSettings,
}

/// Operation names for listings.
fn ops_names(mask: u32) -> Vec<String> {
    wdvirt_abi::Opcode::in_mask(mask)
        .map(|o| o.name().to_string())
        .collect()
}

impl Catalog {
    /// The catalog the YAML files at `paths` describe on the host whose
    /// sysfs is `sysfs`, with every accelerator's backend started.
    pub fn load(paths: &[PathBuf], sysfs: &Path) -> Result<Catalog, CatalogError> {
        let (cfg, host) = load_on(paths, sysfs)?;
        Catalog::from_config(&cfg, &host)
    }

    /// The configuration's `daemon:` section (the daemon's flags override
    /// it).
    pub fn daemon_settings(&self) -> &crate::config::DaemonSettings {
        &self.daemon
    }

    pub fn from_config(cfg: &Config, host: &Host) -> Result<Catalog, CatalogError> {
        let topo = check_placeable(cfg, host)?;
        let mut backends = BTreeMap::new();
        let mut schedulers = BTreeMap::new();
        for a in &host.accelerators {
            if !a.drivable {
                tracing::warn!(
                    accelerator = %a.name,
                    backend = %a.backend,
                    "found, but this build has no {} backend: shown by `wdvirt topology`, not placed on",
                    a.backend
                );
                continue;
            }
            let err = |source| CatalogError::Backend {
                name: a.name.clone(),
                source,
            };
            let engines: SharedAccelerator =
                crate::accel::soft::SoftAccel::with_config(crate::accel::soft::SoftAccelConfig {
                    engines: a.engines as usize,
                    max_queue_pairs: a.queue_pairs as usize,
                    ..Default::default()
                })
                .map_err(err)?;
            // Every instance's jobs reach the engines through the scheduler.
            let scheduled = ScheduledAccel::new(engines, a.engines as usize).map_err(err)?;
            backends.insert(a.name.clone(), scheduled.clone() as SharedAccelerator);
            schedulers.insert(a.name.clone(), scheduled);
        }
        Ok(Catalog {
            types: cfg
                .types
                .iter()
                .map(|t| (t.name.clone(), TypeDef::from_config(t)))
                .collect(),
            policies: cfg
                .qos_policies
                .iter()
                .map(|p| (p.name.clone(), Policy::from_config(p)))
                .collect(),
            backends,
            schedulers,
            partitioner: Partitioner::new(topo),
            daemon: cfg.daemon.clone(),
        })
    }

    pub fn get_type(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }

    pub fn type_names(&self) -> String {
        self.types.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    pub fn has_policy(&self, name: &str) -> bool {
        self.policy(name).is_some()
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.0 == name).map(|p| &p.1)
    }

    /// Puts the instance of `placed` under `policy` on every accelerator it
    /// uses, at once: jobs it has queued stay queued, its next turns follow
    /// the new policy. A name the configuration lacks leaves it as it is.
    pub fn apply_policy(&self, placed: &Placed, policy: &str) {
        let Some(p) = self.policy(policy) else {
            tracing::error!(policy, "no such QoS policy to apply");
            return;
        };
        for s in self.schedulers_of(&placed.allocation) {
            s.set_policy(placed.pasid(), p.clone());
        }
    }

    /// Every scheduler's accounting, each taken once (one lock per
    /// accelerator), by accelerator name: a report reads every instance's
    /// figures and entitlement from it.
    pub fn qos_accounts(&self) -> QosAccounts {
        QosAccounts(
            self.schedulers
                .iter()
                .map(|(name, s)| (name.clone(), s.snapshots()))
                .collect(),
        )
    }

    fn schedulers_of(&self, allocation: &Allocation) -> Vec<&Arc<ScheduledAccel>> {
        accelerators_of(allocation)
            .into_iter()
            .filter_map(|n| self.schedulers.get(n))
            .collect()
    }

    /// `Err` names the nodes there are when `node` is not one of them.
    pub fn check_numa(&self, node: u32) -> Result<(), String> {
        let nodes = self.partitioner.topology().numa_nodes();
        if nodes.iter().any(|n| n.id == node) {
            return Ok(());
        }
        let known: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
        Err(format!(
            "unknown NUMA node {node} (the configuration has {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    }

    pub fn policy_names(&self) -> String {
        let names: Vec<&str> = self.policies.iter().map(|p| p.0.as_str()).collect();
        names.join(", ")
    }

    pub fn types(&self) -> Vec<TypeView> {
        self.types
            .values()
            .map(|t| {
                let avail = self.partitioner.available_instances(&t.placement);
                let (total, by) = match avail {
                    Ok(a) => (a.total, a.per_accelerator),
                    Err(e) => {
                        tracing::warn!(r#type = %t.name, "cannot count available instances: {e}");
                        (0, BTreeMap::new())
                    }
                };
                TypeView {
                    name: t.name.clone(),
                    queues: t.queues(),
                    max_depth: t.max_depth,
                    functions: t
                        .functions()
                        .iter()
                        .map(|f| FunctionView {
                            queues: f.queues,
                            operations: ops_names(f.ops),
                        })
                        .collect(),
                    qos: t.qos.clone(),
                    available_instances: total,
                    available_by_accelerator: by,
                }
            })
            .collect()
    }

    /// Every accelerator with its pools' usage and its distances.
    pub fn accelerators(&self) -> Vec<AcceleratorView> {
        let topo = self.partitioner.topology();
        let snap = self.partitioner.snapshot();
        let nodes: Vec<Node> = topo
            .numa_nodes()
            .iter()
            .map(|n| Node::Numa(n.id))
            .chain(
                topo.accelerators()
                    .iter()
                    .map(|a| Node::Accelerator(a.name.clone())),
            )
            .collect();
        topo.accelerators()
            .iter()
            .zip(snap.accelerators)
            .map(|(a, u)| {
                let me = Node::Accelerator(a.name.clone());
                AcceleratorView {
                    name: a.name.clone(),
                    backend: a.backend.clone(),
                    engines: a.engines,
                    operations: ops_names(a.ops),
                    queue_pairs: Usage {
                        total: u.queue_pairs.total,
                        used: u.queue_pairs.used,
                        draining: u.queue_pairs.draining,
                        free: u.queue_pairs.free,
                    },
                    pasids: Usage {
                        total: u.pasids.capacity,
                        used: u.pasids.used,
                        draining: u.pasids.draining,
                        free: u.pasids.free,
                    },
                    distances: nodes
                        .iter()
                        .filter(|n| **n != me)
                        .filter_map(|n| Some((n.to_string(), topo.distance(&me, n)?)))
                        .collect(),
                }
            })
            .collect()
    }

    /// Places one instance of `ty`: accelerators chosen on the graph, queue
    /// pairs taken from their pools, a PASID allocated.
    pub fn place(&self, ty: &TypeDef, numa: Option<u32>) -> Result<Placed, String> {
        let allocation = self
            .partitioner
            .place(&ty.request(numa))
            .map_err(|e| e.to_string())?;
        let mut config = WdConfig {
            queues: ty.queues(),
            max_depth: ty.max_depth,
            ops: 0,
            ..WdConfig::default()
        };
        let mut queue_accels = Vec::new();
        let mut functions = Vec::new();
        for f in &allocation.functions {
            let first = queue_accels.len();
            for _ in &f.queue_pairs {
                config.queue_ops[queue_accels.len()] = Some(f.ops);
                queue_accels.push(self.backends[&f.accelerator].clone());
            }
            config.ops |= f.ops;
            functions.push(PlacedFunction {
                accelerator: f.accelerator.clone(),
                queue_pairs: f.queue_pairs.clone(),
                guest_queues: (first as u32..queue_accels.len() as u32).collect(),
            });
        }
        // Types have at least one queue (the configuration checks it).
        let Some(backends) = Backends::per_queue(&queue_accels) else {
            self.release(allocation);
            return Err(format!("type '{}' has no queue", ty.name));
        };
        Ok(Placed {
            allocation,
            config,
            backends,
            functions,
        })
    }

    /// Gives a stopped instance's placement back. The caller has stopped its
    /// device (queues drained), so the PASID and queue pairs are free at once.
    pub fn release(&self, allocation: Allocation) {
        for s in self.schedulers_of(&allocation) {
            s.remove_tenant(allocation.pasid);
        }
        if let Err(e) = self.partitioner.release_idle(&allocation) {
            tracing::error!(pasid = allocation.pasid, "releasing a placement: {e}");
        }
    }
}
