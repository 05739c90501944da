//! The fd holder: a tiny process that keeps the daemon's file descriptors
//! open while the daemon is dead, and hands them to the next daemon.
//!
//! A VMM's vfio-user connection, an instance's listening socket and guest
//! memory die with the last process holding them. The daemon deposits each
//! one here under a key as it creates it; after a SIGKILL or a restart, the
//! new daemon takes them back. The holder does nothing else — one thread,
//! a map from keys to fds, no state per client but its socket — so it has
//! no reason to fail.
//!
//! # Protocol
//!
//! A `SOCK_SEQPACKET` UNIX socket (mode 0600): one request is one packet,
//! answered by one reply packet (several for `keys` and `take`). Requests
//! and replies are JSON objects tagged by `"op"`, unknown fields refused;
//! fds travel as SCM_RIGHTS on the same packet.
//!
//! | request                        | fds | reply                                      |
//! |--------------------------------|-----|--------------------------------------------|
//! | `{"op":"put","key":K}`         | 1   | `{"op":"ok"}` (an fd already under K is closed) |
//! | `{"op":"drop","prefix":P}`     | 0   | `{"op":"dropped","count":N}`               |
//! | `{"op":"keys","prefix":P}`     | 0   | `{"op":"keys","keys":[..],"more":B}` …     |
//! | `{"op":"take","prefix":P}`     | 0   | the same, each key's fd attached in order  |
//! | `{"op":"hello"}`               | 0   | `{"op":"hello","pid":..,"held":N,"version":V}` |
//! | `{"op":"quit"}`                | 0   | `{"op":"ok"}`, then the holder exits       |
//!
//! Keys are 1 to [`MAX_KEY_LEN`] bytes of `[A-Za-z0-9/._:-]` (a prefix may
//! be empty: every key). `keys` and `take` answer in key order with at most
//! [`KEYS_PER_REPLY`] keys per packet, `more` true on all but the last;
//! `take` leaves the holder its own copies. Anything malformed (bad JSON,
//! a bad key, the wrong number of fds, a packet over [`MAX_REQUEST`] bytes,
//! fds lost in transit) is answered `{"op":"error","message":..}` with its
//! fds closed, and the holder carries on; a client going away at any point
//! costs it nothing.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::ops::Bound;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// Where the daemon's holder listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/wdvirt/holder.sock";

/// The protocol's version, in the `hello` reply: a daemon restarted on a
/// newer build may find an older holder still running.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest key (and prefix), in bytes.
pub const MAX_KEY_LEN: usize = 200;

/// Most keys (and fds) in one `keys` or `take` reply packet: well under
/// the kernel's 253 fds per message, and ~13 KB of keys at most.
pub const KEYS_PER_REPLY: usize = 64;

/// Largest request packet, in bytes (a request is a few hundred).
pub const MAX_REQUEST: usize = 4096;

/// Largest reply packet a client reads ([`KEYS_PER_REPLY`] longest keys
/// need ~13 KB).
const MAX_REPLY: usize = 64 << 10;

/// Control-buffer room for a request's fds: more than any request takes,
/// so a request with two is read whole and refused for its count.
const REQUEST_FD_ROOM: usize = 8;

/// How long a client call (connect, request, every reply) may take, and
/// how long the holder waits for a client to take a reply.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`spawn`] waits for a new holder to answer `hello`.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a holder keeping nothing waits for a client before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);

/// Clients served at once; more are accepted and closed at once (the
/// daemon needs one, two while an old one dies and a new one starts).
const MAX_CLIENTS: usize = 32;

/// What went wrong talking to, or being, the holder.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// Nothing listens at the socket (no file, or a dead holder's file).
    #[error("no fd holder is running at {}", path.display())]
    NotRunning { path: PathBuf },
    /// A holder already serves this socket (a second one would orphan it).
    #[error("an fd holder is already running at {}", path.display())]
    AlreadyRunning { path: PathBuf },
    /// The holder answered the request with an error.
    #[error("the fd holder refused the request: {0}")]
    Refused(String),
    /// Making, binding or using a socket failed.
    #[error("fd holder socket: {0}")]
    Io(#[from] std::io::Error),
    /// A reply that does not answer the request (or is not a reply).
    #[error("fd holder protocol error: {0}")]
    Protocol(String),
    /// The holder did not answer in time; the connection is then unusable
    /// (a late reply would answer the next request).
    #[error("the fd holder did not answer in time")]
    Timeout,
    /// The holder [`spawn`] started exited before answering.
    #[error("the fd holder exited at start ({0}); its stderr says why")]
    Exited(std::process::ExitStatus),
}

impl From<Errno> for HolderError {
    fn from(e: Errno) -> HolderError {
        HolderError::Io(e.into())
    }
}

/// What the holder says of itself (`hello`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HolderInfo {
    /// The holder's process id.
    pub pid: u32,
    /// How many fds it holds.
    pub held: usize,
    /// Its [`PROTOCOL_VERSION`].
    pub version: u32,
}

/// A request packet. Variants without data are empty structs so that
/// `deny_unknown_fields` applies to them too.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Put { key: String },
    Drop { prefix: String },
    Keys { prefix: String },
    Take { prefix: String },
    Hello {},
    Quit {},
}

