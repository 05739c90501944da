//! A queue's job journal: where it stands in its rings, kept in memory that
//! outlives the process (a memfd the restart holder keeps open), so that a
//! daemon killed at any instant can be succeeded by one that completes every
//! job the guest handed the queue exactly once.
//!
//! The guest's ring indexes say what the guest submitted and consumed; they
//! cannot say which of the jobs the device took have completed, because
//! completions may come in any order, and the guest may already have
//! rewritten a taken entry's slot. The journal keeps, per queue:
//!
//! * `sq_head`: entries taken for good (committed after each is recorded);
//! * `cq_tail`: completion entries written;
//! * one record per taken entry not yet completed: a copy of its submission
//!   entry (or, for a result held back while Bus Master was off, the
//!   result), in the slot `position % depth`. The worker never takes an
//!   entry whose slot still holds a job not completed (completions come in
//!   any order), so slots never collide;
//! * `completing`: the slot and completion index being written, set before
//!   the completion's phase bit is published and cleared after, so a death
//!   between the two is resolved by reading the phase bit back.
//!
//! Every field is written by the queue's worker thread only, in an order
//! that keeps the record consistent at every instruction (a SIGKILL lands
//! between two stores, never inside one: the mapping is shared, so what the
//! process stored is in the page cache when it dies). [`QueueJournal::recover`]
//! turns the record back into the [`RingState`] a parked queue would have:
//! taken-but-unfinished jobs become `pending` (run again) and held results
//! `held`, which the existing resume path takes from there.

use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress};
use wdvirt_abi::{CQE_PHASE, CQE_SIZE, CompletionEntry, JobStatus, SQE_SIZE, SubmissionEntry};

use super::state::{HeldCompletion, PendingJob, RingState};
use crate::accel::{GuestMemory, JobResult};

/// A shared, writable mapping of a memfd: memory whose contents survive the
/// process that wrote them for as long as someone holds the fd.
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; every
// access goes through atomics or through byte copies into ranges one
// thread owns (a queue's journal is written by its worker alone).
unsafe impl Send for SharedMap {}
// SAFETY: as for Send.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// A new memfd of `len` bytes (sparse: pages cost memory only once
    /// written) and its mapping.
    pub fn create(name: &str, len: usize) -> std::io::Result<(OwnedFd, SharedMap)> {
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        let map = SharedMap::map(&fd)?;
        Ok((fd, map))
    }

    /// Map all of an existing memfd (one a predecessor created).
    pub fn map(fd: &impl AsFd) -> std::io::Result<SharedMap> {
        let len = rustix::fs::fstat(fd)?.st_size as usize;
        if len == 0 {
            return Err(std::io::Error::other("the state memfd is empty"));
        }
        // SAFETY: a fresh mapping of a whole file, not aliasing any Rust
        // object; unmapped in Drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                0,
            )?
        };
        Ok(SharedMap {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("null mapping"))?,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: usize, len: usize, align: usize) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len) && off.is_multiple_of(align),
            "shared map access {off:#x}+{len} outside {:#x} or misaligned",
            self.len
        );
    }

    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4, 4);
        // SAFETY: in bounds and aligned (checked); the mapping lives as long
        // as `self`, and AtomicU32 has the layout of u32.
        unsafe { &*(self.ptr.as_ptr().add(off) as *const AtomicU32) }
    }

    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: as for `u32_at`.
        unsafe { &*(self.ptr.as_ptr().add(off) as *const AtomicU64) }
    }

    /// Copy `data` in at `off`. Callers own the range (one writer).
    pub fn write(&self, off: usize, data: &[u8]) {
        self.check(off, data.len(), 1);
        // SAFETY: in bounds (checked); the range is not borrowed elsewhere.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        }
    }

    /// Copy `out.len()` bytes out from `off`.
    pub fn read(&self, off: usize, out: &mut [u8]) {
        self.check(off, out.len(), 1);
        // SAFETY: as for `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), out.len())
        }
    }

    /// Zero `len` bytes at `off`.
    pub fn zero(&self, off: usize, len: usize) {
        self.check(off, len, 1);
        // SAFETY: as for `write`.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), 0, len) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer referenced.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

const MAGIC: u32 = u32::from_le_bytes(*b"WDQJ");
/// Header fields (byte offsets).
const H_MAGIC: usize = 0;
const H_DEPTH: usize = 4;
const H_SQ_HEAD: usize = 8;
const H_CQ_TAIL: usize = 12;
const H_COMPLETED: usize = 16;
const H_COMPLETING: usize = 24;
const H_JOBS_OK: usize = 32;
const H_JOBS_FAILED: usize = 40;
const H_BYTES_OUT: usize = 48;
const HEADER: usize = 64;
/// One slot: state word, position, a submission entry or a result, then
/// where its pre-image goes back (address, length; 0: none).
const SLOT: usize = 96;
const S_STATE: usize = 0;
const S_POS: usize = 4;
const S_BODY: usize = 8;
const S_PRE_ADDR: usize = 72;
const S_PRE_LEN: usize = 80;
/// Each slot's pre-image room, after the slots: the most a job both reads
/// and writes in place (a stream's context).
const PRE_BYTES: usize = wdvirt_abi::stream::CTX_SIZE as usize;
/// `S_PRE_LEN` of a job that cannot run twice.
const NO_RERUN: u32 = u32::MAX;
const FREE: u32 = 0;
const LIVE_JOB: u32 = 1;
const LIVE_RESULT: u32 = 2;
/// `completing` is valid when this bit is set: slot in bits 32..62, the
/// completion index in the low half.
const COMPLETING: u64 = 1 << 63;

/// What a journal cannot be recovered from. Each says which value is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("queue journal has no magic (found {0:#x}): it was never written")]
    Magic(u32),
    #[error("queue journal was laid for depth {found}, the queue has depth {expected}")]
    Depth { found: u32, expected: u32 },
    #[error(
        "queue journal does not add up: sq_head {sq_head}, cq_tail {cq_tail}, {live} jobs recorded"
    )]
    Positions {
        sq_head: u32,
        cq_tail: u32,
        live: u32,
    },
    #[error("queue journal slot {slot} holds a result with status {status}, which no job has")]
    Status { slot: u32, status: u16 },
}

