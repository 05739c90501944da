//! PCI configuration space of one function, declared as data.
//!
//! Every register is a row of a table ([`Register`]: offset, width, reset
//! value, guest-writable mask, write-1-to-clear mask), compiled once into
//! per-byte arrays. A read of any length is a copy; a write of any length at
//! any offset goes byte by byte through the masks. So the accesses QEMU makes
//! (bytes and words at odd offsets, and the whole 4 KiB in one read at
//! realize) need no special case, and bytes no row covers are read-only 0.
//!
//! BAR sizing falls out of the same masks: the writable bits of a BAR are its
//! address bits, `!(size - 1)`, so writing all-ones reads back the size mask
//! next to the read-only type bits (PCI 3.0 §6.2.5.1). An absent BAR and the
//! ROM BAR have no writable bits and read 0 (QEMU treats a writable ROM BAR
//! as a 2 KiB ROM; cloud-hypervisor sizes every BAR by writing 0xffffffff).
//!
//! Two registers do more than masks, handled after the byte loop: PMCSR
//! discards writes of the unsupported D1/D2 states (PCI PM 1.2 §7.1.4), and
//! the PCIe Device Control "Initiate FLR" bit is an action reported in
//! [`WriteEffects`] that always reads 0 (PCIe 4.0 §7.5.3.4).

use crate::vdev::function::{BarKind, FunctionLayout};

/// Size of a PCIe function's config space; QEMU reads it all at realize.
pub const CONFIG_SPACE_SIZE: usize = 4096;

// Type 0 header offsets (PCI 3.0 §6.1).
pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
pub const CLASS_CODE: u16 = 0x09;
pub const CACHE_LINE_SIZE: u16 = 0x0c;
pub const LATENCY_TIMER: u16 = 0x0d;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BIST: u16 = 0x0f;
pub const BAR0: u16 = 0x10;
pub const CARDBUS_CIS: u16 = 0x28;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
pub const SUBSYSTEM_ID: u16 = 0x2e;
pub const ROM_BAR: u16 = 0x30;
pub const CAP_POINTER: u16 = 0x34;
pub const INTERRUPT_LINE: u16 = 0x3c;
pub const INTERRUPT_PIN: u16 = 0x3d;
pub const MIN_GNT: u16 = 0x3e;
pub const MAX_LAT: u16 = 0x3f;

// Command register bits (PCI 3.0 §6.2.2). There are no I/O BARs, so I/O
// space enable is hardwired 0.
pub const CMD_MEMORY_SPACE: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
pub const CMD_SERR_ENABLE: u16 = 1 << 8;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
pub const CMD_WRITABLE: u16 = CMD_MEMORY_SPACE
    | CMD_BUS_MASTER
    | CMD_PARITY_ERROR_RESPONSE
    | CMD_SERR_ENABLE
    | CMD_INTX_DISABLE;

// Status register bits.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Master data parity error, signaled/received target abort, received master
/// abort, signaled system error, detected parity error: all RW1C.
pub const STATUS_W1C: u16 = 0xf900;

// BAR type bits (PCI 3.0 §6.2.5.1).
pub const BAR_MEM_64: u32 = 0b100;
pub const BAR_MEM_PREFETCH: u32 = 0b1000;
/// The low four bits of a memory BAR are type bits, never address bits.
const BAR_TYPE_BITS: u32 = 0xf;

/// No legacy interrupt pin: the function signals through MSI-X only.
pub const INTERRUPT_PIN_NONE: u8 = 0;
/// INTA#.
pub const INTERRUPT_PIN_INTA: u8 = 1;

// Capability IDs.
pub const CAP_ID_PM: u8 = 0x01;
pub const CAP_ID_PCIE: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;

/// Where the capabilities sit. Fixed, so the golden dump stays stable.
pub const PCIE_CAP: u16 = 0x40;
pub const PCIE_CAP_SIZE: u16 = 0x3c;
pub const MSIX_CAP: u16 = 0x80;
pub const MSIX_CAP_SIZE: u16 = 12;
pub const PM_CAP: u16 = 0x90;
pub const PM_CAP_SIZE: u16 = 8;

