//! The transport's own record of the VMM's DMA maps: the generic checks
//! (alignment, overflow, overlap → EEXIST, exact-match unmap) and the
//! per-connection caps (map count, fd-backed bytes → ENOSPC) run here
//! before the device hears of a map.

use std::collections::BTreeMap;

use super::error::TransportError;
use super::wire::PAGE_SIZE;
use crate::vdev::dma::map_end;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaEntry {
    pub iova: u64,
    pub size: u64,
    pub flags: u32,
    pub has_fd: bool,
    /// The fd's offset of `iova` (0 without an fd).
    pub offset: u64,
}

#[derive(Debug)]
pub struct DmaTable {
    /// Keyed by iova; entries never overlap.
    maps: BTreeMap<u64, DmaEntry>,
    limit: usize,
    /// Sum of the sizes of the fd-backed entries, and its cap.
    fd_bytes: u64,
    fd_bytes_limit: u64,
}

impl DmaTable {
    /// A table of at most `limit` maps, whose fd-backed maps total at most
    /// `fd_bytes_limit` bytes.
    pub fn new(limit: usize, fd_bytes_limit: u64) -> DmaTable {
        DmaTable {
            maps: BTreeMap::new(),
            limit,
            fd_bytes: 0,
            fd_bytes_limit,
        }
    }

    /// Bytes of fd-backed maps held now.
    pub fn fd_bytes(&self) -> u64 {
        self.fd_bytes
    }

    pub fn len(&self) -> usize {
        self.maps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Checks that `iova..iova+size` (backed by an fd if `has_fd`) can be
    /// added; nothing is changed.
    pub fn check_insert(&self, iova: u64, size: u64, has_fd: bool) -> Result<(), TransportError> {
        if size == 0 {
            return Err(TransportError::invalid("DMA map of size 0"));
        }
        if !iova.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(TransportError::invalid(format!(
                "DMA map {iova:#x}+{size:#x} not aligned to {PAGE_SIZE:#x}"
            )));
        }
        // The device's rule (`vdev::dma::map_end`): the exclusive end must
        // be an address, so the top page is refused here, before the device
        // is asked, with the same verdict it would give.
        let last = map_end(iova, size).map(|end| end - 1).ok_or_else(|| {
            TransportError::invalid(format!(
                "DMA map {iova:#x}+{size:#x} reaches the end of the 64-bit address space (a map must end below 2^64)"
            ))
        })?;
        if self.overlapping(iova, last).is_some() {
            return Err(TransportError::DmaOverlap { iova, size });
        }
        if self.maps.len() >= self.limit {
            return Err(TransportError::DmaTableFull(self.limit));
        }
        if has_fd
            && self
                .fd_bytes
                .checked_add(size)
                .is_none_or(|total| total > self.fd_bytes_limit)
        {
            return Err(TransportError::DmaBytesFull {
                iova,
                size,
                mapped: self.fd_bytes,
                limit: self.fd_bytes_limit,
            });
        }
        Ok(())
    }

    /// Records a map already accepted by [`check_insert`](Self::check_insert)
    /// and by the device.
    pub fn insert(&mut self, entry: DmaEntry) {
        if entry.has_fd {
            self.fd_bytes += entry.size;
        }
        if let Some(old) = self.maps.insert(entry.iova, entry)
            && old.has_fd
        {
            // Not reached after check_insert (no overlap); kept exact anyway.
            self.fd_bytes -= old.size;
        }
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
        let e = self.maps.remove(&iova)?;
        if e.has_fd {
            self.fd_bytes -= e.size;
        }
        Some(e)
    }

