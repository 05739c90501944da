//! The WarpDrive-style accelerator model: BAR0 control registers (every
//! access decoded against `regs::GLOBAL`/`regs::QUEUE` and checked for value),
//! BAR2 doorbells, and queues that run from rings in guest memory.
//!
//! A refused register access never fails the vfio-user message (the access is
//! well-formed at the protocol level, as on hardware): the write is dropped,
//! a read returns all-ones, and the reason is latched in `ERR_CODE` for the
//! guest and counted and logged for the operator. Neighbours: the PCI layer
//! above (`FunctionModel`), the accelerator below (`Accelerator`).

pub mod backends;
pub mod journal;
mod migration;
pub mod queue;
pub mod regs;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::GuestAddressSpace;

use wdvirt_abi::{ALL_OPS, IDX_ALIGN, RING_ALIGN, RegError, pci, regs as r};

use self::backends::Backends;
use self::queue::{
    BusMaster, Parked, QueueConfig, QueueRunner, QueueShared, RingState, WorkerContext,
    clear_rings, overlaps,
};
use self::regs::{Access, Decoded, Reg};
use crate::accel::Pasid;
use crate::stats::{InstanceStats, add};
use crate::vdev::device::{DeviceError, DmaMapping};
use crate::vdev::dma::DmaSpace;
use crate::vdev::function::{
    BarKind, BarSpec, FunctionLayout, FunctionModel, InterruptSink, ModelMigration,
};

/// Most queues one instance may have.
pub const MAX_QUEUES: usize = 64;
/// Largest ring depth an instance may offer.
pub const MAX_RING_DEPTH: u32 = 65536;
/// The type name of an instance nobody named (`WdDevice::set_type_name`).
pub const DEFAULT_TYPE_NAME: &str = "wd";

/// An instance shape the device cannot take. The rules are stated here
/// once; the YAML loader and `wdvirt serve` call the same checks to point at
/// the offending line or flag before a device is built, and
/// [`WdDevice::new`] applies them to whatever reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("{0} queues (expected {expected})", expected = ShapeError::QUEUES)]
    Queues(u32),
    #[error("ring depth {0} (expected {expected})", expected = ShapeError::DEPTH)]
    Depth(u32),
}

impl ShapeError {
    pub const QUEUES: &'static str = "1..=64";
    pub const DEPTH: &'static str = "a power of two in 2..=65536";

    /// What a valid value looks like.
    pub fn expected(self) -> &'static str {
        match self {
            ShapeError::Queues(_) => Self::QUEUES,
            ShapeError::Depth(_) => Self::DEPTH,
        }
    }

    pub fn check_queues(n: u32) -> Result<u32, ShapeError> {
        if (1..=MAX_QUEUES as u32).contains(&n) {
            Ok(n)
        } else {
            Err(ShapeError::Queues(n))
        }
    }

    pub fn check_depth(d: u32) -> Result<u32, ShapeError> {
        if d.is_power_of_two() && (2..=MAX_RING_DEPTH).contains(&d) {
            Ok(d)
        } else {
            Err(ShapeError::Depth(d))
        }
    }
}

/// What an instance offers its guest, fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WdConfig {
    pub queues: u32,
    /// A power of two ≥ 2.
    pub max_depth: u32,
    /// Opcodes this instance may use (`1 << opcode`).
    pub ops: u32,
    pub max_xfer: u32,
    /// Per queue, the opcodes that queue may run (its `Q_CAP_OPS`); `None`
    /// means all of `ops`. A mask is narrowed to `ops`; an entry for a queue
    /// the instance does not have is refused.
    pub queue_ops: [Option<u32>; MAX_QUEUES],
}

impl Default for WdConfig {
    fn default() -> Self {
        WdConfig {
            queues: 4,
            max_depth: 1024,
            ops: ALL_OPS,
            max_xfer: 1 << 20,
            queue_ops: [None; MAX_QUEUES],
        }
    }
}

impl WdConfig {
    /// Queue `q`'s `Q_CAP_OPS`.
    pub fn queue_cap_ops(&self, q: u32) -> u32 {
        let own = self.queue_ops.get(q as usize).copied().flatten();
        own.unwrap_or(self.ops) & self.ops
    }
}

