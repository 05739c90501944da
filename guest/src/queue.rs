//! One queue pair: the submission ring, the completion ring and the index
//! block in DMA memory, and the driver's side of the ring protocol.
//!
//! Protocol (see `wdvirt_abi`): SQEs go to `sq + (tail % depth) * 64`; then
//! the free-running `sq_tail` is published at `idx + 0` after a release
//! fence; after a full fence the device's `flags` word (`idx + 12`) says
//! whether a doorbell is needed. The device writes CQEs in ring order with a
//! phase bit that is 1 on its first pass, 0 on the second, and so on; the
//! driver consumes them and publishes the free-running `cq_head` at
//! `idx + 4`. At most `depth` jobs are ever outstanding, so the completion
//! ring can never overflow.

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use wdvirt_abi::{
    CQE_PHASE, CQE_SIZE, CompletionEntry, IDX_FLAG_NO_DOORBELL, SQE_SIZE, SubmissionEntry, idx,
    pci, regs,
};

use crate::dma::{DmaMemory, DmaPool, PoolBuffer};
use crate::error::DriverError;
use crate::jobs::JobSpec;
use crate::mmio::Mmio;

/// Completion entries [`Queue::poll`] reads at a time.
pub const POLL_RUN: usize = 16;

/// Default limit for [`Queue::run_batch`] and the convenience operations.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Ring memory of one queue.
pub(crate) struct Rings<D: DmaMemory> {
    pub sq: PoolBuffer<D>,
    pub cq: PoolBuffer<D>,
    pub idx: PoolBuffer<D>,
}

/// An enabled queue. Dropping it resets the queue on the device before its
/// ring memory goes back to the pool.
pub struct Queue<M: Mmio, D: DmaMemory> {
    mmio: Arc<M>,
    pub(crate) pool: DmaPool<D>,
    index: u32,
    depth: u32,
    ops: u32,
    pub(crate) max_xfer: u32,
    rings: Rings<D>,
    /// Free-running count of SQEs published.
    sq_tail: u32,
    /// Ring slot of the next SQE.
    sq_slot: u32,
    /// Free-running count of CQEs consumed.
    cq_head: u32,
    /// Ring slot of the next CQE.
    cq_slot: u32,
    /// Phase bit the next valid CQE carries.
    phase: u16,
    timeout: Duration,
    doorbells: u64,
    /// The device's measured time per completion, for sizing waits.
    pace: Pace,
    /// Let go by [`Queue::detach`]: dropping it leaves the device alone.
    detached: bool,
}

/// Where the driver is in a queue's rings: SQEs published and CQEs
/// consumed (free-running). With the ring memory and the device's state it
/// is all a driver needs to go on with a queue somewhere else (a migrated
/// guest): [`Queue::cursor`], [`crate::Device::adopt_queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCursor {
    pub sq_tail: u32,
    pub cq_head: u32,
}

/// How fast the device completes this queue's jobs while it is busy
/// throughout (windows of [`Pace::WINDOW`] completions), so that a batch
/// waits by sleeping for a share of the work still outstanding rather than
/// by spinning: the driver thread then costs a few µs per job, not tens.
#[derive(Clone, Copy, Debug)]
struct Pace {
    per_job: Option<Duration>,
    mark: Instant,
    seen: u32,
}

impl Pace {
    const WINDOW: u32 = 64;
    /// Shorter naps are not worth a timer (they come up to ~50 µs late).
    const NAP_MIN: Duration = Duration::from_micros(200);
    const NAP_MAX: Duration = Duration::from_millis(1);

