//! The VMM's half of a live migration: a running "VM" (guest RAM and its
//! accelerator function, reached through a [`LoopbackVmm`]) moves from the
//! instance it is connected to, to another instance's socket, the way a
//! VMM drives a VFIO migration v2 device.
//!
//! [`migrate`] does, in order:
//!
//! 1. connect to the destination with fresh guest RAM of the same layout,
//!    mapped for its device (DMA_MAP);
//! 2. DMA_LOGGING_START on the source for all of guest RAM;
//! 3. PRE_COPY on the source, its compatibility block written to the
//!    destination in RESUMING, which refuses it there and then if it is
//!    another shape;
//! 4. all of RAM copied while the guest and the device run, then rounds of
//!    dirty pages: the device's from DMA_LOGGING_REPORT, the guest's own
//!    from [`Vm`], which sees every guest write (it is the guest's CPU
//!    here, as KVM's dirty log is a real VMM's);
//! 5. the guest paused, STOP_COPY on the source, the rest of the stream
//!    read, the last dirty pages (both logs, now that neither side
//!    writes) copied, the stream written to the destination, which goes
//!    RESUMING → STOP → RUNNING; the guest goes on there;
//! 6. the source goes to STOP, its log is stopped, and it is disconnected
//!    once the last handle to it goes (the daemon then resets it).
//!
//! Any failure (or a cancel from the progress callback) before the
//! destination runs sets the source back to RUNNING, stops its log and
//! lets the guest go on there; the destination is dropped unresumed (VFIO
//! v2: only one side ever resumes with a given state). Downtime is measured
//! from STOP_COPY on the source to RUNNING on the destination.
//!
//! Between two processes (`wdvirt vm`, `wdvirt migrate`) the same phases
//! run as two halves over a byte stream ([`super::link`]): [`send`] on the
//! source, which also pauses the guest's CPUs ([`Vcpus`]) before the stop
//! and carries their state, and [`incoming`] on the destination, which owns
//! the destination's RAM and instance connection and answers a refusal with
//! its reason before the source stops. Both ends of the phases are one
//! small trait, `Destination`: [`migrate`] uses the in-process end (RAM from
//! memfd to memfd), [`send`] the stream's.

use std::fmt;
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};
use wdvirt_guest::{DmaAllocator, DmaError, DmaMemory, DmaPool, Mmio, MmioError};

use super::link::{self, Kind};
use super::{GuestRam, LoopbackVmm, VmmError};
use crate::migration::MigState;

/// The page the VMM copies and both dirty logs count in.
pub const PAGE: u64 = 4096;

/// A running VM as its guest sees it: the registers and RAM of whichever
/// instance it runs on now. Every guest access takes a read lock; the
/// migration holds the write lock while it moves the guest, which is the
/// guest paused (vCPUs stopped). Every guest write marks its pages in the
/// guest's dirty bitmap.
pub struct Vm {
    active: RwLock<Arc<LoopbackVmm>>,
    base: u64,
    size: u64,
    guest_dirty: Vec<AtomicU64>,
}

impl Vm {
    /// The VM on `vmm` (made by [`LoopbackVmm::connect_migratable`]).
    pub fn new(vmm: LoopbackVmm) -> Arc<Vm> {
        Vm::on(Arc::new(vmm))
    }

    fn on(vmm: Arc<LoopbackVmm>) -> Arc<Vm> {
        let ram = vmm.ram();
        let pages = ram.size().div_ceil(PAGE);
        Arc::new(Vm {
            base: ram.base(),
            size: ram.size(),
            guest_dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            active: RwLock::new(vmm),
        })
    }

    /// The VMM connection the guest runs on now.
    pub fn vmm(&self) -> Arc<LoopbackVmm> {
        self.active.read().clone()
    }

    /// All of guest RAM as the driver's DMA pool.
    pub fn dma_pool(self: &Arc<Self>) -> Result<DmaPool<Arc<Vm>>, DmaError> {
        Ok(DmaPool::new(
            self.clone(),
            DmaAllocator::new(self.base, self.size)?,
        ))
    }

    fn mark(&self, addr: u64, len: usize) {
        if len == 0 || addr < self.base {
            return;
        }
        let first = (addr - self.base) / PAGE;
        let last = (addr - self.base + len as u64 - 1) / PAGE;
        for p in first..=last {
            if let Some(w) = self.guest_dirty.get((p / 64) as usize) {
                w.fetch_or(1 << (p % 64), Ordering::AcqRel);
            }
        }
    }

    /// The guest's dirty bitmap since the last call, cleared.
    fn take_guest_dirty(&self) -> Vec<u64> {
        self.guest_dirty
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }
}