/// A reply packet.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Reply {
    Ok {},
    Dropped { count: usize },
    Keys { keys: Vec<String>, more: bool },
    Hello { pid: u32, held: usize, version: u32 },
    Error { message: String },
}

/// Checks a key (`prefix: false`) or a prefix (which may be empty).
fn check_key(key: &str, prefix: bool) -> Result<(), String> {
    let what = if prefix { "prefix" } else { "key" };
    if key.is_empty() && !prefix {
        return Err("empty key".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "{what} of {} bytes (at most {MAX_KEY_LEN})",
            key.len()
        ));
    }
    match key
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "/._:-".contains(c)))
    {
        Some(c) => Err(format!(
            "{what} {key:?} has {c:?} (only A-Z a-z 0-9 / . _ : - are allowed)"
        )),
        None => Ok(()),
    }
}

/// The holder's side: the listening socket, the fds held, the clients.
/// Dropping it closes every fd and removes its socket file (if the path
/// still names it).
pub struct Holder {
    listener: OwnedFd,
    path: PathBuf,
    /// (dev, ino) of the socket file bound here.
    ident: Option<(u64, u64)>,
    held: BTreeMap<String, OwnedFd>,
    clients: Vec<OwnedFd>,
    /// How long keeping nothing and serving nobody lasts before it exits.
    idle_exit: Duration,
}

/// What became of a client after one of its packets.
enum Outcome {
    Keep,
    Close,
    Quit,
}

