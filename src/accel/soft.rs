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
//!   promised here: the QoS layer sits above).
//!
//! Dropping a queue pair **discards** its jobs that no engine has started (no
//! completion is sent: the receiver is gone with it); a job already running
//! finishes, including its writes to guest memory. Dropping the last handle to
//! the accelerator (or [`SoftAccel::shutdown`]) lets the engines finish every
//! job already queued, then stops and joins them; later submissions fail with
//! [`AccelError::Closed`].

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use wdvirt_abi::{ALL_OPS, JobStatus, Opcode};

use super::ops::{self, Scratch};
use super::{AccelError, Accelerator, AddressSpace, GuestMemory, Job, JobResult, Pasid, QueuePair};

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

impl Counters {
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
    closed: AtomicBool,
    counters: Counters,
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
    spaces: RwLock<HashMap<Pasid, AddressSpace>>,
    queue_pairs: Mutex<HashMap<u64, Arc<QpShared>>>,
    next_qp_id: AtomicU64,
    /// False once shutdown began. Submitters hold the read lock across their
    /// sends, so no job can slip in behind the engines' stop messages.
    running: RwLock<bool>,
    jobs: Sender<Msg>,
    max_xfer: u32,
    max_queue_pairs: usize,
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
                scratch: Scratch::new(),
                src: Vec::new(),
                dst: Vec::new(),
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
            closed: AtomicBool::new(false),
            counters: Counters::default(),
        });
        qps.insert(id, Arc::clone(&shared));
        Ok(SoftQueuePair {
            common: Arc::clone(&self.common),
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
        spaces.insert(pasid, space);
        Ok(())
    }

    fn unbind_pasid(&self, pasid: Pasid) -> Result<(), AccelError> {
        match self.common.spaces.write().remove(&pasid) {
            Some(_) => Ok(()),
            None => Err(AccelError::UnknownPasid(pasid)),
        }
    }

    fn open_queue_pair(&self, pasid: Pasid) -> Result<Box<dyn QueuePair>, AccelError> {
        Ok(Box::new(self.open_soft_queue_pair(pasid)?))
    }
}

/// A queue pair of a [`SoftAccel`]. Dropping it discards its unstarted jobs.
pub struct SoftQueuePair {
    common: Arc<Common>,
    shared: Arc<QpShared>,
    completions: Receiver<JobResult>,
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
    fn submit(&self, jobs: &[Job]) -> Result<(), AccelError> {
        let running = self.common.running.read();
        if !*running {
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
        Ok(())
    }

    fn completions(&self) -> &Receiver<JobResult> {
        &self.completions
    }

    fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }
}

impl Drop for SoftQueuePair {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.common.queue_pairs.lock().remove(&self.shared.id);
    }
}

/// One engine thread's state.
struct Engine {
    common: Arc<Common>,
    info: Arc<EngineInfo>,
    jobs: Receiver<Msg>,
    scratch: Scratch,
    /// Bounce buffers: grown on demand, never past `max_xfer`.
    src: Vec<u8>,
    dst: Vec<u8>,
}

/// What one job did, before it is reported.
struct Done {
    status: JobStatus,
    out: ops::Output,
    bytes_in: u64,
}

impl Done {
    fn failed(status: JobStatus, bytes_in: u64) -> Self {
        Done {
            status,
            out: ops::Output::default(),
            bytes_in,
        }
    }
}

impl Engine {
    fn run(&mut self) {
        self.info.tid.store(current_tid(), Ordering::Relaxed);
        // `recv` blocks: an idle engine sleeps in the kernel.
        while let Ok(msg) = self.jobs.recv() {
            match msg {
                Msg::Stop => break,
                Msg::Job { job, qp } => self.serve(job, &qp),
            }
        }
        tracing::trace!("software engine stopped");
    }

    fn serve(&mut self, job: Job, qp: &QpShared) {
        if qp.closed.load(Ordering::Acquire) {
            self.info.counters.discarded.fetch_add(1, Ordering::Relaxed);
            qp.counters.discarded.fetch_add(1, Ordering::Relaxed);
            qp.in_flight.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let done = self.execute(&job, qp.pasid);
        let bytes_out = if done.status == JobStatus::Ok {
            u64::from(done.out.bytes)
        } else {
            0
        };
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
        let _ = qp.done.send(JobResult {
            cookie: job.cookie,
            status: done.status,
            bytes: done.out.bytes,
            result: done.out.result,
        });
        // After the send, so that `in_flight() == 0` means every result is queued.
        qp.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn execute(&mut self, job: &Job, pasid: Pasid) -> Done {
        let max = self.common.max_xfer;
        if job.src_len > max || job.dst_len > max {
            return Done::failed(JobStatus::BadLength, 0);
        }
        let reads_src = job.op.reads_src();
        let reads_dst = job.op == Opcode::Compare;
        let uses_dst = job.op.writes_dst() || reads_dst;
        if (reads_src && job.src.checked_add(u64::from(job.src_len)).is_none())
            || (uses_dst && job.dst.checked_add(u64::from(job.dst_len)).is_none())
        {
            return Done::failed(JobStatus::BadLength, 0);
        }

        // The IOMMU walk: this queue pair's PASID, looked up now. The clone is
        // an `Arc` bump; the loaded map stays valid until the job ends.
        let Some(space) = self.common.spaces.read().get(&pasid).cloned() else {
            return Done::failed(JobStatus::BadAddress, 0);
        };
        let mem = space.memory();
        let src_len = job.src_len as usize;
        let dst_len = job.dst_len as usize;
        if (reads_src && !mapped(&mem, job.src, src_len))
            || (uses_dst && !mapped(&mem, job.dst, dst_len))
        {
            return Done::failed(JobStatus::BadAddress, 0);
        }

        let src = bounce(&mut self.src, if reads_src { src_len } else { 0 });
        let dst = bounce(&mut self.dst, if uses_dst { dst_len } else { 0 });
        let mut bytes_in = 0u64;
        if reads_src {
            if mem.read_slice(src, GuestAddress(job.src)).is_err() {
                return Done::failed(JobStatus::BadAddress, 0);
            }
            bytes_in += src.len() as u64;
        }
        if reads_dst {
            if mem.read_slice(dst, GuestAddress(job.dst)).is_err() {
                return Done::failed(JobStatus::BadAddress, bytes_in);
            }
            bytes_in += dst.len() as u64;
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

        if job.op.writes_dst() {
            let n = (out.bytes as usize).min(dst.len());
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
        }
    }
}

/// Whether `[addr, addr + len)` lies wholly inside the map (holes included).
fn mapped(mem: &GuestMemory, addr: u64, len: usize) -> bool {
    GuestMemoryBackend::check_range(mem, GuestAddress(addr), len)
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
