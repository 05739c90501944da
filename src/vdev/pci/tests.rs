//! `PciFunction` driven the way QEMU, cloud-hypervisor and a guest driver
//! would, over a RAM-backed test model.

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use super::config::*;
use super::interrupts::tests::{count, efd};
use super::{Interrupts, IrqOutcome, LayoutError, PciFunction};
use crate::vdev::device::{DeviceError, DmaMapping, IrqAction, IrqData, VfioUserDevice};
use crate::vdev::function::{BarKind, BarSpec, FunctionLayout, FunctionModel};

const CFG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
const VECTORS: u16 = 70;
const TABLE: u64 = 0x2000;
const PBA: u64 = 0x3000;
const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;

pub(super) fn test_layout() -> FunctionLayout {
    FunctionLayout {
        vendor_id: 0x1234,
        device_id: 0x5678,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x0042,
        revision: 3,
        class_code: 0x12_00_00,
        bars: [
            BarSpec {
                kind: BarKind::Mem32,
                size: 0x4000,
            },
            BarSpec {
                kind: BarKind::Mem64 { prefetchable: true },
                size: 0x1_0000,
            },
            BarSpec::NONE,
            BarSpec::NONE,
            BarSpec {
                kind: BarKind::Mem64 {
                    prefetchable: false,
                },
                size: 0x2_0000_0000,
            },
            BarSpec::NONE,
        ],
        msix_vectors: VECTORS,
        msix_table: (0, TABLE as u32),
        msix_pba: (0, PBA as u32),
    }
}

/// A test double: each BAR is RAM (at most 64 KiB backed), and every call
/// is recorded.
struct RamModel {
    layout: FunctionLayout,
    ram: Vec<Vec<u8>>,
    accesses: Vec<(u8, u64, usize)>,
    bus_master: Vec<bool>,
    resets: u32,
    disconnected: bool,
    dma: Vec<String>,
}

impl RamModel {
    fn new(layout: FunctionLayout) -> Self {
        let ram = layout
            .bars
            .iter()
            .map(|b| vec![0; b.size.min(0x1_0000) as usize])
            .collect();
        RamModel {
            layout,
            ram,
            accesses: Vec::new(),
            bus_master: Vec::new(),
            resets: 0,
            disconnected: false,
            dma: Vec::new(),
        }
    }

    fn cell(&mut self, bar: u8, offset: u64, len: usize) -> Result<&mut [u8], DeviceError> {
        self.accesses.push((bar, offset, len));
        let ram = self
            .ram
            .get_mut(usize::from(bar))
            .ok_or_else(|| DeviceError::Fault("bar".into()))?;
        let start = usize::try_from(offset).map_err(|_| DeviceError::Fault("offset".into()))?;
        ram.get_mut(start..start + len)
            .ok_or_else(|| DeviceError::Fault("outside backed RAM".into()))
    }
}

impl FunctionModel for RamModel {
    fn layout(&self) -> FunctionLayout {
        self.layout.clone()
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.copy_from_slice(self.cell(bar, offset, data.len())?);
        Ok(())
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.cell(bar, offset, data.len())?.copy_from_slice(data);
        Ok(())
    }
    fn dma_map(&mut self, map: DmaMapping) -> Result<(), DeviceError> {
        self.dma
            .push(format!("map {:#x}+{:#x}", map.iova, map.size));
        Ok(())
    }
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DeviceError> {
        self.dma.push(format!("unmap {iova:#x}+{size:#x}"));
        Ok(())
    }
    fn dma_unmap_all(&mut self) -> Result<(), DeviceError> {
        self.dma.push("unmap all".into());
        Ok(())
    }
    fn set_bus_master(&mut self, enabled: bool) {
        self.bus_master.push(enabled);
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.resets += 1;
        for r in &mut self.ram {
            r.fill(0);
        }
        Ok(())
    }
    fn disconnected(&mut self) {
        self.disconnected = true;
    }
    fn held_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        Vec::new()
    }
    fn migration(&self) -> Option<&dyn crate::vdev::function::ModelMigration> {
        None
    }
    fn migration_mut(&mut self) -> Option<&mut dyn crate::vdev::function::ModelMigration> {
        None
    }
}

fn function() -> PciFunction<RamModel> {
    PciFunction::new(RamModel::new(test_layout()), Interrupts::new(VECTORS))
}

fn rd(f: &mut PciFunction<RamModel>, index: u32, offset: u64, len: usize) -> u64 {
    let mut b = vec![0u8; len];
    f.region_read(index, offset, &mut b).unwrap();
    b.iter().rev().fold(0, |acc, x| (acc << 8) | u64::from(*x))
}

fn wr(f: &mut PciFunction<RamModel>, index: u32, offset: u64, len: usize, value: u64) {
    f.region_write(index, offset, &value.to_le_bytes()[..len])
        .unwrap();
}

fn cfg32(f: &mut PciFunction<RamModel>, offset: u16) -> u32 {
    rd(f, CFG, offset.into(), 4) as u32
}

fn cfg16(f: &mut PciFunction<RamModel>, offset: u16) -> u16 {
    rd(f, CFG, offset.into(), 2) as u16
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Assign one eventfd to an MSI-X vector; returns the reading end.
/// VFIO-level MASK or UNMASK of one MSI-X vector (SET_IRQS DATA_NONE).
fn vfio_msix(f: &mut PciFunction<RamModel>, action: IrqAction, vector: u32) {
    f.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, action, vector, 1, IrqData::None)
        .unwrap();
}

fn assign_vector(f: &mut PciFunction<RamModel>, v: u32) -> OwnedFd {
    let (fd, dup) = efd();
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        v,
        1,
        IrqData::Eventfds(vec![Some(dup)]),
    )
    .unwrap();
    fd
}

