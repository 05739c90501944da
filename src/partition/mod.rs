//! Partitioning the host's accelerators into instances, and placing each
//! instance on the accelerators that fit its type.
//!
//! * [`graph`]: the topology (NUMA nodes, accelerators, weighted links) and
//!   its shortest distances — a graph, not a tree.
//! * [`pool`]: each accelerator's queue pairs as a pool of real indexes.
//! * [`pasid`]: the host-wide 20-bit PASID space, with draining.
//! * [`placement`]: requests and the search for the best combination.
//! * [`error`]: the per-accelerator reasons when nothing fits.
//! * [`partitioner`]: the thread-safe allocator the daemon calls.
//!
//! Neighbours: `config` builds the plain input structs ([`TopologySpec`],
//! [`PlacementRequest`]); `daemon` calls [`Partitioner`]; `vdev` receives the
//! resulting PASID and queue pairs. `docs/placement.md` tells the model.

pub mod error;
pub mod graph;
pub mod partitioner;
pub mod pasid;
pub mod placement;
pub mod pool;

pub use error::{PlacementError, Reason, Rejection, RequestError};
pub use graph::{
    Accelerator, AcceleratorSpec, KNOWN_OPS, LinkSpec, MAX_QUEUE_PAIRS, Node, NumaNode, NumaSpec,
    Topology, TopologyError, TopologySpec, ops_names,
};
pub use partitioner::{
    AcceleratorUsage, Allocation, Availability, DistanceInfo, DrainTicket, FunctionAllocation,
    Partitioner, ReleaseError, RestoreError, Snapshot,
};
pub use pasid::{PASID_MAX, PartitionError, PasidAllocator, PasidError, PasidSpace, PasidUsage};
pub use placement::{
    FunctionRequest, MAX_FUNCTIONS, PlacementRequest, Plan, PlannedInstance, SEARCH_BUDGET,
};
pub use pool::{PoolError, QueuePairUsage, QueuePool};
