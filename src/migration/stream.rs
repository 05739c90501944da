//! The migration stream's envelope: what crosses from the source device to
//! the destination device through MIG_DATA_READ and MIG_DATA_WRITE.
//!
//! ```text
//! magic    8 bytes  "WDVMIG\r\n"
//! version  u32      STREAM_VERSION
//! compat   u32 length, then that many bytes of JSON (`Compat`)
//! state    u32 length, then that many bytes (the device's saved state)
//! crc32c   u32      over every byte before it
//! ```
//!
//! All integers are little-endian. The compatibility block comes first so
//! that it can travel during PRE_COPY and the destination can refuse a device
//! it cannot become (another type, queue count, depth, operation set or ABI)
//! before the source stops. `StreamReader` takes the bytes in any pieces, in
//! order, checks each part as soon as it is whole, and never holds more than
//! its cap. Nothing in the stream is trusted: lengths are bounded before
//! anything is allocated, and the state bytes are handed on only after the
//! checksum matched.

use serde::{Deserialize, Serialize};

/// The first bytes of every stream.
pub const MAGIC: [u8; 8] = *b"WDVMIG\r\n";
/// The envelope's version; a reader refuses any other.
pub const STREAM_VERSION: u32 = 1;
/// The default cap on a whole stream.
pub const DEFAULT_MAX_STREAM: usize = 16 << 20;
/// The cap on the compatibility block alone.
pub const MAX_COMPAT: usize = 64 << 10;

/// What the destination must match before it accepts a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compat {
    /// The device ABI version (`abi::regs::ABI_VERSION`: major << 16 | minor).
    pub abi_version: u32,
    /// The instance type's name.
    pub type_name: String,
    /// Per queue, its depth limit and the operations it may run.
    pub queues: Vec<QueueCompat>,
    /// The largest transfer one job may ask for.
    pub max_xfer: u32,
}

/// One queue in the compatibility block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueCompat {
    pub max_depth: u32,
    /// Opcode bit mask (`Q_CAP_OPS`).
    pub ops: u32,
}

/// Why a stream was refused. Every variant says what was expected and what
/// arrived.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("not a wdvirt migration stream (magic {found:02x?})")]
    BadMagic { found: [u8; 8] },
    #[error("stream version {found}, this wdvirt reads version {STREAM_VERSION}")]
    Version { found: u32 },
    #[error("the stream would be {len} bytes, more than the cap of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("compatibility block of {len} bytes is longer than {MAX_COMPAT}")]
    CompatTooLarge { len: u32 },
    #[error("the compatibility block does not parse: {0}")]
    CompatDecode(String),
    #[error("the destination cannot take this device: {}", .0.join("; "))]
    Incompatible(Vec<String>),
    #[error("the stream ended after {have} bytes, in the {part}")]
    Truncated { have: usize, part: &'static str },
    #[error("{extra} bytes after the end of the stream")]
    Trailing { extra: usize },
    #[error("checksum {found:#010x} does not match the content ({computed:#010x})")]
    Checksum { found: u32, computed: u32 },
}

impl StreamError {
    /// The errno a MIG_DATA_WRITE or a RESUMING -> STOP arc replies with.
    pub fn errno(&self) -> u32 {
        match self {
            StreamError::TooLarge { .. } | StreamError::CompatTooLarge { .. } => libc::EFBIG as u32,
            _ => libc::EINVAL as u32,
        }
    }
}