impl Holder {
    /// Binds `path` (mode 0600 from its first instant, its directory
    /// created if missing). A holder already answering there is refused
    /// ([`HolderError::AlreadyRunning`]); a dead one's socket file is
    /// replaced; any other file is refused.
    pub fn bind(path: &Path) -> Result<Holder, HolderError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match HolderClient::connect(path) {
                Ok(_) | Err(HolderError::Timeout) => {
                    return Err(HolderError::AlreadyRunning {
                        path: path.to_owned(),
                    });
                }
                Err(HolderError::NotRunning { .. }) => {
                    info!("holder: replacing stale socket {}", path.display());
                    std::fs::remove_file(path)?;
                }
                Err(e) => return Err(e),
            },
            Ok(_) => {
                return Err(HolderError::Io(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        // Linux gives a socket file its socket's mode (less the umask): set
        // before bind, no one else can ever connect (transport::server does
        // the same).
        rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o600))?;
        match rustix::net::bind(&fd, &SocketAddrUnix::new(path)?) {
            Ok(()) => {}
            // Another holder bound it since we looked.
            Err(Errno::ADDRINUSE) => {
                return Err(HolderError::AlreadyRunning {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let ident = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        // From here on, dropping the holder removes the file.
        let holder = Holder {
            listener: fd,
            path: path.to_owned(),
            ident,
            held: BTreeMap::new(),
            clients: Vec::new(),
            idle_exit: IDLE_EXIT,
        };
        rustix::net::listen(&holder.listener, 16)?;
        Ok(holder)
    }

    /// The holder's whole life, as `wdvirt holder` runs it: binds `path`
    /// ([`bind`](Holder::bind)) and serves until a client sends `quit` or
    /// the process gets SIGTERM or SIGINT (then `Ok`); every held fd is
    /// closed and the socket file removed on the way out. A client's
    /// departure never ends it.
    pub fn serve(path: &Path) -> Result<(), HolderError> {
        Holder::serve_idle(path, IDLE_EXIT)
    }

    /// [`serve`](Self::serve), ending after `idle_exit` keeping nothing and
    /// serving nobody.
    pub fn serve_idle(path: &Path, idle_exit: Duration) -> Result<(), HolderError> {
        let mut holder = Holder::bind(path)?;
        holder.idle_exit = idle_exit;
        // Signals write a byte to `alarm`; `wake` sits in the poll set.
        let (wake, alarm) = std::os::unix::net::UnixStream::pair()?;
        let mut ids = Vec::new();
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            ids.push(signal_hook::low_level::pipe::register(
                sig,
                alarm.try_clone()?,
            )?);
        }
        info!("holder: serving {}", path.display());
        let r = holder.run_until(Some(wake.as_fd()));
        for id in ids {
            signal_hook::low_level::unregister(id);
        }
        r
    }

    /// Serves until a client sends `quit` (signals are left alone: for a
    /// holder inside another process, as the tests run it).
    pub fn run(self) -> Result<(), HolderError> {
        self.run_until(None)
    }

    /// One thread, one `poll` over the listener, the clients and `stop`.
    /// A holder that keeps nothing and serves nobody for [`IDLE_EXIT`]
    /// ends by itself: its daemon is gone and left nothing to take over.
    fn run_until(mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), HolderError> {
        loop {
            let idle = self.held.is_empty() && self.clients.is_empty();
            let timeout = idle.then(|| Timespec {
                tv_sec: self.idle_exit.as_secs() as i64,
                tv_nsec: self.idle_exit.subsec_nanos() as i64,
            });
            let ready: Vec<bool> = {
                let mut pfds = Vec::with_capacity(self.clients.len() + 2);
                pfds.push(PollFd::new(&self.listener, PollFlags::IN));
                pfds.extend(self.clients.iter().map(|c| PollFd::new(c, PollFlags::IN)));
                if let Some(stop) = stop {
                    pfds.push(PollFd::from_borrowed_fd(stop, PollFlags::IN));
                }
                match poll(&mut pfds, timeout.as_ref()) {
                    Ok(0) if idle => {
                        info!(
                            "holder: nothing kept and nobody connected for {:?}: exiting",
                            self.idle_exit
                        );
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                pfds.iter().map(|p| !p.revents().is_empty()).collect()
            };
            if stop.is_some() && ready[ready.len() - 1] {
                info!("holder: signalled, closing {} fds", self.held.len());
                return Ok(());
            }
            let mut closed = Vec::new();
            for i in 0..self.clients.len() {
                if !ready[i + 1] {
                    continue;
                }
                match serve_packet(&mut self.held, self.clients[i].as_fd()) {
                    Outcome::Keep => {}
                    Outcome::Close => closed.push(i),
                    Outcome::Quit => {
                        info!("holder: quit, closing {} fds", self.held.len());
                        return Ok(());
                    }
                }
            }
            for i in closed.into_iter().rev() {
                self.clients.remove(i);
            }
            if ready[0] {
                self.accept();
            }
        }
    }

    fn accept(&mut self) {
        match rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK)
        {
            Ok(c) if self.clients.len() < MAX_CLIENTS => self.clients.push(c),
            Ok(_) => warn!("holder: {MAX_CLIENTS} clients already, one refused"),
            Err(Errno::AGAIN | Errno::INTR | Errno::CONNABORTED) => {}
            Err(e) => {
                // Out of fds, most likely: the client waits in the backlog;
                // do not spin on the still-readable listener.
                warn!("holder: cannot accept a client: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.ident {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads one packet from `client` and answers it.
fn serve_packet(held: &mut BTreeMap<String, OwnedFd>, client: BorrowedFd<'_>) -> Outcome {
    let mut buf = [0u8; MAX_REQUEST];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(REQUEST_FD_ROOM))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = match rustix::net::recvmsg(
        client,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    ) {
        Ok(got) => got,
        Err(Errno::AGAIN | Errno::INTR) => return Outcome::Keep,
        Err(_) => return Outcome::Close,
    };
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got.bytes == 0 && fds.is_empty() && !got.flags.contains(ReturnFlags::TRUNC) {
        return Outcome::Close; // EOF (or an empty packet: as good as a goodbye)
    }
    let request = if got.flags.contains(ReturnFlags::CTRUNC) {
        Err(format!(
            "fds lost in transit (over {REQUEST_FD_ROOM} attached, or the holder is out of fds)"
        ))
    } else if got.flags.contains(ReturnFlags::TRUNC) {
        Err(format!("request over {MAX_REQUEST} bytes"))
    } else {
        serde_json::from_slice::<Request>(&buf[..got.bytes])
            .map_err(|e| format!("bad request: {e}"))
    };
    let request = request.and_then(|r| {
        let want = usize::from(matches!(r, Request::Put { .. }));
        if fds.len() != want {
            return Err(format!(
                "{r:?} takes {want} fd(s), {} came with it",
                fds.len()
            ));
        }
        match &r {
            Request::Put { key } => check_key(key, false)?,
            Request::Drop { prefix } | Request::Keys { prefix } | Request::Take { prefix } => {
                check_key(prefix, true)?
            }
            Request::Hello {} | Request::Quit {} => {}
        }
        Ok(r)
    });
    let request = match request {
        Ok(r) => r,
        Err(message) => {
            // Closed before the reply, so a client that sees it knows.
            drop(fds);
            warn!("holder: refused a request: {message}");
            return reply(client, &Reply::Error { message }, &[]);
        }
    };
    let answer = match request {
        Request::Put { key } => {
            debug!("holder: put {key}");
            // An fd already under the key is closed here.
            held.insert(key, fds.pop().expect("one fd, checked above"));
            Reply::Ok {}
        }
        Request::Drop { prefix } => {
            let before = held.len();
            held.retain(|k, _| !k.starts_with(&prefix));
            let count = before - held.len();
            debug!("holder: dropped {count} under {prefix:?}");
            Reply::Dropped { count }
        }
        Request::Keys { prefix } => return send_keys(held, client, &prefix, false),
        Request::Take { prefix } => return send_keys(held, client, &prefix, true),
        Request::Hello {} => Reply::Hello {
            pid: rustix::process::getpid().as_raw_nonzero().get() as u32,
            held: held.len(),
            version: PROTOCOL_VERSION,
        },
        Request::Quit {} => {
            let _ = send_packet(client, &encode(&Reply::Ok {}), &[], deadline());
            return Outcome::Quit;
        }
    };
    reply(client, &answer, &[])
}

/// Answers `keys`/`take`: the keys under `prefix` in order, in packets of
/// at most [`KEYS_PER_REPLY`], with their fds if `with_fds`.
fn send_keys(
    held: &BTreeMap<String, OwnedFd>,
    client: BorrowedFd<'_>,
    prefix: &str,
    with_fds: bool,
) -> Outcome {
    // Keys under a prefix sort together, from the prefix itself on.
    let under: Vec<(&String, &OwnedFd)> = held
        .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(|(k, _)| k.starts_with(prefix))
        .collect();
    debug!(
        "holder: {} {} under {prefix:?}",
        if with_fds { "take" } else { "keys" },
        under.len()
    );
    let mut chunks = under.chunks(KEYS_PER_REPLY).peekable();
    if chunks.peek().is_none() {
        let empty = Reply::Keys {
            keys: Vec::new(),
            more: false,
        };
        return reply(client, &empty, &[]);
    }
    while let Some(chunk) = chunks.next() {
        let keys = chunk.iter().map(|(k, _)| (*k).clone()).collect();
        let fds: Vec<BorrowedFd<'_>> = if with_fds {
            chunk.iter().map(|(_, fd)| fd.as_fd()).collect()
        } else {
            Vec::new()
        };
        let more = chunks.peek().is_some();
        if let Outcome::Close = reply(client, &Reply::Keys { keys, more }, &fds) {
            return Outcome::Close;
        }
    }
    Outcome::Keep
}

/// Sends one reply; a client that does not take it within
/// [`CALL_TIMEOUT`] (or is gone) is dropped.
fn reply(client: BorrowedFd<'_>, r: &Reply, fds: &[BorrowedFd<'_>]) -> Outcome {
    match send_packet(client, &encode(r), fds, deadline()) {
        Ok(()) => Outcome::Keep,
        Err(e) => {
            debug!("holder: dropping a client: {e}");
            Outcome::Close
        }
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("requests and replies always serialise")
}

fn deadline() -> Instant {
    Instant::now() + CALL_TIMEOUT
}

/// Sends one packet with `fds` attached, waiting for room until `deadline`.
fn send_packet(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Instant,
) -> Result<(), HolderError> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    loop {
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(HolderError::Protocol("fd control buffer too small".into()));
        }
        // A SEQPACKET send is all or nothing.
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::AGAIN) => wait(sock, PollFlags::OUT, deadline)?,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until `sock` is ready for `what` (or has hung up), at most until
/// `deadline`.
fn wait(sock: BorrowedFd<'_>, what: PollFlags, deadline: Instant) -> Result<(), HolderError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HolderError::Timeout);
        }
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut pfd = [PollFd::from_borrowed_fd(sock, what)];
        match poll(&mut pfd, Some(&timeout)) {
            Ok(_) if !pfd[0].revents().is_empty() => return Ok(()),
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The daemon's side: one connection to the holder. Every call waits at
/// most [`CALL_TIMEOUT`] per packet, so a wedged holder cannot hang the
/// daemon; after a timeout or a protocol error the connection refuses
/// further calls (connect again).
pub struct HolderClient {
    sock: OwnedFd,
    /// Set by a failure that may leave a reply in flight.
    broken: bool,
}

impl HolderClient {
    /// Connects to the holder at `path`: [`HolderError::NotRunning`] if no
    /// socket is there or nobody listens on it.
    pub fn connect(path: &Path) -> Result<HolderClient, HolderError> {
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        let addr = SocketAddrUnix::new(path)?;
        let deadline = deadline();
        loop {
            match rustix::net::connect(&sock, &addr) {
                Ok(()) => break,
                Err(Errno::NOENT | Errno::CONNREFUSED) => {
                    return Err(HolderError::NotRunning {
                        path: path.to_owned(),
                    });
                }
                // The holder's backlog is full: it is not accepting.
                Err(Errno::AGAIN) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(Errno::AGAIN) => return Err(HolderError::Timeout),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(HolderClient {
            sock,
            broken: false,
        })
    }

    /// Asks the holder who it is and how many fds it holds.
    pub fn hello(&mut self) -> Result<HolderInfo, HolderError> {
        self.call(|c| match c.exchange(&Request::Hello {}, &[])? {
            (Reply::Hello { pid, held, version }, fds) if fds.is_empty() => {
                Ok(HolderInfo { pid, held, version })
            }
            other => Err(unexpected(other)),
        })
    }

    /// Deposits `fd` under `key` (1 to [`MAX_KEY_LEN`] bytes of
    /// `[A-Za-z0-9/._:-]`); an fd already under `key` is closed. The
    /// holder keeps its own copy: the caller may close `fd`.
    pub fn put(&mut self, key: &str, fd: BorrowedFd<'_>) -> Result<(), HolderError> {
        let request = Request::Put { key: key.into() };
        self.call(|c| match c.exchange(&request, &[fd])? {
            (Reply::Ok {}, fds) if fds.is_empty() => Ok(()),
            other => Err(unexpected(other)),
        })
    }

    /// Closes every held fd whose key starts with `prefix`; how many.
    pub fn drop_prefix(&mut self, prefix: &str) -> Result<usize, HolderError> {
        let request = Request::Drop {
            prefix: prefix.into(),
        };
        self.call(|c| match c.exchange(&request, &[])? {
            (Reply::Dropped { count }, fds) if fds.is_empty() => Ok(count),
            other => Err(unexpected(other)),
        })
    }

    /// The keys held under `prefix`, sorted.
    pub fn keys(&mut self, prefix: &str) -> Result<Vec<String>, HolderError> {
        let request = Request::Keys {
            prefix: prefix.into(),
        };
        let all = self.call(|c| c.listing(&request, false))?;
        Ok(all.into_iter().map(|(k, _)| k).collect())
    }

    /// The keys held under `prefix`, sorted, each with a copy of its fd
    /// (the holder keeps its own: [`drop_prefix`](Self::drop_prefix) once
    /// they are no longer needed across a restart).
    pub fn take(&mut self, prefix: &str) -> Result<Vec<(String, OwnedFd)>, HolderError> {
        let request = Request::Take {
            prefix: prefix.into(),
        };
        let all = self.call(|c| c.listing(&request, true))?;
        Ok(all
            .into_iter()
            .map(|(k, fd)| (k, fd.expect("take brings an fd per key")))
            .collect())
    }

    /// Tells the holder to close everything and exit (once this returns,
    /// it has answered and is on its way out).
    pub fn quit(mut self) -> Result<(), HolderError> {
        self.call(|c| match c.exchange(&Request::Quit {}, &[])? {
            (Reply::Ok {}, fds) if fds.is_empty() => Ok(()),
            other => Err(unexpected(other)),
        })
    }

    /// Runs one call, marking the connection broken on any failure but a
    /// clean refusal.
    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut HolderClient) -> Result<T, HolderError>,
    ) -> Result<T, HolderError> {
        if self.broken {
            return Err(HolderError::Protocol(
                "connection unusable after an earlier failure; connect again".into(),
            ));
        }
        let r = f(self);
        if matches!(r, Err(ref e) if !matches!(e, HolderError::Refused(_))) {
            self.broken = true;
        }
        r
    }

    /// Sends `request` and reads its (first) reply.
    fn exchange(
        &mut self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Reply, Vec<OwnedFd>), HolderError> {
        send_packet(self.sock.as_fd(), &encode(request), fds, deadline())?;
        self.receive()
    }

    /// The replies of `keys`/`take`, until one says no `more`.
    fn listing(
        &mut self,
        request: &Request,
        with_fds: bool,
    ) -> Result<Vec<(String, Option<OwnedFd>)>, HolderError> {
        let mut all = Vec::new();
        let mut next = self.exchange(request, &[])?;
        loop {
            let (Reply::Keys { keys, more }, fds) = next else {
                return Err(unexpected(next));
            };
            if fds.len() != if with_fds { keys.len() } else { 0 } {
                return Err(HolderError::Protocol(format!(
                    "{} keys came with {} fds",
                    keys.len(),
                    fds.len()
                )));
            }
            if with_fds {
                all.extend(keys.into_iter().zip(fds.into_iter().map(Some)));
            } else {
                all.extend(keys.into_iter().map(|k| (k, None)));
            }
            if !more {
                return Ok(all);
            }
            next = self.receive()?;
        }
    }

    /// Reads one reply packet; an error reply is [`HolderError::Refused`].
    fn receive(&mut self) -> Result<(Reply, Vec<OwnedFd>), HolderError> {
        let deadline = deadline();
        let mut buf = vec![0u8; MAX_REPLY];
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(KEYS_PER_REPLY))];
        loop {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = match rustix::net::recvmsg(
                &self.sock,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            ) {
                Ok(got) => got,
                Err(Errno::AGAIN) => {
                    wait(self.sock.as_fd(), PollFlags::IN, deadline)?;
                    continue;
                }
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut fds = Vec::new();
            for msg in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = msg {
                    fds.extend(rights);
                }
            }
            if got.flags.contains(ReturnFlags::CTRUNC) {
                return Err(HolderError::Protocol(
                    "fds of the reply were lost (is this process out of fds?)".into(),
                ));
            }
            if got.flags.contains(ReturnFlags::TRUNC) {
                return Err(HolderError::Protocol(format!(
                    "reply over {MAX_REPLY} bytes"
                )));
            }
            if got.bytes == 0 {
                return Err(HolderError::Protocol(
                    "the holder closed the connection".into(),
                ));
            }
            return match serde_json::from_slice(&buf[..got.bytes]) {
                Ok(Reply::Error { message }) => Err(HolderError::Refused(message)),
                Ok(reply) => Ok((reply, fds)),
                Err(e) => Err(HolderError::Protocol(format!("bad reply: {e}"))),
            };
        }
    }
}

fn unexpected((reply, fds): (Reply, Vec<OwnedFd>)) -> HolderError {
    HolderError::Protocol(format!("unexpected reply {reply:?} with {} fds", fds.len()))
}

/// Starts `exe holder --socket SOCKET` as a detached process (its own
/// session, stdin and stdout /dev/null, stderr appended to SOCKET with the
/// extension `.log`) and waits until it answers `hello`, at most 3 s;
/// returns its pid. A holder already answering at `socket` is
/// [`HolderError::AlreadyRunning`]; one that exits at start is
/// [`HolderError::Exited`] (its log says why).
///
/// No zombie: a thread of this process waits for the holder, so a holder
/// that exits while this process lives is reaped at once; when this
/// process dies first, the holder is reparented to init (or the nearest
/// subreaper), which reaps it. (A double fork would save the thread but
/// lose the pid and the early exit status.) The thread is idle in
/// `waitpid` meanwhile.
pub fn spawn(exe: &Path, socket: &Path) -> Result<u32, HolderError> {
    use std::os::unix::process::CommandExt;
    match HolderClient::connect(socket) {
        Ok(_) => {
            return Err(HolderError::AlreadyRunning {
                path: socket.to_owned(),
            });
        }
        Err(HolderError::NotRunning { .. }) => {}
        Err(e) => return Err(e),
    }
    let mut cmd = std::process::Command::new(exe);
    // Not this process's stdout and stderr: whoever reads them (a pipe, a
    // terminal) would never see them close while the holder lives. Its
    // few lines go to a log beside its socket.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(socket.with_extension("log"))
        .map(std::process::Stdio::from)
        .unwrap_or_else(|_| std::process::Stdio::null());
    cmd.arg("holder")
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // Runs in the forked child before exec: async-signal-safe system calls
    // only, no heap (an io::Error from an errno does not allocate).
    let detach = || -> std::io::Result<()> {
        rustix::process::setsid()?;
        // An fd this process forgot to make CLOEXEC (a library's) must not
        // live on in the holder: a VMM connection would never close. Best
        // effort: close_range is Linux 5.11+; exec then closes them.
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets fd flags;
        // it touches no memory.
        let _ = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        Ok(())
    };
    // SAFETY: `detach` is async-signal-safe (above), as a closure run
    // between fork and exec must be.
    unsafe {
        cmd.pre_exec(detach);
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let deadline = Instant::now() + SPAWN_TIMEOUT;
    let result = loop {
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => break Err(HolderError::Exited(status)),
            Err(e) => break Err(e.into()),
        }
        match HolderClient::connect(socket).and_then(|mut c| c.hello()) {
            Ok(info) if info.pid == pid => break Ok(pid),
            // Another holder won a race for the path; ours exits by itself.
            Ok(_) => {
                break Err(HolderError::AlreadyRunning {
                    path: socket.to_owned(),
                });
            }
            Err(HolderError::NotRunning { .. }) => {}
            Err(e) => break Err(e),
        }
        if Instant::now() >= deadline {
            break Err(HolderError::Timeout);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if result.is_err() {
        // Holding nothing yet, a holder that did not answer is no loss.
        let _ = child.kill();
    }
    let reaper = std::thread::Builder::new()
        .name("holder-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = reaper {
        warn!("holder: no thread to reap pid {pid} (it stays a zombie if it exits first): {e}");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::thread::JoinHandle;

    /// A holder served on a thread in a fresh directory.
    struct Rig {
        _dir: tempfile::TempDir,
        path: PathBuf,
        served: Option<JoinHandle<Result<(), HolderError>>>,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("h.sock");
            let holder = Holder::bind(&path).unwrap();
            Rig {
                _dir: dir,
                path,
                served: Some(std::thread::spawn(move || holder.run())),
            }
        }

        fn client(&self) -> HolderClient {
            HolderClient::connect(&self.path).unwrap()
        }

        /// Quits the holder; `run` must return `Ok`.
        fn quit(mut self) {
            self.client().quit().unwrap();
            self.served.take().unwrap().join().unwrap().unwrap();
        }
    }

    fn memfd(content: &[u8]) -> OwnedFd {
        let fd = rustix::fs::memfd_create("holder-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        std::fs::File::from(fd.try_clone().unwrap())
            .write_all_at(content, 0)
            .unwrap();
        fd
    }

    fn content(fd: &OwnedFd) -> Vec<u8> {
        let f = std::fs::File::from(fd.try_clone().unwrap());
        let mut buf = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    /// Is any read end of the pipe whose write end is `w` still open
    /// (ours closed)? A write with none left fails with EPIPE (SIGPIPE is
    /// ignored in Rust programs).
    fn has_reader(w: &OwnedFd) -> bool {
        match rustix::io::write(w, b"x") {
            Ok(_) => true,
            Err(Errno::PIPE) => false,
            Err(e) => panic!("pipe write: {e}"),
        }
    }

    /// Sends raw bytes (and fds) on a fresh connection; the raw reply.
    fn raw(path: &Path, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Reply {
        let mut c = HolderClient::connect(path).unwrap();
        send_packet(c.sock.as_fd(), bytes, fds, deadline()).unwrap();
        match c.receive() {
            Ok((reply, _)) => reply,
            Err(HolderError::Refused(message)) => Reply::Error { message },
            Err(e) => panic!("{e}"),
        }
    }

    fn refused(reply: Reply, needle: &str) {
        match reply {
            Reply::Error { message } => assert!(message.contains(needle), "{message}"),
            other => panic!("expected an error containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn an_fd_put_by_one_connection_is_taken_back_by_another() {
        let rig = Rig::new();
        let mut a = rig.client();
        let mem = memfd(b"guest memory");
        a.put("vm1/mem0", mem.as_fd()).unwrap();
        drop(mem);
        let mut b = rig.client();
        let taken = b.take("vm1/").unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, "vm1/mem0");
        assert_eq!(content(&taken[0].1), b"guest memory");
        // The holder kept its own copy.
        let again = b.take("vm1/mem0").unwrap();
        assert_eq!(content(&again[0].1), b"guest memory");
        let info = b.hello().unwrap();
        assert_eq!(info.held, 1);
        assert_eq!(info.version, PROTOCOL_VERSION);
        assert_eq!(info.pid, std::process::id());
        rig.quit();
    }

    #[test]
    fn a_put_under_a_held_key_replaces_and_closes_the_old_fd() {
        let rig = Rig::new();
        let mut c = rig.client();
        let (r, w) = rustix::pipe::pipe().unwrap();
        c.put("k", r.as_fd()).unwrap();
        drop(r);
        assert!(has_reader(&w), "the holder holds the read end");
        c.put("k", memfd(b"new").as_fd()).unwrap();
        assert!(!has_reader(&w), "the replaced read end was closed");
        let taken = c.take("k").unwrap();
        assert_eq!(content(&taken[0].1), b"new");
        assert_eq!(c.hello().unwrap().held, 1);
        rig.quit();
    }

    #[test]
    fn drop_closes_every_fd_under_the_prefix_and_counts_them() {
        let rig = Rig::new();
        let mut c = rig.client();
        let (r, w) = rustix::pipe::pipe().unwrap();
        for key in ["vm1/a", "vm1/b", "vm10/a", "vm2/a"] {
            c.put(key, r.as_fd()).unwrap();
        }
        drop(r);
        assert_eq!(c.drop_prefix("vm1/").unwrap(), 2);
        assert_eq!(c.keys("").unwrap(), ["vm10/a", "vm2/a"]);
        assert_eq!(c.drop_prefix("vm1/").unwrap(), 0);
        assert!(has_reader(&w));
        assert_eq!(c.drop_prefix("").unwrap(), 2);
        assert!(!has_reader(&w), "every copy closed");
        rig.quit();
    }

    #[test]
    fn keys_are_sorted_and_only_those_under_the_prefix() {
        let rig = Rig::new();
        let mut c = rig.client();
        let fd = memfd(b"");
        for key in ["b/2", "a/1", "b/10", "b/1", "c", "b"] {
            c.put(key, fd.as_fd()).unwrap();
        }
        assert_eq!(c.keys("b/").unwrap(), ["b/1", "b/10", "b/2"]);
        assert_eq!(c.keys("b").unwrap(), ["b", "b/1", "b/10", "b/2"]);
        assert_eq!(c.keys("").unwrap(), ["a/1", "b", "b/1", "b/10", "b/2", "c"]);
        assert!(c.keys("d").unwrap().is_empty());
        assert!(c.take("d").unwrap().is_empty());
        rig.quit();
    }

    #[test]
    fn a_take_of_150_fds_spans_several_replies_and_pairs_each_key_with_its_fd() {
        let _ = crate::transport::raise_fd_limit();
        let rig = Rig::new();
        let mut c = rig.client();
        for i in 0..150 {
            c.put(
                &format!("inst/{i:03}"),
                memfd(format!("{i}").as_bytes()).as_fd(),
            )
            .unwrap();
        }
        assert_eq!(c.keys("inst/").unwrap().len(), 150);
        let taken = c.take("inst/").unwrap();
        assert_eq!(taken.len(), 150);
        for (i, (key, fd)) in taken.iter().enumerate() {
            assert_eq!(key, &format!("inst/{i:03}"));
            assert_eq!(content(fd), format!("{i}").as_bytes());
        }
        // The connection is in step after the multi-packet reply.
        assert_eq!(c.hello().unwrap().held, 150);
        rig.quit();
    }

    #[test]
    fn malformed_requests_are_refused_and_the_holder_carries_on() {
        let rig = Rig::new();
        let fd = memfd(b"x");
        refused(raw(&rig.path, b"{not json", &[]), "bad request");
        refused(raw(&rig.path, br#"{"op":"steal"}"#, &[]), "unknown variant");
        refused(
            raw(&rig.path, br#"{"op":"hello","extra":1}"#, &[]),
            "unknown field",
        );
        refused(
            raw(&rig.path, br#"{"op":"keys","prefix":"a","x":1}"#, &[]),
            "unknown field",
        );
        refused(
            raw(&rig.path, br#"{"op":"put","key":"a b"}"#, &[fd.as_fd()]),
            "only A-Z",
        );
        let long = format!(r#"{{"op":"put","key":"{}"}}"#, "k".repeat(MAX_KEY_LEN + 1));
        refused(
            raw(&rig.path, long.as_bytes(), &[fd.as_fd()]),
            "at most 200",
        );
        refused(
            raw(&rig.path, br#"{"op":"put","key":""}"#, &[fd.as_fd()]),
            "empty key",
        );
        refused(
            raw(&rig.path, br#"{"op":"put","key":"a"}"#, &[]),
            "takes 1 fd",
        );
        refused(
            raw(&rig.path, br#"{"op":"hello"}"#, &[fd.as_fd()]),
            "takes 0 fd",
        );
        let big = vec![b' '; MAX_REQUEST + 1];
        refused(raw(&rig.path, &big, &[]), "over 4096 bytes");
        // More than the request control buffer holds (its room, plus up to
        // two slots of rustix's alignment slack): MSG_CTRUNC.
        let many: Vec<_> = (0..REQUEST_FD_ROOM + 3).map(|_| fd.as_fd()).collect();
        refused(
            raw(&rig.path, br#"{"op":"hello"}"#, &many),
            "fds lost in transit",
        );
        // Through the client API, a refusal leaves the connection usable.
        let mut c = rig.client();
        assert!(matches!(
            c.put("no spaces", fd.as_fd()),
            Err(HolderError::Refused(_))
        ));
        assert_eq!(c.hello().unwrap().held, 0);
        rig.quit();
    }

    #[test]
    fn a_put_with_two_fds_is_refused_and_both_are_closed() {
        let rig = Rig::new();
        let (r, w) = rustix::pipe::pipe().unwrap();
        let reply = raw(
            &rig.path,
            br#"{"op":"put","key":"two"}"#,
            &[r.as_fd(), r.as_fd()],
        );
        refused(reply, "2 came");
        drop(r);
        // The holder had two copies of the read end: none is left.
        assert!(!has_reader(&w));
        assert!(rig.client().keys("").unwrap().is_empty());
        rig.quit();
    }

    #[test]
    fn held_fds_outlive_the_connection_that_put_them() {
        let rig = Rig::new();
        let (r, w) = rustix::pipe::pipe().unwrap();
        let mut c = rig.client();
        c.put("pipe", r.as_fd()).unwrap();
        drop(c);
        drop(r);
        assert!(has_reader(&w), "the holder still holds the read end");
        let taken = rig.client().take("pipe").unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(rustix::io::read(&taken[0].1, &mut byte), Ok(1));
        assert_eq!(&byte, b"x");
        rig.quit();
    }

    #[test]
    fn several_clients_are_served_at_once_and_a_vanishing_one_harms_nothing() {
        let rig = Rig::new();
        let mut old = rig.client();
        let mut new = rig.client();
        old.put("a", memfd(b"a").as_fd()).unwrap();
        assert_eq!(new.keys("").unwrap(), ["a"]);
        old.put("b", memfd(b"b").as_fd()).unwrap();
        assert_eq!(new.keys("").unwrap(), ["a", "b"]);
        // One asks for everything and leaves without reading a reply.
        let gone = HolderClient::connect(&rig.path).unwrap();
        let take = encode(&Request::Take { prefix: "".into() });
        send_packet(gone.sock.as_fd(), &take, &[], deadline()).unwrap();
        drop(gone);
        // One leaves in the middle of sending nothing at all.
        drop(HolderClient::connect(&rig.path).unwrap());
        assert_eq!(old.hello().unwrap().held, 2);
        assert_eq!(content(&new.take("b").unwrap()[0].1), b"b");
        rig.quit();
    }

    #[test]
    fn quit_ends_run_closes_everything_and_removes_the_socket() {
        let mut rig = Rig::new();
        let (r, w) = rustix::pipe::pipe().unwrap();
        rig.client().put("k", r.as_fd()).unwrap();
        drop(r);
        rig.client().quit().unwrap();
        rig.served.take().unwrap().join().unwrap().unwrap();
        assert!(!has_reader(&w), "held fds closed");
        assert!(!rig.path.exists(), "socket file removed");
        assert!(matches!(
            HolderClient::connect(&rig.path),
            Err(HolderError::NotRunning { .. })
        ));
    }

    #[test]
    fn bind_refuses_a_live_holder_and_replaces_a_dead_ones_socket() {
        let rig = Rig::new();
        assert!(matches!(
            Holder::bind(&rig.path),
            Err(HolderError::AlreadyRunning { .. })
        ));
        // Still serving after the probe connection.
        assert_eq!(rig.client().hello().unwrap().held, 0);
        rig.quit();

        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        assert!(matches!(
            HolderClient::connect(&stale),
            Err(HolderError::NotRunning { .. })
        ));
        drop(Holder::bind(&stale).unwrap());
        assert!(!stale.exists(), "the holder's own file removed on drop");

        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(Holder::bind(&file), Err(HolderError::Io(_))));
        assert!(file.exists(), "another file left alone");
        assert!(matches!(
            HolderClient::connect(&dir.path().join("none.sock")),
            Err(HolderError::NotRunning { .. })
        ));
    }

    #[test]
    fn spawn_reports_a_holder_that_exits_at_start_or_cannot_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        // `false holder --socket PATH` exits 1 at once.
        match spawn(Path::new("false"), &path) {
            Err(HolderError::Exited(status)) => assert_eq!(status.code(), Some(1)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            spawn(&dir.path().join("no-such-exe"), &path),
            Err(HolderError::Io(_))
        ));
    }

    #[test]
    fn a_holder_that_never_answers_times_out_and_the_connection_is_then_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wedged.sock");
        // Bound and listening, never accepting: connect succeeds (backlog),
        // no reply ever comes.
        let wedged = Holder::bind(&path).unwrap();
        let mut c = HolderClient::connect(&path).unwrap();
        let start = Instant::now();
        assert!(matches!(c.hello(), Err(HolderError::Timeout)));
        let took = start.elapsed();
        assert!(took >= CALL_TIMEOUT && took < CALL_TIMEOUT * 2, "{took:?}");
        assert!(matches!(c.hello(), Err(HolderError::Protocol(_))));
        drop(wedged);
    }
}
