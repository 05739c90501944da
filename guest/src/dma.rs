//! Device-visible memory: the rings, index blocks and job buffers.
//!
//! [`DmaMemory`] reads and writes memory by *device* address (a guest-physical
//! address in a Linux guest without an IOMMU). [`DmaAllocator`] hands out
//! aligned pieces of one or more address ranges, never a piece that crosses a
//! range's end (in the Linux tool each range is one physically contiguous
//! hugepage). [`DmaPool`] bundles both behind an `Arc` so that a queue and its
//! staging buffers can return memory when they are dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DmaError {
    #[error("DMA range {addr:#x}+{len:#x} is outside device-visible memory")]
    OutOfRange { addr: u64, len: u64 },
    #[error("DMA word access at {addr:#x} is not 4-byte aligned")]
    Unaligned { addr: u64 },
    #[error("no free DMA memory for {len:#x} bytes aligned to {align:#x}")]
    Exhausted { len: u64, align: u64 },
    #[error("invalid DMA allocation request: {len:#x} bytes aligned to {align:#x}")]
    BadRequest { len: u64, align: u64 },
    #[error("DMA buffer {addr:#x}+{len:#x} was not allocated here")]
    BadFree { addr: u64, len: u64 },
    #[error("DMA region {base:#x}+{len:#x} is empty, overflows or overlaps another")]
    BadRegion { base: u64, len: u64 },
    #[error("DMA memory access failed: {0}")]
    Backend(String),
}

/// Memory the device reads and writes, addressed by device address.
///
/// `read_u32`/`write_u32` are single, naturally aligned, 4-byte (atomic-width)
/// volatile accesses: they are used for the ring indexes and the CQE phase
/// word, which the device changes concurrently. Ordering between accesses is
/// the driver's job (it issues fences); implementations must not reorder or
/// split word accesses.
pub trait DmaMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError>;
    fn read_u32(&self, addr: u64) -> Result<u32, DmaError>;
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError>;
}

impl<T: DmaMemory + ?Sized> DmaMemory for &T {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        (**self).read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        (**self).write(addr, data)
    }
    fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        (**self).read_u32(addr)
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError> {
        (**self).write_u32(addr, value)
    }
}

impl<T: DmaMemory + ?Sized> DmaMemory for Arc<T> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        (**self).read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        (**self).write(addr, data)
    }
    fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        (**self).read_u32(addr)
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError> {
        (**self).write_u32(addr, value)
    }
}

/// Plain heap memory pretending to be device-visible at `[base, base + len)`.
/// For tests and for peers that move bytes by message (no shared mapping).
pub struct HeapMemory {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl HeapMemory {
    pub fn new(base: u64, len: usize) -> Self {
        HeapMemory {
            base,
            bytes: Mutex::new(vec![0; len]),
        }
    }
    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn len(&self) -> usize {
        self.bytes.lock().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn range(
        &self,
        addr: u64,
        len: usize,
        total: usize,
    ) -> Result<std::ops::Range<usize>, DmaError> {
        let err = DmaError::OutOfRange {
            addr,
            len: len as u64,
        };
        let start = addr.checked_sub(self.base).ok_or(err.clone())?;
        let end = start.checked_add(len as u64).ok_or(err.clone())?;
        if end > total as u64 {
            return Err(err);
        }
        Ok(start as usize..end as usize)
    }
}

impl DmaMemory for HeapMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let bytes = self.bytes.lock();
        let r = self.range(addr, buf.len(), bytes.len())?;
        buf.copy_from_slice(&bytes[r]);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut bytes = self.bytes.lock();
        let r = self.range(addr, data.len(), bytes.len())?;
        bytes[r].copy_from_slice(data);
        Ok(())
    }
    fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        if !addr.is_multiple_of(4) {
            return Err(DmaError::Unaligned { addr });
        }
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError> {
        if !addr.is_multiple_of(4) {
            return Err(DmaError::Unaligned { addr });
        }
        self.write(addr, &value.to_le_bytes())
    }
}

/// A piece of device-visible memory: its device address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaBuffer {
    pub addr: u64,
    pub len: u64,
}

impl DmaBuffer {
    pub fn end(&self) -> u64 {
        self.addr + self.len
    }
}