impl Compat {
    /// Every way `self` (what the stream carries) differs from `dest` (what
    /// the destination instance is), in words an operator can act on.
    pub fn mismatches(&self, dest: &Compat) -> Vec<String> {
        let mut out = Vec::new();
        if self.abi_version != dest.abi_version {
            out.push(format!(
                "device ABI {} here, {} in the stream",
                abi_name(dest.abi_version),
                abi_name(self.abi_version)
            ));
        }
        if self.type_name != dest.type_name {
            out.push(format!(
                "type '{}' here, '{}' in the stream",
                dest.type_name, self.type_name
            ));
        }
        if self.queues.len() != dest.queues.len() {
            out.push(format!(
                "{} queues here, {} in the stream",
                dest.queues.len(),
                self.queues.len()
            ));
        }
        for (i, (s, d)) in self.queues.iter().zip(&dest.queues).enumerate() {
            if s.max_depth != d.max_depth {
                out.push(format!(
                    "queue {i}: depth limit {} here, {} in the stream",
                    d.max_depth, s.max_depth
                ));
            }
            if s.ops != d.ops {
                out.push(format!(
                    "queue {i}: operations {:#x} here, {:#x} in the stream",
                    d.ops, s.ops
                ));
            }
        }
        if self.max_xfer != dest.max_xfer {
            out.push(format!(
                "largest transfer {} here, {} in the stream",
                dest.max_xfer, self.max_xfer
            ));
        }
        out
    }
}

fn abi_name(v: u32) -> String {
    format!("{}.{}", v >> 16, v & 0xffff)
}

/// The whole stream for `compat` and `state`. The first
/// `compat_prefix_len(compat)` bytes are the part a source sends in PRE_COPY.
pub fn encode(compat: &Compat, state: &[u8]) -> Vec<u8> {
    let compat = serde_json::to_vec(compat).expect("Compat always serialises");
    let mut out = Vec::with_capacity(8 + 4 + 4 + compat.len() + 4 + state.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&STREAM_VERSION.to_le_bytes());
    out.extend_from_slice(&(compat.len() as u32).to_le_bytes());
    out.extend_from_slice(&compat);
    out.extend_from_slice(&(state.len() as u32).to_le_bytes());
    out.extend_from_slice(state);
    let crc = crate::accel::ops::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The length of the header and compatibility block: what PRE_COPY carries.
pub fn compat_prefix_len(stream: &[u8]) -> usize {
    read_u32(stream, 12).map_or(stream.len(), |clen| 16 + clen as usize)
}

/// Where the reader stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Still reading the header or the compatibility block.
    Header,
    /// The compatibility block matched; the state is arriving.
    Accepted,
    /// Every byte has arrived; `finish` checks the checksum.
    Complete,
}

/// Takes a stream in pieces on the destination.
pub struct StreamReader {
    expect: Compat,
    max: usize,
    buf: Vec<u8>,
    /// The stream's full length, once the state length is known.
    total: Option<usize>,
    accepted: bool,
}

