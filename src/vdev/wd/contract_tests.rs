//! Tests that pin what `docs/device-spec.md` promises a driver, one test per
//! promise, named after it. Each drives the device as a driver written from
//! the spec alone would (registers through `bar_read`/`bar_write`, rings in
//! memfd-backed guest memory) and fails if the device changes behaviour.

use vm_memory::{Bytes, GuestAddress};
use wdvirt_abi::{CompletionEntry, JobStatus, Opcode, RegError, SubmissionEntry, idx};

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

const DEPTH: u32 = 16;
/// A second input area and an output area, inside the rig's RAM.
const SRC2: u64 = BUF + 0x8_0000;
const OUT: u64 = BUF + 0x10_0000;
/// Not inside the rig's DMA map.
const UNMAPPED: u64 = 0x4000_0000;
/// A stream context, inside the rig's RAM.
const CTX: u64 = OUT + 0x8_0000;

fn rig() -> Rig {
    let mut rig = Rig::new(WdConfig::default());
    assert_eq!(rig.setup_queue(0, DEPTH), ENABLED);
    rig
}

/// Reset queue 0 and program it again with `ops` (the rig's rings, fresh indexes).
fn program(rig: &mut Rig, ops: u32) {
    let b = r::queue(0);
    rig.w32(b + r::Q_CTRL, r::Q_CTRL_RESET);
    rig.put(IDX, &[0; 64]);
    (rig.tail, rig.head) = (0, 0);
    rig.w64(b + r::Q_SQ_BASE, super::tests::SQ);
    rig.w64(b + r::Q_CQ_BASE, CQ);
    rig.w64(b + r::Q_IDX_BASE, IDX);
    rig.w32(b + r::Q_DEPTH, DEPTH);
    rig.w32(b + r::Q_OPS, ops);
    rig.w32(b + r::Q_CTRL, r::Q_CTRL_ENABLE);
    assert_eq!(rig.r32(b + r::Q_STATUS), ENABLED);
}

fn run1(rig: &mut Rig, e: SubmissionEntry) -> CompletionEntry {
    rig.submit(&[e], DEPTH);
    rig.wait(1, DEPTH)[0]
}

fn status(c: &CompletionEntry) -> Option<JobStatus> {
    JobStatus::from_code(c.status)
}

fn with(e: SubmissionEntry, f: impl FnOnce(&mut SubmissionEntry)) -> SubmissionEntry {
    let mut e = e;
    f(&mut e);
    e
}

fn corpus(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"the quick brown fox jumps over "[i % 31] ^ (i / 997) as u8)
        .collect()
}

fn zlib_like(format: wdvirt_abi::Format, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let lvl = flate2::Compression::new(6);
    match format {
        wdvirt_abi::Format::Deflate => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), lvl);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        wdvirt_abi::Format::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), lvl);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        wdvirt_abi::Format::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), lvl);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

/// Spec §2.2, Q_OPS (item 3): bits above the last opcode are reserved
/// (`ReservedBits`); an opcode bit outside CAP_OPS is `OpNotAllowed`. Either
/// way the register keeps its value.
#[test]
fn q_ops_bits_above_the_opcodes_are_reserved_and_others_must_be_in_cap_ops() {
    let mut rig = Rig::new(WdConfig {
        ops: wdvirt_abi::ALL_OPS & !Opcode::Sha256.bit(),
        ..WdConfig::default()
    });
    let q_ops = r::queue(0) + r::Q_OPS;
    rig.w32(q_ops, Opcode::Copy.bit());
    let first_reserved = Opcode::ALL.len() as u32;
    for (value, want) in [
        (1u32 << 31, RegError::ReservedBits),
        (1 << first_reserved, RegError::ReservedBits),
        (Opcode::Copy.bit() | 1 << 31, RegError::ReservedBits),
        (Opcode::Sha256.bit(), RegError::OpNotAllowed),
    ] {
        rig.w32(r::ERR_STATUS, 1);
        rig.w32(q_ops, value);
        assert_eq!(rig.r32(r::ERR_CODE), want.code() as u32, "{value:#x}");
        assert_eq!(rig.r32(r::ERR_OFFSET), q_ops);
        assert_eq!(rig.r32(q_ops), Opcode::Copy.bit(), "kept its value");
    }
}

