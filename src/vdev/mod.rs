//! Virtual devices: a PCI function layer shared by every device type, and
//! the WarpDrive accelerator model on top of it.
//!
//! Neighbours: `transport` calls in through `VfioUserDevice` (implemented by
//! `pci::PciFunction`); the model submits work to `accel`.

pub mod dma;
pub mod function;
pub mod pci;
pub mod wd;
