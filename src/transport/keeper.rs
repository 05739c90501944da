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
    pub state: Vec<u8>,
    /// `None` when no message since the last record could have changed
    /// them.
    pub fds: Option<Vec<(String, RawFd)>>,
}

/// Keeps a connection's state where a successor process finds it.
pub trait Keeper: Send {
    /// `h` was handled (whatever its outcome); the session and the device
    /// now stand as `session` and `device` say. An error means the state is
    /// not kept: the keeper says so itself (it is logged once per
    /// connection by the caller, and the VMM is still served).
    fn keep(
        &mut self,
        h: &Header,
        session: &SessionRecord,
        device: DeviceRecord,
    ) -> Result<(), String>;
    /// The VMM is gone (the connection ended, the device was reset): there
    /// is nothing left to take up.
    fn ended(&mut self);
}
