//! The device layer's contract with the vfio-user protocol core: the one
//! trait a transport drives a device through. It lives with the devices;
//! the transport imports it.
//!
//! The transport has already checked everything generic before a method here
//! runs: message sizes, region and IRQ indexes against `device_info()`,
//! `offset + count` against the region's size (checked arithmetic), fd counts,
//! DMA map overlaps. The device answers with plain data and a typed
//! [`DeviceError`]; the transport maps that to an errno (see `errno()`), once.
//! No method has a default: a device that forgets one does not compile.

use std::os::fd::OwnedFd;

/// `VFIO_DEVICE_GET_INFO` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*` (PCI, RESET).
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// One area of a region that a VMM may mmap (sparse-mmap capability).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    pub offset: u64,
    pub size: u64,
}

/// `VFIO_DEVICE_GET_REGION_INFO` answer.
#[derive(Debug)]
pub struct RegionInfo {
    /// `VFIO_REGION_INFO_FLAG_{READ,WRITE,MMAP}`.
    pub flags: u32,
    /// 0 means the region does not exist.
    pub size: u64,
    /// For a mappable region: the fd to mmap, its offset, and the areas
    /// (empty = the whole region).
    pub mmap: Option<RegionMmap>,
}

#[derive(Debug)]
pub struct RegionMmap {
    /// Shared, so the reply that carries it keeps it open until sent
    /// whatever the device does with its own copy.
    pub fd: std::sync::Arc<OwnedFd>,
    pub file_offset: u64,
    pub areas: Vec<MmapArea>,
}

/// `VFIO_DEVICE_GET_IRQ_INFO` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    pub count: u32,
}

/// The action half of `VFIO_IRQ_SET_ACTION_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    Mask,
    Unmask,
    Trigger,
}

/// The data half of `VFIO_IRQ_SET_DATA_*`.
#[derive(Debug)]
pub enum IrqData {
    /// DATA_NONE: with count 0 and TRIGGER it disables the whole index;
    /// otherwise it acts on `start..start+count` unconditionally.
    None,
    /// DATA_BOOL: one flag per vector in `start..start+count`.
    Bool(Vec<bool>),
    /// DATA_EVENTFD: one entry per vector; `None` de-assigns (fd -1, or an
    /// EVENTFD message that carries no fds at all, as QEMU sends).
    Eventfds(Vec<Option<OwnedFd>>),
}

/// One `VFIO_USER_DMA_MAP` request, already checked for overlap and alignment.
#[derive(Debug)]
pub struct DmaMapping {
    pub iova: u64,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// The memory's fd and the offset of `iova` in it. `None` for memory the
    /// VMM can only reach by DMA_READ/DMA_WRITE (ROM, BIOS, other BARs).
    pub fd: Option<(OwnedFd, u64)>,
}

/// What a device can refuse with. The transport turns each into one errno.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("bad address: {0}")]
    Fault(String),
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("device busy: {0}")]
    Busy(String),
    #[error("out of resources: {0}")]
    NoSpace(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl DeviceError {
    /// The positive errno sent in the error reply.
    pub fn errno(&self) -> u32 {
        let e = match self {
            DeviceError::Invalid(_) => libc::EINVAL,
            DeviceError::Fault(_) => libc::EFAULT,
            DeviceError::NotSupported(_) => libc::ENOTSUP,
            DeviceError::Busy(_) => libc::EBUSY,
            DeviceError::NoSpace(_) => libc::ENOSPC,
            DeviceError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        };
        e as u32
    }
}

/// A device served over vfio-user. One connection drives one device; every
/// call comes from that connection's thread, in message order.
pub trait VfioUserDevice: Send {
    fn device_info(&self) -> DeviceInfo;
    fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError>;
    fn irq_info(&self, index: u32) -> Result<IrqInfo, DeviceError>;
    /// `data.len()` bytes at `offset`; the range is inside the region.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    /// The range is inside the region. For posted writes (No_reply) the
    /// error is logged and counted, never sent.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    fn set_irqs(
        &mut self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), DeviceError>;
    fn dma_map(&mut self, map: DmaMapping) -> Result<(), DeviceError>;
    /// Exactly a range an earlier `dma_map` added.
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DeviceError>;
    fn dma_unmap_all(&mut self) -> Result<(), DeviceError>;
    fn reset(&mut self) -> Result<(), DeviceError>;
    /// The VMM went away: drop its fds and mappings, quiesce.
    fn disconnected(&mut self);
    /// The device's migration side (VFIO migration v2), or `None` for a
    /// device that cannot migrate: the transport then leaves the MIGRATION
    /// and DMA_LOGGING features out of DEVICE_FEATURE (ENOTSUP).
    fn migration(&mut self) -> Option<&mut dyn Migratable>;
    /// What a successor process needs to take the device over while its VMM
    /// stays connected, or `None` for a device that cannot (its connection
    /// then keeps nothing).
    fn survivable(&mut self) -> Option<&mut dyn Survivable>;
}

