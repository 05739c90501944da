//! The accelerator model's state as one plain structure: what a migration
//! carries, and what a restarted device would be rebuilt from.
//!
//! [`WdState`] is derived exactly from a parked device (every queue worker
//! stopped with its positions handed back, see `queue::Parked`) and a
//! device is rebuilt from it only after every value has been checked again
//! as the register write that set it would check it, plus what only a
//! restore can get wrong: ring positions that do not add up, counts larger
//! than a ring, rings outside the destination's DMA maps. The PASID, the
//! queue pairs and the memory are the destination's own: none of them is in
//! the state.

use serde::{Deserialize, Serialize};
use wdvirt_abi::{JobStatus, SubmissionEntry};

use super::queue::QueueConfig;
use crate::accel::JobResult;

/// The format of [`WdState`]; a restore refuses any other. Version 2: a
/// pending job is an array of its fields, not an object (half the bytes,
/// and an eighth of the allocations to parse, with 1000 of them pending).
pub const WD_STATE_VERSION: u32 = 2;

/// The whole model: registers, error latch, queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WdState {
    pub version: u32,
    /// `DEV_CTRL.ENABLE`.
    pub enabled: bool,
    pub err: ErrState,
    /// One per queue of the instance, in order.
    pub queues: Vec<QueueState>,
}

/// `ERR_STATUS`/`ERR_CODE`/`ERR_OFFSET`/`ERR_COUNT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrState {
    /// The latched `RegError` code, 0 when nothing is latched.
    pub code: u16,
    pub offset: u32,
    pub count: u32,
}

/// One queue: its registers, and where it stands in its rings if enabled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    pub config: QueueConfig,
    /// `Q_STATUS` error bits (ERROR | code << 8).
    pub error: u32,
    /// `Q_COMPLETED`.
    pub completed: u32,
    /// Present exactly when the queue is enabled.
    pub ring: Option<RingState>,
    /// The enabled queue's completion ring was cleared (it was enabled with
    /// Bus Master set, or Bus Master was set since); if not, it is cleared
    /// when Bus Master is set, as on the source.
    pub rings_ready: bool,
}

/// Where a queue stands in its rings, as a worker leaves it when parked and
/// takes it up when started again (here or on a migration's destination).
/// Every job the guest handed the queue is accounted for by these numbers:
/// entries before `sq_head` were taken; of those, `cq_tail` have their
/// completion in the ring, `held` have a result not yet written (bus
/// mastering was off) and `pending` were taken but no engine started them,
/// so `sq_head - cq_tail == held.len() + pending.len()` once parked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingState {
    /// `sq_head` as published to the guest (free-running).
    pub sq_head: u32,
    /// Completions written (free-running); the next one's slot and phase
    /// follow from it.
    pub cq_tail: u32,
    /// Completions written since the last interrupt (coalescing); raised
    /// when the queue runs again.
    pub irq_pending: u32,
    /// Results held back while bus mastering was off, oldest first.
    pub held: Vec<HeldCompletion>,
    /// Jobs taken from the ring (`sq_head` is past them, so the guest may
    /// already have reused their slots) that no engine started: the
    /// scheduler gave them back at the park. Their descriptors, oldest
    /// first, to be checked again and submitted before anything new.
    pub pending: Vec<PendingJob>,
}

/// A descriptor taken but not run: the submission entry's fields (the
/// reserved ones are zero, or it would not have been taken). In the state,
/// an array of them in this order (`[opcode, tag, src, src_len, dst,
/// dst_len, param, ctx]`): a 16-queue stop can carry a thousand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PendingFields", into = "PendingFields")]
pub struct PendingJob {
    pub opcode: u8,
    pub tag: u32,
    pub src: u64,
    pub src_len: u32,
    pub dst: u64,
    pub dst_len: u32,
    pub param: u64,
    pub ctx: u64,
}

/// [`PendingJob`] as the state carries it.
type PendingFields = (u8, u32, u64, u32, u64, u32, u64, u64);

impl From<PendingFields> for PendingJob {
    fn from(f: PendingFields) -> PendingJob {
        let (opcode, tag, src, src_len, dst, dst_len, param, ctx) = f;
        PendingJob {
            opcode,
            tag,
            src,
            src_len,
            dst,
            dst_len,
            param,
            ctx,
        }
    }
}

impl From<PendingJob> for PendingFields {
    fn from(j: PendingJob) -> PendingFields {
        (
            j.opcode, j.tag, j.src, j.src_len, j.dst, j.dst_len, j.param, j.ctx,
        )
    }
}

impl PendingJob {
    pub(super) fn of(sqe: &SubmissionEntry) -> PendingJob {
        PendingJob {
            opcode: sqe.opcode,
            tag: sqe.tag,
            src: sqe.src,
            src_len: sqe.src_len,
            dst: sqe.dst,
            dst_len: sqe.dst_len,
            param: sqe.param,
            ctx: sqe.ctx,
        }
    }

