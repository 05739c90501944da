//! BAR0 of the accelerator as data: every register's offset, width, access
//! and reserved bits in one table, and one lookup that refuses what the table
//! does not allow (crosvm's register_space habit). The device's behaviour on
//! a write lives in `device.rs`; what may be written at all lives here.

use wdvirt_abi::{RegError, regs};

/// How the guest may access a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
    /// Write 1 to clear.
    W1c,
}

/// Which register, independent of queue number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reg {
    Id,
    Version,
    CapOps,
    NumQueues,
    MaxDepth,
    MaxXfer,
    DevCtrl,
    DevStatus,
    ErrStatus,
    ErrCode,
    ErrOffset,
    ErrCount,
    SqBase,
    CqBase,
    IdxBase,
    Depth,
    Ops,
    Ctrl,
    Status,
    MsixVector,
    IrqCoalesce,
    Completed,
    QueueCapOps,
}

/// One row of the register table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegDef {
    pub reg: Reg,
    pub name: &'static str,
    /// Offset in the global area, or inside a queue block.
    pub offset: u32,
    /// 4 or 8 bytes. 8-byte registers also take 4-byte halves.
    pub width: u8,
    pub access: Access,
    /// Bits that must be written as zero.
    pub reserved: u64,
}

const fn def(
    reg: Reg,
    name: &'static str,
    offset: u32,
    width: u8,
    access: Access,
    reserved: u64,
) -> RegDef {
    RegDef {
        reg,
        name,
        offset,
        width,
        access,
        reserved,
    }
}

use Access::*;

/// Global registers.
pub const GLOBAL: &[RegDef] = &[
    def(Reg::Id, "ID", regs::ID, 4, ReadOnly, 0),
    def(Reg::Version, "VERSION", regs::VERSION, 4, ReadOnly, 0),
    def(Reg::CapOps, "CAP_OPS", regs::CAP_OPS, 4, ReadOnly, 0),
    def(
        Reg::NumQueues,
        "NUM_QUEUES",
        regs::NUM_QUEUES,
        4,
        ReadOnly,
        0,
    ),
    def(Reg::MaxDepth, "MAX_DEPTH", regs::MAX_DEPTH, 4, ReadOnly, 0),
    def(Reg::MaxXfer, "MAX_XFER", regs::MAX_XFER, 4, ReadOnly, 0),
    def(
        Reg::DevCtrl,
        "DEV_CTRL",
        regs::DEV_CTRL,
        4,
        ReadWrite,
        !((regs::DEV_CTRL_ENABLE | regs::DEV_CTRL_RESET) as u64) & 0xffff_ffff,
    ),
    def(
        Reg::DevStatus,
        "DEV_STATUS",
        regs::DEV_STATUS,
        4,
        ReadOnly,
        0,
    ),
    def(
        Reg::ErrStatus,
        "ERR_STATUS",
        regs::ERR_STATUS,
        4,
        W1c,
        !(regs::ERR_STATUS_LATCHED as u64) & 0xffff_ffff,
    ),
    def(Reg::ErrCode, "ERR_CODE", regs::ERR_CODE, 4, ReadOnly, 0),
    def(
        Reg::ErrOffset,
        "ERR_OFFSET",
        regs::ERR_OFFSET,
        4,
        ReadOnly,
        0,
    ),
    def(Reg::ErrCount, "ERR_COUNT", regs::ERR_COUNT, 4, ReadOnly, 0),
];

/// Registers of one queue block (offsets relative to `regs::queue(q)`).
pub const QUEUE: &[RegDef] = &[
    def(Reg::SqBase, "Q_SQ_BASE", regs::Q_SQ_BASE, 8, ReadWrite, 0),
    def(Reg::CqBase, "Q_CQ_BASE", regs::Q_CQ_BASE, 8, ReadWrite, 0),
    def(
        Reg::IdxBase,
        "Q_IDX_BASE",
        regs::Q_IDX_BASE,
        8,
        ReadWrite,
        0,
    ),
    def(
        Reg::Depth,
        "Q_DEPTH",
        regs::Q_DEPTH,
        4,
        ReadWrite,
        0xffff_0000,
    ),
    def(
        Reg::Ops,
        "Q_OPS",
        regs::Q_OPS,
        4,
        ReadWrite,
        !(wdvirt_abi::ALL_OPS as u64) & 0xffff_ffff,
    ),
    def(
        Reg::Ctrl,
        "Q_CTRL",
        regs::Q_CTRL,
        4,
        ReadWrite,
        !((regs::Q_CTRL_ENABLE | regs::Q_CTRL_RESET) as u64) & 0xffff_ffff,
    ),
    def(Reg::Status, "Q_STATUS", regs::Q_STATUS, 4, ReadOnly, 0),
    def(
        Reg::MsixVector,
        "Q_MSIX_VECTOR",
        regs::Q_MSIX_VECTOR,
        4,
        ReadWrite,
        0xffff_0000,
    ),
    def(
        Reg::IrqCoalesce,
        "Q_IRQ_COALESCE",
        regs::Q_IRQ_COALESCE,
        4,
        ReadWrite,
        0,
    ),
    def(
        Reg::Completed,
        "Q_COMPLETED",
        regs::Q_COMPLETED,
        4,
        ReadOnly,
        0,
    ),
    def(
        Reg::QueueCapOps,
        "Q_CAP_OPS",
        regs::Q_CAP_OPS,
        4,
        ReadOnly,
        0,
    ),
];

