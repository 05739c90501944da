//! One enabled queue: a worker thread that reads submissions from the ring in
//! guest memory, checks each descriptor, hands jobs to the accelerator's
//! queue pair and writes completions back with the phase bit.
//!
//! The ring indexes live in guest memory. The doorbell is only a wake-up
//! hint: while the worker has work in flight it sets `IDX_FLAG_NO_DOORBELL`
//! and re-reads `sq_tail` after every completion, so a busy queue runs
//! without a single trap. Before it sleeps it clears the flag, fences and
//! reads `sq_tail` once more (the virtio/NVMe shadow-doorbell handshake).
//!
//! Deep queues are collected in naps rather than per completion: while the
//! engine holds a long backlog, the worker sleeps on a timer for about a
//! quarter of the backlog's estimated run time instead of blocking on the completion
//! channel. The engine then sends its results without waking anyone (no
//! futex wake, no cross-CPU IPI per job) and the worker wakes once per many
//! jobs. See [`Pace`].
//!
//! Who goes first is not the worker's business: the queue pair may take
//! only part of a batch (the QoS scheduler above the engines holds back an
//! instance over its share, rate or cap). What it does not take is put back
//! in the ring unpublished (`SqCursor`) and offered again when the queue
//! pair's wake-up says there is room.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, select};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, VolatileSlice};
use wdvirt_abi::{
    CQE_PHASE, CQE_SIZE, CompletionEntry, IDX_FLAG_NO_DOORBELL, JobStatus, Opcode, SQE_SIZE,
    SubmissionEntry, idx,
};

use super::journal::{JournalCounts, QueueJournal};
pub use super::state::{HeldCompletion, PendingJob, RingState};
use crate::accel::{AddressSpace, GuestMemory, Job, JobResult, QueuePair};
use crate::stats::{QueueStats, add};
use crate::vdev::function::InterruptSink;

/// A queue's programmed configuration, frozen when it is enabled. It is
/// also the queue's register part of the migration state
/// ([`super::state::QueueState`]): every field is checked again on restore
/// as its register write checks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub sq_base: u64,
    pub cq_base: u64,
    pub idx_base: u64,
    pub depth: u32,
    pub ops: u32,
    pub vector: u32,
    pub coalesce: u32,
}

impl QueueConfig {
    /// Power-on values: nothing programmed, no interrupt vector.
    pub fn reset() -> QueueConfig {
        QueueConfig {
            vector: wdvirt_abi::regs::NO_VECTOR,
            ..QueueConfig::default()
        }
    }
    /// The guest memory the queue itself occupies: SQ, CQ, index block.
    pub fn ring_ranges(&self) -> [(u64, u64); 3] {
        [
            (self.sq_base, self.depth as u64 * SQE_SIZE as u64),
            (self.cq_base, self.depth as u64 * CQE_SIZE as u64),
            (self.idx_base, idx::SIZE),
        ]
    }
    fn overlaps_ring(&self, addr: u64, len: u64) -> bool {
        self.ring_ranges()
            .iter()
            .any(|&(b, l)| overlaps(addr, len, b, l))
    }
}

pub fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen != 0 && blen != 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// The command register's Bus Master Enable bit as the queue workers see
/// it. Every pass that touches guest memory holds a read guard, so clearing
/// the bit waits for the passes in progress: once the config write that
/// cleared it is answered, no worker reads or writes guest memory.
#[derive(Debug, Default)]
pub struct BusMaster(parking_lot::RwLock<bool>);

impl BusMaster {
    pub fn set(&self, on: bool) {
        *self.0.write() = on;
    }
    pub fn is_on(&self) -> bool {
        *self.0.read()
    }
    /// A guard for one pass of DMA, or `None` while bus mastering is off.
    pub fn pass(&self) -> Option<parking_lot::RwLockReadGuard<'_, bool>> {
        let g = self.0.read();
        if *g { Some(g) } else { None }
    }
}

/// `len` bytes of guest memory at `base`, as a ring or one of its entries
/// is used: one slice of the map, found once, when they lie in one region;
/// else the map itself, piece by piece (a ring across two regions).
struct InGuest<'a> {
    mem: &'a GuestMemory,
    base: u64,
    slice: Option<VolatileSlice<'a, BS<'a, AtomicBitmap>>>,
}

impl<'a> InGuest<'a> {
    fn new(mem: &'a GuestMemory, base: u64, len: usize) -> Self {
        let slice = mem.get_slice(GuestAddress(base), len).ok();
        InGuest { mem, base, slice }
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> bool {
        match &self.slice {
            Some(s) => s.read_slice(buf, offset).is_ok(),
            None => self.mem.read_slice(buf, self.at(offset)).is_ok(),
        }
    }

    fn write(&self, offset: usize, bytes: &[u8]) -> bool {
        match &self.slice {
            Some(s) => s.write_slice(bytes, offset).is_ok(),
            None => self.mem.write_slice(bytes, self.at(offset)).is_ok(),
        }
    }

    /// A release store (the phase bit's word).
    fn store(&self, offset: usize, v: u16) -> bool {
        match &self.slice {
            Some(s) => s.store(v, offset, Ordering::Release).is_ok(),
            None => self
                .mem
                .store(v, self.at(offset), Ordering::Release)
                .is_ok(),
        }
    }

    fn at(&self, offset: usize) -> GuestAddress {
        GuestAddress(self.base + offset as u64)
    }
}

/// What one pass of the worker completes into: the completion ring, found
/// in the map once, and the latency clock, read once (after the pass's jobs
/// ran).
struct CqPass<'a> {
    ring: InGuest<'a>,
    now: u32,
}

/// How long stopping a queue waits for jobs already running on an engine
/// (queued ones are discarded at once). Well inside QEMU's 5 s reply timeout.
const DRAIN_BUDGET: Duration = Duration::from_secs(2);

/// How long parking a queue (a migration's quiesce) waits for every job the
/// queue pair has taken to complete and its completion to be written. All
/// queues of a device are parked together, so this bounds the whole
/// quiesce; past it the quiesce fails (`EBUSY`) and the queues run on.
/// Well inside the 5 s a VMM waits for a reply.
pub const PARK_BUDGET: Duration = Duration::from_secs(2);

/// The completion of an entry that did not run.
fn failed(sqe: &SubmissionEntry, slot: u32, status: JobStatus) -> JobResult {
    JobResult {
        cookie: sqe.tag as u64,
        slot,
        status,
        bytes: 0,
        result: 0,
        stream_end: false,
    }
}

/// The submission entry a job was checked from.
fn entry_of(job: &Job) -> SubmissionEntry {
    SubmissionEntry {
        opcode: job.op as u8,
        tag: job.cookie as u32,
        src: job.src,
        src_len: job.src_len,
        dst: job.dst,
        dst_len: job.dst_len,
        param: job.param,
        ctx: job.ctx,
        ..SubmissionEntry::default()
    }
}

