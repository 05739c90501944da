//! Physical accelerator backends, behind one trait.
//!
//! An accelerator owns engines and hands out queue pairs. Every job a queue
//! pair carries is tagged with the PASID the host assigned to the instance;
//! the backend resolves guest addresses through its PASID-indexed
//! address-space table (the IOMMU's role), never through anything a guest
//! says. Neighbours: `vdev` above (submits jobs, receives results). This layer
//! knows nothing of PCI, registers or sockets.
//!
//! The embedded default is [`soft::SoftAccel`]: worker threads as engines.

mod engine_time;
pub mod ops;
#[cfg(test)]
pub(crate) mod reference;
pub mod soft;
pub mod stream;
mod zstream;

use std::sync::Arc;

use crossbeam_channel::Receiver;
use wdvirt_abi::{JobStatus, Opcode};

/// Process Address Space ID: which address space a job's addresses live in.
pub type Pasid = u32;

/// Guest memory as the device sees it: regions from the VMM's DMA maps, with
/// a dirty bitmap that every device write marks (for migration).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// A guest memory map that can be swapped whole on DMA_MAP/UNMAP while jobs
/// in flight keep the map they started with.
pub type AddressSpace = vm_memory::GuestMemoryAtomic<GuestMemory>;

/// One job as the engine sees it: backend-neutral, already validated by the
/// device (lengths, opcode, ring overlap). Addresses are IOVAs in the
/// submitting PASID's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Job {
    pub op: Opcode,
    pub src: u64,
    pub src_len: u32,
    pub dst: u64,
    pub dst_len: u32,
    /// Fill byte, or compression level.
    pub param: u64,
    /// Stream opcodes: the stream context's address
    /// ([`wdvirt_abi::stream::CTX_SIZE`] bytes); 0 otherwise.
    pub ctx: u64,
    /// Opaque to the engine; returned in the result.
    pub cookie: u64,
    /// Opaque to the engine; returned in the result. The device's record
    /// of the job (its slot in the queue's journal).
    pub slot: u32,
}

/// What the engine reports for one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobResult {
    pub cookie: u64,
    /// The job's `slot`.
    pub slot: u32,
    pub status: JobStatus,
    /// Bytes written at `dst`.
    pub bytes: u32,
    /// CRC32C value, the compare result, or the input a stream piece consumed.
    pub result: u32,
    /// A stream-decompress piece read the end of its stream.
    pub stream_end: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("PASID {0} is already bound to an address space")]
    PasidInUse(Pasid),
    #[error("PASID {0} has no address space")]
    UnknownPasid(Pasid),
    #[error("accelerator has no free queue pairs ({0} in use)")]
    NoQueuePairs(usize),
    #[error("queue pair is closed")]
    Closed,
}

/// A physical accelerator.
pub trait Accelerator: Send + Sync {
    /// Short name for listings (`soft`, `uacce:hisi_zip-0`, ...).
    fn name(&self) -> &str;
    /// Bit mask of [`Opcode`]s this backend can run (`1 << opcode`).
    fn supported_ops(&self) -> u32;
    /// Largest source or destination of one job.
    fn max_xfer(&self) -> u32;
    /// Bind `pasid` to an address space (the IOMMU's PASID table entry).
    fn bind_pasid(&self, pasid: Pasid, space: AddressSpace) -> Result<(), AccelError>;
    /// Remove the binding; later jobs with this PASID fail with `BadAddress`.
    fn unbind_pasid(&self, pasid: Pasid) -> Result<(), AccelError>;
    /// A new hardware queue pair whose jobs carry `pasid`, serving the
    /// instance's queue `queue` (the guest's index: a scheduler above uses it
    /// for priorities between one instance's queues; a backend may ignore it).
    fn open_queue_pair(&self, pasid: Pasid, queue: u32) -> Result<Box<dyn QueuePair>, AccelError>;
    /// Whether jobs of `pasid` may touch memory (the function's Bus Master
    /// Enable). Turning it off returns once no job of `pasid` is running;
    /// jobs that reach an engine while it is off complete with `Aborted`.
    fn set_dma_allowed(&self, pasid: Pasid, allowed: bool) -> Result<(), AccelError>;
    /// Run `f` while no job of `pasid` is running and none can start (jobs
    /// wait): an unmap done in `f` is complete for the engines when it
    /// returns, as the vfio-user spec asks of DMA_UNMAP.
    fn quiesced(&self, pasid: Pasid, f: &mut dyn FnMut()) -> Result<(), AccelError>;
}

