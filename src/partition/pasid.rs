//! The host's PASID space: 20-bit ids, 0 reserved, handed out lowest first.
//!
//! One host-wide space, not one per accelerator: an instance spanning several
//! accelerators then has the same PASID on each, unique on every one of them
//! by construction. Each accelerator's own capacity (how many PASIDs it can
//! hold bound) is counted separately by the partitioner.
//!
//! A released PASID is *draining* until the caller says its queues are
//! drained: jobs still in flight on the hardware carry it, and handing it to
//! another instance would let those jobs complete into the new owner's
//! address space. Only [`PasidSpace::drained`] returns it to the free set.

use std::collections::BTreeSet;

use parking_lot::Mutex;
use serde::Serialize;

use crate::accel::Pasid;

/// PASIDs are 20 bits wide (PCIe); 0 is reserved for the host's own DMA.
pub const PASID_MAX: Pasid = (1 << 20) - 1;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PasidError {
    #[error("all {0} PASIDs are in use or draining")]
    PasidsExhausted(u32),
    #[error("PASID {0} is not allocated")]
    NotAllocated(Pasid),
    #[error("PASID {0} is not draining")]
    NotDraining(Pasid),
    #[error("PASID {pasid} is outside 1..={max}")]
    OutOfRange { pasid: Pasid, max: Pasid },
    #[error("PASID {0} is already live or draining")]
    InUse(Pasid),
}

/// The old name of [`PasidError`], kept for callers written against it.
pub type PartitionError = PasidError;

/// Counts for listings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PasidUsage {
    pub capacity: u32,
    pub used: u32,
    pub draining: u32,
    pub free: u32,
}

/// PASIDs `1..=max`: live, draining or free. Not locked; the owner locks.
#[derive(Clone, Debug)]
pub struct PasidSpace {
    max: Pasid,
    /// Everything below is live, draining or in `free`; from here up, only
    /// what [`Self::claim`] took is live or draining. Keeps allocation
    /// O(log n) without a 2^20-entry set.
    next: Pasid,
    free: BTreeSet<Pasid>,
    live: BTreeSet<Pasid>,
    draining: BTreeSet<Pasid>,
}

impl PasidSpace {
    /// A space of `1..=max` (`max` capped at [`PASID_MAX`]).
    pub fn new(max: Pasid) -> PasidSpace {
        PasidSpace {
            max: max.min(PASID_MAX),
            next: 1,
            free: BTreeSet::new(),
            live: BTreeSet::new(),
            draining: BTreeSet::new(),
        }
    }

    /// The lowest free PASID, now live. Never a live or draining one.
    pub fn allocate(&mut self) -> Result<Pasid, PasidError> {
        let pasid = match self.free.pop_first() {
            Some(p) => p,
            None => {
                while self.next <= self.max && self.taken(self.next) {
                    self.next += 1;
                }
                if self.next > self.max {
                    return Err(PasidError::PasidsExhausted(self.max));
                }
                self.next += 1;
                self.next - 1
            }
        };
        self.live.insert(pasid);
        Ok(pasid)
    }

    /// Takes this very PASID (a daemon re-claiming what an instance had
    /// before a restart).
    pub fn claim(&mut self, pasid: Pasid) -> Result<(), PasidError> {
        if pasid == 0 || pasid > self.max {
            return Err(PasidError::OutOfRange {
                pasid,
                max: self.max,
            });
        }
        if self.taken(pasid) {
            return Err(PasidError::InUse(pasid));
        }
        // Below `next` it is free; at or above, nothing to move.
        self.free.remove(&pasid);
        self.live.insert(pasid);
        Ok(())
    }

    fn taken(&self, pasid: Pasid) -> bool {
        self.live.contains(&pasid) || self.draining.contains(&pasid)
    }

    /// Live → draining. The PASID is not handed out again until
    /// [`Self::drained`].
    pub fn release(&mut self, pasid: Pasid) -> Result<(), PasidError> {
        if !self.live.remove(&pasid) {
            return Err(PasidError::NotAllocated(pasid));
        }
        self.draining.insert(pasid);
        Ok(())
    }

    /// Draining → free: its queues report no job in flight.
    pub fn drained(&mut self, pasid: Pasid) -> Result<(), PasidError> {
        if !self.draining.remove(&pasid) {
            return Err(PasidError::NotDraining(pasid));
        }
        // A claimed PASID at or above `next` is simply untaken again.
        if pasid < self.next {
            self.free.insert(pasid);
        }
        Ok(())
    }

    pub fn is_live(&self, pasid: Pasid) -> bool {
        self.live.contains(&pasid)
    }

    pub fn is_draining(&self, pasid: Pasid) -> bool {
        self.draining.contains(&pasid)
    }

    /// Whether at least one more PASID can be allocated.
    pub fn has_free(&self) -> bool {
        if !self.free.is_empty() {
            return true;
        }
        let above = self.live.range(self.next..).count() + self.draining.range(self.next..).count();
        self.next <= self.max && (self.max - self.next + 1) as usize > above
    }

    pub fn usage(&self) -> PasidUsage {
        let used = self.live.len() as u32;
        let draining = self.draining.len() as u32;
        PasidUsage {
            capacity: self.max,
            used,
            draining,
            free: self.max - used - draining,
        }
    }
}