fn enable_msix(f: &mut PciFunction<RamModel>, control: u16) {
    wr(
        f,
        CFG,
        u64::from(MSIX_CAP + MSIX_CONTROL),
        2,
        control.into(),
    );
}

fn pba_bit(f: &mut PciFunction<RamModel>, v: u64) -> bool {
    rd(f, 0, PBA + (v / 64) * 8, 8) & (1 << (v % 64)) != 0
}

#[test]
fn ids_and_class_at_their_offsets() {
    let mut f = function();
    assert_eq!(cfg16(&mut f, VENDOR_ID), 0x1234);
    assert_eq!(cfg16(&mut f, DEVICE_ID), 0x5678);
    assert_eq!(cfg16(&mut f, SUBSYSTEM_VENDOR_ID), 0x1af4);
    assert_eq!(cfg16(&mut f, SUBSYSTEM_ID), 0x0042);
    assert_eq!(rd(&mut f, CFG, REVISION_ID.into(), 1), 3);
    assert_eq!(rd(&mut f, CFG, 0x0b, 1), 0x12, "base class");
    assert_eq!(rd(&mut f, CFG, 0x0a, 1), 0x00, "subclass");
    assert_eq!(rd(&mut f, CFG, HEADER_TYPE.into(), 1), 0);
    assert_eq!(rd(&mut f, CFG, INTERRUPT_PIN.into(), 1), 0, "no INTx");
    assert_eq!(rd(&mut f, CFG, CAP_POINTER.into(), 1), 0x40);
    assert_eq!(cfg16(&mut f, STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
    // IDs are read-only.
    wr(&mut f, CFG, 0, 4, 0xffff_ffff);
    assert_eq!(cfg32(&mut f, 0), 0x5678_1234);
}

#[test]
fn golden_first_64_bytes() {
    let mut f = function();
    let mut b = [0u8; 64];
    f.region_read(CFG, 0, &mut b).unwrap();
    let golden = concat!(
        "34127856", "00001000", "03000012",
        "00000000", // ids, command, status, rev/class, header
        "00000000", "0c000000", "00000000",
        "00000000", // BAR0 mem32, BAR1 mem64 pf, BAR2 upper, BAR3 absent
        "04000000", "00000000", "00000000",
        "f41a4200", // BAR4 mem64, BAR5 upper, CIS, subsystem
        "00000000", "40000000", "00000000", "00000000", // ROM, cap ptr, reserved, line/pin 0
    );
    assert_eq!(hex(&b), golden);
}

#[test]
fn golden_msix_and_pcie_caps() {
    let mut f = function();
    let mut msix = [0u8; 12];
    f.region_read(CFG, MSIX_CAP.into(), &mut msix).unwrap();
    // id 0x11, next 0x90, table size 69, table BIR 0 @0x2000, PBA BIR 0 @0x3000
    assert_eq!(hex(&msix), "11904500".to_owned() + "00200000" + "00300000");
    let mut pcie = [0u8; 20];
    f.region_read(CFG, PCIE_CAP.into(), &mut pcie).unwrap();
    // id 0x10 next 0x80, v2 endpoint, DEVCAP RBER|FLR, DEVCTL 0x2810, DEVSTA 0,
    // LNKCAP x1 2.5GT/s, LNKCTL 0, LNKSTA x1 2.5GT/s
    assert_eq!(
        hex(&pcie),
        "10800200".to_owned() + "00800010" + "10280000" + "11000000" + "00001100"
    );
}

#[test]
fn bar_sizing_by_writing_all_ones() {
    let mut f = function();
    let mut sized = Vec::new();
    for bar in 0..6u16 {
        let at = BAR0 + 4 * bar;
        wr(&mut f, CFG, at.into(), 4, 0xffff_ffff);
        sized.push(cfg32(&mut f, at));
    }
    assert_eq!(
        sized,
        [
            0xffff_c000,          // 16 KiB, 32-bit
            0xffff_0000 | 0b1100, // 64 KiB, 64-bit prefetchable
            0xffff_ffff,          // its upper half: all address bits
            0,                    // absent
            0b0100,               // 8 GiB 64-bit: no address bits in the low dword
            0xffff_fffe,          // its upper half: !(8 GiB - 1) >> 32
        ]
    );
    // A programmed address reads back with its type bits; low bits are dropped.
    wr(&mut f, CFG, BAR0.into(), 4, 0xfebf_c123);
    assert_eq!(cfg32(&mut f, BAR0), 0xfebf_c000);
    wr(&mut f, CFG, u64::from(BAR0 + 4), 4, 0xfe01_0000);
    wr(&mut f, CFG, u64::from(BAR0 + 8), 4, 0x0000_0080);
    assert_eq!(f.config().bar_address(1), Some(0x80_fe01_0000));
    assert_eq!(cfg32(&mut f, BAR0 + 4), 0xfe01_000c);
}

#[test]
fn absent_bar_and_rom_read_zero_after_all_ones() {
    let mut f = function();
    wr(&mut f, CFG, u64::from(BAR0 + 12), 4, 0xffff_ffff);
    assert_eq!(cfg32(&mut f, BAR0 + 12), 0);
    // QEMU sizes the ROM BAR with 0xfffff800; cloud-hypervisor with all-ones.
    for probe in [0xffff_f800u32, 0xffff_ffff, 0xffff_fffe] {
        wr(&mut f, CFG, ROM_BAR.into(), 4, probe.into());
        assert_eq!(cfg32(&mut f, ROM_BAR), 0);
    }
}

#[test]
fn capability_chain_walks_to_the_end() {
    let mut f = function();
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    let mut ptr = rd(&mut f, CFG, CAP_POINTER.into(), 1) as u16;
    while ptr != 0 {
        assert!(seen.insert(ptr), "loop at {ptr:#x}");
        assert!(
            (0x40..0x100).contains(&ptr) && ptr.is_multiple_of(4),
            "bad pointer {ptr:#x}"
        );
        ids.push(rd(&mut f, CFG, ptr.into(), 1) as u8);
        ptr = rd(&mut f, CFG, u64::from(ptr) + 1, 1) as u16;
    }
    assert_eq!(ids, [CAP_ID_PCIE, CAP_ID_MSIX, CAP_ID_PM]);
    // PCIe: version 2, Endpoint, FLR supported.
    let flags = cfg16(&mut f, PCIE_CAP + PCIE_FLAGS);
    assert_eq!(flags & 0xf, 2);
    assert_eq!((flags >> 4) & 0xf, 0);
    assert_ne!(cfg32(&mut f, PCIE_CAP + PCIE_DEVCAP) & (1 << 28), 0);
    // No extended capabilities: the header at 0x100 is 0.
    assert_eq!(cfg32(&mut f, 0x100), 0);
}

#[test]
fn chain_skips_msix_without_vectors() {
    let mut layout = test_layout();
    layout.msix_vectors = 0;
    let mut f = PciFunction::new(RamModel::new(layout), Interrupts::new(0));
    assert_eq!(rd(&mut f, CFG, u64::from(PCIE_CAP) + 1, 1) as u16, PM_CAP);
    assert_eq!(rd(&mut f, CFG, MSIX_CAP.into(), 4), 0);
    assert_eq!(f.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap().count, 0);
}

#[test]
fn msix_capability_matches_layout() {
    let mut f = function();
    let control = cfg16(&mut f, MSIX_CAP + MSIX_CONTROL);
    assert_eq!(control & MSIX_CONTROL_TABLE_SIZE, VECTORS - 1);
    assert_eq!(
        control & (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK),
        0
    );
    let table = cfg32(&mut f, MSIX_CAP + MSIX_TABLE);
    assert_eq!((table & 7, u64::from(table & !7)), (0, TABLE));
    let pba = cfg32(&mut f, MSIX_CAP + MSIX_PBA);
    assert_eq!((pba & 7, u64::from(pba & !7)), (0, PBA));
    // Table size and offsets are read-only; Enable and Function Mask are not.
    wr(&mut f, CFG, u64::from(MSIX_CAP + MSIX_CONTROL), 2, 0xffff);
    assert_eq!(
        cfg16(&mut f, MSIX_CAP + MSIX_CONTROL),
        0xc000 | (VECTORS - 1)
    );
    assert!(f.interrupts().msix_enabled());
    wr(
        &mut f,
        CFG,
        u64::from(MSIX_CAP + MSIX_TABLE),
        4,
        0xffff_ffff,
    );
    assert_eq!(cfg32(&mut f, MSIX_CAP + MSIX_TABLE), table);
}

#[test]
fn whole_config_space_in_one_read() {
    let mut f = function();
    let mut all = vec![0u8; CONFIG_SPACE_SIZE];
    f.region_read(CFG, 0, &mut all).unwrap();
    for at in (0..CONFIG_SPACE_SIZE).step_by(7) {
        assert_eq!(rd(&mut f, CFG, at as u64, 1) as u8, all[at], "byte {at:#x}");
    }
    assert_eq!(&all[..4], &[0x34, 0x12, 0x78, 0x56]);
    assert!(all[0x100..].iter().all(|b| *b == 0));
    // And one full-range write of what was read changes nothing.
    f.region_write(CFG, 0, &all.clone()).unwrap();
    let mut again = vec![0u8; CONFIG_SPACE_SIZE];
    f.region_read(CFG, 0, &mut again).unwrap();
    assert_eq!(all, again);
    // Past the end is refused.
    assert!(f.region_read(CFG, 4093, &mut [0u8; 4]).is_err());
}

#[test]
fn byte_and_word_accesses_at_odd_offsets() {
    let mut f = function();
    assert_eq!(rd(&mut f, CFG, 0x01, 2), 0x7812);
    assert_eq!(rd(&mut f, CFG, 0x03, 1), 0x56);
    // Across a dword boundary: header type, BIST, BAR0's low half.
    wr(&mut f, CFG, BAR0.into(), 4, 0xabcd_4000);
    assert_eq!(rd(&mut f, CFG, 0x0e, 4), 0x4000_0000);
    assert_eq!(rd(&mut f, CFG, 0x0f, 4), 0xcd40_0000);
    // A word write at 0x03 hits the device ID's RO high byte and the
    // command register's low byte (memory + bus master).
    wr(&mut f, CFG, 0x03, 2, 0x06ff);
    assert_eq!(cfg16(&mut f, DEVICE_ID), 0x5678);
    assert_eq!(cfg16(&mut f, COMMAND), CMD_MEMORY_SPACE | CMD_BUS_MASTER);
    assert_eq!(f.model().bus_master, [true]);
    // Interrupt line is RW, pin RO, in one word write.
    wr(&mut f, CFG, INTERRUPT_LINE.into(), 2, 0x050b);
    assert_eq!(cfg16(&mut f, INTERRUPT_LINE), 0x000b);
    // A byte write to BAR0's third byte keeps the others.
    wr(&mut f, CFG, u64::from(BAR0) + 2, 1, 0x12);
    assert_eq!(cfg32(&mut f, BAR0), 0xab12_4000);
}

#[test]
fn command_register_writable_bits() {
    let mut f = function();
    wr(&mut f, CFG, COMMAND.into(), 2, 0xffff);
    assert_eq!(cfg16(&mut f, COMMAND), CMD_WRITABLE);
    assert_eq!(cfg16(&mut f, COMMAND) & 1, 0, "no I/O space");
}

#[test]
fn status_error_bits_are_write_one_to_clear() {
    let mut f = function();
    // Software cannot set them.
    wr(&mut f, CFG, STATUS.into(), 2, 0xffff);
    assert_eq!(cfg16(&mut f, STATUS), STATUS_CAP_LIST);
    // Hardware sets received-master-abort and signaled-system-error; not
    // the read-only bits.
    f.set_status_bits(STATUS, 2, 0x2000 | 0x4000 | 0x0001);
    assert_eq!(cfg16(&mut f, STATUS), STATUS_CAP_LIST | 0x6000);
    wr(&mut f, CFG, STATUS.into(), 2, 0);
    assert_eq!(
        cfg16(&mut f, STATUS),
        STATUS_CAP_LIST | 0x6000,
        "writing 0 clears nothing"
    );
    wr(&mut f, CFG, STATUS.into(), 2, 0x2000);
    assert_eq!(cfg16(&mut f, STATUS), STATUS_CAP_LIST | 0x4000);
    // A byte write to the high byte clears too.
    wr(&mut f, CFG, u64::from(STATUS) + 1, 1, 0x40);
    assert_eq!(cfg16(&mut f, STATUS), STATUS_CAP_LIST);
    // PCIe Device Status error bits likewise.
    f.set_status_bits(PCIE_CAP + PCIE_DEVSTA, 2, 0x000f);
    wr(&mut f, CFG, u64::from(PCIE_CAP + PCIE_DEVSTA), 2, 0x0005);
    assert_eq!(cfg16(&mut f, PCIE_CAP + PCIE_DEVSTA), 0x000a);
}

#[test]
fn bus_master_changes_reach_the_model() {
    let mut f = function();
    wr(&mut f, CFG, COMMAND.into(), 2, CMD_MEMORY_SPACE.into());
    assert!(
        f.model().bus_master.is_empty(),
        "memory space alone is not bus mastering"
    );
    wr(
        &mut f,
        CFG,
        COMMAND.into(),
        2,
        (CMD_MEMORY_SPACE | CMD_BUS_MASTER).into(),
    );
    wr(
        &mut f,
        CFG,
        COMMAND.into(),
        2,
        (CMD_MEMORY_SPACE | CMD_BUS_MASTER | CMD_SERR_ENABLE).into(),
    );
    wr(&mut f, CFG, COMMAND.into(), 2, CMD_MEMORY_SPACE.into());
    assert_eq!(f.model().bus_master, [true, false]);
}

#[test]
fn flr_through_devctl_resets_model_and_config() {
    let mut f = function();
    wr(&mut f, CFG, BAR0.into(), 4, 0xfebf_c000);
    wr(
        &mut f,
        CFG,
        COMMAND.into(),
        2,
        (CMD_MEMORY_SPACE | CMD_BUS_MASTER).into(),
    );
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    wr(&mut f, CFG, INTERRUPT_LINE.into(), 1, 11);
    wr(&mut f, 0, 0x10, 4, 0xdead_beef);
    let fd = assign_vector(&mut f, 0);
    // Other DEVCTL writes do not reset.
    wr(&mut f, CFG, u64::from(PCIE_CAP + PCIE_DEVCTL), 2, 0x0010);
    assert_eq!(f.model().resets, 0);
    assert_eq!(cfg16(&mut f, PCIE_CAP + PCIE_DEVCTL), 0x0010);
    // Initiate FLR.
    wr(
        &mut f,
        CFG,
        u64::from(PCIE_CAP + PCIE_DEVCTL),
        2,
        0x8000 | 0x0010,
    );
    assert_eq!(f.model().resets, 1);
    assert_eq!(f.model().bus_master, [true, false]);
    assert_eq!(
        cfg16(&mut f, PCIE_CAP + PCIE_DEVCTL),
        PCIE_DEVCTL_RESET,
        "FLR bit self-clears, DEVCTL reset"
    );
    assert_eq!(cfg32(&mut f, BAR0), 0);
    assert_eq!(cfg16(&mut f, COMMAND), 0);
    assert_eq!(rd(&mut f, CFG, INTERRUPT_LINE.into(), 1), 0);
    assert!(!f.interrupts().msix_enabled());
    assert_eq!(rd(&mut f, 0, 0x10, 4), 0, "model RAM reset");
    // Eventfds survive; MSI-X must be re-enabled before delivery.
    assert_eq!(f.interrupts().msix_has_eventfd(0), Some(true));
    assert_eq!(f.interrupts().trigger_msix(0), IrqOutcome::Disabled);
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    assert_eq!(f.interrupts().trigger_msix(0), IrqOutcome::Delivered);
    assert_eq!(count(&fd), 1);
    // An FLR written as a single byte to DEVCTL's high byte works too.
    wr(&mut f, CFG, u64::from(PCIE_CAP + PCIE_DEVCTL) + 1, 1, 0x80);
    assert_eq!(f.model().resets, 2);
}

#[test]
fn pm_state_and_config_reset() {
    let mut f = function();
    wr(&mut f, CFG, u64::from(PM_CAP + PM_PMCSR), 2, 3);
    assert_eq!(f.config().power_state(), PM_STATE_D3HOT);
    f.reset().unwrap();
    assert_eq!(f.config().power_state(), PM_STATE_D0);
}

#[test]
fn msix_delivery_masking_and_pba() {
    let mut f = function();
    let irq = f.interrupts().clone();
    let fd = assign_vector(&mut f, 65);
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    assert_eq!(irq.trigger_msix(65), IrqOutcome::Delivered);
    assert_eq!(count(&fd), 1);
    assert_eq!(count(&fd), 0, "consumed");

    // Program entry 65 through the BAR (the client now owns the table), masked.
    let entry = TABLE + 65 * 16;
    wr(&mut f, 0, entry, 8, 0xfee0_1000);
    wr(&mut f, 0, entry + 8, 4, 0x4022);
    wr(&mut f, 0, entry + 12, 4, 1);
    assert_eq!(rd(&mut f, 0, entry, 8), 0xfee0_1000);
    assert_eq!(rd(&mut f, 0, entry + 8, 8), 0x1_0000_4022);
    assert_eq!(irq.trigger_msix(65), IrqOutcome::Pending);
    assert_eq!(count(&fd), 0);
    assert!(pba_bit(&mut f, 65));
    assert!(!pba_bit(&mut f, 64));
    // Unmask: the pending message fires and the PBA bit clears.
    wr(&mut f, 0, entry + 12, 4, 0);
    assert_eq!(count(&fd), 1);
    assert!(!pba_bit(&mut f, 65));

    // Function mask holds every vector.
    enable_msix(&mut f, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    assert_eq!(irq.trigger_msix(65), IrqOutcome::Pending);
    assert!(pba_bit(&mut f, 65));
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    assert_eq!(count(&fd), 1);
    assert!(!pba_bit(&mut f, 65));

    // VFIO-level mask is separate from the table mask.
    vfio_msix(&mut f, IrqAction::Mask, 65);
    assert_eq!(irq.trigger_msix(65), IrqOutcome::Pending);
    vfio_msix(&mut f, IrqAction::Unmask, 65);
    assert_eq!(count(&fd), 1);

    // PBA writes are ignored.
    irq.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Mask,
        65,
        1,
        IrqData::None,
    )
    .unwrap();
    irq.trigger_msix(65);
    wr(&mut f, 0, PBA + 8, 8, 0);
    assert!(pba_bit(&mut f, 65));

    // De-assign: an unmasked trigger waits in the PBA for a new eventfd.
    vfio_msix(&mut f, IrqAction::Unmask, 65);
    assert_eq!(count(&fd), 1);
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        65,
        1,
        IrqData::Eventfds(vec![None]),
    )
    .unwrap();
    assert_eq!(irq.trigger_msix(65), IrqOutcome::Pending);
    assert!(pba_bit(&mut f, 65));
    assert_eq!(irq.trigger_msix(VECTORS), IrqOutcome::OutOfRange);
    let c = irq.msix_counters(65).unwrap();
    assert_eq!((c.delivered, c.pending, c.dropped), (5, 5, 0));
    assert!(
        f.model().accesses.is_empty(),
        "table and PBA accesses never reach the model"
    );
}

/// A completion while an unmasked vector has no eventfd (QEMU's "enabled,
/// no vectors", or the window of a disable-and-re-add) is kept in the PBA
/// and delivered when an eventfd arrives.
#[test]
fn msix_trigger_without_eventfd_waits_for_one() {
    let mut f = function();
    let irq = f.interrupts().clone();
    enable_msix(&mut f, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfds(vec![None]),
    )
    .unwrap();
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    // Vector 1 not assigned yet.
    assert_eq!(irq.trigger_msix(1), IrqOutcome::Pending);
    assert!(pba_bit(&mut f, 1));
    let fd1 = assign_vector(&mut f, 1);
    assert_eq!(count(&fd1), 1, "delivered on assignment");
    assert!(!pba_bit(&mut f, 1));

    // Vector 0 assigned, then the whole index disabled (0x21, count 0) and
    // re-added, as a NORESIZE client does: the trigger in between survives.
    let fd0 = assign_vector(&mut f, 0);
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        0,
        IrqData::None,
    )
    .unwrap();
    assert_eq!(irq.msix_has_eventfd(0), Some(false));
    assert_eq!(irq.trigger_msix(0), IrqOutcome::Pending);
    assert_eq!(count(&fd0), 0);
    let (fd0, dup0) = efd();
    let (fd1, dup1) = efd();
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        2,
        IrqData::Eventfds(vec![Some(dup0), Some(dup1)]),
    )
    .unwrap();
    assert_eq!((count(&fd0), count(&fd1)), (1, 0));
    assert!(!pba_bit(&mut f, 0));
    let c = irq.msix_counters(0).unwrap();
    assert_eq!((c.delivered, c.pending, c.dropped), (1, 1, 0));
}

