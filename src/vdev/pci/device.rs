//! [`PciFunction`]: a [`FunctionModel`] served as a VFIO PCI device.
//!
//! Region indexes follow VFIO PCI: 0–5 BARs, 6 ROM (absent, size 0),
//! 7 config (4 KiB), 8 VGA (absent). IRQ indexes: INTx (none: interrupt pin
//! 0, count 0), MSI (none), MSI-X, ERR, REQ.
//!
//! BAR accesses go to the model, except the MSI-X table and PBA ranges which
//! are served here ([`Interrupts`]); an access straddling a boundary is split.
//! BAR accesses are forwarded even while Command Memory Space is clear: real
//! hardware would ignore them, but QEMU does not route guest accesses to a
//! disabled BAR anyway, and refusing would only break a VMM that reads a BAR
//! before enabling decode. ROM and VGA have size 0, so the transport refuses
//! every access to them before we run; if one arrives anyway it gets EINVAL.

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_PCI_ROM_REGION_INDEX, VFIO_PCI_VGA_REGION_INDEX, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

use super::config::{
    CMD_BUS_MASTER, CMD_INTX_DISABLE, CONFIG_SPACE_SIZE, ConfigError, ConfigSpace, INTERRUPT_PIN,
    MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK,
};
use super::interrupts::Interrupts;
use super::msix;
use super::state::{FUNCTION_STATE_VERSION, FunctionState, LiveState, PciState, PciStateError};
use crate::migration::stream::Compat;
use crate::vdev::device::{
    DeviceError, DeviceInfo, DmaMapping, IrqAction, IrqData, IrqInfo, Migratable, RegionInfo,
    Survivable, VfioUserDevice,
};
use crate::vdev::function::{BarKind, FunctionLayout, FunctionModel, ModelMigration};

/// Regions: 6 BARs, ROM, config, VGA.
pub const NUM_REGIONS: u32 = VFIO_PCI_VGA_REGION_INDEX + 1;

/// A layout the PCI layer cannot present.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("BAR{bar}: size {size:#x} is not a power of two of at least 4 KiB")]
    BarSize { bar: u8, size: u64 },
    #[error("BAR{bar}: kind None with a size, or a kind with size 0")]
    BarKindSize { bar: u8 },
    #[error("BAR{bar}: a 32-bit BAR of {size:#x} bytes does not fit in 4 GiB")]
    Bar32TooLarge { bar: u8, size: u64 },
    #[error("BAR{bar}: a 64-bit BAR needs BAR{next} free for its upper half")]
    Bar64Upper { bar: u8, next: u8 },
    #[error("MSI-X: {0} vectors (1..=2048 allowed)")]
    MsixVectors(u16),
    #[error("MSI-X: the Interrupts handle has {handle} vectors, the layout {layout}")]
    MsixHandleMismatch { handle: u16, layout: u16 },
    #[error(
        "MSI-X {what}: BAR{bar} offset {offset:#x} (+{len:#x}) is misaligned or outside the BAR"
    )]
    MsixPlacement {
        what: &'static str,
        bar: u8,
        offset: u32,
        len: u64,
    },
    #[error("MSI-X table and PBA overlap")]
    MsixOverlap,
}

