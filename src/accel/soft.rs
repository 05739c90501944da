//! The embedded software accelerator: worker threads play the hardware
//! engines.
//!
//! * **Engines** are threads named `wd-engine-N`. They block on one shared
//!   job channel (no polling while idle), each owning a [`Scratch`] and two
//!   bounce buffers that grow up to `max_xfer`.
//! * **The IOMMU** is a PASID-indexed table of [`AddressSpace`]s. A job is
//!   resolved through its queue pair's PASID when an engine picks it up, never
//!   through anything the guest wrote: an unbound PASID, or a buffer not wholly
//!   inside the memory map, fails with `BadAddress` before any byte moves. The
//!   engine holds the map it loaded until the job ends, so a DMA_UNMAP swap
//!   published meanwhile does not pull memory from under it.
//! * **Data movement** goes only through vm-memory: `read_slice` into the
//!   bounce buffer, [`ops::run`], `write_slice` back. Writes through
//!   `GuestMemoryMmap<AtomicBitmap>` mark the pages dirty for migration by
//!   themselves.
//! * **Queue pairs** send each job as its own work item, so a 1000-job batch is
//!   1000 items other queue pairs' jobs can interleave with (no fairness is
//!   promised here: the QoS layer sits above, `crate::qos`, and keeps this
//!   FIFO short). An engine reports each job's engine time to its queue
//!   pair's [`EngineObserver`] on its own thread, after the result is sent:
//!   one clock read per job while it is busy (a job found waiting starts
//!   when the previous one ended), and one more after an observer returns
//!   (the next job starts then). While the FIFO still holds work the engine
//!   is not hungry, so it reports runs of short jobs of one queue pair at
//!   once (at most 32 jobs or 50 µs of engine time), and everything before
//!   it sleeps.
//!
//! * **A caller's thread** may run a batch of a queue pair's jobs itself
//!   ([`QueuePair::run_here`]): the QoS scheduler lends it an engine for
//!   small jobs, whose hop to an engine thread and back costs more than
//!   the job. It runs them as an engine would (the same checks, the same
//!   `Executor`), with the PASID walked and the DMA gate taken once for
//!   the batch; they count on the queue pair, not on an engine.
//!
//! Dropping a queue pair **discards** its jobs that no engine has started (no
//! completion is sent: the receiver is gone with it); a job already running
//! finishes, including its writes to guest memory. Dropping the last handle to
//! the accelerator (or [`SoftAccel::shutdown`]) lets the engines finish every
//! job already queued, then stops and joins them; later submissions fail with
//! [`AccelError::Closed`].

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use wdvirt_abi::{ALL_OPS, JobStatus, Opcode};

use super::engine_time::{Finished, READ_NS, thread_cpu_ns};
use super::ops::{self, Scratch};
use super::{
    AccelError, Accelerator, AddressSpace, EngineObserver, GuestMemory, Job, JobResult, Pasid,
    QueuePair, Wake,
};

/// How to build a [`SoftAccel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoftAccelConfig {
    /// Engine threads (at least 1 is started).
    pub engines: usize,
    /// Largest source or destination of one job, in bytes.
    pub max_xfer: u32,
    /// Queue pairs that may be open at once.
    pub max_queue_pairs: usize,
}

impl Default for SoftAccelConfig {
    fn default() -> Self {
        SoftAccelConfig {
            engines: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_xfer: 1 << 20,
            max_queue_pairs: 1024,
        }
    }
}

/// Counters of one engine or one queue pair, as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Jobs executed (successful or not).
    pub jobs: u64,
    /// Bytes read from guest memory.
    pub bytes_in: u64,
    /// Bytes written to guest memory.
    pub bytes_out: u64,
    /// Jobs that completed with a status other than `Ok`.
    pub errors: u64,
    /// Jobs dropped unstarted because their queue pair was closed.
    pub discarded: u64,
}

/// One engine's statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineStats {
    pub index: usize,
    /// The engine thread's kernel thread id (0 until it has started).
    pub tid: i32,
    pub counters: CounterSnapshot,
}

/// One open queue pair's statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuePairStats {
    /// Unique for the life of the accelerator.
    pub id: u64,
    pub pasid: Pasid,
    pub in_flight: usize,
    pub counters: CounterSnapshot,
}

/// Everything [`SoftAccel::stats`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoftAccelStats {
    pub engines: Vec<EngineStats>,
    /// Open queue pairs, by id.
    pub queue_pairs: Vec<QueuePairStats>,
}

#[derive(Default)]
struct Counters {
    jobs: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: AtomicU64,
    discarded: AtomicU64,
}

/// A batch's counts, added to [`Counters`] at once.
#[derive(Default)]
struct Tally {
    jobs: u64,
    bytes_in: u64,
    bytes_out: u64,
    errors: u64,
}

impl Tally {
    fn add(&mut self, d: &Done) {
        self.jobs += 1;
        self.bytes_in += d.bytes_in;
        self.bytes_out += d.bytes_out();
        self.errors += u64::from(d.status != JobStatus::Ok);
    }
}