impl Mmio for Vm {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
        self.active.read().read32(bar, offset)
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
        self.active.read().write32(bar, offset, value)
    }
}

impl DmaMemory for Vm {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.active.read().ram().read(addr, buf)
    }
    // The write lands, then its pages are marked: a copy that clears the
    // bitmap between the two copies the written page already, and one that
    // clears it before finds it marked again.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let a = self.active.read();
        a.ram().write(addr, data)?;
        self.mark(addr, data.len());
        Ok(())
    }
    fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        self.active.read().ram().read_u32(addr)
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError> {
        let a = self.active.read();
        a.ram().write_u32(addr, value)?;
        self.mark(addr, 4);
        Ok(())
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connected to the destination, its RAM mapped.
    Connected,
    /// The source in PRE_COPY, the destination took its compatibility block.
    PreCopy,
    /// A round of RAM copied while running (0: all of it).
    RamRound,
    /// The guest paused, the source in STOP_COPY, the rest read.
    StopCopy,
    /// The destination runs the guest.
    Done,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connected => "connecting to the destination",
            Phase::PreCopy => "PRE_COPY",
            Phase::RamRound => "copying RAM",
            Phase::StopCopy => "STOP_COPY",
            Phase::Done => "done",
        })
    }
}

/// What the progress callback is told.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub phase: Phase,
    /// RAM rounds done (0 = the whole copy).
    pub round: u32,
    /// Pages copied in the last round.
    pub round_pages: u64,
    /// RAM bytes copied so far.
    pub ram_bytes: u64,
    /// Device stream bytes moved so far.
    pub stream_bytes: u64,
}

/// How a migration goes.
#[derive(Clone, Copy, Debug)]
pub struct MigrateOptions {
    /// At most this many dirty-page rounds after the whole copy.
    pub max_rounds: u32,
    /// Stop the rounds once one copies at most this many pages.
    pub converged_pages: u64,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            max_rounds: 8,
            converged_pages: 64,
        }
    }
}

/// What a migration measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// STOP_COPY on the source to RUNNING on the destination (the guest is
    /// paused for this and a lock handover more).
    pub downtime: Duration,
    /// Dirty-page rounds while running, after the whole copy.
    pub pre_copy_rounds: u32,
    /// The device stream: PRE_COPY's compatibility block and the rest.
    pub stream_bytes: u64,
    /// RAM copied, all rounds and the stop.
    pub ram_bytes: u64,
    /// Pages copied while stopped.
    pub stop_pages: u64,
    /// The downtime's parts: the source's STOP_COPY arc and the read of the
    /// rest of its stream; the last dirty pages' copy; the destination's
    /// write of the rest, RESUMING → STOP (the restore) and STOP → RUNNING.
    pub source_stop: Duration,
    pub stop_copy: Duration,
    pub destination_resume: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot reach the destination {path}: {source}")]
    Destination { path: String, source: VmmError },
    #[error("cannot reach the destination {to} (the source runs on): {source}")]
    Unreachable { to: String, source: std::io::Error },
    #[error("the {side} does not offer STOP_COPY and PRE_COPY migration (flags {flags:#x})")]
    NotMigratable { side: &'static str, flags: u64 },
    #[error("the destination refused the source's compatibility block (the source runs on): {0}")]
    Refused(String),
    #[error("migration failed while {phase} (the source runs on): {source}")]
    Failed { phase: Phase, source: VmmError },
    #[error("the destination failed while {phase} (the source runs on): {reason}")]
    Remote { phase: Phase, reason: String },
    #[error("the migration stream broke while {phase} (the source runs on): {source}")]
    Link {
        phase: Phase,
        source: link::FrameError,
    },
    #[error("migration stream: {0}")]
    Protocol(String),
    #[error("the source gave the migration up: {0}")]
    Aborted(String),
    #[error("migration cancelled while {0} (the source runs on)")]
    Cancelled(Phase),
    #[error("the guest could not stop for the migration (the source runs on): {0}")]
    Guest(String),
    #[error("guest RAM: {0}")]
    Ram(String),
}

fn failed(phase: Phase) -> impl Fn(VmmError) -> MigrateError {
    move |source| MigrateError::Failed { phase, source }
}

fn broke(phase: Phase) -> impl Fn(link::FrameError) -> MigrateError {
    move |source| MigrateError::Link { phase, source }
}

fn ram_err(e: DmaError) -> MigrateError {
    MigrateError::Ram(e.to_string())
}

/// How long a destination that has just been left by a VMM may take to
/// accept the next one (its daemon serves one connection at a time and
/// notices the last one's end on its own thread).
const CONNECT_PATIENCE: Duration = Duration::from_secs(2);

