//! What the daemon shows: plain, serialisable views of types and instances.
//! The CLI reads the same structs back from the API's JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::instance::InstanceReport;

/// One function of a type: queues that run one set of operations, placed
/// together on one accelerator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionView {
    pub queues: u32,
    pub operations: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeView {
    pub name: String,
    /// Queues the guest sees (all functions together).
    pub queues: u32,
    pub max_depth: u32,
    pub functions: Vec<FunctionView>,
    pub qos: String,
    /// How many more instances of this type fit right now (mdev's
    /// `available_instances`), in all and by accelerator.
    pub available_instances: u32,
    pub available_by_accelerator: BTreeMap<String, u32>,
}

/// Where an instance stands: defined → started → attached (a VMM is
/// connected) → stopped (defined again, startable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Defined,
    Started,
    Attached,
    /// Being stopped: its device drains (at most 2 s).
    Stopping,
    Stopped,
}

impl InstanceState {
    pub fn name(self) -> &'static str {
        match self {
            InstanceState::Defined => "defined",
            InstanceState::Started => "started",
            InstanceState::Attached => "attached",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
        }
    }
    pub fn running(self) -> bool {
        matches!(self, InstanceState::Started | InstanceState::Attached)
    }
}

/// One function of a started instance, where placement put it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedFunction {
    pub accelerator: String,
    /// The accelerator's queue pairs this function's queues run on.
    pub queue_pairs: Vec<u32>,
    /// The guest's queue indexes of this function.
    pub guest_queues: Vec<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceView {
    pub uuid: Uuid,
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub state: InstanceState,
    pub auto: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<u32>,
    /// The QoS policy in force (the definition's override or the type's).
    pub qos: String,
    /// The VM the instance is for (a libvirt domain's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The vfio-user socket while started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Who owns the socket (mode 0600): the definition's owner, else the
    /// daemon's instance owner. Only that user (and root) can connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_owner: Option<String>,
    /// The owner the definition names, when it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pasid: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<PlacedFunction>,
    /// Counters of the running instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<InstanceReport>,
}

/// How much of a pool is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub total: u32,
    pub used: u32,
    /// Released by a stopped instance, not yet handed out again.
    pub draining: u32,
    pub free: u32,
}

/// One accelerator: what it runs, how full its pools are, and how far it
/// is from every other node of the host graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceleratorView {
    pub name: String,
    pub backend: String,
    pub engines: u32,
    pub operations: Vec<String>,
    pub queue_pairs: Usage,
    pub pasids: Usage,
    /// Shortest distance to each NUMA node (`nodeN`) and accelerator it is
    /// connected to.
    pub distances: BTreeMap<String, u64>,
}
