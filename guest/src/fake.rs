//! A fake wdvirt device for unit tests: a register file plus the device's
//! side of the rings, over [`HeapMemory`]. It does just enough to check the
//! driver: register validation with latched errors, ring fetch on doorbell,
//! completions in a chosen order with the phase bit, and Nop/Copy/Fill/
//! Compare/Crc32c jobs (everything else completes as `EngineError`).

use std::sync::Arc;

use parking_lot::Mutex;
use wdvirt_abi::{
    CQE_PHASE, CQE_SIZE, CompletionEntry, IDX_FLAG_NO_DOORBELL, JobStatus, Opcode, RegError,
    SQE_SIZE, SubmissionEntry, idx, pci, regs,
};

use crate::dma::{DmaMemory, HeapMemory};
use crate::mmio::{Mmio, MmioError};

pub const MEM_BASE: u64 = 0x10_0000;
pub const MEM_LEN: usize = 1 << 20;
pub const NUM_QUEUES: u32 = 2;
pub const MAX_DEPTH: u32 = 64;
pub const MAX_XFER: u32 = 64 * 1024;
pub const CAP_OPS: u32 = wdvirt_abi::ALL_OPS;

/// When the fake completes what it fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only when the test calls [`FakeDevice::complete`].
    Manual,
    /// On each doorbell, in submission order.
    InOrder,
    /// On each doorbell, newest first.
    Reverse,
    /// On each doorbell, in order, but with this added to every tag.
    TagOffset(u32),
}

#[derive(Default, Clone)]
struct FakeQueue {
    sq: u64,
    cq: u64,
    idx: u64,
    depth: u32,
    ops: u32,
    enabled: bool,
    msix: u32,
    coalesce: u32,
    completed: u32,
    sq_head: u32,
    cq_tail: u32,
    pending: Vec<SubmissionEntry>,
    /// `Q_CAP_OPS`; `None`: `CAP_OPS`.
    cap_ops: Option<u32>,
    doorbells: u32,
    max_in_flight: u32,
}

struct State {
    id: u32,
    version: u32,
    enabled: bool,
    err: Option<(RegError, u32)>,
    err_count: u32,
    queues: Vec<FakeQueue>,
    mode: Mode,
    cq_overflows: u32,
}

pub struct FakeDevice {
    mem: Arc<HeapMemory>,
    st: Mutex<State>,
}

impl FakeDevice {
    pub fn new(mode: Mode) -> Arc<Self> {
        Arc::new(FakeDevice {
            mem: Arc::new(HeapMemory::new(MEM_BASE, MEM_LEN)),
            st: Mutex::new(State {
                id: regs::ID_MAGIC,
                version: regs::ABI_VERSION,
                enabled: false,
                err: None,
                err_count: 0,
                queues: vec![FakeQueue::default(); NUM_QUEUES as usize],
                mode,
                cq_overflows: 0,
            }),
        })
    }

    pub fn memory(&self) -> Arc<HeapMemory> {
        self.mem.clone()
    }
    pub fn set_mode(&self, mode: Mode) {
        self.st.lock().mode = mode;
    }
    pub fn set_identity(&self, id: u32, version: u32) {
        let mut s = self.st.lock();
        s.id = id;
        s.version = version;
    }
    /// Narrows queue `q`'s `Q_CAP_OPS`.
    pub fn set_queue_cap_ops(&self, q: u32, ops: u32) {
        self.st.lock().queues[q as usize].cap_ops = Some(ops);
    }
    pub fn doorbells(&self, q: u32) -> u32 {
        self.st.lock().queues[q as usize].doorbells
    }
    pub fn pending_tags(&self, q: u32) -> Vec<u32> {
        self.st.lock().queues[q as usize]
            .pending
            .iter()
            .map(|e| e.tag)
            .collect()
    }
    pub fn cq_overflows(&self) -> u32 {
        self.st.lock().cq_overflows
    }
    pub fn max_in_flight(&self, q: u32) -> u32 {
        self.st.lock().queues[q as usize].max_in_flight
    }
    pub fn queue_enabled(&self, q: u32) -> bool {
        self.st.lock().queues[q as usize].enabled
    }
    /// The ring addresses the driver programmed: (sq, cq, idx, depth, ops).
    pub fn queue_config(&self, q: u32) -> (u64, u64, u64, u32, u32) {
        let s = self.st.lock();
        let fq = &s.queues[q as usize];
        (fq.sq, fq.cq, fq.idx, fq.depth, fq.ops)
    }

