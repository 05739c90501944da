//! vfio-user wire format: the 16-byte header, command numbers and the
//! fixed-size message bodies (QEMU `docs/interop/vfio-user.rst`,
//! "Protocol Specification"). All fields are host-endian, as the spec says
//! for this revision. Structs derive `zerocopy` so parsing is a bounds-checked
//! copy, never a cast.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of [`Header`] on the wire.
pub const HEADER_SIZE: usize = 16;

/// The largest `count` we accept in one REGION_READ/WRITE (advertised as
/// `max_data_xfer_size`).
pub const MAX_DATA_XFER_SIZE: u32 = 1 << 20;

/// The largest whole message we accept: a full data transfer plus room for
/// its header and fixed body. Anything larger cannot be framed safely.
pub const MAX_MESSAGE_SIZE: u32 = MAX_DATA_XFER_SIZE + 4096;

/// File descriptors we accept in one message (advertised as `max_msg_fds`;
/// QEMU refuses more than 16).
pub const MAX_MSG_FDS: usize = 16;

/// DMA maps one connection may hold, advertised as `max_dma_maps` (the
/// spec's default is 65535). Each fd-backed map keeps an fd and an mmap
/// open in this process, which every instance of the daemon shares
/// (RLIMIT_NOFILE, vm.max_map_count); QEMU uses about 10-20.
pub const MAX_DMA_MAPS: usize = 1024;

/// Bytes of fd-backed DMA maps one connection may hold. The device keeps a
/// dirty bitmap of one bit per 4 KiB page for each, so 1 TiB costs at most
/// 32 MiB of memory. Fd-less maps are not counted: nothing is mapped.
pub const MAX_DMA_FD_BYTES: u64 = 1 << 40;

/// The only DMA page size we support (`pgsizes`).
pub const PAGE_SIZE: u64 = 4096;

/// Most entries in one REGION_WRITE_MULTI (spec: "up to 200").
pub const MAX_WRITE_MULTI: u64 = 200;

/// Bytes of data in one REGION_WRITE_MULTI entry.
pub const WRITE_MULTI_DATA: usize = 8;

/// Header flags (spec "Header": bits 0-3 type, bit 4 No_reply, bit 5 Error).
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const FLAG_TYPE_COMMAND: u32 = 0;
pub const FLAG_TYPE_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

/// Command numbers (spec "Commands").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    DeviceGetRegionIoFds = 6,
    DeviceGetIrqInfo = 7,
    DeviceSetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    /// Removed from the spec (dirty pages v1); still numbered.
    DirtyPages = 14,
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
}

impl Command {
    pub fn from_u16(cmd: u16) -> Option<Command> {
        use Command::*;
        Some(match cmd {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// The header that starts every message, request or reply.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Header {
    pub id: u16,
    pub cmd: u16,
    /// Whole message, header included.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn msg_type(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }
    /// The reply header for this request: same id and command, type reply.
    pub fn reply(&self, body_len: usize) -> Header {
        Header {
            id: self.id,
            cmd: self.cmd,
            size: (HEADER_SIZE + body_len) as u32,
            flags: FLAG_TYPE_REPLY,
            error: 0,
        }
    }
    /// A header-only error reply (spec: "the reply message must only
    /// include the reply header").
    pub fn error_reply(&self, errno: u32) -> Header {
        Header {
            id: self.id,
            cmd: self.cmd,
            size: HEADER_SIZE as u32,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error: errno,
        }
    }
}

/// VERSION body before the JSON capabilities.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

/// DMA_MAP body (32 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    /// Offset of `iova` in the attached fd.
    pub offset: u64,
    pub iova: u64,
    pub size: u64,
}

/// DMA_UNMAP body (24 bytes); the reply echoes it.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

/// DEVICE_GET_INFO request and reply body (16 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// `struct vfio_region_info` (32 bytes): GET_REGION_INFO request and the
/// fixed part of its reply.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_info_cap_header` + `vfio_region_info_cap_sparse_mmap`'s
/// fixed part (16 bytes); `nr_areas` × [`SparseArea`] follow.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SparseMmapCap {
    pub id: u16,
    pub version: u16,
    pub next: u32,
    pub nr_areas: u32,
    pub reserved: u32,
}

/// `struct vfio_region_sparse_mmap_area`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SparseArea {
    pub offset: u64,
    pub size: u64,
}

/// DEVICE_GET_IRQ_INFO request and reply body (16 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// DEVICE_SET_IRQS body (20 bytes); DATA_BOOL bytes follow.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// REGION_READ/REGION_WRITE body (16 bytes); data follows (write request,
/// read reply).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

/// One REGION_WRITE_MULTI entry (24 bytes).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct WriteMultiEntry {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
    pub data: [u8; WRITE_MULTI_DATA],
}

