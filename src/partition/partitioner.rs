//! The allocator the daemon calls: place an instance, release it in two
//! steps, count what still fits, list what is used.
//!
//! All state sits behind one `parking_lot::Mutex`; every method takes `&self`
//! and the whole decision (search + taking queue pairs + a PASID) happens
//! under the lock, so concurrent callers never see half an allocation or get
//! the same resource twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::error::{PlacementError, Reason, Rejection, RequestError};
use super::graph::{Topology, ops_names};
use super::pasid::{PASID_MAX, PasidError, PasidSpace, PasidUsage};
use super::placement::{Capacity, PlacementRequest, count_successive, search, span_distances};
use super::pool::{QueuePairUsage, QueuePool};
use crate::accel::Pasid;

/// One function of a placed instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionAllocation {
    pub accelerator: String,
    /// Real queue pair indexes of `accelerator`, one per queue, in order.
    pub queue_pairs: Vec<u32>,
    /// The function's operations (bit n = opcode n), for its queues'
    /// operations register.
    pub ops: u32,
    /// Distance from `accelerator` to the request's NUMA node, if one was given.
    pub numa_distance: Option<u64>,
}

/// The distances of a placement (see `placement`'s doc for "total").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistanceInfo {
    pub total: u64,
    pub max: u64,
}

/// A placed instance: one PASID, valid on every accelerator it spans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub pasid: Pasid,
    /// In the request's function order.
    pub functions: Vec<FunctionAllocation>,
    pub numa_node: Option<u32>,
    pub distance: DistanceInfo,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ReleaseError {
    #[error("PASID {0} has no live allocation")]
    NotLive(Pasid),
    #[error("the allocation given for PASID {0} is not the one placed")]
    Mismatch(Pasid),
    #[error("PASID {0} is not draining")]
    NotDraining(Pasid),
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RestoreError {
    #[error("the allocation has no function")]
    NoFunctions,
    #[error("function {0} has no queue pair")]
    NoQueues(usize),
    #[error("unknown accelerator {0:?}")]
    UnknownAccelerator(String),
    #[error("unknown NUMA node {0}")]
    UnknownNumaNode(u32),
    #[error("{accelerator}: no {}", ops_names(*missing))]
    MissingOps { accelerator: String, missing: u32 },
    #[error("{accelerator}: queue pair {index} is not free")]
    QueuePair { accelerator: String, index: u32 },
    #[error("{accelerator}: PASIDs exhausted ({capacity})")]
    PasidsExhausted { accelerator: String, capacity: u32 },
    #[error(transparent)]
    Pasid(#[from] PasidError),
}

/// One accelerator in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AcceleratorUsage {
    pub name: String,
    pub backend: String,
    pub ops: u32,
    pub queue_pairs: QueuePairUsage,
    /// `capacity` is the accelerator's; `used` and `draining` count the
    /// instances bound to it.
    pub pasids: PasidUsage,
}

/// What is used, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub accelerators: Vec<AcceleratorUsage>,
    /// The host-wide PASID space.
    pub host_pasids: PasidUsage,
}

/// How many more instances of a type fit right now (mdev's
/// `available_instances`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Availability {
    /// Successive `place` calls that would succeed.
    pub total: u32,
    /// Per accelerator: successive `place` calls that would succeed if each
    /// had to use this accelerator (for one of its functions). A
    /// multi-function instance counts once on each accelerator it would
    /// span, so these need not add up to `total`.
    pub per_accelerator: BTreeMap<String, u32>,
}

