//! Transport errors: socket setup, framing, and per-message refusals. Each
//! refusal maps to exactly one positive errno sent back in the error reply.

use std::path::PathBuf;

use super::migration::MigrationError;
use super::socket::FdLoss;
use crate::vdev::device::DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("socket {path} is in use by a live server")]
    SocketInUse { path: PathBuf },
    #[error("cannot bind {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Accepting a connection (or setting it up) failed; see
    /// [`is_transient`](TransportError::is_transient) for whether the
    /// listener is still usable.
    #[error("accept: {0}")]
    Accept(#[source] std::io::Error),

    // Per-message refusals: the message is consumed, an error reply is sent
    // (unless No_reply) and the connection goes on.
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("DMA range {iova:#x}+{size:#x} overlaps an existing map")]
    DmaOverlap { iova: u64, size: u64 },
    #[error("no DMA map at {iova:#x}+{size:#x}")]
    DmaNotFound { iova: u64, size: u64 },
    #[error("DMA map refused: this connection already holds {0} maps, its limit")]
    DmaTableFull(usize),
    #[error(
        "DMA map {iova:#x}+{size:#x} refused: fd-backed maps would reach {} bytes, over this connection's limit of {limit} bytes",
        *mapped as u128 + *size as u128
    )]
    DmaBytesFull {
        iova: u64,
        size: u64,
        mapped: u64,
        limit: u64,
    },
    #[error("the message's fds were not all kept: {}", match .0 {
        FdLoss::Exhausted => "the kernel could not install them (MSG_CTRUNC): this process is out of file descriptors",
        FdLoss::TooMany => "more fds than this message may carry (the rest closed on arrival, or by the kernel past the control buffer)",
        FdLoss::Socket => "a socket was attached (no command takes one; closed on arrival)",
    })]
    FdsLost(FdLoss),
    #[error("unsupported command {0}")]
    UnknownCommand(u16),
    /// DEVICE_FEATURE of a feature index vfio-user does not have.
    #[error("device feature {0} is not supported")]
    NoFeature(u32),
    /// A migration request refused (state machine, stream, device).
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// More than the request may ask for (ranges, a bitmap over the data cap).
    #[error("too big: {0}")]
    TooBig(String),
    /// An address range that wraps past 2^64.
    #[error("range overflows: {0}")]
    Overflow(String),
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Serving the connection panicked (a bug); contained, counted, and the
    /// device reset.
    #[error("the connection's thread panicked (contained; the device was reset): {0}")]
    Panicked(String),
}

impl TransportError {
    /// The positive errno for an error reply.
    pub fn errno(&self) -> u32 {
        let e = match self {
            TransportError::Invalid(_) => libc::EINVAL,
            TransportError::DmaOverlap { .. } => libc::EEXIST,
            TransportError::DmaNotFound { .. } => libc::ENOENT,
            TransportError::DmaTableFull(_) | TransportError::DmaBytesFull { .. } => libc::ENOSPC,
            TransportError::FdsLost(loss) => return loss.errno(),
            TransportError::UnknownCommand(_) => libc::ENOSYS,
            TransportError::NoFeature(_) => libc::ENOTSUP,
            TransportError::Migration(m) => return m.errno(),
            TransportError::TooBig(_) => libc::E2BIG,
            TransportError::Overflow(_) => libc::EOVERFLOW,
            TransportError::NotSupported(_) => libc::ENOTSUP,
            TransportError::Device(d) => return d.errno(),
            TransportError::Io(e) | TransportError::Accept(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
            TransportError::SocketInUse { .. } => libc::EADDRINUSE,
            TransportError::Panicked(_) => libc::EIO,
            TransportError::Bind { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        };
        e as u32
    }

    /// An accept that failed for want of a resource that may come back
    /// (fds, memory, buffers) or for a connection that died in the
    /// backlog: the listener is fine, and accepting again after a pause
    /// (backoff) is right. Any other error — EINVAL after the listener was
    /// shut down, EBADF — is final.
    pub fn is_transient(&self) -> bool {
        let TransportError::Accept(e) = self else {
            return false;
        };
        matches!(
            e.raw_os_error(),
            Some(
                libc::EMFILE
                    | libc::ENFILE
                    | libc::ECONNABORTED
                    | libc::EINTR
                    | libc::ENOBUFS
                    | libc::ENOMEM
            )
        )
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> TransportError {
        TransportError::Invalid(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_resource_shortages_in_accept_are_transient() {
        let accept = |errno| TransportError::Accept(std::io::Error::from_raw_os_error(errno));
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ECONNABORTED,
            libc::EINTR,
            libc::ENOBUFS,
            libc::ENOMEM,
        ] {
            assert!(accept(errno).is_transient(), "errno {errno}");
            assert_eq!(accept(errno).errno(), errno as u32);
        }
        for errno in [libc::EINVAL, libc::EBADF, libc::ENOTSOCK] {
            assert!(!accept(errno).is_transient(), "errno {errno}");
        }
        // The same errno outside accept says nothing about the listener.
        let io = TransportError::Io(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(!io.is_transient());
        assert!(!TransportError::Accept(std::io::Error::other("x")).is_transient());
    }

    #[test]
    fn errnos_are_positive_and_distinct_where_it_matters() {
        assert_eq!(TransportError::invalid("x").errno(), libc::EINVAL as u32);
        assert_eq!(
            TransportError::DmaOverlap { iova: 0, size: 1 }.errno(),
            libc::EEXIST as u32
        );
        assert_eq!(
            TransportError::DmaNotFound { iova: 0, size: 1 }.errno(),
            libc::ENOENT as u32
        );
        assert_eq!(
            TransportError::UnknownCommand(99).errno(),
            libc::ENOSYS as u32
        );
        assert_eq!(TransportError::NoFeature(3).errno(), libc::ENOTSUP as u32);
        assert_eq!(
            TransportError::TooBig("x".into()).errno(),
            libc::E2BIG as u32
        );
        assert_eq!(
            TransportError::Overflow("x".into()).errno(),
            libc::EOVERFLOW as u32
        );
        assert_eq!(
            TransportError::FdsLost(FdLoss::Exhausted).errno(),
            libc::EMFILE as u32
        );
        assert_eq!(
            TransportError::FdsLost(FdLoss::TooMany).errno(),
            libc::EINVAL as u32
        );
        assert_eq!(
            TransportError::Device(DeviceError::Busy("b".into())).errno(),
            libc::EBUSY as u32
        );
    }
}