impl Counters {
    fn add(&self, t: &Tally) {
        self.jobs.fetch_add(t.jobs, Ordering::Relaxed);
        self.bytes_in.fetch_add(t.bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(t.bytes_out, Ordering::Relaxed);
        self.errors.fetch_add(t.errors, Ordering::Relaxed);
    }

    fn record(&self, status: JobStatus, bytes_in: u64, bytes_out: u64) {
        self.jobs.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        if status != JobStatus::Ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            jobs: self.jobs.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct EngineInfo {
    tid: AtomicI32,
    counters: Counters,
}

/// The part of a queue pair the engines see.
struct QpShared {
    id: u64,
    pasid: Pasid,
    done: Sender<JobResult>,
    in_flight: AtomicUsize,
    /// Jobs an engine has taken and not finished.
    running: AtomicUsize,
    closed: AtomicBool,
    counters: Counters,
    /// Told of each finished job's engine time (the scheduler above).
    observer: OnceLock<Arc<dyn EngineObserver>>,
}

/// One entry of the PASID table: the address space, and the gate that DMA
/// of this PASID passes through (running jobs hold it shared).
struct PasidSlot {
    space: AddressSpace,
    gate: RwLock<()>,
    /// Bus Master Enable of the function that owns the PASID.
    dma_allowed: AtomicBool,
}

impl QpShared {
    fn stats(&self) -> QueuePairStats {
        QueuePairStats {
            id: self.id,
            pasid: self.pasid,
            in_flight: self.in_flight.load(Ordering::Acquire),
            counters: self.counters.snapshot(),
        }
    }
}

enum Msg {
    Job { job: Job, qp: Arc<QpShared> },
    Stop,
}

/// State shared by the accelerator handle, its queue pairs and its engines.
struct Common {
    /// The IOMMU's PASID table.
    spaces: RwLock<HashMap<Pasid, Arc<PasidSlot>>>,
    queue_pairs: Mutex<HashMap<u64, Arc<QpShared>>>,
    next_qp_id: AtomicU64,
    /// False once shutdown began. Submitters hold the read lock across their
    /// sends, so no job can slip in behind the engines' stop messages.
    running: RwLock<bool>,
    jobs: Sender<Msg>,
    max_xfer: u32,
    max_queue_pairs: usize,
}

impl Common {
    /// The IOMMU walk: `pasid`'s entry in the PASID table.
    fn slot(&self, pasid: Pasid) -> Option<Arc<PasidSlot>> {
        self.spaces.read().get(&pasid).cloned()
    }
}

/// The software accelerator. See the module documentation.
pub struct SoftAccel {
    common: Arc<Common>,
    engines: Vec<Arc<EngineInfo>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl SoftAccel {
    /// `engines` engine threads (at least 1), default limits.
    ///
    /// # Panics
    /// If the OS refuses to start a thread; use [`SoftAccel::with_config`] to
    /// get that as an error.
    pub fn new(engines: usize) -> Arc<SoftAccel> {
        match Self::with_config(SoftAccelConfig {
            engines,
            ..SoftAccelConfig::default()
        }) {
            Ok(a) => a,
            Err(e) => panic!("cannot start software engine threads: {e}"),
        }
    }

    pub fn with_config(cfg: SoftAccelConfig) -> std::io::Result<Arc<SoftAccel>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let common = Arc::new(Common {
            spaces: RwLock::new(HashMap::new()),
            queue_pairs: Mutex::new(HashMap::new()),
            next_qp_id: AtomicU64::new(0),
            running: RwLock::new(true),
            jobs: tx,
            max_xfer: cfg.max_xfer,
            max_queue_pairs: cfg.max_queue_pairs,
        });
        let n = cfg.engines.max(1);
        let engines: Vec<Arc<EngineInfo>> = (0..n).map(|_| Arc::default()).collect();
        let accel = SoftAccel {
            common,
            engines,
            threads: Mutex::new(Vec::with_capacity(n)),
        };
        for (i, info) in accel.engines.iter().enumerate() {
            let mut engine = Engine {
                common: Arc::clone(&accel.common),
                info: Arc::clone(info),
                jobs: rx.clone(),
                exec: Executor::default(),
                ctx: Vec::new(),
                finished: Finished::default(),
                deferred: VecDeque::new(),
                stopping: false,
            };
            let handle = std::thread::Builder::new()
                .name(format!("wd-engine-{i}"))
                .spawn(move || engine.run())?;
            // On error, `accel` drops here and stops the engines started so far.
            accel.threads.lock().push(handle);
        }
        tracing::debug!(
            engines = n,
            max_xfer = cfg.max_xfer,
            "software accelerator started"
        );
        Ok(Arc::new(accel))
    }

    /// Open a queue pair, as the concrete type (with [`SoftQueuePair::stats`]).
    /// The PASID need not be bound yet: like an IOMMU, the table is consulted
    /// per job, and jobs on an unbound PASID fail with `BadAddress`.
    fn slot(&self, pasid: Pasid) -> Result<Arc<PasidSlot>, AccelError> {
        self.common
            .slot(pasid)
            .ok_or(AccelError::UnknownPasid(pasid))
    }

    pub fn open_soft_queue_pair(&self, pasid: Pasid) -> Result<SoftQueuePair, AccelError> {
        if !*self.common.running.read() {
            return Err(AccelError::Closed);
        }
        let mut qps = self.common.queue_pairs.lock();
        if qps.len() >= self.common.max_queue_pairs {
            return Err(AccelError::NoQueuePairs(qps.len()));
        }
        let id = self.common.next_qp_id.fetch_add(1, Ordering::Relaxed);
        let (done, completions) = crossbeam_channel::unbounded();
        let shared = Arc::new(QpShared {
            id,
            pasid,
            done,
            in_flight: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            observer: OnceLock::new(),
        });
        qps.insert(id, Arc::clone(&shared));
        Ok(SoftQueuePair {
            common: Arc::clone(&self.common),
            exec: Mutex::default(),
            shared,
            completions,
        })
    }

    /// Per-engine and per-queue-pair counters.
    pub fn stats(&self) -> SoftAccelStats {
        let engines = self
            .engines
            .iter()
            .enumerate()
            .map(|(index, e)| EngineStats {
                index,
                tid: e.tid.load(Ordering::Relaxed),
                counters: e.counters.snapshot(),
            })
            .collect();
        let mut queue_pairs: Vec<QueuePairStats> = self
            .common
            .queue_pairs
            .lock()
            .values()
            .map(|q| q.stats())
            .collect();
        queue_pairs.sort_by_key(|q| q.id);
        SoftAccelStats {
            engines,
            queue_pairs,
        }
    }

    /// Number of engine threads.
    pub fn engines(&self) -> usize {
        self.engines.len()
    }

    /// Let the engines finish the jobs already queued, then stop and join
    /// them. Idempotent; must not be called from an engine thread.
    pub fn shutdown(&self) {
        {
            let mut running = self.common.running.write();
            if *running {
                *running = false;
                // One stop per engine, queued behind every accepted job. The
                // engines hold the receiver, so the sends cannot fail.
                for _ in 0..self.engines.len() {
                    let _ = self.common.jobs.send(Msg::Stop);
                }
            }
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a software engine thread panicked");
            }
        }
    }
}

impl Drop for SoftAccel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Accelerator for SoftAccel {
    fn name(&self) -> &str {
        "soft"
    }

    fn supported_ops(&self) -> u32 {
        ALL_OPS
    }

    fn max_xfer(&self) -> u32 {
        self.common.max_xfer
    }

    fn bind_pasid(&self, pasid: Pasid, space: AddressSpace) -> Result<(), AccelError> {
        let mut spaces = self.common.spaces.write();
        if spaces.contains_key(&pasid) {
            return Err(AccelError::PasidInUse(pasid));
        }
        let slot = PasidSlot {
            space,
            gate: RwLock::new(()),
            dma_allowed: AtomicBool::new(true),
        };
        spaces.insert(pasid, Arc::new(slot));
        Ok(())
    }

    fn unbind_pasid(&self, pasid: Pasid) -> Result<(), AccelError> {
        match self.common.spaces.write().remove(&pasid) {
            Some(_) => Ok(()),
            None => Err(AccelError::UnknownPasid(pasid)),
        }
    }

    fn open_queue_pair(&self, pasid: Pasid, _queue: u32) -> Result<Box<dyn QueuePair>, AccelError> {
        Ok(Box::new(self.open_soft_queue_pair(pasid)?))
    }

    fn set_dma_allowed(&self, pasid: Pasid, allowed: bool) -> Result<(), AccelError> {
        let slot = self.slot(pasid)?;
        slot.dma_allowed.store(allowed, Ordering::SeqCst);
        if !allowed {
            // Wait for the jobs already past the check.
            drop(slot.gate.write());
        }
        Ok(())
    }

    fn quiesced(&self, pasid: Pasid, f: &mut dyn FnMut()) -> Result<(), AccelError> {
        let slot = self.slot(pasid)?;
        let _no_dma = slot.gate.write();
        f();
        Ok(())
    }
}

/// A queue pair of a [`SoftAccel`]. Dropping it discards its unstarted jobs.
pub struct SoftQueuePair {
    common: Arc<Common>,
    shared: Arc<QpShared>,
    completions: Receiver<JobResult>,
    /// Runs the jobs lent to the caller's thread ([`QueuePair::run_here`]).
    exec: Mutex<Executor>,
}

impl SoftQueuePair {
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    pub fn pasid(&self) -> Pasid {
        self.shared.pasid
    }

    pub fn stats(&self) -> QueuePairStats {
        self.shared.stats()
    }
}

impl QueuePair for SoftQueuePair {
    fn submit(&self, jobs: &[Job]) -> Result<usize, AccelError> {
        let running = self.common.running.read();
        if !*running || self.shared.closed.load(Ordering::Acquire) {
            return Err(AccelError::Closed);
        }
        // Count before sending: an engine may finish a job before the loop ends.
        self.shared
            .in_flight
            .fetch_add(jobs.len(), Ordering::AcqRel);
        for (i, job) in jobs.iter().enumerate() {
            let msg = Msg::Job {
                job: *job,
                qp: Arc::clone(&self.shared),
            };
            if self.common.jobs.send(msg).is_err() {
                // Unreachable while `running` holds (the engines own the
                // receivers), but keep the count true if it ever happens.
                self.shared
                    .in_flight
                    .fetch_sub(jobs.len() - i, Ordering::AcqRel);
                return Err(AccelError::Closed);
            }
        }
        Ok(jobs.len())
    }

    /// The caller's thread runs the jobs as an engine would, with the
    /// PASID walked, its DMA gate taken and Bus Master read once for the
    /// whole batch (an unmap or a Bus Master clear waits for the batch, as
    /// for an engine's job), up to the first job an engine runs only on
    /// its own thread (`runs_here`). Each job's time is its wall-clock
    /// time, scaled, in a batch of 100 µs or more, by the share of the
    /// batch the thread spent on a CPU.
    fn run_here(&self, jobs: &[Job], done: &mut Vec<(JobResult, u64)>) -> Option<usize> {
        let n = jobs.iter().take_while(|j| runs_here(j)).count();
        let running = self.common.running.read();
        if n == 0 || !*running || self.shared.closed.load(Ordering::Acquire) {
            return Some(0);
        }
        let jobs = &jobs[..n];
        let qp = &self.shared;
        qp.running.fetch_add(n, Ordering::SeqCst);
        let mut exec = self.exec.lock();
        let slot = self.common.slot(qp.pasid);
        let _dma = slot.as_ref().map(|s| s.gate.read());
        let allowed = slot
            .as_ref()
            .is_some_and(|s| s.dma_allowed.load(Ordering::SeqCst));
        let mem = slot.as_ref().map(|s| s.space.memory());
        let max = self.common.max_xfer;
        let first = done.len();
        let mut tally = Tally::default();
        // Jobs of one kind (opcode, lengths and `param` alike) cost alike:
        // the batch's time is shared out evenly, the clock read at its ends
        // only. Otherwise each job is timed on its own.
        let kind = |j: &Job| (j.op, j.src_len, j.dst_len, j.param);
        let alike = jobs.windows(2).all(|w| kind(&w[0]) == kind(&w[1]));
        let cpu_start = thread_cpu_ns();
        let start = Instant::now();
        let mut last = start;
        for job in jobs {
            let d = match Buffers::of(job, max) {
                Err(d) => d,
                Ok(b) if b.moves_nothing() => exec.compute(job, None, &b),
                Ok(b) => match &mem {
                    None => Done::failed(JobStatus::BadAddress, 0),
                    Some(_) if !allowed => Done::failed(JobStatus::Aborted, 0),
                    Some(mem) => exec.run_mapped(job, mem, &b),
                },
            };
            tally.add(&d);
            let wall_ns = if alike {
                0
            } else {
                let now = Instant::now();
                let ns = now.saturating_duration_since(last).as_nanos() as u64;
                last = now;
                ns
            };
            done.push((d.result(job), wall_ns));
        }
        if alike {
            last = Instant::now();
            let each = (last.saturating_duration_since(start).as_nanos() as u64 / n as u64).max(1);
            for (_, ns) in &mut done[first..] {
                *ns = each;
            }
        }
        drop(exec);
        qp.counters.add(&tally);
        qp.running.fetch_sub(n, Ordering::SeqCst);
        // As the engines' runs are charged (`engine_time`): a batch awake
        // under READ_NS is charged its wall-clock time, at most that much
        // too much; a longer one its time on a CPU, the clock read again.
        let wall_ns = last.saturating_duration_since(start).as_nanos() as u64;
        let cpu_ns = if wall_ns < READ_NS {
            wall_ns
        } else {
            thread_cpu_ns().saturating_sub(cpu_start)
        };
        if cpu_ns < wall_ns {
            // Preempted meanwhile: charge the time on a CPU only.
            for (_, ns) in &mut done[first..] {
                *ns = (u128::from(*ns) * u128::from(cpu_ns) / u128::from(wall_ns)) as u64;
            }
        }
        Some(n)
    }

    /// Never needed: a bare software queue pair takes every job offered.
    fn set_wake(&self, _wake: Wake) {}

    fn observe(&self, observer: Arc<dyn EngineObserver>) {
        let _ = self.shared.observer.set(observer);
    }

    fn completions(&self) -> &Receiver<JobResult> {
        &self.completions
    }

    fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Every job is on the engines' queue from `submit` on: theirs to run.
    fn withdraw(&self) -> Vec<Job> {
        Vec::new()
    }

    fn close(&self) {
        // SeqCst, paired with the engine's `running` then `closed` (see `serve`).
        self.shared.closed.store(true, Ordering::SeqCst);
    }
}

impl Drop for SoftQueuePair {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.common.queue_pairs.lock().remove(&self.shared.id);
    }
}

/// One engine thread's state.
struct Engine {
    common: Arc<Common>,
    info: Arc<EngineInfo>,
    jobs: Receiver<Msg>,
    exec: Executor,
    /// A stream piece's context.
    ctx: Vec<u8>,
    /// Finished jobs not yet reported, and what they cost.
    finished: Finished,
    /// Work taken from the FIFO between a long job's slices that had to
    /// wait for it (its own instance's jobs, other long jobs, and those
    /// behind either of a queue pair): run next, in order.
    deferred: VecDeque<Msg>,
    /// A stop was taken between slices: take nothing more.
    stopping: bool,
}

/// What one job did, before it is reported.
struct Done {
    status: JobStatus,
    out: ops::Output,
    bytes_in: u64,
    stream_end: bool,
    /// The job's own CPU time, if it measured it (a sliced job: the time
    /// spent on other instances' jobs between its slices is theirs).
    cpu_ns: Option<u64>,
}

impl Done {
    /// What the device is told of `job`.
    fn result(&self, job: &Job) -> JobResult {
        JobResult {
            cookie: job.cookie,
            slot: job.slot,
            status: self.status,
            bytes: self.out.bytes,
            result: self.out.result,
            stream_end: self.stream_end,
        }
    }

    /// Bytes written to guest memory.
    fn bytes_out(&self) -> u64 {
        if self.status == JobStatus::Ok {
            u64::from(self.out.bytes)
        } else {
            0
        }
    }