#[derive(Clone, Debug)]
struct Record {
    allocation: Allocation,
    /// (accelerator index, queue pairs) per function.
    parts: Vec<(usize, Vec<u32>)>,
    /// Accelerators spanned, each once.
    spans: Vec<usize>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slots {
    live: u32,
    draining: u32,
}

struct State {
    pools: Vec<QueuePool>,
    slots: Vec<Slots>,
    pasids: PasidSpace,
    live: HashMap<Pasid, Record>,
    draining: HashMap<Pasid, Record>,
}

impl State {
    fn capacity(&self, topo: &Topology) -> Capacity {
        Capacity {
            free_qp: self.pools.iter().map(QueuePool::free_count).collect(),
            free_slots: topo
                .accelerators()
                .iter()
                .zip(&self.slots)
                .map(|(a, s)| a.pasids - s.live - s.draining)
                .collect(),
        }
    }
}

struct Shared {
    topology: Topology,
    state: Mutex<State>,
}

impl Shared {
    fn drained(&self, pasid: Pasid) -> Result<(), ReleaseError> {
        let mut st = self.state.lock();
        let record = st
            .draining
            .remove(&pasid)
            .ok_or(ReleaseError::NotDraining(pasid))?;
        // Every step below only moves what `release` moved, so none fails
        // unless the state is corrupt; the error is kept, not unwrapped.
        st.pasids
            .drained(pasid)
            .map_err(|_| ReleaseError::NotDraining(pasid))?;
        for (a, qps) in &record.parts {
            st.pools[*a]
                .restore(qps)
                .map_err(|_| ReleaseError::NotDraining(pasid))?;
        }
        for &a in &record.spans {
            st.slots[a].draining -= 1;
        }
        tracing::debug!(pasid, "partition: drained");
        Ok(())
    }
}

/// Handed out by [`Partitioner::release`]: call [`DrainTicket::drained`] once
/// the instance's device reports no job in flight (it is `Send + 'static`, so
/// it can move into the device's quiesce callback). Until then the PASID and
/// queue pairs stay draining and are never handed out. Dropping the ticket
/// without calling it leaves them draining; [`Partitioner::drained`] with the
/// PASID does the same job.
#[must_use = "the PASID and queue pairs stay draining until `drained` is called"]
pub struct DrainTicket {
    shared: Arc<Shared>,
    pasid: Pasid,
}

impl DrainTicket {
    pub fn pasid(&self) -> Pasid {
        self.pasid
    }

    /// The instance's queues are drained: its PASID and queue pairs return to
    /// the free sets.
    pub fn drained(self) -> Result<(), ReleaseError> {
        self.shared.drained(self.pasid)
    }
}

impl std::fmt::Debug for DrainTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainTicket")
            .field("pasid", &self.pasid)
            .finish()
    }
}

/// The host's accelerators, partitioned. Cheap to clone (one shared state).
#[derive(Clone)]
pub struct Partitioner {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Partitioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partitioner").finish_non_exhaustive()
    }
}

impl Partitioner {
    /// Nothing placed; the host PASID space is `1..=2^20-1`.
    pub fn new(topology: Topology) -> Partitioner {
        Self::with_host_pasids(topology, PASID_MAX)
    }

