//! What the scheduler has given one instance and why it waited: plain
//! serialisable data for the statistics views (`wdvirt stats`, `top`,
//! `/metrics`), which another layer builds.

use serde::{Deserialize, Serialize};

use super::policy::Policy;

/// One instance on one accelerator, from the scheduler's side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSnapshot {
    /// The instance's PASID (unique on its accelerator).
    pub pasid: u32,
    /// The policy in force.
    pub policy: Policy,
    /// Engine nanoseconds its jobs used, as the engines measured them.
    pub engine_ns: u64,
    /// Jobs taken from its rings that wait in the scheduler now (more may
    /// wait in the rings themselves).
    pub jobs_waiting: u64,
    /// Time it had jobs waiting, by why they waited.
    pub throttled_ns: Throttled,
    /// Of the time it waited for its turn, engine time each neighbour's jobs
    /// held, most first.
    pub interference: Vec<Interference>,
}

/// Nanoseconds an instance had jobs waiting, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttled {
    /// Its own rate limit (jobs/s or bytes/s).
    pub rate: u64,
    /// Its own `max_in_flight`.
    pub cap: u64,
    /// Its share: eligible, but the engines were busy or others' turn.
    pub share: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interference {
    pub neighbour_pasid: u32,
    /// Engine time the neighbour's jobs used while this instance waited.
    pub engine_ns: u64,
}
