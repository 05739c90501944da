//! Partitioning a physical accelerator into instances: today the PASID
//! space (each instance gets its own, from the host, never from the guest).
//! Neighbours: `daemon` asks for allocations; `vdev` receives them.

use std::collections::BTreeSet;

use parking_lot::Mutex;

use crate::accel::Pasid;

/// PASIDs are 20 bits wide (PCIe); 0 is reserved for the host's own DMA.
pub const PASID_MAX: Pasid = (1 << 20) - 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    #[error("all {0} PASIDs are in use")]
    PasidsExhausted(u32),
    #[error("PASID {0} is not allocated")]
    NotAllocated(Pasid),
}

/// Hands out unique PASIDs in `1..=max`, lowest free first.
#[derive(Debug)]
pub struct PasidAllocator {
    max: Pasid,
    used: Mutex<BTreeSet<Pasid>>,
}

impl Default for PasidAllocator {
    fn default() -> Self {
        Self::new(PASID_MAX)
    }
}

impl PasidAllocator {
    pub fn new(max: Pasid) -> Self {
        PasidAllocator {
            max: max.min(PASID_MAX),
            used: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn allocate(&self) -> Result<Pasid, PartitionError> {
        let mut used = self.used.lock();
        let mut candidate = 1;
        for &p in used.iter() {
            if p != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate > self.max {
            return Err(PartitionError::PasidsExhausted(self.max));
        }
        used.insert(candidate);
        Ok(candidate)
    }

    pub fn release(&self, pasid: Pasid) -> Result<(), PartitionError> {
        if self.used.lock().remove(&pasid) {
            Ok(())
        } else {
            Err(PartitionError::NotAllocated(pasid))
        }
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
        assert_eq!(a.allocate(), Err(PartitionError::PasidsExhausted(3)));
        a.release(2).unwrap();
        assert_eq!(a.allocate(), Ok(2));
        assert_eq!(a.release(9), Err(PartitionError::NotAllocated(9)));
    }
}
