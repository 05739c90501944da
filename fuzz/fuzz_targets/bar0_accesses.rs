//! Register accesses as a guest (or a VMM) could make them, straight into
//! the device stack: BAR0 (registers, MSI-X table, PBA), BAR2 (doorbells)
//! and config space through `PciFunction::region_read/region_write`, with
//! 64 KiB of guest RAM mapped so queues can really be enabled.
//!
//! Each access is 11 bytes: kind (target, width, read/write), offset (u16),
//! value (u64, with a shorthand for "an address in guest RAM"). After every
//! access, through the guest's own view:
//! * `ID` still reads the magic;
//! * `ERR_COUNT` never goes down unless a reset happened (the device's reset
//!   counter moved), it moves exactly as the operator's `register_errors`
//!   counter does (until it saturates), and a BAR2 read (write-only
//!   doorbells) always counts;
//! * `DEV_STATUS.ENABLED` mirrors `DEV_CTRL.ENABLE`, and no queue is enabled
//!   while the device is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wdvirt::vdev::device::VfioUserDevice;
use wdvirt::vdev::pci::PciFunction;
use wdvirt::vdev::wd::{WdConfig, WdDevice};
use wdvirt_abi::{pci, regs as r};
use wdvirt_fuzz::{Input, function, map_ram};

const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 0x1_0000;
const CONFIG: u32 = 7;
const WIDTHS: [usize; 8] = [1, 2, 4, 8, 4, 8, 3, 16];

fn read32(f: &mut PciFunction<WdDevice>, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    f.region_read(0, offset as u64, &mut b)
        .expect("a register read inside BAR0");
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let setup = input.u8();
    let queues = 1 + (setup & 7) as u32;
    let mut f = function(WdConfig {
        queues,
        max_depth: 64,
        ..WdConfig::default()
    });
    map_ram(&mut f, RAM, RAM_SIZE);
    if setup & 0x80 != 0 {
        // Memory decode and bus mastering on, as a VMM would.
        f.region_write(CONFIG, 4, &0x6u16.to_le_bytes()).unwrap();
    }
    // By `kind & 3`: BAR0 twice as often as BAR2 or config space.
    let regions = [0u32, 2, 0, CONFIG];
    let sizes = [pci::BAR0_SIZE, pci::bar2_size(queues), pci::BAR0_SIZE, 4096];

    while !input.is_empty() {
        let kind = input.u8();
        let offset = input.u16() as u64;
        let mut value = input.u64();
        if value >> 56 == 0xaa {
            // Shorthand: an aligned address inside (or at the edges of) RAM.
            value = RAM - 0x40 + (value & 0x1_ffc0) % (RAM_SIZE + 0x80);
        }
        let target = kind & 3;
        let len = WIDTHS[((kind >> 2) & 7) as usize];
        let write = kind & 0x20 != 0;
        let region = regions[target as usize];
        // Offsets mostly inside the region, some just past its end.
        let offset = offset % (sizes[target as usize] + 16);

        let before = read32(&mut f, r::ERR_COUNT);
        let (errors, resets) = {
            let s = f.model().stats().snapshot();
            (s.register_errors, s.resets)
        };
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&value.to_le_bytes());
        buf[8..].copy_from_slice(&value.rotate_left(32).to_le_bytes());
        let in_range = offset + len as u64 <= sizes[target as usize];
        let result = if write {
            f.region_write(region, offset, &buf[..len])
        } else {
            f.region_read(region, offset, &mut buf[..len])
        };
        // The transport refuses out-of-range accesses before the device runs;
        // the device must refuse them too, and accept every in-range BAR one.
        if !in_range {
            assert!(
                result.is_err(),
                "region {region} {offset:#x}+{len} accepted"
            );
        } else if region != CONFIG {
            result.expect("an in-range BAR access is never a protocol error");
        }

        assert_eq!(read32(&mut f, r::ID), r::ID_MAGIC);
        let after = read32(&mut f, r::ERR_COUNT);
        let snap = f.model().stats().snapshot();
        if snap.resets == resets {
            assert!(
                after >= before,
                "ERR_COUNT {before} -> {after} without a reset"
            );
            if after < u32::MAX {
                assert_eq!(
                    u64::from(after - before),
                    snap.register_errors - errors,
                    "ERR_COUNT and the register_errors counter disagree"
                );
            }
            if region == 2 && !write && in_range {
                assert!(
                    after > before || before == u32::MAX,
                    "a doorbell read was not counted"
                );
            }
        }
        let enabled = read32(&mut f, r::DEV_CTRL) & r::DEV_CTRL_ENABLE != 0;
        let status = read32(&mut f, r::DEV_STATUS) & r::DEV_STATUS_ENABLED != 0;
        assert_eq!(enabled, status);
        for q in 0..queues {
            let running = read32(&mut f, r::queue(q) + r::Q_CTRL) & r::Q_CTRL_ENABLE != 0;
            let st = read32(&mut f, r::queue(q) + r::Q_STATUS) & r::Q_STATUS_ENABLED != 0;
            assert_eq!(running, st, "queue {q}");
            assert!(!running || enabled, "queue {q} runs on a disabled device");
        }
    }
});