/// The disable index form drops the eventfds but keeps pending bits; a
/// vector that is masked as well waits for both an eventfd and the unmask.
#[test]
fn msix_disable_index_keeps_pending_bits() {
    let mut f = function();
    let irq = f.interrupts().clone();
    let _fd = assign_vector(&mut f, 2);
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    vfio_msix(&mut f, IrqAction::Mask, 2);
    assert_eq!(irq.trigger_msix(2), IrqOutcome::Pending);
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        0,
        IrqData::None,
    )
    .unwrap();
    assert!(pba_bit(&mut f, 2), "pending bit kept across the disable");
    // Masked again (the disable cleared the VFIO mask; the function mask
    // holds it now), then an eventfd: still held.
    enable_msix(&mut f, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    let fd = assign_vector(&mut f, 2);
    assert_eq!(count(&fd), 0);
    assert!(pba_bit(&mut f, 2));
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    assert_eq!(count(&fd), 1);
    assert!(!pba_bit(&mut f, 2));
    // With MSI-X Enable clear a trigger is still dropped, not kept.
    enable_msix(&mut f, 0);
    assert_eq!(irq.trigger_msix(3), IrqOutcome::Disabled);
    assert!(!pba_bit(&mut f, 3));
}

#[test]
fn vfio_trigger_hook_and_disable() {
    let mut f = function();
    let fd = assign_vector(&mut f, 3);
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        2,
        2,
        IrqData::None,
    )
    .unwrap();
    assert_eq!(count(&fd), 1);
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        0,
        IrqData::None,
    )
    .unwrap();
    assert_eq!(f.interrupts().msix_has_eventfd(3), Some(false));
    assert_eq!(f.interrupts().trigger_msix(3), IrqOutcome::Pending);
    assert_eq!(count(&fd), 0);
}

