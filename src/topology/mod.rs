//! Finding the host as it is: its NUMA nodes (CPUs, memory, distances,
//! memory-only nodes), its PCI functions (locality, IOMMU group, PASID
//! capability) and the accelerators behind every interface Linux offers —
//! UACCE, IDXD — plus wdvirt's own software engines, read from a sysfs tree
//! that may be the real `/sys` or a recorded one ([`discover`]). What is
//! found is merged with what the YAML declares into one graph ([`host`]),
//! on which the partition layer places instances.
//!
//! Files by role: `sysfs` (bounded, loop-safe reads), `sources` (one reader
//! per interface behind the [`Source`] trait), `model` (what was found),
//! `host` (the merge and its rules), `render` (text, JSON, DOT, SVG).
//! Neighbours: `config` below (the YAML, its places for errors), `partition`
//! beside (the graph's input), `daemon` and `cli` above.
//! `docs/topology.md` tells what is read and the merge rules.

pub mod host;
pub mod model;
pub mod render;
pub mod sources;
pub mod sysfs;

pub use model::{
    Detail, Discovery, FoundAccelerator, Interface, NumaInfo, PasidCap, PciFunction, Problem,
    WorkQueue,
};
pub use sources::{Source, all_sources, discover, discover_with, placement_sources};
pub use sysfs::{ProblemKind, Sysfs};

/// The running machine's sysfs.
pub const DEFAULT_SYSFS: &str = "/sys";