/// VFIO_USER_DEVICE_FEATURE's fixed part (8 bytes; `struct
/// vfio_device_feature` without its data). Feature data follows.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DeviceFeature {
    /// Request: the largest reply payload the client takes. Reply: the
    /// payload's size.
    pub argsz: u32,
    /// Feature index (bits 0-15) | GET | SET | PROBE.
    pub flags: u32,
}

/// VFIO_DEVICE_FEATURE_MIGRATION data (GET reply).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FeatureMigration {
    /// VFIO_MIGRATION_STOP_COPY | _P2P | _PRE_COPY.
    pub flags: u64,
}

/// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data (SET request, GET and SET
/// replies).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FeatureMigState {
    /// `enum vfio_device_mig_state`.
    pub device_state: u32,
    /// Unused in vfio-user (MIG_DATA_READ/WRITE carry the data); we send -1.
    pub data_fd: i32,
}

/// VFIO_DEVICE_FEATURE_DMA_LOGGING_START data's fixed part (16 bytes);
/// `num_ranges` × [`DmaLoggingRange`] follow.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmaLoggingControl {
    pub page_size: u64,
    pub num_ranges: u32,
    pub reserved: u32,
}

/// One IOVA range to log.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmaLoggingRange {
    pub iova: u64,
    pub length: u64,
}

/// VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT data (24 bytes); the reply adds
/// the bitmap after it.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmaLoggingReport {
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
}

/// VFIO_USER_MIG_DATA_READ / MIG_DATA_WRITE fixed part (8 bytes); data
/// follows (read reply, write request).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MigData {
    pub argsz: u32,
    pub size: u32,
}

/// Most ranges one DMA_LOGGING_START may name (the kernel's
/// `LOG_MAX_RANGES`); more is E2BIG.
pub const MAX_LOGGING_RANGES: usize = 256;

/// The operations (GET/SET/PROBE flags) a feature index supports, or `None`
/// for a feature vfio-user does not have (ENOTSUP). The spec's table:
/// MIGRATION (1), MIG_DEVICE_STATE (2), DMA_LOGGING_START (6), _STOP (7),
/// _REPORT (8).
pub fn feature_ops(feature: u32) -> Option<u32> {
    use vfio_bindings::bindings::vfio::*;
    let (get, set, probe) = (
        VFIO_DEVICE_FEATURE_GET,
        VFIO_DEVICE_FEATURE_SET,
        VFIO_DEVICE_FEATURE_PROBE,
    );
    Some(match feature {
        VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => get | probe,
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => get | set | probe,
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => set | probe,
        _ => return None,
    })
}

/// Reads a `T` from the start of `body`; `None` when the body is shorter.
pub fn read_prefix<T: FromBytes>(body: &[u8]) -> Option<T> {
    T::read_from_prefix(body).ok().map(|(value, _)| value)
}

