//! The byte stream a migration crosses between two VM processes (`wdvirt
//! vm` and `wdvirt vm --incoming`): where it goes (`tcp:HOST:PORT`,
//! `unix:PATH`) and its frames.
//!
//! Every frame is a kind byte, a little-endian `u32` payload length (at
//! most [`MAX_FRAME`]) and the payload. The source speaks first:
//!
//! ```text
//! source                                   destination
//! HELLO magic "WDVMIG\0\0", version 1,
//!       RAM base, RAM size, page size  ->
//!                                      <-  READY (its instance connected,
//!                                          its RAM mapped) | REFUSED reason
//! COMPAT the device's PRE_COPY data    ->
//!                                      <-  ACCEPTED | REFUSED reason
//! PAGES (addr u64, len u32, bytes)*    ->  (any number, while running and
//!                                          once stopped)
//! DEVICE the rest of the device stream ->
//! GUEST  the guest CPU's state         ->
//! COMMIT                               ->
//!                                      <-  RESUMED | REFUSED reason
//! ABORT reason (at any point)          ->
//! ```
//!
//! Nothing the peer sends is trusted: a frame over the cap, of an unknown
//! kind or out of order, a page outside guest RAM, another magic or
//! version, all end the migration with an error that names them.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::transport::server::{SocketAccess, SocketFile};

/// The largest payload a frame may carry.
pub const MAX_FRAME: u32 = 64 << 20;
/// HELLO's magic.
pub const MAGIC: [u8; 8] = *b"WDVMIG\0\0";
/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// How long either side waits for the other's next frame.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Endpoint::Tcp(a.to_string()))
                }
                _ => Err(format!(
                    "'{s}': expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444"
                )),
            }
        } else if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("'{s}': expected unix:PATH"));
            }
            Ok(Endpoint::Unix(PathBuf::from(p)))
        } else {
            Err(format!(
                "'{s}': expected tcp:HOST:PORT or unix:PATH, e.g. tcp:127.0.0.1:4444"
            ))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl Endpoint {
    /// Connects (the source's side).
    pub fn connect(&self) -> io::Result<Stream> {
        let s = match self {
            Endpoint::Tcp(a) => Stream::Tcp(TcpStream::connect(a)?),
            Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        };
        s.set_timeout(Some(PATIENCE))?;
        Ok(s)
    }

    /// Listens (the destination's side). A UNIX socket is made as the
    /// transport makes its own: mode 0600, a live listener at the path
    /// refused, a stale socket file replaced, any other file left alone
    /// and refused; the file goes when the listener does.
    pub fn listen(&self) -> io::Result<Listener> {
        Ok(match self {
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
            Endpoint::Unix(p) => {
                let (l, file) =
                    SocketFile::bind(p, &SocketAccess::default()).map_err(io::Error::other)?;
                Listener::Unix(l, file)
            }
        })
    }
}

/// A listening destination.
pub enum Listener {
    Tcp(TcpListener),
    /// The socket, and its file (removed with it).
    Unix(UnixListener, SocketFile),
}

impl Listener {
    /// Makes [`Listener::accept`] return `WouldBlock` when no source waits.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l, _) => l.set_nonblocking(on),
        }
    }

    /// The next source, and who it is.
    pub fn accept(&self) -> io::Result<(Stream, String)> {
        let (s, peer) = match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                (Stream::Tcp(s), a.to_string())
            }
            Listener::Unix(l, _) => (Stream::Unix(l.accept()?.0), "a local process".into()),
        };
        s.set_timeout(Some(PATIENCE))?;
        Ok((s, peer))
    }

    /// Where it listens (the port chosen for `tcp:HOST:0`).
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Listener::Unix(l, _) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }
}

/// A frame's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Compat = 2,
    Pages = 3,
    Device = 4,
    Guest = 5,
    Commit = 6,
    Abort = 7,
    Ready = 16,
    Accepted = 17,
    Resumed = 18,
    Refused = 19,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello, Compat, Pages, Device, Guest, Commit, Abort, Ready, Accepted, Resumed, Refused,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the stream")]
    Closed,
    #[error("a frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("a {kind:?} frame of {len} bytes (at most {MAX_FRAME})")]
    TooLarge { kind: Kind, len: u32 },
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| io::Error::other(format!("a {kind:?} frame of {} bytes", payload.len())))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// The most [`read_frame`] reserves before the bytes are there.
const READ_STEP: usize = 1 << 20;

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> Result<(Kind, Vec<u8>), FrameError> {
    let mut head = [0u8; 5];
    if let Err(e) = r.read_exact(&mut head) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        });
    }
    let kind = Kind::from_u8(head[0]).ok_or(FrameError::UnknownKind(head[0]))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { kind, len });
    }
    // Grown as the bytes arrive, not allocated up front: a peer that
    // announces 64 MiB (before any HELLO was checked) and sends little
    // costs what it sent.
    let mut payload = Vec::with_capacity((len as usize).min(READ_STEP));
    r.take(u64::from(len)).read_to_end(&mut payload)?;
    if payload.len() != len as usize {
        return Err(FrameError::Closed);
    }
    Ok((kind, payload))
}

