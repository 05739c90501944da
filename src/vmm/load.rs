//! The guest's verified load: the real guest driver (`wdvirt_guest`)
//! keeping several queues of a [`Vm`] full of mixed copy / CRC32C /
//! SHA-256 / deflate jobs, one thread for all of them, and checking every
//! completion: a job submitted and not completed before (else it counts as
//! repeated), its status OK and its result right (else failed). Completions
//! that come before an older job's are counted (the ABI promises
//! completion order, not submission order), as are jobs and verified ones.
//!
//! The load is the guest's CPU: [`Load::pause`] stops it between two
//! passes over its queues and hands out its state as bytes (what a real
//! guest keeps in its RAM and vCPU registers: each queue's ring cursor and
//! which job is in which slot; the jobs' data and the rings themselves are
//! in guest RAM, which migrates on its own). [`Load::adopt`] goes on from
//! those bytes in another process, on the migrated RAM and device, with the
//! counters carried over, so that one VM's summary covers all its hosts.
//!
//! Used by `wdvirt vm` and `tests/migration.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use wdvirt_abi::{CompletionEntry, JobStatus, Opcode};
use wdvirt_guest::{Device, DmaError, DmaPool, DriverError, JobSpec, PoolBuffer, QueueCursor};

use super::migrate::Vm;

/// Each job slot's input and output room.
pub const SLOT_SRC: u64 = 8 << 10;
pub const SLOT_DST: u64 = 16 << 10;
/// The deepest ring a load (or an image of one) may ask for.
pub const MAX_DEPTH: u32 = 1024;
/// How long the jobs left at a stop may take to complete.
const DRAIN: Duration = Duration::from_secs(30);
/// How long a queue with jobs in flight may go without a completion before
/// the load calls it stalled (a device gone, or a gap in the ring: the
/// driver reads completions in ring order, so it stops at a missing one).
pub const STALL: Duration = Duration::from_secs(10);
/// The image format [`Load::pause`] writes and [`Load::adopt`] reads.
const IMAGE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("guest driver: {0}")]
    Driver(#[from] DriverError),
    #[error("guest memory: {0}")]
    Dma(#[from] DmaError),
    #[error("the load's image is unusable: {0}")]
    Image(String),
    #[error("the load has stopped: {0}")]
    Stopped(String),
    #[error("cannot start the load's thread: {0}")]
    Thread(std::io::Error),
}

/// How much load.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Queues driven, from 0 (at most the device's).
    pub queues: u32,
    /// Each ring's depth, kept full.
    pub depth: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            queues: 4,
            depth: 32,
        }
    }
}

/// The load's counters, over the VM's whole life (carried across
/// migrations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadStats {
    /// Jobs submitted.
    pub jobs: u64,
    /// Jobs completed with status OK and the right result.
    pub verified: u64,
    /// Completions with an error status or a wrong result.
    pub failed: u64,
    /// Completions of a job not outstanding (completed before, or never
    /// submitted).
    pub repeated: u64,
    /// Completions that came before an older job's.
    pub reordered: u64,
}

#[derive(Default)]
struct Counters {
    jobs: AtomicU64,
    verified: AtomicU64,
    failed: AtomicU64,
    repeated: AtomicU64,
    reordered: AtomicU64,
    /// The first thing that went wrong, in words.
    first_failure: Mutex<Option<String>>,
}

impl Counters {
    fn seed(s: &LoadStats) -> Counters {
        let c = Counters::default();
        c.jobs.store(s.jobs, Ordering::Relaxed);
        c.verified.store(s.verified, Ordering::Relaxed);
        c.failed.store(s.failed, Ordering::Relaxed);
        c.repeated.store(s.repeated, Ordering::Relaxed);
        c.reordered.store(s.reordered, Ordering::Relaxed);
        c
    }
    fn stats(&self) -> LoadStats {
        LoadStats {
            jobs: self.jobs.load(Ordering::Acquire),
            verified: self.verified.load(Ordering::Acquire),
            failed: self.failed.load(Ordering::Acquire),
            repeated: self.repeated.load(Ordering::Acquire),
            reordered: self.reordered.load(Ordering::Acquire),
        }
    }
    fn failure(&self, what: String) {
        tracing::warn!("load: {what}");
        self.first_failure.lock().get_or_insert(what);
    }
}