fn connect_destination(dest: &Path, base: u64, size: u64) -> Result<LoopbackVmm, MigrateError> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        let ram = GuestRam::new(base, size).map_err(|e| MigrateError::Ram(e.to_string()))?;
        match LoopbackVmm::connect_migratable(dest, ram) {
            Ok(v) => return Ok(v),
            // Closed before VERSION's reply: another VMM is still connected.
            Err(VmmError::Io(e)) if Instant::now() < deadline => {
                tracing::debug!("destination {} busy, retrying: {e}", dest.display());
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(MigrateError::Destination {
                    path: dest.display().to_string(),
                    source,
                });
            }
        }
    }
}

fn check_flags(vmm: &LoopbackVmm, side: &'static str) -> Result<(), MigrateError> {
    let want = u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY);
    // A device without the feature (ENOTSUP, or a client that speaks no
    // migration) is not migratable; any other failure (the device gone,
    // the socket broken) is that failure, not a missing feature.
    let flags = match vmm.migration().and_then(|mut c| c.migration_flags()) {
        Ok(flags) => flags,
        Err(VmmError::Refused { errno, .. }) if errno == libc::ENOTSUP => 0,
        Err(VmmError::NoMigration) => 0,
        Err(source) => {
            return Err(MigrateError::Failed {
                phase: Phase::Connected,
                source,
            });
        }
    };
    if flags & want != want {
        return Err(MigrateError::NotMigratable { side, flags });
    }
    Ok(())
}

/// The longest run of pages copied in one piece (1 MiB): a bounded buffer,
/// and a PAGES frame well under the cap.
const RUN_PAGES: u64 = 256;

/// Where [`copy_pages`] puts each run: its address and bytes.
type PageSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), MigrateError> + 'a;

