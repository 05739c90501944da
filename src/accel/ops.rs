//! The engine datapath: every [`Opcode`] as a pure operation on host buffers.
//!
//! This is what a software engine runs after it has copied a job's buffers out
//! of guest memory, and what a benchmark calls directly to measure the cost of
//! the device path against the bare algorithm. Nothing here knows about guest
//! memory, queues or threads. The algorithms all come from libraries:
//! `libdeflater` (deflate, zlib, gzip), `crc-fast` (CRC32C), `sha2` (SHA-256).
//!
//! Semantics follow the `SubmissionEntry`/`CompletionEntry` docs in
//! `wdvirt_abi`: `dst` is the output buffer with capacity `dst.len()`, except
//! for `Compare`, where it is the second input (only read), and for `Nop` and
//! `Crc32c`, where it is ignored.

use libdeflater::{CompressionLvl, Compressor, DecompressionError, Decompressor};
use sha2::{Digest, Sha256};
use wdvirt_abi::{JobStatus, Opcode};

/// Highest compression level (libdeflate's range).
pub const MAX_LEVEL: u64 = 12;
/// Level used when a job asks for level 0.
pub const DEFAULT_LEVEL: u64 = 1;
/// Bytes a SHA-256 job writes to `dst`.
pub const SHA256_LEN: usize = 32;

/// What one operation produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Bytes written at the start of `dst`.
    pub bytes: u32,
    /// CRC32C value, or the compare result; 0 otherwise.
    pub result: u32,
}

/// Per-engine state reused across jobs: libdeflate compressors (one per level,
/// created on first use, each holds a few hundred KiB of tables) and one
/// decompressor. Not shared between threads: each engine owns one.
pub struct Scratch {
    compressors: [Option<Compressor>; MAX_LEVEL as usize],
    decompressor: Option<Decompressor>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// An empty scratch; allocates nothing until a (de)compression job runs.
    pub fn new() -> Self {
        Scratch {
            compressors: Default::default(),
            decompressor: None,
        }
    }

    fn compressor(&mut self, level: u64) -> &mut Compressor {
        // `level` was checked to be in 1..=MAX_LEVEL by `compression_level`.
        let slot = &mut self.compressors[(level - 1) as usize];
        slot.get_or_insert_with(|| {
            // 1..=12 is libdeflate's documented range, so `new` cannot refuse it.
            let lvl = CompressionLvl::new(level as i32).unwrap_or_default();
            Compressor::new(lvl)
        })
    }

    fn decompressor(&mut self) -> &mut Decompressor {
        self.decompressor.get_or_insert_with(Decompressor::new)
    }
}

pub use wdvirt_abi::Format;

/// The libdeflate level for a compress job's `param`: 0 means
/// [`DEFAULT_LEVEL`]. A level above [`MAX_LEVEL`] is refused with
/// `ReservedNonZero`: the ABI defines no status of its own for it, and the
/// bits above the valid range are, in effect, reserved.
pub fn compression_level(param: u64) -> Result<u64, JobStatus> {
    match param {
        0 => Ok(DEFAULT_LEVEL),
        1..=MAX_LEVEL => Ok(param),
        _ => Err(JobStatus::ReservedNonZero),
    }
}

/// Run one operation. `dst` is written for opcodes that write (see
/// [`Opcode::writes_dst`]) and only read for `Compare`.
///
/// Errors: `DstTooSmall` when the output does not fit `dst` (compression,
/// decompression, `Copy` with `dst` shorter than `src`, `Sha256` with `dst`
/// under 32 bytes); `CorruptInput` for invalid compressed data; `BadLength`
/// for `Compare` buffers of different lengths; `ReservedNonZero` for a
/// compression level above 12. `param` is ignored by opcodes that do not use
/// it (the device checks reserved fields before a job reaches an engine).
pub fn run(
    op: Opcode,
    src: &[u8],
    dst: &mut [u8],
    param: u64,
    scratch: &mut Scratch,
) -> Result<Output, JobStatus> {
    if let Some((format, compress)) = Format::of(op) {
        let bytes = if compress {
            self::compress(format, compression_level(param)?, src, dst, scratch)?
        } else {
            decompress(format, src, dst, scratch)?
        };
        return Ok(Output { bytes, result: 0 });
    }
    match op {
        Opcode::Nop => Ok(Output::default()),
        Opcode::Crc32c => Ok(Output {
            bytes: 0,
            result: crc32c_continue(param as u32, src),
        }),
        Opcode::Sha256 => sha256_part(src, dst, param).map(|bytes| Output { bytes, result: 0 }),
        Opcode::Copy => copy(src, dst).map(|bytes| Output { bytes, result: 0 }),
        Opcode::Fill => Ok(Output {
            bytes: fill(dst, param),
            result: 0,
        }),
        Opcode::Compare => compare(src, dst).map(|result| Output { bytes: 0, result }),
        // Stream pieces need their context: see `stream::run`.
        Opcode::StreamCompress | Opcode::StreamDecompress => Err(JobStatus::EngineError),
        // Handled by `Format::of` above.
        Opcode::DeflateCompress
        | Opcode::DeflateDecompress
        | Opcode::ZlibCompress
        | Opcode::ZlibDecompress
        | Opcode::GzipCompress
        | Opcode::GzipDecompress => Err(JobStatus::EngineError),
    }
}