/// Spec §2.2 (item 4): a bad depth or a misaligned base is refused at the
/// write (the register keeps its old value), not at enable.
#[test]
fn bad_depth_and_misaligned_bases_are_refused_at_the_write() {
    let mut rig = Rig::new(WdConfig {
        max_depth: 64,
        ..WdConfig::default()
    });
    let b = r::queue(0);
    rig.w32(r::DEV_CTRL, r::DEV_CTRL_ENABLE);
    rig.w64(b + r::Q_SQ_BASE, super::tests::SQ);
    rig.w64(b + r::Q_CQ_BASE, CQ);
    rig.w64(b + r::Q_IDX_BASE, IDX);
    rig.w32(b + r::Q_DEPTH, 8);
    rig.w32(b + r::Q_MSIX_VECTOR, 0);
    let cases = [
        (b + r::Q_DEPTH, 3u32, RegError::BadDepth, 8u32),
        (b + r::Q_DEPTH, 1, RegError::BadDepth, 8),
        (b + r::Q_DEPTH, 128, RegError::BadDepth, 8),
        (b + r::Q_DEPTH, 0, RegError::BadDepth, 8),
        (
            b + r::Q_SQ_BASE,
            super::tests::SQ as u32 + 32,
            RegError::Misaligned,
            super::tests::SQ as u32,
        ),
        (
            b + r::Q_CQ_BASE,
            CQ as u32 + 8,
            RegError::Misaligned,
            CQ as u32,
        ),
        (
            b + r::Q_IDX_BASE,
            IDX as u32 + 4,
            RegError::Misaligned,
            IDX as u32,
        ),
        // Past the function's vectors (one per queue and one for errors);
        // NO_VECTOR itself is a good value.
        (b + r::Q_MSIX_VECTOR, 0x1000, RegError::BadVector, 0),
        (
            b + r::Q_MSIX_VECTOR,
            r::NO_VECTOR - 1,
            RegError::BadVector,
            0,
        ),
    ];
    for (off, value, want, kept) in cases {
        rig.w32(r::ERR_STATUS, 1);
        rig.w32(off, value);
        assert_eq!(
            (rig.r32(r::ERR_CODE), rig.r32(r::ERR_OFFSET)),
            (want.code() as u32, off),
            "write of {value:#x} at {off:#x}"
        );
        assert_eq!(rig.r32(off), kept);
    }
    // The refusals left the good values: the enable succeeds.
    rig.w32(r::ERR_STATUS, 1);
    rig.w32(b + r::Q_CTRL, r::Q_CTRL_ENABLE);
    assert_eq!(rig.r32(b + r::Q_STATUS), ENABLED);
    assert_eq!(rig.r32(r::ERR_STATUS), 0);
}

/// Spec §2.2 (item 5): Q_STATUS.ERROR and its code stay until a good enable,
/// Q_CTRL.RESET or a device reset; clearing ENABLE or ERR_STATUS does not
/// clear them.
#[test]
fn q_status_error_clears_only_on_a_good_enable_or_a_reset() {
    let mut rig = Rig::new(WdConfig::default());
    let b = r::queue(0);
    let failed = r::Q_STATUS_ERROR | (RegError::DeviceDisabled.code() as u32) << 8;
    let fail = |rig: &mut Rig| {
        rig.w32(r::DEV_CTRL, 0);
        rig.w32(b + r::Q_CTRL, r::Q_CTRL_ENABLE);
        assert_eq!(rig.r32(b + r::Q_STATUS), failed);
    };
    fail(&mut rig);
    rig.w32(b + r::Q_CTRL, 0);
    rig.w32(r::ERR_STATUS, 1);
    assert_eq!(
        rig.r32(b + r::Q_STATUS),
        failed,
        "kept by Q_CTRL=0 and ERR_STATUS"
    );
    // A good enable clears it.
    assert_eq!(rig.setup_queue(0, DEPTH), ENABLED);
    rig.w32(b + r::Q_CTRL, 0);
    fail(&mut rig);
    rig.w32(b + r::Q_CTRL, r::Q_CTRL_RESET);
    assert_eq!(rig.r32(b + r::Q_STATUS), 0, "Q_CTRL.RESET clears it");
    fail(&mut rig);
    rig.w32(r::DEV_CTRL, r::DEV_CTRL_RESET);
    assert_eq!(rig.r32(b + r::Q_STATUS), 0, "DEV_CTRL.RESET clears it");
}

/// Spec §2.1 (item 6): DEV_CTRL resets to 0; clearing ENABLE stops every
/// queue (configuration kept, no error), and queues stay stopped when the
/// device is enabled again until each is enabled.
#[test]
fn dev_ctrl_resets_to_zero_and_clearing_enable_stops_every_queue() {
    let mut rig = Rig::new(WdConfig {
        queues: 2,
        ..WdConfig::default()
    });
    assert_eq!((rig.r32(r::DEV_CTRL), rig.r32(r::DEV_STATUS)), (0, 0));
    assert_eq!(rig.setup_queue(0, DEPTH), ENABLED);
    // Queue 1 on rings of its own.
    let b1 = r::queue(1);
    rig.w64(b1 + r::Q_SQ_BASE, SRC2);
    rig.w64(b1 + r::Q_CQ_BASE, SRC2 + 0x4000);
    rig.w64(b1 + r::Q_IDX_BASE, SRC2 + 0x8000);
    rig.w32(b1 + r::Q_DEPTH, 4);
    rig.w32(b1 + r::Q_CTRL, r::Q_CTRL_ENABLE);
    assert_eq!(rig.r32(b1 + r::Q_STATUS), ENABLED);
    rig.w32(r::DEV_CTRL, 0);
    for q in 0..2 {
        assert_eq!(rig.r32(r::queue(q) + r::Q_STATUS), 0, "queue {q} stopped");
        assert_eq!(rig.r32(r::queue(q) + r::Q_CTRL), 0);
    }
    assert_eq!(rig.r32(b1 + r::Q_DEPTH), 4, "configuration kept");
    assert_eq!(rig.r32(r::ERR_COUNT), 0, "not an error");
    rig.w32(r::DEV_CTRL, r::DEV_CTRL_ENABLE);
    assert_eq!(
        rig.r32(b1 + r::Q_STATUS),
        0,
        "not re-enabled by the device enable"
    );
    rig.w32(b1 + r::Q_CTRL, r::Q_CTRL_ENABLE);
    assert_eq!(rig.r32(b1 + r::Q_STATUS), ENABLED);
    // RESET wins over ENABLE written with it.
    rig.w32(r::DEV_CTRL, r::DEV_CTRL_ENABLE | r::DEV_CTRL_RESET);
    assert_eq!((rig.r32(r::DEV_CTRL), rig.r32(r::DEV_STATUS)), (0, 0));
    assert_eq!(rig.r32(b1 + r::Q_DEPTH), 0, "and restores reset values");
}

