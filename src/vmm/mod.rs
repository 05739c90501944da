//! An in-process VMM: what QEMU does for a vfio-user device, reduced to what
//! a guest driver needs. It connects to an instance's socket with the
//! rust-vmm `vfio_user` client (an implementation independent of wdvirt's
//! server), gives the "guest" memfd-backed RAM and maps it for the device
//! with DMA_MAP, turns on memory decoding and bus mastering in config space,
//! and hands the guest driver register access (REGION_READ/WRITE messages)
//! and DMA memory (the same memfd, mapped here through `vm-memory`).
//!
//! Used by `wdvirt demo`, the benchmark and the end-to-end tests.
//!
//! The crate's client speaks no migration, so a VMM that migrates connects
//! with [`LoopbackVmm::connect_migratable`] instead: the same VMM over
//! wdvirt's own client ([`client::VfioUserClient`]), which adds the
//! migration commands (feature probe, state get/set, reading and writing
//! the stream, DMA logging). [`LoopbackVmm::migration`] hands it out.

pub mod client;
pub mod link;
pub mod load;
pub mod migrate;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use wdvirt_guest::{DmaAllocator, DmaError, DmaMemory, DmaPool, Mmio, MmioError};

/// VFIO PCI region index of config space.
pub const CONFIG_REGION: u32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: vfio_user::Error,
    },
    #[error("vfio-user request failed: {0}")]
    Request(#[from] vfio_user::Error),
    #[error("guest RAM: {0}")]
    Ram(String),
    #[error("cannot connect to {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what} refused: {}", std::io::Error::from_raw_os_error(*errno))]
    Refused { what: String, errno: i32 },
    #[error("vfio-user protocol: {0}")]
    Protocol(String),
    #[error("this VMM's client speaks no migration (connect with connect_migratable)")]
    NoMigration,
}

/// The vfio-user client a [`LoopbackVmm`] speaks through.
enum Backend {
    /// The rust-vmm crate's (independent of wdvirt's server).
    Crate(vfio_user::Client),
    /// wdvirt's own, which also speaks migration.
    Own(client::VfioUserClient),
}

impl Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), VmmError> {
        match self {
            Backend::Crate(c) => Ok(c.region_read(region, offset, data)?),
            Backend::Own(c) => c.region_read(region, offset, data),
        }
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), VmmError> {
        match self {
            Backend::Crate(c) => Ok(c.region_write(region, offset, data)?),
            Backend::Own(c) => c.region_write(region, offset, data),
        }
    }
}

/// Guest RAM: a memfd the VMM shares with the device.
pub struct GuestRam {
    file: File,
    base: u64,
    size: u64,
    mem: GuestMemoryMmap,
}

impl GuestRam {
    pub fn new(base: u64, size: u64) -> Result<GuestRam, VmmError> {
        let err = |e: &dyn std::fmt::Display| VmmError::Ram(e.to_string());
        let flags = rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING;
        let fd = rustix::fs::memfd_create("wdvirt-guest-ram", flags).map_err(|e| err(&e))?;
        rustix::fs::ftruncate(&fd, size).map_err(|e| err(&e))?;
        // As QEMU's memory-backend-memfd: the size is fixed for good.
        let seals = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW;
        rustix::fs::fcntl_add_seals(&fd, seals).map_err(|e| err(&e))?;
        let file = File::from(fd);
        let region = GuestRegionMmap::from_range(
            GuestAddress(base),
            size as usize,
            Some(FileOffset::new(file.try_clone().map_err(|e| err(&e))?, 0)),
        )
        .map_err(|e| err(&e))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| err(&e))?;
        Ok(GuestRam {
            file,
            base,
            size,
            mem,
        })
    }
    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn size(&self) -> u64 {
        self.size
    }
}

fn dma_err(addr: u64, len: usize) -> DmaError {
    DmaError::OutOfRange {
        addr,
        len: len as u64,
    }
}

impl DmaMemory for GuestRam {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| dma_err(addr, buf.len()))
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| dma_err(addr, data.len()))
    }
    fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        self.mem
            .load(GuestAddress(addr), Ordering::Acquire)
            .map_err(|_| dma_err(addr, 4))
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError> {
        self.mem
            .store(value, GuestAddress(addr), Ordering::Release)
            .map_err(|_| dma_err(addr, 4))
    }
}

/// A connected VMM with its guest RAM mapped for the device.
pub struct LoopbackVmm {
    client: Mutex<Backend>,
    ram: Arc<GuestRam>,
}

