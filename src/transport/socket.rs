//! Message framing on the connection's UNIX stream socket, with fd passing.
//!
//! The socket is non-blocking; a read or write that would block waits in
//! `poll` on the socket *and* the connection's stop eventfd, so an idle
//! connection costs nothing and another thread can always make it return.
//!
//! Every byte is read with `recvmsg` and never past the end of the current
//! message, so the SCM_RIGHTS fds the kernel hands back belong to this
//! message: a sender attaches them to the message's first byte, and Linux
//! does not merge a read across a boundary where fds are attached.
//!
//! When the kernel cannot hand over every fd (MSG_CTRUNC), it closes the
//! rest; the message is still read whole and comes back with a
//! [`FdLoss`], so the connection refuses it instead of serving it short of
//! fds (a DMA_MAP without its fd, a SET_IRQS EVENTFD that reads as
//! "de-assign").
//!
//! A peer controls when fds arrive, so they are judged as they arrive, not
//! once the message is whole: the control buffer has room for only one
//! more fd than a message may carry (the kernel never installs the rest in
//! our fd table), fds past the message's budget (none for a command that
//! takes none, once its header is known) and sockets (never a DMA or IRQ
//! fd, and a VMM's own end of the connection would keep it open forever)
//! are closed at once, and the message is marked. Once a message's first
//! byte has arrived the rest must follow within a deadline; an unfinished
//! message is dropped with its fds and the connection closed; a reply the
//! peer does not read within the same kind of deadline ends the connection
//! too (both [`SockError::Stalled`]).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use zerocopy::IntoBytes;

use super::closer;
use super::limits::Limits;
use super::wire::{HEADER_SIZE, Header};

/// The kernel's own per-message limit (SCM_MAX_FD): no control buffer
/// needs room for more.
const SCM_MAX_FD: usize = 253;

/// One whole message as read from the socket.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    /// Exactly `header.size - 16` bytes.
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Some of the fds the peer attached never arrived (MSG_CTRUNC) or were
    /// closed on arrival; `fds` holds only those kept. Such a message must
    /// not be served.
    pub fd_loss: Option<FdLoss>,
}

/// Why a `recvmsg` came back with MSG_CTRUNC: the kernel installs the
/// attached fds one by one into our control buffer and closes those it
/// could not install (Linux `scm_detach_fds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdLoss {
    /// Fewer fds arrived than the buffer holds, so installing one failed:
    /// this process is out of fds (RLIMIT_NOFILE, or the system's file
    /// table; an LSM refusing the fd looks the same and is rare).
    Exhausted,
    /// The peer attached more fds than the message may carry (the buffer
    /// was full, or fds came past the message's budget and were closed on
    /// arrival).
    TooMany,
    /// A socket was attached: no command takes one (a DMA fd must be
    /// mappable, an IRQ fd an eventfd), so it was closed on arrival.
    Socket,
}

impl FdLoss {
    /// Classifies a truncation from the number of fds that did arrive in
    /// that `recvmsg` and how many the control buffer had room for.
    pub fn classify(received: usize, capacity: usize) -> FdLoss {
        if received < capacity {
            FdLoss::Exhausted
        } else {
            FdLoss::TooMany
        }
    }

    /// The positive errno for the error reply.
    pub fn errno(self) -> u32 {
        match self {
            FdLoss::Exhausted => libc::EMFILE as u32,
            FdLoss::TooMany | FdLoss::Socket => libc::EINVAL as u32,
        }
    }
}

/// What reading a message produced.
#[derive(Debug)]
pub enum Recv {
    Message(Message),
    /// EOF (or reset) from the peer; `partial` if it came mid-message.
    Closed {
        partial: bool,
    },
    /// A header whose size is below 16 or over the cap: the stream cannot
    /// be resynchronised. The header's fds have been closed.
    BadFrame(Header),
}

#[derive(Debug)]
pub enum SockError {
    /// The stop eventfd fired while waiting.
    Stopped,
    /// The peer went away while we were writing.
    PeerGone,
    /// A message began but did not finish within the deadline (its bytes
    /// and fds are dropped), or the peer did not take a reply within it:
    /// either way the stream is out of sync.
    Stalled {
        /// Bytes of the message that had arrived (0 for a reply).
        got: usize,
    },
    Io(std::io::Error),
}