    /// Sets or clears `IDX_FLAG_NO_DOORBELL` in the queue's index block.
    pub fn set_no_doorbell(&self, q: u32, on: bool) {
        let s = self.st.lock();
        let a = s.queues[q as usize].idx + idx::FLAGS;
        self.mem
            .write_u32(a, if on { IDX_FLAG_NO_DOORBELL } else { 0 })
            .unwrap();
    }

    /// Fetches new SQEs as a polling device would (no doorbell).
    pub fn fetch(&self, q: u32) {
        let mut s = self.st.lock();
        self.fetch_locked(&mut s, q);
    }

    /// Completes the pending jobs with these tags, in this order.
    pub fn complete(&self, q: u32, tags: &[u32]) {
        let mut s = self.st.lock();
        for &t in tags {
            let fq = &mut s.queues[q as usize];
            let pos = fq
                .pending
                .iter()
                .position(|e| e.tag == t)
                .expect("tag pending");
            let e = fq.pending.remove(pos);
            self.finish(&mut s, q, &e, 0);
        }
    }

    /// Writes a CQE with the right phase whether or not a job is pending.
    pub fn inject(&self, q: u32, tag: u32) {
        let mut s = self.st.lock();
        let e = SubmissionEntry {
            opcode: Opcode::Nop as u8,
            tag,
            ..Default::default()
        };
        self.finish(&mut s, q, &e, 0);
    }

    fn fetch_locked(&self, s: &mut State, q: u32) {
        let fq = &mut s.queues[q as usize];
        if !fq.enabled {
            return;
        }
        let tail = self.mem.read_u32(fq.idx + idx::SQ_TAIL).unwrap();
        while fq.sq_head != tail {
            let mut b = [0u8; SQE_SIZE];
            let a = fq.sq + u64::from(fq.sq_head % fq.depth) * SQE_SIZE as u64;
            self.mem.read(a, &mut b).unwrap();
            fq.pending.push(SubmissionEntry::from_bytes(&b));
            fq.sq_head = fq.sq_head.wrapping_add(1);
        }
        let in_flight = fq.sq_head.wrapping_sub(fq.cq_tail);
        fq.max_in_flight = fq.max_in_flight.max(in_flight);
        self.mem
            .write_u32(fq.idx + idx::SQ_HEAD, fq.sq_head)
            .unwrap();
    }

    fn finish(&self, s: &mut State, q: u32, e: &SubmissionEntry, tag_offset: u32) {
        let (status, bytes, result) = self.execute(e, s.queues[q as usize].ops);
        let fq = &mut s.queues[q as usize];
        let cq_head = self.mem.read_u32(fq.idx + idx::CQ_HEAD).unwrap();
        if fq.cq_tail.wrapping_sub(cq_head) >= fq.depth {
            s.cq_overflows += 1;
        }
        let phase = if (fq.cq_tail / fq.depth).is_multiple_of(2) {
            CQE_PHASE
        } else {
            0
        };
        let cqe = CompletionEntry {
            tag: e.tag.wrapping_add(tag_offset),
            status: status.code(),
            flags: phase,
            bytes,
            result,
        };
        let a = fq.cq + u64::from(fq.cq_tail % fq.depth) * CQE_SIZE as u64;
        let b = cqe.to_bytes();
        self.mem.write(a, &b[..4]).unwrap();
        self.mem.write(a + 8, &b[8..]).unwrap();
        self.mem.write(a + 4, &b[4..8]).unwrap();
        fq.cq_tail = fq.cq_tail.wrapping_add(1);
        fq.completed = fq.completed.wrapping_add(1);
    }

    fn execute(&self, e: &SubmissionEntry, ops: u32) -> (JobStatus, u32, u32) {
        let Some(op) = Opcode::from_u8(e.opcode) else {
            return (JobStatus::BadOpcode, 0, 0);
        };
        if ops & op.bit() == 0 {
            return (JobStatus::OpNotAllowed, 0, 0);
        }
        if e.src_len > MAX_XFER || e.dst_len > MAX_XFER {
            return (JobStatus::BadLength, 0, 0);
        }
        let read = |a: u64, l: u32| {
            let mut v = vec![0u8; l as usize];
            self.mem.read(a, &mut v).map(|_| v)
        };
        let run = || -> Result<(JobStatus, u32, u32), crate::dma::DmaError> {
            Ok(match op {
                Opcode::Nop => (JobStatus::Ok, 0, 0),
                Opcode::Copy => {
                    if e.dst_len < e.src_len {
                        return Ok((JobStatus::DstTooSmall, 0, 0));
                    }
                    self.mem.write(e.dst, &read(e.src, e.src_len)?)?;
                    (JobStatus::Ok, e.src_len, 0)
                }
                Opcode::Fill => {
                    self.mem
                        .write(e.dst, &vec![e.param as u8; e.dst_len as usize])?;
                    (JobStatus::Ok, e.dst_len, 0)
                }
                Opcode::Compare => {
                    let (a, b) = (read(e.src, e.src_len)?, read(e.dst, e.dst_len)?);
                    let diff = a.iter().zip(&b).position(|(x, y)| x != y);
                    (JobStatus::Ok, 0, diff.map_or(0, |d| d as u32 + 1))
                }
                Opcode::Crc32c => (
                    JobStatus::Ok,
                    0,
                    crate::crc::crc32c_continue(e.param as u32, &read(e.src, e.src_len)?),
                ),
                _ => (JobStatus::EngineError, 0, 0),
            })
        };
        run().unwrap_or((JobStatus::BadAddress, 0, 0))
    }