/// What the restart layer needs from a device to hand it, running, to a
/// successor process (`crate::restart`). Called from the connection's
/// thread between two messages.
pub trait Survivable {
    /// The device's whole state as it runs now, except where each running
    /// queue stands in its rings (its journal keeps that, see
    /// `vdev::wd::journal`).
    fn live_state(&mut self) -> Result<serde_json::Value, DeviceError>;
    /// Every fd the device holds for its VMM (guest memory, eventfds), each
    /// under a key that names its role (`dma/<iova>`, `irq/<index>/<vector>`).
    /// The fds stay valid until the device's next message.
    fn held_fds(&self) -> Vec<(String, std::os::fd::RawFd)>;
}

/// What the transport needs from a device to migrate it. The transport owns
/// the state machine (`migration::fsm`), the stream's envelope
/// (`migration::stream`: magic, version, compatibility block, checksum, size
/// cap) and the MIG_DATA_READ / MIG_DATA_WRITE chunking; the device owns what
/// its state is. Calls come from the connection's thread, in the order of the
/// state machine's arcs.
pub trait Migratable {
    /// RUNNING (or PRE_COPY) to STOP: after this returns the device writes
    /// nothing to guest memory and raises no interrupt until `resume`, and no
    /// job the guest handed it is lost: each has either completed (its
    /// completion is in guest memory) or is still the guest's, on its ring, to
    /// be taken again after `resume` or on the destination.
    /// `Err(DeviceError::Busy)` means the device could not stop in time
    /// and runs on exactly as before: the transport stays in the arc's
    /// origin (RUNNING or PRE_COPY) and the VMM may try again. Any other
    /// error leaves the migration in ERROR until a reset.
    fn quiesce(&mut self) -> Result<(), DeviceError>;
    /// STOP to RUNNING: take work again, from where `quiesce` or `restore`
    /// left each queue.
    fn resume(&mut self) -> Result<(), DeviceError>;
    /// What a destination must match: the first thing it receives, checked
    /// before anything else is read.
    fn compat(&self) -> crate::migration::stream::Compat;
    /// The device's whole state (registers, config space, interrupt state
    /// without fds, each queue's ring positions), called only while quiesced.
    fn save(&mut self) -> Result<Vec<u8>, DeviceError>;
    /// Become the state `save` produced on a source whose `compat()` equals
    /// this device's (the transport has checked the envelope). Nothing in
    /// `state` is trusted; on any error the device is unchanged. The device
    /// stays quiesced until `resume`.
    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError>;
    /// Start logging the guest pages the device writes (DMA_LOGGING_START):
    /// from now on `dirty` reports them.
    fn dirty_log_start(&mut self, page_size: u64) -> Result<(), DeviceError>;
    fn dirty_log_stop(&mut self);
    /// One bit per `page_size` page of `[iova, iova + size)`, set for each
    /// page written since the last report of it, which this clears
    /// (DMA_LOGGING_REPORT). `bitmap` is `size / page_size` bits, rounded up
    /// to whole u64s.
    fn dirty_report(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError>;
}