/// First-fit allocator over disjoint address ranges, with coalescing frees.
/// A buffer never crosses the end of the range it came from.
#[derive(Debug, Default)]
pub struct DmaAllocator {
    /// Ranges as given: start -> end.
    regions: BTreeMap<u64, u64>,
    /// Free pieces: start -> end. Adjacent pieces of one region are merged.
    free: BTreeMap<u64, u64>,
    /// Handed-out buffers: start -> end.
    used: BTreeMap<u64, u64>,
}

impl DmaAllocator {
    /// An allocator over `[base, base + len)`.
    pub fn new(base: u64, len: u64) -> Result<Self, DmaError> {
        let mut a = DmaAllocator::default();
        a.add_region(base, len)?;
        Ok(a)
    }

    /// Adds another range. Ranges must not overlap; touching ranges stay
    /// separate (a buffer never spans two of them).
    pub fn add_region(&mut self, base: u64, len: u64) -> Result<(), DmaError> {
        let bad = DmaError::BadRegion { base, len };
        let end = base.checked_add(len).ok_or(bad.clone())?;
        if len == 0 {
            return Err(bad);
        }
        let before = self.regions.range(..end).next_back();
        if let Some((_, &e)) = before
            && e > base
        {
            return Err(bad);
        }
        self.regions.insert(base, end);
        self.free.insert(base, end);
        Ok(())
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<DmaBuffer, DmaError> {
        if len == 0 || !align.is_power_of_two() {
            return Err(DmaError::BadRequest { len, align });
        }
        let mut found = None;
        for (&start, &end) in &self.free {
            let Some(a) = start.checked_add(align - 1).map(|v| v & !(align - 1)) else {
                continue;
            };
            if let Some(e) = a.checked_add(len)
                && e <= end
            {
                found = Some((start, end, a));
                break;
            }
        }
        let (start, end, a) = found.ok_or(DmaError::Exhausted { len, align })?;
        self.free.remove(&start);
        if a > start {
            self.free.insert(start, a);
        }
        if a + len < end {
            self.free.insert(a + len, end);
        }
        self.used.insert(a, a + len);
        Ok(DmaBuffer { addr: a, len })
    }

    /// Returns a buffer. Refuses one it did not hand out (or already got back).
    pub fn free(&mut self, buf: DmaBuffer) -> Result<(), DmaError> {
        match self.used.get(&buf.addr) {
            Some(&end) if end == buf.addr + buf.len => {}
            _ => {
                return Err(DmaError::BadFree {
                    addr: buf.addr,
                    len: buf.len,
                });
            }
        }
        self.used.remove(&buf.addr);
        let (region_start, region_end) = self
            .regions
            .range(..=buf.addr)
            .next_back()
            .map(|(&s, &e)| (s, e))
            .ok_or(DmaError::BadFree {
                addr: buf.addr,
                len: buf.len,
            })?;
        let mut start = buf.addr;
        let mut end = buf.end();
        // Merge with the free piece just before, if it ends here (same region).
        if let Some((&s, &e)) = self.free.range(..start).next_back()
            && e == start
            && s >= region_start
        {
            self.free.remove(&s);
            start = s;
        }
        // And with the one just after.
        if end < region_end
            && let Some(e) = self.free.remove(&end)
        {
            end = e;
        }
        self.free.insert(start, end);
        Ok(())
    }

    /// Bytes not handed out.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }

    /// The largest single allocation (alignment 1) that would succeed now.
    pub fn largest_free(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).max().unwrap_or(0)
    }

    /// The ranges given to the allocator, as buffers.
    pub fn regions(&self) -> impl Iterator<Item = DmaBuffer> + '_ {
        self.regions.iter().map(|(&s, &e)| DmaBuffer {
            addr: s,
            len: e - s,
        })
    }
}

struct PoolInner<D: ?Sized> {
    alloc: Mutex<DmaAllocator>,
    mem: D,
}

/// Device-visible memory plus its allocator, shared by queues and staging
/// buffers. Cloning is cheap.
pub struct DmaPool<D: DmaMemory> {
    inner: Arc<PoolInner<D>>,
}

impl<D: DmaMemory> Clone for DmaPool<D> {
    fn clone(&self) -> Self {
        DmaPool {
            inner: self.inner.clone(),
        }
    }
}