    fn new() -> Pace {
        Pace {
            per_job: None,
            mark: Instant::now(),
            seen: 0,
        }
    }
    /// The device went from idle to busy.
    fn restart(&mut self) {
        (self.mark, self.seen) = (Instant::now(), 0);
    }
    /// `n` completions arrived; `busy`: work is still outstanding.
    fn completed(&mut self, n: u32, busy: bool) {
        self.seen += n;
        if busy && self.seen >= Self::WINDOW {
            let now = Instant::now();
            let sample = now.saturating_duration_since(self.mark) / self.seen;
            self.per_job = Some(self.per_job.map_or(sample, |avg| (avg * 3 + sample) / 4));
            (self.mark, self.seen) = (now, 0);
        }
    }
    /// Nothing new: sleep for a quarter of the outstanding work, or yield.
    fn idle(&self, outstanding: u32) {
        let nap = self
            .per_job
            .map(|p| p * (outstanding / 4))
            .unwrap_or_default()
            .min(Self::NAP_MAX);
        if nap >= Self::NAP_MIN {
            std::thread::sleep(nap);
        } else {
            std::thread::yield_now();
        }
    }
}

impl<M: Mmio, D: DmaMemory> Queue<M, D> {
    pub(crate) fn new(
        mmio: Arc<M>,
        pool: DmaPool<D>,
        index: u32,
        depth: u32,
        ops: u32,
        max_xfer: u32,
        rings: Rings<D>,
    ) -> Self {
        Queue {
            mmio,
            pool,
            index,
            depth,
            ops,
            max_xfer,
            rings,
            sq_tail: 0,
            sq_slot: 0,
            cq_head: 0,
            cq_slot: 0,
            phase: CQE_PHASE,
            timeout: DEFAULT_TIMEOUT,
            doorbells: 0,
            pace: Pace::new(),
            detached: false,
        }
    }

    /// As [`Queue::new`], resuming at `cursor` in rings the device already
    /// runs (slots and phase follow from the free-running counts).
    pub(crate) fn resume(mut self, cursor: QueueCursor) -> Self {
        self.sq_tail = cursor.sq_tail;
        self.sq_slot = cursor.sq_tail % self.depth;
        self.cq_head = cursor.cq_head;
        self.cq_slot = cursor.cq_head % self.depth;
        self.phase = if (cursor.cq_head / self.depth).is_multiple_of(2) {
            CQE_PHASE
        } else {
            0
        };
        self
    }

    /// Where the driver is in the rings.
    pub fn cursor(&self) -> QueueCursor {
        QueueCursor {
            sq_tail: self.sq_tail,
            cq_head: self.cq_head,
        }
    }

    /// Lets the queue go without resetting it on the device (its guest has
    /// moved on, with the device, elsewhere); its ring memory goes back to
    /// the pool.
    pub fn detach(mut self) -> QueueCursor {
        self.detached = true;
        self.cursor()
    }

    pub fn index(&self) -> u32 {
        self.index
    }
    pub fn depth(&self) -> u32 {
        self.depth
    }
    pub fn ops_mask(&self) -> u32 {
        self.ops
    }
    pub fn max_xfer(&self) -> u32 {
        self.max_xfer
    }
    pub fn pool(&self) -> &DmaPool<D> {
        &self.pool
    }
    /// Jobs submitted and not yet completed.
    pub fn outstanding(&self) -> u32 {
        self.sq_tail.wrapping_sub(self.cq_head)
    }
    /// Submission slots free now.
    pub fn free_slots(&self) -> u32 {
        self.depth - self.outstanding()
    }
    /// Doorbells written so far (the rest were suppressed by the device).
    pub fn doorbells_rung(&self) -> u64 {
        self.doorbells
    }
    /// Free-running counters as the driver last published them: `(sq_tail, cq_head)`.
    pub fn counters(&self) -> (u32, u32) {
        (self.sq_tail, self.cq_head)
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    /// Device addresses of the SQ ring, CQ ring and index block.
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        (
            self.rings.sq.addr(),
            self.rings.cq.addr(),
            self.rings.idx.addr(),
        )
    }

    fn reg(&self, r: u32) -> u64 {
        u64::from(regs::queue(self.index)) + u64::from(r)
    }

    /// `Q_STATUS`.
    pub fn status(&self) -> Result<u32, DriverError> {
        Ok(self
            .mmio
            .read32(pci::BAR_CONTROL, self.reg(regs::Q_STATUS))?)
    }

    /// `Q_COMPLETED`: jobs the device completed on this queue (wraps).
    pub fn device_completed(&self) -> Result<u32, DriverError> {
        Ok(self
            .mmio
            .read32(pci::BAR_CONTROL, self.reg(regs::Q_COMPLETED))?)
    }

