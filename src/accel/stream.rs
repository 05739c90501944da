//! Stream compression and decompression larger than one job (ABI 1.1,
//! `stream-compress` / `stream-decompress`): what an engine does with one
//! piece of a stream and the context the device keeps between pieces.
//!
//! The context ([`wdvirt_abi::stream`]) is backend-neutral: the last 32 KiB
//! of uncompressed data (the deflate window), where in the compressed
//! stream the next piece starts (down to the bit), the format's running
//! check value and the byte counts, never a library's internal state. So
//! every compress piece ends on a byte boundary (a sync, full or finish
//! flush), and every decompress piece ends at a deflate block boundary: a
//! block cut by the end of `src` or `dst` is left for the next piece, which
//! reads it again from its start. Headers and trailers are written and
//! checked here, so a concatenated gzip member is seen as the end of one
//! stream, with the input it consumed.

use wdvirt_abi::stream as s;
use wdvirt_abi::{Format, JobStatus, Opcode};

use super::zstream::{self as z, Zstream};

const WINDOW: usize = s::WINDOW_SIZE as usize;

/// What one stream piece produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamOutput {
    /// Bytes written at the start of `dst`.
    pub bytes: u32,
    /// Bytes of `src` consumed (all of it for compression).
    pub consumed: u32,
    /// The stream ended with this piece.
    pub ended: bool,
}

