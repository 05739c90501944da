//! wdvirt's own VMM-role vfio-user client, for what the rust-vmm `vfio_user`
//! crate does not speak: VFIO_USER_DEVICE_FEATURE (migration v2's MIGRATION
//! and MIG_DEVICE_STATE features, DMA logging) and MIG_DATA_READ/WRITE, plus
//! the few commands a loopback VMM needs around them (VERSION, DMA_MAP,
//! region access, region info, SET_IRQS, reset).
//!
//! It is a plain synchronous client: one request, then its reply (matched by
//! id and command). wdvirt's server sends no requests of its own, so nothing
//! else can arrive; anything else is a protocol error. An error reply comes
//! back as [`VmmError::Refused`] with its errno.

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
};
use zerocopy::{FromBytes, IntoBytes};

use super::VmmError;
use crate::migration::MigState;
use crate::transport::wire::{self, Command, FLAG_ERROR, FLAG_TYPE_REPLY, HEADER_SIZE, Header};

/// How long a reply may take before the client gives up (QEMU waits 5 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected vfio-user client.
pub struct VfioUserClient {
    stream: UnixStream,
    next_id: u16,
    /// The server's `max_data_xfer_size` (spec default 1 MiB).
    max_xfer: u32,
}

fn protocol(what: impl Into<String>) -> VmmError {
    VmmError::Protocol(what.into())
}

impl VfioUserClient {
    /// Connects to `path` and negotiates the version.
    pub fn connect(path: &Path) -> Result<VfioUserClient, VmmError> {
        let stream = UnixStream::connect(path).map_err(|e| VmmError::Socket {
            path: path.display().to_string(),
            source: e,
        })?;
        VfioUserClient::from_stream(stream)
    }

