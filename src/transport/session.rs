//! One connection's protocol state and the command handlers.
//!
//! Every generic check (body sizes, argsz, indexes, `offset + count` against
//! the region size, fd counts, DMA overlaps) happens here, before a device
//! method runs; the device's own refusal comes back as its errno.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use tracing::{debug, warn};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use zerocopy::IntoBytes;

use super::closer::{self, FdKind};
use super::dma_table::{DmaEntry, DmaTable};
use super::error::TransportError;
use super::keeper::{DmaRecord, SessionRecord};
use super::limits::Limits;
use super::migration::{MigCounts, MigrationError, MigrationSession};
use super::socket::Message;
use super::version::{self, ClientCaps};
use super::wire::{self, Command, HEADER_SIZE, Header};
use crate::vdev::device::{
    DeviceError, DmaMapping, IrqAction, IrqData, Migratable, VfioUserDevice,
};

/// A successful reply: the whole message (header included) and at most one
/// fd to attach (only GET_REGION_INFO of a mappable region sends one).
pub struct Reply {
    pub bytes: Vec<u8>,
    pub fd: Option<Arc<OwnedFd>>,
}

impl Reply {
    fn new(req: &Header, body: &[u8]) -> Reply {
        let mut bytes = Vec::with_capacity(HEADER_SIZE + body.len());
        bytes.extend_from_slice(req.reply(body.len()).as_bytes());
        bytes.extend_from_slice(body);
        Reply { bytes, fd: None }
    }

    /// A reply whose body the caller fills in place after `prefix`.
    fn with_tail(req: &Header, prefix: &[u8], tail: usize) -> Reply {
        let body_len = prefix.len() + tail;
        let mut bytes = Vec::with_capacity(HEADER_SIZE + body_len);
        bytes.extend_from_slice(req.reply(body_len).as_bytes());
        bytes.extend_from_slice(prefix);
        bytes.resize(HEADER_SIZE + body_len, 0);
        Reply { bytes, fd: None }
    }

    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| fd.as_fd())
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct RegionShape {
    flags: u32,
    size: u64,
}

pub struct Session {
    caps: Option<ClientCaps>,
    dma: DmaTable,
    num_regions: u32,
    num_irqs: u32,
    /// Region sizes and access flags, read once from the device: a PCI
    /// function's regions are fixed for its lifetime.
    regions: Vec<RegionShape>,
    /// What VERSION advertises and the checks hold to.
    limits: Limits,
    /// The migration state machine and streams (`super::migration`).
    mig: MigrationSession,
    /// DMA logging: `Some(ranges)` while on (empty: all of memory), each
    /// range as (start, end).
    logging: Option<Vec<(u64, u64)>>,
}

/// `data_fd` in MIG_DEVICE_STATE replies: vfio-user carries no fd there.
const NO_DATA_FD: i32 = -1;

fn invalid(msg: impl Into<String>) -> TransportError {
    TransportError::invalid(msg)
}

fn body_struct<T: zerocopy::FromBytes>(body: &[u8], what: &str) -> Result<T, TransportError> {
    wire::read_prefix(body).ok_or_else(|| {
        invalid(format!(
            "{what}: body of {} bytes is shorter than {}",
            body.len(),
            size_of::<T>()
        ))
    })
}

/// The fds of a DMA_MAP or SET_IRQS, when each is of the `kind` the
/// command takes; otherwise all of them go to the closer and the message is
/// refused (EINVAL). The device gets only fds whose close cannot block, so
/// it may drop them on any thread ([`closer`]).
fn admit(fds: Vec<OwnedFd>, kind: FdKind, what: &str) -> Result<Vec<OwnedFd>, TransportError> {
    if fds.iter().all(|fd| closer::closes_at_once(fd, kind)) {
        return Ok(fds);
    }
    closer::close_all(fds);
    Err(invalid(match kind {
        FdKind::Memory => format!("{what} fd is not guest memory (a memfd)"),
        FdKind::Eventfd => format!("{what} fd is not an eventfd"),
    }))
}

/// Fds a message with this header may carry: DMA_MAP one (its memory),
/// SET_IRQS up to `max_msg_fds` (eventfds), anything else none. The socket
/// judges arriving fds by it; [`Session::handle`] relies on it.
pub fn fd_budget(h: &Header, max_msg_fds: usize) -> usize {
    match Command::from_u16(h.cmd) {
        Some(Command::DmaMap) => 1,
        Some(Command::DeviceSetIrqs) => max_msg_fds,
        _ => 0,
    }
}

impl Session {
    pub fn new(dev: &dyn VfioUserDevice, limits: &Limits) -> Session {
        let info = dev.device_info();
        let regions = (0..info.num_regions)
            .map(|i| match dev.region_info(i) {
                Ok(r) => RegionShape {
                    flags: r.flags,
                    size: r.size,
                },
                Err(e) => {
                    warn!("vfio-user: device refused region_info({i}): {e}; treating as absent");
                    RegionShape::default()
                }
            })
            .collect();
        Session {
            caps: None,
            dma: DmaTable::new(limits.max_dma_maps, limits.max_dma_fd_bytes),
            limits: limits.clone(),
            mig: MigrationSession::new(limits.max_migration_stream),
            logging: None,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
            regions,
        }
    }

