//! An instance's state memfd: everything a successor process needs to take
//! the instance over, in memory that outlives the process (the holder keeps
//! the fd).
//!
//! Layout (all little-endian):
//!
//! | offset | what |
//! |---|---|
//! | 0 | header: magic `WDRS`, format version, queue count, max depth |
//! | 4 KiB | two snapshot slots of [`SNAPSHOT_BYTES`] each |
//! | then | the reply to the last message handled ([`REPLY_BYTES`]) |
//! | then | one [`QueueJournal`] per queue |
//!
//! A snapshot (the session and the device's slow-path state, JSON) is
//! written whole into the slot not in use, with its length and CRC32C, and
//! only then given the next sequence number: a process killed half way
//! through leaves the other slot, the last complete snapshot, to be read.
//! The journals are written by the queue workers on the fast path.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::transport::keeper::{Handled, SessionRecord};
use crate::vdev::wd::journal::{QueueJournal, SharedMap};

const MAGIC: u32 = u32::from_le_bytes(*b"WDRS");
/// The layout's version; a successor refuses any other.
pub const FORMAT: u32 = 1;
const H_MAGIC: usize = 0;
const H_FORMAT: usize = 4;
const H_QUEUES: usize = 8;
const H_MAX_DEPTH: usize = 12;
/// The sequence number of the snapshot whose reply was sent.
const H_REPLIED: usize = 16;
const HEADER: usize = 4096;
/// Room for one snapshot (the JSON of the session and the device: a few
/// KiB for 16 queues, and one DMA record per map).
pub const SNAPSHOT_BYTES: usize = 256 * 1024;
/// Room for the reply to one message: a region read of up to 1 MiB.
pub const REPLY_BYTES: usize = (1 << 20) + 4096;
/// A slot: sequence number (0 = never written), length, CRC32C, data.
const S_SEQ: usize = 0;
const S_LEN: usize = 8;
const S_CRC: usize = 12;
const S_DATA: usize = 16;

/// What a snapshot holds: the VMM's session and the device's live state,
/// or nothing when no VMM is connected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub vmm: Option<VmmSnapshot>,
}

/// The reply the last message handled is to get, in the reply area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyRef {
    pub len: u32,
    pub crc: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmSnapshot {
    pub session: SessionRecord,
    /// `vdev::pci::state::LiveState`, as the device wrote it.
    pub device: serde_json::Value,
    /// The keys (in the holder) of the fds the device held, each with the
    /// identity (device, inode) of the file it names, so a successor can
    /// tell a stale one.
    pub fds: Vec<(String, u64, u64)>,
    /// The last message handled, and its reply (`None` for a posted one).
    pub handled: Option<Handled>,
    pub reply: Option<ReplyRef>,
}

/// Why a state memfd cannot be taken up. Each says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("the state memfd cannot be mapped: {0}")]
    Map(#[source] std::io::Error),
    #[error("the state memfd is {found} bytes, an instance of this shape needs {expected}")]
    Size { found: usize, expected: usize },
    #[error("the state memfd has no wdvirt header (magic {0:#x})")]
    Magic(u32),
    #[error("the state memfd is format {found}, this wdvirt reads format {FORMAT}")]
    Format { found: u32 },
    #[error(
        "the state memfd was laid out for {found_queues} queues of depth {found_depth}, the instance has {queues} of {max_depth}"
    )]
    Shape {
        found_queues: u32,
        found_depth: u32,
        queues: u32,
        max_depth: u32,
    },
    #[error("no complete snapshot in the state memfd (both slots fail their checks)")]
    NoSnapshot,
    #[error("the snapshot does not parse: {0}")]
    Decode(String),
    #[error("a snapshot of {0} bytes does not fit a slot of {SNAPSHOT_BYTES}")]
    TooBig(usize),
}

/// An instance's state memfd, mapped.
pub struct StateFile {
    map: Arc<SharedMap>,
    queues: u32,
    max_depth: u32,
}

impl StateFile {
    fn size(queues: u32, max_depth: u32) -> usize {
        Self::journals_off() + queues as usize * QueueJournal::size(max_depth)
    }

    fn reply_off() -> usize {
        HEADER + 2 * SNAPSHOT_BYTES
    }

    fn journals_off() -> usize {
        Self::reply_off() + REPLY_BYTES
    }

