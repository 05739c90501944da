//! Closing fds a VMM sent without ever waiting on them.
//!
//! `close(2)` can block: the last close of a FUSE file sends FLUSH to a
//! FUSE server that may never answer, and the last close of a TCP socket
//! with `SO_LINGER` set waits up to its linger time for unsent data a peer
//! may never read. A VMM chooses what it attaches to a message, so every fd
//! the transport refuses or drops goes to one process-wide closer thread
//! instead of being closed on the connection's thread, and a socket has
//! `SO_LINGER` turned off first (the VMM may still hold it, but then our
//! close is not the last and cannot wait either). The channel is bounded:
//! when it is full (the closer is stuck on one fd, a FUSE file say), the
//! fd is leaked — counted and logged — rather than block the connection.
//! Leaks are capped ([`LEAK_CAP`] per closer): past the cap an fd is
//! closed on the caller's thread (counted `closed_here`), so a VMM that
//! wedges the closer and keeps sending fds costs the process a bounded
//! number of fds, and at worst its own connection thread.
//!
//! Fds the transport hands to the device are only of kinds whose close
//! cannot block (a memfd for DMA_MAP, an eventfd for SET_IRQS; see
//! [`closes_at_once`]), so the device may drop them where it likes.

use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, LazyLock};

use tracing::{error, warn};

/// Fds queued for the process-wide closer before more are leaked.
pub const CAPACITY: usize = 1024;
/// Fds a closer leaks at most; past this, the caller closes them itself.
pub const LEAK_CAP: u64 = 1024;

/// What a closer has done so far (in the daemon's statistics as
/// `process.vmm_fds`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloserTotals {
    /// Fds handed to the closer thread.
    pub queued: u64,
    /// Of those, fds it has closed.
    pub closed: u64,
    /// Fds leaked because the queue was full (or the thread could not be
    /// started): never closed, never waited on. At most the leak cap.
    pub leaked: u64,
    /// Fds closed on the caller's thread: the queue was full and the leak
    /// cap reached.
    pub closed_here: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    closed: AtomicU64,
    leaked: AtomicU64,
    closed_here: AtomicU64,
}

/// A thread that closes the fds it is sent, one after another.
pub struct Closer {
    tx: Option<SyncSender<OwnedFd>>,
    counters: Arc<Counters>,
    leak_cap: u64,
}

impl Closer {
    /// A closer with room for `capacity` fds waiting to be closed, leaking
    /// at most `leak_cap` when it is full.
    pub fn new(capacity: usize, leak_cap: u64) -> Closer {
        let (tx, rx) = sync_channel::<OwnedFd>(capacity);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let spawned = std::thread::Builder::new()
            .name("wdvirt-fd-closer".into())
            .spawn(move || close_loop(rx, &c));
        let tx = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                error!("cannot start the fd closer thread ({e}): refused VMM fds will be leaked");
                None
            }
        };
        Closer {
            tx,
            counters,
            leak_cap,
        }
    }

    /// Closes `fd` on the closer thread; never blocks. When the queue is
    /// full the fd is leaked and counted.
    pub fn close(&self, fd: OwnedFd) {
        let Some(tx) = &self.tx else {
            self.leak(fd);
            return;
        };
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(fd) {
            Ok(()) => {}
            Err(TrySendError::Full(fd) | TrySendError::Disconnected(fd)) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                self.leak(fd);
            }
        }
    }

    fn leak(&self, fd: OwnedFd) {
        let taken = self
            .counters
            .leaked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.leak_cap).then_some(n + 1)
            });
        let Ok(before) = taken else {
            // The cap is reached: this thread closes it, whatever it costs.
            drop(fd);
            self.counters.closed_here.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let n = before + 1;
        let raw = fd.into_raw_fd();
        // One line for the first leak and one per CAPACITY after it: a VMM
        // that keeps the closer stuck must not also flood the log.
        if n == 1 || n.is_multiple_of(CAPACITY as u64) {
            warn!(
                "fd closer is stuck (an fd whose close blocks); leaked fd {raw}, {n} leaked so far"
            );
        }
    }

    pub fn totals(&self) -> CloserTotals {
        CloserTotals {
            queued: self.counters.queued.load(Ordering::Relaxed),
            closed: self.counters.closed.load(Ordering::Relaxed),
            leaked: self.counters.leaked.load(Ordering::Relaxed),
            closed_here: self.counters.closed_here.load(Ordering::Relaxed),
        }
    }
}

fn close_loop(rx: Receiver<OwnedFd>, counters: &Counters) {
    for fd in rx {
        drop(fd);
        counters.closed.fetch_add(1, Ordering::Relaxed);
    }
}

static PROCESS: LazyLock<Closer> = LazyLock::new(|| Closer::new(CAPACITY, LEAK_CAP));