/// Hands the pages set in `bits` (page `i` at `base + i * PAGE`) of `from`
/// to `sink`, in runs of at most [`RUN_PAGES`]; returns the pages handed.
fn copy_pages(
    from: &GuestRam,
    bits: &[u64],
    buf: &mut Vec<u8>,
    sink: &mut PageSink<'_>,
) -> Result<u64, MigrateError> {
    let pages = from.size().div_ceil(PAGE);
    let set = |p: u64| bits[(p / 64) as usize] & 1 << (p % 64) != 0;
    let (mut p, mut copied) = (0, 0);
    while p < pages {
        if bits[(p / 64) as usize] == 0 {
            p = (p / 64 + 1) * 64;
            continue;
        }
        if !set(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < pages && set(p) && p - start < RUN_PAGES {
            p += 1;
        }
        let addr = from.base() + start * PAGE;
        let len = ((p - start) * PAGE).min(from.base() + from.size() - addr) as usize;
        buf.resize(len, 0);
        from.read(addr, buf).map_err(ram_err)?;
        sink(addr, buf)?;
        copied += p - start;
    }
    Ok(copied)
}

/// The device's dirty pages since the last report, or'ed with the guest's.
fn dirty(vm: &Vm, src: &LoopbackVmm, phase: Phase) -> Result<Vec<u64>, MigrateError> {
    let mut bits = src
        .migration()
        .and_then(|mut c| c.dirty_report(vm.base, vm.size, PAGE))
        .map_err(failed(phase))?;
    for (b, g) in bits.iter_mut().zip(vm.take_guest_dirty()) {
        *b |= g;
    }
    Ok(bits)
}

/// The guest's CPUs, as a migration between two processes needs them:
/// stopped at a clean point (no guest write after [`Vcpus::pause`]
/// returns), their state (what is not in guest RAM) handed over, or let go
/// on where they are after a failure.
pub trait Vcpus {
    fn pause(&mut self) -> Result<Vec<u8>, String>;
    fn resume(&mut self);
}

impl Vcpus for super::load::Load {
    fn pause(&mut self) -> Result<Vec<u8>, String> {
        super::load::Load::pause(self).map_err(|e| e.to_string())
    }
    fn resume(&mut self) {
        super::load::Load::resume(self)
    }
}

/// The other end of a migration: an instance this process connects to
/// ([`Local`]), or a destination VM process behind a stream ([`Remote`]).
trait Destination {
    /// PRE_COPY's compatibility block: refused ([`MigrateError::Refused`])
    /// if the destination's device is of another shape.
    fn compat(&mut self, block: &[u8]) -> Result<(), MigrateError>;
    /// The pages set in `bits`, read from `from`.
    fn pages(
        &mut self,
        from: &GuestRam,
        bits: &[u64],
        buf: &mut Vec<u8>,
        phase: Phase,
    ) -> Result<u64, MigrateError>;
    /// The rest of the device's stream and the guest's state: the
    /// destination resumes, and hands back its VMM if it is in this
    /// process.
    fn resume(
        &mut self,
        device: &[u8],
        guest: &[u8],
    ) -> Result<Option<Arc<LoopbackVmm>>, MigrateError>;
    /// The source gives up (the destination drops what it has).
    fn abort(&mut self, reason: &str);
}

/// An instance connected here, with guest RAM of the source's layout.
struct Local {
    vmm: Arc<LoopbackVmm>,
    /// What its identity registers said on connecting (ABI version,
    /// queues, largest transfer), to explain a refusal.
    here: Option<(u32, u32, u32)>,
}

impl Local {
    fn connect(dest: &Path, base: u64, size: u64) -> Result<Local, MigrateError> {
        let vmm = connect_destination(dest, base, size)?;
        check_flags(&vmm, "destination")?;
        use wdvirt_abi::regs;
        use wdvirt_guest::Mmio;
        let reg = |r: u32| vmm.read32(0, u64::from(r)).ok();
        let here = (|| {
            Some((
                reg(regs::VERSION)?,
                reg(regs::NUM_QUEUES)?,
                reg(regs::MAX_XFER)?,
            ))
        })();
        Ok(Local {
            vmm: Arc::new(vmm),
            here,
        })
    }

    /// Why the instance refused `block`, in words: the device answers an
    /// errno only, so the source's compatibility block is set against what
    /// this instance's registers said.
    fn why_refused(&self, block: &[u8], e: &VmmError) -> String {
        let compat = block
            .get(16..crate::migration::stream::compat_prefix_len(block).min(block.len()))
            .and_then(|j| serde_json::from_slice::<crate::migration::stream::Compat>(j).ok());
        let (Some(c), Some((abi, queues, xfer))) = (compat, self.here) else {
            return format!("the destination instance refused it: {e}");
        };
        let mut diff = Vec::new();
        if c.abi_version >> 16 != abi >> 16 || c.abi_version & 0xffff > abi & 0xffff {
            diff.push(format!(
                "device ABI {}.{} in the stream, {}.{} here",
                c.abi_version >> 16,
                c.abi_version & 0xffff,
                abi >> 16,
                abi & 0xffff
            ));
        }
        if c.queues.len() != queues as usize {
            diff.push(format!(
                "{} queues in the stream, {queues} here",
                c.queues.len()
            ));
        }
        if c.max_xfer != xfer {
            diff.push(format!(
                "largest transfer {} in the stream, {xfer} here",
                c.max_xfer
            ));
        }
        if diff.is_empty() {
            diff.push("its type, a queue's depth limit or operations differ".into());
        }
        format!(
            "a device of type '{}' cannot become this instance ({}): {e}",
            c.type_name,
            diff.join("; ")
        )
    }
}

impl Destination for Local {
    fn compat(&mut self, block: &[u8]) -> Result<(), MigrateError> {
        // The instance takes a stream in pieces, so a block cut short
        // would pass unchecked: its length is in its own header.
        let whole = crate::migration::stream::compat_prefix_len(block);
        if block.len() < 16 || whole > block.len() {
            return Err(MigrateError::Refused(format!(
                "the compatibility block is cut short ({} bytes, its header says {whole})",
                block.len()
            )));
        }
        let p = Phase::PreCopy;
        let mut d = self.vmm.migration().map_err(failed(p))?;
        d.set_mig_state(MigState::Resuming).map_err(failed(p))?;
        let piece = d.max_xfer();
        let refused = d.mig_write(block, piece);
        drop(d);
        refused.map_err(|e| MigrateError::Refused(self.why_refused(block, &e)))
    }

    fn pages(
        &mut self,
        from: &GuestRam,
        bits: &[u64],
        buf: &mut Vec<u8>,
        _phase: Phase,
    ) -> Result<u64, MigrateError> {
        let to = self.vmm.ram();
        copy_pages(from, bits, buf, &mut |addr, data| {
            to.write(addr, data).map_err(ram_err)
        })
    }

    fn resume(
        &mut self,
        device: &[u8],
        _guest: &[u8],
    ) -> Result<Option<Arc<LoopbackVmm>>, MigrateError> {
        let p = Phase::StopCopy;
        let mut d = self.vmm.migration().map_err(failed(p))?;
        let piece = d.max_xfer();
        d.mig_write(device, piece).map_err(failed(p))?;
        d.set_mig_state(MigState::Stop).map_err(failed(p))?;
        d.set_mig_state(MigState::Running).map_err(failed(p))?;
        Ok(Some(self.vmm.clone()))
    }

    fn abort(&mut self, _reason: &str) {}
}

/// A destination VM process at the other end of `link`.
struct Remote<S> {
    link: S,
    batch: Vec<u8>,
}

/// How many page bytes a PAGES frame gathers before it goes.
const BATCH: usize = 1 << 20;

impl<S: Read + Write> Remote<S> {
    /// HELLO, and the destination's READY (its instance connected, its
    /// RAM mapped) or its reason not to be.
    fn hello(link: S, base: u64, size: u64) -> Result<Remote<S>, MigrateError> {
        let mut r = Remote {
            link,
            batch: Vec::new(),
        };
        let h = link::Hello {
            version: link::VERSION,
            ram_base: base,
            ram_size: size,
            page: PAGE as u32,
        };
        let p = Phase::Connected;
        r.send(Kind::Hello, &h.encode(), p)?;
        r.answer(p, Kind::Ready, |reason| MigrateError::Remote {
            phase: p,
            reason,
        })?;
        Ok(r)
    }

    fn send(&mut self, kind: Kind, payload: &[u8], phase: Phase) -> Result<(), MigrateError> {
        link::write_frame(&mut self.link, kind, payload).map_err(|e| MigrateError::Link {
            phase,
            source: e.into(),
        })
    }

    fn answer(
        &mut self,
        phase: Phase,
        want: Kind,
        refused: impl FnOnce(String) -> MigrateError,
    ) -> Result<(), MigrateError> {
        match link::read_frame(&mut self.link).map_err(broke(phase))? {
            (k, _) if k == want => Ok(()),
            (Kind::Refused, reason) => Err(refused(String::from_utf8_lossy(&reason).into_owned())),
            (k, _) => Err(MigrateError::Protocol(format!(
                "the destination answered {k:?} where {want:?} was due"
            ))),
        }
    }

    fn flush(&mut self, phase: Phase) -> Result<(), MigrateError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let sent = self.send(Kind::Pages, &batch, phase);
        self.batch = batch;
        self.batch.clear();
        sent
    }
}

