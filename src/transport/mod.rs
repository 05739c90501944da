//! The vfio-user transport: wdvirt's own server for the protocol (QEMU
//! `docs/interop/vfio-user.rst`), speaking to a VMM over a UNIX socket and
//! to one device through the device layer's contract,
//! [`crate::vdev::device::VfioUserDevice`] (the transport imports it; the
//! device never imports the transport).
//!
//! This layer owns framing and every generic check — message sizes, argsz,
//! region and IRQ indexes, `offset + count` against region sizes, fd counts,
//! the DMA map table (alignment, overlap, exact unmap) — so a device sees
//! only well-formed, in-range requests and never a socket. It knows nothing
//! about what the device does; its only neighbour is the device trait.
//! `/work/shared/notes/qemu-vfio-user-client.md` records what QEMU 11.1
//! demands on top of the spec (reply-size caps, No_reply, region-info
//! truncation) and each rule is enforced here.
//!
//! Files by role: `wire` (structs, command numbers), `socket` (framing, fd
//! passing), `version` (capability negotiation), `session` (per-command
//! checks and dispatch), `migration` (the migration state machine's arcs,
//! the stream read out and written in), `dma_table`, `server` (listener,
//! connection loop),
//! `stats`, `error`, `rlimit` (the fd limit connections live under),
//! `limits` (what one VMM may cost the process), `closer` (fds a VMM sent
//! are closed off the connection's thread).
//!
//! Not done yet: server→client DMA_READ/DMA_WRITE. Memory that the VMM maps
//! without an fd (BIOS, ROM, other devices' BARs) is reachable only that
//! way, so for now a device must refuse descriptors that point there
//! (`DmaMapping::fd` is `None`). When it is added, replies to our requests
//! (type reply) arrive interleaved with QEMU's requests and must be matched
//! by id, and no client request may wait on them (see the notes, §0). Also
//! not served: GET_REGION_IO_FDS. Migration (DEVICE_FEATURE, MIG_DATA_*)
//! needs no server-initiated message (`docs/vfio-user.md`).

pub mod closer;
pub mod dma_table;
pub mod error;
pub mod keeper;
pub mod limits;
pub mod migration;
pub mod rlimit;
pub mod server;
mod session;
pub mod socket;
pub mod stats;
pub mod version;
pub mod wire;

pub use error::TransportError;
pub use limits::{Limits, LogBudget};
pub use rlimit::raise_fd_limit;
pub use server::{Connection, Disconnect, Listener, StopHandle};
pub use stats::{ConnectionStats, StatsSnapshot};