/// What a recovered journal gives back besides the ring state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalCounts {
    /// `Q_COMPLETED`.
    pub completed: u32,
    pub jobs_ok: u64,
    pub jobs_failed: u64,
    pub bytes_out: u64,
}

/// One queue's journal: a range of a [`SharedMap`].
#[derive(Clone)]
pub struct QueueJournal {
    map: Arc<SharedMap>,
    off: usize,
    max_depth: u32,
}

impl std::fmt::Debug for QueueJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueJournal")
            .field("off", &self.off)
            .field("max_depth", &self.max_depth)
            .finish()
    }
}

impl QueueJournal {
    /// Bytes a journal for queues of at most `max_depth` entries takes
    /// (most of it pre-image room, sparse: pages cost memory once written).
    pub fn size(max_depth: u32) -> usize {
        (HEADER + max_depth as usize * (SLOT + PRE_BYTES)).next_multiple_of(8)
    }

    fn pre_off(&self, slot: u32) -> usize {
        self.off + HEADER + self.max_depth as usize * SLOT + slot as usize * PRE_BYTES
    }

    /// The journal at `off` in `map` (which must hold [`Self::size`] bytes
    /// there, 8-aligned).
    pub fn at(map: Arc<SharedMap>, off: usize, max_depth: u32) -> QueueJournal {
        assert!(off.is_multiple_of(8) && off + Self::size(max_depth) <= map.len());
        QueueJournal {
            map,
            off,
            max_depth,
        }
    }

    fn h32(&self, field: usize) -> &AtomicU32 {
        self.map.u32_at(self.off + field)
    }

    fn h64(&self, field: usize) -> &AtomicU64 {
        self.map.u64_at(self.off + field)
    }

    fn slot_off(&self, slot: u32) -> usize {
        assert!(
            slot < self.max_depth,
            "journal slot {slot} past {}",
            self.max_depth
        );
        self.off + HEADER + slot as usize * SLOT
    }

    /// Forget everything: the queue is disabled (or never was enabled).
    pub fn clear(&self) {
        self.h32(H_MAGIC).store(0, Ordering::Release);
    }

    /// Start the journal of a queue of `depth` entries that stands at
    /// `ring` with `completed` completions counted: held results and
    /// pending jobs are recorded at the positions before `ring.sq_head`
    /// (held first), which are returned in that order (the slot of each is
    /// `position % depth`). A pending job is recorded as [`taken`](Self::taken)
    /// records one, with the bytes it reads and writes as they are in `mem`
    /// now (as a recovery put them back, or as a job withdrawn unrun left
    /// them), so that a second death before it completes is recovered
    /// like the first. The magic is written last: until then a recovery
    /// finds nothing, as for a queue never enabled.
    pub fn start(
        &self,
        depth: u32,
        ring: &RingState,
        counts: JournalCounts,
        mem: &GuestMemory,
    ) -> Vec<u32> {
        assert!(depth <= self.max_depth && depth.is_power_of_two());
        self.h32(H_MAGIC).store(0, Ordering::Release);
        self.map.zero(self.off + HEADER, depth as usize * SLOT);
        self.h32(H_DEPTH).store(depth, Ordering::Relaxed);
        self.h32(H_SQ_HEAD).store(ring.sq_head, Ordering::Relaxed);
        self.h32(H_CQ_TAIL).store(ring.cq_tail, Ordering::Relaxed);
        self.h32(H_COMPLETED)
            .store(counts.completed, Ordering::Relaxed);
        self.h64(H_COMPLETING).store(0, Ordering::Relaxed);
        self.h64(H_JOBS_OK).store(counts.jobs_ok, Ordering::Relaxed);
        self.h64(H_JOBS_FAILED)
            .store(counts.jobs_failed, Ordering::Relaxed);
        self.h64(H_BYTES_OUT)
            .store(counts.bytes_out, Ordering::Relaxed);
        let mut positions = Vec::with_capacity(ring.held.len() + ring.pending.len());
        let mut pos = ring.cq_tail;
        for h in &ring.held {
            self.write_slot(depth, pos, LIVE_RESULT, &held_bytes(h));
            positions.push(pos);
            pos = pos.wrapping_add(1);
        }
        for p in &ring.pending {
            self.taken(depth, pos, &p.entry(), mem);
            positions.push(pos);
            pos = pos.wrapping_add(1);
        }
        self.h32(H_MAGIC).store(MAGIC, Ordering::Release);
        positions
    }