/// Spec §4 (item 7): preconditions with their statuses.
#[test]
fn operation_preconditions_complete_with_their_statuses() {
    let mut rig = rig();
    rig.put(BUF, &corpus(4096));
    let cases = [
        (
            sqe(Opcode::Copy, 1, BUF, 100, OUT, 99),
            JobStatus::DstTooSmall,
        ),
        (
            sqe(Opcode::Sha256, 2, BUF, 100, OUT, 31),
            JobStatus::DstTooSmall,
        ),
        (
            with(sqe(Opcode::Sha256, 3, BUF, 100, OUT, 127), |e| {
                e.param = wdvirt_abi::SHA256_MORE
            }),
            JobStatus::DstTooSmall,
        ),
        (
            sqe(Opcode::Compare, 4, BUF, 100, SRC2, 99),
            JobStatus::BadLength,
        ),
        (sqe(Opcode::Fill, 5, 0, 0, OUT, 0), JobStatus::BadLength),
        // 4 KiB of text does not deflate into 16 bytes. (Decompression's
        // DstTooSmall: `every_status_comes_from_the_operations_the_spec_lists`.)
        (
            sqe(Opcode::DeflateCompress, 10, BUF, 4096, OUT, 16),
            JobStatus::DstTooSmall,
        ),
        (
            with(sqe(Opcode::Copy, 9, BUF, 100, OUT, 100), |e| e.ctx = CTX),
            JobStatus::ReservedNonZero,
        ),
        (sqe(Opcode::Copy, 6, BUF, 100, OUT, 100), JobStatus::Ok),
        (sqe(Opcode::Crc32c, 7, BUF, 0, 0, 0), JobStatus::Ok),
        (sqe(Opcode::Sha256, 8, BUF, 0, OUT, 32), JobStatus::Ok),
    ];
    for (e, want) in cases {
        assert_eq!(status(&run1(&mut rig, e)), Some(want), "{e:?}");
    }
}

/// Spec §4 (items 8 and 17): fields an operation does not use are ignored,
/// whatever they hold: a nop with huge unused lengths completes Ok at once,
/// a CRC32C's dst may point at 1 TiB, a fill's src anywhere.
#[test]
fn fields_an_operation_does_not_use_are_ignored() {
    let mut rig = rig();
    rig.put(BUF, b"123456789");
    let huge = u32::MAX;
    let cases = [
        sqe(Opcode::Nop, 1, u64::MAX, huge, u64::MAX, huge),
        sqe(Opcode::Crc32c, 2, BUF, 9, 1 << 40, huge),
        sqe(Opcode::Fill, 3, 1 << 40, huge, OUT, 64),
    ];
    for e in cases {
        let c = run1(&mut rig, e);
        assert_eq!(status(&c), Some(JobStatus::Ok), "{e:?}");
    }
    assert_eq!(run1(&mut rig, cases[1]).result, 0xe306_9283);
}