    fn failed(status: JobStatus, bytes_in: u64) -> Self {
        Done {
            status,
            out: ops::Output::default(),
            bytes_in,
            stream_end: false,
            cpu_ns: None,
        }
    }
}

/// A compress job whose source is longer than this is compressed in
/// slices of it ([`super::stream::compress_in_slices`]); between two
/// slices the engine runs the jobs other instances have waiting, so none
/// of them waits for the whole of a long job (issue 19: a neighbour's
/// 1 MiB gzip level 12 took an engine 0.5 s). Not preemption: a slice,
/// and a job of another kind, still runs to its end.
pub const SLICE: usize = 64 << 10;

/// The slice a long compress job at `level` (libdeflate's, 1..=12) is cut
/// into: about a millisecond of engine time on this machine's cores, so
/// that is what a neighbour's job may wait for one. zlib (which compresses
/// the slices) does 64 KiB at its level 2 (libdeflate's 1–3) in 0.8 ms,
/// but needs 3.8 ms for 64 KiB at level 6 and 4.5 ms at level 9 (what
/// 10–12 become): 16 KiB above level 3. Each slice ends in a sync flush,
/// a new block: the smaller slices cost some output (see
/// `docs/performance.md`, `cargo bench --bench datapath -- --slicing`).
pub fn slice_len(level: u64) -> usize {
    if level <= 3 { SLICE } else { 16 << 10 }
}

/// At most this many waiting jobs are taken between two slices.
const TAKE_BETWEEN: usize = 8;

/// Whether a caller's thread may run `job` ([`QueuePair::run_here`]): not
/// a stream piece (its context is read and written), not a job long
/// enough to be sliced, and not one that reads what it writes (a SHA-256
/// running state in `dst`). (This once kept such jobs from running before
/// the device's journal had kept the bytes they read and write; the
/// device now records every job before it offers it, so that reason is
/// gone, and the rule stays as it was measured.)
fn runs_here(job: &Job) -> bool {
    let engines_only = job.op.is_stream() || sliced(job) || (reads_dst(job) && job.op.writes_dst());
    !engines_only
}

/// Whether `job` reads its `dst`: Compare its second buffer; SHA-256 its
/// saved state, or whether a state-sized dst already holds one
/// ([`ops::sha256_reads_dst`]).
fn reads_dst(job: &Job) -> bool {
    job.op == Opcode::Compare || (job.op == Opcode::Sha256 && ops::sha256_reads_dst(job.dst_len))
}

/// Whether `job` is compressed in slices.
fn sliced(job: &Job) -> bool {
    matches!(
        job.op,
        Opcode::DeflateCompress | Opcode::ZlibCompress | Opcode::GzipCompress
    ) && job.src_len as usize > SLICE
}

/// The bytes a software engine writes for a compress job of `src` in
/// `format` at `level` (1..=12), however busy it is: libdeflate's one-shot
/// output up to [`SLICE`], the sliced stream's above. For checking a
/// device's output on the host.
pub fn compress_as_engine(
    format: wdvirt_abi::Format,
    level: u64,
    src: &[u8],
    dst: &mut [u8],
    scratch: &mut Scratch,
) -> Result<u32, JobStatus> {
    if src.len() > SLICE {
        super::stream::compress_in_slices(format, level, src, dst, slice_len(level), &mut || {})
    } else {
        ops::compress(format, level, src, dst, scratch)
    }
}

impl Engine {
    fn run(&mut self) {
        self.info.tid.store(current_tid(), Ordering::Relaxed);
        self.finished.begin();
        // When the last job ended (or its observer returned): a job found
        // waiting starts then, so engine time is measured with one clock
        // read per job (two with an observer) while the engine is busy.
        let mut last_end: Option<Instant> = None;
        loop {
            let waiting = match self.deferred.pop_front() {
                Some(msg) => Some(msg),
                None => last_end.and_then(|_| self.jobs.try_recv().ok()),
            };
            let msg = match waiting {
                Some(msg) => msg,
                None => {
                    // Hungry: what it finished goes to the scheduler now,
                    // which may hand it more.
                    self.finished.report(last_end);
                    self.finished.sleeps();
                    // `recv` blocks: an idle engine sleeps in the kernel.
                    let Ok(msg) = self.jobs.recv() else { break };
                    last_end = None;
                    msg
                }
            };
            match msg {
                Msg::Stop => {
                    self.finished.report(last_end);
                    break;
                }
                Msg::Job { job, qp } => {
                    let start = last_end.unwrap_or_else(Instant::now);
                    last_end = self.serve(job, &qp, start);
                }
            }
        }
        tracing::trace!("software engine stopped");
    }

    /// Runs one job that the engine took at `start`; returns when it ended
    /// (`None` for a job discarded unrun, which took no engine time).
    fn serve(&mut self, job: Job, qp: &QpShared, start: Instant) -> Option<Instant> {
        // `running` first, then `closed` (both SeqCst): a closer that sees
        // `running == 0` after setting `closed` knows no job will start.
        qp.running.fetch_add(1, Ordering::SeqCst);
        if qp.closed.load(Ordering::SeqCst) {
            self.info.counters.discarded.fetch_add(1, Ordering::Relaxed);
            qp.counters.discarded.fetch_add(1, Ordering::Relaxed);
            qp.in_flight.fetch_sub(1, Ordering::AcqRel);
            qp.running.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let observer = qp.observer.get();
        if observer.is_some() {
            self.finished.job_starts(start);
        }
        let done = self.execute(&job, qp.pasid, observer);
        let bytes_out = done.bytes_out();
        self.info
            .counters
            .record(done.status, done.bytes_in, bytes_out);
        qp.counters.record(done.status, done.bytes_in, bytes_out);
        if done.status != JobStatus::Ok {
            tracing::trace!(
                pasid = qp.pasid,
                op = job.op.name(),
                status = done.status.name(),
                "job failed"
            );
        }
        // The receiver may be gone (queue pair dropped mid-job): nothing to tell.
        let _ = qp.done.send(done.result(&job));
        // After the send, so that `in_flight() == 0` means every result is queued.
        qp.in_flight.fetch_sub(1, Ordering::AcqRel);
        qp.running.fetch_sub(1, Ordering::SeqCst);
        let end = Instant::now();
        let Some(o) = observer else {
            return Some(end);
        };
        if let Some(cpu_ns) = done.cpu_ns {
            self.finished.push_exact(o, job, cpu_ns, end);
        } else {
            let wall_ns = end.saturating_duration_since(start).as_nanos() as u64;
            if !self.finished.push(o, job, wall_ns) {
                return Some(end);
            }
            self.finished.report(Some(end));
        }
        // The next job starts after the observer returns: time it spent
        // (waiting for the scheduler's lock, say) is no job's engine time.
        Some(Instant::now())
    }

    fn execute(
        &mut self,
        job: &Job,
        pasid: Pasid,
        observer: Option<&Arc<dyn EngineObserver>>,
    ) -> Done {
        let b = match Buffers::of(job, self.common.max_xfer) {
            Ok(b) => b,
            Err(done) => return done,
        };
        if b.moves_nothing() {
            return self.exec.compute(job, None, &b);
        }
        // The IOMMU walk: this queue pair's PASID, looked up now.
        let Some(slot) = self.common.slot(pasid) else {
            return Done::failed(JobStatus::BadAddress, 0);
        };
        // Held until the job's last write: an unmap or a bus-master clear
        // waits for it (see `quiesced`, `set_dma_allowed`).
        let _dma = slot.gate.read();
        if !slot.dma_allowed.load(Ordering::SeqCst) {
            return Done::failed(JobStatus::Aborted, 0);
        }
        // The loaded map stays valid until the job ends.
        let mem = slot.space.memory();
        if !b.stream && !sliced(job) {
            return self.exec.run_mapped(job, &mem, &b);
        }
        if !b.mapped(&mem, job) {
            return Done::failed(JobStatus::BadAddress, 0);
        }
        if b.stream {
            return self.stream_piece(job, &mem, b.src_len, b.dst_len);
        }
        self.compress_sliced(job, &mem, pasid, observer, b.src_len, b.dst_len)
    }

    /// A long compress job, in slices of [`slice_len`] with other instances'
    /// waiting jobs run between them ([`Engine::between_slices`]). Its
    /// PASID's DMA gate stays held throughout, as for any job; the jobs run
    /// between are of other PASIDs, so no gate is taken twice.
    fn compress_sliced(
        &mut self,
        job: &Job,
        mem: &GuestMemory,
        pasid: Pasid,
        observer: Option<&Arc<dyn EngineObserver>>,
        src_len: usize,
        dst_len: usize,
    ) -> Done {
        let level = match ops::compression_level(job.param) {
            Ok(l) => l,
            Err(status) => return Done::failed(status, 0),
        };
        let format = match job.op {
            Opcode::ZlibCompress => wdvirt_abi::Format::Zlib,
            Opcode::GzipCompress => wdvirt_abi::Format::Gzip,
            _ => wdvirt_abi::Format::Deflate,
        };
        // The bounce buffers are this job's until it ends: jobs run between
        // its slices get buffers of their own.
        let mut src = std::mem::take(&mut self.exec.src);
        let mut dst = std::mem::take(&mut self.exec.dst);
        let started = thread_cpu_ns();
        let mut nested_ns = 0;
        let mut done = (|| {
            let s = bounce(&mut src, src_len);
            if mem.read_slice(s, GuestAddress(job.src)).is_err() {
                return Done::failed(JobStatus::BadAddress, 0);
            }
            let d = bounce(&mut dst, dst_len);
            let res = catch_unwind(AssertUnwindSafe(|| {
                super::stream::compress_in_slices(
                    format,
                    level,
                    s,
                    d,
                    slice_len(level),
                    &mut || {
                        let now = thread_cpu_ns();
                        let own = (now - started).saturating_sub(nested_ns);
                        self.between_slices(pasid, observer.map(|o| (o, job, own)));
                        nested_ns += thread_cpu_ns() - now;
                    },
                )
            }));
            let bytes_in = src_len as u64;
            let n = match res {
                Ok(Ok(n)) => n,
                Ok(Err(status)) => return Done::failed(status, bytes_in),
                Err(_) => {
                    tracing::error!(op = job.op.name(), "sliced compression panicked");
                    return Done::failed(JobStatus::EngineError, bytes_in);
                }
            };
            if mem
                .write_slice(&d[..n as usize], GuestAddress(job.dst))
                .is_err()
            {
                return Done::failed(JobStatus::BadAddress, bytes_in);
            }
            Done {
                status: JobStatus::Ok,
                out: ops::Output {
                    bytes: n,
                    result: 0,
                },
                bytes_in,
                stream_end: false,
                cpu_ns: None,
            }
        })();
        done.cpu_ns = Some((thread_cpu_ns() - started).saturating_sub(nested_ns));
        self.exec.src = src;
        self.exec.dst = dst;
        done
    }

    /// Between two slices of a long job of `pasid`: asks the job's
    /// observer (`asks`: it, the job and its engine time so far) for work,
    /// then runs up to [`TAKE_BETWEEN`] waiting jobs of other PASIDs that
    /// are not long themselves, each to its end; anything else it takes
    /// waits in `deferred`, as does any later job of a queue pair with one
    /// waiting there (a queue's jobs keep their order).
    fn between_slices(
        &mut self,
        pasid: Pasid,
        asks: Option<(&Arc<dyn EngineObserver>, &Job, u64)>,
    ) {
        if self.stopping {
            return;
        }
        // What this engine finished so far is reported first, so the
        // scheduler decides on current charges; then it may hand over work.
        self.finished.report(None);
        if let Some((o, job, engine_ns)) = asks {
            o.between_slices(job, engine_ns);
        }
        for _ in 0..TAKE_BETWEEN {
            let Ok(msg) = self.jobs.try_recv() else {
                break;
            };
            let (job, qp) = match msg {
                Msg::Stop => {
                    self.deferred.push_back(Msg::Stop);
                    self.stopping = true;
                    break;
                }
                Msg::Job { job, qp } => (job, qp),
            };
            let waits = qp.pasid == pasid
                || sliced(&job)
                || self
                    .deferred
                    .iter()
                    .any(|m| matches!(m, Msg::Job { qp: q, .. } if q.id == qp.id));
            if waits {
                self.deferred.push_back(Msg::Job { job, qp });
            } else {
                self.serve(job, &qp, Instant::now());
            }
        }
    }
}

/// What runs one job's operation: the library state and the bounce
/// buffers (grown on demand, never past `max_xfer`). Each engine thread
/// owns one, and so does each queue pair for the jobs it runs on its
/// caller's thread ([`QueuePair::run_here`]).
#[derive(Default)]
struct Executor {
    scratch: Scratch,
    src: Vec<u8>,
    dst: Vec<u8>,
}

/// The buffers a job uses, checked before any is translated: only the
/// ones its opcode uses are judged (a field an operation does not use is
/// ignored, whatever it holds: spec §4; a nop with huge unused lengths
/// completes Ok), and only non-empty ones are translated, so a job that
/// moves no bytes never walks the PASID table, as no DMA would fault on
/// hardware.
struct Buffers {
    src_len: usize,
    dst_len: usize,
    ctx_len: usize,
    /// [`reads_dst`].
    reads_dst: bool,
    stream: bool,
}

impl Buffers {
    /// `BadLength` for a used buffer longer than `max` or past the end
    /// of the address space.
    fn of(job: &Job, max: u32) -> Result<Buffers, Done> {
        let reads_src = job.op.reads_src();
        let reads_dst = reads_dst(job);
        let uses_dst = job.op.writes_dst() || reads_dst;
        let bad = |used: bool, addr: u64, len: u32| {
            used && (len > max || addr.checked_add(u64::from(len)).is_none())
        };
        if bad(reads_src, job.src, job.src_len) || bad(uses_dst, job.dst, job.dst_len) {
            return Err(Done::failed(JobStatus::BadLength, 0));
        }
        let stream = job.op.is_stream();
        let ctx_len = if stream {
            wdvirt_abi::stream::CTX_SIZE as usize
        } else {
            0
        };
        if stream && job.ctx.checked_add(ctx_len as u64).is_none() {
            return Err(Done::failed(JobStatus::BadLength, 0));
        }
        Ok(Buffers {
            src_len: if reads_src { job.src_len as usize } else { 0 },
            dst_len: if uses_dst { job.dst_len as usize } else { 0 },
            ctx_len,
            reads_dst,
            stream,
        })
    }

