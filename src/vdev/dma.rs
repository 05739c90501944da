//! What a VMM mapped for one instance: the DMA map table and the guest
//! memory built from it.
//!
//! Each DMA_MAP with an fd becomes a `vm-memory` region of a new memory map
//! that is published whole (`GuestMemoryAtomic`), so jobs in flight keep the
//! map they started with. Every address a guest hands the device is checked
//! here against what the VMM mapped, with the permission the job needs.
//!
//! Only maps that are readable, writable and fd-backed become guest memory
//! the device can touch (QEMU's RAM is all three). Read-only and fd-less maps
//! (ROM, BIOS, other devices' BARs) are recorded but not reachable: a
//! descriptor pointing there gets `BadAddress`, and a ring there is refused.
//!
//! Every device write marks its 4 KiB page in the region's dirty bitmap
//! (vm-memory's `AtomicBitmap`); DMA logging for migration reads and clears
//! those bits (`start_dirty_log`, `report_dirty`).

use std::fs::File;
use std::os::fd::OwnedFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::accel::{AddressSpace, GuestMemory};
use crate::vdev::device::{DeviceError, DmaMapping};

const PAGE: usize = 4096;

/// Where a DMA map may lie, the one rule both map tables hold to (the
/// transport's `DmaTable` and [`DmaSpace`]): the map's exclusive end
/// `iova + size` must be a 64-bit address, so no map reaches the last byte
/// of the address space and the top page `2^64 - 4096..` is never mapped.
/// vm-memory cannot hold a region ending at 2^64 (its end would wrap), and
/// no guest has RAM there (x86-64 physical addresses have at most 52 bits).
/// Returns that end, or `None` when the map breaks the rule.
pub fn map_end(iova: u64, size: u64) -> Option<u64> {
    iova.checked_add(size)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapEntry {
    iova: u64,
    size: u64,
    /// Readable, writable and backed by an fd: the device may touch it.
    reachable: bool,
}

/// The DMA map table and the address space built from it.
pub struct DmaSpace {
    maps: Vec<MapEntry>,
    space: AddressSpace,
    /// DMA logging is on (`start_dirty_log`).
    dirty_log: bool,
}

impl Default for DmaSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl DmaSpace {
    pub fn new() -> Self {
        DmaSpace {
            maps: Vec::new(),
            space: GuestMemoryAtomic::new(GuestMemory::new()),
            dirty_log: false,
        }
    }

    /// The fd behind each reachable map, keyed `dma/<iova>` (iova in hex).
    pub fn held_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        let mem = self.space.memory();
        mem.iter()
            .filter_map(|r| {
                let fd = r.file_offset()?.file().as_raw_fd();
                Some((format!("dma/{:#x}", r.start_addr().raw_value()), fd))
            })
            .collect()
    }

    /// The address space the engines resolve through (shared, swapped whole).
    pub fn address_space(&self) -> AddressSpace {
        self.space.clone()
    }

    pub fn map(&mut self, map: DmaMapping) -> Result<(), DeviceError> {
        let end = map_end(map.iova, map.size)
            .ok_or_else(|| DeviceError::Invalid("iova + size overflows".into()))?;
        if self
            .maps
            .iter()
            .any(|m| map.iova < m.iova + m.size && m.iova < end)
        {
            return Err(DeviceError::Invalid(format!(
                "{:#x}+{:#x} overlaps a mapping",
                map.iova, map.size
            )));
        }
        let reachable = map.readable && map.writable && map.fd.is_some();
        if let (true, Some((fd, offset))) = (reachable, map.fd) {
            let region = map_region(fd, offset, map.iova, map.size)?;
            let guard = self
                .space
                .lock()
                .map_err(|_| DeviceError::Invalid("memory map lock poisoned".into()))?;
            let new = self
                .space
                .memory()
                .insert_region(std::sync::Arc::new(region))
                .map_err(|e| DeviceError::Invalid(format!("cannot add region: {e}")))?;
            guard.replace(new);
        }
        self.maps.push(MapEntry {
            iova: map.iova,
            size: map.size,
            reachable,
        });
        self.maps.sort_by_key(|m| m.iova);
        Ok(())
    }

    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DeviceError> {
        let i = self
            .maps
            .iter()
            .position(|m| m.iova == iova && m.size == size)
            .ok_or_else(|| DeviceError::Invalid(format!("no mapping {iova:#x}+{size:#x}")))?;
        if self.maps[i].reachable {
            let guard = self
                .space
                .lock()
                .map_err(|_| DeviceError::Invalid("memory map lock poisoned".into()))?;
            let new = match self.space.memory().remove_region(GuestAddress(iova), size) {
                Ok((new, _old)) => new,
                Err(e) => return Err(DeviceError::Invalid(format!("cannot remove region: {e}"))),
            };
            guard.replace(new);
        }
        // Only now, so the table and the memory map never disagree.
        self.maps.remove(i);
        Ok(())
    }

    pub fn unmap_all(&mut self) {
        self.maps.clear();
        if let Ok(guard) = self.space.lock() {
            guard.replace(GuestMemory::new());
        }
    }

    /// Is `[addr, addr + len)` entirely inside reachable memory? Adjacent maps
    /// count as one range.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut cursor = addr;
        for m in self.maps.iter().filter(|m| m.reachable) {
            if m.iova <= cursor && cursor < m.iova + m.size {
                cursor = m.iova + m.size;
                if cursor >= end {
                    return true;
                }
            }
        }
        len == 0
            && self
                .maps
                .iter()
                .any(|m| m.reachable && m.iova <= addr && addr < m.iova + m.size)
    }
    /// DMA_LOGGING_START: from now on [`report_dirty`](Self::report_dirty)
    /// reports the pages the device writes. vm-memory marks every device
    /// write in each region's bitmap (4 KiB pages) all the time; starting
    /// clears them, so what was written before is not reported.
    pub fn start_dirty_log(&mut self, page_size: u64) -> Result<(), DeviceError> {
        if page_size != PAGE as u64 {
            return Err(DeviceError::NotSupported(format!(
                "dirty logging in {page_size:#x}-byte pages (the device logs {PAGE:#x})"
            )));
        }
        for region in self.space.memory().iter() {
            MmapRegion::bitmap(region).reset();
        }
        self.dirty_log = true;
        Ok(())
    }

    /// DMA_LOGGING_STOP.
    pub fn stop_dirty_log(&mut self) {
        self.dirty_log = false;
    }

    /// DMA_LOGGING_REPORT: sets bit `i` of `bitmap` (host-endian u64 words,
    /// bit `i % 64` of word `i / 64`) when a byte of `[iova + i * page_size,
    /// iova + (i + 1) * page_size)` was written since logging started or
    /// since the last report of that page, and clears what it reports. A
    /// page is cleared only after it was seen set, so a write that lands
    /// while the report runs is reported now or by the next report, never
    /// lost. Memory the device cannot reach is never written: its bits are 0.
    pub fn report_dirty(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        if !self.dirty_log {
            return Err(DeviceError::Invalid("dirty logging is off".into()));
        }
        if !page_size.is_power_of_two() {
            return Err(DeviceError::Invalid(format!(
                "report page size {page_size:#x} is not a power of two"
            )));
        }
        let end = iova
            .checked_add(size)
            .ok_or_else(|| DeviceError::Invalid("iova + size overflows".into()))?;
        let bits = size.div_ceil(page_size);
        let words = bits.div_ceil(64);
        if bitmap.len() as u64 != words * 8 {
            return Err(DeviceError::Invalid(format!(
                "a bitmap of {} bytes for {bits} pages",
                bitmap.len()
            )));
        }
        let mut out = vec![0u64; words as usize];
        let mem = self.space.memory();
        for region in mem.iter() {
            let start = region.start_addr().raw_value();
            let Some(region_end) = start.checked_add(region.len()) else {
                continue;
            };
            let (lo, hi) = (iova.max(start), end.min(region_end));
            if lo >= hi {
                continue;
            }
            let map = MmapRegion::bitmap(region);
            let page = PAGE as u64;
            let first = (lo - start) / page;
            let last = (hi - 1 - start) / page;
            for n in first..=last {
                let n = n as usize;
                if !map.is_bit_set(n) {
                    continue;
                }
                map.reset_bit(n);
                // The part of this 4 KiB page inside the report, in its bits.
                let p_lo = (start + n as u64 * page).max(iova);
                let p_hi = (start + (n as u64 + 1) * page).min(end);
                for bit in (p_lo - iova) / page_size..=(p_hi - 1 - iova) / page_size {
                    out[(bit / 64) as usize] |= 1 << (bit % 64);
                }
            }
        }
        for (chunk, word) in bitmap.chunks_exact_mut(8).zip(out) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ok(())
    }
}

