//! The PCI function layer, written once for every device type.
//!
//! [`PciFunction`] implements the transport's `VfioUserDevice` on top of a
//! device type's [`FunctionModel`](crate::vdev::function::FunctionModel): it
//! owns config space ([`config`]), the MSI-X table and PBA ([`msix`]), the
//! interrupt eventfds ([`interrupts`]) and the Command register, and hands the
//! model only its BAR accesses, DMA notices, bus-master changes and resets.
//! The model raises interrupts through the shared [`Interrupts`] handle.
//!
//! Neighbours: called by `transport`; calls `vdev::function` models.

pub mod config;
mod device;
pub mod interrupts;
pub mod msix;
mod nowait;
pub mod state;

#[cfg(test)]
mod tests;

pub use device::{LayoutError, NUM_REGIONS, PciFunction, validate_layout};
pub use interrupts::{Interrupts, IrqOutcome, VectorCounters};