/// The meaning column of docs/device-spec.md §2, one line per register (the
/// spec test reads the document back against it).
pub const fn meaning(reg: Reg) -> &'static str {
    match reg {
        Reg::Id => "`0x31564457` (\"WDV1\")",
        Reg::Version => "ABI version, major << 16 \\| minor (1.1); a minor version only adds",
        Reg::CapOps => "bit mask of opcodes this instance may use (`1 << opcode`)",
        Reg::NumQueues => "queues of this instance",
        Reg::MaxDepth => "largest ring depth (a power of two)",
        Reg::MaxXfer => "largest source or destination of one job, bytes",
        Reg::DevCtrl => "bit 0 ENABLE; bit 1 RESET (self-clearing; wins over ENABLE)",
        Reg::DevStatus => "bit 0 ENABLED",
        Reg::ErrStatus => "bit 0 set while an error is latched; write 1 to clear the latch",
        Reg::ErrCode => "code (§5.1) of the first refused access since the last clear",
        Reg::ErrOffset => "offset of that access in its BAR (BAR0, or BAR2 for a doorbell read)",
        Reg::ErrCount => "refused accesses since reset (saturating)",
        Reg::SqBase => "guest address of the submission ring, 64-byte aligned",
        Reg::CqBase => "guest address of the completion ring, 64-byte aligned",
        Reg::IdxBase => "guest address of the ring-index block, 64-byte aligned",
        Reg::Depth => "entries per ring: a power of two in 2..=MAX_DEPTH",
        Reg::Ops => "opcodes this queue accepts; a subset of Q_CAP_OPS",
        Reg::Ctrl => "bit 0 ENABLE; bit 1 RESET (self-clearing)",
        Reg::Status => "bit 0 ENABLED; bit 1 ERROR; bits 15:8 the code of the failed enable",
        Reg::MsixVector => "MSI-X vector for completions, or 0xffff for none",
        Reg::IrqCoalesce => {
            "bits 15:0 completions per interrupt (0 = 1); bits 31:16 longest delay in µs"
        }
        Reg::Completed => {
            "completions written since the queue or the device was last reset (wraps)"
        }
        Reg::QueueCapOps => {
            "opcodes this queue may be given in Q_OPS (ABI 1.1): CAP_OPS, or a subset the host chose"
        }
    }
}

/// A decoded access: which register (and queue), and where in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub def: &'static RegDef,
    /// Queue number for per-queue registers.
    pub queue: Option<u32>,
    /// Byte offset inside the register (0, or 4 for the high half of a 64-bit one).
    pub shift_bytes: u8,
    /// Access width in bytes.
    pub len: u8,
}

/// Find the register an access at `offset` of `len` bytes names, or say why
/// none does. `num_queues` bounds the per-queue area.
pub fn decode(offset: u64, len: usize, num_queues: u32) -> Result<Decoded, RegError> {
    if !matches!(len, 1 | 2 | 4 | 8) {
        return Err(RegError::BadWidth);
    }
    if !offset.is_multiple_of(len as u64) {
        return Err(RegError::Unaligned);
    }
    let offset = u32::try_from(offset).map_err(|_| RegError::OutOfRange)?;
    let (table, queue, rel) = if offset < regs::QUEUE_BASE {
        (GLOBAL, None, offset)
    } else {
        let q = (offset - regs::QUEUE_BASE) / regs::QUEUE_STRIDE;
        if q >= num_queues {
            return Err(RegError::OutOfRange);
        }
        (
            QUEUE,
            Some(q),
            (offset - regs::QUEUE_BASE) % regs::QUEUE_STRIDE,
        )
    };
    let def = table
        .iter()
        .find(|d| rel >= d.offset && rel < d.offset + d.width as u32)
        .ok_or(RegError::OutOfRange)?;
    let shift = (rel - def.offset) as u8;
    let ok = match def.width {
        4 => len == 4 && shift == 0,
        8 => (len == 8 && shift == 0) || (len == 4 && (shift == 0 || shift == 4)),
        _ => false,
    };
    if !ok {
        return Err(RegError::BadWidth);
    }
    Ok(Decoded {
        def,
        queue,
        shift_bytes: shift,
        len: len as u8,
    })
}