// PCI Express capability, offsets from its start (PCIe 4.0 §7.5.3).
pub const PCIE_FLAGS: u16 = 0x02;
pub const PCIE_DEVCAP: u16 = 0x04;
pub const PCIE_DEVCTL: u16 = 0x08;
pub const PCIE_DEVSTA: u16 = 0x0a;
pub const PCIE_LNKCAP: u16 = 0x0c;
pub const PCIE_LNKCTL: u16 = 0x10;
pub const PCIE_LNKSTA: u16 = 0x12;
pub const PCIE_DEVCAP2: u16 = 0x24;
pub const PCIE_DEVCTL2: u16 = 0x28;
pub const PCIE_LNKCAP2: u16 = 0x2c;
pub const PCIE_LNKCTL2: u16 = 0x30;
/// Capability version 2, device/port type 0 (PCI Express Endpoint).
pub const PCIE_FLAGS_VALUE: u16 = 0x0002;
/// Role-based error reporting (mandatory since 1.1).
pub const PCIE_DEVCAP_RBER: u32 = 1 << 15;
pub const PCIE_DEVCAP_FLR: u32 = 1 << 28;
pub const PCIE_DEVCTL_FLR: u16 = 1 << 15;
/// Error reporting enables (3:0), relaxed ordering (4), max payload (7:5),
/// extended tag (8), no snoop (11), max read request (14:12). Phantom
/// functions and aux power are unsupported (RO 0); FLR is an action bit.
pub const PCIE_DEVCTL_WRITABLE: u16 = 0x79ff;
/// Relaxed ordering and no snoop enabled, max read request 512 B.
pub const PCIE_DEVCTL_RESET: u16 = 0x2810;
/// Correctable, non-fatal, fatal, unsupported request detected: RW1C.
pub const PCIE_DEVSTA_W1C: u16 = 0x000f;
/// 2.5 GT/s, x1, no ASPM, port 0.
pub const PCIE_LNKCAP_VALUE: u32 = 0x0000_0011;
/// ASPM control (1:0), read completion boundary (3), common clock (6),
/// extended synch (7).
pub const PCIE_LNKCTL_WRITABLE: u16 = 0x00cb;
/// Current speed 2.5 GT/s, negotiated width x1.
pub const PCIE_LNKSTA_VALUE: u16 = 0x0011;
/// Supported link speeds vector: 2.5 GT/s.
pub const PCIE_LNKCAP2_VALUE: u32 = 0x0000_0002;
/// Target link speed 2.5 GT/s.
pub const PCIE_LNKCTL2_VALUE: u16 = 0x0001;

// MSI-X capability, offsets from its start (PCI 3.0 §6.8.2).
pub const MSIX_CONTROL: u16 = 0x02;
pub const MSIX_TABLE: u16 = 0x04;
pub const MSIX_PBA: u16 = 0x08;
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
pub const MSIX_CONTROL_TABLE_SIZE: u16 = 0x07ff;

// Power management capability, offsets from its start (PCI PM 1.2 §3.2).
pub const PM_PMC: u16 = 0x02;
pub const PM_PMCSR: u16 = 0x04;
pub const PM_DATA: u16 = 0x06;
/// PM spec version 1.2, no D1/D2, no PME.
pub const PM_PMC_VALUE: u16 = 0x0003;
pub const PMCSR_POWER_STATE: u16 = 0x0003;
/// No_Soft_Reset: D3hot→D0 keeps the function's state.
pub const PMCSR_NO_SOFT_RESET: u16 = 1 << 3;
pub const PM_STATE_D0: u8 = 0;
pub const PM_STATE_D3HOT: u8 = 3;

const BAR_NAMES: [&str; 6] = ["BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5"];

/// One register: where it is and how its bits behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Register {
    pub name: &'static str,
    pub offset: u16,
    /// 1 to 4 bytes.
    pub width: u8,
    pub reset: u32,
    /// Bits a write may change.
    pub writable: u32,
    /// Bits a write of 1 clears.
    pub w1c: u32,
}

impl Register {
    const fn ro(name: &'static str, offset: u16, width: u8, reset: u32) -> Self {
        Register {
            name,
            offset,
            width,
            reset,
            writable: 0,
            w1c: 0,
        }
    }
    const fn writable(mut self, mask: u32) -> Self {
        self.writable = mask;
        self
    }
    const fn w1c(mut self, mask: u32) -> Self {
        self.w1c = mask;
        self
    }
    /// The bytes `offset..offset + width` as a range of config offsets.
    pub fn range(&self) -> std::ops::Range<usize> {
        usize::from(self.offset)..usize::from(self.offset) + usize::from(self.width)
    }
}