/// A live view of a [`Load`]'s counters, for another thread.
#[derive(Clone)]
pub struct LoadCounters(Arc<Counters>);

impl LoadCounters {
    pub fn stats(&self) -> LoadStats {
        self.0.stats()
    }
}

/// What a load did, once it has stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadSummary {
    pub stats: LoadStats,
    pub queues: u32,
    /// Jobs submitted that never completed (after the drain).
    pub never_completed: u64,
    /// Completions the driver read, over the VM's life.
    pub completed: u64,
    /// The device's own count of completions (Q_COMPLETED, which travels
    /// with the device's state): equal to `completed` when no ring entry
    /// was skipped or read twice. `None` after a detach.
    pub device_completed: Option<u64>,
    /// The first failure in words, if any.
    pub failure: Option<String>,
    /// The load left for another host (a migration) rather than stopped.
    pub detached: bool,
}

impl LoadSummary {
    /// Every job submitted completed exactly once with the right result.
    pub fn all_verified(&self) -> bool {
        self.failure.is_none()
            && self.stats.failed == 0
            && self.stats.repeated == 0
            && (self.detached
                || (self.never_completed == 0
                    && self.stats.verified == self.stats.jobs
                    && self.device_completed == Some(self.completed)))
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Copy,
    Crc,
    Sha,
    Deflate,
}

/// Job `seq` of queue `index`: its kind, input and SQE, all from the two
/// numbers (so that a migrated guest needs only the tags in flight).
fn job(index: u32, seq: u32) -> (Kind, Vec<u8>) {
    let kind = [Kind::Copy, Kind::Crc, Kind::Sha, Kind::Deflate][(seq % 4) as usize];
    let len = if matches!(kind, Kind::Deflate) {
        8 << 10
    } else {
        4 << 10
    };
    let data = wdvirt_guest::workload::gen_data(u64::from(index) << 32 | u64::from(seq), len);
    (kind, data)
}

type Queue = wdvirt_guest::Queue<Arc<Vm>, Arc<Vm>>;
type Buffer = PoolBuffer<Arc<Vm>>;

/// One queue of the load: its ring kept full, each slot with its own
/// buffers, each tag the job's sequence number.
struct QueueLoad {
    q: Queue,
    index: u32,
    depth: u32,
    src: Buffer,
    dst: Buffer,
    free: Vec<u32>,
    next: u32,
    /// One past the highest tag completed.
    expect: u32,
    completed: u64,
    /// tag -> slot of every job in flight.
    out: BTreeMap<u32, u32>,
    /// The last completion, or when the queue last ran (not paused).
    progress: Instant,
}

/// One queue's part of an image.
#[derive(Serialize, Deserialize)]
struct QueueImage {
    index: u32,
    ops: u32,
    sq_tail: u32,
    cq_head: u32,
    src: u64,
    dst: u64,
    next: u32,
    expect: u32,
    completed: u64,
    /// (tag, slot) of every job in flight.
    out: Vec<(u32, u32)>,
}

/// What [`Load::pause`] hands out.
#[derive(Serialize, Deserialize)]
struct Image {
    version: u32,
    depth: u32,
    stats: LoadStats,
    queues: Vec<QueueImage>,
}

fn buffers(pool: &DmaPool<Arc<Vm>>, depth: u32) -> Result<(Buffer, Buffer), DmaError> {
    Ok((
        pool.alloc(SLOT_SRC * u64::from(depth), 64)?,
        pool.alloc(SLOT_DST * u64::from(depth), 64)?,
    ))
}

impl QueueLoad {
    fn new(
        dev: &Device<Arc<Vm>>,
        pool: &DmaPool<Arc<Vm>>,
        index: u32,
        depth: u32,
    ) -> Result<Self, LoadError> {
        let q = dev.queue(index, depth, dev.info().cap_ops, pool)?;
        let (src, dst) = buffers(pool, depth)?;
        Ok(QueueLoad {
            q,
            index,
            depth,
            src,
            dst,
            free: (0..depth).rev().collect(),
            next: 0,
            expect: 0,
            completed: 0,
            out: BTreeMap::new(),
            progress: Instant::now(),
        })
    }