impl Decoded {
    /// Merge a partial write into the register's current value.
    pub fn merge(&self, current: u64, written: u64) -> u64 {
        if self.len as u32 >= self.def.width as u32 {
            return written;
        }
        let shift = self.shift_bytes as u32 * 8;
        let mask = ((1u64 << (self.len as u32 * 8)) - 1) << shift;
        (current & !mask) | ((written << shift) & mask)
    }
    /// Extract the accessed part of a register value.
    pub fn extract(&self, value: u64) -> u64 {
        let v = value >> (self.shift_bytes as u32 * 8);
        if self.len >= 8 {
            v
        } else {
            v & ((1u64 << (self.len as u32 * 8)) - 1)
        }
    }
    /// Reserved bits set in the accessed part of `written`?
    pub fn sets_reserved(&self, written: u64) -> bool {
        self.extract(self.def.reserved) & written != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_register_in_the_table_decodes_at_its_own_width() {
        for d in GLOBAL {
            let got = decode(d.offset as u64, d.width as usize, 4).unwrap();
            assert_eq!(got.def.reg, d.reg, "{}", d.name);
            assert_eq!(got.queue, None);
        }
        for q in [0u32, 3] {
            for d in QUEUE {
                let off = regs::queue(q) + d.offset;
                let got = decode(off as u64, d.width as usize, 4).unwrap();
                assert_eq!((got.def.reg, got.queue), (d.reg, Some(q)), "{}", d.name);
            }
        }
    }

    #[test]
    fn sixty_four_bit_registers_take_halves_and_thirty_two_bit_take_only_four() {
        let base = regs::queue(1) + regs::Q_SQ_BASE;
        let lo = decode(base as u64, 4, 2).unwrap();
        let hi = decode(base as u64 + 4, 4, 2).unwrap();
        assert_eq!((lo.shift_bytes, hi.shift_bytes), (0, 4));
        assert_eq!(hi.merge(0x1111_2222, 0xaaaa_bbbb), 0xaaaa_bbbb_1111_2222);
        assert_eq!(
            lo.merge(0xaaaa_bbbb_1111_2222, 0x3333_4444),
            0xaaaa_bbbb_3333_4444
        );
        assert_eq!(decode(regs::DEV_CTRL as u64, 8, 2), Err(RegError::BadWidth));
        assert_eq!(
            decode(regs::DEV_CTRL as u64 + 4, 8, 2),
            Err(RegError::Unaligned)
        );
        assert_eq!(
            decode(regs::ID as u64, 8, 2).unwrap_err(),
            RegError::BadWidth
        );
        assert_eq!(decode(regs::DEV_CTRL as u64, 2, 2), Err(RegError::BadWidth));
        assert_eq!(decode(regs::DEV_CTRL as u64, 1, 2), Err(RegError::BadWidth));
    }

    #[test]
    fn unaligned_out_of_range_and_odd_widths_are_refused() {
        assert_eq!(
            decode(regs::DEV_CTRL as u64 + 1, 4, 2),
            Err(RegError::Unaligned)
        );
        assert_eq!(decode(0x40, 4, 2), Err(RegError::OutOfRange));
        assert_eq!(
            decode(regs::queue(2) as u64, 4, 2),
            Err(RegError::OutOfRange)
        );
        assert_eq!(
            decode(regs::queue(0) as u64 + 0x38, 4, 2),
            Err(RegError::OutOfRange)
        );
        assert_eq!(decode(0, 3, 2), Err(RegError::BadWidth));
        assert_eq!(decode(u64::MAX - 3, 4, 2), Err(RegError::OutOfRange));
    }

    #[test]
    fn reserved_bits_are_seen_in_the_accessed_part_only() {
        let d = decode(regs::queue(0) as u64 + regs::Q_DEPTH as u64, 4, 1).unwrap();
        assert!(d.sets_reserved(0x1_0000));
        assert!(!d.sets_reserved(0x100));
    }
}