    /// A new state memfd for an instance of `queues` queues of at most
    /// `max_depth` entries, with an empty snapshot (no VMM).
    pub fn create(
        name: &str,
        queues: u32,
        max_depth: u32,
    ) -> Result<(OwnedFd, StateFile), StateFileError> {
        let (fd, map) =
            SharedMap::create(name, Self::size(queues, max_depth)).map_err(StateFileError::Map)?;
        let map = Arc::new(map);
        map.u32_at(H_FORMAT).store(FORMAT, Ordering::Relaxed);
        map.u32_at(H_QUEUES).store(queues, Ordering::Relaxed);
        map.u32_at(H_MAX_DEPTH).store(max_depth, Ordering::Relaxed);
        map.u32_at(H_MAGIC).store(MAGIC, Ordering::Release);
        let file = StateFile {
            map,
            queues,
            max_depth,
        };
        file.write_snapshot(&Snapshot { vmm: None })?;
        Ok((fd, file))
    }

    /// The state memfd a predecessor left, for an instance of this shape.
    pub fn open(fd: &OwnedFd, queues: u32, max_depth: u32) -> Result<StateFile, StateFileError> {
        let map = SharedMap::map(fd).map_err(StateFileError::Map)?;
        let expected = Self::size(queues, max_depth);
        if map.len() != expected {
            return Err(StateFileError::Size {
                found: map.len(),
                expected,
            });
        }
        let magic = map.u32_at(H_MAGIC).load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(StateFileError::Magic(magic));
        }
        let found = map.u32_at(H_FORMAT).load(Ordering::Acquire);
        if found != FORMAT {
            return Err(StateFileError::Format { found });
        }
        let (found_queues, found_depth) = (
            map.u32_at(H_QUEUES).load(Ordering::Acquire),
            map.u32_at(H_MAX_DEPTH).load(Ordering::Acquire),
        );
        if (found_queues, found_depth) != (queues, max_depth) {
            return Err(StateFileError::Shape {
                found_queues,
                found_depth,
                queues,
                max_depth,
            });
        }
        Ok(StateFile {
            map: Arc::new(map),
            queues,
            max_depth,
        })
    }

    /// Queue `q`'s journal.
    pub fn journal(&self, q: u32) -> QueueJournal {
        assert!(q < self.queues);
        let off = Self::journals_off() + q as usize * QueueJournal::size(self.max_depth);
        QueueJournal::at(self.map.clone(), off, self.max_depth)
    }

    /// Every queue's journal, in order.
    pub fn journals(&self) -> Vec<QueueJournal> {
        (0..self.queues).map(|q| self.journal(q)).collect()
    }

    fn slot_off(slot: usize) -> usize {
        HEADER + slot * SNAPSHOT_BYTES
    }

    fn slot_seq(&self, slot: usize) -> u64 {
        self.map
            .u64_at(Self::slot_off(slot) + S_SEQ)
            .load(Ordering::Acquire)
    }

    /// The newest complete snapshot's slot and sequence number.
    fn newest(&self) -> Option<(usize, u64)> {
        (0..2)
            .filter(|&s| self.slot_valid(s))
            .map(|s| (s, self.slot_seq(s)))
            .max_by_key(|&(_, seq)| seq)
    }

    fn slot_data(&self, slot: usize) -> Option<Vec<u8>> {
        let off = Self::slot_off(slot);
        let len = self.map.u32_at(off + S_LEN).load(Ordering::Acquire) as usize;
        if self.slot_seq(slot) == 0 || len > SNAPSHOT_BYTES - S_DATA {
            return None;
        }
        let mut data = vec![0u8; len];
        self.map.read(off + S_DATA, &mut data);
        let crc = self.map.u32_at(off + S_CRC).load(Ordering::Acquire);
        (crate::accel::ops::crc32c(&data) == crc).then_some(data)
    }

    fn slot_valid(&self, slot: usize) -> bool {
        self.slot_data(slot).is_some()
    }

    /// Write `snap` as the newest snapshot (into the slot not holding the
    /// newest one; it counts only once whole). Returns its sequence number.
    pub fn write_snapshot(&self, snap: &Snapshot) -> Result<u64, StateFileError> {
        let data = serde_json::to_vec(snap).map_err(|e| StateFileError::Decode(e.to_string()))?;
        self.write_raw(&data)
    }

    /// Put `reply` in the reply area, for the snapshot written next to
    /// name (its [`ReplyRef`]).
    pub fn write_reply(&self, reply: &[u8]) -> Result<ReplyRef, StateFileError> {
        if reply.len() > REPLY_BYTES {
            return Err(StateFileError::TooBig(reply.len()));
        }
        self.map.write(Self::reply_off(), reply);
        Ok(ReplyRef {
            len: reply.len() as u32,
            crc: crate::accel::ops::crc32c(reply),
        })
    }

    /// The reply `r` names, if the reply area still holds it.
    pub fn read_reply(&self, r: &ReplyRef) -> Option<Vec<u8>> {
        let len = r.len as usize;
        if len > REPLY_BYTES {
            return None;
        }
        let mut data = vec![0u8; len];
        self.map.read(Self::reply_off(), &mut data);
        (crate::accel::ops::crc32c(&data) == r.crc).then_some(data)
    }

    /// The reply of the snapshot numbered `seq` was sent.
    pub fn mark_replied(&self, seq: u64) {
        self.map.u64_at(H_REPLIED).store(seq, Ordering::Release);
    }

    /// The newest complete snapshot, its sequence number, and whether its
    /// reply was sent.
    pub fn read_newest(&self) -> Result<(Snapshot, u64, bool), StateFileError> {
        let (slot, seq) = self.newest().ok_or(StateFileError::NoSnapshot)?;
        let data = self.slot_data(slot).ok_or(StateFileError::NoSnapshot)?;
        let snap =
            serde_json::from_slice(&data).map_err(|e| StateFileError::Decode(e.to_string()))?;
        let replied = self.map.u64_at(H_REPLIED).load(Ordering::Acquire) == seq;
        Ok((snap, seq, replied))
    }

    fn write_raw(&self, data: &[u8]) -> Result<u64, StateFileError> {
        if data.len() > SNAPSHOT_BYTES - S_DATA {
            return Err(StateFileError::TooBig(data.len()));
        }
        let (slot, seq) = match self.newest() {
            Some((s, seq)) => (1 - s, seq + 1),
            None => (0, 1),
        };
        let off = Self::slot_off(slot);
        // Invalidate first: a death from here on leaves the other slot.
        self.map.u64_at(off + S_SEQ).store(0, Ordering::Release);
        self.map.write(off + S_DATA, data);
        self.map
            .u32_at(off + S_LEN)
            .store(data.len() as u32, Ordering::Relaxed);
        self.map
            .u32_at(off + S_CRC)
            .store(crate::accel::ops::crc32c(data), Ordering::Relaxed);
        self.map.u64_at(off + S_SEQ).store(seq, Ordering::Release);
        Ok(seq)
    }

    #[cfg(test)]
    fn corrupt_newest(&self) {
        if let Some((slot, _)) = self.newest() {
            let off = Self::slot_off(slot) + S_DATA;
            let mut b = [0u8; 1];
            self.map.read(off, &mut b);
            self.map.write(off, &[b[0] ^ 0xff]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(n: u64) -> Snapshot {
        Snapshot {
            vmm: Some(VmmSnapshot {
                session: SessionRecord {
                    caps: Default::default(),
                    dma: Vec::new(),
                },
                device: serde_json::json!({ "n": n }),
                fds: vec![(format!("dma/{n:#x}"), 1, n)],
                handled: None,
                reply: None,
            }),
        }
    }

    #[test]
    fn the_newest_whole_snapshot_is_read_back_from_a_reopened_memfd() {
        let (fd, f) = StateFile::create("t", 2, 64).unwrap();
        assert_eq!(f.read_newest().unwrap().0, Snapshot { vmm: None });
        for n in 1..=5 {
            f.write_snapshot(&snap(n)).unwrap();
        }
        drop(f);
        let f = StateFile::open(&fd, 2, 64).unwrap();
        assert_eq!(f.read_newest().unwrap().0, snap(5));
    }

    #[test]
    fn a_torn_snapshot_leaves_the_one_before() {
        let (_fd, f) = StateFile::create("t", 1, 8).unwrap();
        f.write_snapshot(&snap(1)).unwrap();
        f.write_snapshot(&snap(2)).unwrap();
        f.corrupt_newest();
        assert_eq!(f.read_newest().unwrap().0, snap(1));
        // And the next write goes over the torn one, not the good one.
        f.write_snapshot(&snap(3)).unwrap();
        assert_eq!(f.read_newest().unwrap().0, snap(3));
    }

    #[test]
    fn a_memfd_of_another_shape_or_none_of_ours_is_refused_with_what_differs() {
        let (fd, _f) = StateFile::create("t", 2, 64).unwrap();
        let e = StateFile::open(&fd, 4, 64).err().unwrap();
        assert!(matches!(e, StateFileError::Size { .. }), "{e}");
        let (fd2, map) = SharedMap::create("other", StateFile::size(2, 64)).unwrap();
        drop(map);
        let e = StateFile::open(&fd2, 2, 64).err().unwrap();
        assert!(matches!(e, StateFileError::Magic(0)), "{e}");
        assert!(e.to_string().contains("no wdvirt header"));
    }

    #[test]
    fn a_snapshot_too_big_for_its_slot_is_refused_and_the_last_one_stands() {
        let (_fd, f) = StateFile::create("t", 1, 8).unwrap();
        f.write_snapshot(&snap(1)).unwrap();
        let e = f.write_raw(&vec![b' '; SNAPSHOT_BYTES]).err().unwrap();
        assert!(matches!(e, StateFileError::TooBig(_)));
        assert_eq!(f.read_newest().unwrap().0, snap(1));
    }
}
