//! A PCI function's migration state, written once for every device type:
//! config space (the registers that differ from reset), the MSI-X table and
//! PBA and the INTx latch, around the model's own state. No eventfd, no
//! VFIO mask the VMM set, nothing of the memory: the destination's VMM gives
//! its own. The gates that follow from config space (MSI-X Enable and
//! Function Mask, INTx Disable, Bus Master) are not stored twice: they are
//! derived from the restored config space.

use serde::{Deserialize, Serialize};

/// The format of [`FunctionState`]; a restore refuses any other.
pub const FUNCTION_STATE_VERSION: u32 = 1;

/// What `Migratable::save` returns (as JSON): the PCI layer's state and the
/// model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionState {
    pub version: u32,
    pub pci: PciState,
    /// The model's own state (for the accelerator: `vdev::wd::state::WdState`).
    pub model: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciState {
    /// Config registers whose value differs from reset: (offset, value).
    pub config: Vec<(u16, u32)>,
    pub interrupts: InterruptState,
}

/// Interrupt state without fds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterruptState {
    pub msix_entries: Vec<[u32; 4]>,
    pub msix_pba: Vec<u64>,
    /// A client wrote the table through the device (its mask bits count).
    pub msix_client_owned: bool,
    pub intx_masked: bool,
    pub intx_pending: bool,
}

/// What the VMM set through SET_IRQS besides its eventfds: kept for a
/// successor process (a migration's destination gets its own from its VMM).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmIrqState {
    /// MSI-X vectors the VMM masked (`SET_IRQS` ACTION_MASK).
    pub msix_vfio_masked: Vec<u16>,
}

/// A running function's state for a successor process: the function's
/// state (each enabled queue's ring positions are in its journal, not here)
/// and what its VMM set of the interrupts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveState {
    pub function: FunctionState,
    pub irqs: VmmIrqState,
}

/// Why a function state was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PciStateError {
    #[error("the function state does not parse: {0}")]
    Decode(String),
    #[error("function state version {found}, this wdvirt reads version {FUNCTION_STATE_VERSION}")]
    Version { found: u32 },
    #[error("config space: {0}")]
    Config(String),
    #[error("interrupts: {0}")]
    Interrupts(String),
    #[error("the function is running: quiesce it before {0}")]
    NotStopped(&'static str),
    #[error("this function's model cannot migrate")]
    NotMigratable,
}

impl From<PciStateError> for crate::vdev::device::DeviceError {
    fn from(e: PciStateError) -> Self {
        use crate::vdev::device::DeviceError;
        match e {
            PciStateError::NotStopped(_) => DeviceError::Busy(e.to_string()),
            PciStateError::NotMigratable => DeviceError::NotSupported(e.to_string()),
            _ => DeviceError::Invalid(e.to_string()),
        }
    }
}
