//! What discovery found: plain, serialisable data. Built only by the
//! sources (`sources`), read by the merge (`host`) and the listings.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::sysfs::ProblemKind;

/// One entry of the tree that could not be used, and why. Discovery goes on
/// past it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{path}: {kind}")]
pub struct Problem {
    /// Relative to the sysfs root (`class/uacce/hisi_zip-0/flags`).
    pub path: String,
    /// The source that read it (`numa`, `pci`, `uacce`, `idxd`, `soft`).
    pub reader: &'static str,
    #[serde(flatten)]
    pub kind: ProblemKind,
}

/// A NUMA node as `/sys/devices/system/node/nodeN` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NumaInfo {
    pub id: u32,
    /// Its CPUs; empty for a memory-only node (HBM, CXL memory) or a
    /// generic initiator.
    pub cpus: Vec<u32>,
    /// `MemTotal` of its `meminfo`, when readable.
    pub memory_kib: Option<u64>,
    /// Its row of the SLIT (`distance`), by node id.
    pub distances: BTreeMap<u32, u32>,
    /// Listed in `has_generic_initiator` (ACPI 6.3 GI: a device, such as an
    /// accelerator, with its own proximity domain).
    pub generic_initiator: bool,
}

impl NumaInfo {
    /// Memory and no CPU: HBM, CXL or persistent memory exposed as a node.
    pub fn memory_only(&self) -> bool {
        self.cpus.is_empty() && self.memory_kib.is_some_and(|m| m > 0)
    }

    /// What the node is, in one word for listings.
    pub fn role(&self) -> &'static str {
        if !self.cpus.is_empty() {
            "cpus+memory"
        } else if self.memory_only() {
            "memory-only"
        } else if self.generic_initiator {
            "initiator"
        } else {
            "empty"
        }
    }
}

/// The PASID extended capability of a PCI function's config space (PCIe
/// base spec, "PASID Extended Capability", ID 001Bh).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PasidCap {
    /// Present: PASIDs up to `2^max_width - 1`.
    Present {
        max_width: u8,
        execute: bool,
        privileged: bool,
    },
    /// The extended capability list was read and has no PASID capability.
    Absent,
    /// Only the first 64/256 bytes of config space could be read (an
    /// unprivileged reader of the real `/sys` gets 64).
    Unknown,
}

impl PasidCap {
    /// How many PASIDs the function can tag (`None` when unknown).
    pub fn capacity(self) -> Option<u32> {
        match self {
            PasidCap::Present { max_width, .. } => {
                let w = u32::from(max_width.min(20));
                Some(((1u64 << w) - 1).min(crate::partition::PASID_MAX as u64) as u32)
            }
            PasidCap::Absent => Some(0),
            PasidCap::Unknown => None,
        }
    }
}

impl fmt::Display for PasidCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasidCap::Present { max_width, .. } => write!(f, "{max_width}-bit"),
            PasidCap::Absent => f.write_str("none"),
            PasidCap::Unknown => f.write_str("unknown"),
        }
    }
}

/// A PCI function as `/sys/bus/pci/devices/DDDD:BB:DD.F` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciFunction {
    pub address: String,
    pub vendor: Option<u16>,
    pub device: Option<u16>,
    pub class: Option<u32>,
    /// `None` when the kernel says -1 (no affinity known).
    pub numa_node: Option<u32>,
    pub local_cpus: Vec<u32>,
    pub iommu_group: Option<u32>,
    pub pasid: PasidCap,
}

/// Which interface an accelerator was found behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Interface {
    /// `/sys/class/uacce` (HiSilicon ZIP/SEC/HPRE and other WarpDrive devices).
    Uacce,
    /// `/sys/bus/dsa` (Intel DSA and IAA).
    Idxd,
    /// wdvirt's own software engines.
    Soft,
}

impl Interface {
    /// The configuration's backend for what is found behind it.
    pub fn backend(self) -> crate::config::Backend {
        use crate::config::Backend;
        match self {
            Interface::Uacce => Backend::Uacce,
            Interface::Idxd => Backend::Idxd,
            Interface::Soft => Backend::Soft,
        }
    }
}

/// An IDXD work queue (`/sys/bus/dsa/devices/wqX.Y`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkQueue {
    pub name: String,
    /// `user`, `kernel` or `none`.
    pub kind: String,
    /// `dedicated` or `shared`.
    pub mode: String,
    pub state: String,
    pub size: u32,
    pub group_id: Option<i64>,
}

impl WorkQueue {
    /// A queue an instance can be given: enabled, for user space.
    pub fn usable(&self) -> bool {
        self.kind == "user" && self.state == "enabled"
    }
}

/// What the interface said about an accelerator, beyond the common fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "interface", rename_all = "snake_case")]
pub enum Detail {
    Uacce {
        api: String,
        flags: u32,
        algorithms: Vec<String>,
        available_instances: u32,
        region_mmio_size: Option<u64>,
        region_dus_size: Option<u64>,
        isolate: Option<bool>,
        isolate_strategy: Option<u32>,
    },
    Idxd {
        /// `dsa` or `iax`.
        device_type: String,
        version: Option<String>,
        state: String,
        max_engines: Option<u32>,
        max_work_queues: Option<u32>,
        pasid_enabled: bool,
        op_cap: String,
        work_queues: Vec<WorkQueue>,
    },
    Soft {
        /// The usable CPUs its engines may run on.
        cpus: Vec<u32>,
    },
}

/// One accelerator found, in the terms placement uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FoundAccelerator {
    pub name: String,
    pub interface: Interface,
    /// Where it was found, relative to the sysfs root.
    pub path: String,
    pub engines: u32,
    /// Queue pairs it can give instances now.
    pub queue_pairs: u32,
    /// wdvirt operations it runs (bit n = opcode n).
    pub ops: u32,
    /// How many PASIDs it can hold bound at once.
    pub pasids: u32,
    pub numa_node: Option<u32>,
    /// The PCI function behind it.
    pub pci: Option<String>,
    pub detail: Detail,
}

/// Everything one discovery run found, and every entry it had to skip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Discovery {
    /// The sysfs root read.
    pub root: String,
    pub numa: Vec<NumaInfo>,
    pub cpus_online: Vec<u32>,
    pub pci: Vec<PciFunction>,
    pub accelerators: Vec<FoundAccelerator>,
    pub problems: Vec<Problem>,
}

impl Discovery {
    pub fn numa_node(&self, id: u32) -> Option<&NumaInfo> {
        self.numa.iter().find(|n| n.id == id)
    }

    pub fn pci_function(&self, address: &str) -> Option<&PciFunction> {
        self.pci.iter().find(|p| p.address == address)
    }

    pub fn accelerator(&self, name: &str) -> Option<&FoundAccelerator> {
        self.accelerators.iter().find(|a| a.name == name)
    }

    /// What the YAML may name without declaring (`config::load_paths_on`).
    pub fn names(&self) -> crate::config::HostNames {
        crate::config::HostNames {
            accelerators: self.accelerators.iter().map(|a| a.name.clone()).collect(),
            numa_nodes: self.numa.iter().map(|n| n.id).collect(),
        }
    }
}
