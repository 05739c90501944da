//! BAR0 and BAR2 through mmapped sysfs `resource0`/`resource2`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;

use wdvirt_abi::pci;

use super::LinuxError;
use super::mmap::{BadAccess, Mapping};
use super::pci::PciDevice;
use crate::mmio::{Mmio, MmioError};
use crate::workload::RawBar;

pub struct BarMmio {
    bar0: Mapping,
    bar2: Mapping,
}

fn map_bar(dev: &PciDevice, bar: u8) -> Result<Mapping, LinuxError> {
    let res = dev
        .resource(bar)
        .filter(|r| r.is_mem() && r.size() > 0)
        .ok_or(LinuxError::BadBar { bar })?;
    let path = dev.resource_path(bar);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(&path)
        .map_err(LinuxError::io("opening", &path))?;
    Mapping::map_file(&f, res.size() as usize, &path.display().to_string())
}

impl BarMmio {
    /// Maps the control and doorbell BARs of `dev` (memory space must be on).
    pub fn open(dev: &PciDevice) -> Result<BarMmio, LinuxError> {
        Ok(BarMmio {
            bar0: map_bar(dev, pci::BAR_CONTROL)?,
            bar2: map_bar(dev, pci::BAR_DOORBELL)?,
        })
    }

    fn bar(&self, bar: u8) -> Result<&Mapping, MmioError> {
        match bar {
            pci::BAR_CONTROL => Ok(&self.bar0),
            pci::BAR_DOORBELL => Ok(&self.bar2),
            _ => Err(MmioError::NoSuchBar { bar }),
        }
    }
}

fn mmio_err(m: &Mapping, bar: u8, e: BadAccess) -> MmioError {
    if e.offset
        .checked_add(e.width as u64)
        .is_none_or(|end| end > m.len() as u64)
    {
        MmioError::OutOfRange {
            bar,
            offset: e.offset,
            width: e.width as u8,
            size: m.len() as u64,
        }
    } else {
        MmioError::Unaligned {
            bar,
            offset: e.offset,
            width: e.width as u8,
        }
    }
}

impl Mmio for BarMmio {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
        let m = self.bar(bar)?;
        m.read_u32(offset).map_err(|e| mmio_err(m, bar, e))
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
        let m = self.bar(bar)?;
        m.write_u32(offset, value).map_err(|e| mmio_err(m, bar, e))
    }
}

impl RawBar for BarMmio {
    fn read(&self, offset: u64, width: u8) -> Result<u32, MmioError> {
        let m = &self.bar0;
        let r = match width {
            1 => m.read_u8(offset).map(u32::from),
            2 => m.read_u16(offset).map(u32::from),
            4 => m.read_u32(offset),
            _ => Err(BadAccess {
                offset,
                width: width as usize,
            }),
        };
        r.map_err(|e| mmio_err(m, 0, e))
    }
    fn write(&self, offset: u64, width: u8, value: u32) -> Result<(), MmioError> {
        let m = &self.bar0;
        let r = match width {
            1 => m.write_u8(offset, value as u8),
            2 => m.write_u16(offset, value as u16),
            4 => m.write_u32(offset, value),
            _ => Err(BadAccess {
                offset,
                width: width as usize,
            }),
        };
        r.map_err(|e| mmio_err(m, 0, e))
    }
}
