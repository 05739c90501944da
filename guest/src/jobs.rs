//! Job descriptions: what a caller asks for, turned into submission entries.

use wdvirt_abi::{CompletionEntry, JobStatus, Opcode, SubmissionEntry};

use crate::error::{DriverError, StatusCode};

/// One job, by device addresses. The tag is chosen by whoever submits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub opcode: Opcode,
    pub src: u64,
    pub src_len: u32,
    pub dst: u64,
    pub dst_len: u32,
    pub param: u64,
    /// Stream opcodes: the stream context's address; 0 otherwise.
    pub ctx: u64,
}

impl JobSpec {
    pub fn new(opcode: Opcode) -> Self {
        JobSpec {
            opcode,
            src: 0,
            src_len: 0,
            dst: 0,
            dst_len: 0,
            param: 0,
            ctx: 0,
        }
    }
    pub fn ctx(mut self, addr: u64) -> Self {
        self.ctx = addr;
        self
    }
    pub fn src(mut self, addr: u64, len: u32) -> Self {
        self.src = addr;
        self.src_len = len;
        self
    }
    pub fn dst(mut self, addr: u64, len: u32) -> Self {
        self.dst = addr;
        self.dst_len = len;
        self
    }
    pub fn param(mut self, param: u64) -> Self {
        self.param = param;
        self
    }
    pub fn to_sqe(&self, tag: u32) -> SubmissionEntry {
        SubmissionEntry {
            opcode: self.opcode as u8,
            tag,
            src: self.src,
            dst: self.dst,
            src_len: self.src_len,
            dst_len: self.dst_len,
            param: self.param,
            ctx: self.ctx,
            ..Default::default()
        }
    }
}

pub use wdvirt_abi::Format;

/// `Ok` when the completion reports success, else [`DriverError::JobFailed`].
pub fn check(cqe: &CompletionEntry) -> Result<&CompletionEntry, DriverError> {
    if cqe.status == JobStatus::Ok.code() {
        Ok(cqe)
    } else {
        Err(DriverError::JobFailed {
            tag: cqe.tag,
            status: StatusCode(cqe.status),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_to_sqe_keeps_every_field_and_zero_reserved() {
        let s = JobSpec::new(Opcode::Copy)
            .src(0x1000, 10)
            .dst(0x2000, 20)
            .param(7);
        let e = s.to_sqe(42);
        assert_eq!(e.opcode, Opcode::Copy as u8);
        assert_eq!(
            (e.tag, e.src, e.src_len, e.dst, e.dst_len, e.param),
            (42, 0x1000, 10, 0x2000, 20, 7)
        );
        assert_eq!((e.flags, e.reserved0, e.ctx, e.reserved), (0, 0, 0, [0; 2]));
    }

    #[test]
    fn formats_map_to_opcodes_and_names() {
        for f in Format::ALL {
            assert_eq!(Format::from_name(f.name()), Some(f));
            assert_eq!(f.compress_op() as u8 + 1, f.decompress_op() as u8);
        }
        assert_eq!(Format::from_name("lz4"), None);
    }

    #[test]
    fn check_reports_status() {
        let ok = CompletionEntry {
            tag: 1,
            ..Default::default()
        };
        assert!(check(&ok).is_ok());
        let bad = CompletionEntry {
            tag: 9,
            status: JobStatus::CorruptInput.code(),
            ..Default::default()
        };
        let e = check(&bad).unwrap_err();
        assert_eq!(e.job_status(), Some(JobStatus::CorruptInput));
        assert!(matches!(e, DriverError::JobFailed { tag: 9, .. }));
    }
}
