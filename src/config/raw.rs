//! The file format as serde sees it: every key a file may hold, every value
//! kept with its place in the file (`Spanned`) so that validation can point at
//! it. Unknown keys are refused everywhere (`deny_unknown_fields`). The JSON
//! Schema that `wdvirt schema` prints is derived from these structs.
//!
//! Ranges are not checked here but in `validate`, so that one run reports every
//! out-of-range value instead of stopping at the first; the schema still states
//! them for editors.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// One YAML file: any of the four sections, each a list. A directory of files
/// is the concatenation of its files' lists.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "wdvirt configuration")]
pub struct RawFile {
    /// The host's NUMA nodes: the graph's nodes besides the accelerators.
    #[serde(default)]
    pub numa_nodes: Vec<RawNumaNode>,
    /// Physical accelerators and the queue pairs, operations and PASIDs each
    /// can give instances.
    #[serde(default)]
    pub accelerators: Vec<RawAccelerator>,
    /// QoS policies named by instance types.
    #[serde(default)]
    pub qos_policies: Vec<RawQosPolicy>,
    /// Instance types: the shapes of the devices VMs get.
    #[serde(default)]
    pub types: Vec<RawType>,
    /// Settings of `wdvirt daemon` itself (one file at most); its
    /// command-line flags override them.
    #[serde(default)]
    #[schemars(with = "Option<RawDaemon>")]
    pub daemon: Option<Spanned<RawDaemon>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Daemon")]
pub struct RawDaemon {
    /// The API socket's group (a name or a gid): the socket is mode 0660 to
    /// it, and the daemon refuses callers outside it (root and the daemon's
    /// user always pass). Default: the daemon's own group.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub api_group: Option<Spanned<String>>,
    /// The user VMMs run as (a name or a uid): instance sockets are mode
    /// 0600 and owned by it, unless a definition names its own owner.
    /// Default: the daemon's own user.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub instance_owner: Option<Spanned<String>>,
    /// What one VMM may cost the daemon, for every instance it serves
    /// (`docs/security.md`, "Limits"); each unset one keeps its default.
    #[serde(default)]
    #[schemars(with = "Option<RawLimits>")]
    pub limits: Option<Spanned<RawLimits>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Limits")]
pub struct RawLimits {
    /// Largest vfio-user message, header included, in bytes (4096 to
    /// 1052672; default 1052672). More: E2BIG and the connection closed.
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 4096, max = 1052672))]
    pub max_message_size: Option<Spanned<u32>>,
    /// Fds one message may carry (1 to 252; default 16).
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 1, max = 252))]
    pub max_msg_fds: Option<Spanned<u32>>,
    /// DMA maps one connection may hold (1 to 65535; default 1024).
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 1, max = 65535))]
    pub max_dma_maps: Option<Spanned<u32>>,
    /// How long the rest of a started message, or the peer's reading of a
    /// reply, may take, in milliseconds (10 to 600000; default 5000).
    #[serde(default)]
    #[schemars(with = "Option<u64>", range(min = 10, max = 600000))]
    pub message_timeout_ms: Option<Spanned<u64>>,
    /// Warning lines one instance may log per second (default 10).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub log_lines_per_sec: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "NumaNode")]
