//! Per-connection counters, updated by the connection's thread and readable
//! from any other (stats, the daemon API) without a lock.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Well-framed messages read (requests and stray replies).
    pub messages: AtomicU64,
    /// Replies sent, error replies included.
    pub replies_sent: AtomicU64,
    /// Error replies sent.
    pub errors_sent: AtomicU64,
    /// Failures of No_reply messages (posted writes): logged and counted,
    /// never sent (QEMU would desync).
    pub posted_write_errors: AtomicU64,
    /// Messages of reply type from the peer: we send no requests yet, so
    /// they answer nothing and are dropped.
    pub stray_replies: AtomicU64,
    /// Fatal framing errors (size < 16 or over the cap).
    pub bad_frames: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub fds_received: AtomicU64,
    /// Messages whose fds the kernel dropped (MSG_CTRUNC: out of fds, or
    /// too many attached) or that we closed on arrival; each is refused,
    /// never served short of fds.
    pub fds_truncated: AtomicU64,
    /// Fds closed as they arrived: past the message's budget (the limit,
    /// or any on a command that takes none) or sockets.
    pub fds_refused: AtomicU64,
    /// Connections ended because a message (or a reply) was not done
    /// within the message deadline.
    pub stalled: AtomicU64,
    /// Panics contained while serving (each one a bug).
    pub panics: AtomicU64,
    /// Direct arcs of the migration state machine taken (a combined
    /// transition counts each arc).
    pub migration_arcs: AtomicU64,
    /// Migration stream bytes sent in MIG_DATA_READ replies (source).
    pub migration_bytes_read: AtomicU64,
    /// Migration stream bytes taken by MIG_DATA_WRITE (destination).
    pub migration_bytes_written: AtomicU64,
    /// Messages after which the device's state could not be kept for a
    /// restart (the holder gone, the state memfd full).
    pub keep_failures: AtomicU64,
}

/// A plain copy of [`ConnectionStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StatsSnapshot {
    pub messages: u64,
    pub replies_sent: u64,
    pub errors_sent: u64,
    pub posted_write_errors: u64,
    pub stray_replies: u64,
    pub bad_frames: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub fds_received: u64,
    pub fds_truncated: u64,
    pub fds_refused: u64,
    pub stalled: u64,
    pub panics: u64,
    pub migration_arcs: u64,
    pub migration_bytes_read: u64,
    pub migration_bytes_written: u64,
    pub keep_failures: u64,
}

impl StatsSnapshot {
    /// Adds `other`'s counts to these (an instance's totals over its
    /// connections).
    pub fn accumulate(&mut self, other: &StatsSnapshot) {
        let fields = [
            (&mut self.messages, other.messages),
            (&mut self.replies_sent, other.replies_sent),
            (&mut self.errors_sent, other.errors_sent),
            (&mut self.posted_write_errors, other.posted_write_errors),
            (&mut self.stray_replies, other.stray_replies),
            (&mut self.bad_frames, other.bad_frames),
            (&mut self.bytes_received, other.bytes_received),
            (&mut self.bytes_sent, other.bytes_sent),
            (&mut self.fds_received, other.fds_received),
            (&mut self.fds_truncated, other.fds_truncated),
            (&mut self.fds_refused, other.fds_refused),
            (&mut self.stalled, other.stalled),
            (&mut self.panics, other.panics),
            (&mut self.migration_arcs, other.migration_arcs),
            (&mut self.migration_bytes_read, other.migration_bytes_read),
            (
                &mut self.migration_bytes_written,
                other.migration_bytes_written,
            ),
            (&mut self.keep_failures, other.keep_failures),
        ];
        for (mine, theirs) in fields {
            *mine = mine.saturating_add(theirs);
        }
    }
}

impl ConnectionStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            messages: g(&self.messages),
            replies_sent: g(&self.replies_sent),
            errors_sent: g(&self.errors_sent),
            posted_write_errors: g(&self.posted_write_errors),
            stray_replies: g(&self.stray_replies),
            bad_frames: g(&self.bad_frames),
            bytes_received: g(&self.bytes_received),
            bytes_sent: g(&self.bytes_sent),
            fds_received: g(&self.fds_received),
            fds_truncated: g(&self.fds_truncated),
            fds_refused: g(&self.fds_refused),
            stalled: g(&self.stalled),
            panics: g(&self.panics),
            migration_arcs: g(&self.migration_arcs),
            migration_bytes_read: g(&self.migration_bytes_read),
            migration_bytes_written: g(&self.migration_bytes_written),
            keep_failures: g(&self.keep_failures),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_every_counter() {
        let s = ConnectionStats::default();
        ConnectionStats::add(&s.messages, 3);
        ConnectionStats::add(&s.posted_write_errors, 2);
        ConnectionStats::add(&s.bytes_sent, 40);
        ConnectionStats::add(&s.fds_truncated, 1);
        let snap = s.snapshot();
        assert_eq!(snap.fds_truncated, 1);
        assert_eq!(snap.messages, 3);
        assert_eq!(snap.posted_write_errors, 2);
        assert_eq!(snap.bytes_sent, 40);
        assert_eq!(snap.errors_sent, 0);
    }
}