    fn image(&self) -> QueueImage {
        let c = self.q.cursor();
        QueueImage {
            index: self.index,
            ops: self.q.ops_mask(),
            sq_tail: c.sq_tail,
            cq_head: c.cq_head,
            src: self.src.addr(),
            dst: self.dst.addr(),
            next: self.next,
            expect: self.expect,
            completed: self.completed,
            out: self.out.iter().map(|(&t, &s)| (t, s)).collect(),
        }
    }

    /// The slots `im` has in flight, or why it does not hold together.
    fn check_image(depth: u32, im: &QueueImage) -> Result<Vec<bool>, LoadError> {
        let bad = |what: String| LoadError::Image(format!("queue {}: {what}", im.index));
        let mut used = vec![false; depth as usize];
        let mut tags = std::collections::HashSet::with_capacity(im.out.len());
        for &(tag, slot) in &im.out {
            if slot >= depth || std::mem::replace(&mut used[slot as usize], true) {
                return Err(bad(format!("slot {slot} out of range or used twice")));
            }
            if tag >= im.next {
                return Err(bad(format!("tag {tag} in flight was never submitted")));
            }
            // Two slots under one tag would collapse into one entry on
            // adoption and a job be lost after the destination resumed.
            if !tags.insert(tag) {
                return Err(bad(format!("tag {tag} in flight twice")));
            }
        }
        let in_flight = im.sq_tail.wrapping_sub(im.cq_head);
        if in_flight as usize != im.out.len() || im.expect > im.next {
            return Err(bad(format!(
                "{in_flight} jobs in the rings, {} in the table, next tag {}, expected {}",
                im.out.len(),
                im.next,
                im.expect
            )));
        }
        Ok(used)
    }

    /// Goes on from `im` on `dev`, whose queue must run the rings the
    /// image's driver left (the same allocations in the same order).
    fn adopt(
        dev: &Device<Arc<Vm>>,
        pool: &DmaPool<Arc<Vm>>,
        depth: u32,
        im: &QueueImage,
    ) -> Result<Self, LoadError> {
        let bad = |what: String| LoadError::Image(format!("queue {}: {what}", im.index));
        let used = QueueLoad::check_image(depth, im)?;
        let cursor = QueueCursor {
            sq_tail: im.sq_tail,
            cq_head: im.cq_head,
        };
        let q = dev.adopt_queue(im.index, depth, im.ops, pool, cursor)?;
        let (src, dst) = buffers(pool, depth)?;
        if (src.addr(), dst.addr()) != (im.src, im.dst) {
            return Err(bad(format!(
                "job buffers at {:#x}/{:#x} here, {:#x}/{:#x} in the image",
                src.addr(),
                dst.addr(),
                im.src,
                im.dst
            )));
        }
        Ok(QueueLoad {
            q,
            index: im.index,
            depth,
            src,
            dst,
            free: (0..depth).rev().filter(|&s| !used[s as usize]).collect(),
            next: im.next,
            expect: im.expect,
            completed: im.completed,
            out: im.out.iter().copied().collect(),
            progress: Instant::now(),
        })
    }

    fn fill(&mut self, c: &Counters) -> Result<(), LoadError> {
        let mut sqes = Vec::new();
        while let Some(slot) = self.free.pop() {
            let seq = self.next;
            self.next = self.next.wrapping_add(1);
            let (kind, data) = job(self.index, seq);
            let len = data.len() as u32;
            let s = self.src.addr() + u64::from(slot) * SLOT_SRC;
            let d = self.dst.addr() + u64::from(slot) * SLOT_DST;
            self.src.write(u64::from(slot) * SLOT_SRC, &data)?;
            let spec = match kind {
                Kind::Copy => JobSpec::new(Opcode::Copy).src(s, len).dst(d, len),
                Kind::Crc => JobSpec::new(Opcode::Crc32c).src(s, len),
                Kind::Sha => JobSpec::new(Opcode::Sha256).src(s, len).dst(d, 32),
                Kind::Deflate => JobSpec::new(Opcode::DeflateCompress)
                    .src(s, len)
                    .dst(d, SLOT_DST as u32)
                    .param(1),
            };
            sqes.push(spec.to_sqe(seq));
            self.out.insert(seq, slot);
        }
        if !sqes.is_empty() {
            let n = self.q.submit(&sqes)?;
            c.jobs.fetch_add(n as u64, Ordering::AcqRel);
            if n != sqes.len() {
                // Never: at most `depth` jobs are out and the ring has
                // `depth` entries. Give the slots back rather than lose them.
                c.failure(format!(
                    "queue {}: the ring took {n} of {} jobs",
                    self.index,
                    sqes.len()
                ));
                for sqe in &sqes[n..] {
                    if let Some(slot) = self.out.remove(&sqe.tag) {
                        self.free.push(slot);
                    }
                }
            }
        }
        Ok(())
    }