    fn write_slot(&self, depth: u32, pos: u32, state: u32, body: &[u8]) {
        self.write_slot_with(depth, pos, state, body, (0, 0));
    }

    fn write_slot_with(&self, depth: u32, pos: u32, state: u32, body: &[u8], pre: (u64, u32)) {
        let at = self.slot_off(pos % depth);
        self.map.u32_at(at + S_STATE).store(FREE, Ordering::Relaxed);
        self.map.u32_at(at + S_POS).store(pos, Ordering::Relaxed);
        self.map.write(at + S_BODY, body);
        self.map
            .u64_at(at + S_PRE_ADDR)
            .store(pre.0, Ordering::Relaxed);
        self.map
            .u32_at(at + S_PRE_LEN)
            .store(pre.1, Ordering::Relaxed);
        self.map
            .u32_at(at + S_STATE)
            .store(state, Ordering::Release);
    }

    /// The job at ring position `pos` is about to be offered to the queue
    /// pair. Recorded before it is offered (the worker's own thread or an
    /// idle engine may run it at once) and before
    /// [`commit_head`](Self::commit_head) moves past it: a job that reads
    /// what it writes (a stream piece's context, a SHA-256 job's `dst`)
    /// keeps a copy of that as it was, put back before it runs again
    /// ([`rerun`]). A record past the head (the queue pair did not take
    /// the job) is not looked at, and is written again when the entry is
    /// read again.
    pub fn taken(&self, depth: u32, pos: u32, sqe: &SubmissionEntry, mem: &GuestMemory) {
        let pre = match rerun(sqe) {
            Rerun::AsIs => (0, 0),
            Rerun::Never => (0, NO_RERUN),
            Rerun::Restoring { addr, len } => {
                let mut buf = vec![0u8; len as usize];
                if mem.read_slice(&mut buf, GuestAddress(addr)).is_err() {
                    (0, NO_RERUN)
                } else {
                    self.map.write(self.pre_off(pos % depth), &buf);
                    (addr, len)
                }
            }
        };
        self.write_slot_with(depth, pos, LIVE_JOB, &sqe.to_bytes(), pre);
    }

    /// The entry at ring position `pos` was refused (its check failed, or
    /// the queue pair refused the batch): what is owed is its error
    /// completion `r`, recorded as a held result. It never runs, and after
    /// a death it completes with its own status.
    pub fn refused(&self, depth: u32, pos: u32, r: &JobResult) {
        self.write_slot(depth, pos, LIVE_RESULT, &held_bytes(&HeldCompletion::of(r)));
    }

    /// Entries before `sq_head` are taken for good.
    pub fn commit_head(&self, sq_head: u32) {
        self.h32(H_SQ_HEAD).store(sq_head, Ordering::Release);
    }

    /// The completion of `slot`'s job is about to be published at
    /// completion index `cq_index`.
    pub fn completing(&self, slot: u32, cq_index: u32) {
        let v = COMPLETING | (slot as u64) << 32 | cq_index as u64;
        self.h64(H_COMPLETING).store(v, Ordering::Release);
    }

    /// The completion announced by [`completing`](Self::completing) could
    /// not be written (its ring is gone): the job stays recorded.
    pub fn not_completing(&self) {
        self.h64(H_COMPLETING).store(0, Ordering::Release);
    }

