//! Guest driver for the wdvirt virtual accelerator (the UADK role).
//!
//! The core works on any register accessor ([`Mmio`]) and any device-visible
//! memory ([`DmaMemory`]): a vfio-user client socket in host tests, mmapped
//! sysfs `resource` files and hugepages in a Linux guest ([`linux`]). It
//! runs in poll mode: no interrupts are needed.
//!
//! ```text
//! Device::probe(mmio) -> enable() -> queue(q, depth, ops, &pool) -> Queue
//! Queue: submit / poll / wait / run_batch, or compress / crc32c / sha256 / ...
//! ```

pub mod cli;
pub mod crc;
pub mod device;
pub mod dma;
pub mod error;
pub mod jobs;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod mmio;
mod ops;
pub mod queue;
mod stream;
pub mod workload;

#[cfg(test)]
mod fake;

pub use device::{Device, DeviceInfo};
pub use dma::{DmaAllocator, DmaBuffer, DmaError, DmaMemory, DmaPool, HeapMemory, PoolBuffer};
pub use error::{DriverError, RegFault, StatusCode};
pub use jobs::{Format, JobSpec, check};
pub use mmio::{Mmio, MmioError};
pub use queue::{Queue, QueueCursor};
pub use stream::{StreamCompressor, StreamDecompressor};
pub use wdvirt_abi as abi;