/// Where each capability sits (`None` = not present).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapLayout {
    pub pcie: u16,
    pub msix: Option<u16>,
    pub pm: u16,
}

/// What a config write asks for beyond storing bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteEffects {
    /// "Initiate Function Level Reset" was written as 1.
    pub flr: bool,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "config access of {len} bytes at {offset:#x} is outside the {CONFIG_SPACE_SIZE}-byte config space"
    )]
    OutOfRange { offset: u64, len: usize },
}

/// The register table for `layout`. The layout must already be valid (see
/// `PciFunction::try_new`); arithmetic here never panics regardless.
pub fn registers(layout: &FunctionLayout) -> (Vec<Register>, CapLayout) {
    let caps = CapLayout {
        pcie: PCIE_CAP,
        msix: (layout.msix_vectors > 0).then_some(MSIX_CAP),
        pm: PM_CAP,
    };
    let mut r = vec![
        Register::ro("vendor id", VENDOR_ID, 2, layout.vendor_id.into()),
        Register::ro("device id", DEVICE_ID, 2, layout.device_id.into()),
        Register::ro("command", COMMAND, 2, 0).writable(CMD_WRITABLE.into()),
        Register::ro("status", STATUS, 2, STATUS_CAP_LIST.into()).w1c(STATUS_W1C.into()),
        Register::ro("revision id", REVISION_ID, 1, layout.revision.into()),
        Register::ro("class code", CLASS_CODE, 3, layout.class_code & 0x00ff_ffff),
        // RW with no effect on PCIe (PCIe 4.0 §7.5.1.1.7).
        Register::ro("cache line size", CACHE_LINE_SIZE, 1, 0).writable(0xff),
        Register::ro("latency timer", LATENCY_TIMER, 1, 0),
        // Type 0, single function.
        Register::ro("header type", HEADER_TYPE, 1, 0),
        Register::ro("bist", BIST, 1, 0),
        Register::ro("cardbus cis", CARDBUS_CIS, 4, 0),
        Register::ro(
            "subsystem vendor id",
            SUBSYSTEM_VENDOR_ID,
            2,
            layout.subsystem_vendor_id.into(),
        ),
        Register::ro("subsystem id", SUBSYSTEM_ID, 2, layout.subsystem_id.into()),
        // No expansion ROM: read-only 0, so all-ones sizing reads back 0.
        Register::ro("expansion rom bar", ROM_BAR, 4, 0),
        Register::ro("capabilities pointer", CAP_POINTER, 1, caps.pcie.into()),
        Register::ro("interrupt line", INTERRUPT_LINE, 1, 0).writable(0xff),
        // No INTx: no model raises it, and a pin makes QEMU arm an INTx
        // eventfd that never fires. The PCI layer derives INTx support
        // (IRQ info count, SET_IRQS) from this register, so offering INTx
        // later means INTERRUPT_PIN_INTA here (from a layout flag).
        Register::ro("interrupt pin", INTERRUPT_PIN, 1, INTERRUPT_PIN_NONE.into()),
        Register::ro("min gnt", MIN_GNT, 1, 0),
        Register::ro("max lat", MAX_LAT, 1, 0),
    ];
    r.extend(bar_registers(layout));

    let after_pcie = caps.msix.unwrap_or(caps.pm);
    let p = caps.pcie;
    r.extend([
        Register::ro("pcie cap header", p, 2, cap_header(CAP_ID_PCIE, after_pcie)),
        Register::ro("pcie flags", p + PCIE_FLAGS, 2, PCIE_FLAGS_VALUE.into()),
        Register::ro(
            "pcie devcap",
            p + PCIE_DEVCAP,
            4,
            PCIE_DEVCAP_RBER | PCIE_DEVCAP_FLR,
        ),
        Register::ro("pcie devctl", p + PCIE_DEVCTL, 2, PCIE_DEVCTL_RESET.into())
            .writable(PCIE_DEVCTL_WRITABLE.into()),
        Register::ro("pcie devsta", p + PCIE_DEVSTA, 2, 0).w1c(PCIE_DEVSTA_W1C.into()),
        Register::ro("pcie lnkcap", p + PCIE_LNKCAP, 4, PCIE_LNKCAP_VALUE),
        Register::ro("pcie lnkctl", p + PCIE_LNKCTL, 2, 0).writable(PCIE_LNKCTL_WRITABLE.into()),
        Register::ro("pcie lnksta", p + PCIE_LNKSTA, 2, PCIE_LNKSTA_VALUE.into()),
        Register::ro("pcie devcap2", p + PCIE_DEVCAP2, 4, 0),
        Register::ro("pcie devctl2", p + PCIE_DEVCTL2, 2, 0),
        Register::ro("pcie lnkcap2", p + PCIE_LNKCAP2, 4, PCIE_LNKCAP2_VALUE),
        Register::ro(
            "pcie lnkctl2",
            p + PCIE_LNKCTL2,
            2,
            PCIE_LNKCTL2_VALUE.into(),
        ),
    ]);

    if let Some(m) = caps.msix {
        let (table_bir, table_off) = layout.msix_table;
        let (pba_bir, pba_off) = layout.msix_pba;
        let table_size = u32::from(layout.msix_vectors.saturating_sub(1) & MSIX_CONTROL_TABLE_SIZE);
        r.extend([
            Register::ro("msix cap header", m, 2, cap_header(CAP_ID_MSIX, caps.pm)),
            Register::ro("msix control", m + MSIX_CONTROL, 2, table_size)
                .writable((MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).into()),
            Register::ro(
                "msix table",
                m + MSIX_TABLE,
                4,
                (table_off & !0x7) | u32::from(table_bir & 0x7),
            ),
            Register::ro(
                "msix pba",
                m + MSIX_PBA,
                4,
                (pba_off & !0x7) | u32::from(pba_bir & 0x7),
            ),
        ]);
    }

    let pm = caps.pm;
    r.extend([
        Register::ro("pm cap header", pm, 2, cap_header(CAP_ID_PM, 0)),
        Register::ro("pm pmc", pm + PM_PMC, 2, PM_PMC_VALUE.into()),
        Register::ro("pm pmcsr", pm + PM_PMCSR, 2, PMCSR_NO_SOFT_RESET.into())
            .writable(PMCSR_POWER_STATE.into()),
        Register::ro("pm data", pm + PM_DATA, 2, 0),
    ]);
    (r, caps)
}