    /// The completion of `slot`'s job was published: the queue has written
    /// `cq_tail` completions, `completed` counted in `Q_COMPLETED`.
    pub fn completed(&self, slot: u32, cq_tail: u32, completed: u32, r: &JobResult) {
        let at = self.slot_off(slot);
        self.map.u32_at(at + S_STATE).store(FREE, Ordering::Release);
        self.h32(H_CQ_TAIL).store(cq_tail, Ordering::Release);
        self.h32(H_COMPLETED).store(completed, Ordering::Release);
        if r.status == JobStatus::Ok {
            self.h64(H_JOBS_OK).fetch_add(1, Ordering::Relaxed);
            self.h64(H_BYTES_OUT)
                .fetch_add(r.bytes as u64, Ordering::Relaxed);
        } else {
            self.h64(H_JOBS_FAILED).fetch_add(1, Ordering::Relaxed);
        }
        self.h64(H_COMPLETING).store(0, Ordering::Release);
    }

    /// Whether the journal was started (the queue ran since it was
    /// enabled, with this journal).
    pub fn is_started(&self) -> bool {
        self.h32(H_MAGIC).load(Ordering::Acquire) == MAGIC
    }

    /// Where the queue stood when its last writer stopped, for a queue of
    /// `depth` entries whose completion ring is at `cq_base` in `mem`: a
    /// completion whose publication was under way is settled by reading its
    /// phase bit back. Jobs taken and not completed come back as `pending`
    /// (oldest first), held results as `held`.
    pub fn recover(
        &self,
        depth: u32,
        cq_base: u64,
        mem: &GuestMemory,
    ) -> Result<(RingState, JournalCounts), JournalError> {
        let magic = self.h32(H_MAGIC).load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(JournalError::Magic(magic));
        }
        let found = self.h32(H_DEPTH).load(Ordering::Acquire);
        if found != depth || depth > self.max_depth {
            return Err(JournalError::Depth {
                found,
                expected: depth,
            });
        }
        let sq_head = self.h32(H_SQ_HEAD).load(Ordering::Acquire);
        let mut cq_tail = self.h32(H_CQ_TAIL).load(Ordering::Acquire);
        let mut counts = JournalCounts {
            completed: self.h32(H_COMPLETED).load(Ordering::Acquire),
            jobs_ok: self.h64(H_JOBS_OK).load(Ordering::Acquire),
            jobs_failed: self.h64(H_JOBS_FAILED).load(Ordering::Acquire),
            bytes_out: self.h64(H_BYTES_OUT).load(Ordering::Acquire),
        };
        let completing = self.h64(H_COMPLETING).load(Ordering::Acquire);
        let mut done_slot = None;
        if completing & COMPLETING != 0 {
            let slot = ((completing >> 32) as u32) & 0x7fff_ffff;
            let index = completing as u32;
            if slot < depth
                && index == cq_tail
                && let Some(cqe) = published(mem, cq_base, depth, index)
            {
                // Published, not yet recorded: it is done.
                done_slot = Some(slot);
                cq_tail = cq_tail.wrapping_add(1);
                counts.completed = counts.completed.wrapping_add(1);
                if cqe.status == JobStatus::Ok.code() {
                    counts.jobs_ok += 1;
                    counts.bytes_out += cqe.bytes as u64;
                } else {
                    counts.jobs_failed += 1;
                }
            }
        }
        // Live records of committed positions, oldest first. A record past
        // `sq_head` is of a batch never committed: its entries are still
        // in the ring and are read again.
        let mut live: Vec<(u32, u32)> = Vec::new();
        for slot in 0..depth {
            if Some(slot) == done_slot {
                continue;
            }
            let at = self.slot_off(slot);
            let state = self.map.u32_at(at + S_STATE).load(Ordering::Acquire);
            if state == FREE {
                continue;
            }
            let pos = self.map.u32_at(at + S_POS).load(Ordering::Acquire);
            let age = sq_head.wrapping_sub(pos);
            if age >= 1 && age <= depth {
                live.push((age, slot));
            }
        }
        live.sort_unstable_by_key(|l| std::cmp::Reverse(l.0));
        let mut ring = RingState {
            sq_head,
            cq_tail,
            irq_pending: 0,
            held: Vec::new(),
            pending: Vec::new(),
        };
        for &(_, slot) in &live {
            let at = self.slot_off(slot);
            match self.map.u32_at(at + S_STATE).load(Ordering::Acquire) {
                LIVE_RESULT => {
                    let h = read_held(&self.map, at + S_BODY);
                    if JobStatus::from_code(h.status).is_none() {
                        return Err(JournalError::Status {
                            slot,
                            status: h.status,
                        });
                    }
                    ring.held.push(h);
                }
                _ => {
                    let mut raw = [0u8; SQE_SIZE];
                    self.map.read(at + S_BODY, &mut raw);
                    let sqe = SubmissionEntry::from_bytes(&raw);
                    let pre_len = self.map.u32_at(at + S_PRE_LEN).load(Ordering::Acquire);
                    let pre_addr = self.map.u64_at(at + S_PRE_ADDR).load(Ordering::Acquire);
                    match pre_len {
                        // It may have run half way over its own input: it
                        // fails rather than run again on what it wrote.
                        NO_RERUN => ring.held.push(HeldCompletion {
                            tag: sqe.tag,
                            status: JobStatus::EngineError.code(),
                            bytes: 0,
                            result: 0,
                            stream_end: false,
                        }),
                        0 => ring.pending.push(PendingJob::of(&sqe)),
                        len => {
                            let len = (len as usize).min(PRE_BYTES);
                            let mut buf = vec![0u8; len];
                            self.map.read(self.pre_off(slot), &mut buf);
                            // Only into memory the queue may write; if it
                            // is gone the job fails its check when offered.
                            let _ = mem.write_slice(&buf, GuestAddress(pre_addr));
                            ring.pending.push(PendingJob::of(&sqe));
                        }
                    }
                }
            }
        }
        let live_n = live.len() as u32;
        if sq_head.wrapping_sub(cq_tail) != live_n {
            return Err(JournalError::Positions {
                sq_head,
                cq_tail,
                live: live_n,
            });
        }
        // The guest gets an interrupt for whatever completed while nobody
        // could raise one.
        ring.irq_pending = 1;
        Ok((ring, counts))
    }
}