/// Called from any thread when a queue pair that took fewer jobs than it
/// was offered has room again (the queue worker's wake-up).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Told, on the engine's own thread, of every job an engine finishes (after
/// its result is sent): how long the engine worked on it. The scheduler
/// charges instances by it (`crate::qos`). A hardware backend reports the
/// best it can measure (completion time minus the later of the job's
/// submission and the engine's previous completion).
pub trait EngineObserver: Send + Sync {
    /// `job` ended at `end` after `engine_ns` of engine time.
    fn job_finished(&self, job: &Job, engine_ns: u64, end: std::time::Instant);

    /// Several jobs ended, the last at `end`, each with its engine time: a
    /// backend may report an engine's run of short jobs at once (the
    /// scheduler then takes its lock once, not once per job).
    fn jobs_finished(&self, done: &[(Job, u64)], end: std::time::Instant) {
        for (job, engine_ns) in done {
            self.job_finished(job, *engine_ns, end);
        }
    }

    /// An engine running `job` of this queue pair in slices has reached
    /// the end of one, after `engine_ns` of engine time on it so far, and
    /// will run what is waiting for it before the next: the moment to hand
    /// it another instance's work (the scheduler does, to an instance owed
    /// more). Default: nothing.
    fn between_slices(&self, job: &Job, engine_ns: u64) {
        let _ = (job, engine_ns);
    }
}

/// One hardware queue pair: a submission side and a completion stream.
pub trait QueuePair: Send + Sync {
    /// Queue jobs for the engines; results arrive on `completions()`, one per
    /// job, in any order. Returns how many jobs, a prefix of `jobs`, were
    /// taken: the rest stay the caller's, to offer again once `set_wake`'s
    /// wake-up says there is room (a scheduler above refuses what an
    /// instance may not queue yet; a bare backend takes everything).
    fn submit(&self, jobs: &[Job]) -> Result<usize, AccelError>;
    /// As [`QueuePair::submit`], but some of the jobs taken may run to
    /// completion on the calling thread before it returns, when the queue
    /// pair may lend its caller an engine's turn (a scheduler above a
    /// software backend does, while an engine is idle and the instance's
    /// turn has come: the hop to an engine thread and back costs more than
    /// a small job). Their results are pushed to `done`, in submission
    /// order, and not sent on `completions()`; none of the other jobs
    /// taken completes before them. The default runs none here.
    fn submit_inline(&self, jobs: &[Job], done: &mut Vec<JobResult>) -> Result<usize, AccelError> {
        let _ = done;
        self.submit(jobs)
    }
    /// Run a prefix of `jobs` to completion on the calling thread, as one
    /// of this backend's engines would (every check an engine makes: the
    /// PASID walk, the DMA gate, Bus Master), and push each result with
    /// the CPU time it took to `done`. No observer is told and nothing is
    /// sent on `completions()`: the caller, which decided the jobs may run
    /// here, accounts for them. Returns how many ran (a backend may stop
    /// at a job it runs only on its own engines), or `None` when this
    /// backend never runs jobs on a caller's thread (hardware: the
    /// default).
    fn run_here(&self, jobs: &[Job], done: &mut Vec<(JobResult, u64)>) -> Option<usize> {
        let _ = (jobs, done);
        None
    }
    /// The wake-up to call when room opens after a partial `submit`.
    fn set_wake(&self, wake: Wake);
    /// Have `observer` told of each job this queue pair's engines finish.
    /// Set once, before the first `submit`; a second call is ignored. A
    /// scheduled queue pair (`crate::qos`) is already its backend's
    /// observed one and ignores this: nothing above the scheduler reads
    /// engine time.
    fn observe(&self, observer: Arc<dyn EngineObserver>);
    /// The completion stream.
    fn completions(&self) -> &Receiver<JobResult>;
    /// Jobs submitted whose results have not yet been sent.
    fn in_flight(&self) -> usize;
    /// Jobs an engine is executing right now (after `close`, the only ones
    /// that can still touch memory).
    fn running(&self) -> usize;
    /// Take back, in submission order, the jobs that have not yet been
    /// handed to an engine; they send no result and no longer count in
    /// `in_flight()`. The queue pair stays open. A migration's quiesce uses
    /// it so that jobs held back by a scheduler move with the device
    /// instead of being waited for. A backend that hands every job to its
    /// engines at once returns none.
    fn withdraw(&self) -> Vec<Job>;
    /// Stop the queue pair (queue disabled or reset): later submits fail,
    /// jobs no engine has started are discarded without a result, and jobs
    /// running finish and send theirs, after which `in_flight()` is 0.
    fn close(&self);
}

/// Shared handle to a backend.
pub type SharedAccelerator = Arc<dyn Accelerator>;