/// A one-line description of a request for the per-message trace log:
/// command name, id, fds, and the fields that tell requests apart (region,
/// offset, count; iova, size; irq index, flags, start, count). Never fails:
/// a short body just shows fewer fields.
pub fn describe(h: &Header, body: &[u8], fds: usize) -> String {
    use std::fmt::Write;
    let name =
        Command::from_u16(h.cmd).map_or_else(|| format!("cmd{}", h.cmd), |c| format!("{c:?}"));
    let mut s = format!("{name} id {}", h.id);
    if h.no_reply() {
        s.push_str(" no_reply");
    }
    let _ = match Command::from_u16(h.cmd) {
        Some(Command::RegionRead | Command::RegionWrite) => match read_prefix::<RegionAccess>(body)
        {
            Some(a) => write!(
                s,
                " region {} offset {:#x} count {}",
                a.region, a.offset, a.count
            ),
            None => Ok(()),
        },
        Some(Command::DmaMap) => match read_prefix::<DmaMap>(body) {
            Some(m) => write!(
                s,
                " iova {:#x} size {:#x} flags {:#x} offset {:#x}",
                m.iova, m.size, m.flags, m.offset
            ),
            None => Ok(()),
        },
        Some(Command::DmaUnmap) => match read_prefix::<DmaUnmap>(body) {
            Some(m) => write!(
                s,
                " iova {:#x} size {:#x} flags {:#x}",
                m.iova, m.size, m.flags
            ),
            None => Ok(()),
        },
        Some(Command::DeviceGetRegionInfo) => match read_prefix::<RegionInfo>(body) {
            Some(r) => write!(s, " index {} argsz {}", r.index, r.argsz),
            None => Ok(()),
        },
        Some(Command::DeviceGetIrqInfo) => match read_prefix::<IrqInfo>(body) {
            Some(i) => write!(s, " index {}", i.index),
            None => Ok(()),
        },
        Some(Command::DeviceFeature) => match read_prefix::<DeviceFeature>(body) {
            Some(f) => write!(
                s,
                // ops: GET 1, SET 2, PROBE 4 (the flags above bit 15).
                " feature {} ops {:#x} argsz {}",
                f.flags & 0xffff,
                f.flags >> 16,
                f.argsz
            ),
            None => Ok(()),
        },
        Some(Command::MigDataRead | Command::MigDataWrite) => match read_prefix::<MigData>(body) {
            Some(m) => write!(s, " size {} argsz {}", m.size, m.argsz),
            None => Ok(()),
        },
        Some(Command::DeviceSetIrqs) => match read_prefix::<IrqSet>(body) {
            Some(i) => write!(
                s,
                " index {} flags {:#x} start {} count {}",
                i.index, i.flags, i.start, i.count
            ),
            None => Ok(()),
        },
        _ => Ok(()),
    };
    if fds > 0 {
        let _ = write!(s, " fds {fds}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_sizes_match_the_spec() {
        assert_eq!(size_of::<Header>(), HEADER_SIZE);
        assert_eq!(size_of::<Version>(), 4);
        assert_eq!(size_of::<DmaMap>(), 32);
        assert_eq!(size_of::<DmaUnmap>(), 24);
        assert_eq!(size_of::<DeviceInfo>(), 16);
        assert_eq!(size_of::<RegionInfo>(), 32);
        assert_eq!(size_of::<SparseMmapCap>(), 16);
        assert_eq!(size_of::<SparseArea>(), 16);
        assert_eq!(size_of::<IrqInfo>(), 16);
        assert_eq!(size_of::<IrqSet>(), 20);
        assert_eq!(size_of::<RegionAccess>(), 16);
        assert_eq!(size_of::<WriteMultiEntry>(), 24);
        assert_eq!(size_of::<DeviceFeature>(), 8);
        assert_eq!(size_of::<FeatureMigration>(), 8);
        assert_eq!(size_of::<FeatureMigState>(), 8);
        assert_eq!(size_of::<DmaLoggingControl>(), 16);
        assert_eq!(size_of::<DmaLoggingRange>(), 16);
        assert_eq!(size_of::<DmaLoggingReport>(), 24);
        assert_eq!(size_of::<MigData>(), 8);
    }

    #[test]
    fn command_numbers_round_trip() {
        for n in 0..=20u16 {
            match Command::from_u16(n) {
                Some(c) => assert_eq!(c as u16, n),
                None => assert!(n == 0 || n > 18),
            }
        }
    }

    #[test]
    fn error_reply_is_header_only_with_positive_errno() {
        let req = Header {
            id: 7,
            cmd: 9,
            size: 32,
            flags: 0,
            error: 0,
        };
        let r = req.error_reply(libc::EINVAL as u32);
        assert_eq!(r.size, 16);
        assert_eq!(r.id, 7);
        assert_eq!(r.flags, FLAG_TYPE_REPLY | FLAG_ERROR);
        assert_eq!(r.error, libc::EINVAL as u32);
    }

    #[test]
    fn feature_operations_are_the_specs_table() {
        use vfio_bindings::bindings::vfio::*;
        let (g, s, p) = (
            VFIO_DEVICE_FEATURE_GET,
            VFIO_DEVICE_FEATURE_SET,
            VFIO_DEVICE_FEATURE_PROBE,
        );
        assert_eq!(feature_ops(1), Some(g | p));
        assert_eq!(feature_ops(2), Some(g | s | p));
        assert_eq!(feature_ops(6), Some(s | p));
        assert_eq!(feature_ops(7), Some(s | p));
        assert_eq!(feature_ops(8), Some(g | p));
        for other in [0, 3, 4, 5, 9, 10, 11, 12, 0xffff] {
            assert_eq!(feature_ops(other), None, "feature {other}");
        }
    }

    #[test]
    fn read_prefix_refuses_short_bodies() {
        assert!(read_prefix::<DmaMap>(&[0u8; 31]).is_none());
        assert!(read_prefix::<DmaMap>(&[0u8; 40]).is_some());
    }

    #[test]
    fn describe_names_the_fields_that_matter() {
        let h = Header {
            id: 3,
            cmd: Command::RegionWrite as u16,
            size: 36,
            flags: FLAG_NO_REPLY,
            error: 0,
        };
        let a = RegionAccess {
            offset: 0x1000,
            region: 2,
            count: 4,
        };
        let d = describe(&h, a.as_bytes(), 0);
        assert_eq!(
            d,
            "RegionWrite id 3 no_reply region 2 offset 0x1000 count 4"
        );
        let feature = Header {
            cmd: Command::DeviceFeature as u16,
            flags: 0,
            ..h
        };
        let f = DeviceFeature {
            argsz: 16,
            flags: 2 | 1 << 17,
        };
        assert_eq!(
            describe(&feature, f.as_bytes(), 0),
            "DeviceFeature id 3 feature 2 ops 0x2 argsz 16"
        );
        let unknown = Header { cmd: 99, ..h };
        assert_eq!(describe(&unknown, &[], 2), "cmd99 id 3 no_reply fds 2");
        // A short body shows only the name.
        assert_eq!(describe(&h, &[0; 3], 0), "RegionWrite id 3 no_reply");
    }
}