/// Lengths in this layer never exceed the device's `MAX_XFER` (a u32), but a
/// direct caller may pass anything: saturate rather than truncate.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Compress `src` into `dst` at `level` (1..=12). Returns the compressed size.
pub fn compress(
    format: Format,
    level: u64,
    src: &[u8],
    dst: &mut [u8],
    scratch: &mut Scratch,
) -> Result<u32, JobStatus> {
    if !(1..=MAX_LEVEL).contains(&level) {
        return Err(JobStatus::ReservedNonZero);
    }
    let c = scratch.compressor(level);
    let res = match format {
        Format::Deflate => c.deflate_compress(src, dst),
        Format::Zlib => c.zlib_compress(src, dst),
        Format::Gzip => c.gzip_compress(src, dst),
    };
    // The only error libdeflate reports is "output did not fit".
    res.map(len_u32).map_err(|_| JobStatus::DstTooSmall)
}

/// Decompress `src` into `dst`. Returns the decompressed size.
pub fn decompress(
    format: Format,
    src: &[u8],
    dst: &mut [u8],
    scratch: &mut Scratch,
) -> Result<u32, JobStatus> {
    let d = scratch.decompressor();
    let res = match format {
        Format::Deflate => d.deflate_decompress(src, dst),
        Format::Zlib => d.zlib_decompress(src, dst),
        Format::Gzip => d.gzip_decompress(src, dst),
    };
    res.map(len_u32).map_err(|e| match e {
        DecompressionError::BadData => JobStatus::CorruptInput,
        DecompressionError::InsufficientSpace => JobStatus::DstTooSmall,
    })
}

/// CRC32C (Castagnoli, the iSCSI polynomial) of `src`.
pub fn crc32c(src: &[u8]) -> u32 {
    // The CRC-32 variants' values fit 32 bits; crc-fast returns them widened.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, src) as u32
}

/// The CRC32C of `before || src`, given `prior`, the CRC32C of `before`
/// (0 for nothing): how a buffer larger than one job is checksummed in parts.
pub fn crc32c_continue(prior: u32, src: &[u8]) -> u32 {
    // The register after `before` is its CRC without the final xor
    // (CRC32C's xorout, 0xFFFFFFFF): go on from there. (crc-fast's
    // `checksum_combine` gives the same value but costs about 6 µs a
    // call here, whatever the length: 600 times a 64-byte CRC.)
    let alg = crc_fast::CrcAlgorithm::Crc32Iscsi;
    let mut d = crc_fast::Digest::new_with_init_state(alg, u64::from(!prior));
    d.update(src);
    d.finalize() as u32
}

/// Whether a SHA-256 job with a `dst` of `dst_len` bytes reads it before
/// writing it: a `dst` that can hold a running state is read, for the
/// state a RESUME continues, or by [`sha256_part`] looking for one to
/// refuse a chain that forgot RESUME. (A shorter `dst` is never read: a
/// RESUME or MORE job with one fails `DstTooSmall` untouched, a one-shot
/// only writes its digest.) Such a job cannot simply run again once it
/// has written `dst`: the journal keeps the state's bytes, all of them
/// inside `dst`.
pub fn sha256_reads_dst(dst_len: u32) -> bool {
    dst_len >= wdvirt_abi::SHA256_STATE_SIZE
}

