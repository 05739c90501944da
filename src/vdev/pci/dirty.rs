//! The real device's dirty log (DMA logging for migration): the three
//! `Migratable::dirty_*` methods of `PciFunction<WdDevice>` delegate here,
//! and this to the instance's guest memory ([`DmaSpace`]), where every
//! device write already marks its page.
//!
//! Kept apart from the rest of the device's `Migratable` impl (quiesce,
//! save, restore), which the device layer owns: its `dirty_log_start`,
//! `dirty_log_stop` and `dirty_report` call these.
//!
//! [`DmaSpace`]: crate::vdev::dma::DmaSpace

use super::PciFunction;
use crate::vdev::device::DeviceError;
use crate::vdev::wd::WdDevice;

impl PciFunction<WdDevice> {
    /// `Migratable::dirty_log_start`: log the pages the device writes from
    /// now on, in `page_size` (4 KiB) pages.
    pub fn start_dirty_log(&mut self, page_size: u64) -> Result<(), DeviceError> {
        self.model_mut().dma_space_mut().start_dirty_log(page_size)
    }

    /// `Migratable::dirty_log_stop`.
    pub fn stop_dirty_log(&mut self) {
        self.model_mut().dma_space_mut().stop_dirty_log()
    }

    /// `Migratable::dirty_report`: the written pages of `[iova, iova +
    /// size)`, one bit per `page_size`, read and cleared.
    pub fn report_dirty(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        self.model_mut()
            .dma_space_mut()
            .report_dirty(iova, size, page_size, bitmap)
    }
}