#[test]
fn set_irqs_past_the_vector_count_is_einval() {
    let mut f = function();
    let fds = (0..3).map(|_| None).collect();
    let e = f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        u32::from(VECTORS) - 2,
        3,
        IrqData::Eventfds(fds),
    );
    assert_eq!(e.unwrap_err().errno(), libc::EINVAL as u32);
    let e = f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Unmask,
        u32::MAX,
        1,
        IrqData::None,
    );
    assert_eq!(e.unwrap_err().errno(), libc::EINVAL as u32);
    let e = f.set_irqs(
        VFIO_PCI_MSI_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfds(vec![None]),
    );
    assert_eq!(e.unwrap_err().errno(), libc::EINVAL as u32);
}

/// Interrupt pin 0: no INTx. Only the "disable INTx" form that QEMU sends
/// before enabling MSI-X and on reset is accepted, and it does nothing.
#[test]
fn intx_is_not_offered() {
    let mut f = function();
    let einval = libc::EINVAL as u32;
    let (_fd, dup) = efd();
    let e = f.set_irqs(
        VFIO_PCI_INTX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfds(vec![Some(dup)]),
    );
    assert_eq!(e.unwrap_err().errno(), einval);
    for action in [IrqAction::Mask, IrqAction::Unmask, IrqAction::Trigger] {
        let e = f.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, action, 0, 1, IrqData::None);
        assert_eq!(e.unwrap_err().errno(), einval, "{action:?}");
    }
    f.set_irqs(
        VFIO_PCI_INTX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        0,
        IrqData::None,
    )
    .unwrap();
    assert_eq!(f.interrupts().trigger_intx(), IrqOutcome::NoEventfd);
    // Command INTx Disable is still an ordinary writable bit.
    wr(&mut f, CFG, COMMAND.into(), 2, CMD_INTX_DISABLE.into());
    assert_eq!(cfg16(&mut f, COMMAND), CMD_INTX_DISABLE);
}