/// Spec §4, "which status wins" (item 9): checks run in a fixed order and the
/// first fault decides. Each case has two faults; the earlier one is reported.
#[test]
fn the_first_fault_in_check_order_decides_the_status() {
    let mut rig = rig();
    program(&mut rig, wdvirt_abi::ALL_OPS & !Opcode::Sha256.bit());
    rig.put(BUF, &corpus(4096));
    let over = (1 << 20) + 1;
    let cases = [
        (
            with(sqe(Opcode::Copy, 1, BUF, 16, OUT, 16), |e| {
                e.opcode = 99;
                e.flags = 1
            }),
            JobStatus::BadOpcode,
        ),
        (
            with(sqe(Opcode::Sha256, 2, BUF, 16, OUT, 32), |e| {
                e.reserved0 = 1
            }),
            JobStatus::ReservedNonZero,
        ),
        (
            with(sqe(Opcode::Sha256, 3, BUF, 16, OUT, 32), |e| e.param = 4),
            JobStatus::OpNotAllowed,
        ),
        (
            with(sqe(Opcode::Copy, 4, BUF, over, OUT, 16), |e| e.param = 1),
            JobStatus::ReservedNonZero,
        ),
        (
            sqe(Opcode::Compare, 5, UNMAPPED, 16, OUT, 8),
            JobStatus::BadLength,
        ),
        (
            sqe(Opcode::Copy, 6, UNMAPPED, 16, OUT, over),
            JobStatus::BadLength,
        ),
        (
            sqe(Opcode::Copy, 7, UNMAPPED, 16, CQ, 16),
            JobStatus::BadAddress,
        ),
        (
            sqe(Opcode::Copy, 8, CQ, 16, UNMAPPED, 16),
            JobStatus::OverlapsRing,
        ),
        (
            sqe(Opcode::Copy, 9, BUF, 16, UNMAPPED, 8),
            JobStatus::BadAddress,
        ),
        // A stream's context comes after src and dst.
        (
            with(sqe(Opcode::StreamCompress, 10, BUF, 16, OUT, over), |e| {
                (e.ctx, e.param) = (UNMAPPED, wdvirt_abi::stream::START)
            }),
            JobStatus::BadLength,
        ),
        (
            with(sqe(Opcode::StreamCompress, 11, BUF, 16, CQ, 64), |e| {
                (e.ctx, e.param) = (UNMAPPED, wdvirt_abi::stream::START)
            }),
            JobStatus::OverlapsRing,
        ),
        (
            with(sqe(Opcode::StreamCompress, 12, BUF, 16, OUT, 64), |e| {
                (e.ctx, e.param) = (u64::MAX - 8, wdvirt_abi::stream::START)
            }),
            JobStatus::BadLength,
        ),
        (
            with(sqe(Opcode::StreamCompress, 13, BUF, 16, OUT, 64), |e| {
                (e.ctx, e.param) = (CQ, wdvirt_abi::stream::START)
            }),
            JobStatus::OverlapsRing,
        ),
    ];
    for (e, want) in cases {
        assert_eq!(status(&run1(&mut rig, e)), Some(want), "tag {}", e.tag);
    }
}

/// Spec §4 (item 10), through the device: a RESUME from a buffer that holds
/// no state, and a job without RESUME over a state, complete CorruptInput.
#[test]
fn a_forgotten_sha256_flag_completes_corrupt_input() {
    use wdvirt_abi::{SHA256_MORE, SHA256_RESUME};
    let mut rig = rig();
    rig.put(BUF, &corpus(1000));
    rig.put(OUT, &[0; 128]);
    let part = |tag, param| {
        with(sqe(Opcode::Sha256, tag, BUF, 1000, OUT, 128), |e| {
            e.param = param
        })
    };
    let c = run1(&mut rig, part(1, SHA256_RESUME));
    assert_eq!(status(&c), Some(JobStatus::CorruptInput), "all-zero state");
    assert_eq!(
        status(&run1(&mut rig, part(2, SHA256_MORE))),
        Some(JobStatus::Ok)
    );
    for forgot in [0, SHA256_MORE] {
        let c = run1(&mut rig, part(3, forgot));
        assert_eq!(status(&c), Some(JobStatus::CorruptInput), "param {forgot}");
    }
    assert_eq!(
        status(&run1(&mut rig, part(4, SHA256_RESUME))),
        Some(JobStatus::Ok)
    );
    use sha2::Digest;
    let whole = [corpus(1000), corpus(1000)].concat();
    assert_eq!(rig.get(OUT, 32), sha2::Sha256::digest(&whole).to_vec());
}

