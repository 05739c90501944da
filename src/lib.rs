//! wdvirt: share WarpDrive-style accelerators between virtual machines.
//!
//! Layers (one folder each; a layer talks only to its neighbours):
//! `transport` (vfio-user) → `vdev` (PCI function + accelerator model) →
//! `accel` (engines). `stats` is read by everyone; `vmm` is an in-process
//! VMM-role client used by the demo and the tests; `cli` parses the command
//! line into actions.

pub mod accel;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod libvirt;
pub mod migration;
pub mod partition;
pub mod qos;
pub mod restart;
pub mod stats;
pub mod topology;
pub mod transport;
pub mod vdev;
pub mod vmm;