impl StreamReader {
    /// A reader for a destination that is `expect`, refusing streams longer
    /// than `max` bytes.
    pub fn new(expect: Compat, max: usize) -> StreamReader {
        StreamReader {
            expect,
            max,
            buf: Vec::new(),
            total: None,
            accepted: false,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.buf.len()
    }

    /// Appends the next piece and checks whatever became whole. An error is
    /// final: the caller drops the reader and nothing of the stream is used.
    pub fn push(&mut self, piece: &[u8]) -> Result<Progress, StreamError> {
        let len = self.buf.len() as u64 + piece.len() as u64;
        let limit = self.total.unwrap_or(self.max) as u64;
        if len > limit {
            return Err(match self.total {
                Some(total) => StreamError::Trailing {
                    extra: (len - total as u64) as usize,
                },
                None => StreamError::TooLarge { len, max: self.max },
            });
        }
        self.buf.extend_from_slice(piece);
        self.check()
    }

    fn check(&mut self) -> Result<Progress, StreamError> {
        let b = &self.buf;
        if b.len() >= 8 && b[..8] != MAGIC {
            return Err(StreamError::BadMagic {
                found: b[..8].try_into().unwrap(),
            });
        }
        if let Some(found) = read_u32(b, 8)
            && found != STREAM_VERSION
        {
            return Err(StreamError::Version { found });
        }
        let Some(clen) = read_u32(b, 12) else {
            return Ok(Progress::Header);
        };
        if clen as usize > MAX_COMPAT {
            return Err(StreamError::CompatTooLarge { len: clen });
        }
        let compat_end = 16 + clen as usize;
        if b.len() < compat_end {
            return Ok(Progress::Header);
        }
        if !self.accepted {
            let compat: Compat = serde_json::from_slice(&b[16..compat_end])
                .map_err(|e| StreamError::CompatDecode(e.to_string()))?;
            let wrong = compat.mismatches(&self.expect);
            if !wrong.is_empty() {
                return Err(StreamError::Incompatible(wrong));
            }
            self.accepted = true;
        }
        let Some(slen) = read_u32(b, compat_end) else {
            return Ok(Progress::Accepted);
        };
        let total = compat_end as u64 + 4 + slen as u64 + 4;
        if total > self.max as u64 {
            return Err(StreamError::TooLarge {
                len: total,
                max: self.max,
            });
        }
        self.total = Some(total as usize);
        match (b.len() as u64).cmp(&total) {
            std::cmp::Ordering::Less => Ok(Progress::Accepted),
            std::cmp::Ordering::Equal => Ok(Progress::Complete),
            std::cmp::Ordering::Greater => Err(StreamError::Trailing {
                extra: (b.len() as u64 - total) as usize,
            }),
        }
    }

    /// The state bytes, once the whole stream has arrived and its checksum
    /// matched.
    pub fn finish(mut self) -> Result<Vec<u8>, StreamError> {
        let have = self.buf.len();
        let part = match self.total {
            Some(total) if have == total => None,
            Some(_) => Some("state"),
            None if self.accepted => Some("state length"),
            None => Some("header"),
        };
        if let Some(part) = part {
            return Err(StreamError::Truncated { have, part });
        }
        let body = have - 4;
        let found = read_u32(&self.buf, body).expect("a whole stream ends in its checksum");
        let computed = crate::accel::ops::crc32c(&self.buf[..body]);
        if found != computed {
            return Err(StreamError::Checksum { found, computed });
        }
        let clen = read_u32(&self.buf, 12).unwrap_or(0) as usize;
        // The state is handed on in the reader's buffer: no second
        // allocation of up to the cap.
        self.buf.truncate(body);
        self.buf.drain(..16 + clen + 4);
        Ok(self.buf)
    }
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
}

/// Reads a whole stream at once (tests, tools).
pub fn decode(stream: &[u8], expect: &Compat, max: usize) -> Result<Vec<u8>, StreamError> {
    let mut r = StreamReader::new(expect.clone(), max);
    r.push(stream)?;
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compat() -> Compat {
        Compat {
            abi_version: 1 << 16 | 1,
            type_name: "all-4q".into(),
            queues: vec![
                QueueCompat {
                    max_depth: 1024,
                    ops: 0x3ff
                };
                4
            ],
            max_xfer: 1 << 20,
        }
    }

    fn state() -> Vec<u8> {
        (0..5000u32).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn a_stream_read_in_any_pieces_gives_back_the_state() {
        let s = encode(&compat(), &state());
        assert_eq!(decode(&s, &compat(), DEFAULT_MAX_STREAM).unwrap(), state());
        for piece in [1, 3, 16, 17, 999] {
            let mut r = StreamReader::new(compat(), DEFAULT_MAX_STREAM);
            let mut last = Progress::Header;
            for c in s.chunks(piece) {
                last = r.push(c).unwrap();
            }
            assert_eq!(last, Progress::Complete);
            assert_eq!(r.finish().unwrap(), state());
        }
    }

    #[test]
    fn the_compatibility_block_is_judged_before_the_state_arrives() {
        let s = encode(&compat(), &state());
        let prefix = compat_prefix_len(&s);
        let mut r = StreamReader::new(compat(), DEFAULT_MAX_STREAM);
        assert_eq!(r.push(&s[..prefix - 1]).unwrap(), Progress::Header);
        assert_eq!(r.push(&s[prefix - 1..prefix]).unwrap(), Progress::Accepted);

        let mut other = compat();
        other.queues.truncate(2);
        other.queues[1].max_depth = 256;
        other.type_name = "hash-2q".into();
        let mut r = StreamReader::new(other, DEFAULT_MAX_STREAM);
        let err = r.push(&s[..prefix]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("type 'hash-2q' here, 'all-4q' in the stream"),
            "{msg}"
        );
        assert!(msg.contains("2 queues here, 4 in the stream"), "{msg}");
        assert!(msg.contains("queue 1: depth limit 256 here, 1024"), "{msg}");
        assert_eq!(err.errno(), libc::EINVAL as u32);
    }

    #[test]
    fn each_field_of_the_compatibility_block_is_checked() {
        let s = encode(&compat(), &[]);
        type Change = fn(&mut Compat);
        let cases: [(Change, &str); 4] = [
            (|c| c.abi_version = 2 << 16, "device ABI 2.0 here, 1.1"),
            (
                |c| c.queues[3].ops = 1,
                "queue 3: operations 0x1 here, 0x3ff",
            ),
            (|c| c.max_xfer = 4096, "largest transfer 4096 here"),
            (|c| c.queues[0].max_depth = 2, "queue 0: depth limit 2 here"),
        ];
        for (change, says) in cases {
            let mut dest = compat();
            change(&mut dest);
            let err = decode(&s, &dest, DEFAULT_MAX_STREAM).unwrap_err();
            assert!(err.to_string().contains(says), "{err} / {says}");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let s = encode(&compat(), &state()[..300]);
        for cut in 0..s.len() {
            let err = decode(&s[..cut], &compat(), DEFAULT_MAX_STREAM).unwrap_err();
            assert!(
                matches!(err, StreamError::Truncated { have, .. } if have == cut),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let s = encode(&compat(), &state()[..300]);
        for i in 0..s.len() {
            for bit in [0, 3, 7] {
                let mut bad = s.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode(&bad, &compat(), DEFAULT_MAX_STREAM).is_err(),
                    "flip of bit {bit} at byte {i} was accepted"
                );
            }
        }
    }

    #[test]
    fn oversize_streams_are_refused_before_they_are_held() {
        let s = encode(&compat(), &state());
        let cap = s.len() - 1;
        let mut r = StreamReader::new(compat(), cap);
        // The state length alone tells the reader the stream is too long.
        let prefix = compat_prefix_len(&s) + 4;
        let err = r.push(&s[..prefix]).unwrap_err();
        assert_eq!(
            err,
            StreamError::TooLarge {
                len: s.len() as u64,
                max: cap
            }
        );
        assert_eq!(err.errno(), libc::EFBIG as u32);

        // A compatibility block claiming 4 GiB is refused at its length.
        let mut huge = s[..16].to_vec();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(&huge, &compat(), DEFAULT_MAX_STREAM).unwrap_err();
        assert_eq!(err, StreamError::CompatTooLarge { len: u32::MAX });

        // Bytes past the announced end, in a later piece.
        let mut r = StreamReader::new(compat(), DEFAULT_MAX_STREAM);
        r.push(&s).unwrap();
        assert_eq!(
            r.push(b"x").unwrap_err(),
            StreamError::Trailing { extra: 1 }
        );
        // In the same piece as the rest.
        let mut longer = s.clone();
        longer.extend_from_slice(b"xy");
        assert_eq!(
            decode(&longer, &compat(), DEFAULT_MAX_STREAM).unwrap_err(),
            StreamError::Trailing { extra: 2 }
        );
    }

    #[test]
    fn other_streams_are_named_for_what_they_are() {
        let s = encode(&compat(), &[]);
        let mut bad = s.clone();
        bad[..8].copy_from_slice(b"QEVM\0\0\0\x03");
        assert!(matches!(
            decode(&bad, &compat(), DEFAULT_MAX_STREAM),
            Err(StreamError::BadMagic { .. })
        ));
        let mut v2 = s.clone();
        v2[8] = 2;
        assert_eq!(
            decode(&v2, &compat(), DEFAULT_MAX_STREAM).unwrap_err(),
            StreamError::Version { found: 2 }
        );
        let mut junk = s[..16].to_vec();
        junk.truncate(12);
        junk.extend_from_slice(&3u32.to_le_bytes());
        junk.extend_from_slice(b"{x}");
        assert!(matches!(
            decode(&junk, &compat(), DEFAULT_MAX_STREAM),
            Err(StreamError::CompatDecode(_))
        ));
    }
}