pub struct RawNumaNode {
    /// NUMA node id (0..=1023), as Linux numbers them.
    #[schemars(with = "u32", range(max = 1023))]
    pub id: Spanned<u32>,
    /// CPUs of the node, in Linux cpu-list syntax (`0-3,8-11`).
    #[schemars(with = "Option<String>")]
    #[serde(default)]
    pub cpus: Option<Spanned<String>>,
    /// Distance to other nodes by id, SLIT-like (10 = local), each 1..=255.
    #[serde(default)]
    #[schemars(with = "BTreeMap<u32, u32>")]
    pub distances: BTreeMap<u32, Spanned<u32>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Accelerator")]
pub struct RawAccelerator {
    /// Unique accelerator name.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Backend driving the accelerator. Known: `soft` (the built-in software
    /// accelerator); `uacce` and `idxd` name a device discovery found, to
    /// restrict or override it.
    #[schemars(with = "String")]
    pub backend: Spanned<String>,
    /// Engine threads (1..=64).
    #[schemars(with = "u32", range(min = 1, max = 64))]
    pub engines: Spanned<u32>,
    /// Queue pairs this accelerator can give instances (1..=4096).
    #[schemars(with = "u32", range(min = 1, max = 4096))]
    pub queue_pairs: Spanned<u32>,
    /// Operations the accelerator performs: `all`, or operation names.
    #[schemars(with = "Vec<String>")]
    pub operations: Spanned<Vec<Spanned<String>>>,
    /// PASIDs the accelerator can tag address spaces with (1..=1048575).
    #[schemars(with = "u32", range(min = 1, max = 1048575))]
    pub pasids: Spanned<u32>,
    /// NUMA node the accelerator is attached to (an `id` of `numa_nodes`).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub numa_node: Option<Spanned<u32>>,
    /// CPUs the accelerator is local to, in cpu-list syntax.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub cpus: Option<Spanned<String>>,
    /// Extra graph edges to other accelerators or NUMA nodes.
    #[serde(default)]
    pub links: Vec<RawLink>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Link")]
pub struct RawLink {
    /// An accelerator's name, or `nodeN` for NUMA node N.
    #[schemars(with = "String")]
    pub to: Spanned<String>,
    /// Distance along the link (1..=255).
    #[schemars(with = "u32", range(min = 1, max = 255))]
    pub distance: Spanned<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "QosPolicy")]
pub struct RawQosPolicy {
    /// Unique policy name.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Share of the engines under contention (1..=10000).
    #[schemars(with = "u32", range(min = 1, max = 10000))]
    pub weight: Spanned<u32>,
    /// Rate limits; each field optional.
    #[serde(default)]
    pub rate: Option<RawRate>,
    /// Jobs in flight at once (1..=65536); no cap if absent.
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 1, max = 65536))]
    pub max_in_flight: Option<Spanned<u32>>,
    /// Per queue of an instance, in queue order, its priority (0..=7, higher
    /// first) among the instance's queues; queues not listed have 0.
    #[serde(default)]
    #[schemars(with = "Option<Vec<u8>>")]
    pub queue_priorities: Option<Vec<Spanned<u32>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Rate")]
pub struct RawRate {
    /// Sustained jobs per second (≥ 1).
    #[serde(default)]
    #[schemars(with = "Option<u64>", range(min = 1))]
    pub jobs_per_sec: Option<Spanned<u64>>,
    /// Sustained source bytes per second (≥ 1).
    #[serde(default)]
    #[schemars(with = "Option<u64>", range(min = 1))]
    pub bytes_per_sec: Option<Spanned<u64>>,
    /// Jobs that may run above the rate at once (≥ 1; needs `jobs_per_sec`).
    #[serde(default)]
    #[schemars(with = "Option<u64>", range(min = 1))]
    pub burst_jobs: Option<Spanned<u64>>,
    /// Bytes that may run above the rate at once (≥ 1; needs `bytes_per_sec`).
    #[serde(default)]
    #[schemars(with = "Option<u64>", range(min = 1))]
    pub burst_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Type")]
pub struct RawType {
    /// Unique type name.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// One-function shorthand: the queues of the device's single function
    /// (1..=64). Use either `queues` + `operations` or `functions`.
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 1, max = 64))]
    pub queues: Option<Spanned<u32>>,
    /// One-function shorthand: the operations its queues may run.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub operations: Option<Spanned<Vec<Spanned<String>>>>,
    /// Several functions, each placed on one accelerator; the guest sees one
    /// device with all their queues (64 at most in all).
    #[serde(default)]
    #[schemars(with = "Option<Vec<RawFunction>>")]
    pub functions: Option<Spanned<Vec<Spanned<RawFunction>>>>,
    /// Largest ring depth the guest may program: a power of two in 2..=65536.
    /// Default 1024.
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 2, max = 65536))]
    pub max_depth: Option<Spanned<u32>>,
    /// The QoS policy (a `qos_policies` name).
    #[schemars(with = "String")]
    pub qos: Spanned<String>,
    /// Where the functions may be placed.
    #[serde(default)]
    pub placement: Option<RawPlacement>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Function")]
pub struct RawFunction {
    /// Queues of this function (1..=64).
    #[schemars(with = "u32", range(min = 1, max = 64))]
    pub queues: Spanned<u32>,
    /// Operations its queues may run: `all`, or operation names.
    #[schemars(with = "Vec<String>")]
    pub operations: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Placement")]
pub struct RawPlacement {
    /// Largest distance between the functions' accelerators, and from each to
    /// the instance's NUMA node (1..=65535).
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 1, max = 65535))]
    pub max_distance: Option<Spanned<u32>>,
    /// Only these accelerators may host the type's functions.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub accelerators: Option<Spanned<Vec<Spanned<String>>>>,
    /// The NUMA node the instance is placed near when its definition names
    /// none (a `numa_nodes` id).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub numa_node: Option<Spanned<u32>>,
}