/// HELLO's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub ram_base: u64,
    pub ram_size: u64,
    pub page: u32,
}

impl Hello {
    pub const SIZE: usize = 8 + 4 + 8 + 8 + 4;

    pub fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.ram_base.to_le_bytes());
        b.extend_from_slice(&self.ram_size.to_le_bytes());
        b.extend_from_slice(&self.page.to_le_bytes());
        b
    }

    /// Another magic or size is refused here; the version is the
    /// caller's to judge.
    pub fn decode(b: &[u8]) -> Result<Hello, String> {
        if b.len() != Hello::SIZE || b[..8] != MAGIC {
            return Err("not a wdvirt migration stream (bad HELLO)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Ok(Hello {
            version: u32_at(8),
            ram_base: u64_at(12),
            ram_size: u64_at(20),
            page: u32_at(28),
        })
    }
}

/// Appends one page run to a PAGES payload.
pub fn push_pages(batch: &mut Vec<u8>, addr: u64, data: &[u8]) {
    batch.extend_from_slice(&addr.to_le_bytes());
    batch.extend_from_slice(&(data.len() as u32).to_le_bytes());
    batch.extend_from_slice(data);
}

/// The runs of a PAGES payload, or where it is malformed.
pub fn page_runs(mut b: &[u8]) -> impl Iterator<Item = Result<(u64, &[u8]), String>> {
    std::iter::from_fn(move || {
        if b.is_empty() {
            return None;
        }
        if b.len() < 12 {
            b = &[];
            return Some(Err("a PAGES run cut short in its header".into()));
        }
        let addr = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()) as usize;
        let Some(data) = b.get(12..12 + len) else {
            b = &[];
            return Some(Err(format!(
                "a PAGES run at {addr:#x} of {len} bytes cut short"
            )));
        };
        b = &b[12 + len..];
        Some(Ok((addr, data)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "unix:/run/m.sock".parse(),
            Ok(Endpoint::Unix("/run/m.sock".into()))
        );
        for bad in [
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "unix:",
            "udp:1.2.3.4:5",
            "x",
        ] {
            let e = bad.parse::<Endpoint>().unwrap_err();
            assert!(e.contains("expected"), "{bad}: {e}");
        }
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut b = Vec::new();
        write_frame(&mut b, Kind::Compat, b"abc").unwrap();
        assert_eq!(
            read_frame(&mut &b[..]).unwrap(),
            (Kind::Compat, b"abc".to_vec())
        );
        assert!(matches!(read_frame(&mut &b[..6]), Err(FrameError::Closed)));
        assert!(matches!(
            read_frame(&mut &[99u8, 0, 0, 0, 0][..]),
            Err(FrameError::UnknownKind(99))
        ));
        let mut huge = vec![Kind::Pages as u8];
        huge.extend_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(FrameError::TooLarge { .. })
        ));
        // Past what is reserved up front: read whole, or Closed when the
        // peer stops short of what it announced.
        let big: Vec<u8> = (0..(3 * READ_STEP + 7)).map(|i| i as u8).collect();
        let mut b = Vec::new();
        write_frame(&mut b, Kind::Pages, &big).unwrap();
        assert_eq!(read_frame(&mut &b[..]).unwrap(), (Kind::Pages, big));
        let mut short = vec![Kind::Pages as u8];
        short.extend_from_slice(&MAX_FRAME.to_le_bytes());
        short.extend_from_slice(&[7; 4096]);
        assert!(matches!(
            read_frame(&mut &short[..]),
            Err(FrameError::Closed)
        ));
        let h = Hello {
            version: VERSION,
            ram_base: 1 << 32,
            ram_size: 16 << 20,
            page: 4096,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Hello::decode(&bad).is_err());
        assert!(Hello::decode(&bad[..10]).is_err());
    }

    #[test]
    fn page_runs_decode_and_a_cut_run_is_an_error() {
        let mut b = Vec::new();
        push_pages(&mut b, 0x1000, &[1; 8]);
        push_pages(&mut b, 0x3000, &[2; 4]);
        let runs: Vec<_> = page_runs(&b).collect::<Result<_, _>>().unwrap();
        assert_eq!(runs, [(0x1000, &[1u8; 8][..]), (0x3000, &[2u8; 4][..])]);
        let cut: Vec<_> = page_runs(&b[..b.len() - 1]).collect();
        assert!(cut.last().unwrap().is_err());
        assert!(page_runs(&b[..5]).next().unwrap().is_err());
    }
}