    fn reap(&mut self, c: &Counters) -> Result<usize, LoadError> {
        let mut cqes = Vec::new();
        self.q.poll(&mut cqes)?;
        for e in &cqes {
            self.check(e, c)?;
        }
        if !cqes.is_empty() || self.out.is_empty() {
            self.progress = Instant::now();
        }
        Ok(cqes.len())
    }

    fn read(&self, at: u64, len: usize) -> Result<Vec<u8>, LoadError> {
        let mut v = vec![0u8; len];
        self.dst.read(at, &mut v)?;
        Ok(v)
    }

    /// Is `e`'s result what `kind` of `data` gives?
    fn right(
        &self,
        e: &CompletionEntry,
        kind: Kind,
        data: &[u8],
        at: u64,
    ) -> Result<bool, LoadError> {
        Ok(match kind {
            Kind::Copy => self.read(at, data.len())? == data,
            Kind::Crc => e.result == crate::accel::ops::crc32c(data),
            Kind::Sha => self.read(at, 32)? == sha2::Sha256::digest(data).to_vec(),
            Kind::Deflate => {
                let packed = self.read(at, (e.bytes as usize).min(SLOT_DST as usize))?;
                let mut plain = vec![0u8; data.len()];
                let n = libdeflater::Decompressor::new().deflate_decompress(&packed, &mut plain);
                matches!(n, Ok(n) if n == data.len()) && plain == data
            }
        })
    }

    /// One completion: a job in flight (else repeated), status OK and its
    /// result right (else failed).
    fn check(&mut self, e: &CompletionEntry, c: &Counters) -> Result<(), LoadError> {
        self.completed += 1;
        if e.tag != self.expect {
            c.reordered.fetch_add(1, Ordering::AcqRel);
        }
        self.expect = self.expect.max(e.tag.wrapping_add(1));
        let Some(slot) = self.out.remove(&e.tag) else {
            c.repeated.fetch_add(1, Ordering::AcqRel);
            c.failure(format!(
                "queue {}: tag {} completed but not in flight (repeated or never submitted)",
                self.index, e.tag
            ));
            return Ok(());
        };
        self.free.push(slot);
        let (kind, data) = job(self.index, e.tag);
        if e.status != JobStatus::Ok.code() {
            c.failed.fetch_add(1, Ordering::AcqRel);
            c.failure(format!(
                "queue {} tag {}: {kind:?} completed with status {:#x}",
                self.index, e.tag, e.status
            ));
        } else if !self.right(e, kind, &data, u64::from(slot) * SLOT_DST)? {
            c.failed.fetch_add(1, Ordering::AcqRel);
            c.failure(format!(
                "queue {} tag {}: {kind:?} gave a wrong result",
                self.index, e.tag
            ));
        } else {
            c.verified.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }
}

enum Ctl {
    /// Stop between two passes and send the image; then wait for the next.
    Pause(Sender<Vec<u8>>),
    Resume,
    /// Let the queues go without resetting them (the VM moved away).
    Detach,
    /// Stop submitting, drain, stop.
    Stop,
}

/// The load's thread, driven by [`Ctl`]s.
pub struct Load {
    ctl: Sender<Ctl>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<LoadSummary>>,
    queues: u32,
}

impl Load {
    /// Enables the device and `opts.queues` queues of `vm` and starts
    /// keeping them full.
    pub fn start(vm: &Arc<Vm>, opts: LoadOptions) -> Result<Load, LoadError> {
        if opts.depth == 0 || opts.depth > MAX_DEPTH {
            return Err(LoadError::Image(format!(
                "depth {} not in 1..={MAX_DEPTH}",
                opts.depth
            )));
        }
        let dev = Device::probe(vm.clone())?;
        dev.enable()?;
        let pool = vm.dma_pool()?;
        let loads = (0..opts.queues)
            .map(|q| QueueLoad::new(&dev, &pool, q, opts.depth))
            .collect::<Result<Vec<_>, _>>()?;
        Load::spawn(vm.clone(), loads, Counters::default())
    }

