//! Register access: the driver core reaches BAR0 and BAR2 only through [`Mmio`].
//!
//! Implementations: a vfio-user client socket (host tests), an mmapped sysfs
//! `resourceN` file (the Linux tool, `crate::linux::bar`), or a fake register
//! file (unit tests).

use std::sync::Arc;

/// Why one register access failed at the transport level (not a device refusal:
/// those are latched in `ERR_STATUS`/`ERR_CODE` and read back as [`crate::RegFault`]).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MmioError {
    #[error("BAR{bar} is not mapped")]
    NoSuchBar { bar: u8 },
    #[error("BAR{bar} access at {offset:#x} (width {width}) is outside the BAR (size {size:#x})")]
    OutOfRange {
        bar: u8,
        offset: u64,
        width: u8,
        size: u64,
    },
    #[error("BAR{bar} access at {offset:#x} is not aligned to its width {width}")]
    Unaligned { bar: u8, offset: u64, width: u8 },
    #[error("register access failed: {0}")]
    Transport(String),
}

/// 32-bit register access to the device's BARs. Little-endian values.
pub trait Mmio {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError>;
    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError>;

    /// A 64-bit register read as two 32-bit reads, low half first.
    fn read64(&self, bar: u8, offset: u64) -> Result<u64, MmioError> {
        let lo = self.read32(bar, offset)?;
        let hi = self.read32(bar, offset + 4)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    /// A 64-bit register written as two 32-bit writes, low half first (the
    /// device accepts 4- or 8-byte accesses on its 64-bit registers).
    fn write64(&self, bar: u8, offset: u64, value: u64) -> Result<(), MmioError> {
        self.write32(bar, offset, value as u32)?;
        self.write32(bar, offset + 4, (value >> 32) as u32)
    }
}

impl<T: Mmio + ?Sized> Mmio for &T {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
        (**self).read32(bar, offset)
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
        (**self).write32(bar, offset, value)
    }
}

impl<T: Mmio + ?Sized> Mmio for Arc<T> {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
        (**self).read32(bar, offset)
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
        (**self).write32(bar, offset, value)
    }
}

impl<T: Mmio + ?Sized> Mmio for Box<T> {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
        (**self).read32(bar, offset)
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
        (**self).write32(bar, offset, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// Records every 32-bit access in order.
    #[derive(Default)]
    struct Log(Mutex<Vec<(char, u8, u64, u32)>>);

    impl Mmio for Log {
        fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
            self.0.lock().push(('r', bar, offset, 0));
            Ok(offset as u32 * 3)
        }
        fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
            self.0.lock().push(('w', bar, offset, value));
            Ok(())
        }
    }

    #[test]
    fn write64_is_low_then_high() {
        let log = Log::default();
        log.write64(0, 0x1000, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(
            *log.0.lock(),
            vec![('w', 0, 0x1000, 0x5566_7788), ('w', 0, 0x1004, 0x1122_3344)]
        );
    }

    #[test]
    fn read64_combines_halves_low_first() {
        let log = Log::default();
        let v = Mmio::read64(&&log, 0, 0x10).unwrap();
        assert_eq!(v, ((0x14u64 * 3) << 32) | (0x10 * 3));
        assert_eq!(log.0.lock()[0].2, 0x10);
        assert_eq!(log.0.lock()[1].2, 0x14);
    }
}