/// mmap `size` bytes of `fd` at `offset` as a guest region at `iova`, with a
/// dirty bitmap.
///
/// A device access beyond the end of the file raises SIGBUS, which would kill
/// the whole daemon and every VM it serves. vm-memory does not check the
/// length, and a VMM could shrink the file after the check, so the fd must be
/// sealed against shrinking (`F_SEAL_SHRINK`, as QEMU's memory-backend-memfd
/// does by default) and long enough now.
fn map_region(
    fd: OwnedFd,
    offset: u64,
    iova: u64,
    size: u64,
) -> Result<GuestRegionMmap<AtomicBitmap>, DeviceError> {
    let sealed =
        rustix::fs::fcntl_get_seals(&fd).is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK));
    if !sealed {
        return Err(DeviceError::Invalid(
            "guest memory fd is not sealed against shrinking (F_SEAL_SHRINK); use a memfd \
             backend with seals (QEMU: memory-backend-memfd, where seal=on is the default)"
                .into(),
        ));
    }
    // hugetlbfs pages are allocated on first touch and can be punched out
    // under the seal: an empty huge-page pool then SIGBUSes the daemon.
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // (`f_type`'s integer type differs between architectures.)
    #[allow(clippy::unnecessary_cast)]
    if rustix::fs::fstatfs(&fd).is_ok_and(|s| s.f_type as i64 == HUGETLBFS_MAGIC) {
        return Err(DeviceError::Invalid(
            "guest memory on hugetlbfs is not supported (a page missing from the pool would \
             fault the whole service); use a memfd backend without hugetlb"
                .into(),
        ));
    }
    let file = File::from(fd);
    let len = file.metadata()?.len();
    let end = offset
        .checked_add(size)
        .ok_or_else(|| DeviceError::Invalid("offset + size overflows".into()))?;
    if end > len {
        return Err(DeviceError::Invalid(format!(
            "fd is {len} bytes, mapping needs {end}"
        )));
    }
    let size =
        usize::try_from(size).map_err(|_| DeviceError::Invalid("mapping too large".into()))?;
    let page = std::num::NonZeroUsize::new(PAGE).expect("page size is not zero");
    let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::new(size, page))
        .with_file_offset(FileOffset::new(file, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(|e| DeviceError::Invalid(format!("mmap of guest memory failed: {e}")))?;
    GuestRegionMmap::new(region, GuestAddress(iova))
        .ok_or_else(|| DeviceError::Invalid("region wraps".into()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// Guest RAM as QEMU's memory-backend-memfd makes it: sealed against
    /// shrinking and growing.
    pub(crate) fn memfd(size: u64) -> OwnedFd {
        let fd = unsealed_memfd(size);
        let seals = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW;
        rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
        fd
    }

    fn unsealed_memfd(size: u64) -> OwnedFd {
        let flags = rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING;
        let fd = rustix::fs::memfd_create("guest", flags).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        fd
    }

    fn words(b: &[u8]) -> Vec<u64> {
        b.chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn the_dirty_log_reports_written_pages_once_in_any_page_size() {
        let mut d = DmaSpace::new();
        d.map(mapping(0x10000, 0x40000, Some(memfd(0x40000))))
            .unwrap();
        d.map(mapping(0x80000, 0x10000, Some(memfd(0x10000))))
            .unwrap();
        let mem = d.address_space();
        let mut bitmap = vec![0u8; 8];
        assert!(
            d.report_dirty(0x10000, 0x1000, 0x1000, &mut bitmap)
                .is_err(),
            "off"
        );
        // Written before START: not reported.
        mem.memory().write_obj(1u8, GuestAddress(0x10000)).unwrap();
        d.start_dirty_log(0x1000).unwrap();
        assert!(d.start_dirty_log(0x2000).is_err(), "4 KiB pages only");
        mem.memory()
            .write_slice(&[7; 0x1002], GuestAddress(0x12fff))
            .unwrap(); // pages 2, 3, 4 of the first map
        mem.memory().write_obj(2u32, GuestAddress(0x80010)).unwrap();
        let _: u32 = mem.memory().read_obj(GuestAddress(0x30000)).unwrap();

        // 64 pages from 0x10000: bits 2..=4; the second map is past it.
        let mut bitmap = vec![0u8; 8];
        d.report_dirty(0x10000, 0x40000, 0x1000, &mut bitmap)
            .unwrap();
        assert_eq!(words(&bitmap), [0b11100]);
        d.report_dirty(0x10000, 0x40000, 0x1000, &mut bitmap)
            .unwrap();
        assert_eq!(words(&bitmap), [0], "reported once");

        // 8 KiB units over both maps and the hole between: page 0x12000's
        // pair is bit 1, 0x80000 is bit (0x80000 - 0x10000) / 0x2000 = 56.
        mem.memory().write_obj(3u8, GuestAddress(0x12000)).unwrap();
        let mut bitmap = vec![0u8; 8];
        d.report_dirty(0x10000, 0x80000, 0x2000, &mut bitmap)
            .unwrap();
        assert_eq!(words(&bitmap), [1 << 1 | 1 << 56]);

        // 1 KiB units replicate a 4 KiB page's bit; an unaligned start too.
        mem.memory().write_obj(4u8, GuestAddress(0x20000)).unwrap();
        let mut bitmap = vec![0u8; 8];
        d.report_dirty(0x1fc00, 0x2000, 0x400, &mut bitmap).unwrap();
        assert_eq!(words(&bitmap), [0b11110]);

        let mut short = vec![0u8; 4];
        assert!(d.report_dirty(0x10000, 0x1000, 0x1000, &mut short).is_err());
        assert!(
            d.report_dirty(0x10000, 0x1000, 0x3000, &mut bitmap)
                .is_err()
        );
        d.stop_dirty_log();
        assert!(
            d.report_dirty(0x10000, 0x1000, 0x1000, &mut bitmap)
                .is_err()
        );
    }

    #[test]
    fn an_fd_that_could_shrink_under_the_device_is_refused() {
        let mut d = DmaSpace::new();
        let err = d
            .map(mapping(0x10000, 0x1000, Some(unsealed_memfd(0x1000))))
            .unwrap_err();
        assert!(
            matches!(err, DeviceError::Invalid(ref m) if m.contains("F_SEAL_SHRINK")),
            "{err}"
        );
        let file = tempfile::tempfile().unwrap();
        file.set_len(0x1000).unwrap();
        assert!(
            d.map(mapping(0x10000, 0x1000, Some(file.into()))).is_err(),
            "a plain file has no seals"
        );
        // Sealed: a VMM can no longer truncate it under the device.
        let fd = memfd(0x1000);
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        d.map(mapping(0x10000, 0x1000, Some(fd))).unwrap();
    }

    fn mapping(iova: u64, size: u64, fd: Option<OwnedFd>) -> DmaMapping {
        DmaMapping {
            iova,
            size,
            readable: true,
            writable: true,
            fd: fd.map(|f| (f, 0)),
        }
    }

    #[test]
    fn mapped_memory_is_reachable_and_bounds_are_exact() {
        let mut d = DmaSpace::new();
        d.map(mapping(0x10000, 0x10000, Some(memfd(0x10000))))
            .unwrap();
        d.map(mapping(0x20000, 0x1000, Some(memfd(0x1000))))
            .unwrap();
        assert!(d.contains(0x10000, 0x10000));
        assert!(d.contains(0x1f000, 0x2000), "adjacent maps form one range");
        assert!(!d.contains(0x20000, 0x1001));
        assert!(!d.contains(0xf000, 0x1001));
        assert!(!d.contains(u64::MAX, 2));
        d.address_space()
            .memory()
            .write_obj(7u32, GuestAddress(0x20ffc))
            .unwrap();
        d.unmap(0x20000, 0x1000).unwrap();
        assert!(!d.contains(0x20000, 4));
        assert!(
            d.address_space()
                .memory()
                .read_obj::<u32>(GuestAddress(0x20ffc))
                .is_err()
        );
    }

    #[test]
    fn fdless_and_short_fd_maps_are_handled() {
        let mut d = DmaSpace::new();
        d.map(mapping(0xc0000, 0x20000, None)).unwrap();
        assert!(!d.contains(0xc0000, 4), "fd-less memory is not reachable");
        let err = d
            .map(mapping(0x100000, 0x10000, Some(memfd(0x1000))))
            .unwrap_err();
        assert!(err.to_string().contains("fd is 4096 bytes"), "{err}");
        assert!(
            d.map(mapping(0xc8000, 0x1000, None)).is_err(),
            "overlap refused"
        );
        assert!(d.unmap(0xc0000, 0x1000).is_err(), "unmap must be exact");
        d.unmap_all();
        assert!(d.maps.is_empty());
    }
}