    /// `sq_head` as the device last published it.
    pub fn device_sq_head(&self) -> Result<u32, DriverError> {
        Ok(self
            .pool
            .memory()
            .read_u32(self.rings.idx.addr() + idx::SQ_HEAD)?)
    }

    /// Sets `Q_IRQ_COALESCE` (count in bits 15:0, microseconds in 31:16).
    pub fn set_coalescing(&self, count: u16, delay_us: u16) -> Result<(), DriverError> {
        let v = u32::from(count) | (u32::from(delay_us) << 16);
        Ok(self
            .mmio
            .write32(pci::BAR_CONTROL, self.reg(regs::Q_IRQ_COALESCE), v)?)
    }

    /// Puts as many of `entries` into the ring as there are free slots,
    /// publishes the new tail and rings the doorbell unless the device asked
    /// not to. Returns how many went in (possibly 0).
    pub fn submit(&mut self, entries: &[SubmissionEntry]) -> Result<usize, DriverError> {
        let n = entries.len().min(self.free_slots() as usize);
        if n == 0 {
            return Ok(0);
        }
        let mem = self.pool.memory();
        // Write in at most two contiguous runs (before and after the wrap).
        let mut done = 0;
        let mut bytes = Vec::with_capacity(n.min((self.depth - self.sq_slot) as usize) * SQE_SIZE);
        while done < n {
            let run = (n - done).min((self.depth - self.sq_slot) as usize);
            bytes.clear();
            for e in &entries[done..done + run] {
                bytes.extend_from_slice(&e.to_bytes());
            }
            mem.write(
                self.rings.sq.addr() + u64::from(self.sq_slot) * SQE_SIZE as u64,
                &bytes,
            )?;
            done += run;
            self.sq_slot = (self.sq_slot + run as u32) % self.depth;
        }
        let tail = self.sq_tail.wrapping_add(n as u32);
        // The SQE bytes must be visible before the tail that covers them.
        fence(Ordering::Release);
        mem.write_u32(self.rings.idx.addr() + idx::SQ_TAIL, tail)?;
        self.sq_tail = tail;
        // Order the tail store before the flags load (Dekker with the device,
        // which clears NO_DOORBELL and then re-reads sq_tail before sleeping).
        fence(Ordering::SeqCst);
        let flags = mem.read_u32(self.rings.idx.addr() + idx::FLAGS)?;
        if flags & IDX_FLAG_NO_DOORBELL == 0 {
            self.mmio.write32(
                pci::BAR_DOORBELL,
                u64::from(self.index) * pci::DOORBELL_STRIDE,
                tail,
            )?;
            self.doorbells += 1;
        }
        Ok(n)
    }

    /// Moves every completion the device has written into `out` and publishes
    /// the new `cq_head`. Returns how many were added. Never blocks.
    ///
    /// Entries are read in runs (up to [`POLL_RUN`], never past the ring's
    /// end): the run once, to count the entries that carry this pass's
    /// phase; then, after an acquire fence, those entries again, so that
    /// every body used was read after its phase bit was seen.
    pub fn poll(&mut self, out: &mut Vec<CompletionEntry>) -> Result<usize, DriverError> {
        let mem = self.pool.memory();
        let mut n = 0usize;
        let mut run = [0u8; POLL_RUN * CQE_SIZE];
        loop {
            let len = ((self.depth - self.cq_slot) as usize).min(POLL_RUN);
            let addr = self.rings.cq.addr() + u64::from(self.cq_slot) * CQE_SIZE as u64;
            let bytes = &mut run[..len * CQE_SIZE];
            mem.read(addr, bytes)?;
            // Bytes 6..8 of an entry are its flags, the phase in bit 0.
            let ready = bytes
                .chunks_exact(CQE_SIZE)
                .take_while(|e| u16::from_le_bytes([e[6], e[7]]) & CQE_PHASE == self.phase)
                .count();
            if ready == 0 {
                break;
            }
            // The rest of each entry was written before its phase bit.
            fence(Ordering::Acquire);
            let bytes = &mut run[..ready * CQE_SIZE];
            mem.read(addr, bytes)?;
            for e in bytes.chunks_exact(CQE_SIZE) {
                let cqe = CompletionEntry::from_bytes(e.try_into().expect("one entry"));
                if self.outstanding() == 0 {
                    self.publish_head(n)?;
                    return Err(DriverError::SpuriousCompletion { tag: cqe.tag });
                }
                out.push(cqe);
                n += 1;
                self.cq_head = self.cq_head.wrapping_add(1);
                self.cq_slot += 1;
                if self.cq_slot == self.depth {
                    self.cq_slot = 0;
                    self.phase ^= CQE_PHASE;
                }
            }
            if ready < len {
                break;
            }
        }
        self.publish_head(n)?;
        Ok(n)
    }