/// Whether a job can simply run again after a predecessor took it (and may
/// have run it, whole or in part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rerun {
    /// It writes nothing it reads: running it again writes the same bytes.
    AsIs,
    /// It reads and writes `len` bytes at `addr` (a stream piece's context,
    /// a resumed SHA-256 state): those bytes as they were go back first.
    Restoring { addr: u64, len: u32 },
    /// It writes over its own input (a copy whose buffers overlap, or any
    /// job whose output overlaps its source): it cannot run again.
    Never,
}

/// How a taken job runs again after a restart.
pub fn rerun(sqe: &SubmissionEntry) -> Rerun {
    use wdvirt_abi::Opcode;
    let Some(op) = Opcode::from_u8(sqe.opcode) else {
        return Rerun::AsIs;
    };
    let src = (sqe.src, sqe.src_len as u64);
    let dst = (sqe.dst, sqe.dst_len as u64);
    let overlap = |a: (u64, u64), b: (u64, u64)| super::queue::overlaps(a.0, a.1, b.0, b.1);
    if op.writes_dst() && op.reads_src() && overlap(src, dst) {
        return Rerun::Never;
    }
    if op.is_stream() {
        let ctx = (sqe.ctx, wdvirt_abi::stream::CTX_SIZE as u64);
        if overlap(ctx, src) || overlap(ctx, dst) {
            return Rerun::Never;
        }
        return Rerun::Restoring {
            addr: sqe.ctx,
            len: wdvirt_abi::stream::CTX_SIZE,
        };
    }
    // A SHA-256 job that reads its `dst`: the state it continues, or the
    // check that none is there, which the state a first piece (MORE) wrote
    // before the death would fail.
    if op == Opcode::Sha256 && crate::accel::ops::sha256_reads_dst(sqe.dst_len) {
        return Rerun::Restoring {
            addr: sqe.dst,
            len: wdvirt_abi::SHA256_STATE_SIZE,
        };
    }
    Rerun::AsIs
}

/// The completion at index `index` of a ring of `depth` entries at
/// `cq_base`, if it is published (its phase bit is the one that index
/// gets).
fn published(mem: &GuestMemory, cq_base: u64, depth: u32, index: u32) -> Option<CompletionEntry> {
    let slot = (index % depth) as u64;
    let want = if (index / depth).is_multiple_of(2) {
        CQE_PHASE
    } else {
        0
    };
    let mut raw = [0u8; CQE_SIZE];
    mem.read_slice(&mut raw, GuestAddress(cq_base + slot * CQE_SIZE as u64))
        .ok()?;
    let cqe = CompletionEntry::from_bytes(&raw);
    (cqe.flags & CQE_PHASE == want).then_some(cqe)
}

fn held_bytes(h: &HeldCompletion) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&h.tag.to_le_bytes());
    b[4..6].copy_from_slice(&h.status.to_le_bytes());
    b[6] = h.stream_end as u8;
    b[8..12].copy_from_slice(&h.bytes.to_le_bytes());
    b[12..16].copy_from_slice(&h.result.to_le_bytes());
    b
}