fn cap_header(id: u8, next: u16) -> u32 {
    u32::from(id) | (u32::from(next & 0xff) << 8)
}

/// The six BAR registers. Writable bits are the address bits above the size;
/// the low nibble holds the read-only type.
fn bar_registers(layout: &FunctionLayout) -> Vec<Register> {
    let mut out = Vec::with_capacity(6);
    for (i, spec) in layout.bars.iter().enumerate() {
        let offset = BAR0 + 4 * i as u16;
        let size_mask = !spec.size.wrapping_sub(1);
        let upper_of = i.checked_sub(1).map(|p| layout.bars[p]);
        let reg = match spec.kind {
            BarKind::Mem32 if spec.size > 0 => {
                Register::ro(BAR_NAMES[i], offset, 4, 0).writable(size_mask as u32 & !BAR_TYPE_BITS)
            }
            BarKind::Mem64 { prefetchable } if spec.size > 0 => {
                let ty = BAR_MEM_64 | if prefetchable { BAR_MEM_PREFETCH } else { 0 };
                Register::ro(BAR_NAMES[i], offset, 4, ty)
                    .writable(size_mask as u32 & !BAR_TYPE_BITS)
            }
            _ => match upper_of {
                // The upper half of a 64-bit BAR: the high address bits.
                Some(prev) if matches!(prev.kind, BarKind::Mem64 { .. }) && prev.size > 0 => {
                    let mask = (!prev.size.wrapping_sub(1) >> 32) as u32;
                    Register::ro(BAR_NAMES[i], offset, 4, 0).writable(mask)
                }
                // Absent: reads 0, ignores writes.
                _ => Register::ro(BAR_NAMES[i], offset, 4, 0),
            },
        };
        out.push(reg);
    }
    out
}

/// The config space of one function.
pub struct ConfigSpace {
    regs: Vec<Register>,
    caps: CapLayout,
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    reset_bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    w1c: Box<[u8; CONFIG_SPACE_SIZE]>,
}

