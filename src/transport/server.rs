//! The listening socket and one served connection.
//!
//! A [`Connection`] serves its messages strictly in order on the caller's
//! thread; nothing is global, so one instance's stuck VMM never delays
//! another's. A [`StopHandle`] makes `run` return from any thread.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustix::event::{EventfdFlags, eventfd};
use tracing::{debug, info, trace, warn};

use super::error::TransportError;
use super::keeper::{DeviceRecord, Handled, Keeper, Resume, SessionRecord};
use super::limits::{Limits, LogBudget};
use super::session::{Session, fd_budget};
use super::socket::{Message, MsgSocket, Peeked, Recv, SockError};
use super::stats::ConnectionStats;
use super::wire::{self, Command, FLAG_TYPE_COMMAND, FLAG_TYPE_REPLY, HEADER_SIZE, Header};
use crate::vdev::device::VfioUserDevice;

/// How long a taken-over connection waits for the VMM's next request as
/// proof that it has the reply a predecessor may have sent just before it
/// died ([`Connection::resume`]).
pub const REPLY_PROOF_WAIT: Duration = Duration::from_millis(50);

/// Why [`Connection::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disconnect {
    /// The VMM closed its end (or reset the connection).
    PeerClosed,
    /// A [`StopHandle`] asked us to stop. The socket was shut down, as on
    /// every way out of [`Connection::run`].
    Stopped,
    /// A header announced a size below 16 or over the cap. An error reply
    /// was sent (unless No_reply) and the socket shut down: the stream
    /// cannot be resynchronised.
    BadFrame { size: u32 },
    /// A message began and did not finish within the message deadline, or
    /// the peer did not take a reply within it: the socket was shut down
    /// and the unfinished message's fds closed.
    Stalled,
}

/// Makes `path` ready for a new socket: a live server there is refused
/// ([`TransportError::SocketInUse`]), a stale socket file (nobody accepting,
/// what a killed server leaves) is removed, and any other file is refused.
pub fn free_socket_path(path: &Path) -> Result<(), TransportError> {
    let bind_err = |source| TransportError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(TransportError::SocketInUse {
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                info!("vfio-user: removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(bind_err)
            }
            Err(e) => Err(bind_err(e)),
        },
        Ok(_) => Err(bind_err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(bind_err(e)),
    }
}

/// Who may connect to a socket the server creates: its file's mode and
/// owner. The kernel checks them at `connect(2)` (write permission on the
/// socket file), so a VMM running as another user is refused before the
/// server hears of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket file (0600: its owner only).
    pub mode: u32,
    /// The file's owner; `None` keeps the creating process's user.
    pub uid: Option<u32>,
    /// The file's group; `None` keeps the creating process's group.
    pub gid: Option<u32>,
}

impl Default for SocketAccess {
    /// 0600, owned by whoever creates it: an instance socket served to a
    /// VMM running as the server's own user (or root).
    fn default() -> SocketAccess {
        SocketAccess {
            mode: 0o600,
            uid: None,
            gid: None,
        }
    }
}

