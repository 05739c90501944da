//! The trait between the PCI layer (`vdev::pci`) and a device type's model.
//!
//! The PCI layer owns config space, BAR sizing, the capability list, MSI-X
//! (table, PBA, vector eventfds), INTx and the command register. A model sees
//! only its BAR accesses, DMA map notices, bus-master changes and resets, and
//! raises interrupts through the [`Interrupts`](super::pci::Interrupts) handle
//! it was given.

use crate::vdev::device::{DeviceError, DmaMapping};

/// What kind of BAR, for the type bits in config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Absent (size 0).
    None,
    /// 32-bit non-prefetchable memory BAR.
    Mem32,
    /// 64-bit memory BAR (takes this BAR and the next; the next must be `None`).
    Mem64 { prefetchable: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    pub kind: BarKind,
    /// A power of two (≥ 4 KiB) or 0.
    pub size: u64,
}

impl BarSpec {
    pub const NONE: BarSpec = BarSpec {
        kind: BarKind::None,
        size: 0,
    };
}

/// Static identity and layout of a PCI function, declared up front.
#[derive(Clone, Debug)]
pub struct FunctionLayout {
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub revision: u8,
    /// base << 16 | sub << 8 | prog-if
    pub class_code: u32,
    pub bars: [BarSpec; 6],
    /// MSI-X vectors (0 = no MSI-X capability).
    pub msix_vectors: u16,
    /// BAR index and offset of the MSI-X table and PBA.
    pub msix_table: (u8, u32),
    pub msix_pba: (u8, u32),
}

/// A device type's model under the PCI layer.
pub trait FunctionModel: Send {
    fn layout(&self) -> FunctionLayout;
    /// A read inside `bar` (never the MSI-X table or PBA, the PCI layer serves those).
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    /// A write inside `bar` (never the MSI-X table or PBA).
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    fn dma_map(&mut self, map: DmaMapping) -> Result<(), DeviceError>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DeviceError>;
    fn dma_unmap_all(&mut self) -> Result<(), DeviceError>;
    /// Command register bus-master bit changed; with it off the model starts no DMA.
    fn set_bus_master(&mut self, enabled: bool);
    /// Function-level reset (VFIO DEVICE_RESET, FLR): back to power-on state.
    fn reset(&mut self) -> Result<(), DeviceError>;
    /// The VMM went away: stop all work and drop its memory.
    fn disconnected(&mut self);
    /// Every fd the model holds for the VMM (its guest memory), keyed
    /// `dma/<iova>`; valid until the next DMA map or unmap.
    fn held_fds(&self) -> Vec<(String, std::os::fd::RawFd)>;
    /// The model's half of migration, or `None` for a model that cannot
    /// migrate (the PCI layer then offers no migration at all).
    fn migration(&self) -> Option<&dyn ModelMigration>;
    fn migration_mut(&mut self) -> Option<&mut dyn ModelMigration>;
}

/// What the PCI layer needs from a model to migrate a function: the PCI
/// layer adds config space and MSI-X state around the model's own state and
/// implements [`Migratable`](crate::vdev::device::Migratable) once for every
/// model. No method has a default.
pub trait ModelMigration {
    /// Stop taking work and keep every job (see `Migratable::quiesce`).
    fn quiesce(&mut self) -> Result<(), DeviceError>;
    fn resume(&mut self) -> Result<(), DeviceError>;
    fn compat(&self) -> crate::migration::stream::Compat;
    /// The model's state, only while quiesced.
    fn save(&self) -> Result<serde_json::Value, DeviceError>;
    /// The model's state while it runs, for a successor process: as `save`
    /// gives it, except where each running queue stands in its rings (its
    /// journal says that), which is left at zero.
    fn live_save(&self) -> Result<serde_json::Value, DeviceError>;
    /// Check every value of `state`, then become it (still quiesced);
    /// unchanged on error. `bus_master` is the restored Command register's
    /// Bus Master Enable, which the model takes without side effects.
    fn restore(&mut self, state: serde_json::Value, bus_master: bool) -> Result<(), DeviceError>;
    /// `Migratable::dirty_log_start` and friends, for the model's DMA.
    fn dirty_log_start(&mut self, page_size: u64) -> Result<(), DeviceError>;
    fn dirty_log_stop(&mut self);
    fn dirty_report(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError>;
}

/// How a model raises its interrupts (implemented by the PCI layer's
/// MSI-X state; a model never sees an eventfd).
pub trait InterruptSink: Send + Sync {
    /// Signal MSI-X `vector`. Returns whether it was delivered now (false:
    /// masked and left pending, or no eventfd assigned).
    fn msix(&self, vector: u16) -> bool;
}