    /// A session taken over from a predecessor process: VERSION was
    /// agreed as `record.caps` says, and the VMM's maps are `record.dma`,
    /// which the caller has given the device again. Every map is checked
    /// again as its DMA_MAP was (alignment, overlap, the connection's caps).
    pub fn adopted(
        dev: &dyn VfioUserDevice,
        limits: &Limits,
        record: &SessionRecord,
    ) -> Result<Session, TransportError> {
        let mut s = Session::new(dev, limits);
        for m in &record.dma {
            s.dma.check_insert(m.iova, m.size, m.has_fd)?;
            s.dma.insert(DmaEntry {
                iova: m.iova,
                size: m.size,
                flags: m.flags,
                has_fd: m.has_fd,
                offset: m.offset,
            });
        }
        s.caps = Some(record.caps);
        Ok(s)
    }

    /// What a successor process needs of this session, once VERSION is
    /// agreed.
    pub fn record(&self) -> Option<SessionRecord> {
        Some(SessionRecord {
            caps: self.caps?,
            dma: self
                .dma
                .iter()
                .map(|e| DmaRecord {
                    iova: e.iova,
                    size: e.size,
                    flags: e.flags,
                    offset: e.offset,
                    has_fd: e.has_fd,
                })
                .collect(),
        })
    }

    /// Whether the device's migration is anywhere but RUNNING (a successor
    /// cannot take up a migration half way).
    pub fn migrating(&self) -> bool {
        self.mig.state() != crate::migration::MigState::Running
    }

    /// What the migration side did since the last call (for the stats).
    pub fn take_migration_counts(&mut self) -> MigCounts {
        self.mig.take_counts()
    }

    /// The connection is over: DMA logging it started stops. Returns the
    /// migration state when it is not RUNNING (a migration left half way):
    /// the device stays as the last arc left it, and `disconnected()`
    /// (called next) decides what a lost VMM means.
    pub fn ended(&mut self, dev: &mut dyn VfioUserDevice) -> Option<crate::migration::MigState> {
        let mig = dev.migration()?;
        if self.logging.take().is_some() {
            mig.dirty_log_stop();
        }
        let state = self.mig.state();
        (state != crate::migration::MigState::Running).then_some(state)
    }

    /// Handles one request. `Ok` carries the success reply (dropped by the
    /// caller for No_reply); `Err` becomes a header-only error reply.
    pub fn handle(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        msg: &mut Message,
    ) -> Result<Reply, TransportError> {
        let h = msg.header;
        let cmd = Command::from_u16(h.cmd);
        // The socket closed the fds past this as they arrived, and a message
        // that lost any is refused before it gets here.
        debug_assert!(
            msg.fds.len() <= fd_budget(&h, self.limits.max_msg_fds),
            "command {} reached the session with {} fds",
            h.cmd,
            msg.fds.len()
        );
        // Spec "VFIO_USER_VERSION": the first message, and only once.
        match (cmd, self.caps.is_some()) {
            (Some(Command::Version), false) => return self.version(msg),
            (Some(Command::Version), true) => return Err(invalid("second VERSION")),
            (_, false) => return Err(invalid(format!("command {} before VERSION", h.cmd))),
            _ => {}
        }
        let body = &msg.body;
        match cmd {
            Some(Command::DmaMap) => {
                let fds = admit(std::mem::take(&mut msg.fds), FdKind::Memory, "DMA_MAP")?;
                self.dma_map(dev, &h, &msg.body, fds)
            }
            Some(Command::DmaUnmap) => self.dma_unmap(dev, &h, body),
            Some(Command::DeviceGetInfo) => self.get_info(dev, &h, body),
            Some(Command::DeviceGetRegionInfo) => self.get_region_info(dev, &h, body),
            Some(Command::DeviceGetIrqInfo) => self.get_irq_info(dev, &h, body),
            Some(Command::DeviceSetIrqs) => {
                let fds = admit(std::mem::take(&mut msg.fds), FdKind::Eventfd, "SET_IRQS")?;
                self.set_irqs(dev, &h, &msg.body, fds)
            }
            Some(Command::RegionRead) => self.region_read(dev, &h, body),
            Some(Command::RegionWrite) => self.region_write(dev, &h, body),
            Some(Command::RegionWriteMulti) => self.region_write_multi(dev, &h, body),
            Some(Command::DeviceReset) => {
                dev.reset()?;
                // The only way out of ERROR: the device is RUNNING again.
                self.mig.reset();
                Ok(Reply::new(&h, &[]))
            }
            Some(Command::DeviceFeature) => self.device_feature(dev, &h, body),
            Some(Command::MigDataRead) => self.mig_data_read(dev, &h, body),
            Some(Command::MigDataWrite) => self.mig_data_write(dev, &h, body),
            // GET_REGION_IO_FDS, DMA_READ/WRITE (server → client only), the
            // removed DIRTY_PAGES: not served.
            _ => Err(TransportError::UnknownCommand(h.cmd)),
        }
    }