/// Spec §3.3 and §4 (item 11): what `bytes` and `result` hold per
/// operation, each row of the table "What a completion holds".
#[test]
fn bytes_and_result_hold_what_each_operation_did() {
    use wdvirt_abi::Format;
    let mut rig = rig();
    let data = corpus(5000);
    rig.put(BUF, &data);
    for f in Format::ALL {
        let c = run1(&mut rig, sqe(f.compress_op(), 1, BUF, 5000, OUT, 8192));
        assert_eq!(status(&c), Some(JobStatus::Ok));
        let packed = rig.get(OUT, c.bytes as usize);
        assert_eq!(packed, {
            // The stream is exactly `bytes` long: a decoder of those bytes
            // gets the data back (flate2 as the independent judge).
            let mut out = Vec::new();
            use std::io::Read;
            match f {
                Format::Deflate => {
                    flate2::read::DeflateDecoder::new(&packed[..]).read_to_end(&mut out)
                }
                Format::Zlib => flate2::read::ZlibDecoder::new(&packed[..]).read_to_end(&mut out),
                Format::Gzip => flate2::read::GzDecoder::new(&packed[..]).read_to_end(&mut out),
            }
            .unwrap();
            assert_eq!(out, data);
            packed.clone()
        });
        let stream = zlib_like(f, &data);
        rig.put(SRC2, &stream);
        let c = run1(
            &mut rig,
            sqe(f.decompress_op(), 2, SRC2, stream.len() as u32, OUT, 8192),
        );
        assert_eq!(
            (status(&c), c.bytes, c.result),
            (Some(JobStatus::Ok), 5000, 0)
        );
    }
    // A second buffer that differs from the first at offset 1234 only.
    let mut other = data.clone();
    other[1234] ^= 0x5a;
    rig.put(SRC2, &other);
    let crc = crate::accel::ops::crc32c(&data);
    // (job, bytes, result), as the table in docs/device-spec.md §4 gives
    // them.
    let expect = [
        (sqe(Opcode::Nop, 3, 0, 0, 0, 0), 0, 0),
        (sqe(Opcode::Crc32c, 4, BUF, 5000, 0, 0), 0, crc),
        (sqe(Opcode::Sha256, 5, BUF, 5000, OUT, 64), 32, 0),
        (
            with(sqe(Opcode::Sha256, 6, BUF, 5000, OUT + 4096, 128), |e| {
                e.param = wdvirt_abi::SHA256_MORE
            }),
            128,
            0,
        ),
        (sqe(Opcode::Copy, 7, BUF, 3000, OUT, 5000), 3000, 0),
        (sqe(Opcode::Fill, 8, 0, 0, OUT, 777), 777, 0),
        (sqe(Opcode::Compare, 9, BUF, 5000, BUF, 5000), 0, 0),
        (sqe(Opcode::Compare, 11, BUF, 5000, SRC2, 5000), 0, 1235),
        // A job that fails: both 0.
        (sqe(Opcode::Copy, 10, BUF, 3000, OUT, 10), 0, 0),
    ];
    for (e, bytes, result) in expect {
        let c = run1(&mut rig, e);
        assert_eq!(
            (c.bytes, c.result),
            (bytes, result),
            "{:?}",
            Opcode::from_u8(e.opcode)
        );
    }
    // A stream in one piece each way: compress consumes all of src
    // (`result` = src_len) and writes a whole stream (`bytes` long);
    // decompress gives back the data and says how much of src it read.
    use wdvirt_abi::stream::{FLUSH_FINISH, FLUSH_SHIFT, START};
    let c = run1(
        &mut rig,
        with(sqe(Opcode::StreamCompress, 12, BUF, 5000, OUT, 8192), |e| {
            (e.ctx, e.param) = (
                CTX,
                START | FLUSH_FINISH << FLUSH_SHIFT | Format::Deflate.code(),
            )
        }),
    );
    assert_eq!((status(&c), c.result), (Some(JobStatus::Ok), 5000));
    let packed = rig.get(OUT, c.bytes as usize);
    let mut out = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::DeflateDecoder::new(&packed[..]),
        &mut out,
    )
    .unwrap();
    assert_eq!(out, data, "a whole deflate stream of exactly `bytes`");
    rig.put(SRC2, &packed);
    let c = run1(
        &mut rig,
        with(
            sqe(
                Opcode::StreamDecompress,
                13,
                SRC2,
                packed.len() as u32,
                OUT,
                8192,
            ),
            |e| (e.ctx, e.param) = (CTX, START | Format::Deflate.code()),
        ),
    );
    assert_eq!(
        (status(&c), c.bytes, c.result),
        (Some(JobStatus::Ok), 5000, packed.len() as u32)
    );
    assert_eq!(rig.get(OUT, 5000), data);
}

/// Spec §4 (item 12): copy with overlapping src and dst behaves as memmove.
#[test]
fn copy_with_overlapping_buffers_is_memmove() {
    let mut rig = rig();
    let data = corpus(1000);
    for (src, dst) in [(BUF, BUF + 10), (BUF + 10, BUF), (BUF, BUF)] {
        rig.put(BUF, &[0; 1100]);
        rig.put(src, &data);
        let c = run1(&mut rig, sqe(Opcode::Copy, 1, src, 1000, dst, 1000));
        assert_eq!(status(&c), Some(JobStatus::Ok));
        assert_eq!(rig.get(dst, 1000), data, "src {src:#x} dst {dst:#x}");
    }
}

/// Spec §4 (item 13): a job that fails leaves dst unchanged, whether a check
/// or the engine failed it.
#[test]
fn a_failed_job_leaves_dst_unchanged() {
    use wdvirt_abi::Format;
    let mut rig = rig();
    rig.put(BUF, &corpus(4096));
    rig.put(SRC2, &[0xff; 64]);
    let cases = [
        (
            sqe(Format::Zlib.compress_op(), 1, BUF, 4096, OUT, 64),
            JobStatus::DstTooSmall,
        ),
        (
            sqe(Format::Gzip.decompress_op(), 2, SRC2, 64, OUT, 4096),
            JobStatus::CorruptInput,
        ),
        (
            sqe(Opcode::Copy, 3, BUF, 4096, OUT, 4000),
            JobStatus::DstTooSmall,
        ),
        (
            with(sqe(Opcode::Sha256, 4, BUF, 4096, OUT, 128), |e| {
                e.param = wdvirt_abi::SHA256_RESUME
            }),
            JobStatus::CorruptInput,
        ),
        (
            sqe(Opcode::Copy, 5, UNMAPPED, 16, OUT, 4096),
            JobStatus::BadAddress,
        ),
    ];
    for (e, want) in cases {
        rig.put(OUT, &[0x77; 4096]);
        assert_eq!(status(&run1(&mut rig, e)), Some(want));
        assert_eq!(rig.get(OUT, 4096), vec![0x77; 4096], "tag {}", e.tag);
    }
}