impl From<Errno> for SockError {
    fn from(e: Errno) -> SockError {
        SockError::Io(e.into())
    }
}

pub struct MsgSocket {
    stream: UnixStream,
    stop: Arc<OwnedFd>,
    /// Control buffer bytes offered to `recvmsg`: room for one fd more than
    /// a message may carry, so a message with too many is told apart and
    /// the kernel never installs the rest.
    control_len: usize,
    /// Most fds one message may carry.
    max_fds: usize,
    /// How long the rest of a message may take once its first byte came,
    /// and how long a reply may wait for the peer to read it.
    deadline: Duration,
    /// Fds closed on arrival since the last [`take_refused`](Self::take_refused),
    /// whatever became of their message.
    refused: std::cell::Cell<u64>,
}

/// What has arrived of the message being read (its fds, when it is never
/// finished, go to the closer).
struct Partial {
    fds: Vec<OwnedFd>,
    fd_loss: Option<FdLoss>,
    /// Fds this message may still keep.
    budget: usize,
    /// When its first byte (or fd) arrived.
    started: Option<Instant>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        closer::close_all(self.fds.drain(..));
    }
}

impl Drop for Message {
    /// Fds nobody took (a refused message, an error before the device got
    /// them) are closed off the connection's thread.
    fn drop(&mut self) {
        closer::close_all(self.fds.drain(..));
    }
}

impl MsgSocket {
    /// A socket reading under `limits`' fds per message and deadline.
    pub fn new(
        stream: UnixStream,
        stop: Arc<OwnedFd>,
        limits: &Limits,
    ) -> std::io::Result<MsgSocket> {
        stream.set_nonblocking(true)?;
        let mut sock = MsgSocket {
            stream,
            stop,
            control_len: 0,
            max_fds: 0,
            deadline: Duration::ZERO,
            refused: std::cell::Cell::new(0),
        };
        sock.set_limits(limits.max_msg_fds, limits.message_timeout());
        Ok(sock)
    }

    /// Fds closed on arrival since the last call.
    pub fn take_refused(&self) -> u64 {
        self.refused.take()
    }

    /// Sets the most fds one message may carry and the message deadline.
    pub fn set_limits(&mut self, max_fds: usize, deadline: Duration) {
        self.max_fds = max_fds.min(SCM_MAX_FD - 1);
        self.control_len = rustix::cmsg_space!(ScmRights(self.max_fds + 1));
        self.deadline = deadline;
    }