    fn moves_nothing(&self) -> bool {
        self.src_len == 0 && self.dst_len == 0
    }

    /// Every buffer wholly inside the map.
    fn mapped(&self, mem: &GuestMemory, job: &Job) -> bool {
        mapped(mem, job.src, self.src_len)
            && mapped(mem, job.dst, self.dst_len)
            && mapped(mem, job.ctx, self.ctx_len)
    }
}

impl Executor {
    /// Bounce the inputs in, run the operation, write the output back.
    /// A job whose buffers are checked to be in guest memory (`BadAddress`
    /// if they are not), run: a copy in place where it can be, else
    /// through the bounce buffers.
    fn run_mapped(&mut self, job: &Job, mem: &GuestMemory, b: &Buffers) -> Done {
        if let Some(done) = copy_in_place(job, mem, b) {
            // Both slices were found in the map: the buffers are mapped.
            return done;
        }
        if !b.mapped(mem, job) {
            return Done::failed(JobStatus::BadAddress, 0);
        }
        self.compute(job, Some(mem), b)
    }

    fn compute(&mut self, job: &Job, mem: Option<&GuestMemory>, b: &Buffers) -> Done {
        let (src_len, dst_len, reads_dst) = (b.src_len, b.dst_len, b.reads_dst);
        let src = bounce(&mut self.src, src_len);
        let dst = bounce(&mut self.dst, dst_len);
        let mut bytes_in = 0u64;
        if let Some(mem) = mem {
            if src_len > 0 {
                if mem.read_slice(src, GuestAddress(job.src)).is_err() {
                    return Done::failed(JobStatus::BadAddress, 0);
                }
                bytes_in += src_len as u64;
            }
            // SHA-256 looks only at a running state at the head of `dst`:
            // read that, not a whole large digest buffer.
            let dst_read = if job.op == Opcode::Sha256 {
                dst_len.min(wdvirt_abi::SHA256_STATE_SIZE as usize)
            } else {
                dst_len
            };
            if reads_dst && dst_read > 0 {
                if mem
                    .read_slice(&mut dst[..dst_read], GuestAddress(job.dst))
                    .is_err()
                {
                    return Done::failed(JobStatus::BadAddress, bytes_in);
                }
                bytes_in += dst_read as u64;
            }
        }

        let scratch = &mut self.scratch;
        let res = catch_unwind(AssertUnwindSafe(|| {
            ops::run(job.op, src, dst, job.param, scratch)
        }));
        let out = match res {
            Ok(Ok(out)) => out,
            Ok(Err(status)) => return Done::failed(status, bytes_in),
            Err(_) => {
                // A library panicked (libdeflater does on allocation failure):
                // fail the job, and start over with fresh library state.
                tracing::error!(op = job.op.name(), "software engine operation panicked");
                self.scratch = Scratch::new();
                return Done::failed(JobStatus::EngineError, bytes_in);
            }
        };

        // Only the `out.bytes` the operation produced are written back: the
        // libraries may scribble past that in their output buffer.
        let n = (out.bytes as usize).min(dst.len());
        if let (true, Some(mem)) = (job.op.writes_dst() && n > 0, mem) {
            // The range was checked above and the map cannot change under
            // `mem`, so this writes all of it; dirty pages are marked by vm-memory.
            if mem.write_slice(&dst[..n], GuestAddress(job.dst)).is_err() {
                return Done::failed(JobStatus::BadAddress, bytes_in);
            }
        }
        Done {
            status: JobStatus::Ok,
            out,
            bytes_in,
            stream_end: false,
            cpu_ns: None,
        }
    }
}

impl Engine {
    /// A stream piece: `src` and the context in, `dst` and the context out
    /// (both only when it succeeds).
    fn stream_piece(
        &mut self,
        job: &Job,
        mem: &GuestMemory,
        src_len: usize,
        dst_len: usize,
    ) -> Done {
        let ctx_len = wdvirt_abi::stream::CTX_SIZE as usize;
        let src = bounce(&mut self.exec.src, src_len);
        let dst = bounce(&mut self.exec.dst, dst_len);
        let ctx = bounce(&mut self.ctx, ctx_len);
        if mem.read_slice(src, GuestAddress(job.src)).is_err()
            || mem.read_slice(ctx, GuestAddress(job.ctx)).is_err()
        {
            return Done::failed(JobStatus::BadAddress, 0);
        }
        let bytes_in = (src_len + ctx_len) as u64;
        let res = catch_unwind(AssertUnwindSafe(|| {
            super::stream::run(job.op, src, dst, ctx, job.param)
        }));
        let out = match res {
            Ok(Ok(out)) => out,
            Ok(Err(status)) => return Done::failed(status, bytes_in),
            Err(_) => {
                tracing::error!(op = job.op.name(), "stream operation panicked");
                return Done::failed(JobStatus::EngineError, bytes_in);
            }
        };
        let n = (out.bytes as usize).min(dst.len());
        if (n > 0 && mem.write_slice(&dst[..n], GuestAddress(job.dst)).is_err())
            || mem.write_slice(ctx, GuestAddress(job.ctx)).is_err()
        {
            return Done::failed(JobStatus::BadAddress, bytes_in);
        }
        Done {
            status: JobStatus::Ok,
            out: ops::Output {
                bytes: n as u32,
                result: out.consumed,
            },
            bytes_in,
            stream_end: out.ended,
            cpu_ns: None,
        }
    }
}

/// A copy whose source and destination each lie in one region, done as
/// one `memmove` from guest memory to guest memory (marking the pages it
/// writes dirty), not through the bounce buffers: a third of the memory
/// traffic, the same bytes (a `memmove` reads an overlapping source as
/// the bounce's snapshot would). `None`: not such a job, to be run through
/// the bounce buffers.
fn copy_in_place(job: &Job, mem: &GuestMemory, b: &Buffers) -> Option<Done> {
    if job.op != Opcode::Copy || b.src_len == 0 || b.dst_len < b.src_len {
        return None;
    }
    let src = mem.get_slice(GuestAddress(job.src), b.src_len).ok()?;
    // All of `dst` must be mapped, as for a job through the bounce buffers;
    // the copy fills its first `src_len` bytes.
    let dst = mem.get_slice(GuestAddress(job.dst), b.dst_len).ok()?;
    src.copy_to_volatile_slice(dst);
    Some(Done {
        status: JobStatus::Ok,
        out: ops::Output {
            bytes: b.src_len as u32,
            result: 0,
        },
        bytes_in: b.src_len as u64,
        stream_end: false,
        cpu_ns: None,
    })
}

/// Whether `[addr, addr + len)` lies wholly inside the map (no holes). An
/// empty range is trivially inside.
fn mapped(mem: &GuestMemory, addr: u64, len: usize) -> bool {
    len == 0 || GuestMemoryBackend::check_range(mem, GuestAddress(addr), len)
}

/// The calling thread's kernel id, for operators matching engines to
/// `/proc/PID/task/TID` (0 if `/proc` is not mounted).
fn current_tid() -> i32 {
    // `/proc/thread-self` links to `PID/task/TID`.
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// The first `len` bytes of a bounce buffer, growing it if needed.
fn bounce(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::time::{Duration, Instant};
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{FileOffset, GuestMemoryRegion, GuestRegionMmap};

    const PAGE: u64 = 4096;
    const TIMEOUT: Duration = Duration::from_secs(20);

    /// A memfd-backed region of `size` bytes at guest address `base`.
    fn region(base: u64, size: usize) -> GuestRegionMmap<vm_memory::bitmap::AtomicBitmap> {
        let fd = rustix::fs::memfd_create("wdvirt-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        let file = File::from(fd);
        file.set_len(size as u64).expect("set_len");
        GuestRegionMmap::from_range(GuestAddress(base), size, Some(FileOffset::new(file, 0)))
            .expect("map region")
    }

    fn space(ranges: &[(u64, usize)]) -> AddressSpace {
        let regions = ranges.iter().map(|&(b, s)| region(b, s)).collect();
        AddressSpace::new(GuestMemory::from_regions(regions).expect("memory map"))
    }

    fn write(space: &AddressSpace, addr: u64, data: &[u8]) {
        space
            .memory()
            .write_slice(data, GuestAddress(addr))
            .unwrap();
    }

    fn read(space: &AddressSpace, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        space
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .unwrap();
        v
    }

    fn corpus(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                if i % 7 < 5 {
                    b"wdvirt engine "[i % 14]
                } else {
                    (i.wrapping_mul(2_654_435_761) >> 13) as u8
                }
            })
            .collect()
    }

    fn job(op: Opcode, src: u64, src_len: u32, dst: u64, dst_len: u32, cookie: u64) -> Job {
        Job {
            op,
            src,
            src_len,
            dst,
            dst_len,
            param: 0,
            ctx: 0,
            cookie,
            slot: 0,
        }
    }

    /// Submit `jobs`, collect exactly one result per job, keyed by cookie.
    fn run_jobs(qp: &dyn QueuePair, jobs: &[Job]) -> HashMap<u64, JobResult> {
        qp.submit(jobs).unwrap();
        let mut out = HashMap::new();
        for _ in 0..jobs.len() {
            let r = qp.completions().recv_timeout(TIMEOUT).expect("completion");
            assert!(
                out.insert(r.cookie, r).is_none(),
                "cookie {} twice",
                r.cookie
            );
        }
        out
    }

    fn run_one(qp: &dyn QueuePair, j: Job) -> JobResult {
        let r = run_jobs(qp, &[j]);
        r[&j.cookie]
    }

    fn bound(accel: &SoftAccel, pasid: Pasid, ranges: &[(u64, usize)]) -> AddressSpace {
        let s = space(ranges);
        accel.bind_pasid(pasid, s.clone()).unwrap();
        s
    }

    /// Jobs of every kind a caller's thread may run, good and bad: each
    /// in-range opcode (a copy within one region, overlapping forwards and
    /// backwards, and one straddling two regions), and jobs the checks
    /// refuse (outside the map, over MAX_XFER, into a hole).
    fn mixed_jobs() -> Vec<Job> {
        let (a, b) = (0x10_0000u64, 0x20_0000u64);
        let mut jobs = Vec::new();
        let mut add = |op, src, src_len, dst, dst_len, param| {
            let mut j = job(op, src, src_len, dst, dst_len, jobs.len() as u64);
            j.param = param;
            jobs.push(j);
        };
        add(Opcode::Copy, a, 4096, a + 0x8_0000, 4096, 0);
        add(Opcode::Copy, a + 100, 5000, a + 1100, 5000, 0); // overlaps forwards
        add(Opcode::Copy, a + 0x4_0000, 5000, a + 0x3_fc00, 5000, 0); // backwards
        add(Opcode::Copy, b - 1000, 3000, a + 0x9_0000, 3000, 0); // straddles two regions
        add(Opcode::Copy, b + 0xf_f000, 8192, a, 8192, 0); // runs past the map
        add(Opcode::Copy, a, 64, a + 0x6_0000, 32, 0); // dst too small
        add(Opcode::Copy, a, 64, b + 0xf_ffc0, 128, 0); // dst's tail unmapped
        add(Opcode::Fill, 0, 0, a + 0xa_0000, 7000, 0x5a);
        add(Opcode::Crc32c, a + 7, 10_000, 0, 0, 0x1234);
        add(Opcode::Sha256, a, 20_000, a + 0xb_0000, 32, 0);
        add(Opcode::Compare, a, 3000, a + 0x8_0000, 3000, 0);
        add(Opcode::DeflateCompress, a, 30_000, a + 0xc_0000, 40_000, 1);
        add(Opcode::Nop, 0, u32::MAX, 0, u32::MAX, 0);
        add(Opcode::Copy, a, (2 << 20) as u32, b, (2 << 20) as u32, 0); // over MAX_XFER
        jobs
    }

    #[test]
    fn jobs_run_on_a_callers_thread_end_as_on_an_engine() {
        let ranges = [(0x10_0000, 1 << 20), (0x20_0000, 1 << 20)];
        let init = corpus(2 << 20);
        let ran = |here: bool| {
            let accel = SoftAccel::new(1);
            let mem = bound(&accel, 7, &ranges);
            write(&mem, 0x10_0000, &init[..1 << 20]);
            write(&mem, 0x20_0000, &init[1 << 20..]);
            let qp = accel.open_queue_pair(7, 0).unwrap();
            let jobs = mixed_jobs();
            let mut results = Vec::new();
            for j in &jobs {
                // One at a time: later jobs read what earlier ones wrote.
                if here {
                    let mut done = Vec::new();
                    assert_eq!(qp.run_here(std::slice::from_ref(j), &mut done), Some(1));
                    results.push(done[0].0);
                } else {
                    results.push(run_one(&*qp, *j));
                }
            }
            let bytes = [
                read(&mem, 0x10_0000, 1 << 20),
                read(&mem, 0x20_0000, 1 << 20),
            ];
            (results, bytes)
        };
        let (engine, engine_mem) = ran(false);
        let (here, here_mem) = ran(true);
        for (e, h) in engine.iter().zip(&here) {
            assert_eq!(e, h, "job {}", e.cookie);
        }
        assert!(engine_mem == here_mem, "guest memory differs");
        // The mix holds each kind of outcome.
        for status in [
            JobStatus::Ok,
            JobStatus::BadAddress,
            JobStatus::BadLength,
            JobStatus::DstTooSmall,
        ] {
            assert!(here.iter().any(|r| r.status == status), "{status:?}");
        }
        // Each copy's own outcome (the job's index is its cookie).
        let copies: Vec<JobStatus> = here[..7].iter().map(|r| r.status).collect();
        use JobStatus::{BadAddress, DstTooSmall, Ok as Done};
        assert_eq!(
            copies,
            [Done, Done, Done, Done, BadAddress, DstTooSmall, BadAddress]
        );
        // An overlapping copy moved the source as it was.
        let want = &init[100..5100];
        assert!(&engine_mem[0][1100..6100] == want);
    }

    #[test]
    fn a_callers_thread_stops_at_jobs_only_engines_run_and_checks_bus_master() {
        let accel = SoftAccel::new(1);
        let mem = bound(&accel, 7, &[(0x10_0000, 4 << 20)]);
        write(&mem, 0x10_0000, &corpus(2 << 20));
        let qp = accel.open_queue_pair(7, 0).unwrap();
        let copy = job(Opcode::Copy, 0x10_0000, 64, 0x30_0000, 64, 1);
        let long = job(
            Opcode::DeflateCompress,
            0x10_0000,
            1 << 20,
            0x30_0000,
            1 << 20,
            2,
        );
        let mut done = Vec::new();
        // A job long enough to be sliced runs on an engine only.
        assert_eq!(qp.run_here(&[copy, long, copy], &mut done), Some(1));
        assert_eq!(done.len(), 1);
        assert!(done[0].1 > 0, "charged no time");
        let mut piece = copy;
        piece.op = Opcode::StreamCompress;
        assert_eq!(qp.run_here(&[piece], &mut done), Some(0));
        // Nor a SHA-256 that continues the running state in its dst.
        let mut resume = job(Opcode::Sha256, 0x10_0000, 64, 0x30_0000, 128, 3);
        resume.param = wdvirt_abi::SHA256_RESUME;
        assert_eq!(qp.run_here(&[resume], &mut done), Some(0));
        resume.param = 0;
        resume.dst_len = 32;
        assert_eq!(
            qp.run_here(&[resume], &mut done),
            Some(1),
            "a one-shot digest"
        );
        // Bus Master off: Aborted, nothing written.
        write(&mem, 0x30_0000, &[0u8; 64]);
        accel.set_dma_allowed(7, false).unwrap();
        done.clear();
        assert_eq!(qp.run_here(&[copy], &mut done), Some(1));
        assert_eq!(done[0].0.status, JobStatus::Aborted);
        assert_eq!(read(&mem, 0x30_0000, 64), vec![0u8; 64]);
        // A closed queue pair runs nothing.
        accel.set_dma_allowed(7, true).unwrap();
        qp.close();
        assert_eq!(qp.run_here(&[copy], &mut done), Some(0));
    }

    #[test]
    fn every_opcode_matches_ops_run() {
        let accel = SoftAccel::new(2);
        let mem = bound(&accel, 7, &[(0x10_0000, 1 << 20)]);
        let qp = accel.open_queue_pair(7, 0).unwrap();
        let input = corpus(50_000);
        let (src, dst) = (0x10_0000u64, 0x18_0000u64);
        let mut scratch = Scratch::new();

        for op in Opcode::ALL {
            if op.is_stream() {
                // Pieces of a stream need a context: `stream::run`'s tests, and
                // the device's `stream_*` tests through this engine.
                continue;
            }
            // Decompress opcodes need a compressed source; Compare a second buffer.
            let (src_bytes, param) = match ops::Format::of(op) {
                Some((format, false)) => {
                    let mut packed = vec![0u8; 64 * 1024];
                    let n = ops::compress(format, 6, &input, &mut packed, &mut scratch).unwrap();
                    packed.truncate(n as usize);
                    (packed, 0)
                }
                Some((_, true)) => (input.clone(), 9),
                None if op == Opcode::Fill => (Vec::new(), 0xa5),
                None => (input.clone(), 0),
            };
            let mut dst_init = vec![0x11u8; 60_000];
            if op == Opcode::Compare {
                dst_init = input.clone();
                dst_init[31_337] ^= 0x40;
            }
            write(&mem, src, &src_bytes);
            write(&mem, dst, &dst_init);
            let dst_len = if op == Opcode::Compare {
                input.len()
            } else {
                dst_init.len()
            };
            let mut j = job(
                op,
                src,
                src_bytes.len() as u32,
                dst,
                dst_len as u32,
                op as u64,
            );
            j.param = param;
            let got = run_one(&*qp, j);

            let mut want_dst = dst_init.clone();
            let want = ops::run(
                op,
                &src_bytes,
                &mut want_dst[..dst_len],
                param,
                &mut scratch,
            )
            .unwrap_or_else(|e| panic!("{op:?}: {e:?}"));
            assert_eq!(got.status, JobStatus::Ok, "{op:?}");
            assert_eq!((got.bytes, got.result), (want.bytes, want.result), "{op:?}");
            // Exactly `bytes` written at dst; the rest of the buffer untouched.
            let n = got.bytes as usize;
            let guest_dst = read(&mem, dst, dst_init.len());
            assert!(guest_dst[..n] == want_dst[..n], "{op:?} dst bytes");
            assert!(guest_dst[n..] == dst_init[n..], "{op:?} wrote past bytes");
            match op {
                Opcode::Compare => assert_eq!(got.result, 31_338),
                Opcode::Crc32c => assert_eq!(
                    got.result,
                    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &input) as u32
                ),
                Opcode::Sha256 => {
                    use sha2::Digest;
                    assert_eq!(read(&mem, dst, 32), sha2::Sha256::digest(&input).to_vec())
                }
                Opcode::DeflateDecompress | Opcode::ZlibDecompress | Opcode::GzipDecompress => {
                    assert_eq!(read(&mem, dst, input.len()), input)
                }
                _ => {}
            }
        }
        // An engine counts a job out just after sending its result: give
        // the last one a moment (this raced under load).
        let deadline = Instant::now() + Duration::from_secs(2);
        while qp.in_flight() != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(qp.in_flight(), 0);
        let st = accel.stats();
        let total: u64 = st.engines.iter().map(|e| e.counters.jobs).sum();
        let one_shot = Opcode::ALL.len() as u64 - 2;
        assert_eq!(total, one_shot);
        assert_eq!(st.queue_pairs.len(), 1);
        assert_eq!(st.queue_pairs[0].counters.jobs, one_shot);
        assert_eq!(st.queue_pairs[0].counters.errors, 0);
    }