    fn latch(s: &mut State, e: RegError, offset: u64) {
        s.err_count = s.err_count.saturating_add(1);
        if s.err.is_none() {
            s.err = Some((e, offset as u32));
        }
    }

    fn ring_ok(&self, a: u64, len: u64) -> bool {
        a >= MEM_BASE
            && a.checked_add(len)
                .is_some_and(|e| e <= MEM_BASE + MEM_LEN as u64)
    }

    fn enable_queue(&self, s: &mut State, q: usize) -> Result<(), RegError> {
        if !s.enabled {
            return Err(RegError::DeviceDisabled);
        }
        let fq = &s.queues[q];
        if !fq.depth.is_power_of_two() || !(2..=MAX_DEPTH).contains(&fq.depth) {
            return Err(RegError::BadDepth);
        }
        if fq.ops & !fq.cap_ops.unwrap_or(CAP_OPS) != 0 {
            return Err(RegError::OpNotAllowed);
        }
        if ![fq.sq, fq.cq, fq.idx].iter().all(|a| a.is_multiple_of(64)) {
            return Err(RegError::Misaligned);
        }
        let d = u64::from(fq.depth);
        if !self.ring_ok(fq.sq, d * 64) || !self.ring_ok(fq.cq, d * 16) || !self.ring_ok(fq.idx, 64)
        {
            return Err(RegError::RingUnmapped);
        }
        let fq = &mut s.queues[q];
        fq.enabled = true;
        fq.sq_head = 0;
        fq.cq_tail = 0;
        fq.completed = 0;
        Ok(())
    }
}