#[test]
fn region_info_for_every_index() {
    let f = function();
    let expect: [(u32, u64); 9] = [
        (RW, 0x4000),
        (RW, 0x1_0000),
        (0, 0),
        (0, 0),
        (RW, 0x2_0000_0000),
        (0, 0),
        (0, 0),
        (RW, 4096),
        (0, 0),
    ];
    for (i, (flags, size)) in expect.iter().enumerate() {
        let info = f.region_info(i as u32).unwrap();
        assert_eq!((info.flags, info.size), (*flags, *size), "region {i}");
        assert!(info.mmap.is_none());
    }
    assert!(f.region_info(9).is_err());
}

#[test]
fn device_and_irq_info() {
    let f = function();
    let info = f.device_info();
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    // Count 0: no INTx (cloud-hypervisor reads it so; QEMU follows pin 0).
    let intx = f.irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap();
    assert_eq!(
        (intx.flags, intx.count),
        (
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
            0
        )
    );
    assert_eq!(f.irq_info(VFIO_PCI_MSI_IRQ_INDEX).unwrap().count, 0);
    let msix = f.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    // No NORESIZE: QEMU then adds each vector on its own instead of
    // tearing all of them down and re-adding them on every new vector.
    assert_eq!((msix.flags, msix.count), (VFIO_IRQ_INFO_EVENTFD, 70));
    assert_eq!(msix.flags & VFIO_IRQ_INFO_NORESIZE, 0);
    assert_eq!(f.irq_info(VFIO_PCI_ERR_IRQ_INDEX).unwrap().count, 1);
    assert_eq!(f.irq_info(VFIO_PCI_REQ_IRQ_INDEX).unwrap().count, 1);
    assert!(f.irq_info(5).is_err());
}