    #[test]
    fn bad_addresses_touch_nothing() {
        let accel = SoftAccel::new(1);
        // Two regions with a hole between them.
        let base = 0x4000_0000u64;
        let mem = bound(
            &accel,
            1,
            &[
                (base, 16 * PAGE as usize),
                (base + 32 * PAGE, 4 * PAGE as usize),
            ],
        );
        let end = base + 16 * PAGE;
        let qp = accel.open_queue_pair(1, 0).unwrap();
        write(&mem, end - 100, &[0x77; 100]);

        let fill = |dst, len| Job {
            param: 0xee,
            ..job(Opcode::Fill, 0, 0, dst, len, 1)
        };
        let cases = [
            ("fill straddles region end", fill(end - 100, 200)),
            ("fill in the hole", fill(end + PAGE, 16)),
            ("fill past everything", fill(base + 64 * PAGE, 16)),
            ("fill below the map", fill(0x1000, 16)),
            (
                "copy src straddles",
                job(Opcode::Copy, end - 10, 20, base, 20, 1),
            ),
            (
                "copy dst straddles",
                job(Opcode::Copy, base, 20, end - 10, 20, 1),
            ),
            (
                "crc src spans hole",
                job(Opcode::Crc32c, end - 8, PAGE as u32, 0, 0, 1),
            ),
            (
                "compare dst straddles",
                job(Opcode::Compare, base, 64, end - 32, 64, 1),
            ),
        ];
        for (what, j) in cases {
            let r = run_one(&*qp, j);
            assert_eq!(r.status, JobStatus::BadAddress, "{what}");
            assert_eq!((r.bytes, r.result), (0, 0), "{what}");
        }
        // The straddling fill must not have written its in-range part.
        assert_eq!(read(&mem, end - 100, 100), vec![0x77; 100]);

        // Address + length overflows: BadLength. Over max_xfer: BadLength.
        let r = run_one(&*qp, fill(u64::MAX - 4, 16));
        assert_eq!(r.status, JobStatus::BadLength);
        let r = run_one(&*qp, fill(base, accel.max_xfer() + 1));
        assert_eq!(r.status, JobStatus::BadLength);

        // Exactly up to the end is fine.
        let r = run_one(&*qp, fill(end - 100, 100));
        assert_eq!((r.status, r.bytes), (JobStatus::Ok, 100));
        assert_eq!(read(&mem, end - 100, 100), vec![0xee; 100]);

        let st = qp_stats(&accel);
        assert_eq!(st.counters.errors, 10);
        assert_eq!(st.counters.jobs, 11);
        assert_eq!(st.counters.bytes_out, 100);
    }

