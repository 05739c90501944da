//! What a connection hands to whoever keeps it alive across a restart of
//! this process (the restart layer, `crate::restart`): after every message
//! that may have changed anything, the session as a successor must take it
//! up (what VERSION agreed, the VMM's DMA maps) and the device's own state
//! and fds. A successor then serves the same socket with
//! [`Connection::adopt`](super::Connection::adopt): the VMM sees no new
//! VERSION, no reset, and no EOF.

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use super::version::ClientCaps;
use super::wire::Header;

/// One DMA map of the VMM's, as the session recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaRecord {
    pub iova: u64,
    pub size: u64,
    /// `VFIO_DMA_MAP_FLAG_*` as the VMM sent them.
    pub flags: u32,
    /// The fd's offset of `iova` (0 without an fd).
    pub offset: u64,
    pub has_fd: bool,
}

/// The session's half of what a successor needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRecord {
    pub caps: ClientCaps,
    pub dma: Vec<DmaRecord>,
}

/// The device's half: its state (opaque to the transport) and the fds it
/// holds, each under a stable key (`dma/<iova>`, `irq/<index>/<vector>`),
/// valid while the device is locked.
pub struct DeviceRecord {
    pub state: serde_json::Value,
    /// `None` when no message since the last record could have changed
    /// them.
    pub fds: Option<Vec<(String, RawFd)>>,
}

/// A message as a successor recognises it waiting in the socket: a message
/// is taken out of the socket only after it was handled and kept, so the
/// one a predecessor handled last may still be there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handled {
    pub id: u16,
    pub cmd: u16,
    pub size: u32,
    /// CRC32C of the body.
    pub body_crc: u32,
}

impl Handled {
    pub fn of(h: &Header, body: &[u8]) -> Handled {
        Handled {
            id: h.id,
            cmd: h.cmd,
            size: h.size,
            body_crc: crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, body) as u32,
        }
    }
}

/// Where a predecessor left the conversation with the VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// The last message it handled (and kept).
    pub handled: Option<Handled>,
    /// That message's reply, if it was not sent.
    pub unsent_reply: Option<Vec<u8>>,
}

/// Keeps a connection's state where a successor process finds it.
pub trait Keeper: Send {
    /// `handled` was handled (whatever its outcome) and is to be answered
    /// with `reply` (`None` for a posted message); the session and the
    /// device now stand as `session` and `device` say. The message is taken
    /// out of the socket after this returns and the reply sent after that.
    /// An error means the state is not kept: the caller counts and logs it
    /// and serves the VMM on.
    fn keep(
        &mut self,
        handled: &Handled,
        reply: Option<&[u8]>,
        session: SessionRecord,
        device: DeviceRecord,
    ) -> Result<(), String>;
    /// The reply given to the last [`keep`](Self::keep) was sent.
    fn replied(&mut self);
    /// The VMM is gone (the connection ended, the device was reset): there
    /// is nothing left to take up.
    fn ended(&mut self);
}