    /// Offers `recvmsg` room for only about `n` fds, to provoke MSG_CTRUNC.
    #[cfg(test)]
    fn with_fd_room(mut self, n: usize) -> MsgSocket {
        self.control_len = rustix::cmsg_space!(ScmRights(n.min(SCM_MAX_FD)));
        self
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads one message whose total size is at most `cap`. `fd_budget`
    /// says how many fds a message with this header may carry (at most the
    /// socket's per-message limit); fds past it are closed as they arrive.
    pub fn read_message(
        &self,
        cap: u32,
        fd_budget: impl Fn(&Header) -> usize,
    ) -> Result<Recv, SockError> {
        let mut p = Partial {
            fds: Vec::new(),
            fd_loss: None,
            budget: self.max_fds,
            started: None,
        };
        let mut header = Header::default();
        if let Filled::Eof(partial) = self.read_exact(header.as_mut_bytes(), &mut p)? {
            return Ok(Recv::Closed { partial });
        }
        if (header.size as usize) < HEADER_SIZE || header.size > cap {
            return Ok(Recv::BadFrame(header));
        }
        // Now the command is known: fds it does not take go at once.
        p.budget = fd_budget(&header).min(self.max_fds);
        while p.fds.len() > p.budget {
            closer::close_all(p.fds.pop());
            self.refuse_fd(&mut p, FdLoss::TooMany);
        }
        let mut body = vec![0u8; header.size as usize - HEADER_SIZE];
        match self.read_exact(&mut body, &mut p) {
            Ok(Filled::Done) => {}
            Ok(Filled::Eof(_)) => return Ok(Recv::Closed { partial: true }),
            Err(SockError::Stalled { got }) => {
                return Err(SockError::Stalled {
                    got: got + HEADER_SIZE,
                });
            }
            Err(e) => return Err(e),
        }
        Ok(Recv::Message(Message {
            header,
            body,
            fds: std::mem::take(&mut p.fds),
            fd_loss: p.fd_loss,
        }))
    }

    /// Reads one message as [`read_message`](Self::read_message) does, but
    /// leaves it in the socket: the caller [`consume`](Self::consume)s it
    /// once its effect is recorded, so a process that dies before that
    /// leaves the whole message to its successor (the stream never loses
    /// sync). The message's fds are the kernel's copies for a peek (the
    /// consuming read closes its own). A message larger than
    /// [`PEEK_MAX`] (a migration data chunk, a large region access) cannot
    /// wait in the socket whole and is read as usual: `Peeked::consumed`.
    pub fn peek_message(
        &self,
        cap: u32,
        fd_budget: impl Fn(&Header) -> usize,
    ) -> Result<Peeked, SockError> {
        let mut header = Header::default();
        let mut started = None;
        // The header first, to learn the size.
        loop {
            // (Fds peeked with the header are copies, closed with `p`.)
            let mut p = Partial {
                fds: Vec::new(),
                fd_loss: None,
                budget: self.max_fds,
                started,
            };
            let n = self.peek_some(header.as_mut_bytes(), &mut p)?;
            if p.fd_loss.is_some() {
                return self.read_doomed(cap, fd_budget);
            }
            if n == 0 {
                return Ok(Peeked::Read(Recv::Closed {
                    partial: started.is_some(),
                }));
            }
            started.get_or_insert_with(Instant::now);
            if n == HEADER_SIZE {
                break;
            }
            self.wait_more(started)?;
        }
        if (header.size as usize) < HEADER_SIZE || header.size > cap {
            return Ok(Peeked::Read(Recv::BadFrame(header)));
        }
        if header.size as usize > PEEK_MAX {
            return Ok(Peeked::Read(self.read_message(cap, fd_budget)?));
        }
        let mut whole = vec![0u8; header.size as usize];
        loop {
            let mut p = Partial {
                fds: Vec::new(),
                fd_loss: None,
                budget: fd_budget(&header).min(self.max_fds),
                started,
            };
            let n = self.peek_some(&mut whole, &mut p)?;
            if p.fd_loss.is_some() && n < whole.len() {
                return self.read_doomed(cap, fd_budget);
            }
            if n == whole.len() {
                let body = whole.split_off(HEADER_SIZE);
                return Ok(Peeked::Peeked(Message {
                    header,
                    body,
                    fds: std::mem::take(&mut p.fds),
                    fd_loss: p.fd_loss,
                }));
            }
            if n == 0 {
                return Ok(Peeked::Read(Recv::Closed { partial: true }));
            }
            // Not all here yet: these fd copies go, the next peek brings
            // its own.
            drop(p);
            self.wait_more(started)?;
        }
    }

    /// A message whose fds already doom it (one refused: a socket, or more
    /// than it may carry) before it has all arrived is read as usual, its
    /// bytes and fds taken as they come, instead of waiting whole in the
    /// socket: a refused fd left there in flight is a reference the kernel
    /// holds for us, and when it is the VMM's own end of the connection,
    /// the VMM's close is never seen (the connection waited for its
    /// deadline). A restart in the middle of such a message leaves its
    /// successor the rest, which it refuses as a bad frame: the message
    /// was to be refused anyway.
    fn read_doomed(
        &self,
        cap: u32,
        fd_budget: impl Fn(&Header) -> usize,
    ) -> Result<Peeked, SockError> {
        Ok(Peeked::Read(self.read_message(cap, fd_budget)?))
    }

    /// Takes the `len` bytes of the message [`peek_message`](Self::peek_message)
    /// gave out of the socket, closing the fds that come with them again.
    pub fn consume(&self, len: usize) -> Result<(), SockError> {
        let mut buf = vec![0u8; len];
        let mut p = Partial {
            fds: Vec::new(),
            fd_loss: None,
            budget: self.max_fds,
            started: Some(Instant::now()),
        };
        match self.read_exact(&mut buf, &mut p)? {
            Filled::Done => Ok(()),
            Filled::Eof(_) => Err(SockError::PeerGone),
        }
    }

    /// Bytes this end sent that the peer has not read yet (SIOCOUTQ: for a
    /// UNIX socket, what waits in the peer's receive queue).
    pub fn unread_by_peer(&self) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int through the pointer, which
        // points at `n`.
        let r = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n.max(0) as usize)
    }

    /// Whether anything arrives to read within `wait` (or is there now).
    pub fn readable_within(&self, wait: Duration) -> Result<bool, SockError> {
        let mut pfd = [PollFd::new(&self.stream, PollFlags::IN)];
        let t = Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: wait.subsec_nanos() as i64,
        };
        match poll(&mut pfd, Some(&t)) {
            Ok(n) => Ok(n > 0),
            Err(Errno::INTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the message waiting whole at the head of the socket now is
    /// `h` (without waiting: a message not all here is not one a
    /// predecessor handled).
    pub fn waiting_is(&self, h: &super::keeper::Handled) -> Result<bool, SockError> {
        let mut buf = vec![0u8; h.size as usize];
        // The fds a peek brings are copies, closed with `p`.
        let mut p = Partial {
            fds: Vec::new(),
            fd_loss: None,
            budget: self.max_fds,
            started: None,
        };
        let got = self
            .try_recv(&mut buf, &mut p, RecvFlags::PEEK)?
            .unwrap_or(0);
        if got != buf.len() || got < HEADER_SIZE {
            return Ok(false);
        }
        let mut header = Header::default();
        header.as_mut_bytes().copy_from_slice(&buf[..HEADER_SIZE]);
        Ok(super::keeper::Handled::of(&header, &buf[HEADER_SIZE..]) == *h)
    }

    /// Peeks into `buf` (from the start of what is waiting); fds as
    /// [`recv_some`](Self::recv_some) takes them, into `p`.
    fn peek_some(&self, buf: &mut [u8], p: &mut Partial) -> Result<usize, SockError> {
        self.recv_flags(buf, p, RecvFlags::PEEK)
    }

    /// Waits for more of a message that has started to arrive: the socket
    /// is readable already, so poll cannot tell; short sleeps until the
    /// deadline.
    fn wait_more(&self, started: Option<Instant>) -> Result<(), SockError> {
        let since = started.unwrap_or_else(Instant::now);
        if since.elapsed() >= self.deadline {
            return Err(SockError::Stalled { got: 0 });
        }
        let mut pfd = [PollFd::from_borrowed_fd(self.stop.as_fd(), PollFlags::IN)];
        let nap = Timespec {
            tv_sec: 0,
            tv_nsec: 200_000,
        };
        match poll(&mut pfd, Some(&nap)) {
            Ok(_) if !pfd[0].revents().is_empty() => Err(SockError::Stopped),
            Ok(_) | Err(Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn refuse_fd(&self, p: &mut Partial, loss: FdLoss) {
        self.refused.set(self.refused.get() + 1);
        if loss == FdLoss::Socket {
            p.fd_loss = Some(loss);
        } else {
            p.fd_loss.get_or_insert(loss);
        }
    }

    /// Fills `buf`; past the deadline, [`SockError::Stalled`] says how
    /// much of it arrived.
    fn read_exact(&self, buf: &mut [u8], p: &mut Partial) -> Result<Filled, SockError> {
        let mut got = 0;
        while got < buf.len() {
            let n = match self.recv_some(&mut buf[got..], p) {
                Err(SockError::Stalled { .. }) => return Err(SockError::Stalled { got }),
                r => r?,
            };
            if n == 0 {
                return Ok(Filled::Eof(
                    got > 0 || !p.fds.is_empty() || p.started.is_some(),
                ));
            }
            got += n;
            p.started.get_or_insert_with(Instant::now);
        }
        Ok(Filled::Done)
    }

    fn recv_some(&self, buf: &mut [u8], p: &mut Partial) -> Result<usize, SockError> {
        self.recv_flags(buf, p, RecvFlags::empty())
    }

    fn recv_flags(
        &self,
        buf: &mut [u8],
        p: &mut Partial,
        flags: RecvFlags,
    ) -> Result<usize, SockError> {
        loop {
            match self.try_recv(buf, p, flags)? {
                Some(n) => return Ok(n),
                None => self.wait(PollFlags::IN, p.started)?,
            }
        }
    }

    /// One `recvmsg` into `buf`, fds into `p` (within its budget; others
    /// closed and counted); `None` when nothing is there now.
    fn try_recv(
        &self,
        buf: &mut [u8],
        p: &mut Partial,
        flags: RecvFlags,
    ) -> Result<Option<usize>, SockError> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
        let space = &mut space[..self.control_len];
        let capacity = fd_capacity(space.len());
        loop {
            let mut control = RecvAncillaryBuffer::new(space);
            let mut iov = [IoSliceMut::new(buf)];
            match recvmsg(
                &self.stream,
                &mut iov,
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT | flags,
            ) {
                Ok(r) => {
                    let mut arrived = 0;
                    for msg in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(rights) = msg {
                            for fd in rights {
                                arrived += 1;
                                p.started.get_or_insert_with(Instant::now);
                                if is_socket(&fd) {
                                    self.refuse_fd(p, FdLoss::Socket);
                                } else if p.fds.len() < p.budget {
                                    p.fds.push(fd);
                                    continue;
                                } else {
                                    self.refuse_fd(p, FdLoss::TooMany);
                                }
                                // A refused fd is closed, off this thread:
                                // its close may block (SO_LINGER, FUSE).
                                closer::close(fd);
                            }
                        }
                    }
                    if r.flags.contains(ReturnFlags::CTRUNC) {
                        // The kernel closed the fds it could not give us;
                        // the caller refuses the message (the first loss
                        // seen says why).
                        p.fd_loss.get_or_insert(FdLoss::classify(arrived, capacity));
                    }
                    return Ok(Some(r.bytes));
                }
                Err(Errno::AGAIN) => return Ok(None),
                Err(Errno::INTR) => {}
                Err(Errno::CONNRESET) => return Ok(Some(0)),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends `bytes` (a whole message) with `fds` attached to its first byte.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SockError> {
        let mut sent = 0;
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut big_space;
        let space: &mut [MaybeUninit<u8>] = if fds.len() <= 1 {
            &mut space
        } else {
            big_space =
                vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
            &mut big_space
        };
        let mut fds_pending = !fds.is_empty();
        // The reply's deadline runs from the first time the peer's buffer
        // is full: a reply that goes out at once costs no clock read.
        let mut started = None;
        while sent < bytes.len() {
            let mut control = SendAncillaryBuffer::new(space);
            if fds_pending && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(SockError::Io(std::io::Error::other(
                    "fd control buffer too small",
                )));
            }
            let iov = [IoSlice::new(&bytes[sent..])];
            match sendmsg(
                &self.stream,
                &iov,
                &mut control,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(n) => {
                    fds_pending = false;
                    sent += n;
                }
                Err(Errno::AGAIN) => {
                    let since = *started.get_or_insert_with(Instant::now);
                    self.wait(PollFlags::OUT, Some(since))?
                }
                Err(Errno::INTR) => {}
                Err(Errno::PIPE | Errno::CONNRESET) => return Err(SockError::PeerGone),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Blocks until the socket is ready for `what` or the stop fd fires;
    /// with `started`, at most until the deadline after it
    /// ([`SockError::Stalled`], `got` 0: the caller knows how much came).
    fn wait(&self, what: PollFlags, started: Option<Instant>) -> Result<(), SockError> {
        loop {
            let timeout = match started {
                None => None,
                Some(t) => {
                    let left = self.deadline.saturating_sub(t.elapsed());
                    if left.is_zero() {
                        return Err(SockError::Stalled { got: 0 });
                    }
                    Some(Timespec {
                        tv_sec: left.as_secs() as i64,
                        tv_nsec: left.subsec_nanos() as i64,
                    })
                }
            };
            let mut pfds = [
                PollFd::new(&self.stream, what),
                PollFd::from_borrowed_fd(self.stop.as_fd(), PollFlags::IN),
            ];
            match poll(&mut pfds, timeout.as_ref()) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if !pfds[1].revents().is_empty() {
                return Err(SockError::Stopped);
            }
            if !pfds[0].revents().is_empty() {
                // Readable, writable, or HUP/ERR: the next syscall says which.
                return Ok(());
            }
        }
    }
}

/// Largest message [`MsgSocket::peek_message`] leaves in the socket until it
/// is consumed: well inside what a UNIX stream socket holds (about 200 KiB),
/// so a peer can always finish sending it.
pub const PEEK_MAX: usize = 64 * 1024;

/// What [`MsgSocket::peek_message`] got.
pub enum Peeked {
    /// A whole message, still in the socket.
    Peeked(Message),
    /// Read and consumed as usual (too large to peek), or not a message.
    Read(Recv),
}

/// How far a read of the message got.
enum Filled {
    Done,
    /// EOF; `true` if anything of the message had arrived.
    Eof(bool),
}

/// Is `fd` a socket? (An fd we cannot stat is treated as one: refused.)
fn is_socket(fd: &OwnedFd) -> bool {
    rustix::fs::fstat(fd).map_or(true, |st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket
    })
}

/// The fewest fds the kernel can put in a control buffer of `len` bytes
/// (its `scm_max_fds`): the room after one cmsghdr, once rustix has dropped
/// up to align - 1 leading bytes to align the buffer. For our full buffer
/// that is more than SCM_MAX_FD, so there a truncation is always an
/// install failure.
fn fd_capacity(len: usize) -> usize {
    (len + 1).saturating_sub(align_of::<libc::cmsghdr>() + size_of::<libc::cmsghdr>())
        / size_of::<std::os::fd::RawFd>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (MsgSocket, UnixStream, Arc<OwnedFd>) {
        let (a, b) = UnixStream::pair().unwrap();
        let stop =
            Arc::new(rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap());
        (
            MsgSocket::new(a, stop.clone(), &Limits::default()).unwrap(),
            b,
            stop,
        )
    }

    #[test]
    fn reads_a_message_split_across_writes() {
        let (s, mut peer, _) = pair();
        let h = Header {
            id: 3,
            cmd: 9,
            size: 20,
            flags: 0,
            error: 0,
        };
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        let t = std::thread::spawn(move || {
            peer.write_all(&bytes[..5]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            peer.write_all(&bytes[5..]).unwrap();
            peer
        });
        match s.read_message(1 << 20, |_| 16).unwrap() {
            Recv::Message(m) => {
                assert_eq!(m.header, h);
                assert_eq!(m.body, [1, 2, 3, 4]);
                assert!(m.fds.is_empty());
            }
            other => panic!("{other:?}"),
        }
        drop(t.join().unwrap());
        assert!(matches!(
            s.read_message(1 << 20, |_| 16).unwrap(),
            Recv::Closed { partial: false }
        ));
    }

    #[test]
    fn bad_sizes_are_bad_frames() {
        let (s, mut peer, _) = pair();
        let h = Header {
            id: 1,
            cmd: 1,
            size: 8,
            flags: 0,
            error: 0,
        };
        peer.write_all(h.as_bytes()).unwrap();
        assert!(
            matches!(s.read_message(1 << 20, |_| 16).unwrap(), Recv::BadFrame(x) if x.size == 8)
        );
        let h = Header { size: 4096, ..h };
        peer.write_all(h.as_bytes()).unwrap();
        assert!(
            matches!(s.read_message(1024, |_| 16).unwrap(), Recv::BadFrame(x) if x.size == 4096)
        );
    }

    fn send_with_fds(peer: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) {
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        let n = sendmsg(
            peer,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
        assert_eq!(n, bytes.len());
    }

    fn memfds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap())
            .collect()
    }

    #[test]
    fn fds_that_fit_arrive_without_loss() {
        let (s, peer, _) = pair();
        let h = Header {
            id: 1,
            cmd: 2,
            size: 20,
            flags: 0,
            error: 0,
        };
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[0; 4]);
        // The buffer holds one more than a message may carry, so a message
        // within the limit is only truncated by an install failure.
        assert!(fd_capacity(s.control_len) > super::super::wire::MAX_MSG_FDS);
        send_with_fds(&peer, &bytes, &memfds(16));
        match s.read_message(1 << 20, |_| 16).unwrap() {
            Recv::Message(m) => {
                assert_eq!(m.fds.len(), 16);
                assert_eq!(m.fd_loss, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_control_data_marks_the_message_and_keeps_sync() {
        let (s, peer, _) = pair();
        let s = s.with_fd_room(1);
        let h = Header {
            id: 7,
            cmd: 2,
            size: 24,
            flags: 0,
            error: 0,
        };
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[9; 8]);
        send_with_fds(&peer, &bytes, &memfds(8));
        let next = Header { id: 8, ..h };
        let mut next_bytes = next.as_bytes().to_vec();
        next_bytes.extend_from_slice(&[1; 8]);
        send_with_fds(&peer, &next_bytes, &[]);
        match s.read_message(1 << 20, |_| 16).unwrap() {
            Recv::Message(m) => {
                assert_eq!(m.header, h);
                assert_eq!(m.body, [9; 8], "the body is consumed whole");
                assert!(m.fds.len() < 8);
                assert_eq!(m.fd_loss, Some(FdLoss::TooMany));
            }
            other => panic!("{other:?}"),
        }
        match s.read_message(1 << 20, |_| 16).unwrap() {
            Recv::Message(m) => {
                assert_eq!(m.header, next);
                assert_eq!(m.fd_loss, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncation_cause_is_told_by_what_arrived() {
        // Nothing, or fewer than the buffer holds: an install failed.
        assert_eq!(FdLoss::classify(0, 254), FdLoss::Exhausted);
        assert_eq!(FdLoss::classify(3, 254), FdLoss::Exhausted);
        assert_eq!(FdLoss::classify(2, 2), FdLoss::TooMany);
        assert_eq!(FdLoss::Exhausted.errno(), libc::EMFILE as u32);
        assert_eq!(FdLoss::TooMany.errno(), libc::EINVAL as u32);
    }

    #[test]
    fn fds_past_the_budget_and_sockets_are_closed_on_arrival() {
        let (s, peer, _) = pair();
        let h = Header {
            id: 1,
            cmd: 4,
            size: 20,
            flags: 0,
            error: 0,
        };
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[0; 4]);
        send_with_fds(&peer, &bytes, &memfds(3));
        let (sock, _other) = UnixStream::pair().unwrap();
        let mut map = Header { cmd: 2, ..h }.as_bytes().to_vec();
        map.extend_from_slice(&[0; 4]);
        send_with_fds(&peer, &map, &[OwnedFd::from(sock)]);
        let budget = |h: &Header| if h.cmd == 2 { 1 } else { 0 };
        match s.read_message(1 << 20, budget).unwrap() {
            Recv::Message(m) => {
                assert!(m.fds.is_empty());
                assert_eq!((s.take_refused(), m.fd_loss), (3, Some(FdLoss::TooMany)));
            }
            other => panic!("{other:?}"),
        }
        match s.read_message(1 << 20, budget).unwrap() {
            Recv::Message(m) => {
                assert!(m.fds.is_empty(), "a socket is never kept");
                assert_eq!((s.take_refused(), m.fd_loss), (1, Some(FdLoss::Socket)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unfinished_message_stalls_at_the_deadline_an_idle_socket_does_not() {
        let (mut s, mut peer, _) = pair();
        s.set_limits(16, std::time::Duration::from_millis(50));
        let h = Header {
            id: 1,
            cmd: 4,
            size: 32,
            flags: 0,
            error: 0,
        };
        peer.write_all(&h.as_bytes()[..5]).unwrap();
        let t = Instant::now();
        assert!(matches!(
            s.read_message(1 << 20, |_| 0),
            Err(SockError::Stalled { got: 5 })
        ));
        assert!(t.elapsed() >= Duration::from_millis(50));
        let (s, _peer, stop) = pair();
        let t = std::thread::spawn(move || s.read_message(1 << 20, |_| 0).map(|_| ()));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!t.is_finished(), "an idle connection has no deadline");
        rustix::io::write(&*stop, &1u64.to_ne_bytes()).unwrap();
        assert!(matches!(t.join().unwrap(), Err(SockError::Stopped)));
    }

    #[test]
    fn stop_fd_interrupts_a_blocked_read() {
        let (s, _peer, stop) = pair();
        let t = std::thread::spawn(move || s.read_message(1 << 20, |_| 16).map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        rustix::io::write(&*stop, &1u64.to_ne_bytes()).unwrap();
        assert!(matches!(t.join().unwrap(), Err(SockError::Stopped)));
    }
}
