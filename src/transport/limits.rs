//! What one VMM may cost the process that serves every VM: the transport's
//! limits, with defaults, settable per instance. Hitting one gets the VMM a
//! clear error (an errno in the reply, or a closed connection when the
//! stream cannot go on) and the operator a counter
//! ([`ConnectionStats`](super::stats::ConnectionStats)).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::wire;

/// Per-connection (and per-instance) limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest whole message, header included (bytes). A header announcing
    /// more is refused with E2BIG and the connection closed.
    pub max_message_size: u32,
    /// Fds one message may carry (advertised as `max_msg_fds`). More, or any
    /// on a command that takes none, are closed as they arrive and the
    /// message refused with EINVAL.
    pub max_msg_fds: usize,
    /// DMA maps one connection may hold (advertised as `max_dma_maps`); one
    /// more is refused with ENOSPC.
    pub max_dma_maps: usize,
    /// Bytes of fd-backed DMA maps one connection may hold (ENOSPC past it).
    pub max_dma_fd_bytes: u64,
    /// Once a message's first byte arrived, the rest must within this long
    /// (milliseconds); a reply must be taken by the peer within it too.
    /// Past it the connection is closed: the stream is out of sync.
    pub message_timeout_ms: u64,
    /// Warning lines one instance may log per second; the rest are counted
    /// and logged at debug level. Per instance, not per connection: a VMM
    /// can reconnect in a loop.
    pub log_lines_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_size: wire::MAX_MESSAGE_SIZE,
            max_msg_fds: wire::MAX_MSG_FDS,
            max_dma_maps: wire::MAX_DMA_MAPS,
            max_dma_fd_bytes: wire::MAX_DMA_FD_BYTES,
            message_timeout_ms: 5_000,
            log_lines_per_sec: 10,
        }
    }
}

impl Limits {
    pub fn message_timeout(&self) -> Duration {
        Duration::from_millis(self.message_timeout_ms)
    }

    /// The limits, each brought inside what the protocol and the kernel
    /// allow (a message must hold a header and a full data transfer; the
    /// kernel passes at most 253 fds a message; a VERSION reply fits in
    /// QEMU's 214-byte request only with short numbers).
    pub fn clamped(mut self) -> Limits {
        self.max_message_size = self.max_message_size.clamp(4096, wire::MAX_MESSAGE_SIZE);
        self.max_msg_fds = self.max_msg_fds.clamp(1, 252);
        self.max_dma_maps = self.max_dma_maps.clamp(1, 65535);
        self.message_timeout_ms = self.message_timeout_ms.clamp(10, 600_000);
        self
    }
}

/// A per-instance budget of warning lines per second, shared by every
/// connection the instance serves.
#[derive(Debug)]
pub struct LogBudget {
    per_sec: u32,
    state: parking_lot::Mutex<(std::time::Instant, u32)>,
    /// Lines suppressed (logged at debug level instead).
    pub suppressed: std::sync::atomic::AtomicU64,
}

impl LogBudget {
    pub fn new(per_sec: u32) -> LogBudget {
        LogBudget {
            per_sec,
            state: parking_lot::Mutex::new((std::time::Instant::now(), 0)),
            suppressed: Default::default(),
        }
    }

    /// May one more warning line go out now?
    pub fn take(&self) -> bool {
        let mut st = self.state.lock();
        let now = std::time::Instant::now();
        if now.duration_since(st.0) >= Duration::from_secs(1) {
            *st = (now, 0);
        }
        if st.1 < self.per_sec {
            st.1 += 1;
            true
        } else {
            self.suppressed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            false
        }
    }
}

impl Default for LogBudget {
    fn default() -> LogBudget {
        LogBudget::new(Limits::default().log_lines_per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_budget_refills_each_second() {
        let b = LogBudget::new(3);
        assert_eq!((0..5).filter(|_| b.take()).count(), 3);
        assert_eq!(b.suppressed.load(std::sync::atomic::Ordering::Relaxed), 2);
        b.state.lock().0 -= Duration::from_secs(1);
        assert!(b.take());
    }

    #[test]
    fn limits_are_clamped_to_what_the_protocol_allows() {
        let l = Limits {
            max_msg_fds: 10_000,
            max_message_size: 1,
            message_timeout_ms: 0,
            ..Limits::default()
        }
        .clamped();
        assert_eq!(l.max_msg_fds, 252);
        assert_eq!(l.max_message_size, 4096);
        assert_eq!(l.message_timeout_ms, 10);
        assert_eq!(Limits::default().clamped(), Limits::default());
    }
}