    fn version(&mut self, msg: &Message) -> Result<Reply, TransportError> {
        let caps = version::parse_request(&msg.body)?;
        debug!(
            "vfio-user: client version {}.{} caps {caps:?}",
            caps.major, caps.minor
        );
        self.caps = Some(caps);
        Ok(Reply::new(
            &msg.header,
            &version::build_reply(msg.body.len(), &self.limits),
        ))
    }

    fn dma_map(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<Reply, TransportError> {
        let m: wire::DmaMap = body_struct(body, "DMA_MAP")?;
        if (m.argsz as usize) < size_of::<wire::DmaMap>() {
            return Err(invalid(format!("DMA_MAP argsz {}", m.argsz)));
        }
        let known = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
        if m.flags & !known != 0 {
            // Future flags (libvfio-user#842 adds bit 2) are tolerated.
            debug!(
                "vfio-user: DMA_MAP ignoring unknown flags {:#x}",
                m.flags & !known
            );
        }
        self.dma.check_insert(m.iova, m.size, !fds.is_empty())?;
        let fd = fds.pop();
        if fd.is_some() {
            if !m.offset.is_multiple_of(wire::PAGE_SIZE) {
                return Err(invalid(format!(
                    "DMA_MAP fd offset {:#x} unaligned",
                    m.offset
                )));
            }
            if m.offset.checked_add(m.size).is_none() {
                return Err(invalid("DMA_MAP fd offset + size overflows"));
            }
        }
        let has_fd = fd.is_some();
        dev.dma_map(DmaMapping {
            iova: m.iova,
            size: m.size,
            readable: m.flags & VFIO_DMA_MAP_FLAG_READ != 0,
            writable: m.flags & VFIO_DMA_MAP_FLAG_WRITE != 0,
            fd: fd.map(|f| (f, m.offset)),
        })?;
        self.dma.insert(DmaEntry {
            iova: m.iova,
            size: m.size,
            flags: m.flags,
            has_fd,
            offset: if has_fd { m.offset } else { 0 },
        });
        // No reply payload (spec); QEMU's buffer is 48 B, cloud-hypervisor reads 16.
        Ok(Reply::new(h, &[]))
    }

    fn dma_unmap(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let u: wire::DmaUnmap = body_struct(body, "DMA_UNMAP")?;
        if (u.argsz as usize) < size_of::<wire::DmaUnmap>() {
            return Err(invalid(format!("DMA_UNMAP argsz {}", u.argsz)));
        }
        if u.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(TransportError::NotSupported(
                "DMA_UNMAP dirty bitmap".into(),
            ));
        }
        if u.flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Err(invalid(format!("DMA_UNMAP flags {:#x}", u.flags)));
        }
        if u.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            // QEMU sends 0x2 with iova 0, size 0 when a 2^64 section goes.
            if u.iova != 0 || u.size != 0 {
                return Err(invalid("DMA_UNMAP all with a range"));
            }
            dev.dma_unmap_all()?;
            self.dma.clear();
        } else {
            self.dma.check_remove(u.iova, u.size)?;
            dev.dma_unmap(u.iova, u.size)?;
            self.dma.remove(u.iova);
        }
        // "The server responds with the original DMA entry" (40 B).
        Ok(Reply::new(h, &body[..size_of::<wire::DmaUnmap>()]))
    }

    fn get_info(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let req: wire::DeviceInfo = body_struct(body, "DEVICE_GET_INFO")?;
        if (req.argsz as usize) < size_of::<wire::DeviceInfo>() {
            return Err(invalid(format!("DEVICE_GET_INFO argsz {}", req.argsz)));
        }
        let info = dev.device_info();
        let reply = wire::DeviceInfo {
            argsz: size_of::<wire::DeviceInfo>() as u32,
            flags: info.flags,
            num_regions: self.num_regions,
            num_irqs: self.num_irqs,
        };
        Ok(Reply::new(h, reply.as_bytes()))
    }

    fn get_region_info(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let req: wire::RegionInfo = body_struct(body, "GET_REGION_INFO")?;
        let fixed = size_of::<wire::RegionInfo>();
        if (req.argsz as usize) < fixed {
            return Err(invalid(format!("GET_REGION_INFO argsz {}", req.argsz)));
        }
        if req.index >= self.num_regions {
            return Err(invalid(format!(
                "region {} of {}",
                req.index, self.num_regions
            )));
        }
        let info = dev.region_info(req.index)?;
        let mut flags = info.flags & !(VFIO_REGION_INFO_FLAG_MMAP | VFIO_REGION_INFO_FLAG_CAPS);
        let mut payload = Vec::with_capacity(fixed + 64);
        payload.resize(fixed, 0);
        let mut out = wire::RegionInfo {
            index: req.index,
            size: info.size,
            ..Default::default()
        };
        let mut fd = None;
        if let Some(mmap) = &info.mmap {
            flags |= VFIO_REGION_INFO_FLAG_MMAP;
            out.offset = mmap.file_offset;
            fd = Some(mmap.fd.clone());
            let areas: Vec<wire::SparseArea> = mmap
                .areas
                .iter()
                .filter(|a| {
                    let inside = a.size != 0
                        && a.offset
                            .checked_add(a.size)
                            .is_some_and(|end| end <= info.size);
                    if !inside {
                        warn!("vfio-user: region {} drops mmap area {a:?}", req.index);
                    }
                    inside
                })
                .map(|a| wire::SparseArea {
                    offset: a.offset,
                    size: a.size,
                })
                .collect();
            if !areas.is_empty() {
                // Sparse-mmap capability right after the fixed part.
                flags |= VFIO_REGION_INFO_FLAG_CAPS;
                out.cap_offset = fixed as u32;
                let cap = wire::SparseMmapCap {
                    id: VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16,
                    version: 1,
                    next: 0,
                    nr_areas: areas.len() as u32,
                    reserved: 0,
                };
                payload.extend_from_slice(cap.as_bytes());
                for a in &areas {
                    payload.extend_from_slice(a.as_bytes());
                }
            }
        }
        out.flags = flags;
        out.argsz = payload.len() as u32;
        payload[..fixed].copy_from_slice(out.as_bytes());
        // argsz says the full size; the payload stops at the client's argsz
        // (QEMU's receive buffer is 16 + argsz; it retries with more).
        payload.truncate(payload.len().min(req.argsz as usize));
        let mut reply = Reply::new(h, &payload);
        reply.fd = fd;
        Ok(reply)
    }

    fn get_irq_info(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let req: wire::IrqInfo = body_struct(body, "GET_IRQ_INFO")?;
        if (req.argsz as usize) < size_of::<wire::IrqInfo>() {
            return Err(invalid(format!("GET_IRQ_INFO argsz {}", req.argsz)));
        }
        if req.index >= self.num_irqs {
            return Err(invalid(format!(
                "irq index {} of {}",
                req.index, self.num_irqs
            )));
        }
        let info = dev.irq_info(req.index)?;
        let reply = wire::IrqInfo {
            argsz: size_of::<wire::IrqInfo>() as u32,
            flags: info.flags,
            index: req.index,
            count: info.count,
        };
        Ok(Reply::new(h, reply.as_bytes()))
    }

    fn set_irqs(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, TransportError> {
        let s: wire::IrqSet = body_struct(body, "SET_IRQS")?;
        let fixed = size_of::<wire::IrqSet>();
        if (s.argsz as usize) < fixed {
            return Err(invalid(format!("SET_IRQS argsz {}", s.argsz)));
        }
        if s.index >= self.num_irqs {
            return Err(invalid(format!(
                "irq index {} of {}",
                s.index, self.num_irqs
            )));
        }
        let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let data_type = s.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = match s.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK {
            VFIO_IRQ_SET_ACTION_MASK => IrqAction::Mask,
            VFIO_IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            VFIO_IRQ_SET_ACTION_TRIGGER => IrqAction::Trigger,
            _ => {
                return Err(invalid(format!(
                    "SET_IRQS flags {:#x}: one action",
                    s.flags
                )));
            }
        };
        if s.flags & !known != 0 {
            return Err(invalid(format!("SET_IRQS unknown flags {:#x}", s.flags)));
        }
        let info = dev.irq_info(s.index)?;
        // Like the kernel's vfio_set_irqs_validate_and_prepare: the range
        // must lie inside the index (count 0 + NONE|TRIGGER = disable all).
        let end = s.start.checked_add(s.count);
        if end.is_none_or(|end| end > info.count) {
            return Err(invalid(format!(
                "SET_IRQS {}+{} past index {} count {}",
                s.start, s.count, s.index, info.count
            )));
        }
        if !fds.is_empty() && data_type != VFIO_IRQ_SET_DATA_EVENTFD {
            return Err(invalid("SET_IRQS fds without DATA_EVENTFD"));
        }
        let data = match data_type {
            VFIO_IRQ_SET_DATA_NONE => IrqData::None,
            VFIO_IRQ_SET_DATA_BOOL => {
                let bools = body
                    .get(fixed..fixed + s.count as usize)
                    .ok_or_else(|| invalid("SET_IRQS DATA_BOOL shorter than count"))?;
                IrqData::Bool(bools.iter().map(|&b| b != 0).collect())
            }
            VFIO_IRQ_SET_DATA_EVENTFD => {
                if s.count == 0 {
                    return Err(invalid("SET_IRQS DATA_EVENTFD with count 0"));
                }
                if fds.is_empty() {
                    // QEMU de-assigns a run of vectors this way.
                    IrqData::Eventfds((0..s.count).map(|_| None).collect())
                } else if fds.len() == s.count as usize {
                    IrqData::Eventfds(fds.into_iter().map(Some).collect())
                } else {
                    return Err(invalid(format!(
                        "SET_IRQS count {} with {} fds",
                        s.count,
                        fds.len()
                    )));
                }
            }
            _ => {
                return Err(invalid(format!(
                    "SET_IRQS flags {:#x}: one data type",
                    s.flags
                )));
            }
        };
        dev.set_irqs(s.index, action, s.start, s.count, data)?;
        Ok(Reply::new(h, &[]))
    }

    /// The generic region access check (libvfio-user does the same before a
    /// device callback): index, direction, count limits, and
    /// `offset + count` inside the region with checked arithmetic.
    fn check_access(
        &self,
        region: u32,
        offset: u64,
        count: u32,
        write: bool,
    ) -> Result<(), TransportError> {
        let r = self
            .regions
            .get(region as usize)
            .ok_or_else(|| invalid(format!("region {region} of {}", self.num_regions)))?;
        if count == 0 || count > self.limits.max_data_xfer_size() {
            return Err(invalid(format!("region access count {count}")));
        }
        let need = if write {
            VFIO_REGION_INFO_FLAG_WRITE
        } else {
            VFIO_REGION_INFO_FLAG_READ
        };
        if r.flags & need == 0 {
            return Err(invalid(format!(
                "region {region} is not {}",
                if write { "writable" } else { "readable" }
            )));
        }
        match offset.checked_add(count as u64) {
            Some(end) if end <= r.size => Ok(()),
            _ => Err(invalid(format!(
                "region {region} access {offset:#x}+{count:#x} past size {:#x}",
                r.size
            ))),
        }
    }

    fn region_read(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let a: wire::RegionAccess = body_struct(body, "REGION_READ")?;
        if body.len() != size_of::<wire::RegionAccess>() {
            return Err(invalid(format!("REGION_READ body of {} bytes", body.len())));
        }
        self.check_access(a.region, a.offset, a.count, false)?;
        let prefix = size_of::<wire::RegionAccess>();
        let mut reply = Reply::with_tail(h, a.as_bytes(), a.count as usize);
        dev.region_read(a.region, a.offset, &mut reply.bytes[HEADER_SIZE + prefix..])?;
        Ok(reply)
    }

    fn region_write(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let a: wire::RegionAccess = body_struct(body, "REGION_WRITE")?;
        let prefix = size_of::<wire::RegionAccess>();
        if body.len() != prefix + a.count as usize {
            return Err(invalid(format!(
                "REGION_WRITE count {} with {} data bytes",
                a.count,
                body.len() - prefix
            )));
        }
        self.check_access(a.region, a.offset, a.count, true)?;
        dev.region_write(a.region, a.offset, &body[prefix..])?;
        // Echo offset/region/count (32 B: what QEMU and cloud-hypervisor read).
        Ok(Reply::new(h, a.as_bytes()))
    }

    fn region_write_multi(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let wr_cnt: u64 = body_struct(body, "REGION_WRITE_MULTI")?;
        if wr_cnt == 0 || wr_cnt > wire::MAX_WRITE_MULTI {
            return Err(invalid(format!("REGION_WRITE_MULTI wr_cnt {wr_cnt}")));
        }
        let entry_size = size_of::<wire::WriteMultiEntry>();
        let entries = &body[8..];
        if entries.len() != wr_cnt as usize * entry_size {
            return Err(invalid(format!(
                "REGION_WRITE_MULTI wr_cnt {wr_cnt} with {} entry bytes",
                entries.len()
            )));
        }
        let parsed: Vec<wire::WriteMultiEntry> = entries
            .chunks_exact(entry_size)
            .filter_map(wire::read_prefix)
            .collect();
        // Check every entry before applying any: all or nothing on bad input.
        for e in &parsed {
            if e.count as usize > wire::WRITE_MULTI_DATA {
                return Err(invalid(format!(
                    "REGION_WRITE_MULTI entry count {}",
                    e.count
                )));
            }
            self.check_access(e.region, e.offset, e.count, true)?;
        }
        for e in &parsed {
            dev.region_write(e.region, e.offset, &e.data[..e.count as usize])?;
        }
        Ok(Reply::new(h, &[]))
    }

    // ---- migration (DEVICE_FEATURE, MIG_DATA_READ/WRITE) ----

    /// VFIO_USER_DEVICE_FEATURE: the flags checked as the kernel's
    /// `vfio_ioctl_device_feature` and `vfio_check_feature` do, then the
    /// feature.
    fn device_feature(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let f: wire::DeviceFeature = body_struct(body, "DEVICE_FEATURE")?;
        let fixed = size_of::<wire::DeviceFeature>();
        if (f.argsz as usize) < fixed {
            return Err(invalid(format!("DEVICE_FEATURE argsz {}", f.argsz)));
        }
        let ops = f.flags & !VFIO_DEVICE_FEATURE_MASK;
        let known = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE;
        if ops & !known != 0 {
            return Err(invalid(format!("DEVICE_FEATURE flags {:#x}", f.flags)));
        }
        let probe = ops & VFIO_DEVICE_FEATURE_PROBE != 0;
        let get = ops & VFIO_DEVICE_FEATURE_GET != 0;
        let set = ops & VFIO_DEVICE_FEATURE_SET != 0;
        if !probe && get == set {
            return Err(invalid(format!(
                "DEVICE_FEATURE flags {:#x}: one of GET and SET (both only with PROBE)",
                f.flags
            )));
        }
        let feature = f.flags & VFIO_DEVICE_FEATURE_MASK;
        let supported = wire::feature_ops(feature).ok_or(TransportError::NoFeature(feature))?;
        let Some(mig) = dev.migration() else {
            return Err(MigrationError::NotMigratable.into());
        };
        if ops & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET) & !supported != 0 {
            return Err(invalid(format!(
                "feature {feature} does not support {}",
                if set { "SET" } else { "GET" }
            )));
        }
        let data = &body[fixed..];
        if probe {
            // "The reply payload must be the same as the request payload."
            return self.echo(h, body, f.argsz);
        }
        match (feature, set) {
            (VFIO_DEVICE_FEATURE_MIGRATION, false) => {
                let m = wire::FeatureMigration {
                    flags: u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY),
                };
                self.feature_reply(h, f, m.as_bytes())
            }
            (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, false) => {
                let s = wire::FeatureMigState {
                    device_state: self.mig.state() as u32,
                    data_fd: NO_DATA_FD,
                };
                self.feature_reply(h, f, s.as_bytes())
            }
            (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, true) => {
                let s: wire::FeatureMigState = body_struct(data, "MIG_DEVICE_STATE SET data")?;
                if (f.argsz as usize) < body.len() {
                    return Err(invalid(format!("MIG_DEVICE_STATE argsz {}", f.argsz)));
                }
                let reached = self.mig.set_state(mig, s.device_state)?;
                let out = wire::FeatureMigState {
                    device_state: reached as u32,
                    data_fd: NO_DATA_FD,
                };
                self.feature_reply(h, f, out.as_bytes())
            }
            (VFIO_DEVICE_FEATURE_DMA_LOGGING_START, true) => {
                let page = self.logging_start(mig, f, data)?;
                let mut out = body.to_vec();
                out[fixed..fixed + 8].copy_from_slice(&page.to_ne_bytes());
                Ok(Reply::new(h, &out))
            }
            (VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, true) => {
                if self.logging.take().is_some() {
                    mig.dirty_log_stop();
                }
                self.echo(h, body, f.argsz)
            }
            (VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, false) => self.logging_report(mig, h, f, data),
            _ => Err(invalid(format!("feature {feature}: unsupported operation"))),
        }
    }

    /// A reply whose data is `data` after the request's fixed part, with
    /// argsz set to the full payload; refused when the client's argsz is
    /// smaller (the bits of a report are cleared as they are read, so a
    /// reply cut short would lose them).
    fn feature_reply(
        &self,
        h: &Header,
        f: wire::DeviceFeature,
        data: &[u8],
    ) -> Result<Reply, TransportError> {
        let fixed = size_of::<wire::DeviceFeature>();
        let need = fixed + data.len();
        if (f.argsz as usize) < need {
            return Err(invalid(format!(
                "DEVICE_FEATURE argsz {} < {need}, the reply's size",
                f.argsz
            )));
        }
        let head = wire::DeviceFeature {
            argsz: need as u32,
            flags: f.flags,
        };
        let mut reply = Reply::with_tail(h, head.as_bytes(), data.len());
        reply.bytes[HEADER_SIZE + fixed..].copy_from_slice(data);
        Ok(reply)
    }

    /// The request payload sent back (SET and PROBE replies).
    fn echo(&self, h: &Header, body: &[u8], argsz: u32) -> Result<Reply, TransportError> {
        if (argsz as usize) < body.len() {
            return Err(invalid(format!(
                "DEVICE_FEATURE argsz {argsz} < {}, the reply's size",
                body.len()
            )));
        }
        Ok(Reply::new(h, body))
    }

    /// DMA_LOGGING_START: page size and ranges checked as the kernel's
    /// `vfio_ioctl_device_feature_logging_start` does; returns the page
    /// size chosen (the connection's DMA page size).
    fn logging_start(
        &mut self,
        mig: &mut dyn Migratable,
        f: wire::DeviceFeature,
        data: &[u8],
    ) -> Result<u64, TransportError> {
        let c: wire::DmaLoggingControl = body_struct(data, "DMA_LOGGING_START data")?;
        let fixed = size_of::<wire::DmaLoggingControl>();
        let entry = size_of::<wire::DmaLoggingRange>();
        if (f.argsz as usize) < size_of::<wire::DeviceFeature>() + data.len() {
            return Err(invalid(format!("DMA_LOGGING_START argsz {}", f.argsz)));
        }
        if c.num_ranges == 0 {
            return Err(invalid(
                "DMA_LOGGING_START with no ranges (name the IOVA ranges to log)".to_string(),
            ));
        }
        if c.num_ranges as usize > wire::MAX_LOGGING_RANGES {
            return Err(TransportError::TooBig(format!(
                "DMA_LOGGING_START with {} ranges (at most {})",
                c.num_ranges,
                wire::MAX_LOGGING_RANGES
            )));
        }
        if data.len() != fixed + c.num_ranges as usize * entry {
            return Err(invalid(format!(
                "DMA_LOGGING_START: {} ranges in {} bytes",
                c.num_ranges,
                data.len() - fixed
            )));
        }
        if !c.page_size.is_power_of_two() {
            return Err(invalid(format!(
                "DMA_LOGGING_START page size {:#x} is not a power of two",
                c.page_size
            )));
        }
        if self.logging.is_some() {
            return Err(TransportError::Device(DeviceError::Busy(
                "DMA logging is already on; stop it first".into(),
            )));
        }
        let page = wire::PAGE_SIZE;
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(c.num_ranges as usize);
        for r in data[fixed..]
            .chunks_exact(entry)
            .filter_map(wire::read_prefix::<wire::DmaLoggingRange>)
        {
            if r.length == 0 || !r.iova.is_multiple_of(page) || !r.length.is_multiple_of(page) {
                return Err(invalid(format!(
                    "DMA_LOGGING_START range {:#x}+{:#x} is empty or not {page:#x}-aligned",
                    r.iova, r.length
                )));
            }
            let end = r.iova.checked_add(r.length).ok_or_else(|| {
                TransportError::Overflow(format!("range {:#x}+{:#x}", r.iova, r.length))
            })?;
            if ranges.iter().any(|&(s, e)| r.iova < e && s < end) {
                return Err(invalid(format!(
                    "DMA_LOGGING_START range {:#x}+{:#x} overlaps another",
                    r.iova, r.length
                )));
            }
            ranges.push((r.iova, end));
        }
        mig.dirty_log_start(page)?;
        self.logging = Some(ranges);
        Ok(page)
    }

    /// DMA_LOGGING_REPORT: the bitmap of `[iova, iova + length)` in
    /// `page_size` units, read and cleared.
    fn logging_report(
        &mut self,
        mig: &mut dyn Migratable,
        h: &Header,
        f: wire::DeviceFeature,
        data: &[u8],
    ) -> Result<Reply, TransportError> {
        let r: wire::DmaLoggingReport = body_struct(data, "DMA_LOGGING_REPORT data")?;
        let Some(ranges) = &self.logging else {
            return Err(invalid("DMA_LOGGING_REPORT while DMA logging is off"));
        };
        if !r.page_size.is_power_of_two() || r.page_size < wire::PAGE_SIZE {
            return Err(invalid(format!(
                "DMA_LOGGING_REPORT page size {:#x} (a power of two, at least {:#x})",
                r.page_size,
                wire::PAGE_SIZE
            )));
        }
        let end = r.iova.checked_add(r.length).ok_or_else(|| {
            TransportError::Overflow(format!("report range {:#x}+{:#x}", r.iova, r.length))
        })?;
        if r.length == 0
            || !r.iova.is_multiple_of(r.page_size)
            || !r.length.is_multiple_of(r.page_size)
        {
            return Err(invalid(format!(
                "DMA_LOGGING_REPORT range {:#x}+{:#x} is empty or not aligned to {:#x}",
                r.iova, r.length, r.page_size
            )));
        }
        if !ranges.iter().any(|&(s, e)| s <= r.iova && end <= e) {
            return Err(invalid(format!(
                "DMA_LOGGING_REPORT range {:#x}+{:#x} is not inside one logged range",
                r.iova, r.length
            )));
        }
        let bits = r.length / r.page_size;
        let bitmap_len = bits.div_ceil(64).saturating_mul(8);
        let cap = self.max_reply_data();
        if bitmap_len > cap as u64 {
            return Err(TransportError::TooBig(format!(
                "a bitmap of {bitmap_len} bytes (over {cap})"
            )));
        }
        let bitmap_len = bitmap_len as usize;
        let mut out = vec![0u8; size_of::<wire::DmaLoggingReport>() + bitmap_len];
        out[..size_of::<wire::DmaLoggingReport>()].copy_from_slice(r.as_bytes());
        // Checked before the bits are read (and cleared): a reply that
        // cannot be sent must not lose them.
        let need = size_of::<wire::DeviceFeature>() + out.len();
        if (f.argsz as usize) < need {
            return Err(invalid(format!(
                "DMA_LOGGING_REPORT argsz {} < {need}, the reply's size",
                f.argsz
            )));
        }
        let report = size_of::<wire::DmaLoggingReport>();
        mig.dirty_report(r.iova, r.length, r.page_size, &mut out[report..])?;
        self.feature_reply(h, f, &out)
    }

    /// The most data one of our replies may carry: what the client takes
    /// (`max_data_xfer_size`) and what we advertise, whichever is less.
    fn max_reply_data(&self) -> usize {
        let client = self.caps.map_or(1 << 20, |c| c.max_data_xfer_size);
        client.min(u64::from(self.limits.max_data_xfer_size())) as usize
    }

    /// VFIO_USER_MIG_DATA_READ: up to `size` bytes of the outgoing stream.
    fn mig_data_read(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let m: wire::MigData = body_struct(body, "MIG_DATA_READ")?;
        let fixed = size_of::<wire::MigData>();
        if body.len() != fixed {
            return Err(invalid(format!(
                "MIG_DATA_READ body of {} bytes",
                body.len()
            )));
        }
        if dev.migration().is_none() {
            return Err(MigrationError::NotMigratable.into());
        }
        let cap = self.max_reply_data();
        if m.size as usize > cap {
            return Err(invalid(format!(
                "MIG_DATA_READ size {} (at most {cap})",
                m.size
            )));
        }
        if (m.argsz as usize) < fixed + m.size as usize {
            return Err(invalid(format!(
                "MIG_DATA_READ argsz {} < {}",
                m.argsz,
                fixed + m.size as usize
            )));
        }
        let data = self.mig.read(m.size as usize)?;
        let head = wire::MigData {
            argsz: (fixed + data.len()) as u32,
            size: data.len() as u32,
        };
        let mut reply = Reply::with_tail(h, head.as_bytes(), data.len());
        reply.bytes[HEADER_SIZE + fixed..].copy_from_slice(data);
        Ok(reply)
    }

    /// VFIO_USER_MIG_DATA_WRITE: the next piece of the incoming stream.
    fn mig_data_write(
        &mut self,
        dev: &mut dyn VfioUserDevice,
        h: &Header,
        body: &[u8],
    ) -> Result<Reply, TransportError> {
        let m: wire::MigData = body_struct(body, "MIG_DATA_WRITE")?;
        let fixed = size_of::<wire::MigData>();
        if (m.argsz as usize) < fixed {
            return Err(invalid(format!("MIG_DATA_WRITE argsz {}", m.argsz)));
        }
        if body.len() != fixed + m.size as usize {
            return Err(invalid(format!(
                "MIG_DATA_WRITE size {} with {} data bytes",
                m.size,
                body.len() - fixed
            )));
        }
        if dev.migration().is_none() {
            return Err(MigrationError::NotMigratable.into());
        }
        let cap = self.limits.max_data_xfer_size();
        if m.size > cap {
            return Err(invalid(format!(
                "MIG_DATA_WRITE size {} (at most {cap})",
                m.size
            )));
        }
        self.mig.write(&body[fixed..])?;
        Ok(Reply::new(h, &[]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vdev::device::{DeviceError, DeviceInfo, IrqInfo, RegionInfo};

    /// Two regions: 0 is RW of 0x100 bytes, 1 is read-only of 0x10.
    struct Tiny;

    impl VfioUserDevice for Tiny {
        fn device_info(&self) -> DeviceInfo {
            DeviceInfo {
                flags: 3,
                num_regions: 2,
                num_irqs: 1,
            }
        }
        fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
            let (flags, size) = if index == 0 { (3, 0x100) } else { (1, 0x10) };
            Ok(RegionInfo {
                flags,
                size,
                mmap: None,
            })
        }
        fn irq_info(&self, _: u32) -> Result<IrqInfo, DeviceError> {
            Ok(IrqInfo { flags: 0, count: 1 })
        }
        fn region_read(&mut self, _: u32, _: u64, d: &mut [u8]) -> Result<(), DeviceError> {
            d.fill(0x5a);
            Ok(())
        }
        fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn set_irqs(
            &mut self,
            _: u32,
            _: IrqAction,
            _: u32,
            _: u32,
            _: IrqData,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
        fn dma_map(&mut self, _: DmaMapping) -> Result<(), DeviceError> {
            Ok(())
        }
        fn dma_unmap(&mut self, _: u64, _: u64) -> Result<(), DeviceError> {
            Ok(())
        }
        fn dma_unmap_all(&mut self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn disconnected(&mut self) {}
        fn migration(&mut self) -> Option<&mut dyn crate::vdev::device::Migratable> {
            None
        }
        fn survivable(&mut self) -> Option<&mut dyn crate::vdev::device::Survivable> {
            None
        }
    }

    #[test]
    fn access_check_uses_checked_arithmetic_and_direction() {
        let s = Session::new(&Tiny, &Limits::default());
        s.check_access(0, 0xfc, 4, true).unwrap();
        s.check_access(0, 0, 0x100, false).unwrap();
        for (region, offset, count, write) in [
            (0, 0xfd, 4, false),
            (0, u64::MAX, 1, false),
            (0, 0, 0, false),
            (1, 0, 4, true),
            (2, 0, 1, false),
            (0, 0, wire::MAX_DATA_XFER_SIZE + 1, false),
        ] {
            let e = s.check_access(region, offset, count, write).unwrap_err();
            assert_eq!(
                e.errno(),
                libc::EINVAL as u32,
                "{region} {offset:#x} {count}"
            );
        }
    }

    fn msg(cmd: u16, body: Vec<u8>) -> Message {
        let header = Header {
            id: 1,
            cmd,
            size: (HEADER_SIZE + body.len()) as u32,
            flags: 0,
            error: 0,
        };
        Message {
            header,
            body,
            fds: Vec::new(),
            fd_loss: None,
        }
    }

    #[test]
    fn version_gates_everything_and_read_fills_the_reply() {
        let mut dev = Tiny;
        let mut s = Session::new(&dev, &Limits::default());
        let read = wire::RegionAccess {
            offset: 8,
            region: 0,
            count: 4,
        }
        .as_bytes()
        .to_vec();
        let e = s.handle(&mut dev, &mut msg(9, read.clone())).err().unwrap();
        assert_eq!(e.errno(), libc::EINVAL as u32);
        s.handle(&mut dev, &mut msg(1, vec![0, 0, 0, 0, b'{', b'}', 0]))
            .ok()
            .unwrap();
        let r = s.handle(&mut dev, &mut msg(9, read)).ok().unwrap();
        assert_eq!(r.bytes.len(), 32 + 4);
        assert_eq!(&r.bytes[32..], &[0x5a; 4]);
    }
}