impl ConfigSpace {
    pub fn new(layout: &FunctionLayout) -> Self {
        let (regs, caps) = registers(layout);
        let mut reset_bytes = Box::new([0u8; CONFIG_SPACE_SIZE]);
        let mut writable = Box::new([0u8; CONFIG_SPACE_SIZE]);
        let mut w1c = Box::new([0u8; CONFIG_SPACE_SIZE]);
        for reg in &regs {
            for (k, at) in reg.range().enumerate() {
                if at >= CONFIG_SPACE_SIZE {
                    continue;
                }
                let shift = 8 * k;
                reset_bytes[at] = (reg.reset >> shift) as u8;
                writable[at] = (reg.writable >> shift) as u8;
                w1c[at] = (reg.w1c >> shift) as u8;
            }
        }
        ConfigSpace {
            regs,
            caps,
            bytes: reset_bytes.clone(),
            reset_bytes,
            writable,
            w1c,
        }
    }

    /// The register table (for tests and dumps).
    pub fn registers(&self) -> &[Register] {
        &self.regs
    }

    pub fn caps(&self) -> CapLayout {
        self.caps
    }

    /// Back to the reset values of every register.
    pub fn reset(&mut self) {
        self.bytes.copy_from_slice(&self.reset_bytes[..]);
    }

    fn range(offset: u64, len: usize) -> Result<std::ops::Range<usize>, ConfigError> {
        let err = ConfigError::OutOfRange { offset, len };
        let start = usize::try_from(offset).map_err(|_| err.clone())?;
        let end = start.checked_add(len).ok_or_else(|| err.clone())?;
        if end > CONFIG_SPACE_SIZE {
            return Err(err);
        }
        Ok(start..end)
    }