    fn qp_stats(accel: &SoftAccel) -> QueuePairStats {
        let st = accel.stats();
        assert_eq!(st.queue_pairs.len(), 1);
        st.queue_pairs[0]
    }

    /// An observer that notes each finished job's cookie and engine time,
    /// in the order reported.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<(u64, u64)>>);

    impl EngineObserver for Recorded {
        fn job_finished(&self, job: &Job, engine_ns: u64, _end: Instant) {
            self.0.lock().push((job.cookie, engine_ns));
        }
    }

    /// PASID 1 with 256 KiB of data at 0 in 1 MiB of memory, and a queue
    /// pair of it watched by a [`Recorded`].
    fn observed_with_data(accel: &SoftAccel) -> (AddressSpace, Box<dyn QueuePair>, Arc<Recorded>) {
        let mem = bound(accel, 1, &[(0, 1 << 20)]);
        write(&mem, 0, &corpus(256 << 10));
        let qp = accel.open_queue_pair(1, 0).unwrap();
        let seen = Arc::new(Recorded::default());
        qp.observe(seen.clone());
        (mem, qp, seen)
    }

    /// Waits until `seen` holds `n` reports.
    fn wait_reported(seen: &Recorded, n: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while seen.0.lock().len() < n {
            assert!(Instant::now() < deadline, "not every job was reported");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn every_finished_job_reports_its_engine_time_to_the_observer() {
        let accel = SoftAccel::new(1);
        let (_mem, qp, seen) = observed_with_data(&accel);
        let jobs: Vec<Job> = (0..20)
            .map(|i| job(Opcode::Sha256, 0, 256 << 10, 0x8_0000 + i * 64, 32, i))
            .chain((20..40).map(|i| job(Opcode::Nop, 0, 0, 0, 0, i)))
            .collect();
        run_jobs(&*qp, &jobs);
        wait_reported(&seen, 40);
        let seen = seen.0.lock().clone();
        let mut cookies: Vec<u64> = seen.iter().map(|s| s.0).collect();
        cookies.sort_unstable();
        assert_eq!(cookies, (0..40).collect::<Vec<_>>(), "each job once");
        // Hashing 256 KiB takes the engine far longer than a nop.
        let sha: u64 = seen.iter().filter(|s| s.0 < 20).map(|s| s.1).sum();
        let nop: u64 = seen.iter().filter(|s| s.0 >= 20).map(|s| s.1).sum();
        assert!(
            sha > 10 * nop && sha > 20 * 10_000,
            "sha {sha} ns, nop {nop} ns"
        );
    }

    #[test]
    fn other_instances_jobs_run_between_a_long_jobs_slices_its_own_after_it() {
        let accel = SoftAccel::new(1);
        let a = bound(&accel, 1, &[(0, 4 << 20)]);
        let b = bound(&accel, 2, &[(0, 1 << 20)]);
        let input = corpus(1 << 20);
        write(&a, 0, &input);
        write(&b, 0, &corpus(4096));
        let long_qp = accel.open_queue_pair(1, 0).unwrap();
        let same_instance = accel.open_queue_pair(1, 1).unwrap();
        let other = accel.open_queue_pair(2, 0).unwrap();
        let order = Arc::new(Recorded::default());
        for qp in [&long_qp, &same_instance, &other] {
            qp.observe(order.clone());
        }
        // gzip level 12 of 1 MiB: 64 slices of 16 KiB, tens of milliseconds;
        // beside it, SHA-256 jobs of 256 KiB, long enough that the time
        // they take inside it shows (below).
        let mut long = job(Opcode::GzipCompress, 0, 1 << 20, 2 << 20, 1 << 20, 1);
        long.param = 12;
        let t0 = Instant::now();
        long_qp.submit(&[long]).unwrap();
        let sha = |cookie| {
            job(
                Opcode::Sha256,
                0,
                256 << 10,
                0x10_0000 + cookie * 64,
                32,
                cookie,
            )
        };
        other
            .submit(&(100..110).map(sha).collect::<Vec<_>>())
            .unwrap();
        same_instance
            .submit(
                &(200..205)
                    .map(|c| job(Opcode::Crc32c, 0, 4096, 0, 0, c))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let r = long_qp.completions().recv_timeout(TIMEOUT).unwrap();
        let wall = t0.elapsed().as_nanos() as u64;
        assert_eq!(r.status, JobStatus::Ok);
        for qp in [&other, &same_instance] {
            while qp.in_flight() > 0 {
                qp.completions().recv_timeout(TIMEOUT).unwrap();
            }
        }
        // One stream, whatever ran between its slices.
        let packed = read(&a, 2 << 20, r.bytes as usize);
        assert_eq!(
            crate::accel::reference::decode(wdvirt_abi::Format::Gzip, &packed),
            input
        );
        let mut alone = vec![0u8; 1 << 20];
        let n = compress_as_engine(
            wdvirt_abi::Format::Gzip,
            12,
            &input,
            &mut alone,
            &mut Scratch::new(),
        )
        .unwrap();
        assert_eq!(
            alone[..n as usize],
            packed[..],
            "the same bytes as with nothing between"
        );
        let order = order.0.lock().clone();
        let at = |c: u64| order.iter().position(|o| o.0 == c).unwrap();
        // The other instance's jobs ran inside the long one; its own
        // instance's other queue waited for it, in order.
        assert!((100..110).all(|c| at(c) < at(1)), "{order:?}");
        assert!((200..205).all(|c| at(c) > at(1)), "{order:?}");
        let own: Vec<usize> = (200..205).map(at).collect();
        assert!(own.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        // The long job is charged its own time, not the jobs run inside
        // it: the two together fit in the time the long job took (charged
        // the whole span, it alone would fill it).
        let long_ns = order[at(1)].1;
        let inside: u64 = order
            .iter()
            .filter(|o| (100..110).contains(&o.0))
            .map(|o| o.1)
            .sum();
        assert!(long_ns > 0 && inside > 0, "{order:?}");
        assert!(long_ns + inside <= wall, "{long_ns} + {inside} > {wall} ns");
    }

    /// Through the QoS scheduler, as the device uses it: another
    /// instance's job offered while a long one runs is held by the
    /// scheduler (the engine is not hungry) and reaches the engine between
    /// two slices, so it completes long before the long job.
    #[test]
    fn through_the_scheduler_an_owed_instances_job_runs_between_a_long_jobs_slices() {
        let sched = crate::qos::ScheduledAccel::new(SoftAccel::new(1), 1).unwrap();
        let a = space(&[(0, 4 << 20)]);
        let b = space(&[(0, 1 << 20)]);
        sched.bind_pasid(1, a.clone()).unwrap();
        sched.bind_pasid(2, b.clone()).unwrap();
        write(&a, 0, &corpus(1 << 20));
        write(&b, 0, &corpus(4096));
        let long_qp = sched.open_queue_pair(1, 0).unwrap();
        let other = sched.open_queue_pair(2, 0).unwrap();
        let mut long = job(Opcode::GzipCompress, 0, 1 << 20, 2 << 20, 1 << 20, 1);
        long.param = 12;
        assert_eq!(long_qp.submit(&[long]).unwrap(), 1);
        let crcs: Vec<Job> = (100..103)
            .map(|c| job(Opcode::Crc32c, 0, 4096, 0, 0, c))
            .collect();
        assert_eq!(other.submit(&crcs).unwrap(), 3, "held by the scheduler");
        let mut order = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        while order.len() < 4 {
            assert!(Instant::now() < deadline, "{order:?}");
            crossbeam_channel::select! {
                recv(long_qp.completions()) -> r => order.push(r.unwrap()),
                recv(other.completions()) -> r => order.push(r.unwrap()),
                default(Duration::from_millis(50)) => {}
            }
        }
        assert!(order.iter().all(|r| r.status == JobStatus::Ok), "{order:?}");
        let cookies: Vec<u64> = order.iter().map(|r| r.cookie).collect();
        assert_eq!(cookies, [100, 101, 102, 1], "the long job last");
    }

    #[test]
    fn an_engine_with_work_waiting_reports_short_jobs_in_runs() {
        struct Runs(Mutex<Vec<Vec<u64>>>);
        impl EngineObserver for Runs {
            fn job_finished(&self, job: &Job, _: u64, _: Instant) {
                self.0.lock().push(vec![job.cookie]);
            }
            fn jobs_finished(&self, done: &[(Job, u64)], _: Instant) {
                self.0
                    .lock()
                    .push(done.iter().map(|d| d.0.cookie).collect());
            }
        }
        let accel = SoftAccel::new(1);
        let mem = bound(&accel, 1, &[(0, 2 << 20)]);
        write(&mem, 0, &corpus(1 << 20));
        let qp = accel.open_queue_pair(1, 0).unwrap();
        let runs = Arc::new(Runs(Mutex::new(Vec::new())));
        qp.observe(runs.clone());
        // A long job first, so the 200 nops behind it wait in the FIFO.
        let jobs: Vec<Job> = std::iter::once(job(Opcode::Sha256, 0, 1 << 20, 0x10_0000, 32, 0))
            .chain((1..=200).map(|i| job(Opcode::Nop, 0, 0, 0, 0, i)))
            .collect();
        run_jobs(&*qp, &jobs);
        let deadline = Instant::now() + TIMEOUT;
        while runs.0.lock().iter().map(Vec::len).sum::<usize>() < 201 {
            assert!(Instant::now() < deadline, "not every job was reported");
            std::thread::sleep(Duration::from_millis(1));
        }
        let runs = runs.0.lock().clone();
        let mut cookies: Vec<u64> = runs.iter().flatten().copied().collect();
        assert_eq!(cookies.len(), 201, "each job once");
        cookies.sort_unstable();
        assert_eq!(cookies, (0..=200).collect::<Vec<_>>());
        assert!(
            runs.iter()
                .all(|r| !r.is_empty() && r.len() <= super::super::engine_time::RUN_JOBS)
        );
        // Reported per job, that would be 201 calls; in runs of 32, about 7.
        assert!(runs.len() < 100, "{} reports: {runs:?}", runs.len());
    }

    #[test]
    fn unbound_pasid_is_bad_address() {
        let accel = SoftAccel::new(1);
        // Never bound.
        let qp = accel.open_queue_pair(42, 0).unwrap();
        let r = run_one(&*qp, job(Opcode::Crc32c, 0, 16, 0, 0, 9));
        assert_eq!((r.cookie, r.status), (9, JobStatus::BadAddress));

        // Bound, then unbound: jobs stop reaching memory.
        let mem = bound(&accel, 42, &[(0, 1 << 16)]);
        let r = run_one(&*qp, job(Opcode::Crc32c, 0, 16, 0, 0, 10));
        assert_eq!(r.status, JobStatus::Ok);
        accel.unbind_pasid(42).unwrap();
        let r = run_one(
            &*qp,
            Job {
                param: 1,
                ..job(Opcode::Fill, 0, 0, 0, 16, 11)
            },
        );
        assert_eq!(r.status, JobStatus::BadAddress);
        assert_eq!(read(&mem, 0, 16), vec![0; 16]);
        // Nop touches no memory, but still completes.
        let r = run_one(&*qp, job(Opcode::Nop, 0, 0, 0, 0, 12));
        assert_eq!(r.status, JobStatus::Ok);
    }

    #[test]
    fn pasids_see_only_their_own_memory() {
        let accel = SoftAccel::new(2);
        let iova = 0x2000u64;
        let a = bound(&accel, 1, &[(0, 1 << 16)]);
        let b = bound(&accel, 2, &[(0, 1 << 16)]);
        write(&a, iova, b"memory of guest A");
        write(&b, iova, b"memory of guest B");
        let qa = accel.open_queue_pair(1, 0).unwrap();
        let qb = accel.open_queue_pair(2, 0).unwrap();

        let crc = |qp: &dyn QueuePair| run_one(qp, job(Opcode::Crc32c, iova, 17, 0, 0, 0)).result;
        assert_eq!(crc(&*qa), ops::crc32c(b"memory of guest A"));
        assert_eq!(crc(&*qb), ops::crc32c(b"memory of guest B"));

        // A copy on A's queue writes only A's memory.
        let r = run_one(&*qa, job(Opcode::Copy, iova, 17, 0x8000, 17, 0));
        assert_eq!(r.status, JobStatus::Ok);
        assert_eq!(read(&a, 0x8000, 17), b"memory of guest A");
        assert_eq!(read(&b, 0x8000, 17), vec![0; 17]);

        // A's queue pair cannot reach an address only B has.
        let c = bound(&accel, 3, &[(0x10_0000, 1 << 16)]);
        write(&c, 0x10_0000, b"C");
        let r = run_one(&*qa, job(Opcode::Crc32c, 0x10_0000, 1, 0, 0, 0));
        assert_eq!(r.status, JobStatus::BadAddress);
    }

    #[test]
    fn writes_mark_dirty_pages_and_reads_do_not() {
        let accel = SoftAccel::new(1);
        let mem = bound(&accel, 5, &[(0, 64 * PAGE as usize)]);
        let qp = accel.open_queue_pair(5, 0).unwrap();
        let dirty = |page: u64| {
            let m = mem.memory();
            let r = m.find_region(GuestAddress(0)).unwrap();
            r.bitmap().dirty_at((page * PAGE) as usize)
        };
        // The test's own setup writes would dirty pages too: start from a
        // clean bitmap by writing nothing before the job.
        assert!((0..64).all(|p| !dirty(p)));

        // Copy 2.5 pages from page 1 to the middle of page 10: pages 10..=12 dirty.
        let r = run_one(
            &*qp,
            job(
                Opcode::Copy,
                PAGE,
                (5 * PAGE / 2) as u32,
                10 * PAGE + 100,
                (5 * PAGE / 2) as u32,
                0,
            ),
        );
        assert_eq!(r.status, JobStatus::Ok);
        let set: Vec<u64> = (0..64).filter(|&p| dirty(p)).collect();
        assert_eq!(set, vec![10, 11, 12]);

        // CRC and Compare only read.
        run_one(
            &*qp,
            job(Opcode::Crc32c, 20 * PAGE, 4 * PAGE as u32, 0, 0, 0),
        );
        run_one(
            &*qp,
            job(
                Opcode::Compare,
                30 * PAGE,
                PAGE as u32,
                40 * PAGE,
                PAGE as u32,
                0,
            ),
        );
        let set: Vec<u64> = (0..64).filter(|&p| dirty(p)).collect();
        assert_eq!(set, vec![10, 11, 12]);

        // SHA-256 into page 50 dirties just it.
        run_one(&*qp, job(Opcode::Sha256, 0, 64, 50 * PAGE, 32, 0));
        assert!(dirty(50));
        assert!(!dirty(49) && !dirty(51));
    }

    #[test]
    fn a_one_shot_sha256_reads_only_the_state_sized_head_of_a_large_dst() {
        let accel = SoftAccel::new(1);
        let mem = bound(&accel, 4, &[(0, 4 << 20)]);
        write(&mem, 0, b"abc");
        let qp = accel.open_soft_queue_pair(4).unwrap();
        // A 1 MiB digest buffer: the engine checks its head for a state it
        // must not hash over, and reads nothing more of it.
        let r = run_one(&qp, job(Opcode::Sha256, 0, 3, 1 << 20, 1 << 20, 1));
        assert_eq!(r.status, JobStatus::Ok);
        let st = qp.stats();
        assert_eq!(
            st.counters.bytes_in,
            3 + u64::from(wdvirt_abi::SHA256_STATE_SIZE)
        );
    }

    #[test]
    fn thousand_jobs_complete_exactly_once() {
        let accel = SoftAccel::new(2);
        let mem = bound(&accel, 3, &[(0, 1 << 20)]);
        let data = corpus(64 * 1000);
        write(&mem, 0, &data);
        let qa = accel.open_soft_queue_pair(3).unwrap();
        let qb = accel.open_soft_queue_pair(3).unwrap();
        let jobs: Vec<Job> = (0..1000u64)
            .map(|i| job(Opcode::Crc32c, i * 64, 64, 0, 0, i))
            .collect();
        // A second queue pair on the same PASID works while A's batch is queued.
        qa.submit(&jobs).unwrap();
        let rb = run_one(&qb, job(Opcode::Crc32c, 0, 64, 0, 0, 77));
        assert_eq!(rb.result, ops::crc32c(&data[..64]));

        let mut seen = vec![false; 1000];
        for _ in 0..1000 {
            let r = qa.completions().recv_timeout(TIMEOUT).expect("completion");
            let i = r.cookie as usize;
            assert!(!seen[i], "cookie {i} twice");
            seen[i] = true;
            assert_eq!(r.status, JobStatus::Ok);
            assert_eq!(r.result, ops::crc32c(&data[i * 64..(i + 1) * 64]));
        }
        assert!(seen.iter().all(|&s| s));
        // The engine counts a job out just after sending its result: the
        // last decrement may trail the last completion by a moment.
        let deadline = Instant::now() + TIMEOUT;
        while qa.in_flight() != 0 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(qa.in_flight(), 0);
        assert!(qa.completions().try_recv().is_err(), "an extra completion");
        let st = qa.stats();
        assert_eq!(
            st.counters,
            CounterSnapshot {
                jobs: 1000,
                bytes_in: 64_000,
                ..Default::default()
            }
        );
        let engine_jobs: u64 = accel.stats().engines.iter().map(|e| e.counters.jobs).sum();
        assert_eq!(engine_jobs, 1001);
    }

    /// utime + stime of a thread, in clock ticks, and its state letter.
    fn thread_cpu(tid: i32) -> (char, u64) {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Fields after the parenthesised command name: state is field 3,
        // utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let state = f[0].chars().next().unwrap();
        (
            state,
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap(),
        )
    }

    /// The engines' thread ids, once each has started.
    fn engine_tids(accel: &SoftAccel) -> Vec<i32> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let t: Vec<i32> = accel.stats().engines.iter().map(|e| e.tid).collect();
            if t.iter().all(|&t| t > 0) || Instant::now() > deadline {
                break t;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Binds thread `tid` (0: the caller) to the first CPU this process
    /// may run on (not always CPU 0 in a container).
    fn pin_to_one_cpu(tid: i32) {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity,
        // CPU_ISSET, CPU_SET and sched_setaffinity only read and write the
        // sets passed, of `size` bytes.
        let r = unsafe {
            let mut allowed: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(libc::sched_getaffinity(0, size, &mut allowed), 0);
            let first = (0..libc::CPU_SETSIZE as usize)
                .find(|&c| libc::CPU_ISSET(c, &allowed))
                .expect("a CPU to run on");
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(first, &mut set);
            libc::sched_setaffinity(tid, size, &set)
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }

    /// A thread that never sleeps, on the CPU `pin_to_one_cpu` picks,
    /// until dropped: whatever shares that CPU gets about half of it.
    struct Spinner {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Spinner {
        fn start() -> Spinner {
            let stop = Arc::new(AtomicBool::new(false));
            let theirs = stop.clone();
            let thread = std::thread::spawn(move || {
                pin_to_one_cpu(0);
                while !theirs.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
            Spinner {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Spinner {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn a_preempted_engine_charges_the_time_it_ran_not_the_time_it_waited() {
        let accel = SoftAccel::new(1);
        let (_mem, qp, seen) = observed_with_data(&accel);
        // The engine shares one CPU with a thread that never sleeps: the
        // kernel gives each about half of it.
        pin_to_one_cpu(engine_tids(&accel)[0]);
        let spinner = Spinner::start();
        let jobs: Vec<Job> = (0..200)
            .map(|i| job(Opcode::Sha256, 0, 256 << 10, 0x8_0000 + i * 64, 32, i))
            .collect();
        let t0 = Instant::now();
        run_jobs(&*qp, &jobs);
        let wall = t0.elapsed().as_nanos() as u64;
        drop(spinner);
        wait_reported(&seen, jobs.len());
        // Charged by wall-clock time, the jobs would cost about all of
        // `wall` (the engine was never idle); by the time the engine ran,
        // about half.
        let charged: u64 = seen.0.lock().iter().map(|s| s.1).sum();
        assert!(
            charged > 0 && charged < wall * 3 / 4,
            "charged {charged} ns of {wall} ns"
        );
    }

    #[test]
    fn a_preempted_callers_thread_charges_the_time_it_ran_not_the_time_it_waited() {
        let accel = SoftAccel::new(1);
        let (_mem, qp, _seen) = observed_with_data(&accel);
        // This thread shares one CPU with a thread that never sleeps.
        pin_to_one_cpu(0);
        let spinner = Spinner::start();
        // Batches of some 300 µs: each reads the thread's CPU clock.
        let jobs: Vec<Job> = (0..32)
            .map(|i| job(Opcode::Sha256, 0, 16 << 10, 0x8_0000 + i * 64, 32, i))
            .collect();
        let mut done = Vec::new();
        std::thread::sleep(Duration::from_millis(10));
        let (t0, cpu0) = (Instant::now(), thread_cpu_ns());
        for _ in 0..150 {
            assert_eq!(qp.run_here(&jobs, &mut done), Some(jobs.len()));
        }
        let (wall, cpu) = (t0.elapsed().as_nanos() as u64, thread_cpu_ns() - cpu0);
        drop(spinner);
        assert!(done.iter().all(|(r, _)| r.status == JobStatus::Ok));
        // Charged by wall-clock time, the jobs would cost well over the
        // thread's CPU time (about 0.7 of `wall` here, against 0.5); by
        // the time it ran, at most that.
        let charged: u64 = done.iter().map(|(_, ns)| ns).sum();
        assert!(
            charged > 0 && charged <= cpu + cpu / 20 && cpu < wall * 3 / 4,
            "charged {charged} ns, on a CPU {cpu} ns, of {wall} ns"
        );
    }

    #[test]
    fn a_callers_thread_times_each_job_of_a_mixed_batch_and_shares_out_an_alike_one() {
        let accel = SoftAccel::new(1);
        let (_mem, qp, _seen) = observed_with_data(&accel);
        let copy = |i| job(Opcode::Copy, 0, 64, 0x8_0000 + i * 64, 64, i);
        let sha = job(Opcode::Sha256, 0, 256 << 10, 0x9_0000, 32, 9);
        // Mixed: the SHA-256 of 256 KiB (about 100 µs) is charged its own
        // time, not a fifth of the batch's.
        let mixed = [copy(0), copy(1), sha, copy(2), copy(3)];
        let mut done = Vec::new();
        assert_eq!(qp.run_here(&mixed, &mut done), Some(5));
        let ns: Vec<u64> = done.iter().map(|(_, ns)| *ns).collect();
        let copies = ns[0] + ns[1] + ns[3] + ns[4];
        assert!(ns[2] > 10 * copies, "{ns:?}");
        // Alike (one opcode, the same lengths): each job the same share.
        done.clear();
        let alike: Vec<Job> = (0..8)
            .map(|i| job(Opcode::Sha256, 0, 64 << 10, 0x9_0000 + i * 64, 32, i))
            .collect();
        let t0 = Instant::now();
        assert_eq!(qp.run_here(&alike, &mut done), Some(8));
        let wall = t0.elapsed().as_nanos() as u64;
        assert!(done.iter().all(|(r, _)| r.status == JobStatus::Ok));
        let each = done[0].1;
        assert!(done.iter().all(|(_, ns)| *ns == each), "{done:?}");
        assert!(each > 0 && each * 8 <= wall, "{each} ns each of {wall} ns");
    }

    #[test]
    fn idle_engines_sleep() {
        let accel = SoftAccel::new(2);
        let tids = engine_tids(&accel);
        for &t in &tids {
            let name = std::fs::read_to_string(format!("/proc/self/task/{t}/comm")).unwrap();
            assert!(name.starts_with("wd-engine-"), "{name}");
        }
        std::thread::sleep(Duration::from_millis(50));
        let before: Vec<(char, u64)> = tids.iter().map(|&t| thread_cpu(t)).collect();
        std::thread::sleep(Duration::from_millis(200));
        let after: Vec<(char, u64)> = tids.iter().map(|&t| thread_cpu(t)).collect();
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.0, 'S', "engine not sleeping");
            // A spinning thread would gain ~20 ticks in 200 ms.
            assert!(a.1 - b.1 <= 2, "engine used CPU while idle: {b:?} -> {a:?}");
        }
    }

    #[test]
    fn dropping_a_queue_pair_discards_unstarted_jobs() {
        let accel = SoftAccel::new(1);
        let _mem = bound(&accel, 1, &[(0, 1 << 16)]);
        let qp = accel.open_queue_pair(1, 0).unwrap();
        let jobs: Vec<Job> = (0..10)
            .map(|i| job(Opcode::Crc32c, 0, 64, 0, 0, i))
            .collect();
        {
            // Hold the PASID table: the one engine blocks on its first job.
            let table = accel.common.spaces.write();
            qp.submit(&jobs).unwrap();
            drop(qp);
            drop(table);
        }
        assert!(accel.stats().queue_pairs.is_empty());
        let deadline = Instant::now() + TIMEOUT;
        let c = loop {
            let c = accel.stats().engines[0].counters;
            if c.jobs + c.discarded == 10 || Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(c.jobs + c.discarded, 10);
        // At most the job the engine had already picked up ran.
        assert!(c.jobs <= 1, "{c:?}");
    }

    #[test]
    fn closing_a_queue_pair_discards_unstarted_jobs_and_reports_running_ones() {
        let accel = SoftAccel::new(1);
        let _mem = bound(&accel, 1, &[(0, 1 << 16)]);
        let qp = accel.open_queue_pair(1, 0).unwrap();
        let jobs: Vec<Job> = (0..10)
            .map(|i| job(Opcode::Crc32c, 0, 64, 0, 0, i))
            .collect();
        {
            let table = accel.common.spaces.write();
            qp.submit(&jobs).unwrap();
            qp.close();
            drop(table);
        }
        let deadline = Instant::now() + TIMEOUT;
        while qp.in_flight() > 0 {
            assert!(Instant::now() < deadline, "close did not drain");
            std::thread::sleep(Duration::from_millis(2));
        }
        let results = qp.completions().try_iter().count() as u64;
        let c = accel.stats().engines[0].counters;
        assert_eq!(
            (results, c.jobs + c.discarded),
            (c.jobs, 10),
            "a result for each job that ran, none for the rest"
        );
        assert!(c.jobs <= 1, "{c:?}");
        assert!(matches!(qp.submit(&jobs[..1]), Err(AccelError::Closed)));
    }

    #[test]
    fn shutdown_finishes_queued_jobs_then_refuses() {
        let accel = SoftAccel::new(2);
        let _mem = bound(&accel, 1, &[(0, 1 << 16)]);
        let qp = accel.open_queue_pair(1, 0).unwrap();
        let jobs: Vec<Job> = (0..200)
            .map(|i| job(Opcode::Crc32c, 0, 4096, 0, 0, i))
            .collect();
        qp.submit(&jobs).unwrap();
        accel.shutdown();
        assert_eq!(qp.in_flight(), 0);
        assert_eq!(qp.completions().try_iter().count(), 200);
        assert!(matches!(qp.submit(&jobs[..1]), Err(AccelError::Closed)));
        assert!(matches!(
            accel.open_queue_pair(1, 0),
            Err(AccelError::Closed)
        ));
        accel.shutdown(); // idempotent

        // Dropping the last handle joins the threads (no hang, no leak of tids).
        let accel = SoftAccel::new(2);
        let weak = Arc::downgrade(&accel.common);
        drop(accel);
        assert!(
            weak.upgrade().is_none(),
            "engines still hold the accelerator state"
        );
    }

    #[test]
    fn pasid_table_and_queue_pair_limits() {
        let accel = SoftAccel::with_config(SoftAccelConfig {
            engines: 1,
            max_xfer: 4096,
            max_queue_pairs: 2,
        })
        .unwrap();
        assert_eq!(accel.name(), "soft");
        assert_eq!(accel.supported_ops(), wdvirt_abi::ALL_OPS);
        assert_eq!(accel.max_xfer(), 4096);
        accel.bind_pasid(1, space(&[(0, 4096)])).unwrap();
        assert!(matches!(
            accel.bind_pasid(1, space(&[(0, 4096)])),
            Err(AccelError::PasidInUse(1))
        ));
        assert!(matches!(
            accel.unbind_pasid(2),
            Err(AccelError::UnknownPasid(2))
        ));

        let q1 = accel.open_queue_pair(1, 0).unwrap();
        let q2 = accel.open_queue_pair(1, 0).unwrap();
        assert!(matches!(
            accel.open_queue_pair(1, 0),
            Err(AccelError::NoQueuePairs(2))
        ));
        drop(q1);
        let _q3 = accel.open_queue_pair(1, 0).unwrap();
        let r = run_one(&*q2, job(Opcode::Crc32c, 0, 4097, 0, 0, 0));
        assert_eq!(r.status, JobStatus::BadLength);
    }

    #[test]
    fn swapped_map_is_seen_by_later_jobs() {
        let accel = SoftAccel::new(1);
        let mem = bound(&accel, 1, &[(0, 1 << 16)]);
        let qp = accel.open_queue_pair(1, 0).unwrap();
        assert_eq!(
            run_one(&*qp, job(Opcode::Crc32c, 0x2_0000, 8, 0, 0, 0)).status,
            JobStatus::BadAddress
        );
        // DMA_MAP of a second region: publish a new map in the same AddressSpace.
        let old = mem.memory();
        let grown = old
            .insert_region(Arc::new(region(0x2_0000, 1 << 16)))
            .unwrap();
        drop(old);
        mem.lock().unwrap().replace(grown);
        assert_eq!(
            run_one(&*qp, job(Opcode::Crc32c, 0x2_0000, 8, 0, 0, 0)).status,
            JobStatus::Ok
        );
    }
}