    /// As [`Self::new`] with a smaller host PASID space `1..=max`.
    pub fn with_host_pasids(topology: Topology, max: Pasid) -> Partitioner {
        let state = State {
            pools: topology
                .accelerators()
                .iter()
                .map(|a| QueuePool::new(a.queue_pairs))
                .collect(),
            slots: vec![Slots::default(); topology.accelerators().len()],
            pasids: PasidSpace::new(max),
            live: HashMap::new(),
            draining: HashMap::new(),
        };
        Partitioner {
            shared: Arc::new(Shared {
                topology,
                state: Mutex::new(state),
            }),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// Places one instance: the best combination (see `placement`), its
    /// queue pairs taken and a PASID allocated, or the reasons nothing fits.
    pub fn place(&self, req: &PlacementRequest) -> Result<Allocation, PlacementError> {
        let topo = &self.shared.topology;
        let checked = req.check(topo)?;
        let mut st = self.shared.state.lock();
        if !st.pasids.has_free() {
            return Err(PlacementError::HostPasidsExhausted {
                max: st.pasids.usage().capacity,
            });
        }
        let cap = st.capacity(topo);
        let choice = search(topo, &cap, &checked, None)?;
        let mut parts: Vec<(usize, Vec<u32>)> = Vec::new();
        for (func, &a) in checked.functions.iter().zip(&choice.accel_of) {
            match st.pools[a].take(func.queues) {
                Ok(qps) => parts.push((a, qps)),
                Err(_) => {
                    // The search counted these queue pairs free under this
                    // same lock; reaching here is a bug. Undo, and refuse.
                    for (b, qps) in &parts {
                        let _ = st.pools[*b].untake(qps);
                    }
                    let accel = &topo.accelerators()[a];
                    tracing::error!(accelerator = %accel.name, "partition: pool disagrees with search");
                    return Err(PlacementError::NoFit {
                        rejections: vec![Rejection {
                            accelerator: accel.name.clone(),
                            function: None,
                            reason: Reason::QueuePairs {
                                free: st.pools[a].free_count(),
                                total: accel.queue_pairs,
                                need: func.queues,
                            },
                        }],
                    });
                }
            }
        }
        let pasid = match st.pasids.allocate() {
            Ok(p) => p,
            Err(_) => {
                for (b, qps) in &parts {
                    let _ = st.pools[*b].untake(qps);
                }
                return Err(PlacementError::HostPasidsExhausted {
                    max: st.pasids.usage().capacity,
                });
            }
        };
        for &a in &choice.distinct {
            st.slots[a].live += 1;
        }
        let allocation = Allocation {
            pasid,
            functions: parts
                .iter()
                .zip(&checked.functions)
                .map(|((a, qps), func)| FunctionAllocation {
                    accelerator: topo.accelerators()[*a].name.clone(),
                    queue_pairs: qps.clone(),
                    ops: func.ops,
                    numa_distance: checked.numa.and_then(|n| topo.numa_distance(*a, n)),
                })
                .collect(),
            numa_node: checked.numa,
            distance: DistanceInfo {
                total: choice.total,
                max: choice.max,
            },
        };
        tracing::debug!(pasid, accelerators = ?allocation.functions.iter().map(|f| &f.accelerator).collect::<Vec<_>>(), "partition: placed");
        st.live.insert(
            pasid,
            Record {
                allocation: allocation.clone(),
                parts,
                spans: choice.distinct,
            },
        );
        Ok(allocation)
    }

    /// Takes back exactly `allocation` (its PASID and queue pairs), e.g. for
    /// an instance a restarted daemon re-attaches. Checks that its
    /// accelerators exist and still run its functions' operations, and that
    /// the PASID, the queue pairs and a PASID slot on each accelerator are
    /// free; all or nothing. The type's `max_distance` is not known here and
    /// not checked. Returns the allocation with its distances recomputed on
    /// the current topology: release that one.
    pub fn restore(&self, allocation: &Allocation) -> Result<Allocation, RestoreError> {
        let topo = &self.shared.topology;
        if allocation.functions.is_empty() {
            return Err(RestoreError::NoFunctions);
        }
        if let Some(node) = allocation.numa_node
            && !topo.has_numa(node)
        {
            return Err(RestoreError::UnknownNumaNode(node));
        }
        let mut parts = Vec::new();
        let mut spans: Vec<usize> = Vec::new();
        for (i, f) in allocation.functions.iter().enumerate() {
            let a = topo
                .accelerator_index(&f.accelerator)
                .ok_or_else(|| RestoreError::UnknownAccelerator(f.accelerator.clone()))?;
            if f.queue_pairs.is_empty() {
                return Err(RestoreError::NoQueues(i));
            }
            let missing = f.ops & !topo.accelerators()[a].ops;
            if missing != 0 {
                return Err(RestoreError::MissingOps {
                    accelerator: f.accelerator.clone(),
                    missing,
                });
            }
            if !spans.contains(&a) {
                spans.push(a);
            }
            parts.push((a, f.queue_pairs.clone()));
        }
        let mut st = self.shared.state.lock();
        let mut wanted = std::collections::BTreeSet::new();
        for (a, qps) in &parts {
            for &index in qps {
                if !st.pools[*a].is_free(index) || !wanted.insert((*a, index)) {
                    return Err(RestoreError::QueuePair {
                        accelerator: topo.accelerators()[*a].name.clone(),
                        index,
                    });
                }
            }
        }
        for &a in &spans {
            let accel = &topo.accelerators()[a];
            if st.slots[a].live + st.slots[a].draining >= accel.pasids {
                return Err(RestoreError::PasidsExhausted {
                    accelerator: accel.name.clone(),
                    capacity: accel.pasids,
                });
            }
        }
        // Everything is checked: from here on nothing fails but the PASID,
        // which is taken before any queue pair.
        st.pasids.claim(allocation.pasid)?;
        for (a, qps) in &parts {
            if let Err(e) = st.pools[*a].claim(qps) {
                tracing::error!(%e, "partition: pool disagrees with its own check");
            }
        }
        for &a in &spans {
            st.slots[a].live += 1;
        }
        let (total, max) = span_distances(topo, &spans, allocation.numa_node);
        let mut restored = allocation.clone();
        for (f, (a, _)) in restored.functions.iter_mut().zip(&parts) {
            f.numa_distance = allocation.numa_node.and_then(|n| topo.numa_distance(*a, n));
        }
        restored.distance = DistanceInfo { total, max };
        st.live.insert(
            allocation.pasid,
            Record {
                allocation: restored.clone(),
                parts,
                spans,
            },
        );
        tracing::debug!(pasid = allocation.pasid, "partition: restored");
        Ok(restored)
    }

    /// First step of releasing `allocation`: its PASID and queue pairs are
    /// draining (never handed out) until the returned ticket's `drained`.
    pub fn release(&self, allocation: &Allocation) -> Result<DrainTicket, ReleaseError> {
        let pasid = allocation.pasid;
        let mut st = self.shared.state.lock();
        let record = st.live.get(&pasid).ok_or(ReleaseError::NotLive(pasid))?;
        if record.allocation != *allocation {
            return Err(ReleaseError::Mismatch(pasid));
        }
        let record = st.live.remove(&pasid).ok_or(ReleaseError::NotLive(pasid))?;
        st.pasids
            .release(pasid)
            .map_err(|_| ReleaseError::NotLive(pasid))?;
        for (a, qps) in &record.parts {
            st.pools[*a]
                .retire(qps)
                .map_err(|_| ReleaseError::NotLive(pasid))?;
        }
        for &a in &record.spans {
            st.slots[a].live -= 1;
            st.slots[a].draining += 1;
        }
        st.draining.insert(pasid, record);
        tracing::debug!(pasid, "partition: draining");
        Ok(DrainTicket {
            shared: self.shared.clone(),
            pasid,
        })
    }

    /// Second step: `pasid`'s queues are drained; its PASID and queue pairs
    /// are free again.
    pub fn drained(&self, pasid: Pasid) -> Result<(), ReleaseError> {
        self.shared.drained(pasid)
    }

    /// Both steps at once, for an instance with nothing in flight (never
    /// started, or its device already stopped and drained).
    pub fn release_idle(&self, allocation: &Allocation) -> Result<(), ReleaseError> {
        self.release(allocation)?.drained()
    }

    /// The live allocation with this PASID.
    pub fn allocation(&self, pasid: Pasid) -> Option<Allocation> {
        self.shared
            .state
            .lock()
            .live
            .get(&pasid)
            .map(|r| r.allocation.clone())
    }

    /// How many more instances of `req` fit now: in all, and per accelerator.
    pub fn available_instances(
        &self,
        req: &PlacementRequest,
    ) -> Result<Availability, RequestError> {
        let topo = &self.shared.topology;
        let checked = req.check(topo)?;
        // Count on a copy of the counters, outside the lock.
        let (cap, host_free) = {
            let st = self.shared.state.lock();
            (st.capacity(topo), st.pasids.usage().free)
        };
        let total = count_successive(topo, cap.clone(), &checked, host_free, None);
        let per_accelerator = topo
            .accelerators()
            .iter()
            .enumerate()
            .map(|(a, accel)| {
                let n = if total == 0 {
                    0
                } else {
                    count_successive(topo, cap.clone(), &checked, host_free, Some(a))
                };
                (accel.name.clone(), n)
            })
            .collect();
        Ok(Availability {
            total,
            per_accelerator,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        let topo = &self.shared.topology;
        let st = self.shared.state.lock();
        let accelerators = topo
            .accelerators()
            .iter()
            .zip(&st.pools)
            .zip(&st.slots)
            .map(|((a, pool), slots)| AcceleratorUsage {
                name: a.name.clone(),
                backend: a.backend.clone(),
                ops: a.ops,
                queue_pairs: pool.usage(),
                pasids: PasidUsage {
                    capacity: a.pasids,
                    used: slots.live,
                    draining: slots.draining,
                    free: a.pasids - slots.live - slots.draining,
                },
            })
            .collect();
        Snapshot {
            accelerators,
            host_pasids: st.pasids.usage(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::graph::{AcceleratorSpec, LinkSpec, Node, NumaSpec, TopologySpec};
    use crate::partition::placement::FunctionRequest;
    use wdvirt_abi::Opcode;

    const COPY: u32 = Opcode::Copy.bit();

    /// One accelerator, 4 queue pairs, 2 PASID slots.
    fn one(pasids: u32) -> Partitioner {
        Partitioner::new(
            Topology::new(TopologySpec {
                numa_nodes: vec![NumaSpec {
                    id: 0,
                    cpus: vec![0],
                }],
                accelerators: vec![AcceleratorSpec {
                    name: "a".into(),
                    backend: "soft".into(),
                    engines: 1,
                    queue_pairs: 4,
                    ops: COPY,
                    pasids,
                }],
                links: vec![LinkSpec {
                    a: Node::Accelerator("a".into()),
                    b: Node::Numa(0),
                    distance: 10,
                }],
            })
            .unwrap(),
        )
    }

    fn copy(queues: u32) -> PlacementRequest {
        PlacementRequest {
            functions: vec![FunctionRequest { queues, ops: COPY }],
            numa_node: Some(0),
            ..PlacementRequest::default()
        }
    }

    #[test]
    fn place_release_drain_moves_resources_through_three_states() {
        let p = one(2);
        let a = p.place(&copy(2)).unwrap();
        assert_eq!(a.pasid, 1);
        assert_eq!(a.functions[0].queue_pairs, vec![0, 1]);
        assert_eq!(a.functions[0].numa_distance, Some(10));
        assert_eq!(a.distance, DistanceInfo { total: 10, max: 10 });
        assert_eq!(p.allocation(1), Some(a.clone()));
        let ticket = p.release(&a).unwrap();
        assert_eq!(p.allocation(1), None);
        let s = p.snapshot().accelerators[0].clone();
        assert_eq!(
            (
                s.queue_pairs.used,
                s.queue_pairs.draining,
                s.queue_pairs.free
            ),
            (0, 2, 2)
        );
        assert_eq!((s.pasids.used, s.pasids.draining, s.pasids.free), (0, 1, 1));
        // Neither the draining PASID nor its queue pairs are handed out.
        let b = p.place(&copy(2)).unwrap();
        assert_eq!(
            (b.pasid, b.functions[0].queue_pairs.clone()),
            (2, vec![2, 3])
        );
        let e = p.place(&copy(1)).unwrap_err().to_string();
        assert_eq!(
            e,
            "no placement fits: a: 0 of 4 queue pairs free, need 1; a: PASIDs exhausted (2)"
        );
        // The ticket can finish on another thread (a device's quiesce callback).
        std::thread::spawn(move || ticket.drained())
            .join()
            .unwrap()
            .unwrap();
        let c = p.place(&copy(2)).unwrap();
        assert_eq!(
            (c.pasid, c.functions[0].queue_pairs.clone()),
            (1, vec![0, 1])
        );
        let host = p.snapshot().host_pasids;
        assert_eq!((host.used, host.draining), (2, 0));
    }

    #[test]
    fn the_partitioner_and_its_tickets_cross_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Partitioner>();
        shareable::<DrainTicket>();
    }

    #[test]
    fn release_steps_are_checked() {
        let p = one(2);
        let a = p.place(&copy(1)).unwrap();
        let mut forged = a.clone();
        forged.functions[0].queue_pairs = vec![3];
        assert_eq!(p.release(&forged).unwrap_err(), ReleaseError::Mismatch(1));
        assert_eq!(p.drained(1), Err(ReleaseError::NotDraining(1)));
        p.release_idle(&a).unwrap();
        assert_eq!(p.release(&a).unwrap_err(), ReleaseError::NotLive(1));
        assert_eq!(p.drained(1), Err(ReleaseError::NotDraining(1)));
        assert_eq!(p.snapshot().accelerators[0].queue_pairs.free, 4);
        // The daemon may keep the PASID rather than the ticket.
        let b = p.place(&copy(4)).unwrap();
        let ticket = p.release(&b).unwrap();
        assert_eq!(ticket.pasid(), b.pasid);
        drop(ticket);
        assert_eq!(p.snapshot().accelerators[0].queue_pairs.draining, 4);
        p.drained(b.pasid).unwrap();
        assert_eq!(p.snapshot().accelerators[0].queue_pairs.free, 4);
    }

    #[test]
    fn restore_takes_back_exactly_what_was_placed() {
        let p = one(2);
        let a = p.place(&copy(2)).unwrap();
        let b = p.place(&copy(1)).unwrap();
        // A restarted daemon: a fresh partitioner over the same topology.
        let q = Partitioner::new(p.topology().clone());
        assert_eq!(q.restore(&b).unwrap(), b);
        assert_eq!(q.restore(&a).unwrap(), a);
        assert_eq!(q.snapshot(), p.snapshot());
        // The next placement gets what neither holds.
        let c = q.place(&copy(1)).unwrap_err().to_string();
        assert!(c.contains("a: PASIDs exhausted (2)"), "{c}");
        q.release_idle(&a).unwrap();
        let c = q.place(&copy(1)).unwrap();
        assert_eq!((c.pasid, c.functions[0].queue_pairs.clone()), (1, vec![0]));
    }

    #[test]
    fn restore_refuses_what_is_taken_or_gone_and_takes_nothing() {
        let p = one(4);
        let a = p.place(&copy(2)).unwrap();
        assert_eq!(
            p.restore(&a).unwrap_err(),
            RestoreError::QueuePair {
                accelerator: "a".into(),
                index: 0
            }
        );
        let mut other = a.clone();
        other.functions[0].queue_pairs = vec![2, 3];
        assert_eq!(
            p.restore(&other).unwrap_err(),
            RestoreError::Pasid(PasidError::InUse(1))
        );
        other.pasid = 7;
        other.functions[0].queue_pairs = vec![2, 2];
        assert_eq!(
            p.restore(&other).unwrap_err().to_string(),
            "a: queue pair 2 is not free"
        );
        other.functions[0].queue_pairs = vec![2];
        other.functions[0].ops = Opcode::Sha256.bit();
        assert_eq!(p.restore(&other).unwrap_err().to_string(), "a: no sha256");
        other.functions[0].accelerator = "gone".into();
        assert_eq!(
            p.restore(&other).unwrap_err(),
            RestoreError::UnknownAccelerator("gone".into())
        );
        assert_eq!(
            p.snapshot().accelerators[0].queue_pairs.used,
            2,
            "nothing taken"
        );
        assert_eq!(p.snapshot().host_pasids.used, 1);
        other = a.clone();
        other.pasid = 7;
        other.functions[0].queue_pairs = vec![3];
        let restored = p.restore(&other).unwrap();
        assert_eq!(restored, other);
        assert_eq!(p.place(&copy(1)).unwrap().pasid, 2);
        // An accelerator whose PASID slots are all taken: free queue pairs
        // and a free PASID do not make room.
        let q = one(1);
        let held = q.place(&copy(1)).unwrap();
        let mut next = held.clone();
        next.pasid = held.pasid + 1;
        next.functions[0].queue_pairs = vec![3];
        assert_eq!(
            q.restore(&next).unwrap_err(),
            RestoreError::PasidsExhausted {
                accelerator: "a".into(),
                capacity: 1
            }
        );
        let s = q.snapshot();
        assert_eq!(
            (s.accelerators[0].queue_pairs.used, s.host_pasids.used),
            (1, 1),
            "nothing taken"
        );
    }

    #[test]
    fn the_host_pasid_space_bounds_placements_too() {
        let p = Partitioner::with_host_pasids(one(8).topology().clone(), 1);
        let a = p.place(&copy(1)).unwrap();
        assert_eq!(
            p.place(&copy(1)),
            Err(PlacementError::HostPasidsExhausted { max: 1 })
        );
        assert_eq!(p.available_instances(&copy(1)).unwrap().total, 0);
        p.release_idle(&a).unwrap();
        assert_eq!(p.available_instances(&copy(1)).unwrap().total, 1);
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_taken() {
        let p = one(2);
        let mut r = copy(1);
        r.numa_node = Some(4);
        assert_eq!(
            p.place(&r),
            Err(PlacementError::Request(RequestError::UnknownNumaNode(4)))
        );
        assert_eq!(
            p.available_instances(&r),
            Err(RequestError::UnknownNumaNode(4))
        );
        assert_eq!(p.snapshot().host_pasids.used, 0);
    }
}
