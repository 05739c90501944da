//! Helpers shared by the fuzz targets: a forgiving byte reader (a short
//! input reads as zeros, so every input is valid), one software accelerator
//! per process, memfd guest memory and the real device stack as
//! `daemon::instance` builds it. Nothing here stands in for the code under
//! test.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::soft::SoftAccel;
use wdvirt::qos::ScheduledAccel;
use wdvirt::vdev::device::{DmaMapping, VfioUserDevice};
use wdvirt::vdev::pci::{Interrupts, PciFunction};
use wdvirt::vdev::wd::{WdConfig, WdDevice};

/// Reads fixed-width little-endian values off the front of the fuzz input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }
    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let src = self.take(N);
        b[..src.len()].copy_from_slice(src);
        b
    }
    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }
}

/// One software accelerator for the whole fuzzing process (its engine
/// threads are started once), under the QoS scheduler as the daemon runs
/// it: small jobs run on the queue worker's thread when it lends the
/// engine (`QueuePair::run_here`), the rest on the engine thread.
pub fn accel() -> SharedAccelerator {
    static ACCEL: OnceLock<SharedAccelerator> = OnceLock::new();
    ACCEL
        .get_or_init(|| ScheduledAccel::new(SoftAccel::new(1), 1).expect("scheduler thread"))
        .clone()
}

/// A PASID no other live device in this process holds.
pub fn fresh_pasid() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An anonymous memory file of `size` bytes.
pub fn memfd(size: u64) -> OwnedFd {
    // Sealed, as QEMU's memory-backend-memfd: the device refuses unsealed RAM.
    let flags = rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING;
    let fd = rustix::fs::memfd_create("wdvirt-fuzz", flags).expect("memfd_create");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    let seals = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW;
    rustix::fs::fcntl_add_seals(&fd, seals).expect("seal");
    fd
}

/// The device stack of one instance, exactly as `daemon::instance` builds it:
/// `PciFunction<WdDevice>` on the shared software accelerator.
pub fn function(config: WdConfig) -> PciFunction<WdDevice> {
    let interrupts = Interrupts::new(config.queues as u16);
    let model = WdDevice::new(config, accel(), fresh_pasid(), Arc::new(interrupts.clone()))
        .expect("a valid WdConfig");
    PciFunction::new(model, interrupts)
}

/// Guest RAM the fuzzed device may use: `size` bytes at `iova`, mapped
/// readable and writable with an fd, as QEMU maps RAM.
pub fn map_ram(dev: &mut dyn VfioUserDevice, iova: u64, size: u64) {
    dev.dma_map(DmaMapping {
        iova,
        size,
        readable: true,
        writable: true,
        fd: Some((memfd(size), 0)),
    })
    .expect("mapping fresh RAM");
}