    /// Goes on from `image` (from [`Load::pause`] in another process) on a
    /// migrated `vm`: nothing in the image is trusted; a ring, slot or tag
    /// that does not fit what the device runs is refused.
    pub fn adopt(vm: &Arc<Vm>, image: &[u8]) -> Result<Load, LoadError> {
        let im = Load::parse(image)?;
        let dev = Device::probe(vm.clone())?;
        if im.queues.len() > dev.info().num_queues as usize
            || im
                .queues
                .iter()
                .enumerate()
                .any(|(i, q)| q.index as usize != i)
        {
            return Err(LoadError::Image(format!(
                "{} queues, not 0..n of the device's {}",
                im.queues.len(),
                dev.info().num_queues
            )));
        }
        let pool = vm.dma_pool()?;
        let loads = im
            .queues
            .iter()
            .map(|q| QueueLoad::adopt(&dev, &pool, im.depth, q))
            .collect::<Result<Vec<_>, _>>()?;
        Load::spawn(vm.clone(), loads, Counters::seed(&im.stats))
    }

    /// Whether `image` holds together (before a destination commits to
    /// it: what can only be checked against the running device is checked
    /// by [`Load::adopt`]).
    pub fn check_image(image: &[u8]) -> Result<(), LoadError> {
        Load::parse(image).map(|_| ())
    }

    fn parse(image: &[u8]) -> Result<Image, LoadError> {
        let im: Image =
            serde_json::from_slice(image).map_err(|e| LoadError::Image(e.to_string()))?;
        if im.version != IMAGE_VERSION {
            return Err(LoadError::Image(format!(
                "version {} (this guest reads {IMAGE_VERSION})",
                im.version
            )));
        }
        if im.depth == 0 || im.depth > MAX_DEPTH {
            return Err(LoadError::Image(format!("depth {}", im.depth)));
        }
        if im
            .queues
            .iter()
            .enumerate()
            .any(|(i, q)| q.index as usize != i)
        {
            return Err(LoadError::Image("queues not numbered 0..n".into()));
        }
        for q in &im.queues {
            QueueLoad::check_image(im.depth, q)?;
        }
        Ok(im)
    }

    fn spawn(vm: Arc<Vm>, loads: Vec<QueueLoad>, counters: Counters) -> Result<Load, LoadError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let counters = Arc::new(counters);
        let c = counters.clone();
        let queues = loads.len() as u32;
        let thread = std::thread::Builder::new()
            .name("guest-load".into())
            .spawn(move || drive(&vm, loads, &c, &rx))
            .map_err(LoadError::Thread)?;
        Ok(Load {
            ctl: tx,
            counters,
            thread: Some(thread),
            queues,
        })
    }

    pub fn stats(&self) -> LoadStats {
        self.counters.stats()
    }

    /// The counters, for another thread to watch.
    pub fn counters(&self) -> LoadCounters {
        LoadCounters(self.counters.clone())
    }

    pub fn queues(&self) -> u32 {
        self.queues
    }

    /// The load's thread is still at work.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// The first failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.counters.first_failure.lock().clone()
    }

    /// Stops the load between two passes (no guest write after this
    /// returns) and returns its image; [`Load::resume`] or
    /// [`Load::detach`] next.
    pub fn pause(&mut self) -> Result<Vec<u8>, LoadError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let gone = || {
            LoadError::Stopped(
                self.failure()
                    .unwrap_or_else(|| "the load's thread has ended".into()),
            )
        };
        self.ctl.send(Ctl::Pause(tx)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())
    }

    /// Goes on after [`Load::pause`].
    pub fn resume(&mut self) {
        let _ = self.ctl.send(Ctl::Resume);
    }

    /// After [`Load::pause`]: the guest has moved to another host; the
    /// queues are let go without touching the device.
    pub fn detach(mut self) -> LoadSummary {
        let _ = self.ctl.send(Ctl::Detach);
        self.join()
    }

    /// Stops submitting, waits for every job in flight, checks it, and
    /// sums up.
    pub fn finish(mut self) -> LoadSummary {
        let _ = self.ctl.send(Ctl::Stop);
        self.join()
    }

    fn join(&mut self) -> LoadSummary {
        let thread = self.thread.take().expect("joined once");
        thread.join().unwrap_or_else(|_| {
            self.counters.failure("the load's thread panicked".into());
            LoadSummary {
                stats: self.counters.stats(),
                queues: self.queues,
                never_completed: 0,
                completed: 0,
                device_completed: None,
                failure: self.failure(),
                detached: false,
            }
        })
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.ctl.send(Ctl::Stop);
            let _ = self.join();
        }
    }
}