/// One part of a SHA-256 over a buffer larger than one job. `param` bits:
/// [`wdvirt_abi::SHA256_RESUME`] (`dst` holds the running state to continue)
/// and [`wdvirt_abi::SHA256_MORE`] (write the running state, not the
/// digest). Neither bit: the one-shot digest.
///
/// The state is the ABI's own layout ([`wdvirt_abi::sha256_state`]), never a
/// library's serialisation, so any backend can continue it. A job without
/// RESUME whose `dst` (of at least a state's size) already holds a valid
/// state is refused with `CorruptInput`: that is a chain whose driver forgot
/// RESUME, and hashing on would give a wrong digest silently.
pub fn sha256_part(src: &[u8], dst: &mut [u8], param: u64) -> Result<u32, JobStatus> {
    use wdvirt_abi::{SHA256_MORE, SHA256_RESUME, SHA256_STATE_SIZE};
    if param & !(SHA256_RESUME | SHA256_MORE) != 0 {
        return Err(JobStatus::ReservedNonZero);
    }
    let resume = param & SHA256_RESUME != 0;
    if !resume && dst.len() >= SHA256_STATE_SIZE as usize && ShaState::is_state(dst) {
        // (`sha256_reads_dst` names exactly these jobs.)
        return Err(JobStatus::CorruptInput);
    }
    if param == 0 {
        return sha256(src, dst);
    }
    let state = dst
        .get_mut(..SHA256_STATE_SIZE as usize)
        .ok_or(JobStatus::DstTooSmall)?;
    let mut h = if resume {
        ShaState::load(state)?
    } else {
        ShaState::new()
    };
    h.update(src)?;
    if param & SHA256_MORE != 0 {
        h.store(state);
        Ok(SHA256_STATE_SIZE)
    } else {
        state[..SHA256_LEN].copy_from_slice(&h.finish());
        Ok(SHA256_LEN as u32)
    }
}

/// SHA-256 in progress, as [`wdvirt_abi::sha256_state`] lays it out.
struct ShaState {
    h: [u32; 8],
    /// Message bytes so far.
    len: u64,
    /// The partial block (`len % 64` bytes used).
    block: [u8; 64],
}

/// FIPS 180-4 §5.3.3.
const SHA256_H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// SHA-256 takes messages under 2^64 bits.
const SHA256_MAX_LEN: u64 = 1 << 61;

impl ShaState {
    fn new() -> Self {
        ShaState {
            h: SHA256_H0,
            len: 0,
            block: [0; 64],
        }
    }