#[test]
fn bar_accesses_reach_the_model_around_msix() {
    let mut f = function();
    // Memory Space is off: accesses are forwarded anyway (documented).
    wr(&mut f, 0, 0x100, 4, 0x1122_3344);
    assert_eq!(rd(&mut f, 0, 0x100, 4), 0x1122_3344);
    wr(&mut f, 1, 0xfff8, 8, 0x0102_0304_0506_0708);
    assert_eq!(rd(&mut f, 1, 0xfff8, 8), 0x0102_0304_0506_0708);
    // Table offsets in BAR1 are ordinary model RAM: the table is in BAR0.
    wr(&mut f, 1, TABLE, 4, 7);
    assert_eq!(rd(&mut f, 1, TABLE, 4), 7);
    f.model_mut().accesses.clear();
    // A straddling read: 4 bytes of model RAM, then table entry 0's address.
    wr(&mut f, 0, TABLE - 4, 4, 0xaabb_ccdd);
    wr(&mut f, 0, TABLE, 4, 0xfee0_0000);
    f.model_mut().accesses.clear();
    assert_eq!(rd(&mut f, 0, TABLE - 4, 8), 0xfee0_0000_aabb_ccdd);
    assert_eq!(f.model().accesses, [(0, TABLE - 4, 4)]);
    // A read from the end of the table into model RAM.
    let end = TABLE + u64::from(VECTORS) * 16;
    f.model_mut().accesses.clear();
    assert_eq!(
        rd(&mut f, 0, end - 4, 8) & 0xffff_ffff,
        1,
        "last entry's control: masked"
    );
    assert_eq!(f.model().accesses, [(0, end, 4)]);
    // Absent BARs are refused.
    assert!(f.region_read(3, 0, &mut [0u8; 4]).is_err());
    assert!(f.region_read(6, 0, &mut [0u8; 4]).is_err());
    assert!(f.region_write(8, 0, &[0u8; 4]).is_err());
    // Model errors pass through.
    assert!(f.region_read(4, 0x2_0000, &mut [0u8; 4]).is_err());
}