/// A stream context as [`wdvirt_abi::stream`] lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ctx {
    flags: u16,
    format: Format,
    bits: u8,
    bit_value: u8,
    check: u32,
    plain: u64,
    packed: u64,
    window: Vec<u8>,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Ctx {
    fn new(format: Format, compress: bool) -> Ctx {
        let check = match format {
            Format::Zlib => 1,
            Format::Deflate | Format::Gzip => 0,
        };
        Ctx {
            flags: s::FLAG_VALID | if compress { s::FLAG_COMPRESS } else { 0 },
            format,
            bits: 0,
            bit_value: 0,
            check,
            plain: 0,
            packed: 0,
            window: Vec::new(),
        }
    }

    /// Reads a context back, refusing anything a stream job could not have
    /// written, or one of the other direction or format, or an ended one.
    fn load(buf: &[u8], format: Format, compress: bool) -> Result<Ctx, JobStatus> {
        let bad = Err(JobStatus::CorruptInput);
        let flags = u16::from_le_bytes([buf[s::FLAGS_OFFSET], buf[s::FLAGS_OFFSET + 1]]);
        let version = u16::from_le_bytes([buf[s::VERSION_OFFSET], buf[s::VERSION_OFFSET + 1]]);
        let known = s::FLAG_VALID
            | s::FLAG_COMPRESS
            | s::FLAG_HEADER_DONE
            | s::FLAG_DEFLATE_DONE
            | s::FLAG_ENDED;
        if u32_at(buf, s::MAGIC_OFFSET) != s::MAGIC
            || version != s::VERSION
            || flags & s::FLAG_VALID == 0
            || flags & !known != 0
            || flags & s::FLAG_ENDED != 0
            || (flags & s::FLAG_COMPRESS != 0) != compress
            || Format::from_code(buf[s::FORMAT_OFFSET].into()) != Some(format)
        {
            return bad;
        }
        let (bits, bit_value) = (buf[s::BITS_OFFSET], buf[s::BIT_VALUE_OFFSET]);
        let window_len = u32_at(buf, s::WINDOW_LEN_OFFSET) as usize;
        let reserved = &buf[s::RESERVED_OFFSET..s::WINDOW_OFFSET];
        if bits > 7
            || u16::from(bit_value) >> bits != 0
            || buf[11] != 0
            || window_len > WINDOW
            || reserved.iter().any(|&b| b != 0)
            || (format == Format::Deflate && u32_at(buf, s::CHECK_OFFSET) != 0)
        {
            return bad;
        }
        Ok(Ctx {
            flags,
            format,
            bits,
            bit_value,
            check: u32_at(buf, s::CHECK_OFFSET),
            plain: u64_at(buf, s::PLAIN_OFFSET),
            packed: u64_at(buf, s::PACKED_OFFSET),
            window: buf[s::WINDOW_OFFSET..s::WINDOW_OFFSET + window_len].to_vec(),
        })
    }

    fn store(&self, buf: &mut [u8]) {
        buf[..s::WINDOW_OFFSET].fill(0);
        buf[s::MAGIC_OFFSET..s::MAGIC_OFFSET + 4].copy_from_slice(&s::MAGIC.to_le_bytes());
        buf[s::VERSION_OFFSET..s::VERSION_OFFSET + 2].copy_from_slice(&s::VERSION.to_le_bytes());
        buf[s::FLAGS_OFFSET..s::FLAGS_OFFSET + 2].copy_from_slice(&self.flags.to_le_bytes());
        buf[s::FORMAT_OFFSET] = self.format.code() as u8;
        buf[s::BITS_OFFSET] = self.bits;
        buf[s::BIT_VALUE_OFFSET] = self.bit_value;
        buf[s::CHECK_OFFSET..s::CHECK_OFFSET + 4].copy_from_slice(&self.check.to_le_bytes());
        buf[s::PLAIN_OFFSET..s::PLAIN_OFFSET + 8].copy_from_slice(&self.plain.to_le_bytes());
        buf[s::PACKED_OFFSET..s::PACKED_OFFSET + 8].copy_from_slice(&self.packed.to_le_bytes());
        let n = self.window.len();
        buf[s::WINDOW_LEN_OFFSET..s::WINDOW_LEN_OFFSET + 4]
            .copy_from_slice(&(n as u32).to_le_bytes());
        buf[s::WINDOW_OFFSET..s::WINDOW_OFFSET + n].copy_from_slice(&self.window);
        buf[s::WINDOW_OFFSET + n..].fill(0);
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Account for `data`, uncompressed, passing through the stream.
    fn saw(&mut self, data: &[u8]) {
        self.check = check_of(self.format, self.check, data);
        self.plain += data.len() as u64;
        if data.len() >= WINDOW {
            self.window.clear();
            self.window.extend_from_slice(&data[data.len() - WINDOW..]);
        } else {
            let keep = (WINDOW - data.len()).min(self.window.len());
            self.window.drain(..self.window.len() - keep);
            self.window.extend_from_slice(data);
        }
    }
}

/// A stream piece's `param`, decoded: (format, level, flush, start);
/// `ReservedNonZero` for anything the ABI does not define. The device's
/// descriptor check uses this too, so the rule is written once.
pub(crate) fn params(op: Opcode, param: u64) -> Result<(Format, u64, u64, bool), JobStatus> {
    let allowed = match op {
        Opcode::StreamCompress => s::COMPRESS_PARAM,
        _ => s::DECOMPRESS_PARAM,
    };
    let format = Format::from_code(param & s::FORMAT_MASK);
    let level = match (param & s::LEVEL_MASK) >> s::LEVEL_SHIFT {
        0 => 1,
        l => l,
    };
    let flush = (param & s::FLUSH_MASK) >> s::FLUSH_SHIFT;
    match format {
        Some(f) if param & !allowed == 0 && level <= s::MAX_LEVEL && flush <= s::FLUSH_FINISH => {
            Ok((f, level, flush, param & s::START != 0))
        }
        _ => Err(JobStatus::ReservedNonZero),
    }
}

/// Run one stream piece: `src` in, `dst` out, `ctx` the context
/// ([`wdvirt_abi::stream::CTX_SIZE`] bytes), read and rewritten. On any
/// error `dst` may hold scratch bytes (the caller writes back only
/// `bytes`) and `ctx` is unchanged.
pub fn run(
    op: Opcode,
    src: &[u8],
    dst: &mut [u8],
    ctx: &mut [u8],
    param: u64,
) -> Result<StreamOutput, JobStatus> {
    if ctx.len() < s::CTX_SIZE as usize {
        return Err(JobStatus::BadLength);
    }
    let ctx = &mut ctx[..s::CTX_SIZE as usize];
    let (format, level, flush, start) = params(op, param)?;
    let compress = op == Opcode::StreamCompress;
    let mut c = if start {
        Ctx::new(format, compress)
    } else {
        Ctx::load(ctx, format, compress)?
    };
    let out = if compress {
        compress_piece(&mut c, src, dst, level, flush)?
    } else {
        decompress_piece(&mut c, src, dst)?
    };
    c.store(ctx);
    Ok(out)
}

/// One compress job's `src` compressed as a stream of pieces of `slice`
/// bytes into `dst` (a whole `format` stream: header, the pieces each
/// ended by a sync flush, the last by finish, the trailer), calling
/// `between` after every piece but the last; returns the bytes written.
/// This is how a software engine runs a long compress job in slices
/// (`accel::soft`): one deflate stream lives across the pieces, so the
/// engine can do other work between them. `level` is libdeflate's
/// (1..=12), taken to zlib's nearest in output size: zlib's level 1 is a
/// faster, looser algorithm (27 % larger than libdeflate's level 1 on the
/// guest tool's text), so 1 is zlib's 2; above 9, zlib's 9. The output is
/// a function of `src`, `format`, `level` and `slice` alone.
pub fn compress_in_slices(
    format: Format,
    level: u64,
    src: &[u8],
    dst: &mut [u8],
    slice: usize,
    between: &mut dyn FnMut(),
) -> Result<u32, JobStatus> {
    let level = level.clamp(2, s::MAX_LEVEL);
    let mut at = 0;
    match format {
        Format::Deflate => {}
        Format::Zlib => put(dst, &mut at, &zlib_header(level))?,
        Format::Gzip => put(dst, &mut at, &gzip_header(level))?,
    }
    let mut zs = Zstream::deflate(level as i32).ok_or(JobStatus::EngineError)?;
    let mut check = Ctx::new(format, true).check;
    let pieces = src.len().div_ceil(slice.max(1)).max(1);
    for i in 0..pieces {
        let piece = &src[(i * slice).min(src.len())..((i + 1) * slice).min(src.len())];
        let last = i + 1 == pieces;
        let flush = if last { z::Z_FINISH } else { z::Z_SYNC_FLUSH };
        let step = zs.step(piece, &mut dst[at..], flush);
        // As in `compress_piece`: a flush is complete only if it left
        // output space; finish must end the stream.
        let done = if last {
            step.code == z::Z_STREAM_END
        } else {
            step.code == z::Z_OK && step.read == piece.len() && at + step.written < dst.len()
        };
        if !done {
            return Err(match step.code {
                z::Z_OK | z::Z_BUF_ERROR => JobStatus::DstTooSmall,
                _ => JobStatus::EngineError,
            });
        }
        at += step.written;
        check = check_of(format, check, piece);
        if !last {
            between();
        }
    }
    match format {
        Format::Deflate => {}
        Format::Zlib => put(dst, &mut at, &check.to_be_bytes())?,
        Format::Gzip => {
            put(dst, &mut at, &check.to_le_bytes())?;
            put(dst, &mut at, &(src.len() as u32).to_le_bytes())?;
        }
    }
    u32::try_from(at).map_err(|_| JobStatus::DstTooSmall)
}

/// The format's running check value after `data` (none for raw deflate).
fn check_of(format: Format, check: u32, data: &[u8]) -> u32 {
    match format {
        Format::Deflate => 0,
        Format::Zlib => zlib_rs::adler32::adler32(check, data),
        Format::Gzip => zlib_rs::crc32::crc32(check, data),
    }
}

fn zlib_header(level: u64) -> [u8; 2] {
    let cmf = 0x78u16; // deflate, 32 KiB window
    let flevel = match level {
        1 => 0,
        2..=5 => 1,
        6 => 2,
        _ => 3,
    };
    let flg = flevel << 6;
    let fcheck = 31 - ((cmf << 8 | flg) % 31);
    [cmf as u8, (flg | (fcheck % 31)) as u8]
}

fn gzip_header(level: u64) -> [u8; 10] {
    let xfl = match level {
        1 => 4,
        9 => 2,
        _ => 0,
    };
    // No name, no mtime, OS "unknown".
    [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]
}

fn put(dst: &mut [u8], at: &mut usize, bytes: &[u8]) -> Result<(), JobStatus> {
    let end = *at + bytes.len();
    dst.get_mut(*at..end)
        .ok_or(JobStatus::DstTooSmall)?
        .copy_from_slice(bytes);
    *at = end;
    Ok(())
}

fn compress_piece(
    c: &mut Ctx,
    src: &[u8],
    dst: &mut [u8],
    level: u64,
    flush: u64,
) -> Result<StreamOutput, JobStatus> {
    let mut at = 0;
    if !c.has(s::FLAG_HEADER_DONE) {
        match c.format {
            Format::Deflate => {}
            Format::Zlib => put(dst, &mut at, &zlib_header(level))?,
            Format::Gzip => put(dst, &mut at, &gzip_header(level))?,
        }
        c.flags |= s::FLAG_HEADER_DONE;
    }
    let mut zs = Zstream::deflate(level as i32).ok_or(JobStatus::EngineError)?;
    if !c.window.is_empty() && !zs.set_dictionary(&c.window) {
        return Err(JobStatus::EngineError);
    }
    let zflush = match flush {
        s::FLUSH_SYNC => z::Z_SYNC_FLUSH,
        s::FLUSH_FULL => z::Z_FULL_FLUSH,
        _ => z::Z_FINISH,
    };
    let step = zs.step(src, &mut dst[at..], zflush);
    // zlib: a flush is complete only if it left output space (else it
    // wants to be called again with more); finish must end the stream.
    let done = if zflush == z::Z_FINISH {
        step.code == z::Z_STREAM_END
    } else {
        step.code == z::Z_OK && step.read == src.len() && at + step.written < dst.len()
    };
    if !done {
        return match step.code {
            z::Z_OK | z::Z_BUF_ERROR => Err(JobStatus::DstTooSmall),
            _ => Err(JobStatus::EngineError),
        };
    }
    at += step.written;
    c.saw(src);
    if flush == s::FLUSH_FULL {
        // Later output refers to nothing before this point.
        c.window.clear();
    }
    if flush == s::FLUSH_FINISH {
        match c.format {
            Format::Deflate => {}
            Format::Zlib => put(dst, &mut at, &c.check.to_be_bytes())?,
            Format::Gzip => {
                put(dst, &mut at, &c.check.to_le_bytes())?;
                put(dst, &mut at, &(c.plain as u32).to_le_bytes())?;
            }
        }
        c.flags |= s::FLAG_ENDED;
    }
    c.packed += at as u64;
    Ok(StreamOutput {
        bytes: at as u32,
        consumed: src.len() as u32,
        ended: flush == s::FLUSH_FINISH,
    })
}

/// The length of the format's header at the start of `src`: `Ok(None)` if
/// `src` ends inside it.
fn header_len(format: Format, src: &[u8]) -> Result<Option<usize>, JobStatus> {
    let bad = Err(JobStatus::CorruptInput);
    match format {
        Format::Deflate => Ok(Some(0)),
        Format::Zlib => {
            let [cmf, flg] = match src {
                [a, b, ..] => [*a, *b],
                _ => return Ok(None),
            };
            // Deflate with a window of at most 32 KiB, a good check, and no
            // preset dictionary (a stream cannot name one here).
            if cmf & 0x0f != 8 || cmf >> 4 > 7 || (u16::from(cmf) << 8 | u16::from(flg)) % 31 != 0 {
                return bad;
            }
            if flg & 0x20 != 0 {
                return bad;
            }
            Ok(Some(2))
        }
        Format::Gzip => {
            if src.len() < 10 {
                return Ok(None);
            }
            let flg = src[3];
            if src[..3] != [0x1f, 0x8b, 8] || flg & 0xe0 != 0 {
                return bad;
            }
            let mut at = 10;
            if flg & 0x04 != 0 {
                let Some(x) = src.get(at..at + 2) else {
                    return Ok(None);
                };
                at += 2 + usize::from(u16::from_le_bytes([x[0], x[1]]));
            }
            for bit in [0x08, 0x10] {
                if flg & bit != 0 {
                    match src.get(at..).and_then(|r| r.iter().position(|&b| b == 0)) {
                        Some(nul) => at += nul + 1,
                        None => return Ok(None),
                    }
                }
            }
            if flg & 0x02 != 0 {
                let Some(h) = src.get(at..at + 2) else {
                    return Ok(None);
                };
                let crc = zlib_rs::crc32::crc32(0, &src[..at]) as u16;
                if u16::from_le_bytes([h[0], h[1]]) != crc {
                    return bad;
                }
                at += 2;
            }
            if at > src.len() {
                return Ok(None);
            }
            Ok(Some(at))
        }
    }
}

/// Where a piece of inflate may stop and the next resume: after `read`
/// bytes of input with `unused` bits still in zlib's bit buffer, having
/// written `written` bytes.
#[derive(Clone, Copy, Debug)]
struct Stop {
    read: usize,
    written: usize,
    unused: usize,
}

fn decompress_piece(c: &mut Ctx, src: &[u8], dst: &mut [u8]) -> Result<StreamOutput, JobStatus> {
    let mut pos = 0;
    let mut written = 0;
    if !c.has(s::FLAG_HEADER_DONE) {
        match header_len(c.format, src)? {
            Some(n) => {
                pos = n;
                c.packed += n as u64;
                c.flags |= s::FLAG_HEADER_DONE;
            }
            None => return Ok(StreamOutput::default()),
        }
    }
    if !c.has(s::FLAG_DEFLATE_DONE) {
        let input = &src[pos..];
        let mut zs = Zstream::inflate().ok_or(JobStatus::EngineError)?;
        if (!c.window.is_empty() && !zs.set_dictionary(&c.window))
            || (c.bits > 0 && !zs.prime(c.bits, c.bit_value))
        {
            return Err(JobStatus::EngineError);
        }
        let (mut read, mut out) = (0, 0);
        let mut stop: Option<Stop> = None;
        let mut ended = false;
        loop {
            let st = zs.step(&input[read..], &mut dst[out..], z::Z_BLOCK);
            read += st.read;
            out += st.written;
            let here = Stop {
                read,
                written: out,
                unused: (st.data_type & 63) as usize,
            };
            match st.code {
                z::Z_STREAM_END => {
                    (stop, ended) = (Some(here), true);
                    break;
                }
                z::Z_OK if st.data_type & 128 != 0 => stop = Some(here),
                z::Z_OK => {}
                z::Z_BUF_ERROR => break,
                _ => return Err(JobStatus::CorruptInput),
            }
            if st.read == 0 && st.written == 0 {
                break;
            }
        }
        let Some(stop) = stop else {
            // Not one whole block fits: more input helps, more output space
            // is the driver's to give (a block larger than dst_len).
            return if out == dst.len() {
                Err(JobStatus::DstTooSmall)
            } else {
                Ok(StreamOutput {
                    bytes: 0,
                    consumed: pos as u32,
                    ended: false,
                })
            };
        };
        // Whole bytes still in the bit buffer go back to the input; the
        // bits of a started byte are kept for the next piece (or, after the
        // last block, are padding before the trailer).
        let back = stop.unused / 8;
        let resume = stop.read.checked_sub(back).ok_or(JobStatus::EngineError)?;
        let bits = (stop.unused % 8) as u8;
        if ended || bits == 0 {
            (c.bits, c.bit_value) = (0, 0);
        } else {
            let byte = *input
                .get(resume.checked_sub(1).ok_or(JobStatus::EngineError)?)
                .ok_or(JobStatus::EngineError)?;
            (c.bits, c.bit_value) = (bits, byte >> (8 - bits));
        }
        written = stop.written;
        c.saw(&dst[..written]);
        c.packed += resume as u64;
        pos += resume;
        if ended {
            c.flags |= s::FLAG_DEFLATE_DONE;
        }
    }
    let mut ended = false;
    if c.has(s::FLAG_DEFLATE_DONE) {
        let trailer = &src[pos..];
        let need = match c.format {
            Format::Deflate => 0,
            Format::Zlib => 4,
            Format::Gzip => 8,
        };
        if trailer.len() >= need {
            let ok = match c.format {
                Format::Deflate => true,
                Format::Zlib => trailer[..4] == c.check.to_be_bytes(),
                Format::Gzip => {
                    trailer[..4] == c.check.to_le_bytes()
                        && trailer[4..8] == (c.plain as u32).to_le_bytes()
                }
            };
            if !ok {
                return Err(JobStatus::CorruptInput);
            }
            pos += need;
            c.packed += need as u64;
            c.flags |= s::FLAG_ENDED;
            ended = true;
        }
    }
    Ok(StreamOutput {
        bytes: written as u32,
        consumed: pos as u32,
        ended,
    })
}

#[cfg(test)]
mod tests {

    use super::*;

    fn corpus(len: usize, seed: u32) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        let mut x = seed | 1;
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let word = ["alpha ", "beta ", "gamma ", "delta\n", "epsilon "][(x % 5) as usize];
            v.extend_from_slice(word.as_bytes());
            if x.is_multiple_of(7) {
                v.push((x >> 8) as u8);
            }
        }
        v.truncate(len);
        v
    }

    fn param(format: Format, level: u64, flush: u64, start: bool) -> u64 {
        format.code()
            | level << s::LEVEL_SHIFT
            | flush << s::FLUSH_SHIFT
            | if start { s::START } else { 0 }
    }

    /// Compresses `data` in pieces of `piece`, with `flush` between pieces.
    fn compress(format: Format, data: &[u8], piece: usize, flush: u64) -> Vec<u8> {
        let mut ctx = vec![0u8; s::CTX_SIZE as usize];
        let mut out = Vec::new();
        let pieces: Vec<&[u8]> = data.chunks(piece).collect();
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let f = if last { s::FLUSH_FINISH } else { flush };
            let mut dst = vec![0u8; p.len() + p.len() / 8 + 256];
            let r = run(
                Opcode::StreamCompress,
                p,
                &mut dst,
                &mut ctx,
                param(format, 6, f, i == 0),
            )
            .unwrap();
            assert_eq!((r.consumed as usize, r.ended), (p.len(), last));
            out.extend_from_slice(&dst[..r.bytes as usize]);
        }
        out
    }

    /// Decompresses `packed` feeding at most `piece` input bytes and `room`
    /// output bytes per job; returns (output, input consumed, ended).
    fn decompress(
        format: Format,
        packed: &[u8],
        piece: usize,
        room: usize,
    ) -> (Vec<u8>, usize, bool) {
        let mut ctx = vec![0u8; s::CTX_SIZE as usize];
        let (mut out, mut at, mut first) = (Vec::new(), 0, true);
        let (mut piece, mut room) = (piece, room);
        for _ in 0..1_000_000 {
            let end = (at + piece).min(packed.len());
            let mut dst = vec![0u8; room];
            let r = match run(
                Opcode::StreamDecompress,
                &packed[at..end],
                &mut dst,
                &mut ctx,
                param(format, 0, 0, first),
            ) {
                // A block that decodes to more than `room`: the context is
                // unchanged, so the same piece goes again with more room.
                Err(JobStatus::DstTooSmall) => {
                    room *= 2;
                    continue;
                }
                r => r.unwrap(),
            };
            first = false;
            out.extend_from_slice(&dst[..r.bytes as usize]);
            at += r.consumed as usize;
            if r.ended {
                return (out, at, true);
            }
            if r.consumed == 0 && r.bytes == 0 {
                if end == packed.len() {
                    return (out, at, false);
                }
                // A block longer than the piece: give it more input.
                piece *= 2;
            }
        }
        panic!("no progress");
    }

    #[test]
    fn pieces_compress_into_one_stream_flate2_decodes() {
        let data = corpus(700_000, 7);
        for format in Format::ALL {
            for flush in [s::FLUSH_SYNC, s::FLUSH_FULL] {
                let packed = compress(format, &data, 100_003, flush);
                assert_eq!(
                    crate::accel::reference::decode(format, &packed),
                    data,
                    "{format:?}"
                );
                assert!(packed.len() < data.len() / 2);
            }
        }
    }

    #[test]
    fn a_job_compressed_in_slices_is_one_stream_and_yields_between_them() {
        let data = corpus(300_000, 5);
        for format in Format::ALL {
            for level in [1, 9, 12] {
                let mut dst = vec![0u8; data.len() + 1024];
                let mut yields = 0;
                let n =
                    compress_in_slices(format, level, &data, &mut dst, 65536, &mut || yields += 1)
                        .unwrap() as usize;
                // 300,000 bytes are five pieces of 64 KiB: four stops between.
                assert_eq!(yields, 4, "{format:?}");
                assert_eq!(
                    crate::accel::reference::decode(format, &dst[..n]),
                    data,
                    "{format:?} L{level}"
                );
                assert!(n < data.len() / 2, "{format:?} L{level}: {n}");
                // The same input gives the same bytes (no timing in it).
                let mut again = vec![0u8; dst.len()];
                let m = compress_in_slices(format, level, &data, &mut again, 65536, &mut || {})
                    .unwrap() as usize;
                assert_eq!(again[..m], dst[..n]);
            }
            // Too little room is the one-shot path's status.
            let mut small = vec![0u8; 1000];
            assert_eq!(
                compress_in_slices(format, 1, &data, &mut small, 65536, &mut || {}),
                Err(JobStatus::DstTooSmall)
            );
        }
    }

    #[test]
    fn flate2_streams_decompress_piece_by_piece_at_any_cut() {
        let data = corpus(300_000, 11);
        for format in Format::ALL {
            let packed = crate::accel::reference::encode(format, &data);
            for (piece, room) in [
                (1 << 20, 1 << 20),
                (4096, 1 << 20),
                (1000, 64 * 1024),
                (333, 200_000),
            ] {
                let (out, used, ended) = decompress(format, &packed, piece, room);
                assert!(ended, "{format:?} {piece}/{room}");
                assert_eq!(used, packed.len());
                assert_eq!(out, data, "{format:?} {piece}/{room}");
            }
        }
    }

    #[test]
    fn a_concatenated_gzip_member_ends_the_stream_where_it_ends() {
        let (a, b) = (corpus(50_000, 1), corpus(40_000, 2));
        let (pa, pb) = (
            crate::accel::reference::encode(Format::Gzip, &a),
            crate::accel::reference::encode(Format::Gzip, &b),
        );
        let both = [pa.clone(), pb.clone()].concat();
        let (out, used, ended) = decompress(Format::Gzip, &both, 1 << 20, 1 << 20);
        assert_eq!((out, used, ended), (a, pa.len(), true));
        let (out, used, _) = decompress(Format::Gzip, &both[pa.len()..], 1 << 20, 1 << 20);
        assert_eq!((out, used), (b, pb.len()));
    }

    #[test]
    fn bad_contexts_and_corrupt_data_are_refused_and_change_nothing() {
        let mut ctx = vec![0u8; s::CTX_SIZE as usize];
        let mut dst = vec![0u8; 1024];
        let p = |f: Format, st| param(f, 1, s::FLUSH_SYNC, st);
        // No START on an empty context.
        assert_eq!(
            run(
                Opcode::StreamCompress,
                b"x",
                &mut dst,
                &mut ctx,
                p(Format::Zlib, false)
            ),
            Err(JobStatus::CorruptInput)
        );
        run(
            Opcode::StreamCompress,
            b"x",
            &mut dst,
            &mut ctx,
            p(Format::Zlib, true),
        )
        .unwrap();
        let good = ctx.clone();
        // Another format, the other direction.
        for (op, f) in [
            (Opcode::StreamCompress, Format::Gzip),
            (Opcode::StreamDecompress, Format::Zlib),
        ] {
            assert_eq!(
                run(op, b"x", &mut dst, &mut ctx, f.code()),
                Err(JobStatus::CorruptInput)
            );
        }
        // Damage anywhere in the header.
        for at in [0usize, 5, 6, 8, 11, 33, 40] {
            let mut broken = good.clone();
            broken[at] ^= 0x80;
            assert_eq!(
                run(
                    Opcode::StreamCompress,
                    b"x",
                    &mut dst,
                    &mut broken,
                    p(Format::Zlib, false)
                ),
                Err(JobStatus::CorruptInput),
                "byte {at}"
            );
        }
        // Reserved param bits, level 10, flush 3, format 3.
        for bad in [1 << 20, 10 << s::LEVEL_SHIFT, 3 << s::FLUSH_SHIFT, 3] {
            assert_eq!(
                run(
                    Opcode::StreamCompress,
                    b"x",
                    &mut dst,
                    &mut ctx,
                    bad | s::START
                ),
                Err(JobStatus::ReservedNonZero)
            );
        }
        assert_eq!(
            run(
                Opcode::StreamDecompress,
                b"x",
                &mut dst,
                &mut ctx,
                s::FLUSH_FULL << s::FLUSH_SHIFT
            ),
            Err(JobStatus::ReservedNonZero)
        );
        // Corrupt data and a bad trailer.
        let mut packed = crate::accel::reference::encode(Format::Gzip, &corpus(10_000, 3));
        let last = packed.len() - 5;
        packed[last] ^= 1;
        let mut ctx = vec![0u8; s::CTX_SIZE as usize];
        let mut big = vec![0u8; 20_000];
        assert_eq!(
            run(
                Opcode::StreamDecompress,
                &packed,
                &mut big,
                &mut ctx,
                Format::Gzip.code() | s::START
            ),
            Err(JobStatus::CorruptInput)
        );
        assert_eq!(ctx, vec![0u8; s::CTX_SIZE as usize], "context untouched");
        // An ended stream takes no more pieces without START.
        let packed = compress(Format::Zlib, b"tiny", 10, s::FLUSH_SYNC);
        let mut ctx = vec![0u8; s::CTX_SIZE as usize];
        let r = run(
            Opcode::StreamDecompress,
            &packed,
            &mut big,
            &mut ctx,
            Format::Zlib.code() | s::START,
        )
        .unwrap();
        assert!(r.ended);
        assert_eq!(
            run(
                Opcode::StreamDecompress,
                &packed,
                &mut big,
                &mut ctx,
                Format::Zlib.code()
            ),
            Err(JobStatus::CorruptInput)
        );
    }

    #[test]
    fn incompressible_pieces_fit_nine_eighths_plus_256() {
        let mut x = 0x1234_5678u32;
        let noise: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for format in Format::ALL {
            for level in [1, 9] {
                let mut ctx = vec![0u8; s::CTX_SIZE as usize];
                let mut out = Vec::new();
                for (i, p) in noise.chunks(100_000).enumerate() {
                    let mut dst = vec![0u8; p.len() * 9 / 8 + 256];
                    let flush = if i == 2 {
                        s::FLUSH_FINISH
                    } else {
                        s::FLUSH_SYNC
                    };
                    let r = run(
                        Opcode::StreamCompress,
                        p,
                        &mut dst,
                        &mut ctx,
                        param(format, level, flush, i == 0),
                    )
                    .unwrap();
                    out.extend_from_slice(&dst[..r.bytes as usize]);
                }
                assert_eq!(crate::accel::reference::decode(format, &out), noise);
            }
        }
    }

    #[test]
    fn a_zlib_header_asking_for_a_dictionary_is_refused() {
        let mut ctx = vec![0u8; s::CTX_SIZE as usize];
        let mut dst = vec![0u8; 64];
        // FDICT set, FCHECK good: (0x7820 % 31 == 0).
        let with_dict = [0x78, 0x20, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            run(
                Opcode::StreamDecompress,
                &with_dict,
                &mut dst,
                &mut ctx,
                Format::Zlib.code() | s::START
            ),
            Err(JobStatus::CorruptInput)
        );
    }

    #[test]
    fn output_too_small_for_one_block_is_dst_too_small() {
        let data = corpus(100_000, 5);
        let packed = crate::accel::reference::encode(Format::Deflate, &data);
        let mut ctx = vec![0u8; s::CTX_SIZE as usize];
        let mut dst = vec![0u8; 100];
        assert_eq!(
            run(
                Opcode::StreamDecompress,
                &packed,
                &mut dst,
                &mut ctx,
                s::START
            ),
            Err(JobStatus::DstTooSmall)
        );
        let mut ctx = vec![0u8; s::CTX_SIZE as usize];
        assert_eq!(
            run(Opcode::StreamCompress, &data, &mut dst, &mut ctx, s::START),
            Err(JobStatus::DstTooSmall)
        );
    }
}