/// Spec §3.1 (item 15): a completion's body is written before its phase
/// word, so a driver that sees the new phase (then an acquire fence) reads
/// the new body. A poller spins on slot 0 of a two-slot ring while the device
/// writes it; each slot-0 job is submitted only once the poller is watching.
#[test]
fn the_phase_word_is_written_after_the_body() {
    use std::sync::atomic::{AtomicBool, AtomicU32, fence};
    const JOBS: u32 = 400;
    let mut rig = Rig::new(WdConfig::default());
    assert_eq!(rig.setup_queue(0, 2), ENABLED);
    rig.put(BUF, b"abc");
    let space = rig.space.clone();
    let (acked, quit) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (poller_acked, poller_quit) = (acked.clone(), quit.clone());
    let poller = std::thread::spawn(move || {
        for lap in 0..JOBS / 2 {
            let want_phase = if lap % 2 == 0 { 1u16 } else { 0 };
            loop {
                if poller_quit.load(Ordering::Relaxed) {
                    return;
                }
                let mem = space.memory();
                let flags: u16 = mem.load(GuestAddress(CQ + 6), Ordering::Acquire).unwrap();
                if flags & 1 == want_phase {
                    fence(Ordering::Acquire);
                    let tag: u32 = mem.load(GuestAddress(CQ), Ordering::Relaxed).unwrap();
                    assert_eq!(tag, 2 * lap, "the new phase was visible before the body");
                    break;
                }
                std::hint::spin_loop();
            }
            poller_acked.store(lap + 1, Ordering::Release);
        }
    });
    for job in 0..JOBS {
        if job % 2 == 0 {
            // Slot 0 is next: wait until the poller checked the previous one.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while acked.load(Ordering::Acquire) < job / 2 {
                assert!(std::time::Instant::now() < deadline, "the poller stalled");
                std::thread::yield_now();
            }
        }
        rig.submit(&[sqe(Opcode::Crc32c, job, BUF, 3, 0, 0)], 2);
        assert_eq!(rig.wait(1, 2)[0].tag, job);
    }
    quit.store(true, Ordering::Relaxed);
    poller.join().expect("the poller saw a torn completion");
    assert_eq!(acked.load(Ordering::Acquire), JOBS / 2);
}

/// Spec §2 (item 16): a write of any width anywhere in queue q's doorbell
/// page rings queue q; a page with no queue is ignored. Neither is an error.
#[test]
fn any_write_in_a_doorbell_page_rings_its_queue_silently() {
    let mut rig = Rig::new(WdConfig {
        queues: 2,
        ..WdConfig::default()
    });
    assert_eq!(rig.setup_queue(0, DEPTH), ENABLED);
    let doorbells = |rig: &Rig| rig.dev.queue_stats()[0].stats.snapshot().doorbells;
    let before = doorbells(&rig);
    for (offset, len) in [
        (0u64, 4usize),
        (4, 4),
        (0xffc, 4),
        (0x800, 8),
        (7, 1),
        (0x10, 2),
    ] {
        rig.dev.bar_write(2, offset, &vec![0xab; len]).unwrap();
    }
    assert_eq!(doorbells(&rig) - before, 6);
    // Queue 1 exists but is not enabled; page 3 names no queue.
    rig.dev.bar_write(2, 0x1000, &[0; 4]).unwrap();
    rig.dev.bar_write(2, 0x3000, &[0; 4]).unwrap();
    assert_eq!(rig.dev.stats().snapshot().stray_doorbells, 2);
    assert_eq!(rig.r32(r::ERR_COUNT), 0);
    assert_eq!(rig.r32(r::ERR_STATUS), 0);
}

