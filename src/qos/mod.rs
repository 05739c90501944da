//! The QoS layer: the one place where engines take their next job.
//!
//! [`ScheduledAccel`] wraps any [`crate::accel::Accelerator`] and is one
//! itself: its queue pairs hold the jobs a queue worker offers, and hand
//! them to the backend's queue pairs in the order the scheduler decides
//! ([`fair`]: weighted fair shares of measured engine time, token-bucket
//! rate limits, a cap on jobs in flight, priorities between one instance's
//! queues). It sits above the `QueuePair` trait, so a hardware backend is
//! scheduled the same way as the software one. Neighbours: `vdev` above
//! (offers jobs, is woken when refused jobs may be offered again), `accel`
//! below (runs them and reports each job's engine time), the daemon beside
//! (applies policies, reads [`TenantSnapshot`]s). `docs/qos.md` says why
//! it is built this way.

pub mod bucket;
pub mod clock;
pub mod fair;
pub mod policy;
pub mod scheduler;
pub mod snapshot;

pub use policy::Policy;

pub use scheduler::ScheduledAccel;
pub use snapshot::{Interference, TenantSnapshot, Throttled};

/// The scheduler's maps, keyed by small integers (lane, tenant, operation)
/// and looked up several times per job: foldhash's fast hasher instead of
/// std's SipHash, which `perf` showed as a visible part of the engine
/// thread's per-job cost. Keys come from the daemon, never from a guest,
/// so SipHash's resistance to chosen keys buys nothing here.
type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