/// The error latch behind `ERR_STATUS`/`ERR_CODE`/`ERR_OFFSET`/`ERR_COUNT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ErrLatch {
    code: Option<RegError>,
    pub offset: u32,
    pub count: u32,
}

#[derive(Default)]
struct QueueSlot {
    cfg: QueueConfig,
    /// `Q_STATUS` error bits (ERROR | code << 8), cleared by a good enable.
    error: u32,
    shared: Arc<QueueShared>,
    /// An enabled queue is either running (a worker) or parked (stopped for
    /// a migration, its positions and queue pair kept); never both.
    runner: Option<QueueRunner>,
    parked: Option<Parked>,
    /// The running queue's rings have been cleared (see `clear_rings`).
    rings_ready: Arc<std::sync::atomic::AtomicBool>,
    /// A thread waiting to run this queue if a restored state enables it
    /// (started when the device stopped with no queue running: a
    /// migration's destination, before its state arrives).
    spare: Option<queue::IdleThread>,
}

impl QueueSlot {
    /// `Q_STATUS.ENABLED`: running or parked.
    fn enabled(&self) -> bool {
        self.runner.is_some() || self.parked.is_some()
    }

    /// Disable: stop the worker (or drop the parked queue and its queue pair).
    fn take_runner(&mut self) -> Option<QueueRunner> {
        self.parked = None;
        self.runner.take()
    }
}

/// One mediated instance of the accelerator.
pub struct WdDevice {
    cfg: WdConfig,
    pasid: Pasid,
    backends: Backends,
    irq: Arc<dyn InterruptSink>,
    dma: DmaSpace,
    bus_master: Arc<BusMaster>,
    enabled: bool,
    err: ErrLatch,
    queues: Vec<QueueSlot>,
    stats: Arc<InstanceStats>,
    /// Parked for a migration (`Migratable::quiesce`) until resumed.
    quiesced: bool,
    /// The instance type's name, for the migration compatibility block.
    type_name: String,
    /// How long a park waits for the jobs engines have (`queue::PARK_BUDGET`).
    park_budget: std::time::Duration,
    /// One journal per queue when the instance is to survive a restart of
    /// its process ([`journal`]).
    journals: Option<Vec<journal::QueueJournal>>,
}