/// Spec §2.2, Q_CAP_OPS (ABI 1.1, issue 13): each queue advertises the
/// opcodes it may be given; by default the device's CAP_OPS, narrower where
/// the instance's configuration says so; Q_OPS must be a subset of it.
#[test]
fn q_cap_ops_advertises_and_bounds_each_queues_operations() {
    let mut queue_ops = [None; MAX_QUEUES];
    queue_ops[1] = Some(Opcode::Copy.bit() | Opcode::Crc32c.bit());
    queue_ops[2] = Some(Opcode::Sha256.bit() | Opcode::Fill.bit());
    let cfg = WdConfig {
        queues: 3,
        ops: wdvirt_abi::ALL_OPS & !Opcode::Fill.bit(),
        queue_ops,
        ..WdConfig::default()
    };
    let mut rig = Rig::new(cfg);
    assert_eq!(rig.r32(r::VERSION), 1 << 16 | 1, "ABI 1.1");
    let cap = rig.r32(r::CAP_OPS);
    let caps: Vec<u32> = (0..3)
        .map(|q| rig.r32(r::queue(q) + r::Q_CAP_OPS))
        .collect();
    assert_eq!(
        caps,
        [
            cap,
            Opcode::Copy.bit() | Opcode::Crc32c.bit(),
            Opcode::Sha256.bit()
        ],
        "default CAP_OPS; a queue's own mask, narrowed to CAP_OPS"
    );
    // Read-only.
    rig.w32(r::queue(1) + r::Q_CAP_OPS, cap);
    assert_eq!(rig.r32(r::ERR_CODE), RegError::ReadOnly.code() as u32);
    assert_eq!(rig.r32(r::queue(1) + r::Q_CAP_OPS), caps[1]);
    // Q_OPS within Q_CAP_OPS only.
    rig.w32(r::ERR_STATUS, 1);
    rig.w32(r::queue(1) + r::Q_OPS, Opcode::Sha256.bit());
    assert_eq!(rig.r32(r::ERR_CODE), RegError::OpNotAllowed.code() as u32);
    rig.w32(r::ERR_STATUS, 1);
    rig.w32(r::queue(1) + r::Q_OPS, Opcode::Copy.bit());
    rig.w32(r::queue(0) + r::Q_OPS, Opcode::Sha256.bit());
    assert_eq!(rig.r32(r::ERR_STATUS), 0);
    // It survives resets (it is configuration, not state).
    rig.w32(r::DEV_CTRL, r::DEV_CTRL_RESET);
    assert_eq!(rig.r32(r::queue(1) + r::Q_CAP_OPS), caps[1]);
    // A mask for a queue the instance does not have is a configuration error.
    let mut queue_ops = [None; MAX_QUEUES];
    queue_ops[4] = Some(1);
    let accel = crate::accel::soft::SoftAccel::new(1);
    let bad = WdDevice::new(
        WdConfig {
            queues: 4,
            queue_ops,
            ..WdConfig::default()
        },
        accel,
        9,
        rig.irq.clone(),
    );
    assert!(matches!(bad, Err(DeviceError::Invalid(m)) if m.contains("queue 4")));
}

/// A descriptor for `op` that completes with `want`, with what the rig must
/// do around it; `None` when no descriptor of `op` can.
fn provoke(rig: &mut Rig, op: Opcode, want: JobStatus) -> Option<SubmissionEntry> {
    use wdvirt_abi::{Format, SHA256_RESUME};
    let n = 4096u32;
    let data = corpus(n as usize);
    rig.put(BUF, &data);
    // A valid job of `op`, its "main" buffer being the one faults go into.
    let base = match Format::of(op) {
        Some((_, true)) => sqe(op, 1, BUF, n, OUT, 8192),
        Some((f, false)) => {
            let stream = zlib_like(f, &data);
            rig.put(SRC2, &stream);
            sqe(op, 1, SRC2, stream.len() as u32, OUT, 8192)
        }
        None => match op {
            Opcode::Nop => sqe(op, 1, 0, 0, 0, 0),
            Opcode::Crc32c => sqe(op, 1, BUF, n, 0, 0),
            Opcode::Sha256 => sqe(op, 1, BUF, n, OUT, 32),
            Opcode::Copy => sqe(op, 1, BUF, n, OUT, n),
            Opcode::Fill => sqe(op, 1, 0, 0, OUT, n),
            Opcode::Compare => sqe(op, 1, BUF, n, BUF, n),
            Opcode::StreamCompress => with(sqe(op, 1, BUF, n, OUT, 8192), |e| {
                (e.ctx, e.param) = (CTX, wdvirt_abi::stream::START)
            }),
            Opcode::StreamDecompress => {
                let stream = zlib_like(Format::Deflate, &data);
                rig.put(SRC2, &stream);
                with(sqe(op, 1, SRC2, stream.len() as u32, OUT, 8192), |e| {
                    (e.ctx, e.param) = (CTX, wdvirt_abi::stream::START)
                })
            }
            _ => unreachable!("compression opcodes have a format"),
        },
    };
    let uses_src = op.reads_src();
    let fault = |e: &mut SubmissionEntry, addr: u64, len: u32| {
        if uses_src {
            (e.src, e.src_len) = (addr, len);
            if op == Opcode::Compare {
                e.dst_len = len;
            }
        } else {
            (e.dst, e.dst_len) = (addr, len);
        }
    };
    let max = 1 << 20;
    let e = match want {
        JobStatus::Ok | JobStatus::OpNotAllowed | JobStatus::Aborted => base,
        JobStatus::ReservedNonZero => with(base, |e| e.reserved[1] = 1),
        JobStatus::BadOpcode => with(base, |e| e.opcode = 0xee),
        JobStatus::BadAddress if op != Opcode::Nop => with(base, |e| fault(e, UNMAPPED, 64)),
        JobStatus::BadLength if op != Opcode::Nop => with(base, |e| fault(e, BUF, max + 1)),
        JobStatus::OverlapsRing if op != Opcode::Nop => with(base, |e| fault(e, CQ, 64)),
        JobStatus::DstTooSmall => match op {
            Opcode::Copy => with(base, |e| e.dst_len = n - 1),
            Opcode::Sha256 => with(base, |e| e.dst_len = 31),
            Opcode::StreamCompress | Opcode::StreamDecompress => with(base, |e| e.dst_len = 16),
            _ if Format::of(op).is_some() => with(base, |e| e.dst_len = 16),
            _ => return None,
        },
        JobStatus::CorruptInput => match op {
            Opcode::Sha256 => {
                rig.put(OUT, &[0; 128]);
                with(base, |e| (e.param, e.dst_len) = (SHA256_RESUME, 128))
            }
            _ if matches!(Format::of(op), Some((_, false))) || op == Opcode::StreamDecompress => {
                rig.put(SRC2, &[0xff; 64]);
                with(base, |e| e.src_len = 64)
            }
            Opcode::StreamCompress => {
                // A piece without START on a context that holds no stream.
                rig.put(CTX, &[0; 64]);
                with(base, |e| e.param = 0)
            }
            _ => return None,
        },
        _ => return None,
    };
    Some(e)
}