fn image(loads: &[QueueLoad], c: &Counters) -> Vec<u8> {
    let im = Image {
        version: IMAGE_VERSION,
        depth: loads.first().map_or(1, |l| l.depth),
        stats: c.stats(),
        queues: loads.iter().map(QueueLoad::image).collect(),
    };
    serde_json::to_vec(&im).unwrap_or_default()
}

/// The load's thread: passes over the queues (fill, reap) until told
/// otherwise.
fn drive(vm: &Arc<Vm>, mut loads: Vec<QueueLoad>, c: &Counters, rx: &Receiver<Ctl>) -> LoadSummary {
    let queues = loads.len() as u32;
    let mut stopped = false;
    while !stopped {
        match rx.try_recv() {
            Ok(Ctl::Pause(reply)) => {
                let _ = reply.send(image(&loads, c));
                match rx.recv() {
                    Ok(Ctl::Resume) | Ok(Ctl::Pause(_)) => {
                        // Paused is not stalled.
                        for l in &mut loads {
                            l.progress = Instant::now();
                        }
                        continue;
                    }
                    Ok(Ctl::Detach) => {
                        let completed = loads.iter().map(|l| l.completed).sum();
                        for l in loads {
                            l.q.detach();
                        }
                        return LoadSummary {
                            stats: c.stats(),
                            queues,
                            never_completed: 0,
                            completed,
                            device_completed: None,
                            failure: c.first_failure.lock().clone(),
                            detached: true,
                        };
                    }
                    Ok(Ctl::Stop) | Err(_) => break,
                }
            }
            Ok(Ctl::Stop) | Err(TryRecvError::Disconnected) => break,
            Ok(Ctl::Resume) | Ok(Ctl::Detach) | Err(TryRecvError::Empty) => {}
        }
        let mut got = 0;
        for l in &mut loads {
            let pass = l.fill(c).and_then(|()| l.reap(c));
            match pass {
                Ok(n) => got += n,
                Err(e) => {
                    c.failure(format!("queue {}: {e}", l.index));
                    stopped = true;
                }
            }
            if !stopped && !l.out.is_empty() && l.progress.elapsed() > STALL {
                c.failure(format!(
                    "queue {}: no completion for {} s with {} jobs in flight (the device stopped, or a completion is missing)",
                    l.index,
                    STALL.as_secs(),
                    l.out.len()
                ));
                stopped = true;
            }
        }
        if got == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    // Drain what is in flight.
    let deadline = Instant::now() + DRAIN;
    while !stopped && loads.iter().any(|l| !l.out.is_empty()) && Instant::now() < deadline {
        for l in &mut loads {
            if let Err(e) = l.reap(c) {
                c.failure(format!("queue {} while draining: {e}", l.index));
                stopped = true;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let never_completed: u64 = loads.iter().map(|l| l.out.len() as u64).sum();
    if never_completed > 0 {
        c.failure(format!("{never_completed} jobs never completed"));
    }
    let completed = loads.iter().map(|l| l.completed).sum();
    LoadSummary {
        stats: c.stats(),
        queues,
        never_completed,
        completed,
        device_completed: device_completed(vm, queues),
        failure: c.first_failure.lock().clone(),
        detached: false,
    }
}

/// The device's count of completions on queues `0..queues` (Q_COMPLETED).
fn device_completed(vm: &Vm, queues: u32) -> Option<u64> {
    use wdvirt_guest::Mmio;
    (0..queues)
        .map(|q| {
            let off = u64::from(wdvirt_abi::regs::queue(q) + wdvirt_abi::regs::Q_COMPLETED);
            vm.read32(0, off).ok().map(u64::from)
        })
        .sum()
}