/// Closes a fd a VMM sent on the process-wide closer thread, a socket's
/// linger turned off first.
pub fn close(fd: OwnedFd) {
    // ENOTSOCK for anything but a socket: nothing to turn off.
    let _ = rustix::net::sockopt::set_socket_linger(&fd, None);
    PROCESS.close(fd);
}

/// [`close`] for each of `fds`.
pub fn close_all(fds: impl IntoIterator<Item = OwnedFd>) {
    for fd in fds {
        close(fd);
    }
}

/// The process-wide closer's counters.
pub fn totals() -> CloserTotals {
    PROCESS.totals()
}

/// The kinds of fd the transport passes on to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    /// A file that takes seals (`F_GET_SEALS` answers): memfd, shmem.
    Memory,
    /// An eventfd.
    Eventfd,
}

/// Whether `fd` is of `kind`, whose last close frees memory and never
/// waits on anyone: a shmem file has no flush, an eventfd no peer.
pub fn closes_at_once(fd: &impl AsFd, kind: FdKind) -> bool {
    match kind {
        FdKind::Memory => rustix::fs::fcntl_get_seals(fd).is_ok(),
        FdKind::Eventfd => {
            let raw = fd.as_fd().as_raw_fd();
            std::fs::read_link(format!("/proc/self/fd/{raw}"))
                .is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// A TCP socket whose last close waits `linger` for data its peer
    /// never reads: the peer accepts and never reads, and the send buffer
    /// is filled. Returns the socket and the peer (kept open).
    pub(crate) fn lingering_socket(linger: Duration) -> (OwnedFd, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        rustix::net::sockopt::set_socket_linger(&s, Some(linger)).unwrap();
        s.set_nonblocking(true).unwrap();
        let chunk = [0u8; 65536];
        loop {
            match s.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        s.set_nonblocking(false).unwrap();
        (s.into(), peer)
    }

    #[test]
    fn a_lingering_socket_blocks_close_and_the_closer_does_not() {
        // What the closer is for: closing this on our thread waits.
        let (fd, _peer) = lingering_socket(Duration::from_millis(700));
        let t = Instant::now();
        drop(fd);
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "the test socket did not linger ({:?}): the test shows nothing",
            t.elapsed()
        );

        let closer = Closer::new(4, 3);
        let (fd, _peer) = lingering_socket(Duration::from_secs(3));
        let t = Instant::now();
        closer.close(fd);
        // Let the closer take it and get stuck in close(2) for 3 s; then 4
        // more fit in the queue, 3 leak, and the rest are closed here.
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..10 {
            closer.close(rustix::pipe::pipe().unwrap().0);
        }
        // Nothing here waited for the 3 s linger (a loaded host may be
        // slow, never 3 s slow for eleven non-blocking calls).
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let stuck = closer.totals();
        assert_eq!(stuck.closed, 0);
        // 5 queued if the closer had taken the first fd before the pipes
        // came (the usual case), 4 if a busy host had not run it yet.
        assert!(matches!(stuck.queued, 4 | 5), "{stuck:?}");
        assert_eq!(stuck.leaked, 3, "{stuck:?}");
        assert_eq!(
            stuck.queued + stuck.leaked + stuck.closed_here,
            11,
            "{stuck:?}"
        );
        // Once the linger ends, the queue drains.
        let deadline = Instant::now() + Duration::from_secs(10);
        while closer.totals().closed < stuck.queued {
            assert!(Instant::now() < deadline, "{:?}", closer.totals());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_sockets_linger_is_turned_off_before_it_is_queued() {
        let (fd, _peer) = lingering_socket(Duration::from_secs(30));
        let probe = fd.try_clone().unwrap();
        let t = Instant::now();
        close(fd);
        assert_eq!(rustix::net::sockopt::socket_linger(&probe).unwrap(), None);
        // Ours is now the last reference, and closing it returns at once.
        drop(probe);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn only_memfds_and_eventfds_pass_as_kinds_that_close_at_once() {
        let memfd = rustix::fs::memfd_create("m", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let (pipe, _w) = rustix::pipe::pipe().unwrap();
        let (sock, _peer) = lingering_socket(Duration::from_millis(1));
        let file: OwnedFd = std::fs::File::open("/proc/self/status").unwrap().into();
        assert!(closes_at_once(&memfd, FdKind::Memory));
        assert!(closes_at_once(&efd, FdKind::Eventfd));
        for fd in [&pipe, &sock, &file, &efd] {
            assert!(!closes_at_once(fd, FdKind::Memory), "{fd:?}");
        }
        for fd in [&pipe, &sock, &file, &memfd] {
            assert!(!closes_at_once(fd, FdKind::Eventfd), "{fd:?}");
        }
    }
}