    /// Any length, any alignment.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), ConfigError> {
        let range = Self::range(offset, data.len())?;
        let src = self.bytes.get(range).ok_or(ConfigError::OutOfRange {
            offset,
            len: data.len(),
        })?;
        data.copy_from_slice(src);
        Ok(())
    }

    /// Any length, any alignment: each byte goes through its writable and
    /// W1C masks.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<WriteEffects, ConfigError> {
        let range = Self::range(offset, data.len())?;
        let err = ConfigError::OutOfRange {
            offset,
            len: data.len(),
        };
        let pmcsr_at = usize::from(self.caps.pm + PM_PMCSR);
        let old_pmcsr = self.read_u8(self.caps.pm + PM_PMCSR);
        let (Some(bytes), Some(writable), Some(w1c)) = (
            self.bytes.get_mut(range.clone()),
            self.writable.get(range.clone()),
            self.w1c.get(range.clone()),
        ) else {
            return Err(err);
        };
        for (((byte, &value), &wr), &clear) in bytes.iter_mut().zip(data).zip(writable).zip(w1c) {
            let kept = (*byte & !wr) | (value & wr);
            *byte = kept & !(value & clear);
        }
        // PCI PM 1.2 §7.1.4: a write of an unsupported state is discarded.
        if range.contains(&pmcsr_at)
            && let Some(pmcsr) = self.bytes.get_mut(pmcsr_at)
        {
            let state = *pmcsr & PMCSR_POWER_STATE as u8;
            if state != PM_STATE_D0 && state != PM_STATE_D3HOT {
                *pmcsr = old_pmcsr;
            }
        }
        // Initiate FLR is bit 15 of DEVCTL, i.e. bit 7 of its high byte. It is
        // not in the writable mask, so it always reads back 0.
        let flr_at = usize::from(self.caps.pcie + PCIE_DEVCTL + 1);
        let flr = flr_at
            .checked_sub(range.start)
            .and_then(|k| data.get(k))
            .is_some_and(|b| b & (PCIE_DEVCTL_FLR >> 8) as u8 != 0);
        Ok(WriteEffects { flr })
    }

    /// Every register whose value differs from its reset value:
    /// (offset, value). Only registers with writable or W1C bits can differ.
    pub fn changed_values(&self) -> Vec<(u16, u32)> {
        self.regs
            .iter()
            .map(|r| (r.offset, self.read_u32_at(r.offset, r.width)))
            .zip(&self.regs)
            .filter(|((_, v), r)| *v != r.reset)
            .map(|(ov, _)| ov)
            .collect()
    }

    /// Why `values` (from [`ConfigSpace::changed_values`] of another
    /// function of this layout) could not be this config space: an offset
    /// that names no register or comes twice, a value wider than its
    /// register, bits that neither a write nor the hardware can set, a power
    /// state a write is refused. `None` when they could.
    pub fn check_values(&self, values: &[(u16, u32)]) -> Option<String> {
        let mut seen = std::collections::HashSet::new();
        for &(offset, value) in values {
            let Some(reg) = self.regs.iter().find(|r| r.offset == offset) else {
                return Some(format!("config offset {offset:#x} names no register"));
            };
            if !seen.insert(offset) {
                return Some(format!("config register {} given twice", reg.name));
            }
            let width_mask = if reg.width >= 4 {
                u32::MAX
            } else {
                (1u32 << (8 * u32::from(reg.width))) - 1
            };
            let settable = reg.writable | reg.w1c;
            if value & !width_mask != 0 || (value ^ reg.reset) & !settable != 0 {
                return Some(format!(
                    "config register {} = {value:#x}: only bits {settable:#x} may differ from {:#x}",
                    reg.name, reg.reset
                ));
            }
            if offset == self.caps.pm + PM_PMCSR {
                let state = value as u8 & PMCSR_POWER_STATE as u8;
                if state != PM_STATE_D0 && state != PM_STATE_D3HOT {
                    return Some(format!("power state D{state} is not supported"));
                }
            }
        }
        None
    }

    /// Reset values, then `values` (checked by [`ConfigSpace::check_values`]).
    pub fn restore_values(&mut self, values: &[(u16, u32)]) {
        self.reset();
        for &(offset, value) in values {
            let Some(reg) = self.regs.iter().find(|r| r.offset == offset) else {
                continue;
            };
            for (k, at) in reg.range().enumerate() {
                if let Some(b) = self.bytes.get_mut(at) {
                    *b = (value >> (8 * k)) as u8;
                }
            }
        }
    }

    /// Set hardware-reported status bits (e.g. STATUS "received master
    /// abort", PCIe DEVSTA error bits). Only bits that are RW1C for software
    /// can be set this way; others are ignored.
    pub fn set_status_bits(&mut self, offset: u16, width: u8, bits: u32) {
        for k in 0..usize::from(width.min(4)) {
            let at = usize::from(offset) + k;
            if let (Some(byte), Some(clear)) = (self.bytes.get_mut(at), self.w1c.get(at)) {
                *byte |= (bits >> (8 * k)) as u8 & clear;
            }
        }
    }

    /// Little-endian read of up to 4 bytes; 0 outside the space.
    pub fn read_u32_at(&self, offset: u16, width: u8) -> u32 {
        let start = usize::from(offset);
        (0..usize::from(width.min(4)))
            .filter_map(|k| self.bytes.get(start + k).map(|b| u32::from(*b) << (8 * k)))
            .fold(0, |acc, v| acc | v)
    }

    pub fn read_u8(&self, offset: u16) -> u8 {
        self.read_u32_at(offset, 1) as u8
    }

    pub fn read_u16(&self, offset: u16) -> u16 {
        self.read_u32_at(offset, 2) as u16
    }

    pub fn read_u32(&self, offset: u16) -> u32 {
        self.read_u32_at(offset, 4)
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// MSI-X Message Control, if the capability exists.
    pub fn msix_control(&self) -> Option<u16> {
        self.caps.msix.map(|m| self.read_u16(m + MSIX_CONTROL))
    }

    /// PMCSR power state (0 = D0, 3 = D3hot).
    pub fn power_state(&self) -> u8 {
        self.read_u8(self.caps.pm + PM_PMCSR) & PMCSR_POWER_STATE as u8
    }

    /// The address a BAR is programmed with (both halves of a 64-bit BAR),
    /// without type bits. `None` for an index past 5.
    pub fn bar_address(&self, bar: u8) -> Option<u64> {
        if bar > 5 {
            return None;
        }
        let lo = self.read_u32(BAR0 + 4 * u16::from(bar));
        let addr = u64::from(lo & !BAR_TYPE_BITS);
        if lo & BAR_MEM_64 != 0 && bar < 5 {
            let hi = self.read_u32(BAR0 + 4 * (u16::from(bar) + 1));
            return Some(addr | (u64::from(hi) << 32));
        }
        Some(addr)
    }
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("caps", &self.caps)
            .field("command", &self.command())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PCI layer's test layout (two 64-bit BARs, MSI-X in BAR0).
    fn layout() -> FunctionLayout {
        super::super::tests::test_layout()
    }

    #[test]
    fn registers_do_not_overlap_and_fit() {
        let (regs, _) = registers(&layout());
        let mut owner = vec![None; CONFIG_SPACE_SIZE];
        for r in &regs {
            assert!((1..=4).contains(&r.width), "{}", r.name);
            assert_eq!(
                r.writable & r.w1c,
                0,
                "{}: a bit is both RW and RW1C",
                r.name
            );
            for at in r.range() {
                assert!(at < 0x100, "{} leaks into extended space", r.name);
                if let Some(other) = owner[at] {
                    panic!("{} overlaps {} at {at:#x}", r.name, other);
                }
                owner[at] = Some(r.name);
            }
        }
    }

    #[test]
    fn every_register_reads_its_reset_value_and_keeps_ro_bits() {
        let mut cs = ConfigSpace::new(&layout());
        for r in cs.registers().to_vec() {
            assert_eq!(
                cs.read_u32_at(r.offset, r.width),
                r.reset,
                "{} reset",
                r.name
            );
            let ones = vec![0xff; usize::from(r.width)];
            let effects = cs.write(r.offset.into(), &ones).unwrap();
            let width_mask = if r.width == 4 {
                u32::MAX
            } else {
                (1u32 << (8 * r.width)) - 1
            };
            let expect = ((r.reset & !r.writable) | r.writable) & !r.w1c & width_mask;
            assert_eq!(
                cs.read_u32_at(r.offset, r.width),
                expect,
                "{} after all-ones",
                r.name
            );
            if r.name == "pcie devctl" {
                assert!(effects.flr);
            } else {
                assert!(!effects.flr, "{}", r.name);
            }
            cs.reset();
        }
    }

    #[test]
    fn bytes_outside_the_table_are_read_only_zero() {
        let mut cs = ConfigSpace::new(&layout());
        let (regs, _) = registers(&layout());
        cs.write(0, &[0xff; CONFIG_SPACE_SIZE]).unwrap();
        let mut all = [0u8; CONFIG_SPACE_SIZE];
        cs.read(0, &mut all).unwrap();
        for (at, b) in all.iter().enumerate() {
            if !regs.iter().any(|r| r.range().contains(&at)) {
                assert_eq!(*b, 0, "byte {at:#x}");
            }
        }
    }

    #[test]
    fn pmcsr_discards_d1_and_d2() {
        let mut cs = ConfigSpace::new(&layout());
        let at = u64::from(PM_CAP + PM_PMCSR);
        cs.write(at, &[3]).unwrap();
        assert_eq!(cs.power_state(), PM_STATE_D3HOT);
        cs.write(at, &[1]).unwrap();
        assert_eq!(cs.power_state(), PM_STATE_D3HOT);
        cs.write(at, &[2, 0]).unwrap();
        assert_eq!(cs.power_state(), PM_STATE_D3HOT);
        cs.write(at, &[0]).unwrap();
        assert_eq!(cs.power_state(), PM_STATE_D0);
        // No_Soft_Reset stays set.
        assert_eq!(cs.read_u16(PM_CAP + PM_PMCSR), PMCSR_NO_SOFT_RESET);
    }

    #[test]
    fn out_of_range_is_refused() {
        let mut cs = ConfigSpace::new(&layout());
        let mut b = [0u8; 4];
        assert!(cs.read(4094, &mut b).is_err());
        assert!(cs.write(4093, &b).is_err());
        assert!(cs.read(u64::MAX, &mut b).is_err());
        assert!(cs.read(4092, &mut b).is_ok());
    }

    #[test]
    fn bar_address_combines_halves() {
        let mut cs = ConfigSpace::new(&layout());
        cs.write(u64::from(BAR0 + 4), &0xfe00_0000u32.to_le_bytes())
            .unwrap();
        cs.write(u64::from(BAR0 + 8), &0x0000_0001u32.to_le_bytes())
            .unwrap();
        assert_eq!(cs.bar_address(1), Some(0x1_fe00_0000));
        cs.write(u64::from(BAR0), &0xfebf_c123u32.to_le_bytes())
            .unwrap();
        assert_eq!(cs.bar_address(0), Some(0xfebf_c000));
        assert_eq!(cs.bar_address(6), None);
    }
}
