//! The validated configuration: plain data, every name resolved, every range
//! checked. Built only by `validate` (through `load_paths` / `load_str`), so a
//! holder of a `Config` may rely on what the doc comments promise.

use std::collections::BTreeMap;

use serde::Serialize;

pub use super::error::Place;

/// Everything the files describe: the host's graph (NUMA nodes, accelerators,
/// links), QoS policies and instance types, each in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Config {
    pub numa_nodes: Vec<NumaNode>,
    pub accelerators: Vec<Accelerator>,
    pub qos_policies: Vec<QosPolicy>,
    pub types: Vec<InstanceType>,
    /// `wdvirt daemon`'s own settings (`daemon:`); flags override them.
    pub daemon: DaemonSettings,
}

/// The `daemon:` section: who may use the API and who owns instance
/// sockets. Names are checked for shape here and resolved against the
/// host's user database by the daemon (`wdvirt validate` may run elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DaemonSettings {
    /// The API socket's group, a name or a gid.
    pub api_group: Option<String>,
    /// The owner of instance sockets, a user name or a uid.
    pub instance_owner: Option<String>,
    /// `daemon: limits:`, each checked against its range.
    pub limits: DaemonLimits,
}

/// The transport limits `daemon: limits:` sets for every instance; `None`
/// keeps [`Limits::default`](crate::transport::Limits)'s value.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DaemonLimits {
    pub max_message_size: Option<u32>,
    pub max_msg_fds: Option<usize>,
    pub max_dma_maps: Option<usize>,
    pub message_timeout_ms: Option<u64>,
    pub log_lines_per_sec: Option<u32>,
}

impl DaemonLimits {
    /// The defaults with what the YAML set.
    pub fn transport_limits(&self) -> crate::transport::Limits {
        let d = crate::transport::Limits::default();
        crate::transport::Limits {
            max_message_size: self.max_message_size.unwrap_or(d.max_message_size),
            max_msg_fds: self.max_msg_fds.unwrap_or(d.max_msg_fds),
            max_dma_maps: self.max_dma_maps.unwrap_or(d.max_dma_maps),
            message_timeout_ms: self.message_timeout_ms.unwrap_or(d.message_timeout_ms),
            log_lines_per_sec: self.log_lines_per_sec.unwrap_or(d.log_lines_per_sec),
            ..d
        }
    }
}

impl Config {
    pub fn numa_node(&self, id: u32) -> Option<&NumaNode> {
        self.numa_nodes.iter().find(|n| n.id == id)
    }
    pub fn accelerator(&self, name: &str) -> Option<&Accelerator> {
        self.accelerators.iter().find(|a| a.name == name)
    }
    pub fn qos_policy(&self, name: &str) -> Option<&QosPolicy> {
        self.qos_policies.iter().find(|p| p.name == name)
    }
    pub fn instance_type(&self, name: &str) -> Option<&InstanceType> {
        self.types.iter().find(|t| t.name == name)
    }
}

