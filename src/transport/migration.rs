//! One connection's side of VFIO migration v2 (vfio-user
//! "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE", "VFIO_USER_MIG_DATA_READ/WRITE",
//! "VFIO_DEVICE_FEATURE_DMA_LOGGING_*"): the state machine's current state,
//! the stream being read out or written in, and whether DMA logging is on.
//!
//! It knows nothing of the wire: [`super::session`] decodes the messages and
//! calls it; the daemon could drive a device through it the same way. Each
//! arc the state machine ([`crate::migration::fsm`]) takes calls the one
//! [`Migratable`] method it needs:
//!
//! | arc                   | device calls                      | stream                       |
//! |-----------------------|-----------------------------------|------------------------------|
//! | RUNNING → STOP        | `quiesce`                         |                              |
//! | STOP → RUNNING        | `resume`                          |                              |
//! | RUNNING → PRE_COPY    | `compat`                          | the header + compat block    |
//! | PRE_COPY → STOP_COPY  | `quiesce`, `save`                 | the rest, after the prefix   |
//! | STOP → STOP_COPY      | `compat`, `save`                  | the whole stream             |
//! | PRE_COPY → RUNNING    |                                   | dropped                      |
//! | STOP_COPY → STOP      |                                   | dropped                      |
//! | STOP → RESUMING       | `compat`                          | a `StreamReader` for it      |
//! | RESUMING → STOP       | `restore` (after `finish`)        | checked, then handed over    |
//!
//! A combined transition takes the fsm's shortest path one arc at a time.
//! A forbidden one changes nothing and returns the fsm's errno. An arc whose
//! action fails puts the machine in ERROR, which only a device reset leaves
//! (back to RUNNING).
//!
//! How the stream splits: PRE_COPY serves the stream's first
//! `stream::compat_prefix_len` bytes (magic, version, compatibility block),
//! so a destination can refuse a device it cannot become while the source
//! still runs. A read past them in PRE_COPY returns no data (the spec's "no
//! more migration data"). STOP_COPY serves the rest of the same stream from
//! wherever PRE_COPY's reads stopped (from byte 0 when PRE_COPY was skipped),
//! encoded with the compatibility block PRE_COPY sent; a read past the end
//! returns no data.

use crate::migration::fsm::{self, MigState, Refusal};
use crate::migration::stream::{self, Compat, StreamError, StreamReader};
use crate::vdev::device::{DeviceError, Migratable};

/// Why a migration request was refused. Each maps to one errno.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("this device cannot migrate")]
    NotMigratable,
    #[error("migration state change refused: {0}")]
    Refused(#[from] Refusal),
    #[error("{from} -> {to} failed, the device is now in ERROR (only a reset leaves it): {source}")]
    ArcFailed {
        from: &'static str,
        to: &'static str,
        #[source]
        source: ArcError,
    },
    #[error("{what} is not allowed in state {state}")]
    WrongState {
        what: &'static str,
        state: &'static str,
    },
    #[error("migration stream refused: {0}")]
    Stream(#[from] StreamError),
    #[error("the migration stream was already refused ({0}); nothing more is taken")]
    StreamPoisoned(String, u32),
}

/// What failed inside an arc.
#[derive(Debug, thiserror::Error)]
pub enum ArcError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("the saved state makes a stream of {len} bytes, more than the cap of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("the stream was refused while it arrived: {0}")]
    Refused(String, u32),
}

impl MigrationError {
    /// The positive errno for the error reply.
    pub fn errno(&self) -> u32 {
        match self {
            MigrationError::NotMigratable => libc::ENOTSUP as u32,
            MigrationError::Refused(r) => r.errno(),
            MigrationError::ArcFailed { source, .. } => match source {
                ArcError::Device(d) => d.errno(),
                ArcError::Stream(s) => s.errno(),
                ArcError::TooLarge { .. } => libc::EFBIG as u32,
                ArcError::Refused(_, errno) => *errno,
            },
            MigrationError::WrongState { .. } => libc::EINVAL as u32,
            MigrationError::Stream(s) => s.errno(),
            MigrationError::StreamPoisoned(_, errno) => *errno,
        }
    }
}

/// The source's stream: the bytes and how far they have been read.
struct Outgoing {
    /// The compatibility block PRE_COPY (or STOP_COPY) started with: the
    /// rest of the stream is encoded with it, so the prefix never changes.
    compat: Compat,
    bytes: Vec<u8>,
    pos: usize,
}

/// The destination's stream.
enum Incoming {
    Reading(StreamReader),
    /// A write was refused; the reader is gone. (message, errno)
    Refused(String, u32),
}

/// What a session did since the counts were last taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigCounts {
    /// Direct arcs taken.
    pub arcs: u64,
    /// Stream bytes read out (MIG_DATA_READ).
    pub bytes_read: u64,
    /// Stream bytes taken in (MIG_DATA_WRITE).
    pub bytes_written: u64,
}

/// One connection's migration state.
pub struct MigrationSession {
    state: MigState,
    out: Option<Outgoing>,
    incoming: Option<Incoming>,
    /// The cap on a whole stream, read or written.
    max_stream: usize,
    counts: MigCounts,
}

