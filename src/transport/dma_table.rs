//! The transport's own record of the VMM's DMA maps: the generic checks
//! (alignment, overflow, overlap → EEXIST, exact-match unmap) run here
//! before the device hears of a map.

use std::collections::BTreeMap;

use super::error::TransportError;
use super::wire::PAGE_SIZE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaEntry {
    pub iova: u64,
    pub size: u64,
    pub flags: u32,
    pub has_fd: bool,
}

#[derive(Debug)]
pub struct DmaTable {
    /// Keyed by iova; entries never overlap.
    maps: BTreeMap<u64, DmaEntry>,
    limit: usize,
}

impl DmaTable {
    pub fn new(limit: usize) -> DmaTable {
        DmaTable {
            maps: BTreeMap::new(),
            limit,
        }
    }

    pub fn len(&self) -> usize {
        self.maps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Checks that `iova..iova+size` can be added; nothing is changed.
    pub fn check_insert(&self, iova: u64, size: u64) -> Result<(), TransportError> {
        if size == 0 {
            return Err(TransportError::invalid("DMA map of size 0"));
        }
        if !iova.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(TransportError::invalid(format!(
                "DMA map {iova:#x}+{size:#x} not aligned to {PAGE_SIZE:#x}"
            )));
        }
        // The last byte must be addressable: iova + size may equal 2^64
        // only in the exclusive sense, so compute the inclusive end.
        let last = iova
            .checked_add(size - 1)
            .ok_or_else(|| TransportError::invalid(format!("DMA map {iova:#x}+{size:#x} wraps")))?;
        if self.overlapping(iova, last).is_some() {
            return Err(TransportError::DmaOverlap { iova, size });
        }
        if self.maps.len() >= self.limit {
            return Err(TransportError::DmaTableFull(self.limit));
        }
        Ok(())
    }

    /// Records a map already accepted by [`check_insert`](Self::check_insert)
    /// and by the device.
    pub fn insert(&mut self, entry: DmaEntry) {
        self.maps.insert(entry.iova, entry);
    }

    /// Checks that `iova..iova+size` is exactly one recorded map.
    /// A range that only partly matches one is EINVAL; no map at all ENOENT.
    pub fn check_remove(&self, iova: u64, size: u64) -> Result<DmaEntry, TransportError> {
        if let Some(e) = self.maps.get(&iova)
            && e.size == size
        {
            return Ok(*e);
        }
        let last = iova.saturating_add(size.saturating_sub(1));
        if size != 0 && self.overlapping(iova, last).is_some() {
            return Err(TransportError::invalid(format!(
                "DMA unmap {iova:#x}+{size:#x} does not match a map exactly"
            )));
        }
        Err(TransportError::DmaNotFound { iova, size })
    }

    pub fn remove(&mut self, iova: u64) -> Option<DmaEntry> {
        self.maps.remove(&iova)
    }

    pub fn clear(&mut self) {
        self.maps.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = &DmaEntry> {
        self.maps.values()
    }

    /// Some map intersecting the inclusive range `first..=last`.
    fn overlapping(&self, first: u64, last: u64) -> Option<&DmaEntry> {
        // The only candidate is the map starting at or before `last` with the
        // greatest start: maps do not overlap each other.
        let (_, e) = self.maps.range(..=last).next_back()?;
        let e_last = e.iova + (e.size - 1);
        (e_last >= first).then_some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(iova: u64, size: u64) -> DmaEntry {
        DmaEntry {
            iova,
            size,
            flags: 3,
            has_fd: true,
        }
    }

    #[test]
    fn overlap_is_eexist_and_neighbours_are_fine() {
        let mut t = DmaTable::new(16);
        t.check_insert(0x10000, 0x4000).unwrap();
        t.insert(entry(0x10000, 0x4000));
        for (iova, size) in [
            (0x10000, 0x1000),
            (0xf000, 0x2000),
            (0x13000, 0x1000),
            (0, 0x20000),
        ] {
            let e = t.check_insert(iova, size).unwrap_err();
            assert_eq!(e.errno(), libc::EEXIST as u32, "{iova:#x}+{size:#x}");
        }
        t.check_insert(0xf000, 0x1000).unwrap();
        t.check_insert(0x14000, 0x1000).unwrap();
    }

    #[test]
    fn alignment_size_and_wrap_are_einval() {
        let t = DmaTable::new(16);
        for (iova, size) in [
            (0x1001, 0x1000),
            (0x1000, 0x1001),
            (0, 0),
            (u64::MAX - 0xfff, 0x2000),
        ] {
            assert_eq!(
                t.check_insert(iova, size).unwrap_err().errno(),
                libc::EINVAL as u32
            );
        }
        // The very top page is addressable.
        t.check_insert(u64::MAX - 0xfff, 0x1000).unwrap();
    }

    #[test]
    fn unmap_needs_exact_match() {
        let mut t = DmaTable::new(16);
        t.insert(entry(0x10000, 0x4000));
        assert_eq!(
            t.check_remove(0x10000, 0x1000).unwrap_err().errno(),
            libc::EINVAL as u32
        );
        assert_eq!(
            t.check_remove(0x40000, 0x1000).unwrap_err().errno(),
            libc::ENOENT as u32
        );
        assert_eq!(t.check_remove(0x10000, 0x4000).unwrap().size, 0x4000);
        assert!(t.remove(0x10000).is_some());
        assert!(t.is_empty());
    }

    #[test]
    fn table_limit_is_enospc() {
        let mut t = DmaTable::new(1);
        t.insert(entry(0, 0x1000));
        assert_eq!(
            t.check_insert(0x1000, 0x1000).unwrap_err().errno(),
            libc::ENOSPC as u32
        );
    }
}