    pub(super) fn entry(&self) -> SubmissionEntry {
        SubmissionEntry {
            opcode: self.opcode,
            tag: self.tag,
            src: self.src,
            src_len: self.src_len,
            dst: self.dst,
            dst_len: self.dst_len,
            param: self.param,
            ctx: self.ctx,
            ..SubmissionEntry::default()
        }
    }
}

/// A job's result not yet written to the completion ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldCompletion {
    pub tag: u32,
    /// A `JobStatus` code.
    pub status: u16,
    pub bytes: u32,
    pub result: u32,
    pub stream_end: bool,
}

impl HeldCompletion {
    pub(super) fn of(r: &JobResult) -> HeldCompletion {
        HeldCompletion {
            tag: r.cookie as u32,
            status: r.status.code(),
            bytes: r.bytes,
            result: r.result,
            stream_end: r.stream_end,
        }
    }

    /// The engine's result again; `None` for a status code no job has.
    pub fn result(&self) -> Option<JobResult> {
        Some(JobResult {
            cookie: self.tag as u64,
            // Given by the queue that takes the result up.
            slot: 0,
            status: JobStatus::from_code(self.status)?,
            bytes: self.bytes,
            result: self.result,
            stream_end: self.stream_end,
        })
    }
}

/// Why a state was refused. Every variant names the queue and the values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the device state does not parse: {0}")]
    Decode(String),
    #[error("device state version {found}, this wdvirt reads version {WD_STATE_VERSION}")]
    Version { found: u32 },
    #[error("the state has {found} queues, this instance {expected}")]
    QueueCount { found: usize, expected: u32 },
    #[error("queue {queue}: depth {depth} (expected 0, or a power of two in 2..={max})")]
    Depth { queue: usize, depth: u32, max: u32 },
    #[error("queue {queue}: operations {ops:#x} not within the queue's {allowed:#x}")]
    Ops {
        queue: usize,
        ops: u32,
        allowed: u32,
    },
    #[error("queue {queue}: MSI-X vector {vector} (the function has {vectors})")]
    Vector {
        queue: usize,
        vector: u32,
        vectors: u32,
    },
    #[error("queue {queue}: {what} address {addr:#x} is not aligned")]
    Misaligned {
        queue: usize,
        what: &'static str,
        addr: u64,
    },
    #[error("queue {queue}: an enabled queue on a disabled device")]
    EnabledOnDisabledDevice { queue: usize },
    #[error("queue {queue}: enabled with depth 0")]
    EnabledWithoutDepth { queue: usize },
    #[error(
        "queue {queue}: {what} at {addr:#x} (+{len:#x}) is not inside the memory this destination's VMM mapped"
    )]
    RingOutsideMaps {
        queue: usize,
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("queue {queue}: its submission ring, completion ring and index block overlap")]
    RingsOverlap { queue: usize },
    #[error(
        "queue {queue}: positions do not add up (sq_head {sq_head}, cq_tail {cq_tail}, {held} results held, {pending} jobs pending)"
    )]
    Positions {
        queue: usize,
        sq_head: u32,
        cq_tail: u32,
        held: usize,
        pending: usize,
    },
    #[error("queue {queue}: {count} {what}, more than its depth {depth}")]
    TooMany {
        queue: usize,
        what: &'static str,
        count: u64,
        depth: u32,
    },
    #[error("queue {queue}: a held result has status {status}, which no job has")]
    HeldStatus { queue: usize, status: u16 },
    #[error("queue {queue}: a disabled queue carries ring state")]
    RingOnDisabledQueue { queue: usize },
    #[error(
        "queue {queue}: Q_STATUS error bits {bits:#x} are not ERROR with a register error code"
    )]
    QueueError { queue: usize, bits: u32 },
    #[error("ERR_CODE {code} names no register error")]
    ErrCode { code: u16 },
    #[error("ERR_OFFSET {offset:#x} is outside {bar} ({size:#x} bytes)")]
    ErrOffset {
        offset: u32,
        bar: &'static str,
        size: u64,
    },
    #[error("queue {queue}: rings not cleared although Bus Master is set")]
    RingsNotReady { queue: usize },
    #[error("queue {queue}: no queue pair on this destination: {reason}")]
    NoQueuePair { queue: usize, reason: String },
    #[error("the device is running: quiesce it before {0}")]
    NotQuiesced(&'static str),
    #[error("queue {queue} has jobs the engine has not finished")]
    Unsettled { queue: usize },
    #[error(
        "queue {queue}: {count} owed interrupts, more than its depth and coalescing count allow ({max})"
    )]
    TooManyOwed { queue: usize, count: u32, max: u64 },
}

impl From<StateError> for crate::vdev::device::DeviceError {
    fn from(e: StateError) -> Self {
        use crate::vdev::device::DeviceError;
        match e {
            StateError::NoQueuePair { .. } => DeviceError::Busy(e.to_string()),
            StateError::NotQuiesced(_) | StateError::Unsettled { .. } => {
                DeviceError::Busy(e.to_string())
            }
            _ => DeviceError::Invalid(e.to_string()),
        }
    }
}