fn read_held(map: &SharedMap, at: usize) -> HeldCompletion {
    let mut b = [0u8; 16];
    map.read(at, &mut b);
    HeldCompletion {
        tag: u32::from_le_bytes(b[0..4].try_into().unwrap()),
        status: u16::from_le_bytes(b[4..6].try_into().unwrap()),
        stream_end: b[6] != 0,
        bytes: u32::from_le_bytes(b[8..12].try_into().unwrap()),
        result: u32::from_le_bytes(b[12..16].try_into().unwrap()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wdvirt_abi::Opcode;

    const CQ: u64 = 0x1000;
    const DEPTH: u32 = 8;

    fn rig() -> (QueueJournal, GuestMemory) {
        let (_fd, map) = SharedMap::create("t", QueueJournal::size(DEPTH)).unwrap();
        let j = QueueJournal::at(Arc::new(map), 0, DEPTH);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        (j, mem)
    }

    fn sqe(tag: u32, op: Opcode, src: u64, dst: u64, len: u32) -> SubmissionEntry {
        SubmissionEntry {
            opcode: op as u8,
            tag,
            src,
            src_len: len,
            dst,
            dst_len: len,
            ..Default::default()
        }
    }

    /// Publish completion `index`'s phase as the device does.
    fn publish(mem: &GuestMemory, index: u32, tag: u32) {
        let cqe = CompletionEntry {
            tag,
            status: 0,
            flags: if (index / DEPTH).is_multiple_of(2) {
                CQE_PHASE
            } else {
                0
            },
            bytes: 64,
            result: 0,
        };
        let at = CQ + (index % DEPTH) as u64 * CQE_SIZE as u64;
        mem.write_slice(&cqe.to_bytes(), GuestAddress(at)).unwrap();
    }

    /// A started journal with three copies (tags 10, 11, 12) taken and
    /// committed.
    fn three_copies_taken() -> (QueueJournal, GuestMemory) {
        let (j, mem) = rig();
        j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
        for pos in 0..3 {
            j.taken(
                DEPTH,
                pos,
                &sqe(pos + 10, Opcode::Copy, 0x8000, 0x9000, 64),
                &mem,
            );
        }
        j.commit_head(3);
        (j, mem)
    }

    #[test]
    fn a_completion_published_but_not_recorded_is_done_and_the_rest_run_again_in_order() {
        let (j, mem) = three_copies_taken();
        // Job 1 completes whole; job 0's completion is published when the
        // process dies, before it is recorded.
        j.completing(1, 0);
        publish(&mem, 0, 11);
        j.completed(
            1,
            1,
            1,
            &JobResult {
                cookie: 11,
                slot: 1,
                status: JobStatus::Ok,
                bytes: 64,
                result: 0,
                stream_end: false,
            },
        );
        j.completing(0, 1);
        publish(&mem, 1, 10);
        let (ring, counts) = j.recover(DEPTH, CQ, &mem).unwrap();
        assert_eq!((ring.sq_head, ring.cq_tail), (3, 2));
        let tags: Vec<u32> = ring.pending.iter().map(|p| p.tag).collect();
        assert_eq!(tags, [12], "only the job never completed runs again");
        assert_eq!(
            (counts.completed, counts.jobs_ok, counts.bytes_out),
            (2, 2, 128)
        );
        // Had its phase not been published, job 0 would run again too,
        // before job 2.
        let (j, mem) = three_copies_taken();
        j.completing(0, 0);
        let (ring, _) = j.recover(DEPTH, CQ, &mem).unwrap();
        let tags: Vec<u32> = ring.pending.iter().map(|p| p.tag).collect();
        assert_eq!((ring.cq_tail, tags), (0, vec![10, 11, 12]));
    }

    #[test]
    fn entries_past_the_committed_head_are_read_again_from_the_ring() {
        let (j, mem) = rig();
        j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
        j.taken(DEPTH, 0, &sqe(1, Opcode::Copy, 0x8000, 0x9000, 64), &mem);
        j.commit_head(1);
        // Recorded, but the batch's head never committed.
        j.taken(DEPTH, 1, &sqe(2, Opcode::Copy, 0x8000, 0x9000, 64), &mem);
        let (ring, _) = j.recover(DEPTH, CQ, &mem).unwrap();
        assert_eq!(ring.sq_head, 1);
        assert_eq!(ring.pending.len(), 1);
        assert_eq!(ring.pending[0].tag, 1);
    }

    /// A RESUME piece with a `dst` too short for a state fails untouched
    /// (`DstTooSmall`): nothing is kept for it, so a recovery writes
    /// nothing back past its `dst` (where the guest may have written since).
    #[test]
    fn a_sha256_resume_with_a_short_dst_puts_back_nothing_outside_it() {
        let (j, mem) = rig();
        j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
        let mut p = sqe(1, Opcode::Sha256, 0x8000, 0x9000, 64);
        p.dst_len = 32;
        p.param = wdvirt_abi::SHA256_RESUME;
        assert_eq!(rerun(&p), Rerun::AsIs);
        mem.write_slice(&[0xaa; 96], GuestAddress(0x9020)).unwrap();
        j.taken(DEPTH, 0, &p, &mem);
        j.commit_head(1);
        mem.write_slice(&[0xbb; 96], GuestAddress(0x9020)).unwrap();
        let (ring, _) = j.recover(DEPTH, CQ, &mem).unwrap();
        let mut back = [0u8; 96];
        mem.read_slice(&mut back, GuestAddress(0x9020)).unwrap();
        assert_eq!(back, [0xbb; 96], "the guest's bytes past dst");
        assert_eq!(ring.pending.len(), 1);
    }

    /// A successor re-runs a piece it recovered and dies too before the
    /// piece completes: the third process finds the piece's context as
    /// the piece first read it, not as the second run left it.
    #[test]
    fn a_piece_run_again_and_killed_again_gets_its_context_back_the_second_time() {
        let (j, mem) = rig();
        j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
        let ctx = 0x20000u64;
        mem.write_slice(&[7u8; 64], GuestAddress(ctx)).unwrap();
        let mut piece = sqe(1, Opcode::StreamCompress, 0x8000, 0x9000, 64);
        piece.ctx = ctx;
        j.taken(DEPTH, 0, &piece, &mem);
        j.commit_head(1);
        mem.write_slice(&[9u8; 64], GuestAddress(ctx)).unwrap();
        let (ring, counts) = j.recover(DEPTH, CQ, &mem).unwrap();
        // The successor's worker starts the queue where the record says
        // and runs the piece again; it dies before the piece completes.
        j.start(DEPTH, &ring, counts, &mem);
        mem.write_slice(&[9u8; 64], GuestAddress(ctx)).unwrap();
        let (ring, _) = j.recover(DEPTH, CQ, &mem).unwrap();
        let mut back = [0u8; 64];
        mem.read_slice(&mut back, GuestAddress(ctx)).unwrap();
        assert_eq!(back, [7u8; 64], "the context as the piece first read it");
        assert_eq!(ring.pending.len(), 1);
        // A copy over itself carried into a successor still never runs
        // twice: it fails after the second death too.
        let lap = sqe(2, Opcode::Copy, 0x8000, 0x8010, 64);
        let carried = RingState {
            sq_head: 1,
            pending: vec![PendingJob::of(&lap)],
            ..RingState::default()
        };
        j.start(DEPTH, &carried, JournalCounts::default(), &mem);
        let (ring, _) = j.recover(DEPTH, CQ, &mem).unwrap();
        assert!(ring.pending.is_empty(), "{:?}", ring.pending);
        assert_eq!(ring.held[0].status, JobStatus::EngineError.code());
    }

    /// An entry refused at its check is owed its error completion, which
    /// is what a death leaves: it does not come back as a job (the check
    /// again would pass for a refusal a record cannot carry, such as a
    /// reserved field, and the job would run).
    #[test]
    fn a_refused_entry_comes_back_as_its_own_error_completion() {
        let (j, mem) = rig();
        j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
        // Entry 0: a copy with a reserved flag set, refused at its check.
        let r = JobResult {
            cookie: 1,
            slot: 0,
            status: JobStatus::ReservedNonZero,
            bytes: 0,
            result: 0,
            stream_end: false,
        };
        j.refused(DEPTH, 0, &r);
        j.taken(DEPTH, 1, &sqe(2, Opcode::Copy, 0x8000, 0x9000, 64), &mem);
        j.commit_head(2);
        let (ring, _) = j.recover(DEPTH, CQ, &mem).unwrap();
        assert_eq!(ring.held.len(), 1, "{ring:?}");
        assert_eq!(
            (ring.held[0].tag, ring.held[0].status),
            (1, JobStatus::ReservedNonZero.code())
        );
        assert_eq!(ring.pending.len(), 1);
        assert_eq!(ring.pending[0].tag, 2);
    }

    /// The first piece of a long SHA-256 (MORE, no RESUME) writes a running
    /// state into a `dst` that held none; run again as it stood, it would
    /// find that state and be refused (`CorruptInput`: a chain that forgot
    /// RESUME). The journal keeps `dst` as the piece was taken and puts it
    /// back, so the piece run again writes the same state.
    #[test]
    fn a_first_sha256_piece_run_again_after_a_death_writes_the_same_state() {
        use crate::accel::ops::sha256_part;
        use wdvirt_abi::{SHA256_MORE, SHA256_STATE_SIZE};
        let (j, mem) = rig();
        j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
        let (src, dst) = (0x8000u64, 0x9000u64);
        let data: Vec<u8> = (0..256u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&data, GuestAddress(src)).unwrap();
        let mut piece = sqe(1, Opcode::Sha256, src, dst, data.len() as u32);
        piece.dst_len = SHA256_STATE_SIZE;
        piece.param = SHA256_MORE;
        assert!(matches!(rerun(&piece), Rerun::Restoring { addr, .. } if addr == dst));
        j.taken(DEPTH, 0, &piece, &mem);
        j.commit_head(1);
        // The engine ran the piece; the process died before its completion.
        let run = |mem: &GuestMemory| {
            let mut out = vec![0u8; SHA256_STATE_SIZE as usize];
            mem.read_slice(&mut out, GuestAddress(dst)).unwrap();
            let r = sha256_part(&data, &mut out, SHA256_MORE);
            mem.write_slice(&out, GuestAddress(dst)).unwrap();
            r.map(|_| out)
        };
        let first = run(&mem).unwrap();
        let (ring, _) = j.recover(DEPTH, CQ, &mem).unwrap();
        assert_eq!(ring.pending.len(), 1);
        assert_eq!(run(&mem), Ok(first), "the piece run again");
    }

    #[test]
    fn a_stream_piece_gets_its_context_back_and_an_overlapping_copy_fails_rather_than_run_twice() {
        let (j, mem) = rig();
        j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
        let ctx = 0x20000u64;
        mem.write_slice(&[7u8; 64], GuestAddress(ctx)).unwrap();
        let mut piece = sqe(1, Opcode::StreamCompress, 0x8000, 0x9000, 64);
        piece.ctx = ctx;
        j.taken(DEPTH, 0, &piece, &mem);
        j.taken(DEPTH, 1, &sqe(2, Opcode::Copy, 0x8000, 0x8010, 64), &mem);
        j.commit_head(2);
        // The engine ran the piece (its context moved on) and half the copy.
        mem.write_slice(&[9u8; 64], GuestAddress(ctx)).unwrap();
        let (ring, _) = j.recover(DEPTH, CQ, &mem).unwrap();
        let mut back = [0u8; 64];
        mem.read_slice(&mut back, GuestAddress(ctx)).unwrap();
        assert_eq!(back, [7u8; 64], "the context as the piece first read it");
        assert_eq!(ring.pending.len(), 1);
        assert_eq!(ring.pending[0].tag, 1);
        assert_eq!(ring.held.len(), 1);
        assert_eq!(ring.held[0].tag, 2);
        assert_eq!(ring.held[0].status, JobStatus::EngineError.code());
        assert_eq!(
            rerun(&sqe(3, Opcode::Copy, 0x8000, 0x9000, 64)),
            Rerun::AsIs
        );
    }

    #[test]
    fn a_journal_that_does_not_add_up_or_of_another_depth_is_refused_with_its_numbers() {
        let (j, mem) = rig();
        assert_eq!(j.recover(DEPTH, CQ, &mem), Err(JournalError::Magic(0)));
        j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
        assert!(matches!(
            j.recover(4, CQ, &mem),
            Err(JournalError::Depth {
                found: 8,
                expected: 4
            })
        ));
        // Two entries taken, one recorded.
        j.taken(DEPTH, 0, &sqe(1, Opcode::Nop, 0, 0, 0), &mem);
        j.commit_head(2);
        let e = j.recover(DEPTH, CQ, &mem).unwrap_err();
        assert_eq!(
            e,
            JournalError::Positions {
                sq_head: 2,
                cq_tail: 0,
                live: 1
            }
        );
        assert!(e.to_string().contains("does not add up"));
    }

    #[test]
    fn a_journal_of_random_bytes_is_refused_or_recovered_never_a_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let (j, mem) = rig();
        let len = QueueJournal::size(DEPTH);
        let mut refused = 0;
        for round in 0..2000 {
            // A real journal, then random words over it (or all random).
            j.start(DEPTH, &RingState::default(), JournalCounts::default(), &mem);
            for pos in 0..rng.random_range(0..DEPTH) {
                j.taken(
                    DEPTH,
                    pos,
                    &sqe(pos, Opcode::Copy, 0x8000, 0x9000, 64),
                    &mem,
                );
            }
            let words = if round % 10 == 0 {
                len / 4
            } else {
                rng.random_range(1..8)
            };
            for _ in 0..words {
                let at = rng.random_range(0..HEADER + DEPTH as usize * SLOT) & !3;
                j.map.u32_at(at).store(rng.random(), Ordering::Relaxed);
            }
            if round % 10 == 0 {
                j.map.u32_at(H_MAGIC).store(MAGIC, Ordering::Relaxed);
                j.map.u32_at(H_DEPTH).store(DEPTH, Ordering::Relaxed);
            }
            match j.recover(DEPTH, CQ, &mem) {
                Ok((ring, _)) => {
                    let n = (ring.pending.len() + ring.held.len()) as u32;
                    assert_eq!(ring.sq_head.wrapping_sub(ring.cq_tail), n);
                    assert!(n <= DEPTH);
                }
                Err(e) => {
                    refused += 1;
                    assert!(!e.to_string().is_empty());
                }
            }
        }
        assert!(refused > 0, "random journals are refused");
    }
}
