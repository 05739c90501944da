//! Probing, enabling and resetting the device; creating queues.

use std::sync::Arc;

use wdvirt_abi::{IDX_ALIGN, Opcode, RING_ALIGN, idx, pci, regs};

use crate::dma::{DmaMemory, DmaPool};
use crate::error::{DriverError, QueueErrorCode, RegFault};
use crate::mmio::Mmio;
use crate::queue::{Queue, Rings};

/// The read-only identity registers, read once at probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub version: u32,
    pub cap_ops: u32,
    pub num_queues: u32,
    pub max_depth: u32,
    pub max_xfer: u32,
}

impl DeviceInfo {
    pub fn version_major(&self) -> u32 {
        self.version >> 16
    }
    pub fn version_minor(&self) -> u32 {
        self.version & 0xffff
    }
    /// Opcodes in `CAP_OPS`.
    pub fn ops(&self) -> Vec<Opcode> {
        Opcode::ALL
            .into_iter()
            .filter(|op| self.cap_ops & op.bit() != 0)
            .collect()
    }
    pub fn supports(&self, op: Opcode) -> bool {
        self.cap_ops & op.bit() != 0
    }
}

/// Largest queue depth the driver will allocate rings for, whatever the
/// device claims (it bounds the memory one call can take).
pub const DRIVER_MAX_DEPTH: u32 = 1 << 16;

/// A probed wdvirt function.
pub struct Device<M: Mmio> {
    mmio: Arc<M>,
    info: DeviceInfo,
}

const BAR0: u8 = pci::BAR_CONTROL;

