//! What one VMM may cost the process that serves every VM: the transport's
//! limits, with defaults, settable per instance. Hitting one gets the VMM a
//! clear error (an errno in the reply, or a closed connection when the
//! stream cannot go on) and the operator a counter
//! ([`ConnectionStats`](super::stats::ConnectionStats)).

use std::ops::RangeInclusive;
use std::time::Duration;

use super::wire;

/// Per-connection (and per-instance) limits. The defaults are
/// [`Limits::default`]; everything else (the socket, `wdvirt serve`'s
/// flags) takes them from there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole message, header included (bytes). A header announcing
    /// more is refused with E2BIG and the connection closed. What VERSION
    /// advertises as `max_data_xfer_size` follows from it
    /// ([`max_data_xfer_size`](Limits::max_data_xfer_size)).
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
    /// The largest migration stream (bytes) a destination takes in
    /// RESUMING (EFBIG past it) and a source produces in STOP_COPY.
    pub max_migration_stream: usize,
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
            max_migration_stream: crate::migration::stream::DEFAULT_MAX_STREAM,
        }
    }
}

impl Limits {
    /// `max_message_size`: at least a page, at most a full data transfer
    /// with its header and fixed body.
    pub const MESSAGE_SIZE_RANGE: RangeInclusive<u32> = 4096..=wire::MAX_MESSAGE_SIZE;
    /// `max_msg_fds`: the kernel passes at most 253 fds a message, and the
    /// socket needs room for one more than a message may carry.
    pub const MSG_FDS_RANGE: RangeInclusive<usize> = 1..=252;
    /// `max_dma_maps`: the spec's default is the most; a VERSION reply fits
    /// in QEMU's 214-byte request only with short numbers.
    pub const DMA_MAPS_RANGE: RangeInclusive<usize> = 1..=65535;
    /// `message_timeout_ms`: 10 ms to 10 minutes.
    pub const MESSAGE_TIMEOUT_MS_RANGE: RangeInclusive<u64> = 10..=600_000;
    /// `max_migration_stream`: 4 KiB to 1 GiB.
    pub const MIGRATION_STREAM_RANGE: RangeInclusive<usize> = 4096..=1 << 30;

    pub fn message_timeout(&self) -> Duration {
        Duration::from_millis(self.message_timeout_ms)
    }

    /// The largest `count` of one region access (advertised as
    /// `max_data_xfer_size`): what fits in a message of `max_message_size`
    /// after its header and the access's fixed part, and never more than
    /// 1 MiB. A VMM that splits its accesses by it never gets E2BIG.
    pub fn max_data_xfer_size(&self) -> u32 {
        let fixed = (wire::HEADER_SIZE + size_of::<wire::RegionAccess>()) as u32;
        self.max_message_size
            .saturating_sub(fixed)
            .min(wire::MAX_DATA_XFER_SIZE)
    }

    /// The limits, each brought inside its range (the `*_RANGE` consts;
    /// `wdvirt serve` refuses values outside them instead).
    pub fn clamped(mut self) -> Limits {
        fn clamp<T: Ord + Copy>(v: T, r: RangeInclusive<T>) -> T {
            v.clamp(*r.start(), *r.end())
        }
        self.max_message_size = clamp(self.max_message_size, Self::MESSAGE_SIZE_RANGE);
        self.max_msg_fds = clamp(self.max_msg_fds, Self::MSG_FDS_RANGE);
        self.max_dma_maps = clamp(self.max_dma_maps, Self::DMA_MAPS_RANGE);
        self.message_timeout_ms = clamp(self.message_timeout_ms, Self::MESSAGE_TIMEOUT_MS_RANGE);
        self.max_migration_stream = clamp(self.max_migration_stream, Self::MIGRATION_STREAM_RANGE);
        self
    }
}

/// A per-instance budget of warning lines per second, shared by every
/// connection the instance serves and by its accept loop.
#[derive(Debug)]
pub struct LogBudget {
    per_sec: u32,
    state: parking_lot::Mutex<(std::time::Instant, u32)>,
    /// Lines suppressed (logged at debug level instead).
    suppressed: std::sync::atomic::AtomicU64,
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

    /// Lines suppressed so far, by whoever asked.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(std::sync::atomic::Ordering::Relaxed)
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
        assert_eq!(b.suppressed(), 2);
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

    #[test]
    fn the_advertised_transfer_size_fits_in_the_message_limit() {
        assert_eq!(
            Limits::default().max_data_xfer_size(),
            wire::MAX_DATA_XFER_SIZE
        );
        for size in [4096, 8192, 65536 + 32, wire::MAX_MESSAGE_SIZE] {
            let l = Limits {
                max_message_size: size,
                ..Limits::default()
            };
            let xfer = l.max_data_xfer_size() as usize;
            // A REGION_WRITE (or a read's reply) of that count fits.
            let msg = wire::HEADER_SIZE + size_of::<wire::RegionAccess>() + xfer;
            assert!(msg <= size as usize, "{size}: {msg}");
        }
        let l = Limits {
            max_message_size: 4096,
            ..Limits::default()
        };
        assert_eq!(l.max_data_xfer_size(), 4096 - 32);
    }
}