/// A queue whose worker has stopped without closing anything: its queue
/// pair, its configuration and its [`RingState`]. Started again by
/// [`QueueRunner::resume`]; dropped, it closes the queue pair.
pub struct Parked {
    pub ctx: WorkerContext,
    /// Jobs the queue pair still holds. 0 after a successful park; more
    /// only when [`PARK_BUDGET`] ran out, and then the queue must run again
    /// so that their results are written.
    pub in_flight: u32,
    /// The thread that ran the queue, waiting to run it again: a resume
    /// (the end of a migration's downtime) then starts no thread.
    pub idle: Option<IdleThread>,
}

/// A queue worker's thread between two runs: it holds nothing and waits
/// for its next [`Worker`]. Dropped, it is told to end and joined, so no
/// thread of an instance outlives it (a resume hands the thread its next
/// run instead, and waits for no exit).
pub struct IdleThread {
    ctl: Option<Sender<Worker>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for IdleThread {
    fn drop(&mut self) {
        // Closing the channel ends the thread once its current run (if
        // any: a queue being halted) is over.
        // A panic there is the worker's, logged where its run's end is
        // awaited (`QueueRunner`), not again here.
        self.ctl.take();
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

impl IdleThread {
    /// Start a thread for the queue and run `worker` on it.
    fn spawn(worker: Worker) -> std::io::Result<IdleThread> {
        let queue = worker.ctx.queue;
        IdleThread::start(queue, Some(worker))
    }

    /// A thread for queue `queue` that waits for its first run.
    pub fn spare(queue: u32) -> std::io::Result<IdleThread> {
        IdleThread::start(queue, None)
    }

    fn start(queue: u32, first: Option<Worker>) -> std::io::Result<IdleThread> {
        let (ctl, next) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name(format!("wd-queue-{queue}"))
            .spawn(move || serve(first, next))?;
        Ok(IdleThread {
            ctl: Some(ctl),
            thread: Some(thread),
        })
    }

    /// Run `worker` on this thread, or on a new one if this one is gone.
    fn run(self, worker: Worker) -> std::io::Result<IdleThread> {
        let ctl = self.ctl.as_ref().expect("only drop takes the channel");
        match ctl.send(worker) {
            Ok(()) => Ok(self),
            Err(crossbeam_channel::SendError(worker)) => IdleThread::spawn(worker),
        }
    }
}

/// A queue worker thread's life: run the queue (`first`, or the first one
/// sent); once parked, wait for the next run (a resume) or for the end
/// (the parked queue dropped).
fn serve(first: Option<Worker>, next: Receiver<Worker>) {
    let mut worker = match first {
        Some(w) => w,
        None => match next.recv() {
            Ok(w) => w,
            Err(_) => return,
        },
    };
    loop {
        let done = worker.done.clone();
        let parked = worker.run();
        let again = parked.is_some();
        let _ = done.send(parked);
        if !again {
            return;
        }
        match next.recv() {
            Ok(w) => worker = w,
            Err(_) => return,
        }
    }
}

/// State a queue shares with the device's register file.
#[derive(Debug, Default)]
pub struct QueueShared {
    pub stats: QueueStats,
    /// `Q_COMPLETED`.
    pub completed: AtomicU32,
}

/// What the worker needs from its instance.
pub struct WorkerContext {
    pub queue: u32,
    pub config: QueueConfig,
    pub max_xfer: u32,
    pub space: AddressSpace,
    pub qp: Box<dyn QueuePair>,
    pub irq: Arc<dyn InterruptSink>,
    pub bus_master: Arc<BusMaster>,
    pub shared: Arc<QueueShared>,
    /// Set by the device once it has cleared the queue's completion ring and
    /// its half of the index block ([`clear_rings`]). The worker does no DMA
    /// before: the clear must be done before `Q_STATUS` shows ENABLED (or,
    /// with Bus Master clear at enable, before setting it returns), never
    /// later by the worker, or a driver polling at once reads old entries.
    pub rings_ready: Arc<AtomicBool>,
    /// Where the worker starts in the rings: zero for a queue just enabled,
    /// the parked or restored positions otherwise.
    pub ring: RingState,
    /// How long a park may wait ([`PARK_BUDGET`] unless the device says
    /// otherwise).
    pub park_budget: Duration,
    /// Where the worker records its positions and the jobs it took, for a
    /// successor process ([`QueueJournal`]); `None` when nothing outlives
    /// this process.
    pub journal: Option<QueueJournal>,
}

/// Zero the completion ring and the device's half of the index block, so
/// entries left from an earlier run of the same rings can never look new.
/// The device calls it synchronously, while Bus Master is set or being set.
pub fn clear_rings(mem: &GuestMemory, config: &QueueConfig) {
    let cq_bytes = config.depth as usize * CQE_SIZE;
    let zeros = vec![0u8; cq_bytes];
    let _ = mem.write_slice(&zeros, GuestAddress(config.cq_base));
    let at = |field| GuestAddress(config.idx_base + field);
    let _ = mem.store(0u32, at(idx::SQ_HEAD), Ordering::Release);
    let _ = mem.store(0u32, at(idx::FLAGS), Ordering::Release);
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// The device's handle on a running queue.
pub struct QueueRunner {
    stop: Arc<AtomicBool>,
    /// With `stop`: park instead (keep every job, close nothing).
    park: Arc<AtomicBool>,
    wake: Sender<()>,
    /// How the worker's run ended: `Some` parked, `None` stopped.
    done: Receiver<Option<Parked>>,
    thread: Option<IdleThread>,
}

impl QueueRunner {
    /// Start a worker on `ctx`, from `ctx.ring`, on a new thread.
    pub fn start(ctx: WorkerContext, in_flight: u32) -> std::io::Result<QueueRunner> {
        QueueRunner::launch(ctx, in_flight, None)
    }

    /// Run a parked queue again from its positions, on the thread it
    /// parked on if it has one.
    pub fn resume(p: Parked) -> std::io::Result<QueueRunner> {
        QueueRunner::launch(p.ctx, p.in_flight, p.idle)
    }

    /// `in_flight` jobs of the queue pair are already taken (a queue parked
    /// past its budget).
    fn launch(
        ctx: WorkerContext,
        in_flight: u32,
        idle: Option<IdleThread>,
    ) -> std::io::Result<QueueRunner> {
        let stop = Arc::new(AtomicBool::new(false));
        let park = Arc::new(AtomicBool::new(false));
        let (wake, wake_rx) = crossbeam_channel::bounded(1);
        // The scheduler above the engines wakes the worker when a queue pair
        // that refused part of a batch has room again; `room` says that it
        // was this wake-up (and not a completion or a doorbell).
        let room = Arc::new(AtomicBool::new(false));
        let (waker, flag) = (wake.clone(), room.clone());
        ctx.qp.set_wake(Arc::new(move || {
            flag.store(true, Ordering::Release);
            let _ = waker.try_send(());
        }));
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let worker = Worker::new(
            ctx,
            done_tx,
            (stop.clone(), park.clone()),
            wake_rx,
            room,
            in_flight,
        );
        let thread = match idle {
            Some(t) => t.run(worker)?,
            None => IdleThread::spawn(worker)?,
        };
        Ok(QueueRunner {
            stop,
            park,
            wake,
            done,
            thread: Some(thread),
        })
    }

    /// Ask the worker to park without waiting; [`QueueRunner::join_parked`]
    /// then waits. Parking: no submission is fetched any more; every job the
    /// queue pair took completes and its completion is written (within
    /// [`PARK_BUDGET`]); a pending coalesced interrupt is raised; then the
    /// worker ends, closing nothing.
    pub fn signal_park(&self) {
        self.park.store(true, Ordering::Release);
        self.signal_stop();
    }

    /// Wait for a worker told to park; `None` if it panicked. Its thread
    /// stays, idle, in the [`Parked`] queue.
    pub fn join_parked(mut self) -> Option<Parked> {
        self.signal_park();
        match self.done.recv() {
            Ok(Some(mut p)) => {
                p.idle = self.thread.take();
                Some(p)
            }
            // Stopped instead: the thread has ended. Taken here, so that
            // the drop's halt does not wait on a channel whose sender is
            // gone and log a panic that never happened.
            Ok(None) => {
                self.thread.take();
                None
            }
            Err(_) => {
                self.thread.take();
                tracing::error!("queue worker panicked");
                None
            }
        }
    }

    /// A doorbell: wake the worker if it sleeps. Never blocks.
    pub fn ring(&self) {
        let _ = self.wake.try_send(());
    }

    /// Stop the worker (the queue is being disabled or reset): jobs queued for
    /// the engines are discarded, jobs running finish, no result is written.
    pub fn stop(mut self) {
        self.halt();
    }

    /// Ask the worker to stop without waiting; `stop` (or drop) then joins.
    /// Stopping many queues: signal them all first, so they drain together.
    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.try_send(());
    }

    fn halt(&mut self) {
        self.signal_stop();
        if self.thread.take().is_some() {
            // The run's end (a parked queue, if the park came first, is
            // dropped: its queue pair closes); the thread then ends.
            if self.done.recv().is_err() {
                tracing::error!("queue worker panicked");
            }
        }
    }
}

impl Drop for QueueRunner {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Worker {
    ctx: WorkerContext,
    /// Where the run's end goes ([`QueueRunner::done`]).
    done: Sender<Option<Parked>>,
    stop: Arc<AtomicBool>,
    park: Arc<AtomicBool>,
    wake: Receiver<()>,
    /// Where the worker is in the submission ring.
    sq: SqCursor,
    /// The queue pair took fewer jobs than offered on the last pass: wait
    /// for its wake-up before offering again.
    throttled: bool,
    /// Set by the queue pair's wake-up: it has room again.
    room: Arc<AtomicBool>,
    /// One pass's valid jobs, their ring positions, and the entries
    /// refused by the descriptor check (kept to reuse their allocations).
    batch: Vec<Job>,
    job_at: Vec<u32>,
    refused: Vec<(u32, SubmissionEntry, JobResult)>,
    /// Results of jobs the queue pair ran on this thread as it took them
    /// ([`QueuePair::submit_inline`]), to complete at once.
    ran: Vec<JobResult>,
    /// Completions written (free-running).
    cq_tail: u32,
    /// Per slot (`position % depth`): a job of that slot is taken and not
    /// yet completed. Completions come in any order, so `depth` jobs
    /// outstanding does not mean the oldest is done: the entry a ring's
    /// length after a job still running waits for it, keeping each slot
    /// (and its journal record) one job's.
    open: Vec<bool>,
    in_flight: u32,
    /// Results held back while bus mastering is off.
    held: Vec<JobResult>,
    /// Jobs taken that no engine started, given back at a park (here or on
    /// the source), with their journal slots: submitted again before the
    /// ring is read.
    pending: std::collections::VecDeque<(SubmissionEntry, u32)>,
    /// Completions since the last interrupt, and when the oldest arrived.
    irq_pending: u32,
    irq_since: Option<Instant>,
    /// The engine's measured pace, for sizing naps.
    pace: Pace,
}

/// Most submissions read in one pass (one batch offered to the engines).
const FETCH_BATCH: u32 = 256;

/// The worker's position in the submission ring. Entries are popped without
/// the guest seeing it; [`SqCursor::undo_pop`] puts the newest back
/// (Firecracker's `Queue::undo_pop`), and only [`SqCursor::publish`] says
/// how far `sq_head` goes, so a batch the engines do not take now stays in
/// the ring, queued as far as the guest (or a snapshot of the queue) can tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SqCursor {
    /// `sq_head` as last published (free-running).
    published: u32,
    /// The next entry to read (free-running).
    next: u32,
}

impl SqCursor {
    /// Take the next entry's position.
    fn pop(&mut self) -> u32 {
        let pos = self.next;
        self.next = self.next.wrapping_add(1);
        pos
    }

    /// Entries popped since the last publish.
    fn popped(&self) -> u32 {
        self.next.wrapping_sub(self.published)
    }

    /// Put back the `n` newest entries popped (never past the published head).
    fn undo_pop(&mut self, n: u32) {
        self.next = self.next.wrapping_sub(n.min(self.popped()));
    }

    /// Whether `pos` was popped since the last publish and not put back.
    fn holds(&self, pos: u32) -> bool {
        pos.wrapping_sub(self.published) < self.popped()
    }

    /// The new `sq_head` to write, if it moved.
    fn publish(&mut self) -> Option<u32> {
        (self.popped() > 0).then(|| {
            self.published = self.next;
            self.next
        })
    }
}

/// Completions per sample of the engine's speed.
const ESTIMATE_WINDOW: u32 = 16;

/// Naps are taken only with at least this many jobs with the engine: a
/// shallow queue is latency-bound and keeps one wake-up per completion.
const NAP_MIN_IN_FLIGHT: u32 = 8;
/// Shortest nap worth taking. A timer wake-up comes up to 50 µs late (the
/// kernel's default timer slack) and the engine must not run dry meanwhile:
/// with naps of a quarter of the backlog, this means naps only for backlogs
/// of at least 800 µs (deflate of 4 KiB and up at depth 256; not tiny copies,
/// whose completions are always waiting anyway).
const NAP_MIN: Duration = Duration::from_micros(200);
/// Longest nap: bounds the delay a completion can see.
const NAP_MAX: Duration = Duration::from_millis(1);

impl Worker {
    fn new(
        mut ctx: WorkerContext,
        done: Sender<Option<Parked>>,
        (stop, park): (Arc<AtomicBool>, Arc<AtomicBool>),
        wake: Receiver<()>,
        room: Arc<AtomicBool>,
        in_flight: u32,
    ) -> Worker {
        let ring = std::mem::take(&mut ctx.ring);
        let depth = ctx.config.depth.max(1);
        // Every job the queue holds gets a position before `sq_head`, and
        // with it a journal slot (held results first).
        let positions = match &ctx.journal {
            Some(j) => {
                let stats = ctx.shared.stats.snapshot();
                let counts = JournalCounts {
                    completed: ctx.shared.completed.load(Ordering::Relaxed),
                    jobs_ok: stats.jobs_ok,
                    jobs_failed: stats.jobs_failed,
                    bytes_out: stats.bytes_out,
                };
                j.start(depth, &ring, counts, &ctx.space.memory())
            }
            None => (0..(ring.held.len() + ring.pending.len()) as u32)
                .map(|i| ring.cq_tail.wrapping_add(i))
                .collect(),
        };
        let mut slots = positions.iter().map(|p| p % depth);
        let held = ring
            .held
            .iter()
            .zip(slots.by_ref())
            .filter_map(|(h, slot)| h.result().map(|r| JobResult { slot, ..r }))
            .collect();
        let pending: std::collections::VecDeque<(SubmissionEntry, u32)> = ring
            .pending
            .iter()
            .zip(slots)
            .map(|(p, slot)| (p.entry(), slot))
            .collect();
        let mut open = vec![false; depth as usize];
        for &p in &positions {
            open[(p % depth) as usize] = true;
        }
        Worker {
            ctx,
            done,
            stop,
            park,
            wake,
            sq: SqCursor {
                published: ring.sq_head,
                next: ring.sq_head,
            },
            throttled: false,
            room,
            batch: Vec::new(),
            job_at: Vec::new(),
            refused: Vec::new(),
            ran: Vec::new(),
            cq_tail: ring.cq_tail,
            open,
            in_flight,
            held,
            pending,
            irq_pending: ring.irq_pending,
            irq_since: (ring.irq_pending > 0).then(Instant::now),
            pace: Pace::default(),
        }
    }

    /// Account for `n` completions just taken from the engine.
    fn collected(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        // A backend that reports more completions than jobs is a bug; do
        // not let it wrap the count.
        if n > self.in_flight {
            tracing::error!(
                queue = self.ctx.queue,
                n,
                in_flight = self.in_flight,
                "more completions than jobs"
            );
        }
        let n = n.min(self.in_flight);
        self.in_flight -= n;
        self.pace.collected(n, self.in_flight, Instant::now());
    }

    fn idx_addr(&self, field: u64) -> GuestAddress {
        GuestAddress(self.ctx.config.idx_base + field)
    }

    fn load_idx(&self, mem: &GuestMemory, field: u64) -> u32 {
        mem.load(self.idx_addr(field), Ordering::Acquire)
            .unwrap_or(self.sq.next)
    }

    fn store_idx(&self, mem: &GuestMemory, field: u64, v: u32) {
        let _ = mem.store(v, self.idx_addr(field), Ordering::Release);
    }

    fn run(mut self) -> Option<Parked> {
        while !self.stop.load(Ordering::Acquire) {
            if self.step() {
                continue;
            }
            // Throttled: the queue pair's wake-up (or a doorbell, or a
            // completion) ends the sleep; the doorbell stays suppressed.
            if self.in_flight == 0 && !self.throttled && self.arm_doorbell() {
                continue;
            }
            self.sleep();
        }
        if self.park.load(Ordering::Acquire) {
            return Some(self.settle());
        }
        self.drain();
        let dropped = self.in_flight as u64 + self.held.len() as u64 + self.pending.len() as u64;
        self.ctx.shared.stats.dropped(dropped);
        if let Some(j) = &self.ctx.journal {
            j.clear();
        }
        None
    }

    /// Parking: fetch nothing more; wait (within [`PARK_BUDGET`]) for every
    /// job the queue pair took and write its completion; raise the
    /// interrupt those completions are owed; hand back the queue as it
    /// stands. `sq_head` was published only for entries taken (what a
    /// throttled batch left is back in the ring, unpublished), so nothing
    /// between `sq_head` and the guest's `sq_tail` was read for good.
    fn settle(mut self) -> Parked {
        let deadline = Instant::now() + self.ctx.park_budget;
        // Jobs a scheduler still holds move with the queue rather than
        // being waited for (a rate-limited instance may hold many).
        let back = self.ctx.qp.withdraw();
        self.in_flight = self.in_flight.saturating_sub(back.len() as u32);
        self.pending
            .extend(back.iter().map(|j| (entry_of(j), j.slot)));
        loop {
            let mut n = 0;
            while let Ok(r) = self.ctx.qp.completions().try_recv() {
                n += 1;
                self.held.push(r);
            }
            self.collected(n);
            let bus_master = self.ctx.bus_master.clone();
            if let Some(_dma) = bus_master.pass()
                && self.initialised()
                && !self.held.is_empty()
            {
                let mem = self.ctx.space.memory();
                let cq = self.cq_pass(&mem);
                for r in std::mem::take(&mut self.held) {
                    self.complete(&cq, r);
                }
            }
            if self.in_flight == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    queue = self.ctx.queue,
                    in_flight = self.in_flight,
                    "queue did not settle within the park budget"
                );
                break;
            }
            if let Ok(r) = self
                .ctx
                .qp
                .completions()
                .recv_timeout(left.min(Duration::from_millis(10)))
            {
                self.held.push(r);
                self.collected(1);
            }
        }
        // After this the queue raises nothing until it runs again. With bus
        // mastering off the interrupt stays owed (`irq_pending`).
        self.flush_interrupt();
        let ring = RingState {
            sq_head: self.sq.published,
            cq_tail: self.cq_tail,
            irq_pending: self.irq_pending,
            held: self.held.iter().map(HeldCompletion::of).collect(),
            pending: self
                .pending
                .iter()
                .map(|(e, _)| PendingJob::of(e))
                .collect(),
        };
        let in_flight = self.in_flight;
        let mut ctx = self.ctx;
        ctx.ring = ring;
        Parked {
            ctx,
            in_flight,
            idle: None,
        }
    }

    /// Whether the worker can take another submission now: an entry is
    /// waiting and there is room for its completion (a driver that outruns
    /// `depth` stalls its own queue until its next doorbell).
    fn can_fetch(&self, tail: u32, cq_head: u32) -> bool {
        let head = self.sq.next;
        tail != head && head.wrapping_sub(cq_head) < self.ctx.config.depth
    }

    /// Whether the device has cleared the rings (see
    /// [`WorkerContext::rings_ready`]); no DMA happens before.
    fn initialised(&self) -> bool {
        self.ctx.rings_ready.load(Ordering::Acquire)
    }

    /// One pass: completions, then submissions. Returns whether anything moved.
    fn step(&mut self) -> bool {
        let mut n = 0;
        while let Ok(r) = self.ctx.qp.completions().try_recv() {
            n += 1;
            self.held.push(r);
        }
        self.collected(n);
        let bus_master = self.ctx.bus_master.clone();
        let Some(_dma) = bus_master.pass() else {
            return false;
        };
        if !self.initialised() {
            return false;
        }
        let mem = self.ctx.space.memory();
        let mut progressed = false;
        if !self.held.is_empty() {
            let cq = self.cq_pass(&mem);
            for r in std::mem::take(&mut self.held) {
                self.complete(&cq, r);
            }
            progressed = true;
        }
        // A throttled queue reads its ring again only once the queue pair
        // said it has room (about half its jobs waiting went to the
        // engines), not on every completion or nap: the refused entries
        // would only be read, checked and refused again.
        if !self.throttled || self.room.swap(false, Ordering::AcqRel) {
            progressed |= self.fetch(&mem);
        }
        self.maybe_interrupt(false);
        progressed
    }

    /// Read and check new submissions and offer the valid ones as one batch.
    /// What the queue pair does not take is put back in the ring
    /// ([`SqCursor::undo_pop`]): `sq_head` is published only for entries
    /// taken (or refused with an error CQE), so a throttled batch is read
    /// again on a later pass, and the guest sees it still queued.
    fn fetch(&mut self, mem: &GuestMemory) -> bool {
        if !self.pending.is_empty() {
            return self.resubmit(mem);
        }
        let depth = self.ctx.config.depth;
        let tail = self.load_idx(mem, idx::SQ_TAIL);
        let cq_head = self.load_idx(mem, idx::CQ_HEAD);
        let head_before = self.sq.published;
        let mut batch = std::mem::take(&mut self.batch);
        // Ring positions of the batch's jobs, and the refused entries.
        let mut job_at = std::mem::take(&mut self.job_at);
        let mut refused = std::mem::take(&mut self.refused);
        batch.clear();
        job_at.clear();
        refused.clear();
        // Never more than `depth` entries taken and not completed, whatever
        // the guest says of `cq_head`: each has a journal slot of its own.
        // The ring found in the map once per pass (a ring split between
        // two regions is read entry by entry).
        let ring = InGuest::new(mem, self.ctx.config.sq_base, depth as usize * SQE_SIZE);
        while self.sq.next != tail
            && self.sq.next.wrapping_sub(cq_head) < depth
            && self.sq.next.wrapping_sub(self.cq_tail) < depth
            && !self.open[(self.sq.next % depth) as usize]
            && self.sq.popped() < FETCH_BATCH
        {
            let pos = self.sq.pop();
            let offset = (pos % depth) as usize * SQE_SIZE;
            let mut raw = [0u8; SQE_SIZE];
            let sqe = if ring.read(offset, &mut raw) {
                SubmissionEntry::from_bytes(&raw)
            } else {
                SubmissionEntry {
                    opcode: 0xff,
                    ..Default::default()
                }
            };
            let slot = pos % depth;
            // Open until it completes (put back below if not taken).
            self.open[slot as usize] = true;
            match check(&sqe, &self.ctx.config, self.ctx.max_xfer, mem) {
                Ok(job) => {
                    batch.push(Job { slot, ..job });
                    job_at.push(pos);
                }
                Err(status) => refused.push((pos, sqe, failed(&sqe, slot, status))),
            }
        }
        if self.sq.popped() == 0 {
            let waiting = tail.wrapping_sub(self.sq.next).min(depth);
            self.ctx.shared.stats.fetched(0, waiting);
            (self.batch, self.job_at, self.refused) = (batch, job_at, refused);
            return false;
        }
        // Every entry is recorded before the queue pair can run it (on
        // this thread, or on an engine that takes it at once) and before
        // the journal's head moves past it: a job as it will run, with the
        // bytes it reads and writes as they were; a refused entry as the
        // error completion it is owed. Records past the head (what the
        // queue pair does not take) are not looked at by a recovery.
        if let Some(j) = &self.ctx.journal {
            for (job, &pos) in batch.iter().zip(&job_at) {
                j.taken(depth, pos, &entry_of(job), mem);
            }
            for (pos, _, r) in &refused {
                j.refused(depth, *pos, r);
            }
        }
        let taken = if batch.is_empty() {
            0
        } else {
            match self.submit(&mut batch) {
                Some(n) => n,
                None => {
                    // Refused whole: each job completes with EngineError,
                    // in ring order with the refused entries.
                    for (job, &pos) in batch.iter().zip(&job_at) {
                        let sqe = entry_of(job);
                        let r = failed(&sqe, job.slot, JobStatus::EngineError);
                        if let Some(j) = &self.ctx.journal {
                            j.refused(depth, pos, &r);
                        }
                        refused.push((pos, sqe, r));
                    }
                    refused.sort_unstable_by_key(|(pos, ..)| pos.wrapping_sub(head_before));
                    batch.clear();
                    0
                }
            }
        };
        self.throttled = taken < batch.len();
        if self.throttled {
            // Back to the first job not taken; entries after it, refused
            // ones included, are read again later.
            let back = self.sq.next.wrapping_sub(job_at[taken]);
            for i in 0..back {
                self.open[(job_at[taken].wrapping_add(i) % depth) as usize] = false;
            }
            self.sq.undo_pop(back);
        }
        if let Some(j) = &self.ctx.journal {
            j.commit_head(self.sq.next);
        }
        let cq = self.cq_pass(mem);
        for (pos, _, r) in refused.drain(..) {
            if self.sq.holds(pos) {
                self.complete(&cq, r);
            }
        }
        self.taken(&batch[..taken]);
        self.complete_ran(&cq, &batch[..taken]);
        (self.batch, self.job_at, self.refused) = (batch, job_at, refused);
        let published = self.sq.publish();
        let head = published.unwrap_or(self.sq.next);
        let advanced = published.map_or(0, |h| h.wrapping_sub(head_before));
        self.ctx
            .shared
            .stats
            .fetched(advanced, tail.wrapping_sub(head).min(depth));
        match published {
            Some(head) => {
                self.store_idx(mem, idx::SQ_HEAD, head);
                true
            }
            None => false,
        }
    }

    /// Offer the jobs given back at a park before anything new from the
    /// ring. Each is checked again, against this queue's memory now (it may
    /// come from another host's stream); one refused completes with the
    /// check's status, as a bad descriptor does.
    fn resubmit(&mut self, mem: &GuestMemory) -> bool {
        let mut kept = std::collections::VecDeque::with_capacity(self.pending.len());
        let mut jobs = Vec::new();
        let mut refused = Vec::new();
        // One batch at a time, each entry checked once: the rest wait,
        // unchecked, behind the ones offered now.
        while jobs.len() < FETCH_BATCH as usize {
            let Some((sqe, slot)) = self.pending.pop_front() else {
                break;
            };
            match check(&sqe, &self.ctx.config, self.ctx.max_xfer, mem) {
                Ok(job) => {
                    jobs.push(Job { slot, ..job });
                    kept.push_back((sqe, slot));
                }
                Err(status) => refused.push(failed(&sqe, slot, status)),
            }
        }
        kept.extend(self.pending.drain(..));
        self.pending = kept;
        if jobs.is_empty() {
            let cq = self.cq_pass(mem);
            let progressed = !refused.is_empty();
            for r in refused {
                self.complete(&cq, r);
            }
            return progressed;
        }
        let taken = self.submit(&mut jobs);
        let cq = self.cq_pass(mem);
        for r in refused {
            self.complete(&cq, r);
        }
        let Some(taken) = taken else {
            self.pending.drain(..jobs.len());
            for j in &jobs {
                self.complete(&cq, failed(&entry_of(j), j.slot, JobStatus::EngineError));
            }
            return true;
        };
        self.pending.drain(..taken);
        self.throttled = taken < jobs.len();
        self.taken(&jobs[..taken]);
        self.complete_ran(&cq, &jobs[..taken]);
        true
    }

    /// Hand `jobs` (stamped for latency) to the queue pair: how many it
    /// took. `None` when it refused the whole batch (its engines are going
    /// away): the caller completes each with `EngineError`. Those it ran
    /// on this thread as it took them wait in `ran`
    /// ([`Worker::complete_ran`], once the taken jobs are accounted).
    fn submit(&mut self, jobs: &mut [Job]) -> Option<usize> {
        self.ctx.shared.stats.stamp(jobs);
        // A wake-up from now on is for what this submit refuses.
        self.room.store(false, Ordering::Release);
        match self.ctx.qp.submit_inline(jobs, &mut self.ran) {
            Ok(n) => Some(n.min(jobs.len())),
            Err(e) => {
                tracing::warn!(queue = self.ctx.queue, "engine refused a batch: {e}");
                None
            }
        }
    }

    /// Account the jobs the queue pair just took.
    fn taken(&mut self, jobs: &[Job]) {
        if jobs.is_empty() {
            return;
        }
        if self.in_flight == 0 {
            self.pace.started(Instant::now());
        }
        self.in_flight += jobs.len() as u32;
        let bytes: u64 = jobs.iter().map(|j| j.src_len as u64).sum();
        add(&self.ctx.shared.stats.bytes_in, bytes);
    }

    /// Complete the jobs the queue pair ran on this thread (of `batch`, the
    /// jobs just taken), after any older job the engines finished since
    /// the pass began: an engine is lent to a queue only when none of its
    /// jobs is on one, and an engine sends a result before it says the job
    /// is done, so every result waiting then that is not of `batch` is
    /// older than what ran here. Those of `batch` (what the queue pair
    /// left to its engines) are newer and wait. With one engine a queue
    /// thus completes in the order it submitted.
    fn complete_ran(&mut self, cq: &CqPass, batch: &[Job]) {
        if self.ran.is_empty() {
            return;
        }
        let mut n = 0;
        let mut newer = Vec::new();
        while let Ok(r) = self.ctx.qp.completions().try_recv() {
            n += 1;
            if batch
                .iter()
                .any(|j| j.slot == r.slot && j.cookie == r.cookie)
            {
                newer.push(r);
            } else {
                self.held.push(r);
            }
        }
        self.collected(n);
        for r in std::mem::take(&mut self.held) {
            self.complete(cq, r);
        }
        self.held = newer;
        let mut ran = std::mem::take(&mut self.ran);
        self.collected(ran.len() as u32);
        for r in ran.drain(..) {
            self.complete(cq, r);
        }
        self.ran = ran;
    }

    /// The completion ring and the clock for a pass's completions.
    fn cq_pass<'a>(&self, mem: &'a GuestMemory) -> CqPass<'a> {
        let cfg = &self.ctx.config;
        CqPass {
            ring: InGuest::new(mem, cfg.cq_base, cfg.depth as usize * CQE_SIZE),
            now: crate::stats::latency::now(),
        }
    }

    /// Write one CQE: body first, then (after a release fence) the flags word
    /// carrying the phase bit, so a driver that sees the phase sees the body.
    fn complete(&mut self, cq: &CqPass, r: JobResult) {
        let depth = self.ctx.config.depth;
        if let Some(open) = self.open.get_mut(r.slot as usize) {
            *open = false;
        }
        let slot = (self.cq_tail % depth) as u64;
        let phase = if (self.cq_tail / depth).is_multiple_of(2) {
            CQE_PHASE
        } else {
            0
        };
        let end = if r.stream_end {
            wdvirt_abi::CQE_STREAM_END
        } else {
            0
        };
        let flags = phase | end;
        // The body goes in as one write whose flags still carry the last
        // pass's phase (the guest sees the entry as not yet written), then
        // the flags with this pass's phase.
        let cqe = CompletionEntry {
            tag: r.cookie as u32,
            status: r.status.code(),
            flags: phase ^ CQE_PHASE,
            bytes: r.bytes,
            result: r.result,
        };
        let at = slot as usize * CQE_SIZE;
        if let Some(j) = &self.ctx.journal {
            j.completing(r.slot, self.cq_tail);
        }
        let ring = &cq.ring;
        let body = ring.write(at, &cqe.to_bytes());
        // Q_COMPLETED counts the entry before the guest can see it, so a
        // driver that has seen an entry reads a count that includes it.
        let published = body && {
            self.ctx.shared.completed.fetch_add(1, Ordering::Release);
            std::sync::atomic::fence(Ordering::Release);
            let stored = ring.store(at + 6, flags);
            if !stored {
                self.ctx.shared.completed.fetch_sub(1, Ordering::Release);
            }
            stored
        };
        if !published {
            // The guest can never see it finish: dropped, not done. (Its
            // journal record stays: a successor runs it again.)
            if let Some(j) = &self.ctx.journal {
                j.not_completing();
            }
            self.ctx.shared.stats.dropped(1);
            tracing::debug!(queue = self.ctx.queue, "completion entry not written");
            return;
        }
        self.cq_tail = self.cq_tail.wrapping_add(1);
        if let Some(j) = &self.ctx.journal {
            let completed = self.ctx.shared.completed.load(Ordering::Relaxed);
            j.completed(r.slot, self.cq_tail, completed, &r);
        }
        self.ctx.shared.stats.completed(&r, cq.now);
        if self.irq_pending == 0 {
            self.irq_since = Some(Instant::now());
        }
        self.irq_pending += 1;
    }

    /// Coalescing: fire when `count` completions are pending, or when the
    /// oldest has waited `delay`, or (`flush`) whenever anything is pending.
    fn maybe_interrupt(&mut self, flush: bool) {
        let vector = self.ctx.config.vector;
        if self.irq_pending == 0 || vector == wdvirt_abi::regs::NO_VECTOR {
            self.irq_pending = 0;
            return;
        }
        let (count, delay) = coalesce(self.ctx.config.coalesce);
        // A delay of 0 means "no timer": count, or running out of work.
        let due = !delay.is_zero() && self.irq_since.is_some_and(|t| t.elapsed() >= delay);
        if flush || self.irq_pending >= count || due || self.in_flight == 0 && delay.is_zero() {
            self.ctx.irq.msix(vector as u16);
            add(&self.ctx.shared.stats.interrupts, 1);
            self.irq_pending = 0;
            self.irq_since = None;
        }
    }

    /// The coalescing timer fired: raise the pending interrupt, unless bus
    /// mastering is off (an MSI is a memory write too); it stays pending.
    fn flush_interrupt(&mut self) {
        let bus_master = self.ctx.bus_master.clone();
        if let Some(_dma) = bus_master.pass() {
            self.maybe_interrupt(true);
        }
    }

    /// Clear NO_DOORBELL, fence, look once more: did work arrive meanwhile?
    /// (With bus mastering off, nothing is touched: enabling it rings us.)
    /// Only work that can really be fetched counts: a full completion ring
    /// leaves the doorbell armed, or a hostile `cq_head` would spin us.
    /// Returns whether work can be fetched.
    fn arm_doorbell(&mut self) -> bool {
        let bus_master = self.ctx.bus_master.clone();
        let Some(_dma) = bus_master.pass() else {
            return false;
        };
        if !self.initialised() {
            return false;
        }
        let mem = self.ctx.space.memory();
        self.store_idx(&mem, idx::FLAGS, 0);
        std::sync::atomic::fence(Ordering::SeqCst);
        let tail = self.load_idx(&mem, idx::SQ_TAIL);
        let cq_head = self.load_idx(&mem, idx::CQ_HEAD);
        let ready = self.can_fetch(tail, cq_head);
        if ready {
            self.store_idx(&mem, idx::FLAGS, IDX_FLAG_NO_DOORBELL);
        }
        ready
    }

    fn sleep(&mut self) {
        let delay = coalesce(self.ctx.config.coalesce).1;
        let timeout = match (self.irq_pending, self.irq_since) {
            // (With bus mastering off the interrupt waits: setting it rings us.)
            (n, Some(t)) if n > 0 && !delay.is_zero() && self.ctx.bus_master.is_on() => {
                delay.saturating_sub(t.elapsed())
            }
            _ => Duration::from_secs(3600),
        };
        if self.in_flight == 0 {
            add(&self.ctx.shared.stats.sleeps, 1);
        }
        if let Some(nap) = self.pace.nap(self.in_flight) {
            // Not registered on the completion channel: the engine's sends
            // wake nobody. A doorbell or `stop` still ends the nap at once.
            if let Err(RecvTimeoutError::Timeout) = self.wake.recv_timeout(nap.min(timeout))
                && nap >= timeout
            {
                self.flush_interrupt();
            }
        } else {
            let completions = self.ctx.qp.completions().clone();
            select! {
                recv(self.wake) -> _ => {}
                recv(completions) -> r => if let Ok(r) = r {
                    self.held.push(r);
                    self.collected(1);
                },
                default(timeout) => self.flush_interrupt(),
            }
        }
        let bus_master = self.ctx.bus_master.clone();
        if let Some(_dma) = bus_master.pass()
            && self.initialised()
        {
            let mem = self.ctx.space.memory();
            self.store_idx(&mem, idx::FLAGS, IDX_FLAG_NO_DOORBELL);
        }
    }

    /// Close the queue pair (jobs no engine has started are dropped unrun)
    /// and wait, within a budget, for the jobs engines are running, so none
    /// writes guest memory after the queue is gone.
    fn drain(&mut self) {
        self.ctx.qp.close();
        let deadline = Instant::now() + DRAIN_BUDGET;
        while self.ctx.qp.running() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    queue = self.ctx.queue,
                    running = self.ctx.qp.running(),
                    "engine did not drain in time"
                );
                break;
            }
            let _ = self
                .ctx
                .qp
                .completions()
                .recv_timeout(left.min(Duration::from_millis(10)));
        }
    }
}

