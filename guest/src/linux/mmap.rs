//! The tool's only `unsafe`: mmap/munmap and volatile or bulk accesses
//! inside a mapping, every one bounds- and alignment-checked first.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use super::LinuxError;

/// An access outside the mapping or not aligned to its width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadAccess {
    pub offset: u64,
    pub width: usize,
}

/// A live `mmap` region, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory (device registers or hugepages) that is
// never freed while `Mapping` lives; every access goes through a volatile or
// bounds-checked copy, so sharing it between threads is no less sound than
// the device sharing it with the driver.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` allows only checked volatile/copy accesses.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` shared, read-write (a sysfs `resourceN`).
    pub fn map_file(file: &File, len: usize, what: &str) -> Result<Mapping, LinuxError> {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); the fd is
        // valid for the call; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        Self::from_raw(p, len, what)
    }

    /// Anonymous memory of `len` bytes backed by 2 MiB hugepages, populated
    /// and locked so that its physical pages stay put.
    pub fn map_hugepages(len: usize) -> Result<Mapping, LinuxError> {
        // SAFETY: a fresh anonymous mapping chosen by the kernel; no fd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_HUGETLB
                    | libc::MAP_POPULATE
                    | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        Self::from_raw(p, len, "hugepages")
    }

    fn from_raw(p: *mut libc::c_void, len: usize, what: &str) -> Result<Mapping, LinuxError> {
        if p == libc::MAP_FAILED {
            return Err(LinuxError::Mmap {
                what: what.to_string(),
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| LinuxError::Mmap {
            what: what.to_string(),
            len,
            source: io::Error::other("mmap returned NULL"),
        })?;
        Ok(Mapping { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The mapping's virtual address (for `/proc/self/pagemap`).
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Pointer to `width` bytes at `offset`, checked for bounds and natural alignment.
    fn at(&self, offset: u64, width: usize, align: usize) -> Result<*mut u8, BadAccess> {
        let bad = BadAccess { offset, width };
        let end = offset.checked_add(width as u64).ok_or(bad)?;
        if end > self.len as u64 || !offset.is_multiple_of(align as u64) {
            return Err(bad);
        }
        // SAFETY: offset + width <= len, so the result stays inside the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(offset as usize) })
    }

    pub fn read_u8(&self, offset: u64) -> Result<u8, BadAccess> {
        let p = self.at(offset, 1, 1)?;
        // SAFETY: in bounds (checked by `at`); volatile because it may be a device register.
        Ok(unsafe { p.read_volatile() })
    }
    pub fn read_u16(&self, offset: u64) -> Result<u16, BadAccess> {
        let p = self.at(offset, 2, 2)?.cast::<u16>();
        // SAFETY: in bounds and 2-aligned (checked by `at`; the mapping is page-aligned).
        Ok(u16::from_le(unsafe { p.read_volatile() }))
    }
    pub fn read_u32(&self, offset: u64) -> Result<u32, BadAccess> {
        let p = self.at(offset, 4, 4)?.cast::<u32>();
        // SAFETY: in bounds and 4-aligned (checked by `at`; the mapping is page-aligned).
        Ok(u32::from_le(unsafe { p.read_volatile() }))
    }
    pub fn write_u8(&self, offset: u64, v: u8) -> Result<(), BadAccess> {
        let p = self.at(offset, 1, 1)?;
        // SAFETY: in bounds (checked by `at`).
        unsafe { p.write_volatile(v) };
        Ok(())
    }
    pub fn write_u16(&self, offset: u64, v: u16) -> Result<(), BadAccess> {
        let p = self.at(offset, 2, 2)?.cast::<u16>();
        // SAFETY: in bounds and 2-aligned (checked by `at`).
        unsafe { p.write_volatile(v.to_le()) };
        Ok(())
    }
    pub fn write_u32(&self, offset: u64, v: u32) -> Result<(), BadAccess> {
        let p = self.at(offset, 4, 4)?.cast::<u32>();
        // SAFETY: in bounds and 4-aligned (checked by `at`).
        unsafe { p.write_volatile(v.to_le()) };
        Ok(())
    }

    /// Copies out of the mapping (ordinary memory only, not registers).
    pub fn copy_out(&self, offset: u64, buf: &mut [u8]) -> Result<(), BadAccess> {
        let p = self.at(offset, buf.len(), 1)?;
        // SAFETY: source in bounds (checked); `buf` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies into the mapping (ordinary memory only, not registers).
    pub fn copy_in(&self, offset: u64, data: &[u8]) -> Result<(), BadAccess> {
        let p = self.at(offset, data.len(), 1)?;
        // SAFETY: destination in bounds (checked); `data` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing refers to
        // the mapping after its owner is dropped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(len: usize) -> (std::path::PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("wdvirt-guest-mmap-{}-{len}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        (path, f)
    }

    #[test]
    fn file_mapping_checks_bounds_and_alignment() {
        let (path, f) = temp_file(4096);
        let m = Mapping::map_file(&f, 4096, "test").unwrap();
        m.write_u32(8, 0x1122_3344).unwrap();
        assert_eq!(m.read_u32(8).unwrap(), 0x1122_3344);
        assert_eq!(m.read_u16(10).unwrap(), 0x1122);
        assert_eq!(m.read_u8(8).unwrap(), 0x44);
        m.write_u16(10, 0xaabb).unwrap();
        m.write_u8(12, 9).unwrap();
        assert_eq!(m.read_u32(8).unwrap(), 0xaabb_3344);
        assert_eq!(
            m.read_u32(9),
            Err(BadAccess {
                offset: 9,
                width: 4
            })
        );
        assert_eq!(
            m.read_u32(4096),
            Err(BadAccess {
                offset: 4096,
                width: 4
            })
        );
        assert!(m.write_u16(4095, 0).is_err());
        assert!(m.read_u32(u64::MAX - 1).is_err());
        let mut buf = [0u8; 4];
        m.copy_out(8, &mut buf).unwrap();
        assert_eq!(buf, [0x44, 0x33, 0xbb, 0xaa]);
        assert!(m.copy_in(4093, &buf).is_err());
        drop(m);
        // MAP_SHARED: the write reached the file.
        assert_eq!(std::fs::read(&path).unwrap()[12], 9);
        std::fs::remove_file(path).unwrap();
    }
}