/// Check `layout` against what PCI and QEMU accept (power-of-two BARs,
/// 64-bit BARs with a free upper half, MSI-X table and PBA inside their BARs,
/// QWORD aligned, not overlapping).
pub fn validate_layout(layout: &FunctionLayout) -> Result<(), LayoutError> {
    for (i, spec) in layout.bars.iter().enumerate() {
        let bar = i as u8;
        match (spec.kind, spec.size) {
            (BarKind::None, 0) => continue,
            (BarKind::None, _) | (_, 0) => return Err(LayoutError::BarKindSize { bar }),
            (_, size) if !size.is_power_of_two() || size < 4096 => {
                return Err(LayoutError::BarSize { bar, size });
            }
            (BarKind::Mem32, size) if size > 1 << 31 => {
                return Err(LayoutError::Bar32TooLarge { bar, size });
            }
            (BarKind::Mem64 { .. }, _) => {
                let free = layout
                    .bars
                    .get(i + 1)
                    .is_some_and(|n| n.kind == BarKind::None && n.size == 0);
                if !free {
                    return Err(LayoutError::Bar64Upper { bar, next: bar + 1 });
                }
            }
            _ => {}
        }
    }
    let n = layout.msix_vectors;
    if n == 0 {
        return Ok(());
    }
    if n > 2048 {
        return Err(LayoutError::MsixVectors(n));
    }
    let table = msix_range(layout, "table", layout.msix_table, msix::table_bytes(n))?;
    let pba = msix_range(layout, "PBA", layout.msix_pba, msix::pba_bytes(n))?;
    if table.0 == pba.0 && table.1 < pba.2 && pba.1 < table.2 {
        return Err(LayoutError::MsixOverlap);
    }
    Ok(())
}

/// (bar, start, end) of an MSI-X structure, checked to lie in a present BAR
/// (the low half of a 64-bit one) and be QWORD aligned.
fn msix_range(
    layout: &FunctionLayout,
    what: &'static str,
    (bar, offset): (u8, u32),
    len: u64,
) -> Result<(u8, u64, u64), LayoutError> {
    let err = LayoutError::MsixPlacement {
        what,
        bar,
        offset,
        len,
    };
    let spec = layout.bars.get(usize::from(bar)).ok_or(err.clone())?;
    let start = u64::from(offset);
    let end = start + len;
    if spec.kind == BarKind::None || offset % 8 != 0 || end > spec.size {
        return Err(err);
    }
    Ok((bar, start, end))
}

/// Where an MSI-X structure sits in a BAR.
#[derive(Clone, Copy, Debug)]
struct MsixWindow {
    bar: u8,
    start: u64,
    end: u64,
}

impl MsixWindow {
    fn overlaps(&self, bar: u8, start: u64, end: u64) -> bool {
        self.bar == bar && start < self.end && self.start < end
    }
}

/// Who serves a piece of a BAR access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Model,
    Table,
    Pba,
}

/// A PCI function: config space, MSI-X and interrupts, over a model.
pub struct PciFunction<M: FunctionModel> {
    model: M,
    layout: FunctionLayout,
    config: ConfigSpace,
    interrupts: Interrupts,
    table: Option<MsixWindow>,
    pba: Option<MsixWindow>,
    /// Quiesced for a migration (`Migratable::quiesce` or `restore`) until
    /// `resume`: region writes are refused (`EBUSY`), so nothing the VMM
    /// sends changes the state being saved or starts DMA.
    stopped: bool,
}

impl<M: FunctionModel> PciFunction<M> {
    /// Build the function from `model.layout()`.
    ///
    /// # Panics
    /// If the layout is invalid or `interrupts` has a different vector count
    /// (a programming error in the model; see [`PciFunction::try_new`]).
    pub fn new(model: M, interrupts: Interrupts) -> Self {
        match Self::try_new(model, interrupts) {
            Ok(f) => f,
            Err(e) => panic!("invalid FunctionLayout: {e}"),
        }
    }

    pub fn try_new(model: M, interrupts: Interrupts) -> Result<Self, LayoutError> {
        let layout = model.layout();
        validate_layout(&layout)?;
        if interrupts.msix_vectors() != layout.msix_vectors {
            return Err(LayoutError::MsixHandleMismatch {
                handle: interrupts.msix_vectors(),
                layout: layout.msix_vectors,
            });
        }
        let n = layout.msix_vectors;
        let window = |(bar, offset): (u8, u32), len: u64| MsixWindow {
            bar,
            start: u64::from(offset),
            end: u64::from(offset) + len,
        };
        let (table, pba) = if n > 0 {
            (
                Some(window(layout.msix_table, msix::table_bytes(n))),
                Some(window(layout.msix_pba, msix::pba_bytes(n))),
            )
        } else {
            (None, None)
        };
        let config = ConfigSpace::new(&layout);
        Ok(PciFunction {
            model,
            layout,
            config,
            interrupts,
            table,
            pba,
            stopped: false,
        })
    }