/// Spec §5.2, "produced by": for every status, every operation the table
/// lists gets that status from some descriptor (BadOpcode from an opcode
/// not in §4; EngineError, a backend fault, from none).
#[test]
fn every_status_comes_from_the_operations_the_spec_lists() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/device-spec.md"))
        .unwrap();
    let start = doc.find("### 5.2 Job status").unwrap();
    let rows: Vec<Vec<String>> = doc[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), JobStatus::ALL.len());
    let mut rig = rig();
    let mut provoked = 0;
    for row in &rows {
        let status = JobStatus::from_code(row[0].parse().unwrap()).unwrap();
        let listed = row[3].as_str();
        let ops: Vec<Opcode> = if listed == "all" || listed.starts_with("all (") {
            Opcode::ALL.to_vec()
        } else if listed.starts_with("all but nop") {
            Opcode::ALL[1..].to_vec()
        } else if listed.starts_with('—') {
            vec![]
        } else {
            listed
                .split(", ")
                .map(|n| Opcode::from_name(n).unwrap_or_else(|| panic!("no opcode {n:?}")))
                .collect()
        };
        if status == JobStatus::EngineError {
            assert!(listed.contains("no descriptor provokes it"), "{listed}");
            continue;
        }
        if status == JobStatus::BadOpcode {
            assert!(ops.is_empty());
            let e = SubmissionEntry {
                opcode: Opcode::ALL.len() as u8,
                ..Default::default()
            };
            assert_eq!(status_of(&mut rig, e), Some(status));
            provoked += 1;
            continue;
        }
        for op in ops {
            let e = provoke(&mut rig, op, status)
                .unwrap_or_else(|| panic!("§5.2 says {} can give {status:?}", op.name()));
            match status {
                JobStatus::OpNotAllowed => program(&mut rig, wdvirt_abi::ALL_OPS & !op.bit()),
                JobStatus::Aborted => {
                    crate::accel::Accelerator::set_dma_allowed(&*rig.accel, 7, false).unwrap()
                }
                _ => {}
            }
            let got = status_of(&mut rig, e);
            match status {
                JobStatus::OpNotAllowed => program(&mut rig, wdvirt_abi::ALL_OPS),
                JobStatus::Aborted => {
                    crate::accel::Accelerator::set_dma_allowed(&*rig.accel, 7, true).unwrap()
                }
                _ => {}
            }
            assert_eq!(got, Some(status), "{} for {status:?}", op.name());
            provoked += 1;
        }
    }
    assert!(provoked > 60, "{provoked} pairs");
}

fn status_of(rig: &mut Rig, e: SubmissionEntry) -> Option<JobStatus> {
    status(&run1(rig, e))
}

/// Spec §2.2: reserved bits of the writable registers are refused with
/// ReservedBits, and the register keeps its value.
#[test]
fn reserved_register_bits_are_refused() {
    let mut rig = Rig::new(WdConfig::default());
    let b = r::queue(0);
    rig.w32(b + r::Q_DEPTH, 8);
    rig.w32(b + r::Q_MSIX_VECTOR, 1);
    for (off, bit) in [
        (r::DEV_CTRL, 1u32 << 2),
        (r::DEV_CTRL, 1 << 31),
        (r::ERR_STATUS, 1 << 1),
        (b + r::Q_DEPTH, 1 << 16),
        (b + r::Q_CTRL, 1 << 2),
        (b + r::Q_MSIX_VECTOR, 1 << 16),
        (b + r::Q_OPS, 1 << Opcode::ALL.len()),
    ] {
        let before = rig.r32(off);
        rig.w32(r::ERR_STATUS, 1);
        rig.w32(off, bit);
        assert_eq!(
            rig.r32(r::ERR_CODE),
            RegError::ReservedBits.code() as u32,
            "{off:#x} bit {bit:#x}"
        );
        assert_eq!(rig.r32(off), before, "{off:#x} kept its value");
    }
}