    pub fn clear(&mut self) {
        self.maps.clear();
        self.fd_bytes = 0;
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
            offset: 0,
        }
    }

    #[test]
    fn overlap_is_eexist_and_neighbours_are_fine() {
        let mut t = DmaTable::new(16, u64::MAX);
        t.check_insert(0x10000, 0x4000, true).unwrap();
        t.insert(entry(0x10000, 0x4000));
        for (iova, size) in [
            (0x10000, 0x1000),
            (0xf000, 0x2000),
            (0x13000, 0x1000),
            (0, 0x20000),
        ] {
            let e = t.check_insert(iova, size, true).unwrap_err();
            assert_eq!(e.errno(), libc::EEXIST as u32, "{iova:#x}+{size:#x}");
        }
        t.check_insert(0xf000, 0x1000, true).unwrap();
        t.check_insert(0x14000, 0x1000, true).unwrap();
    }

    #[test]
    fn alignment_size_and_wrap_are_einval() {
        let t = DmaTable::new(16, u64::MAX);
        for (iova, size) in [
            (0x1001, 0x1000),
            (0x1000, 0x1001),
            (0, 0),
            (u64::MAX - 0xfff, 0x2000),
        ] {
            assert_eq!(
                t.check_insert(iova, size, true).unwrap_err().errno(),
                libc::EINVAL as u32
            );
        }
    }

    /// The last page of the address space, where the transport's table and
    /// the device's once disagreed (the transport took it, the device
    /// refused it): one rule, `vdev::dma::map_end`, for both.
    #[test]
    fn the_top_page_is_refused_by_both_tables_and_the_one_below_taken_by_both() {
        use crate::vdev::device::DmaMapping;
        use crate::vdev::dma::DmaSpace;
        let top = u64::MAX - 0xfff;
        let below = top - 0x1000;
        let t = DmaTable::new(16, u64::MAX);
        let mut dev = DmaSpace::new();
        let fdless = |iova, size| DmaMapping {
            iova,
            size,
            readable: true,
            writable: true,
            fd: None,
        };
        for (iova, size) in [(top, 0x1000), (below, 0x2000), (0x1000, u64::MAX - 0xfff)] {
            let e = t.check_insert(iova, size, false).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL as u32, "{iova:#x}+{size:#x}");
            assert!(e.to_string().contains("below 2^64"), "{e}");
            assert!(dev.map(fdless(iova, size)).is_err(), "{iova:#x}+{size:#x}");
        }
        t.check_insert(below, 0x1000, false).unwrap();
        dev.map(fdless(below, 0x1000)).unwrap();
        // The largest map there is: everything but the top page.
        t.check_insert(0, u64::MAX - 0xfff, false).unwrap();
        // The device's exclusive ends stay in range up there.
        assert!(!dev.contains(below, 0x2000));
    }

    #[test]
    fn unmap_needs_exact_match() {
        let mut t = DmaTable::new(16, u64::MAX);
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
    fn fd_backed_bytes_are_capped_and_released() {
        let mut t = DmaTable::new(16, 0x10000);
        t.check_insert(0, 0xc000, true).unwrap();
        t.insert(entry(0, 0xc000));
        // Exactly up to the cap is fine; one page more is ENOSPC.
        t.check_insert(0x100000, 0x4000, true).unwrap();
        let e = t.check_insert(0x100000, 0x5000, true).unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC as u32);
        assert!(matches!(
            e,
            TransportError::DmaBytesFull {
                mapped: 0xc000,
                limit: 0x10000,
                ..
            }
        ));
        // The sum cannot wrap past 2^64 into "small": maps end below 2^64,
        // so the one that would is refused for its place first.
        let mut big = DmaTable::new(16, u64::MAX);
        big.insert(entry(0, 1 << 63));
        assert_eq!(
            big.check_insert(1 << 63, 1 << 63, true)
                .unwrap_err()
                .errno(),
            libc::EINVAL as u32
        );
        let mut capped = DmaTable::new(16, 1 << 63);
        capped.insert(entry(0, 1 << 63));
        assert_eq!(
            capped
                .check_insert(1 << 63, 0x1000, true)
                .unwrap_err()
                .errno(),
            libc::ENOSPC as u32
        );
        // Fd-less maps hold no memory and are not counted.
        t.check_insert(0x100000, 0x100000, false).unwrap();
        t.insert(DmaEntry {
            has_fd: false,
            ..entry(0x100000, 0x100000)
        });
        assert_eq!(t.fd_bytes(), 0xc000);
        // Unmapping gives the bytes back; so does clearing.
        t.remove(0);
        assert_eq!(t.fd_bytes(), 0);
        t.check_insert(0x200000, 0x10000, true).unwrap();
        t.insert(entry(0x200000, 0x10000));
        assert_eq!(t.fd_bytes(), 0x10000);
        t.clear();
        assert_eq!(t.fd_bytes(), 0);
        t.check_insert(0x200000, 0x10000, true).unwrap();
    }

    #[test]
    fn table_limit_is_enospc() {
        let mut t = DmaTable::new(1, u64::MAX);
        t.insert(entry(0, 0x1000));
        assert_eq!(
            t.check_insert(0x1000, 0x1000, true).unwrap_err().errno(),
            libc::ENOSPC as u32
        );
    }
}