impl<S: Read + Write> Destination for Remote<S> {
    fn compat(&mut self, block: &[u8]) -> Result<(), MigrateError> {
        let p = Phase::PreCopy;
        self.send(Kind::Compat, block, p)?;
        self.answer(p, Kind::Accepted, MigrateError::Refused)
    }

    fn pages(
        &mut self,
        from: &GuestRam,
        bits: &[u64],
        buf: &mut Vec<u8>,
        phase: Phase,
    ) -> Result<u64, MigrateError> {
        let n = copy_pages(from, bits, buf, &mut |addr, data| {
            link::push_pages(&mut self.batch, addr, data);
            if self.batch.len() >= BATCH {
                self.flush(phase)?;
            }
            Ok(())
        })?;
        self.flush(phase)?;
        Ok(n)
    }

    fn resume(
        &mut self,
        device: &[u8],
        guest: &[u8],
    ) -> Result<Option<Arc<LoopbackVmm>>, MigrateError> {
        let p = Phase::StopCopy;
        self.send(Kind::Device, device, p)?;
        self.send(Kind::Guest, guest, p)?;
        self.send(Kind::Commit, &[], p)?;
        self.answer(p, Kind::Resumed, |reason| MigrateError::Remote {
            phase: p,
            reason,
        })?;
        Ok(None)
    }

    fn abort(&mut self, reason: &str) {
        let _ = link::write_frame(&mut self.link, Kind::Abort, reason.as_bytes());
    }
}

/// Moves `vm` to the instance serving `dest`, in this process (the
/// same-host fast path: RAM goes from memfd to memfd with no stream).
/// `progress` is told each phase and round; `ControlFlow::Break` from it
/// cancels the migration (up to the destination's RUNNING), which then
/// fails as [`MigrateError::Cancelled`] with the source running.
pub fn migrate(
    vm: &Vm,
    dest: &Path,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
) -> Result<Figures, MigrateError> {
    check_flags(&vm.vmm(), "source")?;
    let mut dst = Local::connect(dest, vm.base, vm.size)?;
    drive(vm, &mut dst, opts, progress, None)
}

/// The source half of a migration between two processes: moves `vm`
/// through `link` to a destination VM process running [`incoming`], with
/// the guest's CPUs (`vcpus`) paused for the stop and their state carried.
/// On success the guest runs there (the caller lets its `vcpus` go, and
/// the source device is left in STOP); on any failure it runs on here.
pub fn send<S: Read + Write>(
    vm: &Vm,
    link: S,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    vcpus: &mut dyn Vcpus,
) -> Result<Figures, MigrateError> {
    check_flags(&vm.vmm(), "source")?;
    let mut dst = Remote::hello(link, vm.base, vm.size)?;
    drive(vm, &mut dst, opts, progress, Some(vcpus))
}