    /// Stopped for a migration (between `quiesce` and `resume`).
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    pub fn interrupts(&self) -> &Interrupts {
        &self.interrupts
    }

    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Report hardware status bits (see [`ConfigSpace::set_status_bits`]).
    pub fn set_status_bits(&mut self, offset: u16, width: u8, bits: u32) {
        self.config.set_status_bits(offset, width, bits);
    }

    pub fn layout(&self) -> &FunctionLayout {
        &self.layout
    }

    fn bar_size(&self, bar: u32) -> u64 {
        usize::try_from(bar)
            .ok()
            .and_then(|b| self.layout.bars.get(b))
            .map_or(0, |s| s.size)
    }

    /// Cut `[offset, offset + len)` of `bar` at the MSI-X table and PBA.
    fn pieces(&self, bar: u8, offset: u64, len: u64) -> Vec<(Target, u64, u64)> {
        let end = offset.saturating_add(len);
        let windows: Vec<(Target, MsixWindow)> =
            [(Target::Table, self.table), (Target::Pba, self.pba)]
                .into_iter()
                .filter_map(|(t, w)| w.filter(|w| w.overlaps(bar, offset, end)).map(|w| (t, w)))
                .collect();
        if windows.is_empty() {
            return vec![(Target::Model, offset, end)];
        }
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            if let Some((t, w)) = windows.iter().find(|(_, w)| w.start <= pos && pos < w.end) {
                let stop = end.min(w.end);
                out.push((*t, pos, stop));
                pos = stop;
            } else {
                let stop = windows
                    .iter()
                    .map(|(_, w)| w.start)
                    .filter(|s| *s > pos)
                    .min()
                    .unwrap_or(end)
                    .min(end);
                out.push((Target::Model, pos, stop));
                pos = stop;
            }
        }
        out
    }

    /// Does the access touch the MSI-X table or PBA? (The common case, a
    /// register access, does not and skips the splitting.)
    fn touches_msix(&self, bar: u8, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        [self.table, self.pba]
            .iter()
            .flatten()
            .any(|w| w.overlaps(bar, offset, end))
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if !self.touches_msix(bar, offset, data.len() as u64) {
            return self.model.bar_read(bar, offset, data);
        }
        for (target, start, stop) in self.pieces(bar, offset, data.len() as u64) {
            let buf = data
                .get_mut(piece_range(offset, start, stop)?)
                .ok_or_else(|| piece_error(offset, start, stop))?;
            match target {
                Target::Model => self.model.bar_read(bar, start, buf)?,
                Target::Table => self
                    .interrupts
                    .msix_table_read(start.saturating_sub(self.table_start()), buf),
                Target::Pba => self
                    .interrupts
                    .msix_pba_read(start.saturating_sub(self.pba_start()), buf),
            }
        }
        Ok(())
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if !self.touches_msix(bar, offset, data.len() as u64) {
            return self.model.bar_write(bar, offset, data);
        }
        for (target, start, stop) in self.pieces(bar, offset, data.len() as u64) {
            let buf = data
                .get(piece_range(offset, start, stop)?)
                .ok_or_else(|| piece_error(offset, start, stop))?;
            match target {
                Target::Model => self.model.bar_write(bar, start, buf)?,
                Target::Table => self
                    .interrupts
                    .msix_table_write(start.saturating_sub(self.table_start()), buf),
                // The PBA is read-only (PCI 3.0 §6.8.2.10); QEMU drops PBA
                // writes itself.
                Target::Pba => tracing::debug!(offset = start, "write to the MSI-X PBA ignored"),
            }
        }
        Ok(())
    }

    /// Does the function have an interrupt pin (and so INTx)?
    fn has_intx(&self) -> bool {
        self.config.read_u8(INTERRUPT_PIN) != 0
    }

    fn table_start(&self) -> u64 {
        self.table.map_or(0, |w| w.start)
    }

    fn pba_start(&self) -> u64 {
        self.pba.map_or(0, |w| w.start)
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let command = self.config.command();
        let msix_control = self.config.msix_control();
        let effects = self.config.write(offset, data).map_err(config_error)?;
        let new_command = self.config.command();
        let changed = command ^ new_command;
        if changed & CMD_BUS_MASTER != 0 {
            self.model.set_bus_master(new_command & CMD_BUS_MASTER != 0);
        }
        if changed & CMD_INTX_DISABLE != 0 {
            self.interrupts
                .set_intx_disabled(new_command & CMD_INTX_DISABLE != 0);
        }
        let new_msix_control = self.config.msix_control();
        if let Some(ctl) = new_msix_control.filter(|_| new_msix_control != msix_control) {
            self.interrupts.set_msix_control(
                ctl & MSIX_CONTROL_ENABLE != 0,
                ctl & MSIX_CONTROL_FUNCTION_MASK != 0,
            );
        }
        if effects.flr {
            tracing::debug!("function level reset requested through PCIe DEVCTL");
            self.function_reset()?;
        }
        Ok(())
    }

    /// Config, MSI-X state and masks back to reset values (eventfds kept),
    /// bus mastering off, then the model's own reset.
    fn function_reset(&mut self) -> Result<(), DeviceError> {
        self.reset_pci_state();
        self.model.reset()
    }

    /// Config space and MSI-X state back to reset values (eventfds kept).
    /// COMMAND becomes 0, so a model that was bus master is told it no
    /// longer is: nobody else will (the next MASTER=0 write is no change).
    fn reset_pci_state(&mut self) {
        let was_master = self.config.command() & CMD_BUS_MASTER != 0;
        self.config.reset();
        self.interrupts.reset();
        if was_master {
            self.model.set_bus_master(false);
        }
    }
}