/// Creates a listening UNIX socket at `path` with `access`'s mode and owner,
/// with no moment at which anyone else could connect:
///
/// * The mode is set on the socket before `bind(2)` creates the file: Linux
///   creates a socket file with its socket inode's mode (less the umask), so
///   an `fchmod` of the unbound socket gives the file its final mode from
///   its first instant. (The umask is process-wide and a daemon has threads;
///   binding in a private directory and renaming would need a directory per
///   socket. Neither is needed.)
/// * The owner is changed before `listen(2)`: until then a `connect(2)`
///   gets ECONNREFUSED whatever the file's owner, so no peer can reach the
///   socket while it still has the creating user's ownership.
///
/// `path` must be free (see [`free_socket_path`]).
pub fn bind_unix(path: &Path, access: &SocketAccess) -> std::io::Result<UnixListener> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(access.mode & 0o777))?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    let owned = || -> std::io::Result<()> {
        if access.uid.is_some() || access.gid.is_some() {
            rustix::fs::chownat(
                rustix::fs::CWD,
                path,
                access.uid.map(rustix::fs::Uid::from_raw),
                access.gid.map(rustix::fs::Gid::from_raw),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        // The umask may have taken bits away; never add any it allowed.
        let want = access.mode & 0o777;
        let meta = std::fs::symlink_metadata(path)?;
        if meta.mode() & 0o777 != want {
            rustix::fs::chmodat(
                rustix::fs::CWD,
                path,
                rustix::fs::Mode::from_raw_mode(want),
                rustix::fs::AtFlags::empty(),
            )?;
        }
        rustix::net::listen(&fd, 128)?;
        Ok(())
    };
    if let Err(e) = owned() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// A socket file this process created: removed when dropped, and only
/// if the path still names the socket made here (a later server's socket
/// at the same path, or a file put there since, is left alone).
pub struct SocketFile {
    path: PathBuf,
    /// (dev, ino) of the socket we created.
    ident: Option<(u64, u64)>,
}

impl SocketFile {
    /// Binds and listens at `path` with `access`: a live server there is
    /// refused, a stale socket file replaced, any other file refused
    /// ([`free_socket_path`]). The listener, and the file to remove.
    pub fn bind(
        path: &Path,
        access: &SocketAccess,
    ) -> Result<(UnixListener, SocketFile), TransportError> {
        free_socket_path(path)?;
        let listener = bind_unix(path, access).map_err(|source| TransportError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let ident = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok((
            listener,
            SocketFile {
                path: path.to_owned(),
                ident,
            },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.ident {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A bound vfio-user socket.
pub struct Listener {
    listener: UnixListener,
    file: SocketFile,
}

impl Listener {
    /// Binds `path` with mode 0600, owned by this process's user. A live
    /// server already there is refused; a stale socket file (nobody
    /// accepting) is removed first; any other file is refused.
    pub fn bind(path: &Path) -> Result<Listener, TransportError> {
        Listener::bind_with(path, &SocketAccess::default())
    }

    /// [`bind`](Listener::bind) with the socket file's mode and owner given
    /// ([`bind_unix`] says how it is done without a window).
    pub fn bind_with(path: &Path, access: &SocketAccess) -> Result<Listener, TransportError> {
        let (listener, file) = SocketFile::bind(path, access)?;
        Ok(Listener { listener, file })
    }

    /// Waits for one VMM to connect. Every failure, including setting up
    /// the accepted connection, is [`TransportError::Accept`]; when it
    /// [`is_transient`](TransportError::is_transient) (out of fds or
    /// memory) the listener is intact and the caller should retry after a
    /// backoff — the pending VMM stays in the backlog. Otherwise (EINVAL
    /// once the socket is shut down) stop accepting.
    pub fn accept(&self) -> Result<Connection, TransportError> {
        let (stream, _) = self.listener.accept().map_err(TransportError::Accept)?;
        Connection::from_stream(stream).map_err(|e| match e {
            TransportError::Io(e) => TransportError::Accept(e),
            e => e,
        })
    }

    /// A listening socket bound at `path` by a predecessor process (kept
    /// for it by the restart layer): served as if bound here, and its file
    /// removed when it is dropped.
    pub fn adopt(fd: OwnedFd, path: &Path) -> Listener {
        let ident = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Listener {
            listener: UnixListener::from(fd),
            file: SocketFile {
                path: path.to_owned(),
                ident,
            },
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// Makes a running [`Connection::run`] return [`Disconnect::Stopped`].
/// Cheap to clone; usable from any thread; stopping is permanent.
#[derive(Clone, Debug)]
pub struct StopHandle {
    fd: Arc<OwnedFd>,
}

impl StopHandle {
    pub fn stop(&self) {
        // An eventfd write only fails when the counter would overflow, and
        // then it is already signalled: either way `run` sees it.
        let _ = rustix::io::write(&*self.fd, &1u64.to_ne_bytes());
    }
}

/// One VMM connection.
pub struct Connection {
    sock: MsgSocket,
    stop: Arc<OwnedFd>,
    stats: Arc<ConnectionStats>,
    limits: Limits,
    /// Warning lines left this second, shared by the instance's
    /// connections; past it errors go to debug so a misbehaving peer
    /// cannot flood the log.
    log_budget: Arc<LogBudget>,
    /// Where the session and device are kept for a successor process.
    keeper: Option<Box<dyn Keeper>>,
    /// The session a predecessor process left ([`Connection::adopt`]).
    adopted: Option<SessionRecord>,
    /// A message since the last keep may have changed the device's fds.
    fds_changed: bool,
    /// Bytes of the message being served still in the socket (peeked).
    unconsumed: Option<usize>,
    /// Where a predecessor left the conversation ([`Connection::adopt`]).
    resume: Option<Resume>,
}

impl Connection {
    pub fn from_stream(stream: UnixStream) -> Result<Connection, TransportError> {
        let stop = Arc::new(
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(std::io::Error::from)?,
        );
        let limits = Limits::default();
        let sock = MsgSocket::new(stream, stop.clone(), &limits)?;
        Ok(Connection {
            sock,
            stop,
            stats: Arc::default(),
            limits,
            log_budget: Arc::default(),
            keeper: None,
            adopted: None,
            fds_changed: true,
            unconsumed: None,
            resume: None,
        })
    }

    /// A connection a predecessor process served: its VMM agreed VERSION
    /// as `record` says and mapped `record.dma`, which the caller has
    /// already given the device again. Serving starts with the VMM's next
    /// message.
    pub fn adopt(
        stream: UnixStream,
        record: SessionRecord,
        resume: Resume,
    ) -> Result<Connection, TransportError> {
        let mut c = Connection::from_stream(stream)?;
        c.adopted = Some(record);
        c.resume = Some(resume);
        Ok(c)
    }

    /// Keep the session and the device with `keeper` after every message,
    /// so that a successor process can [`adopt`](Connection::adopt) them.
    pub fn with_keeper(mut self, keeper: Box<dyn Keeper>) -> Connection {
        self.keeper = Some(keeper);
        self
    }

    /// Serves under `limits` (clamped to what the protocol allows), logging
    /// warnings from `log_budget`, which the instance's connections share.
    pub fn with_limits(mut self, limits: &Limits, log_budget: Arc<LogBudget>) -> Connection {
        self.limits = limits.clone().clamped();
        self.sock
            .set_limits(self.limits.max_msg_fds, self.limits.message_timeout());
        self.log_budget = log_budget;
        self
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            fd: self.stop.clone(),
        }
    }

    pub fn stats(&self) -> Arc<ConnectionStats> {
        self.stats.clone()
    }

    pub fn stream(&self) -> &UnixStream {
        self.sock.stream()
    }

    /// Serves messages in order until the peer closes, a stop is requested
    /// or a frame cannot be parsed. On the way out, whatever the reason, the
    /// socket is shut down (so the VMM sees EOF even while another handle
    /// on it stays open, such as an instance's liveness probe) and
    /// `dev.disconnected()` is called.
    ///
    /// The connection is one user of the device, not its owner: it holds the
    /// device's lock only while one message is handled, so the daemon (API
    /// views, QoS changes, a migration's quiesce) reaches the same device
    /// between messages. The lock is never held while waiting on the socket.
    ///
    /// A panic while serving (a bug: no input may cause one) is contained
    /// here: it is counted, the device is reset as after any disconnect,
    /// and `run` returns [`TransportError::Panicked`], so the instance
    /// serves its next VMM as usual.
    pub fn run(&mut self, dev: &Mutex<dyn VfioUserDevice>) -> Result<Disconnect, TransportError> {
        use std::panic::{AssertUnwindSafe, catch_unwind};
        let result = match catch_unwind(AssertUnwindSafe(|| self.serve(dev))) {
            Ok(r) => r,
            Err(payload) => {
                ConnectionStats::add(&self.stats.panics, 1);
                Err(TransportError::Panicked(panic_message(&*payload)))
            }
        };
        let _ = self.sock.stream().shutdown(std::net::Shutdown::Both);
        // The device lock is not poisoned (parking_lot); a device whose
        // state a panic left half-changed is reset here.
        if catch_unwind(AssertUnwindSafe(|| dev.lock().disconnected())).is_err() {
            ConnectionStats::add(&self.stats.panics, 1);
            tracing::error!("vfio-user: the device panicked while being reset after a disconnect");
        }
        if let Some(k) = self.keeper.as_mut() {
            k.ended();
        }
        // Whoever runs the connection says how it ended (an instance logs
        // it with its name, under its log budget).
        match &result {
            Ok(d) => debug!("vfio-user: connection ended: {d:?}"),
            Err(e) => debug!("vfio-user: connection failed: {e}"),
        }
        result
    }

    fn serve(&mut self, dev: &Mutex<dyn VfioUserDevice>) -> Result<Disconnect, TransportError> {
        let mut session = match self.adopted.take() {
            Some(record) => Session::adopted(&*dev.lock(), &self.limits, &record)?,
            None => Session::new(&*dev.lock(), &self.limits),
        };
        if let Some(r) = self.resume.take()
            && let Err(e) = self.resume(r)
        {
            return self.end(e);
        }
        let result = self.serve_messages(&mut session, dev);
        if let Some(state) = session.ended(&mut *dev.lock()) {
            self.log(format_args!(
                "vfio-user: the VMM left with the device in migration state {}",
                state.name()
            ));
        }
        result
    }

    fn serve_messages(
        &mut self,
        session: &mut Session,
        dev: &Mutex<dyn VfioUserDevice>,
    ) -> Result<Disconnect, TransportError> {
        let max_msg_fds = self.limits.max_msg_fds;
        let cap = self.limits.max_message_size;
        loop {
            // Kept for a successor: a message stays in the socket until its
            // effect is kept (`settle`).
            let read = if self.keeper.is_some() {
                self.sock
                    .peek_message(cap, |h| fd_budget(h, max_msg_fds))
                    .map(|p| match p {
                        Peeked::Peeked(m) => {
                            self.unconsumed = Some(m.header.size as usize);
                            Recv::Message(m)
                        }
                        Peeked::Read(r) => r,
                    })
            } else {
                self.sock.read_message(cap, |h| fd_budget(h, max_msg_fds))
            };
            let refused = self.sock.take_refused();
            if refused != 0 {
                ConnectionStats::add(&self.stats.fds_refused, refused);
            }
            let mut msg = match read {
                Ok(Recv::Message(m)) => m,
                Ok(Recv::Closed { partial }) => {
                    if partial {
                        debug!("vfio-user: peer closed mid-message");
                    }
                    return Ok(Disconnect::PeerClosed);
                }
                Ok(Recv::BadFrame(h)) => return self.bad_frame(h),
                Err(e) => return self.end(e),
            };
            ConnectionStats::add(&self.stats.messages, 1);
            ConnectionStats::add(&self.stats.bytes_received, msg.header.size as u64);
            ConnectionStats::add(&self.stats.fds_received, msg.fds.len() as u64);
            if msg.fd_loss.is_some() {
                ConnectionStats::add(&self.stats.fds_truncated, 1);
            }
            if let Err(e) = self
                .serve_one(session, dev, &mut msg)
                .and_then(|()| self.settle())
            {
                return self.end(e);
            }
        }
    }

    /// Takes the message being served out of the socket, if it was only
    /// peeked (its effect is kept by now).
    fn settle(&mut self) -> Result<(), SockError> {
        match self.unconsumed.take() {
            Some(len) => self.sock.consume(len),
            None => Ok(()),
        }
    }

    /// Sends a reply: after the request is out of the socket, and told to
    /// the keeper once sent.
    fn send_reply(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SockError> {
        self.settle()?;
        self.sock.send(bytes, fds)?;
        if let Some(k) = self.keeper.as_mut() {
            k.replied();
        }
        Ok(())
    }

    /// Where a predecessor left the conversation: the message it handled
    /// last is taken out of the socket if it is still there, and its reply
    /// sent if it was not.
    ///
    /// A predecessor takes a message out of the socket before it sends the
    /// reply and records the reply sent after: a message still in the
    /// socket was not answered. One taken out and not recorded answered
    /// may have been, if the process died between the send and the record:
    /// the reply is then sent only when nothing shows that the VMM has it
    /// (bytes of ours it has not read, or a next request within
    /// [`REPLY_PROOF_WAIT`]): a VMM that waits for it gets it, and one that
    /// has it sees no second copy unless it read it and then stayed
    /// silent that long (`docs/restart.md`).
    fn resume(&mut self, r: Resume) -> Result<(), SockError> {
        let still_there = match r.handled {
            Some(h) if self.sock.waiting_is(&h)? => {
                self.sock.consume(h.size as usize)?;
                true
            }
            _ => false,
        };
        let Some(bytes) = r.unsent_reply else {
            return Ok(());
        };
        let has_it = !still_there
            && (self.sock.unread_by_peer().unwrap_or(0) > 0
                || self.sock.readable_within(REPLY_PROOF_WAIT)?);
        if has_it {
            if let Some(k) = self.keeper.as_mut() {
                k.replied();
            }
            return Ok(());
        }
        self.send_reply(&bytes, &[])
    }

    fn serve_one(
        &mut self,
        session: &mut Session,
        dev: &Mutex<dyn VfioUserDevice>,
        msg: &mut Message,
    ) -> Result<(), SockError> {
        let h = msg.header;
        match h.msg_type() {
            FLAG_TYPE_COMMAND => {}
            FLAG_TYPE_REPLY => {
                // We send no requests yet (DMA_READ/WRITE would be the first),
                // so no reply can be ours. Body and fds are already consumed.
                ConnectionStats::add(&self.stats.stray_replies, 1);
                debug!(
                    "vfio-user: dropping unsolicited reply id {} cmd {}",
                    h.id, h.cmd
                );
                return Ok(());
            }
            t => {
                let e = TransportError::invalid(format!("message type {t}"));
                return self.refuse(&h, &e);
            }
        }
        if let Some(loss) = msg.fd_loss {
            // Served short of fds, a DMA_MAP would become fd-less (its RAM
            // unreachable) and a SET_IRQS EVENTFD a de-assign. The body is
            // consumed, so the stream stays in sync; the fds that did
            // arrive are closed with the message.
            return self.refuse(&h, &TransportError::FdsLost(loss));
        }
        let what = tracing::enabled!(tracing::Level::TRACE)
            .then(|| wire::describe(&h, &msg.body, msg.fds.len()));
        // The device is locked for the handling (and its keeping) alone;
        // the reply is sent after, so a VMM that stops reading cannot pin
        // the device.
        let result = {
            let mut dev = dev.lock();
            let result = session.handle(&mut *dev, msg);
            if self.keeper.is_some() {
                let error;
                let reply = match (&result, h.no_reply()) {
                    (_, true) => None,
                    (Ok(r), false) => Some(&r.bytes[..]),
                    (Err(e), false) => {
                        error = h.error_reply(e.errno());
                        Some(zerocopy::IntoBytes::as_bytes(&error))
                    }
                };
                self.keep(&Handled::of(&h, &msg.body), reply, session, &mut *dev);
            }
            result
        };
        let mig = session.take_migration_counts();
        if mig != Default::default() {
            ConnectionStats::add(&self.stats.migration_arcs, mig.arcs);
            ConnectionStats::add(&self.stats.migration_bytes_read, mig.bytes_read);
            ConnectionStats::add(&self.stats.migration_bytes_written, mig.bytes_written);
        }
        if let Some(what) = what {
            match &result {
                Ok(_) if h.no_reply() => trace!("vfio-user: {what}: ok"),
                Ok(r) => trace!("vfio-user: {what}: ok, reply {} bytes", r.bytes.len()),
                Err(e) => trace!("vfio-user: {what}: {e}"),
            }
        }
        match result {
            Ok(reply) if !h.no_reply() => {
                self.send_reply(&reply.bytes, reply.fd().as_slice())?;
                ConnectionStats::add(&self.stats.replies_sent, 1);
                ConnectionStats::add(&self.stats.bytes_sent, reply.bytes.len() as u64);
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => self.refuse(&h, &e),
        }
    }

    /// Hand the session and the device, as `h` left them, to the keeper.
    fn keep(
        &mut self,
        h: &Handled,
        reply: Option<&[u8]>,
        session: &Session,
        dev: &mut dyn VfioUserDevice,
    ) {
        let Some(keeper) = self.keeper.as_mut() else {
            return;
        };
        self.fds_changed |= matches!(
            Command::from_u16(h.cmd),
            Some(
                Command::DmaMap | Command::DmaUnmap | Command::DeviceSetIrqs | Command::DeviceReset
            )
        );
        // Before VERSION there is nothing to take up; during a migration a
        // successor could not take it up half way: the last state kept
        // stands (a restart then fails that migration, not the VM).
        let Some(record) = session.record() else {
            return;
        };
        if session.migrating() {
            return;
        }
        let Some(s) = dev.survivable() else {
            return;
        };
        let kept = s.live_state().map_err(|e| e.to_string()).and_then(|state| {
            let fds = self.fds_changed.then(|| s.held_fds());
            keeper.keep(h, reply, record, DeviceRecord { state, fds })
        });
        match kept {
            Ok(()) => self.fds_changed = false,
            Err(e) => {
                ConnectionStats::add(&self.stats.keep_failures, 1);
                self.log(format_args!(
                    "vfio-user: the device's state could not be kept for a restart: {e}"
                ));
            }
        }
    }

    /// Reports a failed request: an error reply, or for No_reply messages
    /// (posted writes) only a counter and a log line — QEMU must never see a
    /// reply to those.
    fn refuse(&mut self, h: &Header, e: &TransportError) -> Result<(), SockError> {
        let errno = e.errno();
        self.log(format_args!(
            "vfio-user: cmd {} id {} refused ({}): {e}",
            h.cmd,
            h.id,
            errno_name(errno)
        ));
        if h.no_reply() {
            ConnectionStats::add(&self.stats.posted_write_errors, 1);
            return Ok(());
        }
        let reply = h.error_reply(errno);
        self.send_reply(zerocopy::IntoBytes::as_bytes(&reply), &[])?;
        ConnectionStats::add(&self.stats.errors_sent, 1);
        ConnectionStats::add(&self.stats.replies_sent, 1);
        ConnectionStats::add(&self.stats.bytes_sent, HEADER_SIZE as u64);
        Ok(())
    }

    fn bad_frame(&mut self, h: Header) -> Result<Disconnect, TransportError> {
        ConnectionStats::add(&self.stats.bad_frames, 1);
        let errno = if (h.size as usize) < HEADER_SIZE {
            libc::EINVAL
        } else {
            libc::E2BIG
        };
        self.log(format_args!(
            "vfio-user: cmd {} id {} has size {} (allowed {}..={}); closing",
            h.cmd, h.id, h.size, HEADER_SIZE, self.limits.max_message_size
        ));
        if h.msg_type() == FLAG_TYPE_COMMAND && !h.no_reply() {
            let reply = h.error_reply(errno as u32);
            if self
                .sock
                .send(zerocopy::IntoBytes::as_bytes(&reply), &[])
                .is_ok()
            {
                ConnectionStats::add(&self.stats.errors_sent, 1);
                ConnectionStats::add(&self.stats.replies_sent, 1);
            }
        }
        let _ = self.sock.stream().shutdown(std::net::Shutdown::Both);
        Ok(Disconnect::BadFrame { size: h.size })
    }

    /// A message that did not finish in time (`got` bytes of it arrived;
    /// 0 for a reply the peer did not take): the stream is out of sync, so
    /// the connection ends, and with it the message's fds.
    fn stalled(&mut self, got: usize) -> Disconnect {
        ConnectionStats::add(&self.stats.stalled, 1);
        let what = if got > 0 {
            format!("message ({got} bytes so far)")
        } else {
            "message or reply".to_string()
        };
        let ms = self.limits.message_timeout_ms;
        self.log(format_args!(
            "vfio-user: {what} not done within {ms} ms; closing"
        ));
        let _ = self.sock.stream().shutdown(std::net::Shutdown::Both);
        Disconnect::Stalled
    }

    /// How a socket error ends the connection.
    fn end(&mut self, e: SockError) -> Result<Disconnect, TransportError> {
        match e {
            SockError::Stopped => Ok(Disconnect::Stopped),
            SockError::PeerGone => Ok(Disconnect::PeerClosed),
            SockError::Stalled { got } => Ok(self.stalled(got)),
            SockError::Io(e) => Err(TransportError::Io(e)),
        }
    }

    /// A warning line under the instance's budget (past it, debug level
    /// and counted in [`LogBudget::suppressed`]).
    fn log(&self, args: std::fmt::Arguments<'_>) {
        if self.log_budget.take() {
            warn!("{args}");
        } else {
            debug!("{args}");
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

fn errno_name(errno: u32) -> String {
    std::io::Error::from_raw_os_error(errno as i32).to_string()
}
