//! The driver's error type and the decoding of the device's error registers.

use std::fmt;
use std::time::Duration;

use wdvirt_abi::{JobStatus, RegError};

use crate::dma::DmaError;
use crate::mmio::MmioError;

/// A refused BAR0 access as the device latched it (`ERR_CODE`, `ERR_OFFSET`).
/// The code is kept raw so that a code this driver does not know still shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegFault {
    pub code: u32,
    pub offset: u32,
}

impl RegFault {
    /// The named error, if the code is one this ABI defines.
    pub fn error(&self) -> Option<RegError> {
        u16::try_from(self.code).ok().and_then(RegError::from_code)
    }
}

impl fmt::Display for RegFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error() {
            Some(e) => write!(f, "{} ({}) at BAR0 {:#x}", e.name(), e.text(), self.offset),
            None => write!(
                f,
                "unknown register error code {} at BAR0 {:#x}",
                self.code, self.offset
            ),
        }
    }
}

/// Names a [`JobStatus`] code, or says it is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusCode(pub u16);

impl StatusCode {
    pub fn status(&self) -> Option<JobStatus> {
        JobStatus::from_code(self.0)
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status() {
            Some(s) => write!(f, "{} ({})", s.name(), s.text()),
            None => write!(f, "unknown job status {}", self.0),
        }
    }
}

/// Queue-level error code from `Q_STATUS` bits 15:8 (a [`RegError`] code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueErrorCode(pub u8);

impl fmt::Display for QueueErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match RegError::from_code(u16::from(self.0)) {
            Some(e) => write!(f, "{} ({})", e.name(), e.text()),
            None => write!(f, "code {}", self.0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Mmio(#[from] MmioError),
    #[error(transparent)]
    Dma(#[from] DmaError),
    #[error("not a wdvirt device: ID reads {found:#010x}")]
    BadMagic { found: u32 },
    #[error("unsupported ABI version {}.{} (driver speaks 1.x)", .version >> 16, .version & 0xffff)]
    UnsupportedVersion { version: u32 },
    #[error("device did not enable: DEV_STATUS {status:#x}")]
    NotEnabled { status: u32 },
    #[error("device still enabled after reset: DEV_STATUS {status:#x}")]
    ResetFailed { status: u32 },
    #[error("register access refused: {0}")]
    RegisterRefused(RegFault),
    #[error("queue {queue} did not enable: Q_STATUS {status:#x}, {code}")]
    QueueRefused {
        queue: u32,
        status: u32,
        code: QueueErrorCode,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{len} bytes is more than one job may move (MAX_XFER {max})")]
    TooLarge { len: usize, max: u32 },
    #[error("queue full: no free submission slot")]
    QueueFull,
    #[error("queue has {outstanding} jobs outstanding; this call needs it idle")]
    NotIdle { outstanding: u32 },
    #[error("timed out after {waited:?} with {outstanding} jobs outstanding")]
    Timeout { outstanding: u32, waited: Duration },
    #[error("completion with tag {tag} matches no job in flight")]
    UnexpectedTag { tag: u32 },
    #[error("completion (tag {tag}) arrived with no job outstanding")]
    SpuriousCompletion { tag: u32 },
    #[error("job {tag} failed: {status}")]
    JobFailed { tag: u32, status: StatusCode },
    #[error("the compressed stream ends early: {consumed} bytes read, no end of stream")]
    TruncatedStream { consumed: usize },
}

impl DriverError {
    /// The job status, for a [`DriverError::JobFailed`].
    pub fn job_status(&self) -> Option<JobStatus> {
        match self {
            DriverError::JobFailed { status, .. } => status.status(),
            _ => None,
        }
    }

    /// The register error, for a refused register access.
    pub fn reg_error(&self) -> Option<RegError> {
        match self {
            DriverError::RegisterRefused(f) => f.error(),
            DriverError::QueueRefused { code, .. } => RegError::from_code(u16::from(code.0)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reg_fault_names_known_codes_and_keeps_unknown_ones() {
        let f = RegFault {
            code: RegError::ReadOnly.code() as u32,
            offset: 0x8,
        };
        assert_eq!(f.error(), Some(RegError::ReadOnly));
        assert_eq!(
            f.to_string(),
            "ReadOnly (write to a read-only register) at BAR0 0x8"
        );
        let u = RegFault {
            code: 0x1_0004,
            offset: 0,
        };
        assert_eq!(
            u.error(),
            None,
            "a code above u16 must not alias a known one"
        );
        assert!(u.to_string().contains("unknown register error code 65540"));
    }

    #[test]
    fn job_failed_names_status() {
        let e = DriverError::JobFailed {
            tag: 3,
            status: StatusCode(JobStatus::DstTooSmall.code()),
        };
        assert_eq!(e.job_status(), Some(JobStatus::DstTooSmall));
        assert_eq!(
            e.to_string(),
            "job 3 failed: DstTooSmall (output does not fit in dst_len)"
        );
        let u = DriverError::JobFailed {
            tag: 1,
            status: StatusCode(999),
        };
        assert_eq!(u.job_status(), None);
        assert!(u.to_string().contains("unknown job status 999"));
    }

    #[test]
    fn version_and_queue_errors_render() {
        let e = DriverError::UnsupportedVersion {
            version: 2 << 16 | 5,
        };
        assert_eq!(
            e.to_string(),
            "unsupported ABI version 2.5 (driver speaks 1.x)"
        );
        let q = DriverError::QueueRefused {
            queue: 1,
            status: 6 << 8 | 2,
            code: QueueErrorCode(6),
        };
        assert_eq!(q.reg_error(), Some(RegError::BadDepth));
        assert!(q.to_string().contains("BadDepth"));
    }
}