/// A NUMA node of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    /// 0..=1023, unique.
    pub id: u32,
    /// Sorted, without duplicates; empty if not given.
    pub cpus: Vec<u32>,
    /// Distance (1..=255) to other nodes by id; every key is a defined node.
    pub distances: BTreeMap<u32, u32>,
    /// Where `id` was written.
    pub origin: Place,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The built-in software accelerator (`crate::accel::soft`).
    Soft,
    /// A UACCE device found on the host (`/sys/class/uacce/NAME`): the YAML
    /// entry restricts or overrides what discovery found (`docs/topology.md`).
    Uacce,
    /// An IDXD device found on the host (`/sys/bus/dsa/devices/NAME`), as
    /// for `Uacce`.
    Idxd,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Soft, Backend::Uacce, Backend::Idxd];
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Soft => "soft",
            Backend::Uacce => "uacce",
            Backend::Idxd => "idxd",
        }
    }
    pub fn from_name(s: &str) -> Option<Backend> {
        Self::ALL.into_iter().find(|b| b.name() == s)
    }
    /// Whether this build has a backend that runs such an accelerator
    /// (today: `soft` only). The daemon places instances on these.
    pub const fn drivable(self) -> bool {
        matches!(self, Backend::Soft)
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A physical accelerator and the pools it gives instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Accelerator {
    /// Unique among accelerators; never `nodeN`.
    pub name: String,
    pub backend: Backend,
    /// Engine threads, 1..=64.
    pub engines: u32,
    /// Queue pairs it can give instances, 1..=4096.
    pub queue_pairs: u32,
    /// Operations it performs, `1 << opcode` (`wdvirt_abi::Opcode`); never 0.
    pub ops: u32,
    /// PASID capacity, 1..=2^20-1.
    pub pasids: u32,
    /// A defined NUMA node, if given.
    pub numa_node: Option<u32>,
    /// Sorted, without duplicates; empty if not given.
    pub cpus: Vec<u32>,
    /// Extra edges of the graph, from this accelerator.
    pub links: Vec<Link>,
    /// Where `name` was written.
    pub origin: Place,
}

/// An edge from an accelerator to another accelerator or to a NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    pub to: Endpoint,
    /// 1..=255.
    pub distance: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// A defined accelerator other than the link's own.
    Accelerator(String),
    /// A defined NUMA node (`nodeN` in YAML).
    NumaNode(u32),
}

/// Rate limits; `None` means no limit of that kind. Each value ≥ 1; a burst is
/// only set together with its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RateLimit {
    pub jobs_per_sec: Option<u64>,
    pub bytes_per_sec: Option<u64>,
    pub burst_jobs: Option<u64>,
    pub burst_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QosPolicy {
    /// Unique among policies.
    pub name: String,
    /// 1..=10000.
    pub weight: u32,
    pub rate: RateLimit,
    /// 1..=65536, or no cap.
    pub max_in_flight: Option<u32>,
    /// Per queue, in queue order, 0..=7 (higher first); empty if not given.
    pub queue_priorities: Vec<u8>,
    pub origin: Place,
}

/// A set of the device's queues, all placed on one accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Function {
    /// 1..=64.
    pub queues: u32,
    /// `1 << opcode`; never 0.
    pub ops: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Placement {
    /// 1..=65535: between the functions' accelerators, and from each to the
    /// instance's NUMA node.
    pub max_distance: Option<u32>,
    /// Allow-list of accelerator names (each defined; never empty); `None` =
    /// every accelerator.
    pub accelerators: Option<Vec<String>>,
    /// A defined NUMA node the instance is placed near when its definition
    /// names none.
    pub numa_node: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceType {
    /// Unique among types.
    pub name: String,
    /// At least one; 64 queues at most in all. The guest sees the functions'
    /// queues in this order as one device.
    pub functions: Vec<Function>,
    /// Power of two, 2..=65536 (default 1024).
    pub max_depth: u32,
    /// A defined QoS policy's name.
    pub qos: String,
    pub placement: Placement,
    pub origin: Place,
}

impl InstanceType {
    /// The device's queues: the sum over its functions (1..=64).
    pub fn queues(&self) -> u32 {
        self.functions.iter().map(|f| f.queues).sum()
    }
    /// Every operation any of its queues may run.
    pub fn ops(&self) -> u32 {
        self.functions.iter().fold(0, |m, f| m | f.ops)
    }
    /// Whether `accel` may host `function` (by operations, queue pairs and the
    /// allow-list; not by what is free now, nor by distance).
    pub fn can_host(&self, accel: &Accelerator, function: &Function) -> bool {
        self.placement
            .accelerators
            .as_ref()
            .is_none_or(|l| l.contains(&accel.name))
            && function.ops & !accel.ops == 0
            && function.queues <= accel.queue_pairs
    }
}

/// Operation names of a mask, in opcode order (`all` when every one is set).
pub fn ops_names(mask: u32) -> Vec<&'static str> {
    if mask == wdvirt_abi::ALL_OPS {
        return vec!["all"];
    }
    wdvirt_abi::Opcode::in_mask(mask)
        .map(|op| op.name())
        .collect()
}