    fn publish_head(&self, consumed: usize) -> Result<(), DriverError> {
        if consumed == 0 {
            return Ok(());
        }
        // Our reads of the consumed entries happen before the device may reuse them.
        fence(Ordering::Release);
        Ok(self
            .pool
            .memory()
            .write_u32(self.rings.idx.addr() + idx::CQ_HEAD, self.cq_head)?)
    }

    /// Waits for at least one completion (poll mode: a short spin, then
    /// yields, then sleeps of growing length up to 1 ms). Returns 0 at once
    /// if nothing is outstanding; [`DriverError::Timeout`] after `timeout`.
    pub fn wait(
        &mut self,
        out: &mut Vec<CompletionEntry>,
        timeout: Duration,
    ) -> Result<usize, DriverError> {
        if self.outstanding() == 0 {
            return Ok(0);
        }
        let start = Instant::now();
        let mut round = 0u32;
        let mut nap = Duration::from_micros(10);
        loop {
            let n = self.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(DriverError::Timeout {
                    outstanding: self.outstanding(),
                    waited,
                });
            }
            round += 1;
            if round < 64 {
                std::hint::spin_loop();
            } else if round < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap.min(timeout - waited));
                nap = (nap * 2).min(Duration::from_millis(1));
            }
        }
    }

    /// Runs `jobs` (tag = index), keeping the ring as full as it can, and
    /// returns their completions in job order. Needs an idle queue. Job
    /// failures are in the entries' `status`; see [`crate::check`].
    pub fn run_batch(&mut self, jobs: &[JobSpec]) -> Result<Vec<CompletionEntry>, DriverError> {
        if self.outstanding() != 0 {
            return Err(DriverError::NotIdle {
                outstanding: self.outstanding(),
            });
        }
        if u32::try_from(jobs.len()).is_err() {
            return Err(DriverError::InvalidArgument(format!(
                "{} jobs in one batch",
                jobs.len()
            )));
        }
        let mut results: Vec<Option<CompletionEntry>> = vec![None; jobs.len()];
        let mut next = 0usize;
        let mut done = 0usize;
        let mut sqes = Vec::new();
        let mut got = Vec::new();
        let deadline = Instant::now() + self.timeout;
        while done < jobs.len() {
            if next < jobs.len() && self.free_slots() > 0 {
                if self.outstanding() == 0 {
                    self.pace.restart();
                }
                let k = (jobs.len() - next).min(self.free_slots() as usize);
                sqes.clear();
                sqes.extend(
                    jobs[next..next + k]
                        .iter()
                        .enumerate()
                        .map(|(i, j)| j.to_sqe((next + i) as u32)),
                );
                next += self.submit(&sqes)?;
            }
            got.clear();
            let n = if self.pace.per_job.is_none() {
                // No measure of the device yet (short batches, single jobs):
                // spin briefly, then sleep in growing steps.
                let left = deadline.saturating_duration_since(Instant::now());
                self.wait(&mut got, left)?
            } else {
                self.poll(&mut got)?
            };
            if n == 0 {
                if Instant::now() >= deadline {
                    return Err(DriverError::Timeout {
                        outstanding: self.outstanding(),
                        waited: self.timeout,
                    });
                }
                self.pace.idle(self.outstanding());
                continue;
            }
            self.pace.completed(n as u32, self.outstanding() > 0);
            for cqe in &got {
                match results.get_mut(cqe.tag as usize) {
                    Some(slot @ None) if (cqe.tag as usize) < next => {
                        *slot = Some(*cqe);
                        done += 1;
                    }
                    _ => return Err(DriverError::UnexpectedTag { tag: cqe.tag }),
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }
}

impl<M: Mmio, D: DmaMemory> Drop for Queue<M, D> {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        // Stop the device using the rings before they return to the pool.
        let _ = self
            .mmio
            .write32(pci::BAR_CONTROL, self.reg(regs::Q_CTRL), regs::Q_CTRL_RESET);
    }
}

#[cfg(test)]
mod tests {
    use wdvirt_abi::{ALL_OPS, JobStatus, Opcode};

    use super::*;
    use crate::fake::{self, Mode};

    fn fill_job(pool_addr: u64, i: u32) -> JobSpec {
        JobSpec::new(Opcode::Fill)
            .dst(pool_addr + u64::from(i) * 64, 64)
            .param(u64::from(i))
    }

    #[test]
    fn submit_respects_free_space() {
        let (f, d, pool) = fake::setup(Mode::Manual);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let nop = |t| JobSpec::new(Opcode::Nop).to_sqe(t);
        let sqes: Vec<_> = (0..6).map(nop).collect();
        assert_eq!(q.submit(&sqes).unwrap(), 4);
        assert_eq!((q.outstanding(), q.free_slots()), (4, 0));
        assert_eq!(q.submit(&sqes[4..]).unwrap(), 0);
        assert_eq!(
            f.doorbells(0),
            1,
            "a submit that adds nothing rings nothing"
        );
        assert_eq!(f.pending_tags(0), vec![0, 1, 2, 3]);
        f.complete(0, &[0, 1]);
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out).unwrap(), 2);
        assert_eq!(q.free_slots(), 2);
        assert_eq!(q.submit(&sqes[4..]).unwrap(), 2);
        assert_eq!(f.pending_tags(0), vec![2, 3, 4, 5]);
        assert_eq!(f.max_in_flight(0), 4);
    }

    #[test]
    fn ring_wraps_and_phase_flips_over_many_passes() {
        let (f, d, pool) = fake::setup(Mode::InOrder);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let data = pool.alloc(64 * 4, 64).unwrap();
        let mut out = Vec::new();
        let mut tag = 0u32;
        // Batches of 3 on a ring of 4: every slot is used in both phases.
        for _round in 0..7 {
            let sqes: Vec<_> = (0..3)
                .map(|i| fill_job(data.addr(), i).to_sqe(tag + i))
                .collect();
            assert_eq!(q.submit(&sqes).unwrap(), 3);
            out.clear();
            assert_eq!(q.wait(&mut out, Duration::from_secs(1)).unwrap(), 3);
            let tags: Vec<u32> = out.iter().map(|c| c.tag).collect();
            assert_eq!(tags, vec![tag, tag + 1, tag + 2]);
            assert!(
                out.iter()
                    .all(|c| c.status == JobStatus::Ok.code() && c.bytes == 64)
            );
            tag += 3;
        }
        assert_eq!(q.counters(), (21, 21));
        // The device sees the driver's published head.
        assert_eq!(
            pool.memory()
                .read_u32(q.ring_addresses().2 + idx::CQ_HEAD)
                .unwrap(),
            21
        );
        assert_eq!(q.device_completed().unwrap(), 21);
        assert_eq!(f.cq_overflows(), 0);
        assert_eq!(data.to_vec(64 * 3).unwrap()[64 * 2], 2);
    }

    #[test]
    fn stale_entries_from_the_last_pass_are_not_consumed() {
        let (f, d, pool) = fake::setup(Mode::Manual);
        let mut q = d.queue(0, 2, ALL_OPS, &pool).unwrap();
        let nop = |t| JobSpec::new(Opcode::Nop).to_sqe(t);
        let mut out = Vec::new();
        q.submit(&[nop(0), nop(1)]).unwrap();
        f.complete(0, &[0, 1]);
        assert_eq!(q.poll(&mut out).unwrap(), 2);
        // Both slots hold phase-1 entries; the driver now expects phase 0.
        assert_eq!(q.poll(&mut out).unwrap(), 0);
        q.submit(&[nop(2)]).unwrap();
        assert_eq!(q.poll(&mut out).unwrap(), 0, "not completed yet");
        f.complete(0, &[2]);
        assert_eq!(q.poll(&mut out).unwrap(), 1);
        assert_eq!(out.last().unwrap().tag, 2);
        assert_eq!(
            out.last().unwrap().flags & CQE_PHASE,
            0,
            "second pass writes phase 0"
        );
    }

    #[test]
    fn poll_reads_runs_longer_than_one_read_and_across_the_ring_end() {
        let (f, d, pool) = fake::setup(Mode::Manual);
        let mut q = d.queue(0, 64, ALL_OPS, &pool).unwrap();
        let nop = |t| JobSpec::new(Opcode::Nop).to_sqe(t);
        let mut out = Vec::new();
        let mut next = 0u32;
        // 50 completions (more than POLL_RUN), then 40 from slot 50 on: the
        // second pass's run crosses the ring's end and flips the phase.
        for (count, completed) in [(50u32, 50u32), (40, 23), (0, 17)] {
            let sqes: Vec<_> = (next..next + count).map(nop).collect();
            assert_eq!(q.submit(&sqes).unwrap(), count as usize);
            next += count;
            let first = q.counters().1;
            let tags: Vec<u32> = (first..first + completed).collect();
            f.complete(0, &tags);
            out.clear();
            assert_eq!(q.poll(&mut out).unwrap(), completed as usize);
            assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), tags);
            assert_eq!(q.poll(&mut out).unwrap(), 0, "nothing more is ready");
        }
        assert_eq!(q.counters(), (90, 90));
        assert_eq!(q.outstanding(), 0);
    }

    #[test]
    fn out_of_order_completions_are_matched_by_tag() {
        let (f, d, pool) = fake::setup(Mode::Reverse);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let data = pool.alloc(64 * 10, 64).unwrap();
        let jobs: Vec<_> = (0..10).map(|i| fill_job(data.addr(), i)).collect();
        let done = q.run_batch(&jobs).unwrap();
        assert_eq!(
            done.iter().map(|c| c.tag).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        let bytes = data.to_vec(640).unwrap();
        for i in 0..10 {
            assert!(bytes[i * 64..(i + 1) * 64].iter().all(|&b| b == i as u8));
        }
        assert!(f.max_in_flight(0) <= 4);
        assert_eq!(f.cq_overflows(), 0);
        assert_eq!(q.outstanding(), 0);

        // Manual order through poll as well.
        f.set_mode(Mode::Manual);
        let sqes: Vec<_> = (0..4)
            .map(|t| JobSpec::new(Opcode::Nop).to_sqe(100 + t))
            .collect();
        q.submit(&sqes).unwrap();
        f.complete(0, &[102, 100, 103, 101]);
        let mut out = Vec::new();
        q.poll(&mut out).unwrap();
        assert_eq!(
            out.iter().map(|c| c.tag).collect::<Vec<_>>(),
            vec![102, 100, 103, 101]
        );
    }

    /// A queue let go mid-run (past a wrap, jobs outstanding) and adopted
    /// again goes on where it was: the outstanding jobs' completions are
    /// read once, in the right phase, and new jobs go on; adopting rings
    /// the device does not run is refused.
    #[test]
    fn a_detached_queue_is_adopted_at_its_cursor() {
        let (f, d, pool) = fake::setup(Mode::Manual);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let nop = |t| JobSpec::new(Opcode::Nop).to_sqe(t);
        let mut out = Vec::new();
        q.submit(&[nop(0), nop(1), nop(2)]).unwrap();
        f.complete(0, &[0, 1, 2]);
        q.poll(&mut out).unwrap();
        q.submit(&[nop(3), nop(4), nop(5)]).unwrap();
        f.complete(0, &[3]);
        let cursor = q.detach();
        assert_eq!(
            cursor,
            QueueCursor {
                sq_tail: 6,
                cq_head: 3
            }
        );
        assert!(f.queue_enabled(0), "detach leaves the device alone");
        assert!(d.adopt_queue(0, 8, ALL_OPS, &pool, cursor).is_err());
        let mut q = d.adopt_queue(0, 4, ALL_OPS, &pool, cursor).unwrap();
        assert_eq!(q.outstanding(), 3);
        f.complete(0, &[4, 5]);
        out.clear();
        q.poll(&mut out).unwrap();
        assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), [3, 4, 5]);
        q.submit(&[nop(6)]).unwrap();
        f.complete(0, &[6]);
        out.clear();
        q.poll(&mut out).unwrap();
        assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), [6]);
    }

    #[test]
    fn run_batch_fills_a_deep_ring_with_one_doorbell() {
        let (f, d, pool) = fake::setup(Mode::InOrder);
        let mut q = d.queue(1, 8, ALL_OPS, &pool).unwrap();
        let jobs = vec![JobSpec::new(Opcode::Nop); 5];
        assert_eq!(q.run_batch(&jobs).unwrap().len(), 5);
        assert_eq!(f.doorbells(1), 1);
        assert_eq!(q.doorbells_rung(), 1);
    }

    #[test]
    fn doorbell_suppressed_while_device_polls() {
        let (f, d, pool) = fake::setup(Mode::InOrder);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        f.set_no_doorbell(0, true);
        q.submit(&[JobSpec::new(Opcode::Nop).to_sqe(7)]).unwrap();
        assert_eq!(f.doorbells(0), 0);
        assert_eq!(q.doorbells_rung(), 0);
        f.fetch(0);
        assert_eq!(q.device_sq_head().unwrap(), 1);
        f.complete(0, &[7]);
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out).unwrap(), 1);
        f.set_no_doorbell(0, false);
        q.submit(&[JobSpec::new(Opcode::Nop).to_sqe(8)]).unwrap();
        assert_eq!(f.doorbells(0), 1);
    }

    #[test]
    fn wait_times_out_and_idle_wait_returns_at_once() {
        let (_f, d, pool) = fake::setup(Mode::Manual);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let mut out = Vec::new();
        assert_eq!(q.wait(&mut out, Duration::from_secs(100)).unwrap(), 0);
        q.submit(&[JobSpec::new(Opcode::Nop).to_sqe(0)]).unwrap();
        let e = q.wait(&mut out, Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(e, DriverError::Timeout { outstanding: 1, waited } if waited >= Duration::from_millis(20))
        );
        assert!(matches!(
            q.run_batch(&[JobSpec::new(Opcode::Nop)]),
            Err(DriverError::NotIdle { outstanding: 1 })
        ));
    }

    #[test]
    fn spurious_and_unknown_completions_are_errors() {
        let (_f, d, pool) = fake::setup(Mode::TagOffset(1000));
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let e = q.run_batch(&[JobSpec::new(Opcode::Nop)]).unwrap_err();
        assert!(matches!(e, DriverError::UnexpectedTag { tag: 1000 }));

        let (f2, d2, pool2) = fake::setup(Mode::Manual);
        let mut q2 = d2.queue(0, 4, ALL_OPS, &pool2).unwrap();
        f2.inject(0, 5);
        let mut out = Vec::new();
        assert!(matches!(
            q2.poll(&mut out),
            Err(DriverError::SpuriousCompletion { tag: 5 })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn failed_jobs_keep_their_status() {
        let (_f, d, pool) = fake::setup(Mode::InOrder);
        let mut q = d.queue(0, 4, Opcode::Nop.bit(), &pool).unwrap();
        let done = q
            .run_batch(&[JobSpec::new(Opcode::Nop), JobSpec::new(Opcode::Copy)])
            .unwrap();
        assert_eq!(done[0].status, JobStatus::Ok.code());
        assert_eq!(done[1].status, JobStatus::OpNotAllowed.code());
        assert_eq!(
            crate::check(&done[1]).unwrap_err().job_status(),
            Some(JobStatus::OpNotAllowed)
        );
    }
}
