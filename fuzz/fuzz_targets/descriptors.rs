//! `vdev::wd::queue::check` on arbitrary 64-byte SQEs against memfd-backed
//! guest memory (two adjacent regions and one apart, so buffers can span a
//! region boundary or fall into the hole between) and a fuzzed
//! `QueueConfig`. An independent model of the rules decides what must be
//! accepted: every `Ok(job)` has each buffer it uses fully inside memory and
//! clear of the rings, and every descriptor the model accepts is accepted.
#![no_main]

use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{FileOffset, GuestAddress};
use wdvirt::accel::GuestMemory;
use wdvirt::vdev::wd::queue::{QueueConfig, check};
use wdvirt_abi::{ALL_OPS, CQE_SIZE, Opcode, SQE_SIZE, SubmissionEntry, idx};
use wdvirt_fuzz::{Input, memfd};

/// (guest address, size, offset in the memfd).
const REGIONS: [(u64, u64, u64); 3] = [
    (0x1_0000, 0x1_0000, 0),
    (0x2_0000, 0x1_0000, 0x1_0000),
    (0x10_0000, 0x1000, 0x2_0000),
];
/// The same memory as byte ranges, adjacent regions merged (written by hand:
/// the oracle does not ask vm-memory).
const COVERED: [(u64, u64); 2] = [(0x1_0000, 0x3_0000), (0x10_0000, 0x10_1000)];
/// "Near" addresses fall in 0..NEAR: memory, holes and the edges of both.
const NEAR: u64 = 0x12_0000;

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        let fd: OwnedFd = memfd(0x2_1000);
        let file = std::fs::File::from(fd);
        GuestMemory::from_ranges_with_files(REGIONS.iter().map(|&(addr, size, off)| {
            (
                GuestAddress(addr),
                size as usize,
                Some(FileOffset::new(file.try_clone().expect("dup memfd"), off)),
            )
        }))
        .expect("guest memory")
    })
}

fn inside(addr: u64, len: u64) -> bool {
    let end = addr as u128 + len as u128;
    COVERED
        .iter()
        .any(|&(s, e)| s as u128 <= addr as u128 && end <= e as u128)
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    let (a, alen, b, blen) = (a as u128, alen as u128, b as u128, blen as u128);
    alen != 0 && blen != 0 && a < b + blen && b < a + alen
}

fn pick_addr(input: &mut Input, near: bool) -> u64 {
    let raw = input.u64();
    if near { raw % NEAR } else { raw }
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    let mut input = Input::new(data);
    let mode = input.u8();
    let near = mode & 1 == 0;
    let depth = 2u32 << (input.u8() % 10);
    let cfg = QueueConfig {
        sq_base: pick_addr(&mut input, near) & !63,
        cq_base: pick_addr(&mut input, near) & !63,
        idx_base: pick_addr(&mut input, near) & !63,
        depth,
        ops: if mode & 2 == 0 {
            input.u32() & ALL_OPS
        } else {
            ALL_OPS
        },
        vector: 0,
        coalesce: 0,
    };
    let max_xfer = match input.u8() % 4 {
        0 => 1 << 20,
        1 => 4096,
        2 => input.u32(),
        _ => 0x1_0001,
    };
    let rings = [
        (cfg.sq_base, depth as u64 * SQE_SIZE as u64),
        (cfg.cq_base, depth as u64 * CQE_SIZE as u64),
        (cfg.idx_base, idx::SIZE),
    ];

    while input.remaining() > 0 {
        let mut raw = [0u8; SQE_SIZE];
        let chunk = input.take(SQE_SIZE);
        raw[..chunk.len()].copy_from_slice(chunk);
        let mut sqe = SubmissionEntry::from_bytes(&raw);
        // Near mode: opcodes and addresses mostly meaningful, lengths
        // around the region sizes; the raw bytes otherwise.
        if near {
            // (The one-shot opcodes; stream pieces have no oracle here yet.)
            sqe.opcode %= 12;
            sqe.src %= NEAR;
            sqe.dst %= NEAR;
            sqe.src_len %= 0x4_0000;
            sqe.dst_len %= 0x4_0000;
            if raw[1] & 0x80 == 0 {
                sqe.flags = 0;
                sqe.reserved0 = 0;
                sqe.ctx = 0;
                sqe.reserved = [0; 2];
                sqe.param %= 0x120;
            }
        }
        let got = check(&sqe, &cfg, max_xfer, mem);

        // The oracle (of one-shot opcodes: a stream piece's context and
        // param rules are not modelled here).
        let op = Opcode::from_u8(sqe.opcode);
        if matches!(op, Some(Opcode::StreamCompress | Opcode::StreamDecompress)) {
            return;
        }
        // CRC32C and SHA-256 of nothing are defined (device-spec): an
        // empty source reads no byte, so it may point anywhere.
        let may_be_empty = matches!(op, Some(Opcode::Crc32c | Opcode::Sha256));
        let mut buffers = Vec::new();
        if let Some(op) = op {
            if op.reads_src() {
                buffers.push((sqe.src, sqe.src_len, may_be_empty));
            }
            if op.writes_dst() || op == Opcode::Compare {
                buffers.push((sqe.dst, sqe.dst_len, false));
            }
        }
        let buffer_ok = |&(addr, len, empty_ok): &(u64, u32, bool)| {
            if len == 0 && empty_ok {
                return true;
            }
            len != 0
                && len <= max_xfer
                && inside(addr, len as u64)
                && !rings.iter().any(|&(b, l)| overlaps(addr, len as u64, b, l))
        };
        // `param`: a level 0..=12 for compression, a byte for fill, else 0.
        let param_ok = |op: Opcode| match op {
            Opcode::DeflateCompress | Opcode::ZlibCompress | Opcode::GzipCompress => {
                sqe.param <= 12
            }
            Opcode::Fill => sqe.param <= 0xff,
            Opcode::Crc32c => sqe.param <= u64::from(u32::MAX),
            Opcode::Sha256 => sqe.param <= 3,
            _ => sqe.param == 0,
        };
        let valid = op.is_some_and(|op| {
            param_ok(op)
                && sqe.flags == 0
                && sqe.reserved0 == 0
                && sqe.ctx == 0
                && sqe.reserved == [0; 2]
                && cfg.ops & op.bit() != 0
                && (op != Opcode::Compare || sqe.src_len == sqe.dst_len)
                && buffers.iter().all(buffer_ok)
        });
        match got {
            Ok(job) => {
                assert!(
                    valid,
                    "accepted a descriptor the rules refuse: {sqe:?} {cfg:?}"
                );
                assert_eq!(Some(job.op), op);
                assert_eq!(
                    (
                        job.src,
                        job.src_len,
                        job.dst,
                        job.dst_len,
                        job.param,
                        job.cookie
                    ),
                    (
                        sqe.src,
                        sqe.src_len,
                        sqe.dst,
                        sqe.dst_len,
                        sqe.param,
                        sqe.tag as u64
                    )
                );
                for &(addr, len, _) in &buffers {
                    assert!(
                        len == 0 || inside(addr, len as u64),
                        "{addr:#x}+{len:#x} outside memory"
                    );
                }
            }
            Err(status) => assert!(
                !valid,
                "refused a valid descriptor with {status:?}: {sqe:?} {cfg:?} max_xfer {max_xfer}"
            ),
        }
    }
});