impl MigrationSession {
    /// A session in RUNNING (what a device is after reset), capping streams
    /// at `max_stream` bytes.
    pub fn new(max_stream: usize) -> MigrationSession {
        MigrationSession {
            state: MigState::Running,
            out: None,
            incoming: None,
            max_stream,
            counts: MigCounts::default(),
        }
    }

    /// The counts since the last call (for the connection's stats).
    pub fn take_counts(&mut self) -> MigCounts {
        std::mem::take(&mut self.counts)
    }

    pub fn state(&self) -> MigState {
        self.state
    }

    /// A device reset: back to RUNNING, every stream dropped.
    pub fn reset(&mut self) {
        self.state = MigState::Running;
        self.out = None;
        self.incoming = None;
    }

    /// Moves to state number `target` by the fsm's shortest path, taking each
    /// arc's action. Returns the state reached (`target`).
    pub fn set_state(
        &mut self,
        dev: &mut dyn Migratable,
        target: u32,
    ) -> Result<MigState, MigrationError> {
        let target = MigState::from_u32(target)?;
        let steps = fsm::path(self.state, target)?;
        for next in steps {
            let from = self.state;
            if let Err(source) = self.arc(dev, from, next) {
                // A device that could not stop in time and runs on as
                // before (`Migratable::quiesce`'s EBUSY) is still in the
                // arc's origin: the VMM may try again. Any other failure
                // leaves it in ERROR until a reset.
                let stopping = matches!(
                    (from, next),
                    (MigState::Running, MigState::Stop) | (MigState::PreCopy, MigState::StopCopy)
                );
                if stopping && matches!(source, ArcError::Device(DeviceError::Busy(_))) {
                    return Err(MigrationError::ArcFailed {
                        from: from.name(),
                        to: next.name(),
                        source,
                    });
                }
                self.state = MigState::Error;
                self.out = None;
                self.incoming = None;
                return Err(MigrationError::ArcFailed {
                    from: from.name(),
                    to: next.name(),
                    source,
                });
            }
            self.state = next;
            self.counts.arcs += 1;
        }
        Ok(self.state)
    }

    /// One direct arc's action.
    fn arc(
        &mut self,
        dev: &mut dyn Migratable,
        from: MigState,
        to: MigState,
    ) -> Result<(), ArcError> {
        use MigState::*;
        match (from, to) {
            (Running, Stop) => dev.quiesce()?,
            (Stop, Running) => dev.resume()?,
            (Running, PreCopy) => {
                let compat = dev.compat();
                let mut bytes = stream::encode(&compat, &[]);
                bytes.truncate(stream::compat_prefix_len(&bytes));
                self.out = Some(Outgoing {
                    compat,
                    bytes,
                    pos: 0,
                });
            }
            (PreCopy, StopCopy) => {
                dev.quiesce()?;
                let (compat, pos) = match self.out.take() {
                    Some(o) => (o.compat, o.pos),
                    None => (dev.compat(), 0),
                };
                self.save(dev, compat, pos)?;
            }
            (Stop, StopCopy) => {
                let compat = dev.compat();
                self.save(dev, compat, 0)?;
            }
            (PreCopy, Running) | (StopCopy, Stop) => self.out = None,
            (Stop, Resuming) => {
                self.incoming = Some(Incoming::Reading(StreamReader::new(
                    dev.compat(),
                    self.max_stream,
                )));
            }
            (Resuming, Stop) => match self.incoming.take() {
                Some(Incoming::Reading(r)) => dev.restore(&r.finish()?)?,
                Some(Incoming::Refused(msg, errno)) => return Err(ArcError::Refused(msg, errno)),
                None => {
                    return Err(StreamError::Truncated {
                        have: 0,
                        part: "header",
                    }
                    .into());
                }
            },
            // `fsm::path` yields only direct arcs.
            _ => {
                return Err(DeviceError::Invalid(format!(
                    "{} -> {} is not a direct arc",
                    from.name(),
                    to.name()
                ))
                .into());
            }
        }
        Ok(())
    }

    fn save(
        &mut self,
        dev: &mut dyn Migratable,
        compat: Compat,
        pos: usize,
    ) -> Result<(), ArcError> {
        let state = dev.save()?;
        let bytes = stream::encode(&compat, &state);
        if bytes.len() > self.max_stream {
            return Err(ArcError::TooLarge {
                len: bytes.len(),
                max: self.max_stream,
            });
        }
        self.out = Some(Outgoing { compat, bytes, pos });
        Ok(())
    }

    /// Up to `max` bytes of the outgoing stream (fewer, or none, at its
    /// end). Only in PRE_COPY and STOP_COPY.
    pub fn read(&mut self, max: usize) -> Result<&[u8], MigrationError> {
        if !self.state.is_saving() {
            return Err(MigrationError::WrongState {
                what: "MIG_DATA_READ",
                state: self.state.name(),
            });
        }
        // Every arc into a saving state sets `out`; none is an empty stream.
        let Some(out) = self.out.as_mut() else {
            return Ok(&[]);
        };
        let start = out.pos.min(out.bytes.len());
        let end = start + max.min(out.bytes.len() - start);
        out.pos = end;
        self.counts.bytes_read += (end - start) as u64;
        Ok(&out.bytes[start..end])
    }