/// A thread-safe [`PasidSpace`] for callers with no placement (`wdvirt serve`):
/// `allocate`, and `release` that frees at once (the caller has already
/// stopped the instance, so nothing is in flight), or the two-step
/// `release_draining` + `drained`.
#[derive(Debug)]
pub struct PasidAllocator {
    space: Mutex<PasidSpace>,
}

impl Default for PasidAllocator {
    fn default() -> Self {
        Self::new(PASID_MAX)
    }
}

impl PasidAllocator {
    pub fn new(max: Pasid) -> Self {
        PasidAllocator {
            space: Mutex::new(PasidSpace::new(max)),
        }
    }

    pub fn allocate(&self) -> Result<Pasid, PasidError> {
        self.space.lock().allocate()
    }

    /// Frees `pasid` at once: only for an instance already stopped with no
    /// job in flight.
    pub fn release(&self, pasid: Pasid) -> Result<(), PasidError> {
        let mut space = self.space.lock();
        space.release(pasid)?;
        space.drained(pasid)
    }

    /// First step of a two-step release: `pasid` is draining.
    pub fn release_draining(&self, pasid: Pasid) -> Result<(), PasidError> {
        self.space.lock().release(pasid)
    }

    /// Second step: `pasid`'s queues are drained; it may be reused.
    pub fn drained(&self, pasid: Pasid) -> Result<(), PasidError> {
        self.space.lock().drained(pasid)
    }

    pub fn usage(&self) -> PasidUsage {
        self.space.lock().usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pasids_are_unique_reused_after_release_and_bounded() {
        let a = PasidAllocator::new(3);
        assert_eq!(
            (a.allocate(), a.allocate(), a.allocate()),
            (Ok(1), Ok(2), Ok(3))
        );
        assert_eq!(a.allocate(), Err(PasidError::PasidsExhausted(3)));
        a.release(2).unwrap();
        assert_eq!(a.allocate(), Ok(2));
        assert_eq!(a.release(9), Err(PasidError::NotAllocated(9)));
    }

    #[test]
    fn a_draining_pasid_is_never_handed_out() {
        let mut s = PasidSpace::new(3);
        assert_eq!(s.allocate(), Ok(1));
        assert_eq!(s.allocate(), Ok(2));
        s.release(1).unwrap();
        // 1 is the lowest not live, but it is draining: 3 comes next...
        assert_eq!(s.allocate(), Ok(3));
        // ...and then nothing, although only two are live.
        assert_eq!(s.allocate(), Err(PasidError::PasidsExhausted(3)));
        assert!(s.is_draining(1) && !s.is_live(1));
        assert_eq!(
            s.usage(),
            PasidUsage {
                capacity: 3,
                used: 2,
                draining: 1,
                free: 0
            }
        );
        s.drained(1).unwrap();
        assert_eq!(s.allocate(), Ok(1));
        assert!(s.is_live(1));
    }

    #[test]
    fn release_steps_out_of_order_are_refused() {
        let mut s = PasidSpace::new(8);
        let p = s.allocate().unwrap();
        assert_eq!(s.drained(p), Err(PasidError::NotDraining(p)));
        s.release(p).unwrap();
        assert_eq!(s.release(p), Err(PasidError::NotAllocated(p)));
        s.drained(p).unwrap();
        assert_eq!(s.drained(p), Err(PasidError::NotDraining(p)));
        assert_eq!(s.release(0), Err(PasidError::NotAllocated(0)));
    }

    #[test]
    fn a_claimed_pasid_is_skipped_and_comes_back_once_drained() {
        let mut s = PasidSpace::new(5);
        assert_eq!(s.allocate(), Ok(1));
        s.claim(3).unwrap();
        assert_eq!(s.claim(3), Err(PasidError::InUse(3)));
        assert_eq!(s.claim(1), Err(PasidError::InUse(1)));
        assert_eq!(s.claim(0), Err(PasidError::OutOfRange { pasid: 0, max: 5 }));
        assert_eq!(s.claim(6), Err(PasidError::OutOfRange { pasid: 6, max: 5 }));
        assert_eq!(s.allocate(), Ok(2));
        assert_eq!(s.allocate(), Ok(4), "3 is claimed");
        s.claim(5).unwrap();
        assert!(!s.has_free());
        assert_eq!(s.allocate(), Err(PasidError::PasidsExhausted(5)));
        s.release(5).unwrap();
        assert!(!s.has_free(), "5 drains");
        s.drained(5).unwrap();
        assert!(s.has_free());
        assert_eq!(s.allocate(), Ok(5));
        // A free PASID below the high-water mark can be claimed too.
        s.release(2).unwrap();
        s.drained(2).unwrap();
        s.claim(2).unwrap();
        assert_eq!(s.usage().free, 0);
    }

    #[test]
    fn the_space_is_twenty_bits_and_never_zero() {
        let mut s = PasidSpace::new(u32::MAX);
        assert_eq!(s.usage().capacity, PASID_MAX);
        assert_eq!(s.allocate(), Ok(1));
        let a = PasidAllocator::default();
        a.release_draining(a.allocate().unwrap()).unwrap();
        assert_eq!(a.allocate(), Ok(2));
        a.drained(1).unwrap();
        assert_eq!(a.allocate(), Ok(1));
        assert_eq!(a.usage().used, 2);
    }
}