    /// Negotiates the version on a connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<VfioUserClient, VmmError> {
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let mut c = VfioUserClient {
            stream,
            next_id: 1,
            max_xfer: 1 << 20,
        };
        // The server's reply may be no longer than this request, so ask
        // with every capability we know: room for all of its own.
        let json = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":{},\"max_data_xfer_size\":{},\
             \"pgsizes\":{},\"max_dma_maps\":65535,\"write_multiple\":false}}}}",
            wire::MAX_MSG_FDS,
            wire::MAX_DATA_XFER_SIZE,
            wire::PAGE_SIZE
        );
        let mut body = wire::Version { major: 0, minor: 0 }.as_bytes().to_vec();
        body.extend_from_slice(json.as_bytes());
        body.push(0);
        let reply = c.request(Command::Version, &body, &[])?;
        let caps = reply
            .get(4..)
            .and_then(|j| j.split_last())
            .and_then(|(_, j)| serde_json::from_slice::<serde_json::Value>(j).ok());
        if let Some(n) = caps
            .as_ref()
            .and_then(|v| v["capabilities"]["max_data_xfer_size"].as_u64())
        {
            c.max_xfer = n.clamp(64, u64::from(wire::MAX_DATA_XFER_SIZE)) as u32;
        }
        Ok(c)
    }

    /// The largest data transfer one message carries (the server's limit).
    pub fn max_xfer(&self) -> u32 {
        self.max_xfer
    }

    /// Sends one request and returns its reply's body; an error reply is
    /// [`VmmError::Refused`].
    pub fn request(
        &mut self,
        cmd: Command,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Vec<u8>, VmmError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header {
            id,
            cmd: cmd as u16,
            size: (HEADER_SIZE + body.len()) as u32,
            flags: 0,
            error: 0,
        };
        let mut bytes = Vec::with_capacity(HEADER_SIZE + body.len());
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(body);
        self.send(&bytes, fds)?;
        let mut hb = [0u8; HEADER_SIZE];
        self.stream.read_exact(&mut hb)?;
        let r = Header::read_from_bytes(&hb).map_err(|_| protocol("reply header"))?;
        if (r.size as usize) < HEADER_SIZE || r.size > wire::MAX_MESSAGE_SIZE + 4096 {
            return Err(protocol(format!("reply of {} bytes", r.size)));
        }
        let mut reply = vec![0u8; r.size as usize - HEADER_SIZE];
        self.stream.read_exact(&mut reply)?;
        if r.msg_type() != FLAG_TYPE_REPLY || r.id != id || r.cmd != cmd as u16 {
            return Err(protocol(format!(
                "expected the reply to {cmd:?} id {id}, got cmd {} id {} flags {:#x}",
                r.cmd, r.id, r.flags
            )));
        }
        if r.flags & FLAG_ERROR != 0 {
            return Err(VmmError::Refused {
                what: format!("{cmd:?}"),
                errno: r.error as i32,
            });
        }
        Ok(reply)
    }

    fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), VmmError> {
        if fds.is_empty() {
            self.stream.write_all(bytes)?;
            return Ok(());
        }
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(protocol("fd control buffer"));
        }
        let n = sendmsg(
            &self.stream,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(std::io::Error::from)?;
        self.stream.write_all(&bytes[n..])?;
        Ok(())
    }

    /// DMA_MAP of `size` bytes at `iova`, backed by `fd` at `offset` (or by
    /// nothing the server can map).
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: Option<(BorrowedFd<'_>, u64)>,
    ) -> Result<(), VmmError> {
        let m = wire::DmaMap {
            argsz: size_of::<wire::DmaMap>() as u32,
            flags: 3,
            offset: fd.map_or(0, |(_, o)| o),
            iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.map(|(f, _)| f).into_iter().collect();
        self.request(Command::DmaMap, m.as_bytes(), &fds)?;
        Ok(())
    }

    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VmmError> {
        let a = wire::RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let reply = self.request(Command::RegionRead, a.as_bytes(), &[])?;
        let got = reply
            .get(size_of::<wire::RegionAccess>()..)
            .filter(|d| d.len() == data.len())
            .ok_or_else(|| protocol("REGION_READ reply of the wrong size"))?;
        data.copy_from_slice(got);
        Ok(())
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), VmmError> {
        let a = wire::RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let mut body = a.as_bytes().to_vec();
        body.extend_from_slice(data);
        self.request(Command::RegionWrite, &body, &[])?;
        Ok(())
    }

    /// A region's size from GET_REGION_INFO.
    pub fn region_size(&mut self, region: u32) -> Result<u64, VmmError> {
        let req = wire::RegionInfo {
            argsz: size_of::<wire::RegionInfo>() as u32,
            index: region,
            ..Default::default()
        };
        let reply = self.request(Command::DeviceGetRegionInfo, req.as_bytes(), &[])?;
        let info: wire::RegionInfo =
            wire::read_prefix(&reply).ok_or_else(|| protocol("short GET_REGION_INFO reply"))?;
        Ok(info.size)
    }

    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VmmError> {
        let s = wire::IrqSet {
            argsz: size_of::<wire::IrqSet>() as u32,
            flags,
            index,
            start,
            count,
        };
        self.request(Command::DeviceSetIrqs, s.as_bytes(), fds)?;
        Ok(())
    }

    pub fn reset(&mut self) -> Result<(), VmmError> {
        self.request(Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    /// DEVICE_FEATURE with `flags` and `data`; returns the reply's data
    /// (after argsz and flags). `reply_room` is the most data expected.
    pub fn feature(
        &mut self,
        flags: u32,
        data: &[u8],
        reply_room: usize,
    ) -> Result<Vec<u8>, VmmError> {
        let fixed = size_of::<wire::DeviceFeature>();
        let f = wire::DeviceFeature {
            argsz: (fixed + data.len().max(reply_room)) as u32,
            flags,
        };
        let mut body = f.as_bytes().to_vec();
        body.extend_from_slice(data);
        let reply = self.request(Command::DeviceFeature, &body, &[])?;
        reply
            .get(fixed..)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| protocol("short DEVICE_FEATURE reply"))
    }

    /// Whether the device supports `feature` for `ops` (GET and/or SET):
    /// DEVICE_FEATURE with PROBE. A refusal means no.
    pub fn probe(&mut self, feature: u32, ops: u32) -> Result<bool, VmmError> {
        match self.feature(feature | ops | VFIO_DEVICE_FEATURE_PROBE, &[], 0) {
            Ok(_) => Ok(true),
            Err(VmmError::Refused { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The MIGRATION feature's flags (VFIO_MIGRATION_STOP_COPY, _PRE_COPY).
    pub fn migration_flags(&mut self) -> Result<u64, VmmError> {
        let d = self.feature(
            VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_GET,
            &[],
            8,
        )?;
        let m: wire::FeatureMigration =
            wire::read_prefix(&d).ok_or_else(|| protocol("short MIGRATION reply"))?;
        Ok(m.flags)
    }

    /// The device's migration state.
    pub fn mig_state(&mut self) -> Result<MigState, VmmError> {
        let d = self.feature(
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_GET,
            &[],
            size_of::<wire::FeatureMigState>(),
        )?;
        let s: wire::FeatureMigState =
            wire::read_prefix(&d).ok_or_else(|| protocol("short MIG_DEVICE_STATE reply"))?;
        MigState::from_u32(s.device_state).map_err(|e| protocol(e.to_string()))
    }

    /// Moves the device to `state` (the server takes the shortest path).
    pub fn set_mig_state(&mut self, state: MigState) -> Result<MigState, VmmError> {
        self.set_mig_state_raw(state as u32)
    }

    /// As [`set_mig_state`](Self::set_mig_state) with any number (tests of
    /// refusals).
    pub fn set_mig_state_raw(&mut self, state: u32) -> Result<MigState, VmmError> {
        let s = wire::FeatureMigState {
            device_state: state,
            data_fd: -1,
        };
        let d = self.feature(
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET,
            s.as_bytes(),
            0,
        )?;
        let s: wire::FeatureMigState =
            wire::read_prefix(&d).ok_or_else(|| protocol("short MIG_DEVICE_STATE reply"))?;
        MigState::from_u32(s.device_state).map_err(|e| protocol(e.to_string()))
    }

    /// One MIG_DATA_READ of up to `max` bytes; fewer means the end of what
    /// the current state has to give.
    pub fn mig_read(&mut self, max: u32) -> Result<Vec<u8>, VmmError> {
        let fixed = size_of::<wire::MigData>();
        let m = wire::MigData {
            argsz: fixed as u32 + max,
            size: max,
        };
        let reply = self.request(Command::MigDataRead, m.as_bytes(), &[])?;
        let head: wire::MigData =
            wire::read_prefix(&reply).ok_or_else(|| protocol("short MIG_DATA_READ reply"))?;
        let data = &reply[fixed..];
        if head.size as usize != data.len() || head.size > max {
            return Err(protocol(format!(
                "MIG_DATA_READ reply says {} bytes, carries {}",
                head.size,
                data.len()
            )));
        }
        Ok(data.to_vec())
    }

    /// Every byte the current state has to give, read in pieces of at most
    /// `piece` bytes (capped at the server's transfer size).
    pub fn mig_read_all(&mut self, piece: u32) -> Result<Vec<u8>, VmmError> {
        let piece = piece.clamp(1, self.max_xfer - size_of::<wire::MigData>() as u32);
        let mut out = Vec::new();
        loop {
            let got = self.mig_read(piece)?;
            out.extend_from_slice(&got);
            if got.len() < piece as usize {
                return Ok(out);
            }
        }
    }

    /// MIG_DATA_WRITE of `data`, in pieces of at most `piece` bytes.
    pub fn mig_write(&mut self, data: &[u8], piece: u32) -> Result<(), VmmError> {
        let piece = piece.clamp(1, self.max_xfer - size_of::<wire::MigData>() as u32) as usize;
        for chunk in data.chunks(piece) {
            let m = wire::MigData {
                argsz: size_of::<wire::MigData>() as u32,
                size: chunk.len() as u32,
            };
            let mut body = m.as_bytes().to_vec();
            body.extend_from_slice(chunk);
            self.request(Command::MigDataWrite, &body, &[])?;
        }
        Ok(())
    }

    /// DMA_LOGGING_START for `ranges` of (iova, length) (at least one, as
    /// the kernel requires); returns the page size the device chose.
    pub fn dirty_log_start(
        &mut self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<u64, VmmError> {
        let c = wire::DmaLoggingControl {
            page_size,
            num_ranges: ranges.len() as u32,
            reserved: 0,
        };
        let mut data = c.as_bytes().to_vec();
        for &(iova, length) in ranges {
            data.extend_from_slice(wire::DmaLoggingRange { iova, length }.as_bytes());
        }
        let d = self.feature(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_SET,
            &data,
            0,
        )?;
        let c: wire::DmaLoggingControl =
            wire::read_prefix(&d).ok_or_else(|| protocol("short DMA_LOGGING_START reply"))?;
        Ok(c.page_size)
    }

    pub fn dirty_log_stop(&mut self) -> Result<(), VmmError> {
        self.feature(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP | VFIO_DEVICE_FEATURE_SET,
            &[],
            0,
        )?;
        Ok(())
    }

    /// DMA_LOGGING_REPORT: one bit per `page_size` page of `[iova, iova +
    /// length)`, set for the pages written since the last report (which the
    /// device clears).
    pub fn dirty_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, VmmError> {
        let r = wire::DmaLoggingReport {
            iova,
            length,
            page_size,
        };
        let words = length.div_ceil(page_size.max(1)).div_ceil(64) as usize;
        let head = size_of::<wire::DmaLoggingReport>();
        let d = self.feature(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT | VFIO_DEVICE_FEATURE_GET,
            r.as_bytes(),
            head + words * 8,
        )?;
        let bitmap = d
            .get(head..)
            .filter(|b| b.len() == words * 8)
            .ok_or_else(|| protocol("DMA_LOGGING_REPORT reply of the wrong size"))?;
        Ok(bitmap
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}