/// The engine's pace as the worker sees it: time per completion while the
/// engine was busy throughout, averaged over windows of
/// [`ESTIMATE_WINDOW`] completions (one completion may arrive at any phase of
/// an interval, so single intervals say little).
#[derive(Debug, Default)]
struct Pace {
    /// Exponential average of the windows' time per completion.
    per_job: Option<Duration>,
    /// Start of the current window (`None`: the engine has nothing of ours).
    mark: Option<Instant>,
    /// Completions collected in the current window.
    jobs: u32,
}

impl Pace {
    /// A batch went to an engine that had nothing of ours.
    fn started(&mut self, now: Instant) {
        (self.mark, self.jobs) = (Some(now), 0);
    }

    /// `n` completions collected at `now`, leaving `in_flight` with the engine.
    fn collected(&mut self, n: u32, in_flight: u32, now: Instant) {
        let Some(t) = self.mark else {
            return;
        };
        if in_flight == 0 {
            // The engine ran dry, perhaps long before `now`: this window
            // measures nothing, and a nap may have been too long. Halve the
            // estimate so that it is not repeated.
            self.per_job = self.per_job.map(|avg| avg / 2);
            (self.mark, self.jobs) = (None, 0);
            return;
        }
        self.jobs += n;
        if self.jobs >= ESTIMATE_WINDOW {
            let sample = now.saturating_duration_since(t) / self.jobs;
            self.per_job = Some(match self.per_job {
                Some(avg) => (avg * 3 + sample) / 4,
                None => sample,
            });
            (self.mark, self.jobs) = (Some(now), 0);
        }
    }