#[test]
fn device_reset_keeps_fds_and_clears_state() {
    let mut f = function();
    let irq = f.interrupts().clone();
    let fd = assign_vector(&mut f, 1);
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    vfio_msix(&mut f, IrqAction::Mask, 1);
    assert_eq!(irq.trigger_msix(1), IrqOutcome::Pending);
    wr(&mut f, CFG, BAR0.into(), 4, 0xfebf_c000);
    f.reset().unwrap();
    assert_eq!(f.model().resets, 1);
    assert_eq!(cfg32(&mut f, BAR0), 0);
    assert_eq!(irq.msix_pending(1), Some(false));
    assert_eq!(
        rd(&mut f, 0, TABLE + 16 + 12, 4),
        1,
        "entries masked after reset"
    );
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    // The VFIO mask was cleared, the fd kept; the table is VMM-owned again.
    assert_eq!(irq.trigger_msix(1), IrqOutcome::Delivered);
    assert_eq!(count(&fd), 1);
}

#[test]
fn disconnect_drops_fds_and_reaches_the_model() {
    let mut f = function();
    let irq = f.interrupts().clone();
    let _fd = assign_vector(&mut f, 0);
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    f.disconnected();
    assert!(f.model().disconnected);
    assert_eq!(irq.msix_has_eventfd(0), Some(false));
    assert!(!irq.msix_enabled());
}

/// A disconnect clears COMMAND; the model must hear that bus mastering
/// stopped, or the next VMM's reset write (MASTER already 0) never tells it.
#[test]
fn disconnect_turns_bus_master_off_in_the_model() {
    let mut f = function();
    wr(
        &mut f,
        CFG,
        COMMAND.into(),
        2,
        (CMD_MEMORY_SPACE | CMD_BUS_MASTER).into(),
    );
    f.disconnected();
    assert_eq!(f.model().bus_master, [true, false]);
    assert_eq!(cfg16(&mut f, COMMAND), 0);
    // The next VMM's reset write finds MASTER clear: nothing more to say.
    wr(&mut f, CFG, COMMAND.into(), 2, 0);
    assert_eq!(f.model().bus_master, [true, false]);
    // Without bus mastering a disconnect says nothing.
    let mut g = function();
    g.disconnected();
    assert!(g.model().bus_master.is_empty());
}

#[test]
fn dma_notices_are_forwarded() {
    let mut f = function();
    f.dma_map(DmaMapping {
        iova: 0x1000,
        size: 0x2000,
        readable: true,
        writable: true,
        fd: None,
    })
    .unwrap();
    f.dma_unmap(0x1000, 0x2000).unwrap();
    f.dma_unmap_all().unwrap();
    assert_eq!(
        f.model().dma,
        ["map 0x1000+0x2000", "unmap 0x1000+0x2000", "unmap all"]
    );
}

/// QEMU 11.1's realize and reset, in order (see the client notes §1, §7).
#[test]
fn qemu_realize_sequence() {
    let mut f = function();
    let mut all = vec![0u8; 4096];
    f.region_read(CFG, 0, &mut all).unwrap();
    let rom = cfg32(&mut f, ROM_BAR);
    wr(&mut f, CFG, ROM_BAR.into(), 4, 0xffff_f800);
    assert_eq!(cfg32(&mut f, ROM_BAR), 0);
    wr(&mut f, CFG, ROM_BAR.into(), 4, rom.into());
    let types: Vec<u32> = [0u16, 1, 4]
        .iter()
        .map(|b| cfg32(&mut f, BAR0 + 4 * b) & 0xf)
        .collect();
    assert_eq!(types, [0, 0b1100, 0b0100]);
    assert_eq!(cfg16(&mut f, MSIX_CAP + 2) & 0x7ff, VECTORS - 1);
    // Pin 0: QEMU sets up no INTx eventfd.
    assert_eq!(rd(&mut f, CFG, INTERRUPT_PIN.into(), 1), 0);
    let (_err, dup) = efd();
    f.set_irqs(
        VFIO_PCI_ERR_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfds(vec![Some(dup)]),
    )
    .unwrap();
    // Reset: disable INTx, clear command, D0, DEVICE_RESET, (pin 0: no INTx
    // re-arm), zero BARs.
    f.set_irqs(
        VFIO_PCI_INTX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        0,
        IrqData::None,
    )
    .unwrap();
    let cmd = cfg16(&mut f, COMMAND);
    wr(&mut f, CFG, COMMAND.into(), 2, (cmd & !0x0407).into());
    f.reset().unwrap();
    assert_eq!(rd(&mut f, CFG, INTERRUPT_PIN.into(), 1), 0);
    for b in 0..6u16 {
        wr(&mut f, CFG, u64::from(BAR0 + 4 * b), 4, 0);
    }
    // MSI-X enable as QEMU does it: "enabled, no vectors", then one vector.
    enable_msix(&mut f, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    f.set_irqs(
        VFIO_PCI_INTX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        0,
        IrqData::None,
    )
    .unwrap();
    f.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfds(vec![None]),
    )
    .unwrap();
    enable_msix(&mut f, MSIX_CONTROL_ENABLE);
    let fd = assign_vector(&mut f, 0);
    assert_eq!(f.interrupts().trigger_msix(0), IrqOutcome::Delivered);
    assert_eq!(count(&fd), 1);
}