fn drive(
    vm: &Vm,
    dst: &mut dyn Destination,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    vcpus: Option<&mut dyn Vcpus>,
) -> Result<Figures, MigrateError> {
    let src = vm.vmm();
    src.migration()
        .and_then(|mut c| c.dirty_log_start(PAGE, &[(vm.base, vm.size)]))
        .map_err(failed(Phase::Connected))?;
    vm.take_guest_dirty();
    let mut figures = Figures::default();
    let mut state = Progress {
        phase: Phase::Connected,
        round: 0,
        round_pages: 0,
        ram_bytes: 0,
        stream_bytes: 0,
    };
    match run(
        vm,
        &src,
        dst,
        opts,
        progress,
        &mut figures,
        &mut state,
        vcpus,
    ) {
        Ok(()) => {
            // The guest runs on the destination: the source stops for good.
            let stop = src.migration().and_then(|mut c| {
                c.set_mig_state(MigState::Stop)?;
                c.dirty_log_stop()
            });
            if let Err(e) = stop {
                tracing::warn!("the migrated source did not stop cleanly: {e}");
            }
            state.phase = Phase::Done;
            let _ = progress(&state);
            Ok(figures)
        }
        Err(e) => {
            // `run` has let the guest go on the source, in RUNNING.
            dst.abort(&e.to_string());
            if let Err(stop) = src.migration().and_then(|mut c| c.dirty_log_stop()) {
                tracing::warn!("the source's dirty log did not stop: {stop}");
            }
            tracing::warn!("migration failed: {e}");
            Err(e)
        }
    }
}

/// Sets the source back to RUNNING after a failure (from PRE_COPY or
/// STOP_COPY: both are one arc away).
fn run_on(src: &LoopbackVmm) {
    let back = src
        .migration()
        .and_then(|mut c| c.set_mig_state(MigState::Running));
    if let Err(e) = back {
        tracing::error!("the source did not go back to RUNNING: {e}");
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    vm: &Vm,
    src: &LoopbackVmm,
    dst: &mut dyn Destination,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    figures: &mut Figures,
    state: &mut Progress,
    mut vcpus: Option<&mut dyn Vcpus>,
) -> Result<(), MigrateError> {
    let mut tell = |state: &Progress| match progress(state) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(MigrateError::Cancelled(state.phase)),
    };
    tell(state)?;
    let from = src.ram();
    let mut buf = Vec::new();
    let pre_copy = || -> Result<Vec<u8>, MigrateError> {
        let p = Phase::PreCopy;
        let mut c = src.migration().map_err(failed(p))?;
        c.set_mig_state(MigState::PreCopy).map_err(failed(p))?;
        let piece = c.max_xfer();
        c.mig_read_all(piece).map_err(failed(p))
    };
    let running = (|| {
        let pre = pre_copy()?;
        dst.compat(&pre)?;
        figures.stream_bytes = pre.len() as u64;
        state.phase = Phase::PreCopy;
        state.stream_bytes = figures.stream_bytes;
        tell(state)?;
        // All of RAM while running, then the pages dirtied meanwhile.
        let all = vec![u64::MAX; vm.guest_dirty.len()];
        let n = dst.pages(&from, &all, &mut buf, Phase::RamRound)?;
        state.phase = Phase::RamRound;
        state.round_pages = n;
        figures.ram_bytes = n * PAGE;
        state.ram_bytes = figures.ram_bytes;
        tell(state)?;
        for round in 1..=opts.max_rounds {
            let bits = dirty(vm, src, Phase::RamRound)?;
            let n = dst.pages(&from, &bits, &mut buf, Phase::RamRound)?;
            figures.pre_copy_rounds = round;
            figures.ram_bytes += n * PAGE;
            state.round = round;
            state.round_pages = n;
            state.ram_bytes = figures.ram_bytes;
            tell(state)?;
            if n <= opts.converged_pages {
                break;
            }
        }
        Ok(())
    })();
    if let Err(e) = running {
        run_on(src);
        return Err(e);
    }

    // The guest's CPUs stop at a clean point, then the VMM pauses the
    // guest until it runs on one side or the other.
    let guest = match vcpus.as_deref_mut().map(|v| v.pause()).transpose() {
        Ok(g) => g.unwrap_or_default(),
        Err(e) => {
            run_on(src);
            if let Some(v) = vcpus {
                v.resume();
            }
            return Err(MigrateError::Guest(e));
        }
    };
    let mut active = vm.active.write();
    let t0 = Instant::now();
    let stopped = (|| {
        let p = Phase::StopCopy;
        let rest = {
            let mut c = src.migration().map_err(failed(p))?;
            c.set_mig_state(MigState::StopCopy).map_err(failed(p))?;
            let piece = c.max_xfer();
            c.mig_read_all(piece).map_err(failed(p))?
        };
        let t1 = Instant::now();
        figures.source_stop = t1 - t0;
        let bits = dirty(vm, src, p)?;
        let n = dst.pages(&from, &bits, &mut buf, p)?;
        let t2 = Instant::now();
        figures.stop_copy = t2 - t1;
        figures.stop_pages = n;
        figures.ram_bytes += n * PAGE;
        figures.stream_bytes += rest.len() as u64;
        state.phase = p;
        state.round_pages = n;
        state.ram_bytes = figures.ram_bytes;
        state.stream_bytes = figures.stream_bytes;
        tell(state)?;
        let resumed = dst.resume(&rest, &guest)?;
        figures.destination_resume = t2.elapsed();
        Ok(resumed)
    })();
    match stopped {
        Ok(resumed) => {
            figures.downtime = t0.elapsed();
            if let Some(vmm) = resumed {
                *active = vmm;
            }
            Ok(())
        }
        Err(e) => {
            run_on(src);
            drop(active);
            if let Some(v) = vcpus {
                v.resume();
            }
            Err(e)
        }
    }
}