impl<D: DmaMemory> DmaPool<D> {
    pub fn new(mem: D, alloc: DmaAllocator) -> Self {
        DmaPool {
            inner: Arc::new(PoolInner {
                alloc: Mutex::new(alloc),
                mem,
            }),
        }
    }

    pub fn memory(&self) -> &D {
        &self.inner.mem
    }

    /// An owned buffer, returned to the allocator when dropped. Its bytes are
    /// whatever was there before; use [`PoolBuffer::zero`] where that matters.
    pub fn alloc(&self, len: u64, align: u64) -> Result<PoolBuffer<D>, DmaError> {
        let buf = self.inner.alloc.lock().alloc(len, align)?;
        Ok(PoolBuffer {
            pool: self.clone(),
            buf,
        })
    }

    pub fn free_bytes(&self) -> u64 {
        self.inner.alloc.lock().free_bytes()
    }

    pub fn largest_free(&self) -> u64 {
        self.inner.alloc.lock().largest_free()
    }
}

/// A [`DmaBuffer`] owned by a [`DmaPool`].
pub struct PoolBuffer<D: DmaMemory> {
    pool: DmaPool<D>,
    buf: DmaBuffer,
}

impl<D: DmaMemory> PoolBuffer<D> {
    pub fn addr(&self) -> u64 {
        self.buf.addr
    }
    pub fn len(&self) -> u64 {
        self.buf.len
    }
    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }
    pub fn buffer(&self) -> DmaBuffer {
        self.buf
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64, DmaError> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(e) if e <= self.buf.len => Ok(self.buf.addr + offset),
            _ => Err(DmaError::OutOfRange {
                addr: self.buf.addr.wrapping_add(offset),
                len: len as u64,
            }),
        }
    }

    /// Writes `data` at `offset` inside this buffer.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        let a = self.check(offset, data.len())?;
        self.pool.memory().write(a, data)
    }

    /// Reads `buf.len()` bytes at `offset` inside this buffer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let a = self.check(offset, buf.len())?;
        self.pool.memory().read(a, buf)
    }

    /// Reads `len` bytes from the start of the buffer.
    pub fn to_vec(&self, len: usize) -> Result<Vec<u8>, DmaError> {
        let mut v = vec![0u8; len];
        self.read(0, &mut v)?;
        Ok(v)
    }

    /// Fills the whole buffer with zeroes.
    pub fn zero(&self) -> Result<(), DmaError> {
        const CHUNK: usize = 64 * 1024;
        let zeroes = vec![0u8; CHUNK.min(self.buf.len as usize)];
        let mut off = 0u64;
        while off < self.buf.len {
            let n = (self.buf.len - off).min(CHUNK as u64) as usize;
            self.write(off, &zeroes[..n])?;
            off += n as u64;
        }
        Ok(())
    }
}

impl<D: DmaMemory> Drop for PoolBuffer<D> {
    fn drop(&mut self) {
        // Cannot fail for a buffer this pool handed out.
        let _ = self.pool.inner.alloc.lock().free(self.buf);
    }
}