type Mutation = Box<dyn Fn(&mut FunctionLayout)>;
type Check = fn(&LayoutError) -> bool;

#[test]
fn invalid_layouts_are_refused() {
    let cases: Vec<(Mutation, Check)> = vec![
        (Box::new(|l| l.bars[0].size = 0x3000), |e| {
            matches!(e, LayoutError::BarSize { bar: 0, .. })
        }),
        (Box::new(|l| l.bars[0].size = 0x800), |e| {
            matches!(e, LayoutError::BarSize { .. })
        }),
        (Box::new(|l| l.bars[3].size = 0x1000), |e| {
            matches!(e, LayoutError::BarKindSize { bar: 3 })
        }),
        (
            Box::new(|l| {
                l.bars[2] = BarSpec {
                    kind: BarKind::Mem32,
                    size: 0x1000,
                }
            }),
            |e| matches!(e, LayoutError::Bar64Upper { bar: 1, next: 2 }),
        ),
        (Box::new(|l| l.msix_table = (0, 0x3f00)), |e| {
            matches!(e, LayoutError::MsixPlacement { what: "table", .. })
        }),
        (Box::new(|l| l.msix_pba = (3, 0)), |e| {
            matches!(e, LayoutError::MsixPlacement { what: "PBA", .. })
        }),
        (Box::new(|l| l.msix_pba = (0, 0x2004)), |e| {
            matches!(e, LayoutError::MsixPlacement { .. })
        }),
        (Box::new(|l| l.msix_pba = (0, 0x2400)), |e| {
            matches!(e, LayoutError::MsixOverlap)
        }),
    ];
    for (i, (mutate, check)) in cases.into_iter().enumerate() {
        let mut layout = test_layout();
        mutate(&mut layout);
        let r = PciFunction::try_new(RamModel::new(layout), Interrupts::new(VECTORS));
        let e = r.err().unwrap_or_else(|| panic!("case {i} accepted"));
        assert!(check(&e), "case {i}: {e}");
    }
    assert!(PciFunction::try_new(RamModel::new(test_layout()), Interrupts::new(VECTORS)).is_ok());
    let e = PciFunction::try_new(RamModel::new(test_layout()), Interrupts::new(4)).err();
    assert_eq!(
        e,
        Some(LayoutError::MsixHandleMismatch {
            handle: 4,
            layout: VECTORS
        })
    );
}

/// Whatever a VMM sends (region accesses at any index, offset and length;
/// SET_IRQS with any index, action, range and data; resets, disconnects and
/// model triggers in between) gets a value or a typed error, never a panic.
#[test]
fn arbitrary_vmm_requests_never_panic() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let offsets = [
        0,
        1,
        7,
        0xfff,
        0x1000,
        TABLE - 3,
        TABLE + 0x455,
        TABLE + 16 * u64::from(VECTORS) - 1,
        PBA - 1,
        PBA + 15,
        0x3ffc,
        0x4000,
        0xffff,
        0x1_0000,
        0x2_0000_0000 - 4,
        u64::from(u32::MAX),
        u64::MAX - 3,
        u64::MAX,
    ];
    let counts = [0, 1, 2, 3, 69, 70, 71, 4096, u32::MAX - 1, u32::MAX];
    let actions = [IrqAction::Trigger, IrqAction::Mask, IrqAction::Unmask];
    let mut f = function();
    let irq = f.interrupts().clone();
    // (ok, err) per kind: the mix must exercise both paths of each.
    let mut tally = [[0u32; 2]; 3];
    let mut note = |kind: usize, r: Result<(), DeviceError>| match r {
        Ok(()) => tally[kind][0] += 1,
        Err(e) => {
            assert_ne!(e.errno(), 0);
            tally[kind][1] += 1;
        }
    };
    for _ in 0..20_000 {
        let r = next();
        let index = (r % 11) as u32;
        let pick = |n: usize, shift: u32| ((r >> shift) as usize) % n;
        let offset = if r & (1 << 40) != 0 {
            offsets[pick(offsets.len(), 8)]
        } else {
            next() % 0x1_0000
        };
        let len = [0, 1, 2, 3, 4, 8, 16, 64, 4096][pick(9, 16)];
        match (r >> 32) % 8 {
            0..=2 => {
                let mut buf = vec![0u8; len];
                note(0, f.region_read(index, offset, &mut buf));
            }
            3 | 4 => {
                let buf = vec![0xffu8; len];
                note(1, f.region_write(index, offset, &buf));
            }
            5 | 6 => {
                let start = counts[pick(counts.len(), 20)];
                let count = counts[pick(counts.len(), 24)];
                let n = [0, 1, 2, 3, 70][pick(5, 28)];
                let data = match pick(3, 44) {
                    0 => IrqData::None,
                    1 => IrqData::Bool((0..n).map(|k| k % 2 == 0).collect()),
                    _ => IrqData::Eventfds((0..n).map(|_| None).collect()),
                };
                let action = actions[pick(3, 48)];
                note(2, f.set_irqs(index % 6, action, start, count, data));
            }
            _ => match pick(5, 50) {
                0 => {
                    let _ = f.reset();
                }
                1 => f.disconnected(),
                2 => {
                    irq.trigger_intx();
                }
                _ => {
                    irq.trigger_msix((next() % 80) as u16);
                }
            },
        }
    }
    for (kind, [ok, err]) in tally.iter().enumerate() {
        assert!(*ok > 50 && *err > 50, "kind {kind}: {ok} ok, {err} errors");
    }
}