    /// How long the worker may sleep with `in_flight` jobs at the engine
    /// without starving it: a quarter of the backlog's estimated run time, at
    /// most [`NAP_MAX`]. `None` (block on the completion channel) for a
    /// shallow queue, a nap under [`NAP_MIN`], or no estimate yet.
    fn nap(&self, in_flight: u32) -> Option<Duration> {
        if in_flight < NAP_MIN_IN_FLIGHT {
            return None;
        }
        let nap = (self.per_job? * (in_flight / 4)).min(NAP_MAX);
        (nap >= NAP_MIN).then_some(nap)
    }
}

/// `Q_IRQ_COALESCE` → (completions per interrupt, longest delay).
pub fn coalesce(reg: u32) -> (u32, Duration) {
    let count = (reg & 0xffff).max(1);
    (count, Duration::from_micros((reg >> 16) as u64))
}

/// A stream piece's `param`: known bits only, a format, a level and a flush
/// in range (the engine checks again: `stream::run`).
/// Check one descriptor completely before any byte of its buffers is touched.
pub fn check(
    sqe: &SubmissionEntry,
    cfg: &QueueConfig,
    max_xfer: u32,
    mem: &GuestMemory,
) -> Result<Job, JobStatus> {
    let op = Opcode::from_u8(sqe.opcode).ok_or(JobStatus::BadOpcode)?;
    let stream = op.is_stream();
    if sqe.flags != 0 || sqe.reserved0 != 0 || sqe.reserved != [0; 2] || (!stream && sqe.ctx != 0) {
        return Err(JobStatus::ReservedNonZero);
    }
    if cfg.ops & op.bit() == 0 {
        return Err(JobStatus::OpNotAllowed);
    }
    // `param` is a level for compression (1..=12, 0 = 1), a byte for fill,
    // the CRC so far for CRC32C, the part bits for SHA-256, and reserved
    // (zero) for everything else.
    let param_max = match op {
        Opcode::DeflateCompress | Opcode::ZlibCompress | Opcode::GzipCompress => 12,
        Opcode::Fill => 0xff,
        Opcode::Crc32c => u32::MAX as u64,
        Opcode::Sha256 => wdvirt_abi::SHA256_RESUME | wdvirt_abi::SHA256_MORE,
        Opcode::StreamCompress | Opcode::StreamDecompress => u64::MAX,
        _ => 0,
    };
    if sqe.param > param_max || (stream && crate::accel::stream::params(op, sqe.param).is_err()) {
        return Err(JobStatus::ReservedNonZero);
    }
    let job = Job {
        slot: 0,
        op,
        src: sqe.src,
        src_len: sqe.src_len,
        dst: sqe.dst,
        dst_len: sqe.dst_len,
        param: sqe.param,
        ctx: sqe.ctx,
        cookie: sqe.tag as u64,
    };
    // (address, length, may be empty): CRC32C and SHA-256 of nothing are
    // defined, and a stream piece may bring no input (a flush, a finish);
    // every other buffer needs bytes. A stream's context is a third buffer.
    let may_be_empty = matches!(op, Opcode::Crc32c | Opcode::Sha256) || stream;
    // (The context is not a transfer: MAX_XFER does not bound it.)
    let ctx = wdvirt_abi::stream::CTX_SIZE;
    let all = [
        (
            op.reads_src(),
            (sqe.src, sqe.src_len, may_be_empty, max_xfer),
        ),
        (
            op.writes_dst() || op == Opcode::Compare,
            (sqe.dst, sqe.dst_len, false, max_xfer),
        ),
        (stream, (sqe.ctx, ctx, false, ctx)),
    ];
    let buffers = all.iter().filter(|(used, _)| *used).map(|(_, b)| b);
    if op == Opcode::Compare && sqe.src_len != sqe.dst_len {
        return Err(JobStatus::BadLength);
    }
    for &(addr, len, may_be_empty, max) in buffers.clone() {
        if (len == 0 && !may_be_empty) || len > max || addr.checked_add(len as u64).is_none() {
            return Err(JobStatus::BadLength);
        }
    }
    for &(addr, len, _, _) in buffers {
        if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize) {
            return Err(JobStatus::BadAddress);
        }
        if cfg.overlaps_ring(addr, len as u64) {
            return Err(JobStatus::OverlapsRing);
        }
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn guest_memory_across_two_regions_is_read_and_written_piece_by_piece() {
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap();
        let one = InGuest::new(&mem, 0x800, 64);
        let across = InGuest::new(&mem, 0xfe0, 64);
        assert!(one.slice.is_some() && across.slice.is_none());
        let bytes: Vec<u8> = (0..64).collect();
        for m in [&one, &across] {
            assert!(m.write(0, &bytes));
            assert!(m.store(40, 0xbeef));
            let mut back = [0u8; 64];
            assert!(m.read(0, &mut back));
            let mut want = bytes.clone();
            want[40..42].copy_from_slice(&0xbeefu16.to_le_bytes());
            assert_eq!(back[..], want[..]);
        }
        // Running past the map: refused.
        let outside = InGuest::new(&mem, 0x1ff0, 64);
        assert!(!outside.write(0, &bytes) && !outside.read(0, &mut [0u8; 64]));
        assert!(!outside.store(32, 1));
    }

    /// A pace that has seen `windows` full windows of `per_job` each.
    fn measured(per_job: Duration, windows: u32) -> (Pace, Instant) {
        let mut p = Pace::default();
        let mut t = Instant::now();
        p.started(t);
        for _ in 0..windows {
            t += per_job * ESTIMATE_WINDOW;
            p.collected(ESTIMATE_WINDOW, 200, t);
        }
        (p, t)
    }

    #[test]
    fn an_undone_pop_is_read_again_and_never_published() {
        // Near the wrap of the free-running index, as after 2^32 entries.
        let mut sq = SqCursor {
            published: u32::MAX - 1,
            next: u32::MAX - 1,
        };
        let popped: Vec<u32> = (0..4).map(|_| sq.pop()).collect();
        assert_eq!(popped, [u32::MAX - 1, u32::MAX, 0, 1]);
        assert_eq!(sq.popped(), 4);
        // The engines took two: the other two go back.
        sq.undo_pop(2);
        assert!(sq.holds(u32::MAX) && !sq.holds(0) && !sq.holds(1));
        assert_eq!(sq.publish(), Some(0), "sq_head covers only what was taken");
        assert_eq!(sq.publish(), None, "nothing new to publish");
        assert_eq!(sq.pop(), 0, "the entry put back is read again");
        // Never back past what the guest was told.
        sq.undo_pop(10);
        assert_eq!(
            sq,
            SqCursor {
                published: 0,
                next: 0
            }
        );
    }

    #[test]
    fn pace_measures_full_windows_only() {
        let mut p = Pace::default();
        let t = Instant::now();
        p.started(t);
        p.collected(ESTIMATE_WINDOW - 1, 100, t + 150 * US);
        assert_eq!(p.per_job, None, "a partial window measures nothing");
        p.collected(1, 100, t + 320 * US);
        assert_eq!(p.per_job, Some(20 * US));
        // Later windows move the average a quarter of the way.
        p.collected(
            ESTIMATE_WINDOW,
            100,
            t + 320 * US + 60 * US * ESTIMATE_WINDOW,
        );
        assert_eq!(p.per_job, Some(30 * US));
    }

    #[test]
    fn naps_cover_a_quarter_of_the_backlog_within_bounds() {
        let (p, _) = measured(20 * US, 3);
        assert_eq!(p.nap(256), Some(NAP_MAX), "64 × 20 µs, capped");
        assert_eq!(p.nap(48), Some(240 * US));
        assert_eq!(p.nap(36), None, "180 µs: not worth a timer");
        assert_eq!(p.nap(NAP_MIN_IN_FLIGHT - 1), None, "shallow queue");
        let (fast, _) = measured(US, 3);
        assert_eq!(fast.nap(256), None, "1 µs jobs do not nap at depth 256");
        assert_eq!(fast.nap(1024), Some(256 * US), "but do at depth 1024");
        assert_eq!(Pace::default().nap(256), None, "no estimate yet");
    }

    #[test]
    fn running_dry_halves_the_estimate_and_ends_the_window() {
        let (mut p, t) = measured(40 * US, 2);
        assert_eq!(p.per_job, Some(40 * US));
        p.collected(5, 0, t + 10_000 * US);
        assert_eq!(p.per_job, Some(20 * US));
        assert_eq!(p.mark, None);
        // Completions collected before the next `started` measure nothing.
        p.collected(ESTIMATE_WINDOW, 3, t + 20_000 * US);
        assert_eq!(p.per_job, Some(20 * US));
    }
}
