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

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use zerocopy::IntoBytes;

use super::wire::{HEADER_SIZE, Header};

/// The kernel's own per-message limit (SCM_MAX_FD): with room for this many
/// the control data is never truncated, so no fd is silently lost.
const SCM_MAX_FD: usize = 253;

/// One whole message as read from the socket.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    /// Exactly `header.size - 16` bytes.
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Some of the fds the peer attached never arrived (MSG_CTRUNC); `fds`
    /// holds only those that did. Such a message must not be served.
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
    /// The buffer was full: the peer attached more fds than we take.
    TooMany,
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
            FdLoss::TooMany => libc::EINVAL as u32,
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
    /// Control buffer bytes offered to `recvmsg` (at most room for
    /// SCM_MAX_FD fds; smaller only in tests, to provoke MSG_CTRUNC).
    control_len: usize,
}

impl MsgSocket {
    pub fn new(stream: UnixStream, stop: Arc<OwnedFd>) -> std::io::Result<MsgSocket> {
        stream.set_nonblocking(true)?;
        Ok(MsgSocket {
            stream,
            stop,
            control_len: rustix::cmsg_space!(ScmRights(SCM_MAX_FD)),
        })
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

    /// Reads one message whose total size is at most `cap`.
    pub fn read_message(&self, cap: u32) -> Result<Recv, SockError> {
        let mut fds = Vec::new();
        let mut fd_loss = None;
        let mut header = Header::default();
        if let Some(partial) = self.read_exact(header.as_mut_bytes(), &mut fds, &mut fd_loss)? {
            return Ok(Recv::Closed { partial });
        }
        if (header.size as usize) < HEADER_SIZE || header.size > cap {
            return Ok(Recv::BadFrame(header));
        }
        let mut body = vec![0u8; header.size as usize - HEADER_SIZE];
        if self
            .read_exact(&mut body, &mut fds, &mut fd_loss)?
            .is_some()
        {
            return Ok(Recv::Closed { partial: true });
        }
        Ok(Recv::Message(Message {
            header,
            body,
            fds,
            fd_loss,
        }))
    }

    /// Fills `buf`; `Some(partial)` on EOF (partial: some bytes were read).
    fn read_exact(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        fd_loss: &mut Option<FdLoss>,
    ) -> Result<Option<bool>, SockError> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.recv_some(&mut buf[got..], fds, fd_loss)?;
            if n == 0 {
                return Ok(Some(got > 0 || !fds.is_empty()));
            }
            got += n;
        }
        Ok(None)
    }

    fn recv_some(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        fd_loss: &mut Option<FdLoss>,
    ) -> Result<usize, SockError> {
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
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            ) {
                Ok(r) => {
                    let before = fds.len();
                    for msg in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(rights) = msg {
                            fds.extend(rights);
                        }
                    }
                    if r.flags.contains(ReturnFlags::CTRUNC) {
                        // The kernel closed the fds it could not give us;
                        // the caller refuses the message (the first loss
                        // seen says why).
                        fd_loss.get_or_insert(FdLoss::classify(fds.len() - before, capacity));
                    }
                    return Ok(r.bytes);
                }
                Err(Errno::AGAIN) => self.wait(PollFlags::IN)?,
                Err(Errno::INTR) => {}
                Err(Errno::CONNRESET) => return Ok(0),
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
                Err(Errno::AGAIN) => self.wait(PollFlags::OUT)?,
                Err(Errno::INTR) => {}
                Err(Errno::PIPE | Errno::CONNRESET) => return Err(SockError::PeerGone),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Blocks until the socket is ready for `what` or the stop fd fires.
    fn wait(&self, what: PollFlags) -> Result<(), SockError> {
        loop {
            let mut pfds = [
                PollFd::new(&self.stream, what),
                PollFd::from_borrowed_fd(self.stop.as_fd(), PollFlags::IN),
            ];
            match poll(&mut pfds, None) {
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
        (MsgSocket::new(a, stop.clone()).unwrap(), b, stop)
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
        match s.read_message(1 << 20).unwrap() {
            Recv::Message(m) => {
                assert_eq!(m.header, h);
                assert_eq!(m.body, [1, 2, 3, 4]);
                assert!(m.fds.is_empty());
            }
            other => panic!("{other:?}"),
        }
        drop(t.join().unwrap());
        assert!(matches!(
            s.read_message(1 << 20).unwrap(),
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
        assert!(matches!(s.read_message(1 << 20).unwrap(), Recv::BadFrame(x) if x.size == 8));
        let h = Header { size: 4096, ..h };
        peer.write_all(h.as_bytes()).unwrap();
        assert!(matches!(s.read_message(1024).unwrap(), Recv::BadFrame(x) if x.size == 4096));
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
        // The full buffer holds the kernel's maximum, so only an install
        // failure can truncate it.
        assert!(fd_capacity(s.control_len) >= SCM_MAX_FD);
        send_with_fds(&peer, &bytes, &memfds(16));
        match s.read_message(1 << 20).unwrap() {
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
        match s.read_message(1 << 20).unwrap() {
            Recv::Message(m) => {
                assert_eq!(m.header, h);
                assert_eq!(m.body, [9; 8], "the body is consumed whole");
                assert!(m.fds.len() < 8);
                assert_eq!(m.fd_loss, Some(FdLoss::TooMany));
            }
            other => panic!("{other:?}"),
        }
        match s.read_message(1 << 20).unwrap() {
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
    fn stop_fd_interrupts_a_blocked_read() {
        let (s, _peer, stop) = pair();
        let t = std::thread::spawn(move || s.read_message(1 << 20).map(|_| ()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        rustix::io::write(&*stop, &1u64.to_ne_bytes()).unwrap();
        assert!(matches!(t.join().unwrap(), Err(SockError::Stopped)));
    }
}
