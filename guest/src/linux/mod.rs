//! Linux-guest plumbing for the tool: the device found in sysfs, its BARs
//! mapped through `resource0`/`resource2`, and DMA memory from hugepages with
//! physical addresses from `/proc/self/pagemap` (the guest has no IOMMU, so a
//! physical address is what the device is given).
//!
//! All `unsafe` lives in [`mmap`].

pub mod bar;
pub mod hugepage;
pub mod mmap;
pub mod pci;

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no wdvirt device (vendor {vendor:#06x}, device {device:#06x}) under {root}")]
    NoDevice {
        vendor: u16,
        device: u16,
        root: PathBuf,
    },
    #[error("{path}: unexpected contents {text:?}")]
    Parse { path: PathBuf, text: String },
    #[error("mmap of {what} ({len:#x} bytes) failed: {source}")]
    Mmap {
        what: String,
        len: usize,
        source: io::Error,
    },
    #[error("BAR{bar} is not a memory BAR or is empty")]
    BadBar { bar: u8 },
    #[error("only {free} free 2 MiB hugepages (need {need}); boot with hugepages=N")]
    NoHugepages { free: u64, need: u64 },
    #[error(
        "no physical address for {vaddr:#x} in /proc/self/pagemap (entry {entry:#x}; root needed)"
    )]
    NoPhysical { vaddr: u64, entry: u64 },
}

impl LinuxError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> LinuxError {
        let path = path.into();
        move |source| LinuxError::Io { what, path, source }
    }
}