    /// The next piece of the incoming stream. Only in RESUMING; a refused
    /// piece refuses the stream for good (every later write, and the
    /// RESUMING → STOP arc).
    pub fn write(&mut self, data: &[u8]) -> Result<(), MigrationError> {
        if self.state != MigState::Resuming {
            return Err(MigrationError::WrongState {
                what: "MIG_DATA_WRITE",
                state: self.state.name(),
            });
        }
        match self.incoming.as_mut() {
            Some(Incoming::Reading(r)) => match r.push(data) {
                Ok(_) => {
                    self.counts.bytes_written += data.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    self.incoming = Some(Incoming::Refused(e.to_string(), e.errno()));
                    Err(e.into())
                }
            },
            Some(Incoming::Refused(msg, errno)) => {
                Err(MigrationError::StreamPoisoned(msg.clone(), *errno))
            }
            // STOP -> RESUMING always sets it.
            None => Err(MigrationError::WrongState {
                what: "MIG_DATA_WRITE without a stream",
                state: self.state.name(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::stream::{DEFAULT_MAX_STREAM, QueueCompat};

    /// A device whose state is a fixed byte string.
    struct Blob(Vec<u8>);

    impl Migratable for Blob {
        fn quiesce(&mut self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn compat(&self) -> Compat {
            Compat {
                abi_version: 1,
                type_name: "blob".into(),
                queues: vec![QueueCompat {
                    max_depth: 8,
                    ops: 1,
                }],
                max_xfer: 64,
            }
        }
        fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
            Ok(self.0.clone())
        }
        fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
            self.0 = state.to_vec();
            Ok(())
        }
        fn dirty_log_start(&mut self, _: u64) -> Result<(), DeviceError> {
            Ok(())
        }
        fn dirty_log_stop(&mut self) {}
        fn dirty_report(
            &mut self,
            _: u64,
            _: u64,
            _: u64,
            _: &mut [u8],
        ) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    fn read_all(s: &mut MigrationSession, piece: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let got = s.read(piece).unwrap().to_vec();
            out.extend_from_slice(&got);
            if got.len() < piece {
                return out;
            }
        }
    }

    #[test]
    fn stop_copy_goes_on_from_wherever_pre_copy_stopped() {
        let mut dev = Blob((0..300u32).map(|i| i as u8).collect());
        let whole = stream::encode(&dev.compat(), &dev.0);
        let prefix = stream::compat_prefix_len(&whole);
        for read_in_pre_copy in [0, 1, 5, prefix - 1, prefix] {
            let mut s = MigrationSession::new(DEFAULT_MAX_STREAM);
            s.set_state(&mut dev, MigState::PreCopy as u32).unwrap();
            let pre = s.read(read_in_pre_copy).unwrap().to_vec();
            assert_eq!(pre, whole[..read_in_pre_copy]);
            s.set_state(&mut dev, MigState::StopCopy as u32).unwrap();
            let rest = read_all(&mut s, 7);
            assert_eq!([pre, rest].concat(), whole, "{read_in_pre_copy}");
            assert!(s.read(7).unwrap().is_empty());
        }
        // Without PRE_COPY: the whole stream from byte 0.
        let mut s = MigrationSession::new(DEFAULT_MAX_STREAM);
        s.set_state(&mut dev, MigState::StopCopy as u32).unwrap();
        assert_eq!(read_all(&mut s, 1000), whole);
        // PRE_COPY gives the prefix only, however much is asked.
        let mut s = MigrationSession::new(DEFAULT_MAX_STREAM);
        s.set_state(&mut dev, MigState::PreCopy as u32).unwrap();
        assert_eq!(read_all(&mut s, 1 << 20), whole[..prefix]);
    }

    #[test]
    fn a_destination_restores_only_a_whole_checked_stream() {
        let src = Blob(b"the registers".to_vec());
        let whole = stream::encode(&src.compat(), &src.0);
        let mut dst = Blob(Vec::new());
        let mut s = MigrationSession::new(DEFAULT_MAX_STREAM);
        s.set_state(&mut dst, MigState::Resuming as u32).unwrap();
        for piece in whole.chunks(3) {
            s.write(piece).unwrap();
        }
        s.set_state(&mut dst, MigState::Running as u32).unwrap();
        assert_eq!(dst.0, src.0);

        // Nothing written at all: RESUMING -> STOP fails, into ERROR.
        let mut s = MigrationSession::new(DEFAULT_MAX_STREAM);
        s.set_state(&mut dst, MigState::Resuming as u32).unwrap();
        let e = s.set_state(&mut dst, MigState::Stop as u32).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL as u32, "{e}");
        assert_eq!(s.state(), MigState::Error);
        s.reset();
        assert_eq!(s.state(), MigState::Running);
    }
}