impl WdDevice {
    /// A new instance whose jobs carry `pasid` (assigned by the host, never
    /// visible to the guest). Binds the PASID to this instance's memory.
    /// `backends`: one accelerator for every queue, or one per queue
    /// ([`Backends::per_queue`], as many as `cfg.queues`).
    pub fn new(
        cfg: WdConfig,
        backends: impl Into<Backends>,
        pasid: Pasid,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<WdDevice, DeviceError> {
        let backends = backends.into();
        ShapeError::check_queues(cfg.queues)
            .and_then(|_| ShapeError::check_depth(cfg.max_depth))
            .map_err(|e| DeviceError::Invalid(format!("bad instance shape: {e}")))?;
        if let Some(q) = cfg.queue_ops[cfg.queues as usize..]
            .iter()
            .position(Option::is_some)
        {
            return Err(DeviceError::Invalid(format!(
                "an operation mask is given for queue {}, but the instance has {} queues",
                cfg.queues as usize + q,
                cfg.queues
            )));
        }
        if let Some(n) = backends.queues()
            && n != cfg.queues as usize
        {
            return Err(DeviceError::Invalid(format!(
                "{n} per-queue backends for an instance of {} queues",
                cfg.queues
            )));
        }
        let mut cfg = WdConfig {
            ops: cfg.ops & backends.any_ops(),
            max_xfer: cfg.max_xfer.min(backends.max_xfer()),
            ..cfg
        };
        // A queue advertises only what its own backend runs.
        for q in 0..cfg.queues as usize {
            if backends.queues().is_some() || cfg.queue_ops[q].is_some() {
                cfg.queue_ops[q] = Some(cfg.queue_cap_ops(q as u32) & backends.supported_ops(q));
            }
        }
        let dma = DmaSpace::new();
        for (i, accel) in backends.all().iter().enumerate() {
            // Undo only our own bindings: a PASID in use belongs to someone
            // else, whose binding must stay.
            let undo = |upto: usize| {
                for a in &backends.all()[..upto] {
                    let _ = a.unbind_pasid(pasid);
                }
            };
            if let Err(e) = accel.bind_pasid(pasid, dma.address_space()) {
                undo(i);
                return Err(DeviceError::Busy(e.to_string()));
            }
            // Bus mastering starts off (PCI reset value).
            if let Err(e) = accel.set_dma_allowed(pasid, false) {
                undo(i + 1);
                return Err(DeviceError::Busy(e.to_string()));
            }
        }
        Ok(WdDevice {
            cfg,
            pasid,
            backends,
            irq,
            dma,
            bus_master: Arc::default(),
            enabled: false,
            err: ErrLatch::default(),
            queues: (0..cfg.queues)
                .map(|_| QueueSlot {
                    cfg: QueueConfig::reset(),
                    ..Default::default()
                })
                .collect(),
            stats: Arc::new(InstanceStats::default()),
            quiesced: false,
            type_name: DEFAULT_TYPE_NAME.to_string(),
            park_budget: queue::PARK_BUDGET,
            journals: None,
        })
    }

    /// Record every queue's positions and taken jobs in `journals` (one
    /// per queue, each for `max_depth` entries) from the next time each
    /// queue starts: a successor process recovers the queues from them
    /// ([`journal::QueueJournal::recover`]).
    pub fn set_journals(&mut self, journals: Vec<journal::QueueJournal>) {
        assert_eq!(journals.len(), self.queues.len());
        self.journals = Some(journals);
    }

    /// Queue `qi`'s journal, if the instance keeps them.
    fn journal(&self, qi: usize) -> Option<journal::QueueJournal> {
        self.journals.as_ref().map(|j| j[qi].clone())
    }

    /// Name the instance type (the daemon's catalogue name): a migration
    /// destination must be of the same type.
    pub fn set_type_name(&mut self, name: impl Into<String>) {
        self.type_name = name.into();
    }

    /// How long a migration's quiesce may wait for the jobs the engines
    /// have, for queues enabled (or restored) from now on.
    pub fn set_park_budget(&mut self, budget: std::time::Duration) {
        self.park_budget = budget;
    }

    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    pub fn config(&self) -> &WdConfig {
        &self.cfg
    }

    /// `DEV_STATUS.ENABLED`, and each queue's `Q_STATUS.ENABLED`, as the
    /// guest would read them now.
    pub fn enabled_state(&self) -> (bool, Vec<bool>) {
        (
            self.enabled,
            self.queues.iter().map(QueueSlot::enabled).collect(),
        )
    }

    pub fn stats(&self) -> Arc<InstanceStats> {
        self.stats.clone()
    }
    /// The VMM's memory as the device sees it.
    pub fn address_space(&self) -> crate::accel::AddressSpace {
        self.dma.address_space()
    }

    /// Per-queue counters, shared with the workers.
    pub fn queue_stats(&self) -> Vec<Arc<QueueShared>> {
        self.queues.iter().map(|q| q.shared.clone()).collect()
    }

    fn refuse(&mut self, code: RegError, offset: u64) {
        add(&self.stats.register_errors, 1);
        self.err.count = self.err.count.saturating_add(1);
        if self.err.code.is_none() {
            self.err.code = Some(code);
            self.err.offset = offset as u32;
        }
        tracing::debug!(
            pasid = self.pasid,
            offset,
            code = code.name(),
            "refused BAR0 access"
        );
    }

    fn read_reg(&self, d: &Decoded) -> u64 {
        let q = d.queue.map(|q| &self.queues[q as usize]);
        let qcfg = q.map(|q| q.cfg).unwrap_or_default();
        match d.def.reg {
            Reg::Id => r::ID_MAGIC as u64,
            Reg::Version => r::ABI_VERSION as u64,
            Reg::CapOps => self.cfg.ops as u64,
            Reg::NumQueues => self.cfg.queues as u64,
            Reg::MaxDepth => self.cfg.max_depth as u64,
            Reg::MaxXfer => self.cfg.max_xfer as u64,
            Reg::DevCtrl => {
                if self.enabled {
                    r::DEV_CTRL_ENABLE as u64
                } else {
                    0
                }
            }
            Reg::DevStatus => {
                if self.enabled {
                    r::DEV_STATUS_ENABLED as u64
                } else {
                    0
                }
            }
            Reg::ErrStatus => self.err.code.is_some() as u64,
            Reg::ErrCode => self.err.code.map_or(0, |c| c.code() as u64),
            Reg::ErrOffset => self.err.offset as u64,
            Reg::ErrCount => self.err.count as u64,
            Reg::SqBase => qcfg.sq_base,
            Reg::CqBase => qcfg.cq_base,
            Reg::IdxBase => qcfg.idx_base,
            Reg::Depth => qcfg.depth as u64,
            Reg::Ops => qcfg.ops as u64,
            Reg::Ctrl => q.map_or(0, |q| {
                if q.enabled() {
                    r::Q_CTRL_ENABLE as u64
                } else {
                    0
                }
            }),
            Reg::Status => q.map_or(0, |q| {
                (if q.enabled() { r::Q_STATUS_ENABLED } else { 0 } | q.error) as u64
            }),
            Reg::MsixVector => qcfg.vector as u64,
            Reg::IrqCoalesce => qcfg.coalesce as u64,
            Reg::Completed => q.map_or(0, |q| q.shared.completed.load(Ordering::Relaxed) as u64),
            Reg::QueueCapOps => d.queue.map_or(0, |q| self.cfg.queue_cap_ops(q) as u64),
        }
    }

    /// Apply a write the table allows; value checks happen here.
    fn write_reg(&mut self, d: &Decoded, value: u64, offset: u64) -> Result<(), RegError> {
        match d.def.access {
            Access::ReadOnly => return Err(RegError::ReadOnly),
            Access::W1c | Access::ReadWrite => {}
        }
        if d.sets_reserved(value) {
            return Err(RegError::ReservedBits);
        }
        let Some(qn) = d.queue else {
            return self.write_global(d.def.reg, value as u32);
        };
        let qi = qn as usize;
        let running = self.queues[qi].enabled();
        if running && !matches!(d.def.reg, Reg::Ctrl) {
            return Err(RegError::QueueBusy);
        }
        let cur = self.read_reg(d);
        let merged = d.merge(cur, value);
        let vectors = self.msix_vectors() as u32;
        let cfg = &mut self.queues[qi].cfg;
        match d.def.reg {
            Reg::SqBase | Reg::CqBase => {
                if !merged.is_multiple_of(RING_ALIGN) {
                    return Err(RegError::Misaligned);
                }
                if d.def.reg == Reg::SqBase {
                    cfg.sq_base = merged
                } else {
                    cfg.cq_base = merged
                }
            }
            Reg::IdxBase => {
                if !merged.is_multiple_of(IDX_ALIGN) {
                    return Err(RegError::Misaligned);
                }
                cfg.idx_base = merged;
            }
            Reg::Depth => {
                let v = merged as u32;
                if !v.is_power_of_two() || v < 2 || v > self.cfg.max_depth {
                    return Err(RegError::BadDepth);
                }
                cfg.depth = v;
            }
            Reg::Ops => {
                if merged as u32 & !self.cfg.queue_cap_ops(qn) != 0 {
                    return Err(RegError::OpNotAllowed);
                }
                cfg.ops = merged as u32;
            }
            Reg::MsixVector => {
                let v = merged as u32;
                if v != r::NO_VECTOR && v >= vectors {
                    return Err(RegError::BadVector);
                }
                cfg.vector = v;
            }
            Reg::IrqCoalesce => cfg.coalesce = merged as u32,
            Reg::Ctrl => return self.write_queue_ctrl(qi, merged as u32, offset),
            _ => return Err(RegError::ReadOnly),
        }
        Ok(())
    }

    fn write_global(&mut self, reg: Reg, v: u32) -> Result<(), RegError> {
        match reg {
            Reg::DevCtrl if v & r::DEV_CTRL_RESET != 0 => self.reset_state(),
            Reg::DevCtrl => {
                self.enabled = v & r::DEV_CTRL_ENABLE != 0;
                if !self.enabled {
                    self.stop_queues();
                }
            }
            Reg::ErrStatus => {
                if v & r::ERR_STATUS_LATCHED != 0 {
                    self.err.code = None;
                    self.err.offset = 0;
                }
            }
            _ => return Err(RegError::ReadOnly),
        }
        Ok(())
    }

    fn write_queue_ctrl(&mut self, qi: usize, v: u32, offset: u64) -> Result<(), RegError> {
        if v & r::Q_CTRL_RESET != 0 {
            let slot = &mut self.queues[qi];
            if let Some(run) = slot.take_runner() {
                run.stop();
            }
            slot.cfg = QueueConfig::reset();
            slot.error = 0;
            slot.shared.completed.store(0, Ordering::Relaxed);
            return Ok(());
        }
        let want = v & r::Q_CTRL_ENABLE != 0;
        match (want, self.queues[qi].enabled()) {
            (false, true) => {
                if let Some(run) = self.queues[qi].take_runner() {
                    run.stop();
                }
                Ok(())
            }
            (true, false) => {
                let result = self.enable_queue(qi);
                self.queues[qi].error = match result {
                    Ok(()) => 0,
                    Err(code) => r::Q_STATUS_ERROR | ((code.code() as u32) << 8),
                };
                if let Err(code) = result {
                    self.refuse(code, offset);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn enable_queue(&mut self, qi: usize) -> Result<(), RegError> {
        if !self.enabled {
            return Err(RegError::DeviceDisabled);
        }
        let cfg = self.queues[qi].cfg;
        if cfg.depth == 0 {
            return Err(RegError::BadDepth);
        }
        let rings = cfg.ring_ranges();
        if rings.iter().any(|&(b, l)| !self.dma.contains(b, l)) {
            return Err(RegError::RingUnmapped);
        }
        for (i, a) in rings.iter().enumerate() {
            if rings[i + 1..].iter().any(|b| overlaps(a.0, a.1, b.0, b.1)) {
                return Err(RegError::RingsOverlap);
            }
        }
        let qp = self
            .backends
            .for_queue(qi)
            .open_queue_pair(self.pasid, qi as u32)
            .map_err(|e| {
                tracing::warn!(pasid = self.pasid, "no queue pair: {e}");
                RegError::NoQueuePair
            })?;
        // The completion ring is cleared now, before Q_STATUS can show
        // ENABLED (spec §2.2); with Bus Master clear it is cleared when the
        // bit is set (`set_bus_master`), before any worker DMA.
        let rings_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(_dma) = self.bus_master.pass() {
            clear_rings(&self.dma.address_space().memory(), &cfg);
            rings_ready.store(true, Ordering::Release);
        }
        self.queues[qi].rings_ready = rings_ready.clone();
        let ctx = WorkerContext {
            queue: qi as u32,
            config: cfg,
            max_xfer: self.cfg.max_xfer,
            space: self.dma.address_space(),
            qp,
            irq: self.irq.clone(),
            bus_master: self.bus_master.clone(),
            shared: self.queues[qi].shared.clone(),
            rings_ready,
            ring: RingState::default(),
            park_budget: self.park_budget,
            journal: self.journal(qi),
        };
        let runner = QueueRunner::start(ctx, 0).map_err(|e| {
            tracing::error!("cannot start queue worker: {e}");
            RegError::NoQueuePair
        })?;
        self.queues[qi].runner = Some(runner);
        Ok(())
    }

    /// Stop every queue: all are told first, so their drains overlap and a
    /// reset takes one drain budget, not one per queue.
    fn stop_queues(&mut self) {
        let runners: Vec<QueueRunner> = self
            .queues
            .iter_mut()
            .filter_map(QueueSlot::take_runner)
            .collect();
        for r in &runners {
            r.signal_stop();
        }
        runners.into_iter().for_each(QueueRunner::stop);
    }

    /// Power-on register state (DEV_CTRL.RESET, DEVICE_RESET, FLR). DMA maps stay.
    fn reset_state(&mut self) {
        self.stop_queues();
        self.quiesced = false;
        self.enabled = false;
        self.err = ErrLatch::default();
        for q in &mut self.queues {
            q.spare = None;
            q.cfg = QueueConfig::reset();
            q.error = 0;
            q.shared.completed.store(0, Ordering::Relaxed);
        }
        add(&self.stats.resets, 1);
    }

    fn set_engine_dma(&self, allowed: bool) {
        for accel in self.backends.all() {
            if let Err(e) = accel.set_dma_allowed(self.pasid, allowed) {
                add(&self.stats.engine_dma_failures, 1);
                tracing::error!(
                    pasid = self.pasid,
                    backend = accel.name(),
                    "cannot set the engines' DMA permission: {e}"
                );
            }
        }
    }

    fn unmap_all_quiesced(&mut self) {
        let (backends, dma) = (self.backends.clone(), &mut self.dma);
        if backends
            .quiesced(self.pasid, &mut || dma.unmap_all())
            .is_err()
        {
            add(&self.stats.unquiesced_unmaps, 1);
            tracing::warn!(pasid = self.pasid, "unmap-all without the engines quiesced");
            self.dma.unmap_all();
        }
    }

    fn msix_vectors(&self) -> u16 {
        self.cfg.queues as u16
    }

    fn doorbell(&mut self, offset: u64) {
        let q = (offset / pci::DOORBELL_STRIDE) as usize;
        match self
            .queues
            .get(q)
            .and_then(|s| s.runner.as_ref().map(|r| (r, &s.shared)))
        {
            Some((runner, shared)) => {
                add(&shared.stats.doorbells, 1);
                runner.ring();
            }
            None => add(&self.stats.stray_doorbells, 1),
        }
    }
}

impl FunctionModel for WdDevice {
    fn held_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        self.dma.held_fds()
    }

    fn layout(&self) -> FunctionLayout {
        let mut bars = [BarSpec::NONE; 6];
        bars[pci::BAR_CONTROL as usize] = BarSpec {
            kind: BarKind::Mem32,
            size: pci::BAR0_SIZE,
        };
        bars[pci::BAR_DOORBELL as usize] = BarSpec {
            kind: BarKind::Mem32,
            size: pci::bar2_size(self.cfg.queues),
        };
        FunctionLayout {
            vendor_id: pci::VENDOR_ID,
            device_id: pci::DEVICE_ID,
            subsystem_vendor_id: pci::SUBSYSTEM_VENDOR_ID,
            subsystem_id: pci::SUBSYSTEM_ID,
            revision: pci::REVISION,
            class_code: pci::CLASS_CODE,
            bars,
            msix_vectors: self.msix_vectors(),
            msix_table: (pci::BAR_CONTROL, pci::MSIX_TABLE_OFFSET),
            msix_pba: (pci::BAR_CONTROL, pci::MSIX_PBA_OFFSET),
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match bar {
            pci::BAR_CONTROL => match regs::decode(offset, data.len(), self.cfg.queues) {
                Ok(d) => {
                    let v = d.extract(self.read_reg(&d));
                    data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
                }
                Err(code) => {
                    data.fill(0xff);
                    self.refuse(code, offset);
                }
            },
            // Doorbells are write-only: a read is refused like any other
            // refused access (spec §2: all-ones, WriteOnly latched). The
            // vfio-user message still succeeds, so a probing Linux is fine.
            pci::BAR_DOORBELL => {
                data.fill(0xff);
                self.refuse(RegError::WriteOnly, offset);
            }
            _ => return Err(DeviceError::Invalid(format!("BAR{bar} does not exist"))),
        }
        Ok(())
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut raw = [0u8; 8];
        let len = data.len().min(8);
        raw[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(raw);
        match bar {
            pci::BAR_CONTROL => {
                let result = regs::decode(offset, data.len(), self.cfg.queues)
                    .and_then(|d| self.write_reg(&d, value, offset));
                if let Err(code) = result {
                    self.refuse(code, offset);
                }
            }
            pci::BAR_DOORBELL => self.doorbell(offset),
            _ => return Err(DeviceError::Invalid(format!("BAR{bar} does not exist"))),
        }
        Ok(())
    }

    fn dma_map(&mut self, map: DmaMapping) -> Result<(), DeviceError> {
        self.dma.map(map)?;
        add(&self.stats.dma_maps, 1);
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DeviceError> {
        // The VMM has taken the memory back (QEMU only prints an unmap error
        // and treats the range as gone), so a queue whose rings sit there is
        // stopped first, and shows why in Q_STATUS and ERR_CODE.
        let hit: Vec<usize> = (0..self.queues.len())
            .filter(|&qi| {
                let q = &self.queues[qi];
                q.enabled()
                    && q.cfg
                        .ring_ranges()
                        .iter()
                        .any(|&(b, l)| overlaps(b, l, iova, size))
            })
            .collect();
        let runners: Vec<QueueRunner> = hit
            .iter()
            .filter_map(|&qi| self.queues[qi].take_runner())
            .collect();
        runners.iter().for_each(QueueRunner::signal_stop);
        runners.into_iter().for_each(QueueRunner::stop);
        for qi in hit {
            let code = RegError::RingUnmapped;
            self.queues[qi].error = r::Q_STATUS_ERROR | ((code.code() as u32) << 8);
            self.refuse(code, (r::queue(qi as u32) + r::Q_CTRL) as u64);
            tracing::warn!(
                pasid = self.pasid,
                queue = qi,
                "DMA_UNMAP took a running queue's rings: queue stopped"
            );
        }
        // The vfio-user spec: release every reference, in-flight DMA
        // included, before replying. Jobs running on an engine finish first;
        // later ones see the new map.
        let (backends, dma) = (self.backends.clone(), &mut self.dma);
        let mut result = Ok(());
        backends
            .quiesced(self.pasid, &mut || result = dma.unmap(iova, size))
            .map_err(|e| DeviceError::Invalid(e.to_string()))?;
        result?;
        add(&self.stats.dma_unmaps, 1);
        Ok(())
    }

    fn dma_unmap_all(&mut self) -> Result<(), DeviceError> {
        self.stop_queues();
        self.unmap_all_quiesced();
        Ok(())
    }

    fn set_bus_master(&mut self, enabled: bool) {
        // Clearing waits for the queue workers' DMA passes in progress (see
        // `BusMaster`), then for this PASID's jobs running on an engine;
        // jobs reaching an engine while it is clear complete with Aborted.
        if enabled {
            // Queues enabled while the bit was clear get their rings cleared
            // before it is set, so before this config write completes.
            for q in &self.queues {
                if q.enabled() && !q.rings_ready.load(Ordering::Acquire) {
                    clear_rings(&self.dma.address_space().memory(), &q.cfg);
                    q.rings_ready.store(true, Ordering::Release);
                }
            }
        }
        self.bus_master.set(enabled);
        self.set_engine_dma(enabled);
        if enabled {
            for q in self.queues.iter().filter_map(|q| q.runner.as_ref()) {
                q.ring();
            }
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.reset_state();
        self.bus_master.set(false);
        self.set_engine_dma(false);
        Ok(())
    }

    fn disconnected(&mut self) {
        self.reset_state();
        self.bus_master.set(false);
        self.set_engine_dma(false);
        self.unmap_all_quiesced();
    }

    fn migration(&self) -> Option<&dyn ModelMigration> {
        Some(self)
    }

    fn migration_mut(&mut self) -> Option<&mut dyn ModelMigration> {
        Some(self)
    }
}

impl Drop for WdDevice {
    fn drop(&mut self) {
        self.stop_queues();
        for accel in self.backends.all() {
            let _ = accel.unbind_pasid(self.pasid);
        }
    }
}

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod migration_tests;
#[cfg(test)]
mod tests;
