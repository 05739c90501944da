//! DMA memory from 2 MiB hugepages, addressed by physical address.
//!
//! Each hugepage is physically contiguous, so each becomes one region of the
//! allocator and no buffer spans two. Physical addresses come from
//! `/proc/self/pagemap` (root only: others read PFN 0).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::LinuxError;
use super::mmap::Mapping;
use crate::dma::{DmaAllocator, DmaError, DmaMemory};

pub const HUGEPAGE_SIZE: usize = 2 << 20;
const PAGE_SIZE: u64 = 4096;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// The PFN in a pagemap entry (Documentation/admin-guide/mm/pagemap.rst:
/// bit 63 present, bits 0-54 PFN), if the page is present and the PFN shown.
pub fn pagemap_pfn(entry: u64) -> Option<u64> {
    let pfn = entry & ((1 << 55) - 1);
    (entry >> 63 == 1 && pfn != 0).then_some(pfn)
}

fn read_u64(path: &str) -> Result<u64, LinuxError> {
    let text = fs::read_to_string(path).map_err(LinuxError::io("reading", path))?;
    text.trim().parse().map_err(|_| LinuxError::Parse {
        path: path.into(),
        text,
    })
}

/// Makes sure `n` free 2 MiB hugepages exist, raising `nr_hugepages` if needed.
pub fn reserve(n: u64) -> Result<(), LinuxError> {
    let free = read_u64(FREE_HUGEPAGES).unwrap_or(0);
    if free >= n {
        return Ok(());
    }
    let total = read_u64(NR_HUGEPAGES)?;
    // A failed write (not root, no memory) shows up in the re-read below.
    let _ = fs::write(NR_HUGEPAGES, format!("{}\n", total + (n - free)));
    let free = read_u64(FREE_HUGEPAGES).unwrap_or(0);
    if free < n {
        return Err(LinuxError::NoHugepages { free, need: n });
    }
    Ok(())
}

struct Region {
    phys: u64,
    map: Mapping,
}

/// Hugepage-backed memory, addressed by physical address.
pub struct HugeMemory {
    /// Sorted by physical address.
    regions: Vec<Region>,
}

fn physical(pagemap: &File, vaddr: u64) -> Result<u64, LinuxError> {
    let mut b = [0u8; 8];
    pagemap
        .read_exact_at(&mut b, vaddr / PAGE_SIZE * 8)
        .map_err(LinuxError::io("reading", "/proc/self/pagemap"))?;
    let entry = u64::from_le_bytes(b);
    pagemap_pfn(entry)
        .map(|pfn| pfn * PAGE_SIZE + vaddr % PAGE_SIZE)
        .ok_or(LinuxError::NoPhysical { vaddr, entry })
}

impl HugeMemory {
    /// Reserves, maps and locks `n` hugepages and finds their physical addresses.
    pub fn allocate(n: usize) -> Result<HugeMemory, LinuxError> {
        reserve(n as u64)?;
        let path = Path::new("/proc/self/pagemap");
        let pagemap = File::open(path).map_err(LinuxError::io("opening", path))?;
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            let map = Mapping::map_hugepages(HUGEPAGE_SIZE)?;
            // MAP_POPULATE faulted it in; touch it anyway so the page is surely ours.
            let _ = map.copy_in(0, &[0]);
            let phys = physical(&pagemap, map.addr())?;
            let last = map.addr() + HUGEPAGE_SIZE as u64 - PAGE_SIZE;
            let phys_last = physical(&pagemap, last)?;
            if phys_last != phys + HUGEPAGE_SIZE as u64 - PAGE_SIZE {
                return Err(LinuxError::NoPhysical {
                    vaddr: last,
                    entry: phys_last,
                });
            }
            regions.push(Region { phys, map });
        }
        regions.sort_by_key(|r| r.phys);
        Ok(HugeMemory { regions })
    }

    /// `(physical address, length)` of each hugepage.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.phys, r.map.len() as u64))
            .collect()
    }

    /// An allocator with one region per hugepage.
    pub fn allocator(&self) -> Result<DmaAllocator, DmaError> {
        let mut a = DmaAllocator::default();
        for (p, l) in self.regions() {
            a.add_region(p, l)?;
        }
        Ok(a)
    }

    /// The region holding all of `[addr, addr + len)`, and the offset in it.
    fn find(&self, addr: u64, len: usize) -> Result<(&Mapping, u64), DmaError> {
        let err = DmaError::OutOfRange {
            addr,
            len: len as u64,
        };
        let i = self.regions.partition_point(|r| r.phys <= addr);
        let r = i
            .checked_sub(1)
            .map(|i| &self.regions[i])
            .ok_or(err.clone())?;
        let off = addr - r.phys;
        match off.checked_add(len as u64) {
            Some(end) if end <= r.map.len() as u64 => Ok((&r.map, off)),
            _ => Err(err),
        }
    }
}

impl DmaMemory for HugeMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let (m, off) = self.find(addr, buf.len())?;
        m.copy_out(off, buf).map_err(|_| DmaError::OutOfRange {
            addr,
            len: buf.len() as u64,
        })
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let (m, off) = self.find(addr, data.len())?;
        m.copy_in(off, data).map_err(|_| DmaError::OutOfRange {
            addr,
            len: data.len() as u64,
        })
    }
    fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        if !addr.is_multiple_of(4) {
            return Err(DmaError::Unaligned { addr });
        }
        let (m, off) = self.find(addr, 4)?;
        m.read_u32(off).map_err(|_| DmaError::Unaligned { addr })
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError> {
        if !addr.is_multiple_of(4) {
            return Err(DmaError::Unaligned { addr });
        }
        let (m, off) = self.find(addr, 4)?;
        m.write_u32(off, value)
            .map_err(|_| DmaError::Unaligned { addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entries_decode() {
        assert_eq!(pagemap_pfn(1 << 63 | 0x1234), Some(0x1234));
        assert_eq!(
            pagemap_pfn(1 << 63 | 1 << 62 | 1 << 55 | 0x10),
            Some(0x10),
            "flag bits above 54 are not PFN"
        );
        assert_eq!(pagemap_pfn(0x1234), None, "not present");
        assert_eq!(pagemap_pfn(1 << 63), None, "PFN hidden from non-root");
    }
}

#[cfg(test)]
mod pagemap_tests {
    use super::*;

    #[test]
    fn physical_address_keeps_the_page_offset() {
        let buf = vec![1u8; 3 * PAGE_SIZE as usize];
        let vaddr = buf.as_ptr() as u64 + PAGE_SIZE + 123;
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        match physical(&pagemap, vaddr) {
            Ok(p) => {
                assert!(root, "only root sees PFNs");
                assert_eq!(p % PAGE_SIZE, vaddr % PAGE_SIZE);
            }
            Err(e) => {
                assert!(!root, "root must see the PFN of a touched page: {e}");
                assert!(matches!(e, LinuxError::NoPhysical { .. }));
            }
        }
    }
}