/// Where the piece `start..stop` of an access at `offset` lies in its buffer.
fn piece_range(offset: u64, start: u64, stop: u64) -> Result<std::ops::Range<usize>, DeviceError> {
    let at = |x: u64| {
        x.checked_sub(offset)
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| piece_error(offset, start, stop))
    };
    Ok(at(start)?..at(stop)?)
}

fn piece_error(offset: u64, start: u64, stop: u64) -> DeviceError {
    DeviceError::Invalid(format!(
        "BAR access at {offset:#x}: piece {start:#x}..{stop:#x} outside it"
    ))
}

fn config_error(e: ConfigError) -> DeviceError {
    DeviceError::Invalid(e.to_string())
}

fn region_error(index: u32) -> DeviceError {
    DeviceError::Invalid(format!("region {index} does not exist or has size 0"))
}

const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;

impl<M: FunctionModel> VfioUserDevice for PciFunction<M> {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
        let (flags, size) = match index {
            0..=VFIO_PCI_BAR5_REGION_INDEX => {
                // The upper half of a 64-bit BAR has kind None and size 0.
                let size = self.bar_size(index);
                (if size > 0 { RW } else { 0 }, size)
            }
            VFIO_PCI_ROM_REGION_INDEX | VFIO_PCI_VGA_REGION_INDEX => (0, 0),
            VFIO_PCI_CONFIG_REGION_INDEX => (RW, CONFIG_SPACE_SIZE as u64),
            _ => return Err(DeviceError::Invalid(format!("no region {index}"))),
        };
        Ok(RegionInfo {
            flags,
            size,
            mmap: None,
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, DeviceError> {
        let info = match index {
            // Count 0 without an interrupt pin, as the kernel's vfio-pci
            // reports it (cloud-hypervisor reads it as "no INTx").
            VFIO_PCI_INTX_IRQ_INDEX => IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
                count: self.has_intx().into(),
            },
            VFIO_PCI_MSI_IRQ_INDEX => IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 0,
            },
            // Not NORESIZE: with it QEMU removes every vector (count 0) and
            // re-adds them all each time the guest unmasks a higher one;
            // without it each vector is added on its own.
            VFIO_PCI_MSIX_IRQ_INDEX => IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: self.layout.msix_vectors.into(),
            },
            VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 1,
            },
            _ => return Err(DeviceError::Invalid(format!("no IRQ index {index}"))),
        };
        Ok(info)
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match index {
            0..=VFIO_PCI_BAR5_REGION_INDEX
                if in_region(offset, data.len(), self.bar_size(index)) =>
            {
                self.bar_read(index as u8, offset, data)
            }
            VFIO_PCI_CONFIG_REGION_INDEX => self.config.read(offset, data).map_err(config_error),
            _ => Err(region_error(index)),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.stopped {
            return Err(DeviceError::Busy(format!(
                "region {index} write at {offset:#x}: the device is stopped for a migration"
            )));
        }
        match index {
            0..=VFIO_PCI_BAR5_REGION_INDEX
                if in_region(offset, data.len(), self.bar_size(index)) =>
            {
                self.bar_write(index as u8, offset, data)
            }
            VFIO_PCI_CONFIG_REGION_INDEX => self.config_write(offset, data),
            _ => Err(region_error(index)),
        }
    }

    fn set_irqs(
        &mut self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), DeviceError> {
        // Without a pin only "disable INTx" (TRIGGER, DATA_NONE, count 0) is
        // accepted: QEMU sends it before enabling MSI/MSI-X and on reset.
        if index == VFIO_PCI_INTX_IRQ_INDEX && !self.has_intx() {
            let disable =
                action == IrqAction::Trigger && count == 0 && matches!(data, IrqData::None);
            if !disable {
                return Err(DeviceError::Invalid(
                    "no INTx: the interrupt pin is 0".into(),
                ));
            }
        }
        self.interrupts.set_irqs(index, action, start, count, data)
    }

    fn dma_map(&mut self, map: DmaMapping) -> Result<(), DeviceError> {
        self.model.dma_map(map)
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DeviceError> {
        self.model.dma_unmap(iova, size)
    }

    fn dma_unmap_all(&mut self) -> Result<(), DeviceError> {
        self.model.dma_unmap_all()
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        // VFIO migration v2: a reset takes the device back to RUNNING.
        self.stopped = false;
        self.function_reset()
    }

    /// Drops every interrupt eventfd and returns config space and MSI-X state
    /// to reset values (telling the model bus mastering is off if it was
    /// on), so a later connection finds a powered-on function; then the
    /// model quiesces.
    fn disconnected(&mut self) {
        self.stopped = false;
        self.interrupts.drop_fds();
        self.reset_pci_state();
        self.model.disconnected();
    }
    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        if self.model.migration().is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn survivable(&mut self) -> Option<&mut dyn Survivable> {
        if self.model.migration().is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl<M: FunctionModel> Survivable for PciFunction<M> {
    fn live_state(&mut self) -> Result<serde_json::Value, DeviceError> {
        let st = LiveState {
            function: FunctionState {
                version: FUNCTION_STATE_VERSION,
                pci: PciState {
                    config: self.config.changed_values(),
                    interrupts: self.interrupts.saved(),
                },
                model: self.model_migration()?.live_save()?,
            },
            irqs: self.interrupts.vmm_state(),
        };
        serde_json::to_value(&st).map_err(|e| DeviceError::Invalid(e.to_string()))
    }

    fn held_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        let mut fds = self.model.held_fds();
        fds.extend(self.interrupts.held_fds());
        fds
    }
}

impl<M: FunctionModel> PciFunction<M> {
    fn model_migration(&mut self) -> Result<&mut dyn ModelMigration, PciStateError> {
        self.model
            .migration_mut()
            .ok_or(PciStateError::NotMigratable)
    }

    /// The function's whole state (only while stopped).
    pub fn save_state(&mut self) -> Result<FunctionState, DeviceError> {
        if !self.stopped {
            return Err(PciStateError::NotStopped("saving").into());
        }
        let pci = PciState {
            config: self.config.changed_values(),
            interrupts: self.interrupts.saved(),
        };
        let model = self.model_migration()?.save()?;
        Ok(FunctionState {
            version: FUNCTION_STATE_VERSION,
            pci,
            model,
        })
    }

    /// Check `st`'s PCI part, have the model check and take its part, then
    /// take the PCI part: on any error nothing has changed.
    pub fn restore_state(&mut self, st: FunctionState) -> Result<(), DeviceError> {
        if !self.stopped {
            return Err(PciStateError::NotStopped("restoring").into());
        }
        if st.version != FUNCTION_STATE_VERSION {
            return Err(PciStateError::Version { found: st.version }.into());
        }
        if let Some(why) = self.config.check_values(&st.pci.config) {
            return Err(PciStateError::Config(why).into());
        }
        if let Some(why) = self.interrupts.check_saved(&st.pci.interrupts) {
            return Err(PciStateError::Interrupts(why).into());
        }
        // The gates the restored config space implies, read from a scratch
        // copy so that this one changes only after the model accepted.
        let mut config = ConfigSpace::new(&self.layout);
        config.restore_values(&st.pci.config);
        let command = config.command();
        let msix = config.msix_control().unwrap_or(0);
        self.model_migration()?
            .restore(st.model, command & CMD_BUS_MASTER != 0)?;
        self.config = config;
        self.interrupts.restore(
            &st.pci.interrupts,
            msix & MSIX_CONTROL_ENABLE != 0,
            msix & MSIX_CONTROL_FUNCTION_MASK != 0,
            command & CMD_INTX_DISABLE != 0,
        );
        Ok(())
    }
}

impl<M: FunctionModel> Migratable for PciFunction<M> {
    fn quiesce(&mut self) -> Result<(), DeviceError> {
        self.model_migration()?.quiesce()?;
        self.stopped = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        self.model_migration()?.resume()?;
        self.stopped = false;
        self.interrupts.flush();
        Ok(())
    }

    fn compat(&self) -> Compat {
        match self.model.migration() {
            Some(m) => m.compat(),
            // Unreachable through `migration()`, which offers no migration
            // for such a model; a block no destination matches.
            None => Compat {
                abi_version: 0,
                type_name: String::new(),
                queues: Vec::new(),
                max_xfer: 0,
            },
        }
    }

    fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        let st = self.save_state()?;
        serde_json::to_vec(&st).map_err(|e| DeviceError::Invalid(e.to_string()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        if !self.stopped {
            return Err(PciStateError::NotStopped("restoring").into());
        }
        let st: FunctionState =
            serde_json::from_slice(state).map_err(|e| PciStateError::Decode(e.to_string()))?;
        self.restore_state(st)
    }

    fn dirty_log_start(&mut self, page_size: u64) -> Result<(), DeviceError> {
        self.model_migration()?.dirty_log_start(page_size)
    }

    fn dirty_log_stop(&mut self) {
        if let Ok(m) = self.model_migration() {
            m.dirty_log_stop();
        }
    }

    fn dirty_report(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        self.model_migration()?
            .dirty_report(iova, size, page_size, bitmap)
    }
}

/// `offset + len` inside a non-empty region of `size` bytes (checked; the
/// transport checked already, this guards the arithmetic below).
fn in_region(offset: u64, len: usize, size: u64) -> bool {
    size > 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}