/// What the destination half received: the VM, running on its instance,
/// and the guest CPUs' state to go on from.
pub struct Incoming {
    pub vm: Arc<Vm>,
    pub guest: Vec<u8>,
    /// Guest RAM bytes received.
    pub ram_bytes: u64,
    /// Device stream bytes received.
    pub stream_bytes: u64,
}

/// Most rounds of dirty pages a migration may be asked for (each copies
/// while the guest runs; past a few, a VM that dirties faster than the
/// link carries never converges anyway).
pub const MAX_ROUNDS: u32 = 1000;

/// The largest guest RAM a source may announce: what `wdvirt vm
/// --ram-mib` can make (64 GiB). A destination makes a memfd of the
/// announced size, so the cap is what one HELLO can cost it.
pub const MAX_RAM: u64 = 64 << 30;

/// The destination half of a migration between two processes: takes a
/// VM from a source running [`send`] on `link`, onto the instance serving
/// `dest` (connected here with fresh guest RAM of the source's layout).
/// The compatibility block is checked by the instance before anything
/// else is taken; any refusal or failure is answered to the source with
/// its reason (so that it runs on), and nothing here resumes.
pub fn incoming<S: Read + Write>(link: S, dest: &Path) -> Result<Incoming, MigrateError> {
    incoming_checked(link, dest, &|_| Ok(()))
}

/// As [`incoming`], with the guest CPUs' state put to `check` before the
/// destination resumes: a refusal goes back to the source (which runs on)
/// as the reason, and nothing here resumes.
pub fn incoming_checked<S: Read + Write>(
    mut link: S,
    dest: &Path,
    check: &dyn Fn(&[u8]) -> Result<(), String>,
) -> Result<Incoming, MigrateError> {
    fn refuse<S: Write>(link: &mut S, e: &MigrateError) {
        let reason = match e {
            MigrateError::Aborted(_) | MigrateError::Link { .. } => return,
            MigrateError::Refused(r) | MigrateError::Remote { reason: r, .. } => r.clone(),
            e => e.to_string(),
        };
        let _ = link::write_frame(link, Kind::Refused, reason.as_bytes());
    }
    let p = Phase::Connected;
    let hello = link::read_frame(&mut link)
        .map_err(broke(p))
        .and_then(|(k, b)| match k {
            Kind::Hello => link::Hello::decode(&b).map_err(MigrateError::Protocol),
            k => Err(MigrateError::Protocol(format!("a {k:?} frame before HELLO"))),
        })
        .and_then(|h| {
            if h.version != link::VERSION {
                Err(MigrateError::Protocol(format!(
                    "stream version {} (this destination speaks {})",
                    h.version,
                    link::VERSION
                )))
            } else if u64::from(h.page) != PAGE
                || h.ram_size == 0
                || h.ram_size > MAX_RAM
                || h.ram_base % PAGE != 0
                || h.ram_base.checked_add(h.ram_size).is_none()
            {
                Err(MigrateError::Protocol(format!(
                    "guest RAM of {} bytes at {:#x} in pages of {} (this destination takes pages of {PAGE}, up to {MAX_RAM} bytes, page-aligned)",
                    h.ram_size, h.ram_base, h.page
                )))
            } else {
                Ok(h)
            }
        });
    let local = hello.and_then(|h| Local::connect(dest, h.ram_base, h.ram_size));
    let mut local = match local {
        Ok(l) => l,
        Err(e) => {
            refuse(&mut link, &e);
            return Err(e);
        }
    };
    link::write_frame(&mut link, Kind::Ready, &[]).map_err(|e| MigrateError::Link {
        phase: p,
        source: e.into(),
    })?;
    let mut got = Incoming {
        vm: Vm::on(local.vmm.clone()),
        guest: Vec::new(),
        ram_bytes: 0,
        stream_bytes: 0,
    };
    match receive(&mut link, &mut local, &mut got, check) {
        Ok(()) => Ok(got),
        Err(e) => {
            refuse(&mut link, &e);
            Err(e)
        }
    }
}

