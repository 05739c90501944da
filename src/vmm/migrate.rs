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

use std::fmt;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};
use wdvirt_guest::{DmaAllocator, DmaError, DmaMemory, DmaPool, Mmio, MmioError};

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
        let ram = vmm.ram();
        let pages = ram.size().div_ceil(PAGE);
        Arc::new(Vm {
            base: ram.base(),
            size: ram.size(),
            guest_dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            active: RwLock::new(Arc::new(vmm)),
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
    #[error("the {side} does not offer STOP_COPY and PRE_COPY migration (flags {flags:#x})")]
    NotMigratable { side: &'static str, flags: u64 },
    #[error("the destination refused the source's compatibility block (the source runs on): {0}")]
    Refused(VmmError),
    #[error("migration failed while {phase} (the source runs on): {source}")]
    Failed { phase: Phase, source: VmmError },
    #[error("migration cancelled while {0} (the source runs on)")]
    Cancelled(Phase),
    #[error("guest RAM: {0}")]
    Ram(String),
}

fn failed(phase: Phase) -> impl Fn(VmmError) -> MigrateError {
    move |source| MigrateError::Failed { phase, source }
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
    let flags = vmm
        .migration()
        .and_then(|mut c| c.migration_flags())
        .unwrap_or(0);
    if flags & want != want {
        return Err(MigrateError::NotMigratable { side, flags });
    }
    Ok(())
}

/// Copies the pages set in `bits` (page `i` at `base + i * PAGE`) from
/// `from` to `to`, in runs; returns the pages copied.
fn copy_pages(
    from: &GuestRam,
    to: &GuestRam,
    bits: &[u64],
    buf: &mut Vec<u8>,
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
        while p < pages && set(p) {
            p += 1;
        }
        let addr = from.base() + start * PAGE;
        let len = ((p - start) * PAGE).min(from.base() + from.size() - addr) as usize;
        buf.resize(len, 0);
        let ram = |e: DmaError| MigrateError::Ram(e.to_string());
        from.read(addr, buf).map_err(ram)?;
        to.write(addr, buf).map_err(ram)?;
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

/// Moves `vm` to the instance serving `dest`. `progress` is told each
/// phase and round; `ControlFlow::Break` from it cancels the migration
/// (up to the destination's RUNNING), which then fails as
/// [`MigrateError::Cancelled`] with the source running.
pub fn migrate(
    vm: &Vm,
    dest: &Path,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
) -> Result<Figures, MigrateError> {
    let src = vm.vmm();
    check_flags(&src, "source")?;
    let dst = Arc::new(connect_destination(dest, vm.base, vm.size)?);
    check_flags(&dst, "destination")?;
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
    match run(vm, &src, &dst, opts, progress, &mut figures, &mut state) {
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
            if let Err(stop) = src.migration().and_then(|mut c| c.dirty_log_stop()) {
                tracing::warn!("the source's dirty log did not stop: {stop}");
            }
            tracing::warn!("migration to {} failed: {e}", dest.display());
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

fn run(
    vm: &Vm,
    src: &LoopbackVmm,
    dst: &Arc<LoopbackVmm>,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    figures: &mut Figures,
    state: &mut Progress,
) -> Result<(), MigrateError> {
    let mut tell = |state: &Progress| match progress(state) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(MigrateError::Cancelled(state.phase)),
    };
    tell(state)?;
    let (from, to) = (src.ram(), dst.ram());
    let mut buf = Vec::new();
    let pre_copy = || -> Result<Vec<u8>, MigrateError> {
        let p = Phase::PreCopy;
        let mut c = src.migration().map_err(failed(p))?;
        c.set_mig_state(MigState::PreCopy).map_err(failed(p))?;
        let piece = c.max_xfer();
        c.mig_read_all(piece).map_err(failed(p))
    };
    let pre = pre_copy();
    let pre = pre.and_then(|pre| {
        let mut d = dst.migration().map_err(failed(Phase::PreCopy))?;
        d.set_mig_state(MigState::Resuming)
            .map_err(failed(Phase::PreCopy))?;
        let piece = d.max_xfer();
        d.mig_write(&pre, piece).map_err(MigrateError::Refused)?;
        Ok(pre)
    });
    let running = (|| {
        let pre = pre?;
        figures.stream_bytes = pre.len() as u64;
        state.phase = Phase::PreCopy;
        state.stream_bytes = figures.stream_bytes;
        tell(state)?;
        // All of RAM while running, then the pages dirtied meanwhile.
        let all = vec![u64::MAX; vm.guest_dirty.len()];
        let n = copy_pages(&from, &to, &all, &mut buf)?;
        state.phase = Phase::RamRound;
        state.round_pages = n;
        figures.ram_bytes = n * PAGE;
        state.ram_bytes = figures.ram_bytes;
        tell(state)?;
        for round in 1..=opts.max_rounds {
            let bits = dirty(vm, src, Phase::RamRound)?;
            let n = copy_pages(&from, &to, &bits, &mut buf)?;
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

    // The guest paused from here until it runs on one side or the other.
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
        let n = copy_pages(&from, &to, &bits, &mut buf)?;
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
        let mut d = dst.migration().map_err(failed(p))?;
        let piece = d.max_xfer();
        d.mig_write(&rest, piece).map_err(failed(p))?;
        d.set_mig_state(MigState::Stop).map_err(failed(p))?;
        d.set_mig_state(MigState::Running).map_err(failed(p))?;
        figures.destination_resume = t2.elapsed();
        Ok(())
    })();
    match stopped {
        Ok(()) => {
            figures.downtime = t0.elapsed();
            *active = dst.clone();
            Ok(())
        }
        Err(e) => {
            run_on(src);
            Err(e)
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
        let n = copy_pages(&from, &to, &bits, &mut Vec::new()).unwrap();
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
