//! Tests that pin what `docs/device-spec.md` promises a driver, one test per
//! promise, named after it. Each drives the device as a driver written from
//! the spec alone would (registers through `bar_read`/`bar_write`, rings in
//! memfd-backed guest memory) and fails if the device changes behaviour.

use wdvirt_abi::{CompletionEntry, Opcode, RegError, idx};

use super::tests::{BUF, CQ, IDX, Rig, sqe};
use super::*;

const ENABLED: u32 = r::Q_STATUS_ENABLED;

/// A completion a previous run of the rings left behind: phase 1, as the
/// device's first pass writes it, so a driver polling from index 0 with phase
/// 1 takes it for new.
fn stale_cqe(tag: u32) -> [u8; 16] {
    CompletionEntry {
        tag,
        status: 0,
        flags: wdvirt_abi::CQE_PHASE,
        bytes: 7,
        result: 7,
    }
    .to_bytes()
}

fn plant_stale_completions(rig: &Rig, depth: u32) {
    for slot in 0..depth {
        rig.put(CQ + slot as u64 * 16, &stale_cqe(0xdead_0000 + slot));
    }
    // The device's half of the index block holds leftovers too.
    rig.put(IDX + idx::SQ_HEAD, &[0xaa; 8]);
}

fn assert_rings_clean(rig: &Rig, depth: u32, when: &str) {
    let cq = rig.get(CQ, depth as usize * 16);
    assert!(
        cq.iter().all(|&b| b == 0),
        "{when}: the completion ring still held old entries when ENABLED was visible"
    );
    assert_eq!(
        rig.get(IDX + idx::SQ_HEAD, 8),
        [0; 8],
        "{when}: sq_head/flags"
    );
}

/// Spec §2.2: the completion ring (and the device's half of the index block)
/// is clear before Q_STATUS shows ENABLED, so a driver that polls at once
/// never takes an old entry for new (issue 14, item 1).
#[test]
fn enable_clears_the_completion_ring_before_enabled_is_visible() {
    let depth = 8;
    let q = r::queue(0);
    let mut rig = Rig::new(WdConfig::default());
    assert_eq!(rig.setup_queue(0, depth), ENABLED);
    for cycle in 0..200 {
        if cycle % 2 == 0 {
            rig.w32(q + r::Q_CTRL, 0);
            plant_stale_completions(&rig, depth);
            rig.w32(q + r::Q_CTRL, r::Q_CTRL_ENABLE);
            assert_eq!(rig.r32(q + r::Q_STATUS), ENABLED);
        } else {
            // Q_CTRL.RESET, then program and enable again.
            rig.w32(q + r::Q_CTRL, r::Q_CTRL_RESET);
            plant_stale_completions(&rig, depth);
            assert_eq!(rig.setup_queue(0, depth), ENABLED);
        }
        assert_rings_clean(&rig, depth, &format!("cycle {cycle}"));
    }
    // The queue works after all that, and its first completion is the new one.
    rig.put(IDX, &[0; 8]);
    (rig.tail, rig.head) = (0, 0);
    rig.put(BUF, b"abc");
    rig.submit(&[sqe(Opcode::Crc32c, 42, BUF, 3, 0, 0)], depth);
    assert_eq!(rig.wait(1, depth)[0].tag, 42);
}

/// Enabled while Bus Master is clear: the clear happens when the bit is set,
/// before the config write that sets it completes.
#[test]
fn enable_with_bus_master_clear_clears_the_ring_when_it_is_set() {
    let depth = 8;
    let mut rig = Rig::new(WdConfig::default());
    for cycle in 0..50 {
        rig.dev.set_bus_master(false);
        rig.w32(r::queue(0) + r::Q_CTRL, r::Q_CTRL_RESET);
        plant_stale_completions(&rig, depth);
        assert_eq!(rig.setup_queue(0, depth), ENABLED);
        assert_eq!(
            rig.get(CQ, 16),
            stale_cqe(0xdead_0000),
            "no DMA while bus mastering is off"
        );
        rig.dev.set_bus_master(true);
        assert_rings_clean(&rig, depth, &format!("cycle {cycle}"));
    }
}

/// Spec §2: a refused read returns all-ones, BAR2 doorbell reads included,
/// and latches WriteOnly with the doorbell's offset (issue 14, item 2).
#[test]
fn a_doorbell_read_returns_all_ones_and_latches_write_only() {
    let mut rig = Rig::new(WdConfig::default());
    for (offset, len) in [(0u64, 4usize), (0x1000, 4), (0x1ffc, 4), (8, 8), (3, 1)] {
        rig.w32(r::ERR_STATUS, r::ERR_STATUS_LATCHED);
        let mut data = vec![0x5a; len];
        rig.dev.bar_read(2, offset, &mut data).unwrap();
        assert!(
            data.iter().all(|&b| b == 0xff),
            "BAR2+{offset:#x}: {data:?}"
        );
        assert_eq!(rig.r32(r::ERR_CODE), RegError::WriteOnly.code() as u32);
        assert_eq!(rig.r32(r::ERR_OFFSET), offset as u32);
    }
}