/// The frames after READY, up to COMMIT and the destination's RUNNING.
fn receive<S: Read + Write>(
    link: &mut S,
    local: &mut Local,
    got: &mut Incoming,
    check: &dyn Fn(&[u8]) -> Result<(), String>,
) -> Result<(), MigrateError> {
    let ram = local.vmm.ram();
    let (base, end) = (ram.base(), ram.base() + ram.size());
    let mut phase = Phase::Connected;
    let mut device = None;
    loop {
        let (kind, b) = link::read_frame(link).map_err(broke(phase))?;
        match kind {
            Kind::Compat if phase == Phase::Connected => {
                local.compat(&b)?;
                got.stream_bytes += b.len() as u64;
                phase = Phase::PreCopy;
                link::write_frame(link, Kind::Accepted, &[]).map_err(|e| MigrateError::Link {
                    phase,
                    source: e.into(),
                })?;
            }
            Kind::Pages if phase != Phase::Connected => {
                for run in link::page_runs(&b) {
                    let (addr, data) = run.map_err(MigrateError::Protocol)?;
                    let inside = addr >= base
                        && addr
                            .checked_add(data.len() as u64)
                            .is_some_and(|e| e <= end);
                    if !inside {
                        return Err(MigrateError::Protocol(format!(
                            "{} bytes of pages at {addr:#x}, outside guest RAM {base:#x}..{end:#x}",
                            data.len()
                        )));
                    }
                    ram.write(addr, data).map_err(ram_err)?;
                    got.ram_bytes += data.len() as u64;
                }
            }
            Kind::Device if phase != Phase::Connected => {
                got.stream_bytes += b.len() as u64;
                device = Some(b);
                phase = Phase::StopCopy;
            }
            Kind::Guest if phase != Phase::Connected => got.guest = b,
            Kind::Commit if device.is_some() => {
                check(&got.guest).map_err(|reason| MigrateError::Remote {
                    phase,
                    reason: format!("the guest's state is unusable here: {reason}"),
                })?;
                local.resume(device.as_deref().unwrap_or_default(), &got.guest)?;
                // The device runs here now; a source that does not hear it
                // would run on too, so say so loudly.
                if let Err(e) = link::write_frame(link, Kind::Resumed, &[]) {
                    tracing::error!("resumed, but the source was not told: {e}");
                }
                return Ok(());
            }
            Kind::Abort => {
                return Err(MigrateError::Aborted(
                    String::from_utf8_lossy(&b).into_owned(),
                ));
            }
            k => {
                return Err(MigrateError::Protocol(format!(
                    "a {k:?} frame while {phase}"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly the pages named are copied, runs across bitmap words and the
    /// last page included, and counted.
    #[test]
    fn copy_pages_copies_exactly_the_marked_pages() {
        const BASE: u64 = 0x10_0000;
        const PAGES: u64 = 256;
        let from = GuestRam::new(BASE, PAGES * PAGE).unwrap();
        let to = GuestRam::new(BASE, PAGES * PAGE).unwrap();
        let pattern: Vec<u8> = (0..PAGES * PAGE)
            .map(|i| (i / PAGE % 250 + 1) as u8)
            .collect();
        from.write(BASE, &pattern).unwrap();
        let marked = [0, 63, 64, 65, 130, 255];
        let mut bits = vec![0u64; (PAGES / 64) as usize];
        for p in marked {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        let n = copy_pages(&from, &bits, &mut Vec::new(), &mut |a, d| {
            to.write(a, d).map_err(ram_err)
        })
        .unwrap();
        assert_eq!(n, marked.len() as u64);
        let mut got = vec![0u8; (PAGES * PAGE) as usize];
        to.read(BASE, &mut got).unwrap();
        for p in 0..PAGES {
            let page = &got[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
            let want = if marked.contains(&p) {
                (p % 250 + 1) as u8
            } else {
                0
            };
            assert!(page.iter().all(|&b| b == want), "page {p}");
        }
    }
}