impl LoopbackVmm {
    /// Connect, DMA_MAP `ram`, and enable memory decoding and bus mastering.
    pub fn connect(socket: &Path, ram: GuestRam) -> Result<LoopbackVmm, VmmError> {
        let mut client = vfio_user::Client::new(socket).map_err(|source| VmmError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
        client.dma_map(0, ram.base, ram.size, ram.file.as_raw_fd())?;
        LoopbackVmm::start(Backend::Crate(client), ram)
    }

    /// As [`connect`](Self::connect), over wdvirt's own client, so that
    /// [`migration`](Self::migration) works.
    pub fn connect_migratable(socket: &Path, ram: GuestRam) -> Result<LoopbackVmm, VmmError> {
        let mut client = client::VfioUserClient::connect(socket)?;
        client.dma_map(ram.base, ram.size, Some((ram.file.as_fd(), 0)))?;
        LoopbackVmm::start(Backend::Own(client), ram)
    }

    fn start(backend: Backend, ram: GuestRam) -> Result<LoopbackVmm, VmmError> {
        let vmm = LoopbackVmm {
            client: Mutex::new(backend),
            ram: Arc::new(ram),
        };
        let cmd = vmm.config_read(4, 2)? as u16;
        // PCI command register: memory space (bit 1) and bus master (bit 2).
        vmm.config_write(4, 2, (cmd | 0b110) as u32)?;
        Ok(vmm)
    }

    /// The migration side of the connection (DEVICE_FEATURE, MIG_DATA_*,
    /// DMA logging), for a VMM made by
    /// [`connect_migratable`](Self::connect_migratable).
    pub fn migration(
        &self,
    ) -> Result<parking_lot::MappedMutexGuard<'_, client::VfioUserClient>, VmmError> {
        parking_lot::MutexGuard::try_map(self.client.lock(), |b| match b {
            Backend::Own(c) => Some(c),
            Backend::Crate(_) => None,
        })
        .map_err(|_| VmmError::NoMigration)
    }

    pub fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }

    /// All of guest RAM as the driver's DMA pool (rings and job buffers).
    pub fn dma_pool(&self) -> Result<DmaPool<Arc<GuestRam>>, DmaError> {
        Ok(DmaPool::new(
            self.ram.clone(),
            DmaAllocator::new(self.ram.base, self.ram.size)?,
        ))
    }

    /// Config-space read of 1, 2 or 4 bytes.
    pub fn config_read(&self, offset: u64, len: usize) -> Result<u32, VmmError> {
        let len = len.min(4);
        let mut b = [0u8; 4];
        self.client
            .lock()
            .region_read(CONFIG_REGION, offset, &mut b[..len])?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn config_write(&self, offset: u64, len: usize, value: u32) -> Result<(), VmmError> {
        let len = len.min(4);
        self.client
            .lock()
            .region_write(CONFIG_REGION, offset, &value.to_le_bytes()[..len])?;
        Ok(())
    }

    /// Raw region access, for tests that write what a driver never would.
    pub fn region_read(&self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), VmmError> {
        self.client.lock().region_read(region, offset, data)
    }
    pub fn region_write(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), VmmError> {
        self.client.lock().region_write(region, offset, data)
    }

    /// BAR sizes as the VMM learnt them from region info.
    pub fn region_size(&self, region: u32) -> Option<u64> {
        match &mut *self.client.lock() {
            Backend::Crate(c) => c.region(region).map(|r| r.size),
            Backend::Own(c) => c.region_size(region).ok(),
        }
    }

    /// Enable MSI-X in the function's capability (Message Control bit 15), as
    /// a guest does, and give the device an eventfd for `vector` (SET_IRQS
    /// EVENTFD|TRIGGER), as a VMM does when the guest unmasks it.
    pub fn enable_msix_vector(
        &self,
        vector: u32,
        eventfd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), VmmError> {
        let mut ptr = self.config_read(0x34, 1)? as u64;
        // At most 48 capabilities fit in config space: a loop is a device bug.
        for _ in 0..48 {
            if ptr == 0 || self.config_read(ptr, 1)? == 0x11 {
                break;
            }
            ptr = self.config_read(ptr + 1, 1)? as u64;
        }
        if ptr == 0 || self.config_read(ptr, 1)? != 0x11 {
            return Err(VmmError::Ram("no MSI-X capability".into()));
        }
        let ctrl = self.config_read(ptr + 2, 2)?;
        self.config_write(ptr + 2, 2, ctrl | 0x8000)?;
        let flags = vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_EVENTFD
            | vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
        let index = vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;
        match &mut *self.client.lock() {
            Backend::Crate(c) => c.set_irqs(index, flags, vector, 1, &[eventfd.as_raw_fd()])?,
            Backend::Own(c) => c.set_irqs(index, flags, vector, 1, &[eventfd])?,
        }
        Ok(())
    }
}

impl Mmio for LoopbackVmm {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
        let mut b = [0u8; 4];
        self.region_read(bar as u32, offset, &mut b)
            .map_err(|e| MmioError::Transport(e.to_string()))?;
        Ok(u32::from_le_bytes(b))
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
        self.region_write(bar as u32, offset, &value.to_le_bytes())
            .map_err(|e| MmioError::Transport(e.to_string()))
    }
}

impl Drop for LoopbackVmm {
    fn drop(&mut self) {
        if let Backend::Crate(c) = &*self.client.lock() {
            let _ = c.shutdown();
        }
    }
}