impl<D: DmaMemory> std::fmt::Debug for PoolBuffer<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuffer")
            .field("addr", &self.buf.addr)
            .field("len", &self.buf.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_respects_alignment_and_region() {
        let mut a = DmaAllocator::new(0x1003, 0x1000).unwrap();
        let b = a.alloc(10, 64).unwrap();
        assert_eq!(b.addr % 64, 0);
        assert!(b.addr >= 0x1003 && b.end() <= 0x2003);
        let c = a.alloc(100, 4096).unwrap_err();
        assert_eq!(
            c,
            DmaError::Exhausted {
                len: 100,
                align: 4096
            }
        );
        let d = a.alloc(1, 1).unwrap();
        assert_eq!(
            d.addr, 0x1003,
            "the gap before the aligned buffer is reused"
        );
    }

    #[test]
    fn exhaustion_and_free_restore_everything() {
        let mut a = DmaAllocator::new(0, 1024).unwrap();
        let bufs: Vec<_> = (0..4).map(|_| a.alloc(256, 64).unwrap()).collect();
        assert_eq!(a.free_bytes(), 0);
        assert!(matches!(a.alloc(1, 1), Err(DmaError::Exhausted { .. })));
        // Free in an order that needs merging on both sides.
        for i in [1, 3, 0, 2] {
            a.free(bufs[i]).unwrap();
        }
        assert_eq!(a.free_bytes(), 1024);
        assert_eq!(a.largest_free(), 1024);
        assert_eq!(
            a.alloc(1024, 1024).unwrap(),
            DmaBuffer { addr: 0, len: 1024 }
        );
    }

    #[test]
    fn double_free_and_foreign_free_are_refused() {
        let mut a = DmaAllocator::new(0x10000, 0x1000).unwrap();
        let b = a.alloc(128, 64).unwrap();
        assert!(matches!(
            a.free(DmaBuffer {
                addr: b.addr,
                len: 64
            }),
            Err(DmaError::BadFree { .. })
        ));
        a.free(b).unwrap();
        assert!(matches!(a.free(b), Err(DmaError::BadFree { .. })));
        assert!(matches!(
            a.free(DmaBuffer { addr: 5, len: 5 }),
            Err(DmaError::BadFree { .. })
        ));
    }

    #[test]
    fn buffers_never_span_touching_regions() {
        let mut a = DmaAllocator::new(0, 0x1000).unwrap();
        a.add_region(0x1000, 0x1000).unwrap();
        assert_eq!(a.largest_free(), 0x1000);
        assert!(matches!(
            a.alloc(0x1800, 1),
            Err(DmaError::Exhausted { .. })
        ));
        let x = a.alloc(0x1000, 1).unwrap();
        let y = a.alloc(0x1000, 1).unwrap();
        a.free(x).unwrap();
        a.free(y).unwrap();
        // Freed pieces of touching regions are not merged into one.
        assert_eq!(a.largest_free(), 0x1000);
    }

    #[test]
    fn bad_regions_and_requests_are_refused() {
        let mut a = DmaAllocator::new(0x1000, 0x1000).unwrap();
        assert!(matches!(
            a.add_region(0x1800, 0x100),
            Err(DmaError::BadRegion { .. })
        ));
        assert!(matches!(
            a.add_region(0x800, 0x1000),
            Err(DmaError::BadRegion { .. })
        ));
        assert!(matches!(
            a.add_region(u64::MAX, 2),
            Err(DmaError::BadRegion { .. })
        ));
        assert!(matches!(
            a.add_region(0x5000, 0),
            Err(DmaError::BadRegion { .. })
        ));
        assert!(matches!(a.alloc(0, 1), Err(DmaError::BadRequest { .. })));
        assert!(matches!(a.alloc(1, 3), Err(DmaError::BadRequest { .. })));
    }

    #[test]
    fn heap_memory_bounds_and_words() {
        let m = HeapMemory::new(0x4000, 64);
        m.write_u32(0x4000 + 60, 0xdead_beef).unwrap();
        assert_eq!(m.read_u32(0x4000 + 60).unwrap(), 0xdead_beef);
        assert!(matches!(
            m.read_u32(0x4002),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            m.write_u32(0x4000 + 64, 0),
            Err(DmaError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.write(0x3fff, &[1]),
            Err(DmaError::OutOfRange { .. })
        ));
        let mut b = [0u8; 4];
        assert!(matches!(
            m.read(u64::MAX - 1, &mut b),
            Err(DmaError::OutOfRange { .. })
        ));
    }

    #[test]
    fn pool_buffers_return_on_drop_and_check_bounds() {
        let pool = DmaPool::new(
            HeapMemory::new(0, 4096),
            DmaAllocator::new(0, 4096).unwrap(),
        );
        {
            let b = pool.alloc(100, 64).unwrap();
            assert_eq!(pool.free_bytes(), 4096 - 100);
            b.write(90, &[7; 10]).unwrap();
            assert!(b.write(91, &[7; 10]).is_err());
            let mut out = [0u8; 10];
            b.read(90, &mut out).unwrap();
            assert_eq!(out, [7; 10]);
            b.zero().unwrap();
            assert_eq!(b.to_vec(100).unwrap(), vec![0; 100]);
        }
        assert_eq!(pool.free_bytes(), 4096);
    }
}