    fn header(buf: &[u8]) -> (u32, u16, u16) {
        use wdvirt_abi::sha256_state as l;
        let u16_at = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]);
        let m = &buf[l::MAGIC_OFFSET..l::MAGIC_OFFSET + 4];
        (
            u32::from_le_bytes([m[0], m[1], m[2], m[3]]),
            u16_at(l::VERSION_OFFSET),
            u16_at(l::FLAGS_OFFSET),
        )
    }

    /// Whether `buf` (at least a state's size) starts with a valid state's header.
    fn is_state(buf: &[u8]) -> bool {
        use wdvirt_abi::sha256_state as l;
        Self::header(buf) == (l::MAGIC, l::VERSION, l::FLAG_VALID)
    }

    /// Read a state back, refusing anything a `MORE` job could not have written.
    fn load(buf: &[u8]) -> Result<Self, JobStatus> {
        use wdvirt_abi::sha256_state as l;
        if !Self::is_state(buf) {
            return Err(JobStatus::CorruptInput);
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let len = u64_at(l::LENGTH_OFFSET);
        let mut h = [0u32; 8];
        for (i, w) in h.iter_mut().enumerate() {
            let o = l::H_OFFSET + 4 * i;
            *w = u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        }
        let mut block = [0u8; 64];
        block.copy_from_slice(&buf[l::BLOCK_OFFSET..l::BLOCK_OFFSET + 64]);
        let used = (len % 64) as usize;
        let reserved = &buf[l::RESERVED_OFFSET..wdvirt_abi::SHA256_STATE_SIZE as usize];
        if len >= SHA256_MAX_LEN || block[used..].iter().chain(reserved).any(|&b| b != 0) {
            return Err(JobStatus::CorruptInput);
        }
        Ok(ShaState { h, len, block })
    }

    fn store(&self, buf: &mut [u8]) {
        use wdvirt_abi::sha256_state as l;
        buf.fill(0);
        buf[l::MAGIC_OFFSET..l::MAGIC_OFFSET + 4].copy_from_slice(&l::MAGIC.to_le_bytes());
        buf[l::VERSION_OFFSET..l::VERSION_OFFSET + 2].copy_from_slice(&l::VERSION.to_le_bytes());
        buf[l::FLAGS_OFFSET..l::FLAGS_OFFSET + 2].copy_from_slice(&l::FLAG_VALID.to_le_bytes());
        buf[l::LENGTH_OFFSET..l::LENGTH_OFFSET + 8].copy_from_slice(&self.len.to_le_bytes());
        for (i, w) in self.h.iter().enumerate() {
            let o = l::H_OFFSET + 4 * i;
            buf[o..o + 4].copy_from_slice(&w.to_le_bytes());
        }
        buf[l::BLOCK_OFFSET..l::BLOCK_OFFSET + 64].copy_from_slice(&self.block);
    }

    fn update(&mut self, mut data: &[u8]) -> Result<(), JobStatus> {
        let total = self.len.checked_add(data.len() as u64);
        if total.is_none_or(|t| t >= SHA256_MAX_LEN) {
            return Err(JobStatus::BadLength);
        }
        let used = (self.len % 64) as usize;
        self.len += data.len() as u64;
        if used > 0 {
            let take = data.len().min(64 - used);
            self.block[used..used + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            if used + take < 64 {
                return Ok(());
            }
            sha2::block_api::compress256(&mut self.h, &[self.block]);
            self.block = [0; 64];
        }
        let (blocks, rest) = data.as_chunks::<64>();
        sha2::block_api::compress256(&mut self.h, blocks);
        self.block[..rest.len()].copy_from_slice(rest);
        Ok(())
    }

    /// FIPS 180-4 §5.1.1 padding, then the digest.
    fn finish(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let used = (self.len % 64) as usize;
        self.block[used] = 0x80;
        if used >= 56 {
            sha2::block_api::compress256(&mut self.h, &[self.block]);
            self.block = [0; 64];
        }
        self.block[56..].copy_from_slice(&bits.to_be_bytes());
        sha2::block_api::compress256(&mut self.h, &[self.block]);
        let mut out = [0u8; 32];
        for (i, w) in self.h.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

/// SHA-256 of `src` into the first 32 bytes of `dst`.
pub fn sha256(src: &[u8], dst: &mut [u8]) -> Result<u32, JobStatus> {
    let out = dst.get_mut(..SHA256_LEN).ok_or(JobStatus::DstTooSmall)?;
    out.copy_from_slice(&Sha256::digest(src));
    Ok(SHA256_LEN as u32)
}

/// Copy `src` to the start of `dst`.
pub fn copy(src: &[u8], dst: &mut [u8]) -> Result<u32, JobStatus> {
    let out = dst.get_mut(..src.len()).ok_or(JobStatus::DstTooSmall)?;
    out.copy_from_slice(src);
    Ok(len_u32(src.len()))
}

/// Fill all of `dst` with the low byte of `param`.
pub fn fill(dst: &mut [u8], param: u64) -> u32 {
    dst.fill(param as u8);
    len_u32(dst.len())
}

/// 0 when `a == b`, else the offset of the first difference plus one
/// (saturating at `u32::MAX`). Buffers of different lengths are `BadLength`.
pub fn compare(a: &[u8], b: &[u8]) -> Result<u32, JobStatus> {
    if a.len() != b.len() {
        return Err(JobStatus::BadLength);
    }
    Ok(match a.iter().zip(b).position(|(x, y)| x != y) {
        None => 0,
        Some(i) => u32::try_from(i).map_or(u32::MAX, |i| i.saturating_add(1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_in_parts_equals_crc32c_of_the_whole() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (a, b) = data.split_at(33_333);
        assert_eq!(crc32c_continue(crc32c_continue(0, a), b), crc32c(&data));
        for at in [0, 1, 7, 63, 64, 65, 4096, data.len() - 1, data.len()] {
            let (a, b) = data.split_at(at);
            assert_eq!(
                crc32c_continue(crc32c(a), b),
                crc32c(&data),
                "split at {at}"
            );
        }
        assert_eq!(crc32c_continue(0, b"123456789"), 0xe306_9283);
        let mut s = Scratch::new();
        let out = run(Opcode::Crc32c, b, &mut [], crc32c(a) as u64, &mut s).unwrap();
        assert_eq!(out.result, crc32c(&data));
    }

    #[test]
    fn sha256_in_parts_equals_sha256_of_the_whole() {
        use wdvirt_abi::{SHA256_MORE as MORE, SHA256_RESUME as RESUME, SHA256_STATE_SIZE};
        let data: Vec<u8> = (0..300_001u32).map(|i| (i * 13 % 256) as u8).collect();
        let mut state = vec![0u8; SHA256_STATE_SIZE as usize];
        let mut s = Scratch::new();
        let parts: Vec<&[u8]> = data.chunks(100_000).collect();
        for (k, part) in parts.iter().enumerate() {
            let resume = if k == 0 { 0 } else { RESUME };
            let more = if k + 1 < parts.len() { MORE } else { 0 };
            let out = run(Opcode::Sha256, part, &mut state, resume | more, &mut s).unwrap();
            assert_eq!(out.bytes, if more != 0 { SHA256_STATE_SIZE } else { 32 });
        }
        assert_eq!(state[..32], Sha256::digest(&data)[..]);
        // A corrupt saved state, a short state buffer and unknown bits are refused.
        let mut junk = vec![0xffu8; SHA256_STATE_SIZE as usize];
        assert_eq!(
            run(Opcode::Sha256, b"x", &mut junk, RESUME, &mut s),
            Err(JobStatus::CorruptInput)
        );
        // A real state with an absurd length (2^61 bytes and over).
        let mut junk = vec![0u8; SHA256_STATE_SIZE as usize];
        run(Opcode::Sha256, b"abc", &mut junk, MORE, &mut s).unwrap();
        junk[8..16].copy_from_slice(&(1u64 << 61).to_le_bytes());
        assert_eq!(
            run(Opcode::Sha256, b"x", &mut junk, RESUME, &mut s),
            Err(JobStatus::CorruptInput)
        );
        assert_eq!(
            run(Opcode::Sha256, b"x", &mut [0u8; 64], MORE, &mut s),
            Err(JobStatus::DstTooSmall)
        );
        assert_eq!(
            run(Opcode::Sha256, b"x", &mut state, 4, &mut s),
            Err(JobStatus::ReservedNonZero)
        );
    }

    /// Every split of a message into pieces (including empty pieces and
    /// splits inside and at block edges) gives the one-shot digest.
    #[test]
    fn sha256_state_round_trips_at_every_block_edge() {
        use wdvirt_abi::{SHA256_MORE as MORE, SHA256_RESUME as RESUME};
        let data: Vec<u8> = (0..300u32).map(|i| (i * 31 % 256) as u8).collect();
        let mut s = Scratch::new();
        for cut in [0usize, 1, 55, 56, 63, 64, 65, 119, 120, 128, 200, 300] {
            let mut st = vec![0u8; 128];
            run(Opcode::Sha256, &data[..cut], &mut st, MORE, &mut s).unwrap();
            let mid = cut + (data.len() - cut) / 2;
            run(
                Opcode::Sha256,
                &data[cut..mid],
                &mut st,
                RESUME | MORE,
                &mut s,
            )
            .unwrap();
            let out = run(Opcode::Sha256, &data[mid..], &mut st, RESUME, &mut s).unwrap();
            assert_eq!(out.bytes, 32);
            assert_eq!(st[..32], Sha256::digest(&data)[..], "cut at {cut}");
        }
    }

    /// Spec §4 (issue 14, item 10): the state is self-describing, so a
    /// forgotten MORE or RESUME gives CorruptInput, never a wrong digest.
    #[test]
    fn a_forgotten_sha256_flag_is_an_error_not_a_wrong_digest() {
        use wdvirt_abi::{SHA256_MORE as MORE, SHA256_RESUME as RESUME, sha256_state as l};
        let mut s = Scratch::new();
        let bad = Err(JobStatus::CorruptInput);
        // RESUME from an all-zero buffer (the first piece was never run).
        let mut zero = vec![0u8; 128];
        assert_eq!(run(Opcode::Sha256, b"x", &mut zero, RESUME, &mut s), bad);
        assert_eq!(zero, vec![0u8; 128], "a refused state is left unchanged");
        // MORE forgotten on the first piece: a digest, not a state, follows.
        let mut st = vec![0u8; 128];
        run(Opcode::Sha256, b"first", &mut st, 0, &mut s).unwrap();
        assert_eq!(run(Opcode::Sha256, b"x", &mut st, RESUME, &mut s), bad);
        // MORE forgotten on a middle piece.
        let mut st = vec![0u8; 128];
        run(Opcode::Sha256, b"first", &mut st, MORE, &mut s).unwrap();
        run(Opcode::Sha256, b"middle", &mut st, RESUME, &mut s).unwrap();
        assert_eq!(run(Opcode::Sha256, b"x", &mut st, RESUME, &mut s), bad);
        // RESUME forgotten on a middle or the last piece: dst holds a state.
        for forgot in [MORE, 0] {
            let mut st = vec![0u8; 128];
            run(Opcode::Sha256, b"first", &mut st, MORE, &mut s).unwrap();
            let before = st.clone();
            assert_eq!(run(Opcode::Sha256, b"x", &mut st, forgot, &mut s), bad);
            assert_eq!(st, before, "the state is left unchanged");
        }
        // A finished chain's buffer starts a new chain: the digest overwrote the header.
        let mut st = vec![0u8; 128];
        run(Opcode::Sha256, b"a", &mut st, MORE, &mut s).unwrap();
        run(Opcode::Sha256, b"b", &mut st, RESUME, &mut s).unwrap();
        run(Opcode::Sha256, b"c", &mut st, MORE, &mut s).unwrap();
        run(Opcode::Sha256, b"d", &mut st, RESUME, &mut s).unwrap();
        assert_eq!(st[..32], Sha256::digest(b"cd")[..]);
        // The layout is the ABI's: header, length, H words, partial block.
        let mut st = vec![0u8; 128];
        run(Opcode::Sha256, &[7u8; 70], &mut st, MORE, &mut s).unwrap();
        assert_eq!(st[..4], l::MAGIC.to_le_bytes());
        assert_eq!(st[4..8], [1, 0, 1, 0]);
        assert_eq!(u64::from_le_bytes(st[8..16].try_into().unwrap()), 70);
        assert_eq!(st[l::BLOCK_OFFSET..l::BLOCK_OFFSET + 6], [7u8; 6]);
        assert!(st[l::BLOCK_OFFSET + 6..].iter().all(|&b| b == 0));
        // Any damage to the header, the unused block bytes or the reserved tail is refused.
        for at in [0usize, 4, 6, 7, l::BLOCK_OFFSET + 6, 127] {
            let mut broken = st.clone();
            broken[at] ^= 0x40;
            assert_eq!(
                run(Opcode::Sha256, b"x", &mut broken, RESUME, &mut s),
                bad,
                "byte {at}"
            );
        }
    }

    /// Compressible but not trivial: text with a counter, plus some noise.
    fn corpus(len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 64);
        let mut i = 0u32;
        while v.len() < len {
            v.extend_from_slice(format!("line {i}: the quick brown fox; ").as_bytes());
            v.push((i.wrapping_mul(2_654_435_761) >> 24) as u8);
            i += 1;
        }
        v.truncate(len);
        v
    }

    const FORMATS: [(Format, Opcode, Opcode); 3] = [
        (
            Format::Deflate,
            Opcode::DeflateCompress,
            Opcode::DeflateDecompress,
        ),
        (Format::Zlib, Opcode::ZlibCompress, Opcode::ZlibDecompress),
        (Format::Gzip, Opcode::GzipCompress, Opcode::GzipDecompress),
    ];

    #[test]
    fn round_trip_every_format_and_level_checked_by_flate2() {
        let mut s = Scratch::new();
        let input = corpus(20_000);
        for (format, cop, dop) in FORMATS {
            for level in [0u64, 1, 6, 9, 12] {
                let mut packed = vec![0u8; 32 * 1024];
                let out = run(cop, &input, &mut packed, level, &mut s).unwrap();
                assert_eq!(out.result, 0);
                let n = out.bytes as usize;
                assert!(n > 0 && n < input.len() / 2, "{format:?} L{level}: {n}");
                packed.truncate(n);
                assert_eq!(
                    crate::accel::reference::decode(format, &packed),
                    input,
                    "{format:?} L{level}"
                );

                let mut back = vec![0u8; input.len()];
                let out = run(dop, &packed, &mut back, 0, &mut s).unwrap();
                assert_eq!(out.bytes as usize, input.len());
                assert_eq!(back, input);
            }
        }
    }

    #[test]
    fn level_zero_is_level_one() {
        let mut s = Scratch::new();
        let input = corpus(8192);
        let (mut a, mut b) = (vec![0u8; 8192], vec![0u8; 8192]);
        let na = run(Opcode::DeflateCompress, &input, &mut a, 0, &mut s).unwrap();
        let nb = run(Opcode::DeflateCompress, &input, &mut b, 1, &mut s).unwrap();
        assert_eq!(na, nb);
        assert_eq!(a[..na.bytes as usize], b[..nb.bytes as usize]);
        // And level 1 really differs from a higher level on this input.
        let n12 = run(Opcode::DeflateCompress, &input, &mut b, 12, &mut s).unwrap();
        assert!(n12.bytes < na.bytes);
    }

    #[test]
    fn decompresses_what_flate2_wrote() {
        let mut s = Scratch::new();
        let input = corpus(10_000);
        for (format, _, dop) in FORMATS {
            let packed = crate::accel::reference::encode(format, &input);
            let mut out = vec![0u8; input.len() + 100];
            let r = run(dop, &packed, &mut out, 0, &mut s).unwrap();
            assert_eq!(&out[..r.bytes as usize], &input[..], "{format:?}");
        }
    }

    #[test]
    fn empty_input_round_trips() {
        let mut s = Scratch::new();
        for (format, cop, dop) in FORMATS {
            let mut packed = vec![0u8; 64];
            let n = run(cop, &[], &mut packed, 1, &mut s).unwrap().bytes as usize;
            assert!(crate::accel::reference::decode(format, &packed[..n]).is_empty());
            let mut out = [0u8; 4];
            let r = run(dop, &packed[..n], &mut out, 0, &mut s).unwrap();
            assert_eq!(r.bytes, 0);
        }
    }

    #[test]
    fn compress_output_too_big_is_dst_too_small() {
        let mut s = Scratch::new();
        let input = corpus(4096);
        for (_, cop, _) in FORMATS {
            let mut small = vec![0u8; 16];
            assert_eq!(
                run(cop, &input, &mut small, 1, &mut s),
                Err(JobStatus::DstTooSmall)
            );
        }
    }

    #[test]
    fn decompress_output_too_big_is_dst_too_small() {
        let mut s = Scratch::new();
        let input = corpus(4096);
        for (format, _, dop) in FORMATS {
            let packed = crate::accel::reference::encode(format, &input);
            let mut small = vec![0u8; input.len() - 1];
            assert_eq!(
                run(dop, &packed, &mut small, 0, &mut s),
                Err(JobStatus::DstTooSmall),
                "{format:?}"
            );
        }
    }

    #[test]
    fn corrupt_input_is_corrupt_input() {
        let mut s = Scratch::new();
        let input = corpus(4096);
        for (format, _, dop) in FORMATS {
            let mut out = vec![0u8; 8192];
            // Not a stream at all (0xff: deflate block type 3 is reserved;
            // wrong zlib and gzip magic).
            assert_eq!(
                run(dop, &[0xff; 64], &mut out, 0, &mut s),
                Err(JobStatus::CorruptInput),
                "{format:?} garbage"
            );
            // Truncated stream.
            let packed = crate::accel::reference::encode(format, &input);
            assert_eq!(
                run(dop, &packed[..packed.len() / 2], &mut out, 0, &mut s),
                Err(JobStatus::CorruptInput),
                "{format:?} truncated"
            );
            // Empty input.
            assert_eq!(
                run(dop, &[], &mut out, 0, &mut s),
                Err(JobStatus::CorruptInput),
                "{format:?} empty"
            );
        }
        // A flipped payload bit breaks the zlib (Adler-32) and gzip (CRC-32) checks.
        for (format, _, dop) in &FORMATS[1..] {
            let mut packed = crate::accel::reference::encode(*format, &input);
            let last = packed.len() - 1;
            packed[last] ^= 0x01;
            let mut out = vec![0u8; 8192];
            assert_eq!(
                run(*dop, &packed, &mut out, 0, &mut s),
                Err(JobStatus::CorruptInput),
                "{format:?} checksum"
            );
        }
    }

    #[test]
    fn level_above_twelve_is_reserved_non_zero() {
        let mut s = Scratch::new();
        let mut out = vec![0u8; 256];
        for (_, cop, _) in FORMATS {
            for level in [13u64, 255, 1 << 32, u64::MAX] {
                assert_eq!(
                    run(cop, b"data", &mut out, level, &mut s),
                    Err(JobStatus::ReservedNonZero)
                );
            }
            assert!(run(cop, b"data", &mut out, 12, &mut s).is_ok());
        }
        assert_eq!(
            compress(Format::Zlib, 0, b"x", &mut out, &mut s),
            Err(JobStatus::ReservedNonZero)
        );
    }

    #[test]
    fn crc32c_check_value() {
        let mut s = Scratch::new();
        let r = run(Opcode::Crc32c, b"123456789", &mut [], 0, &mut s).unwrap();
        assert_eq!(
            r,
            Output {
                bytes: 0,
                result: 0xE306_9283
            }
        );
        assert_eq!(crc32c(b""), 0);
        // Large and unaligned enough for the SIMD path: check against a
        // bitwise oracle (test-only; the engine uses crc-fast).
        let big = corpus(100_003);
        assert_eq!(crc32c(&big), bitwise_crc32c(&big));
        assert_eq!(crc32c(&big[1..]), bitwise_crc32c(&big[1..]));
    }

    fn bitwise_crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn sha256_known_vectors() {
        let mut s = Scratch::new();
        let mut dst = [0xaau8; 40];
        let r = run(Opcode::Sha256, b"abc", &mut dst, 0, &mut s).unwrap();
        assert_eq!(r.bytes, 32);
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let got: String = dst[..32].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
        assert_eq!(dst[32..], [0xaa; 8], "wrote past 32 bytes");
        // Empty input.
        run(Opcode::Sha256, b"", &mut dst, 0, &mut s).unwrap();
        let got: String = dst[..32].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            got,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            run(Opcode::Sha256, b"abc", &mut [0u8; 31], 0, &mut s),
            Err(JobStatus::DstTooSmall)
        );
    }

    #[test]
    fn copy_semantics() {
        let mut s = Scratch::new();
        let src = corpus(100);
        let mut dst = vec![0x55u8; 120];
        let r = run(Opcode::Copy, &src, &mut dst, 0, &mut s).unwrap();
        assert_eq!(
            r,
            Output {
                bytes: 100,
                result: 0
            }
        );
        assert_eq!(dst[..100], src[..]);
        assert_eq!(dst[100..], [0x55; 20]);
        assert_eq!(
            run(Opcode::Copy, &src, &mut [0u8; 99], 0, &mut s),
            Err(JobStatus::DstTooSmall)
        );
    }

    #[test]
    fn fill_semantics() {
        let mut s = Scratch::new();
        let mut dst = vec![0u8; 77];
        let r = run(Opcode::Fill, &[], &mut dst, 0x1234_5678_9abc_de5a, &mut s).unwrap();
        assert_eq!(
            r,
            Output {
                bytes: 77,
                result: 0
            }
        );
        assert!(dst.iter().all(|&b| b == 0x5a));
        // `src` is not read.
        let r = run(Opcode::Fill, b"ignored", &mut dst[..3], 0xff, &mut s).unwrap();
        assert_eq!(r.bytes, 3);
        assert_eq!(dst[..4], [0xff, 0xff, 0xff, 0x5a]);
    }

    #[test]
    fn compare_semantics() {
        let mut s = Scratch::new();
        let a = corpus(1000);
        let mut b = a.clone();
        let r = run(Opcode::Compare, &a, &mut b, 0, &mut s).unwrap();
        assert_eq!(
            r,
            Output {
                bytes: 0,
                result: 0
            }
        );
        assert_eq!(b, a, "compare must not write dst");
        b[0] ^= 1;
        assert_eq!(
            run(Opcode::Compare, &a, &mut b, 0, &mut s).unwrap().result,
            1
        );
        b[0] ^= 1;
        b[999] ^= 1;
        assert_eq!(compare(&a, &b), Ok(1000));
        b[500] ^= 1;
        assert_eq!(compare(&a, &b), Ok(501));
        assert_eq!(compare(&[], &[]), Ok(0));
        assert_eq!(
            run(Opcode::Compare, &a, &mut b[..999], 0, &mut s),
            Err(JobStatus::BadLength)
        );
    }

    #[test]
    fn nop_does_nothing() {
        let mut s = Scratch::new();
        let mut dst = [7u8; 8];
        assert_eq!(
            run(Opcode::Nop, b"abc", &mut dst, 99, &mut s),
            Ok(Output::default())
        );
        assert_eq!(dst, [7u8; 8]);
    }

    #[test]
    fn crc32c_ignores_dst() {
        let mut s = Scratch::new();
        let mut dst = [7u8; 8];
        run(Opcode::Crc32c, b"abc", &mut dst, 0, &mut s).unwrap();
        assert_eq!(dst, [7u8; 8]);
    }
}
