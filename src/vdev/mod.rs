//! Virtual devices: a PCI function layer shared by every device type, and
//! the WarpDrive accelerator model on top of it.
//!
//! Neighbours: `transport` calls in through [`device::VfioUserDevice`], the
//! contract this layer declares and `pci::PciFunction` implements (as
//! crosvm and cloud-hypervisor keep `PciDevice` with their devices, so a
//! request flows down the layers, never up); the model submits work to
//! `accel`.

pub mod device;
pub mod dma;
pub mod function;
pub mod pci;
pub mod wd;
