//! `vdev::wd::regs::decode(offset, len, num_queues)`: never panics, and an
//! `Ok` names a register the access lies entirely inside, at an allowed
//! width and alignment, in a queue that exists, below the MSI-X table.
//! `merge`/`extract` on the result touch exactly the accessed bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wdvirt::vdev::wd::regs::{self, GLOBAL, QUEUE};
use wdvirt_abi::{pci, regs as r};
use wdvirt_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let raw_offset = input.u64();
    let len = input.u8() as usize;
    let nq_raw = input.u32();
    let current = input.u64();
    let written = input.u64();
    // Mostly offsets inside BAR0 so the table is explored; the high bit of
    // the first byte keeps raw 64-bit offsets in play.
    let offset = if raw_offset >> 63 == 0 {
        raw_offset % (pci::BAR0_SIZE + 16)
    } else {
        raw_offset
    };
    // Device instances have 1..=64 queues; other values must not panic.
    let bounded = nq_raw & 0x8000_0000 == 0;
    let nq = if bounded { nq_raw % 64 + 1 } else { nq_raw };

    let Ok(d) = regs::decode(offset, len, nq) else {
        return;
    };
    assert!(matches!(len, 1 | 2 | 4 | 8), "width {len}");
    assert_eq!(d.len as usize, len);
    assert_eq!(offset % len as u64, 0, "unaligned {offset:#x}/{len}");
    let (base, table) = match d.queue {
        None => (0u64, GLOBAL),
        Some(q) => {
            assert!(q < nq, "queue {q} of {nq}");
            (r::queue(q) as u64, QUEUE)
        }
    };
    assert!(
        // By value: `GLOBAL`/`QUEUE` are consts, so addresses may differ.
        table.contains(d.def),
        "{} from the wrong table",
        d.def.name
    );
    let start = base + d.def.offset as u64;
    assert_eq!(offset, start + d.shift_bytes as u64, "{}", d.def.name);
    assert!(
        d.shift_bytes as usize + len <= d.def.width as usize,
        "{} +{} len {len} spills out of the register",
        d.def.name,
        d.shift_bytes
    );
    if d.queue.is_none() {
        assert!(offset + (len as u64) <= r::QUEUE_BASE as u64);
    }
    if bounded {
        assert!(
            offset + len as u64 <= pci::MSIX_TABLE_OFFSET as u64,
            "{offset:#x} reaches the MSI-X table"
        );
    }
    // merge writes exactly the accessed bytes; extract reads them back.
    let bits = len as u32 * 8;
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let merged = d.merge(current, written);
    assert_eq!(d.extract(merged), written & mask);
    let shift = d.shift_bytes as u32 * 8;
    let keep = !(mask << shift) & width_mask(d.def.width);
    if (len as u8) < d.def.width {
        assert_eq!(merged & keep, current & keep, "merge touched other bytes");
    }
    assert_eq!(
        d.sets_reserved(written),
        d.extract(d.def.reserved) & written != 0
    );
});

fn width_mask(width: u8) -> u64 {
    if width >= 8 {
        u64::MAX
    } else {
        (1u64 << (width as u32 * 8)) - 1
    }
}