impl Mmio for FakeDevice {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
        if bar != pci::BAR_CONTROL {
            return Ok(0);
        }
        let mut s = self.st.lock();
        let o = offset as u32;
        let in_queue = o >= regs::QUEUE_BASE && o < regs::queue(NUM_QUEUES);
        if in_queue && o % regs::QUEUE_STRIDE == regs::Q_CAP_OPS && s.version & 0xffff == 0 {
            // A 1.0 device has no Q_CAP_OPS: the read is refused.
            Self::latch(&mut s, RegError::OutOfRange, offset);
            return Ok(u32::MAX);
        }
        Ok(match o {
            regs::ID => s.id,
            regs::VERSION => s.version,
            regs::CAP_OPS => CAP_OPS,
            regs::NUM_QUEUES => NUM_QUEUES,
            regs::MAX_DEPTH => MAX_DEPTH,
            regs::MAX_XFER => MAX_XFER,
            regs::DEV_STATUS => u32::from(s.enabled),
            regs::ERR_STATUS => u32::from(s.err.is_some()),
            regs::ERR_CODE => s.err.map_or(0, |e| u32::from(e.0.code())),
            regs::ERR_OFFSET => s.err.map_or(0, |e| e.1),
            regs::ERR_COUNT => s.err_count,
            _ if o >= regs::QUEUE_BASE && o < regs::queue(NUM_QUEUES) => {
                let fq = &s.queues[((o - regs::QUEUE_BASE) / regs::QUEUE_STRIDE) as usize];
                let (lo, hi) = (|v: u64| v as u32, |v: u64| (v >> 32) as u32);
                match o % regs::QUEUE_STRIDE {
                    regs::Q_SQ_BASE => lo(fq.sq),
                    o if o == regs::Q_SQ_BASE + 4 => hi(fq.sq),
                    regs::Q_CQ_BASE => lo(fq.cq),
                    o if o == regs::Q_CQ_BASE + 4 => hi(fq.cq),
                    regs::Q_IDX_BASE => lo(fq.idx),
                    o if o == regs::Q_IDX_BASE + 4 => hi(fq.idx),
                    regs::Q_DEPTH => fq.depth,
                    regs::Q_OPS => fq.ops,
                    regs::Q_STATUS => u32::from(fq.enabled),
                    regs::Q_COMPLETED => fq.completed,
                    regs::Q_MSIX_VECTOR => fq.msix,
                    regs::Q_IRQ_COALESCE => fq.coalesce,
                    regs::Q_CAP_OPS => fq.cap_ops.unwrap_or(CAP_OPS),
                    _ => 0,
                }
            }
            _ => 0,
        })
    }

    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
        let mut s = self.st.lock();
        if bar == pci::BAR_DOORBELL {
            let q = (offset / pci::DOORBELL_STRIDE) as u32;
            if q >= NUM_QUEUES {
                return Ok(());
            }
            s.queues[q as usize].doorbells += 1;
            self.fetch_locked(&mut s, q);
            let pending = std::mem::take(&mut s.queues[q as usize].pending);
            let (order, offset): (Vec<SubmissionEntry>, u32) = match s.mode {
                Mode::Manual => {
                    s.queues[q as usize].pending = pending;
                    return Ok(());
                }
                Mode::InOrder => (pending, 0),
                Mode::Reverse => (pending.into_iter().rev().collect(), 0),
                Mode::TagOffset(k) => (pending, k),
            };
            for e in order {
                self.finish(&mut s, q, &e, offset);
            }
            return Ok(());
        }
        let o = offset as u32;
        match o {
            regs::DEV_CTRL => {
                if value & regs::DEV_CTRL_RESET != 0 {
                    s.enabled = false;
                    s.err = None;
                    s.err_count = 0;
                    s.queues = vec![FakeQueue::default(); NUM_QUEUES as usize];
                } else {
                    s.enabled = value & regs::DEV_CTRL_ENABLE != 0;
                }
            }
            regs::ERR_STATUS => {
                if value & regs::ERR_STATUS_LATCHED != 0 {
                    s.err = None;
                }
            }
            _ if o >= regs::QUEUE_BASE && o < regs::queue(NUM_QUEUES) => {
                let q = ((o - regs::QUEUE_BASE) / regs::QUEUE_STRIDE) as usize;
                let r = o % regs::QUEUE_STRIDE;
                let enabled = s.queues[q].enabled;
                let set_lo = |v: &mut u64| *v = (*v & !0xffff_ffff) | u64::from(value);
                let set_hi = |v: &mut u64| *v = (*v & 0xffff_ffff) | (u64::from(value) << 32);
                if enabled && r < regs::Q_CTRL {
                    Self::latch(&mut s, RegError::QueueBusy, offset);
                    return Ok(());
                }
                let fq = &mut s.queues[q];
                match r {
                    0x00 => set_lo(&mut fq.sq),
                    0x04 => set_hi(&mut fq.sq),
                    0x08 => set_lo(&mut fq.cq),
                    0x0c => set_hi(&mut fq.cq),
                    0x10 => set_lo(&mut fq.idx),
                    0x14 => set_hi(&mut fq.idx),
                    regs::Q_DEPTH => fq.depth = value,
                    regs::Q_OPS => fq.ops = value,
                    regs::Q_MSIX_VECTOR => fq.msix = value,
                    regs::Q_IRQ_COALESCE => fq.coalesce = value,
                    regs::Q_CTRL => {
                        if value & regs::Q_CTRL_RESET != 0 {
                            s.queues[q] = FakeQueue {
                                doorbells: s.queues[q].doorbells,
                                ..Default::default()
                            };
                        } else if value & regs::Q_CTRL_ENABLE != 0
                            && let Err(e) = self.enable_queue(&mut s, q)
                        {
                            Self::latch(&mut s, e, offset);
                        }
                    }
                    _ => Self::latch(&mut s, RegError::ReadOnly, offset),
                }
            }
            _ => Self::latch(&mut s, RegError::ReadOnly, offset),
        }
        Ok(())
    }
}

/// A fake, a probed and enabled driver over it, and a pool over all of its memory.
pub fn setup(
    mode: Mode,
) -> (
    Arc<FakeDevice>,
    crate::Device<Arc<FakeDevice>>,
    crate::DmaPool<Arc<HeapMemory>>,
) {
    let fake = FakeDevice::new(mode);
    let dev = crate::Device::probe(fake.clone()).unwrap();
    dev.enable().unwrap();
    let pool = crate::DmaPool::new(
        fake.memory(),
        crate::DmaAllocator::new(MEM_BASE, MEM_LEN as u64).unwrap(),
    );
    (fake, dev, pool)
}