impl<M: Mmio> Device<M> {
    /// Reads the identity registers; refuses a device that is not wdvirt ABI 1.x.
    pub fn probe(mmio: M) -> Result<Self, DriverError> {
        let rd = |r: u32| mmio.read32(BAR0, u64::from(r));
        let id = rd(regs::ID)?;
        if id != regs::ID_MAGIC {
            return Err(DriverError::BadMagic { found: id });
        }
        let version = rd(regs::VERSION)?;
        if version >> 16 != regs::ABI_VERSION >> 16 {
            return Err(DriverError::UnsupportedVersion { version });
        }
        let info = DeviceInfo {
            version,
            cap_ops: rd(regs::CAP_OPS)?,
            num_queues: rd(regs::NUM_QUEUES)?,
            max_depth: rd(regs::MAX_DEPTH)?,
            max_xfer: rd(regs::MAX_XFER)?,
        };
        Ok(Device {
            mmio: Arc::new(mmio),
            info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn mmio(&self) -> &M {
        &self.mmio
    }

    fn read(&self, r: u32) -> Result<u32, DriverError> {
        Ok(self.mmio.read32(BAR0, u64::from(r))?)
    }

    fn write(&self, r: u32, v: u32) -> Result<(), DriverError> {
        Ok(self.mmio.write32(BAR0, u64::from(r), v)?)
    }

    /// Sets `DEV_CTRL.ENABLE` and checks `DEV_STATUS`.
    pub fn enable(&self) -> Result<(), DriverError> {
        self.write(regs::DEV_CTRL, regs::DEV_CTRL_ENABLE)?;
        let status = self.read(regs::DEV_STATUS)?;
        if status & regs::DEV_STATUS_ENABLED != 0 {
            return Ok(());
        }
        match self.last_register_error()? {
            Some(f) => Err(DriverError::RegisterRefused(f)),
            None => Err(DriverError::NotEnabled { status }),
        }
    }

    pub fn is_enabled(&self) -> Result<bool, DriverError> {
        Ok(self.read(regs::DEV_STATUS)? & regs::DEV_STATUS_ENABLED != 0)
    }

    /// `DEV_CTRL.RESET`: every queue stops (pending jobs complete as
    /// `Aborted` or not at all) and every register returns to its reset
    /// value. [`Queue`]s created before stay usable only to be dropped.
    pub fn reset(&self) -> Result<(), DriverError> {
        self.write(regs::DEV_CTRL, regs::DEV_CTRL_RESET)?;
        let status = self.read(regs::DEV_STATUS)?;
        if status & regs::DEV_STATUS_ENABLED != 0 {
            return Err(DriverError::ResetFailed { status });
        }
        Ok(())
    }

    /// The first refused register access since the last clear, if any.
    pub fn last_register_error(&self) -> Result<Option<RegFault>, DriverError> {
        if self.read(regs::ERR_STATUS)? & regs::ERR_STATUS_LATCHED == 0 {
            return Ok(None);
        }
        Ok(Some(RegFault {
            code: self.read(regs::ERR_CODE)?,
            offset: self.read(regs::ERR_OFFSET)?,
        }))
    }

    /// Clears the latched register error (`ERR_STATUS` is write-1-to-clear).
    pub fn clear_register_error(&self) -> Result<(), DriverError> {
        self.write(regs::ERR_STATUS, regs::ERR_STATUS_LATCHED)
    }

    /// Refused accesses since device reset (`ERR_COUNT`).
    pub fn register_error_count(&self) -> Result<u32, DriverError> {
        self.read(regs::ERR_COUNT)
    }

    /// The opcodes queue `q` may be given (`Q_CAP_OPS`, ABI 1.1), or
    /// `CAP_OPS` on a 1.0 device, which has no such register.
    pub fn queue_cap_ops(&self, q: u32) -> Result<u32, DriverError> {
        if self.info.version_minor() == 0 {
            return Ok(self.info.cap_ops);
        }
        self.read(regs::queue(q) + regs::Q_CAP_OPS)
    }

    /// Sets up and enables queue `q` with rings of `depth` entries taken from
    /// `pool`, accepting the opcodes in `ops_mask` that the queue may run
    /// ([`Device::queue_cap_ops`]; [`Queue::ops_mask`] says which it got).
    /// Bits that name no opcode are passed on, for the device to refuse. Completions are polled
    /// (`Q_MSIX_VECTOR` is set to `NO_VECTOR`). Depth and opcode mask are
    /// judged by the device; a refusal comes back as
    /// [`DriverError::RegisterRefused`] naming the [`wdvirt_abi::RegError`].
    pub fn queue<D: DmaMemory>(
        &self,
        q: u32,
        depth: u32,
        ops_mask: u32,
        pool: &DmaPool<D>,
    ) -> Result<Queue<M, D>, DriverError> {
        if q >= self.info.num_queues {
            return Err(DriverError::InvalidArgument(format!(
                "queue {q} does not exist (the device has {})",
                self.info.num_queues
            )));
        }
        if depth == 0 || depth > DRIVER_MAX_DEPTH {
            return Err(DriverError::InvalidArgument(format!(
                "queue depth {depth} not in 1..={DRIVER_MAX_DEPTH}"
            )));
        }
        let ops_mask = ops_mask & (self.queue_cap_ops(q)? | !wdvirt_abi::ALL_OPS);
        let d = u64::from(depth);
        let sq = pool.alloc(d * wdvirt_abi::SQE_SIZE as u64, RING_ALIGN)?;
        let cq = pool.alloc(d * wdvirt_abi::CQE_SIZE as u64, RING_ALIGN)?;
        let ix = pool.alloc(idx::SIZE, IDX_ALIGN)?;
        sq.zero()?;
        cq.zero()?;
        ix.zero()?;

        let base = u64::from(regs::queue(q));
        let m = &self.mmio;
        self.clear_register_error()?;
        m.write64(BAR0, base + u64::from(regs::Q_SQ_BASE), sq.addr())?;
        m.write64(BAR0, base + u64::from(regs::Q_CQ_BASE), cq.addr())?;
        m.write64(BAR0, base + u64::from(regs::Q_IDX_BASE), ix.addr())?;
        m.write32(BAR0, base + u64::from(regs::Q_DEPTH), depth)?;
        m.write32(BAR0, base + u64::from(regs::Q_OPS), ops_mask)?;
        m.write32(BAR0, base + u64::from(regs::Q_MSIX_VECTOR), regs::NO_VECTOR)?;
        m.write32(BAR0, base + u64::from(regs::Q_CTRL), regs::Q_CTRL_ENABLE)?;
        let status = m.read32(BAR0, base + u64::from(regs::Q_STATUS))?;
        if status & regs::Q_STATUS_ENABLED != 0 {
            let rings = Rings { sq, cq, idx: ix };
            return Ok(Queue::new(
                self.mmio.clone(),
                pool.clone(),
                q,
                depth,
                ops_mask,
                self.info.max_xfer,
                rings,
            ));
        }
        let fault = self.last_register_error()?;
        // Leave the queue's registers clean; the refusal is what matters.
        let _ = m.write32(BAR0, base + u64::from(regs::Q_CTRL), regs::Q_CTRL_RESET);
        match fault {
            Some(f) => Err(DriverError::RegisterRefused(f)),
            None => Err(DriverError::QueueRefused {
                queue: q,
                status,
                code: QueueErrorCode((status >> 8) as u8),
            }),
        }
    }

    /// Takes over queue `q` as a driver that ran it elsewhere left it (a
    /// migrated guest): the rings are taken from `pool` as [`Device::queue`]
    /// takes them (so the same allocations in the same order give the same
    /// addresses), checked against what the device runs, and neither zeroed
    /// nor programmed; the driver goes on at `cursor`.
    pub fn adopt_queue<D: DmaMemory>(
        &self,
        q: u32,
        depth: u32,
        ops_mask: u32,
        pool: &DmaPool<D>,
        cursor: crate::queue::QueueCursor,
    ) -> Result<Queue<M, D>, DriverError> {
        if q >= self.info.num_queues || depth == 0 || depth > DRIVER_MAX_DEPTH {
            return Err(DriverError::InvalidArgument(format!(
                "queue {q} of depth {depth} cannot be adopted (the device has {} queues)",
                self.info.num_queues
            )));
        }
        let d = u64::from(depth);
        let sq = pool.alloc(d * wdvirt_abi::SQE_SIZE as u64, RING_ALIGN)?;
        let cq = pool.alloc(d * wdvirt_abi::CQE_SIZE as u64, RING_ALIGN)?;
        let ix = pool.alloc(idx::SIZE, IDX_ALIGN)?;
        let base = u64::from(regs::queue(q));
        let m = &self.mmio;
        let runs = (
            m.read64(BAR0, base + u64::from(regs::Q_SQ_BASE))?,
            m.read64(BAR0, base + u64::from(regs::Q_CQ_BASE))?,
            m.read64(BAR0, base + u64::from(regs::Q_IDX_BASE))?,
            m.read32(BAR0, base + u64::from(regs::Q_DEPTH))?,
        );
        let status = m.read32(BAR0, base + u64::from(regs::Q_STATUS))?;
        if runs != (sq.addr(), cq.addr(), ix.addr(), depth) || status & regs::Q_STATUS_ENABLED == 0
        {
            return Err(DriverError::InvalidArgument(format!(
                "queue {q} is not the one to adopt: the device runs rings {:#x}/{:#x}/{:#x} of depth {} \
                 (status {status:#x}), the driver's are {:#x}/{:#x}/{:#x} of depth {depth}",
                runs.0,
                runs.1,
                runs.2,
                runs.3,
                sq.addr(),
                cq.addr(),
                ix.addr()
            )));
        }
        let rings = Rings { sq, cq, idx: ix };
        let queue = Queue::new(
            self.mmio.clone(),
            pool.clone(),
            q,
            depth,
            ops_mask,
            self.info.max_xfer,
            rings,
        );
        Ok(queue.resume(cursor))
    }
}

#[cfg(test)]
mod tests {
    use wdvirt_abi::{ALL_OPS, RegError};

    use super::*;
    use crate::fake::{self, FakeDevice, Mode};

    #[test]
    fn probe_reads_identity() {
        let f = FakeDevice::new(Mode::InOrder);
        let d = Device::probe(f).unwrap();
        let i = d.info();
        assert_eq!((i.version_major(), i.version_minor()), (1, 1));
        assert_eq!(
            (i.num_queues, i.max_depth, i.max_xfer),
            (fake::NUM_QUEUES, fake::MAX_DEPTH, fake::MAX_XFER)
        );
        assert_eq!(i.ops().len(), Opcode::ALL.len());
        assert!(i.supports(Opcode::Sha256));
    }

    #[test]
    fn probe_refuses_wrong_magic_and_major_version() {
        let f = FakeDevice::new(Mode::InOrder);
        f.set_identity(0x1234_5678, regs::ABI_VERSION);
        assert!(matches!(
            Device::probe(f.clone()),
            Err(DriverError::BadMagic { found: 0x1234_5678 })
        ));
        f.set_identity(regs::ID_MAGIC, 2 << 16);
        assert!(matches!(
            Device::probe(f.clone()),
            Err(DriverError::UnsupportedVersion { version: 0x20000 })
        ));
        f.set_identity(regs::ID_MAGIC, 1 << 16 | 7);
        assert!(
            Device::probe(f).is_ok(),
            "a newer minor version is compatible"
        );
    }

    #[test]
    fn queue_setup_programs_rings_and_enables() {
        let (f, d, pool) = fake::setup(Mode::InOrder);
        let before = pool.free_bytes();
        let q = d.queue(1, 8, ALL_OPS, &pool).unwrap();
        let (sq, cq, ix) = q.ring_addresses();
        assert_eq!(f.queue_config(1), (sq, cq, ix, 8, ALL_OPS));
        assert!(sq % 64 == 0 && cq % 64 == 0 && ix % 64 == 0);
        assert_eq!(before - pool.free_bytes(), 8 * 64 + 8 * 16 + 64);
        assert!(f.queue_enabled(1));
        assert_eq!(
            q.status().unwrap() & regs::Q_STATUS_ENABLED,
            regs::Q_STATUS_ENABLED
        );
        drop(q);
        assert!(
            !f.queue_enabled(1),
            "dropping a queue resets it on the device"
        );
        assert_eq!(pool.free_bytes(), before, "and returns its rings");
    }

    #[test]
    fn queues_get_the_opcodes_their_q_cap_ops_allows() {
        let (f, d, pool) = fake::setup(Mode::InOrder);
        let only = Opcode::Copy.bit() | Opcode::Crc32c.bit();
        f.set_queue_cap_ops(1, only);
        assert_eq!(d.queue_cap_ops(1).unwrap(), only);
        let q = d.queue(1, 4, ALL_OPS, &pool).unwrap();
        assert_eq!(q.ops_mask(), only);
        assert_eq!(f.queue_config(1).4, only);
        let q0 = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        assert_eq!(q0.ops_mask(), ALL_OPS);
        assert_eq!(d.last_register_error().unwrap(), None);
    }

    #[test]
    fn a_1_0_device_without_q_cap_ops_is_driven_from_cap_ops() {
        let f = FakeDevice::new(Mode::InOrder);
        f.set_identity(regs::ID_MAGIC, 1 << 16);
        let d = Device::probe(f.clone()).unwrap();
        d.enable().unwrap();
        let pool = DmaPool::new(
            f.memory(),
            crate::DmaAllocator::new(fake::MEM_BASE, 1 << 16).unwrap(),
        );
        assert_eq!(d.queue_cap_ops(0).unwrap(), ALL_OPS);
        let q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        assert_eq!(q.ops_mask(), ALL_OPS);
        assert_eq!(
            d.register_error_count().unwrap(),
            0,
            "the driver never touched the register a 1.0 device lacks"
        );
    }

    #[test]
    fn queue_refusals_name_the_register_error() {
        let (_f, d, pool) = fake::setup(Mode::InOrder);
        let before = pool.free_bytes();
        let q_ctrl = regs::queue(0) + regs::Q_CTRL;
        let e = d.queue(0, 3, ALL_OPS, &pool).err().unwrap();
        assert_eq!(e.reg_error(), Some(RegError::BadDepth));
        assert!(
            matches!(e, DriverError::RegisterRefused(RegFault { offset, .. }) if offset == q_ctrl)
        );
        let e = d.queue(0, 4, ALL_OPS | 1 << 20, &pool).err().unwrap();
        assert_eq!(
            e.reg_error(),
            Some(RegError::OpNotAllowed),
            "the previous error was cleared first"
        );
        assert!(matches!(
            d.queue(2, 4, ALL_OPS, &pool),
            Err(DriverError::InvalidArgument(_))
        ));
        assert!(matches!(
            d.queue(0, 0, ALL_OPS, &pool),
            Err(DriverError::InvalidArgument(_))
        ));
        assert_eq!(
            pool.free_bytes(),
            before,
            "refused queues return their memory"
        );
        // After refusals the queue can still be set up properly.
        assert!(d.queue(0, 4, ALL_OPS, &pool).is_ok());
    }

    #[test]
    fn queue_before_enable_is_refused_as_device_disabled() {
        let f = FakeDevice::new(Mode::InOrder);
        let d = Device::probe(f.clone()).unwrap();
        let pool = DmaPool::new(
            f.memory(),
            crate::DmaAllocator::new(fake::MEM_BASE, 1 << 16).unwrap(),
        );
        let e = d.queue(0, 4, ALL_OPS, &pool).err().unwrap();
        assert_eq!(e.reg_error(), Some(RegError::DeviceDisabled));
    }

    #[test]
    fn ring_outside_device_memory_is_refused() {
        let (f, d, _) = fake::setup(Mode::InOrder);
        // A pool whose addresses the device does not consider mapped.
        let far = DmaPool::new(
            crate::HeapMemory::new(0x1000_0000, 4096),
            crate::DmaAllocator::new(0x1000_0000, 4096).unwrap(),
        );
        let e = d.queue(0, 2, ALL_OPS, &far).err().unwrap();
        assert_eq!(e.reg_error(), Some(RegError::RingUnmapped));
        assert!(!f.queue_enabled(0));
    }

    #[test]
    fn register_error_latch_and_clear() {
        let (f, d, _) = fake::setup(Mode::InOrder);
        assert_eq!(d.last_register_error().unwrap(), None);
        f.write32(0, u64::from(regs::CAP_OPS), 1).unwrap();
        f.write32(0, u64::from(regs::ID), 1).unwrap();
        let fault = d.last_register_error().unwrap().unwrap();
        assert_eq!(
            (fault.error(), fault.offset),
            (Some(RegError::ReadOnly), regs::CAP_OPS),
            "first error wins"
        );
        assert_eq!(d.register_error_count().unwrap(), 2);
        d.clear_register_error().unwrap();
        assert_eq!(d.last_register_error().unwrap(), None);
    }

    #[test]
    fn reset_disables_device_and_queues() {
        let (f, d, pool) = fake::setup(Mode::InOrder);
        let q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        d.reset().unwrap();
        assert!(!d.is_enabled().unwrap());
        assert_eq!(q.status().unwrap() & regs::Q_STATUS_ENABLED, 0);
        assert!(!f.queue_enabled(0));
    }
}
