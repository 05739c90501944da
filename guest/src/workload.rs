//! What the guest tool runs, written against the driver core only so that
//! it can be tested on the fake device: deterministic test data, the `run`
//! job mix with verification, and the `garbage` register fuzzer. Results are
//! JSON values; the tool prints them as one `WDVIRT-RESULT {json}` line.

use std::time::Instant;

use serde_json::{Value, json};
use sha2::Digest;
use wdvirt_abi::{Opcode, pci, regs};

use crate::device::Device;
use crate::dma::DmaMemory;
use crate::error::DriverError;
use crate::jobs::Format;
use crate::mmio::{Mmio, MmioError};
use crate::queue::Queue;
use crate::stream::{StreamCompressor, StreamDecompressor};

/// xorshift64*: small, deterministic, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Never zero (xorshift's fixed point); spread small seeds.
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

const WORDS: [&str; 24] = [
    "accelerator",
    "queue",
    "doorbell",
    "completion",
    "submission",
    "phase",
    "guest",
    "host",
    "vfio",
    "user",
    "deflate",
    "zlib",
    "gzip",
    "crc32c",
    "sha256",
    "copy",
    "fill",
    "compare",
    "ring",
    "index",
    "device",
    "memory",
    "page",
    "batch",
];

/// `len` bytes of text-like data from `seed`: words, numbers and now and then
/// a short run of random bytes. Compresses to roughly a third. The same
/// bytes as [`DataGen`] makes piece by piece.
pub fn gen_data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 32);
    DataGen::new(seed).fill(&mut v, len);
    v
}

/// [`gen_data`]'s bytes a piece at a time, for data larger than memory:
/// `gen_data(seed, a + b)` is `fill(a)` then `fill(b)`.
#[derive(Clone, Debug)]
pub struct DataGen {
    rng: Rng,
    /// Made by the last item, past the end of the last fill.
    carry: Vec<u8>,
}

impl DataGen {
    pub fn new(seed: u64) -> Self {
        DataGen {
            rng: Rng::new(seed),
            carry: Vec::new(),
        }
    }

    /// Appends the next `len` bytes to `out`.
    pub fn fill(&mut self, out: &mut Vec<u8>, len: usize) {
        let end = out.len() + len;
        let take = self.carry.len().min(len);
        out.extend(self.carry.drain(..take));
        let r = &mut self.rng;
        while out.len() < end {
            match r.below(16) {
                0 => {
                    for _ in 0..r.below(12) {
                        out.push(r.next_u64() as u8);
                    }
                }
                1 => out.extend_from_slice(format!("{} ", r.below(100_000)).as_bytes()),
                2 => out.push(b'\n'),
                _ => {
                    out.extend_from_slice(WORDS[r.below(WORDS.len() as u64) as usize].as_bytes());
                    out.push(b' ');
                }
            }
        }
        if out.len() > end {
            self.carry.extend_from_slice(&out[end..]);
            out.truncate(end);
        }
    }
}

/// One entry of `run --jobs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    Compress(Format),
    /// One stream of the whole input through stream pieces (ABI 1.1).
    Stream(Format),
    Crc32c,
    Sha256,
    Copy,
    Fill,
    Compare,
}

impl JobKind {
    pub fn parse(name: &str) -> Option<JobKind> {
        Some(match name {
            "crc32c" => JobKind::Crc32c,
            "sha256" => JobKind::Sha256,
            "copy" => JobKind::Copy,
            "fill" => JobKind::Fill,
            "compare" => JobKind::Compare,
            other => match other.strip_prefix("stream-") {
                Some(f) => JobKind::Stream(Format::from_name(f)?),
                None => JobKind::Compress(Format::from_name(other)?),
            },
        })
    }
    pub fn parse_list(list: &str) -> Result<Vec<JobKind>, String> {
        let kinds: Result<Vec<_>, String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                JobKind::parse(s).ok_or(format!(
                    "unknown job {s:?} (known: {})",
                    Self::NAMES.join(",")
                ))
            })
            .collect();
        match kinds {
            Ok(k) if k.is_empty() => Err("empty job list".into()),
            other => other,
        }
    }
    pub const NAMES: [&'static str; 11] = [
        "deflate",
        "zlib",
        "gzip",
        "crc32c",
        "sha256",
        "copy",
        "fill",
        "compare",
        "stream-deflate",
        "stream-zlib",
        "stream-gzip",
    ];
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Compress(f) => f.name(),
            JobKind::Stream(Format::Deflate) => "stream-deflate",
            JobKind::Stream(Format::Zlib) => "stream-zlib",
            JobKind::Stream(Format::Gzip) => "stream-gzip",
            JobKind::Crc32c => "crc32c",
            JobKind::Sha256 => "sha256",
            JobKind::Copy => "copy",
            JobKind::Fill => "fill",
            JobKind::Compare => "compare",
        }
    }
    /// Opcodes a queue needs for this job.
    pub fn ops_mask(self) -> u32 {
        match self {
            JobKind::Compress(f) => f.compress_op().bit() | f.decompress_op().bit(),
            JobKind::Stream(_) => Opcode::StreamCompress.bit() | Opcode::StreamDecompress.bit(),
            JobKind::Crc32c => Opcode::Crc32c.bit(),
            JobKind::Sha256 => Opcode::Sha256.bit(),
            JobKind::Copy => Opcode::Copy.bit(),
            JobKind::Fill => Opcode::Fill.bit(),
            JobKind::Compare => Opcode::Compare.bit(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    pub jobs: Vec<JobKind>,
    /// Bytes of input per job kind.
    pub size: usize,
    pub seed: u64,
    /// Compression level (0 = device default).
    pub level: u32,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the container framing of a compressed stream (RFC 1950 header
/// check, RFC 1952 magic); raw deflate has none to check.
fn framing_ok(format: Format, stream: &[u8]) -> bool {
    match format {
        Format::Deflate => !stream.is_empty(),
        Format::Zlib => {
            stream.len() >= 6
                && stream[0] & 0x0f == 8
                && (u16::from(stream[0]) << 8 | u16::from(stream[1])) % 31 == 0
        }
        Format::Gzip => stream.len() >= 18 && stream[..3] == [0x1f, 0x8b, 8],
    }
}

/// Largest chunk for the split job kinds: `MAX_XFER`, or less when the
/// largest free DMA piece cannot hold a chunk's compressed output (2 MiB
/// hugepages against a large `MAX_XFER`).
fn chunk_limit<M: Mmio, D: DmaMemory>(q: &Queue<M, D>) -> usize {
    let largest = q.pool().largest_free() as usize;
    // compress_bound(n) = n + n/8 + 128 must fit: n <= (largest - 128) * 8 / 9.
    let fits = largest.saturating_sub(128) / 9 * 8;
    (q.max_xfer() as usize).min(fits).max(1)
}

/// One job kind's outcome: `Ok(fields)` or an error message.
fn run_one<M: Mmio, D: DmaMemory>(
    q: &mut Queue<M, D>,
    kind: JobKind,
    data: &[u8],
    opts: &RunOptions,
) -> Result<serde_json::Map<String, Value>, DriverError> {
    let max = chunk_limit(q);
    let mut out = serde_json::Map::new();
    let verified = match kind {
        JobKind::Compress(f) => {
            let streams = q.compress_chunks(f, opts.level, data, max)?;
            let framed = streams.iter().all(|s| framing_ok(f, s));
            let refs: Vec<&[u8]> = streams.iter().map(Vec::as_slice).collect();
            let caps: Vec<usize> = data.chunks(max).map(<[u8]>::len).collect();
            let back = q.run_staged(f.decompress_op(), 0, &refs, &caps)?.concat();
            let compressed: usize = streams.iter().map(Vec::len).sum();
            let mut streams_hash = sha2::Sha256::new();
            streams.iter().for_each(|s| streams_hash.update(s));
            out.insert("compressed".into(), json!(compressed));
            out.insert("chunks".into(), json!(streams.len()));
            // Enough for the host to recompute the exact output: the input
            // is cut into `chunk_bytes` pieces, each its own stream.
            out.insert("chunk_bytes".into(), json!(max));
            out.insert(
                "streams_sha256".into(),
                json!(hex(&streams_hash.finalize())),
            );
            out.insert("framing_ok".into(), json!(framed));
            out.insert("roundtrip_ok".into(), json!(back == data));
            framed && back == data
        }
        JobKind::Stream(f) => {
            let (fields, verified) = run_stream(q, f, opts, max)?;
            out.extend(fields);
            verified
        }
        JobKind::Crc32c => {
            let v = q.crc32c(data)?;
            let want = crate::crc::crc32c(data);
            out.insert("crc32c".into(), json!(format!("{v:08x}")));
            out.insert("expected".into(), json!(format!("{want:08x}")));
            v == want
        }
        JobKind::Sha256 => {
            let v = q.sha256(data)?;
            let want = sha2::Sha256::digest(data);
            out.insert("sha256".into(), json!(hex(&v)));
            out.insert("expected".into(), json!(hex(&want)));
            v[..] == want[..]
        }
        JobKind::Copy => {
            let pieces: Vec<&[u8]> = data.chunks(max).collect();
            let caps: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
            let copy = q.run_staged(Opcode::Copy, 0, &pieces, &caps)?.concat();
            copy == data
        }
        JobKind::Fill => {
            let pattern = (opts.seed as u8) ^ 0x5a;
            let caps: Vec<usize> = (0..data.len())
                .step_by(max)
                .map(|o| (data.len() - o).min(max))
                .collect();
            let empties = vec![&[][..]; caps.len()];
            let filled = q
                .run_staged(Opcode::Fill, u64::from(pattern), &empties, &caps)?
                .concat();
            out.insert("pattern".into(), json!(pattern));
            filled.len() == data.len() && filled.iter().all(|&b| b == pattern)
        }
        JobKind::Compare => {
            let same = q.compare(data, data)?;
            let mut other = data.to_vec();
            let at = Rng::new(opts.seed ^ 0xc0).below(data.len() as u64) as usize;
            if let Some(b) = other.get_mut(at) {
                *b ^= 0x80;
            }
            let diff = q.compare(data, &other)?;
            out.insert("equal_result".into(), json!(same));
            out.insert("diff_at".into(), json!(at));
            out.insert("diff_result".into(), json!(diff));
            same.is_none() && (data.is_empty() || diff == Some(at as u32))
        }
    };
    out.insert("ok".into(), json!(verified));
    Ok(out)
}

/// A `stream-*` job: one stream of `opts.size` bytes, made piece by piece
/// from the seed ([`DataGen`]) so that its size is not bounded by the
/// guest's memory. Each piece is compressed with the context carried, and
/// its output goes straight to the decompressor; SHA-256s of the input, the
/// compressed stream and the decompressed output are taken on the fly. The
/// host can recompute all three from the seed, size, level and piece size.
fn run_stream<M: Mmio, D: DmaMemory>(
    q: &mut Queue<M, D>,
    format: Format,
    opts: &RunOptions,
    max: usize,
) -> Result<(serde_json::Map<String, Value>, bool), DriverError> {
    let level = opts.level.min(wdvirt_abi::stream::MAX_LEVEL as u32);
    let mut comp = StreamCompressor::new(q, format, level, max)?;
    let mut dec = StreamDecompressor::new(q, format)?;
    let piece = comp.piece_len();
    let mut data = DataGen::new(opts.seed);
    let (mut input_hash, mut stream_hash, mut output_hash) = (
        sha2::Sha256::new(),
        sha2::Sha256::new(),
        sha2::Sha256::new(),
    );
    // The stream's first bytes, for the framing check.
    let mut head = Vec::new();
    let (mut compressed, mut produced, mut pieces) = (0usize, 0usize, 0usize);
    let mut sink = |b: &[u8]| {
        output_hash.update(b);
        produced += b.len();
    };
    let mut buf = Vec::with_capacity(piece);
    let mut left = opts.size;
    loop {
        let n = left.min(piece);
        left -= n;
        buf.clear();
        data.fill(&mut buf, n);
        input_hash.update(&buf);
        let packed = comp.push(q, &buf, left == 0)?;
        pieces += 1;
        stream_hash.update(&packed);
        compressed += packed.len();
        let want = 18usize.saturating_sub(head.len()).min(packed.len());
        head.extend_from_slice(&packed[..want]);
        dec.push(q, &packed, &mut sink)?;
        if left == 0 {
            break;
        }
    }
    let used = dec.finish(q, &mut sink)?;
    let (input, output) = (input_hash.finalize(), output_hash.finalize());
    let framed = framing_ok(format, &head);
    let round_trip = produced == opts.size && input == output;
    let mut out = serde_json::Map::new();
    out.insert("level".into(), json!(level));
    out.insert("piece_bytes".into(), json!(piece));
    out.insert("pieces".into(), json!(pieces));
    out.insert("compressed".into(), json!(compressed));
    out.insert("stream_sha256".into(), json!(hex(&stream_hash.finalize())));
    out.insert("input_sha256".into(), json!(hex(&input)));
    out.insert("output_sha256".into(), json!(hex(&output)));
    out.insert("output_bytes".into(), json!(produced));
    out.insert("framing_ok".into(), json!(framed));
    out.insert("consumed_all".into(), json!(used == compressed));
    out.insert("roundtrip_ok".into(), json!(round_trip));
    Ok((out, framed && used == compressed && round_trip))
}

/// Runs every job kind in `opts` on `q`, verifying each result, and returns
/// the JSON report: per-job results and totals (device jobs, input bytes).
pub fn run<M: Mmio, D: DmaMemory>(q: &mut Queue<M, D>, opts: &RunOptions) -> Value {
    // Stream jobs make their input piece by piece; the others need it whole.
    let whole = opts.jobs.iter().any(|k| !matches!(k, JobKind::Stream(_)));
    let data = if whole {
        gen_data(opts.seed, opts.size)
    } else {
        Vec::new()
    };
    let mut results = Vec::new();
    let (mut ok, mut failed, mut bytes) = (0u32, 0u32, 0u64);
    let jobs_before = q.counters().0;
    for &kind in &opts.jobs {
        let start = Instant::now();
        let mut entry = match run_one(q, kind, &data, opts) {
            Ok(m) => m,
            Err(e) => {
                // A timed-out queue still has jobs in flight; later kinds would
                // fail with NotIdle. Say so plainly and go on.
                let mut m = serde_json::Map::new();
                m.insert("ok".into(), json!(false));
                m.insert("error".into(), json!(e.to_string()));
                m
            }
        };
        let passed = entry.get("ok") == Some(&json!(true));
        if passed {
            ok += 1;
            bytes += opts.size as u64;
        } else {
            failed += 1;
        }
        entry.insert("job".into(), json!(kind.name()));
        entry.insert("bytes".into(), json!(opts.size));
        entry.insert("micros".into(), json!(start.elapsed().as_micros() as u64));
        results.push(Value::Object(entry));
    }
    let device_jobs = q.counters().0.wrapping_sub(jobs_before);
    json!({
        "mode": "run",
        "ok": failed == 0,
        "size": opts.size,
        "seed": opts.seed,
        "queue": { "index": q.index(), "depth": q.depth() },
        "results": results,
        "totals": { "jobs": opts.jobs.len(), "ok": ok, "failed": failed, "device_jobs": device_jobs, "bytes": bytes },
    })
}

/// Byte-granular access to BAR0 for the fuzzer (an mmapped `resource0`
/// allows 1-, 2- and 4-byte accesses; [`Mmio`] only 4).
pub trait RawBar {
    fn read(&self, offset: u64, width: u8) -> Result<u32, MmioError>;
    fn write(&self, offset: u64, width: u8, value: u32) -> Result<(), MmioError>;
}

/// The accesses the fuzzer makes stay below the MSI-X table: the registers.
pub const GARBAGE_LIMIT: u64 = pci::MSIX_TABLE_OFFSET as u64;

/// Clears `Q_CTRL_ENABLE` from a write that covers byte 0 of some queue's
/// `Q_CTRL`: a random ring address inside guest RAM would let the device
/// write completions over the guest kernel.
pub fn defang(offset: u64, width: u8, value: u32) -> u32 {
    let base = u64::from(regs::QUEUE_BASE);
    let stride = u64::from(regs::QUEUE_STRIDE);
    let ctrl = u64::from(regs::Q_CTRL);
    for b in 0..u64::from(width) {
        let a = offset + b;
        if a >= base && (a - base) % stride == ctrl {
            return value & !((regs::Q_CTRL_ENABLE) << (8 * b));
        }
    }
    value
}

/// How many accesses [`garbage`] makes between asks whether to go on.
pub const GARBAGE_ROUND: u32 = 1000;

/// `count` random BAR0 accesses (offsets below [`GARBAGE_LIMIT`], widths
/// from `widths`, random values), then rounds of [`GARBAGE_ROUND`] more for
/// as long as `go_on` says so (asked after the `count`th and after each
/// round), then the device's error registers, a device reset and a check
/// that it still answers. Returns the JSON report.
pub fn garbage<M: Mmio>(
    dev: &Device<M>,
    bar: &dyn RawBar,
    count: u32,
    seed: u64,
    widths: &[u8],
    go_on: &mut dyn FnMut() -> bool,
) -> Value {
    let mut r = Rng::new(seed);
    let (mut reads, mut writes, mut failures) = (0u32, 0u32, 0u32);
    let widths = if widths.is_empty() {
        &[4u8][..]
    } else {
        widths
    };
    let (mut done, mut until) = (0u32, count);
    loop {
        if done == until {
            match until.checked_add(GARBAGE_ROUND) {
                Some(more) if go_on() => until = more,
                _ => break,
            }
        }
        done += 1;
        let width = widths[r.below(widths.len() as u64) as usize];
        // Naturally aligned: an unaligned access through a mapping is not
        // something Rust can express; the device still sees sub-register widths.
        let offset = r.below(GARBAGE_LIMIT / u64::from(width)) * u64::from(width);
        let res = if r.below(2) == 0 {
            reads += 1;
            bar.read(offset, width).map(|_| ())
        } else {
            writes += 1;
            let value = defang(offset, width, r.next_u64() as u32);
            bar.write(offset, width, value)
        };
        if res.is_err() {
            failures += 1;
        }
    }
    let fault = dev.last_register_error();
    let err_count = dev.register_error_count();
    let reset = dev.reset();
    let id = dev.mmio().read32(pci::BAR_CONTROL, u64::from(regs::ID));
    let id_ok = matches!(id, Ok(regs::ID_MAGIC));
    let (latched, code, name, offset) = match &fault {
        Ok(Some(f)) => (
            true,
            f.code,
            f.error().map_or("unknown", |e| e.name()),
            f.offset,
        ),
        _ => (false, 0, "none", 0),
    };
    json!({
        "mode": "garbage",
        "ok": id_ok && reset.is_ok() && fault.is_ok(),
        "seed": seed,
        "accesses": done,
        "reads": reads,
        "writes": writes,
        "access_failures": failures,
        "err_latched": latched,
        "err_code": code,
        "err_name": name,
        "err_offset": offset,
        "err_count": err_count.ok(),
        "reset_ok": reset.is_ok(),
        "id_after": id.ok(),
    })
}

#[cfg(test)]
mod tests {
    use wdvirt_abi::ALL_OPS;

    use super::*;
    use crate::fake::{self, FakeDevice, Mode};

    impl RawBar for FakeDevice {
        fn read(&self, offset: u64, width: u8) -> Result<u32, MmioError> {
            if width != 4 {
                return Err(MmioError::Unaligned {
                    bar: 0,
                    offset,
                    width,
                });
            }
            self.read32(0, offset)
        }
        fn write(&self, offset: u64, width: u8, value: u32) -> Result<(), MmioError> {
            if width != 4 {
                return Err(MmioError::Unaligned {
                    bar: 0,
                    offset,
                    width,
                });
            }
            self.write32(0, offset, value)
        }
    }

    #[test]
    fn data_is_deterministic_and_compressible_looking() {
        let a = gen_data(7, 10_000);
        assert_eq!(a, gen_data(7, 10_000));
        assert_ne!(a, gen_data(8, 10_000));
        assert_eq!(a.len(), 10_000);
        let spaces = a.iter().filter(|&&b| b == b' ').count();
        assert!(spaces > 500, "text-like: {spaces} spaces");
        assert_eq!(gen_data(1, 0), Vec::<u8>::new());
    }

    #[test]
    fn data_made_piece_by_piece_is_the_same_bytes() {
        let whole = gen_data(5, 200_000);
        // Pieces cut inside items, a piece smaller than an item, empty pieces.
        for sizes in [&[1usize, 2, 3, 0, 99_994, 100_000][..], &[7; 200_000 / 7]] {
            let mut g = DataGen::new(5);
            let mut v = Vec::new();
            for &n in sizes {
                let before = v.len();
                g.fill(&mut v, n);
                assert_eq!(v.len(), before + n);
            }
            assert!(v[..] == whole[..v.len()], "{} bytes", v.len());
        }
    }

    #[test]
    fn job_lists_parse_and_refuse_unknown_names() {
        assert_eq!(
            JobKind::parse_list("gzip, crc32c,fill").unwrap(),
            vec![
                JobKind::Compress(Format::Gzip),
                JobKind::Crc32c,
                JobKind::Fill
            ]
        );
        for n in JobKind::NAMES {
            assert_eq!(JobKind::parse(n).unwrap().name(), n);
        }
        assert!(
            JobKind::parse_list("crc32c,lz4")
                .unwrap_err()
                .contains("lz4")
        );
        assert!(JobKind::parse_list(",").is_err());
    }

    #[test]
    fn framing_checks_know_the_headers() {
        assert!(framing_ok(Format::Zlib, &[0x78, 0x9c, 3, 0, 0, 0, 0, 1]));
        assert!(!framing_ok(Format::Zlib, &[0x78, 0x9d, 3, 0, 0, 0, 0, 1]));
        let mut gz = vec![0x1f, 0x8b, 8];
        gz.resize(20, 0);
        assert!(framing_ok(Format::Gzip, &gz));
        gz[1] = 0;
        assert!(!framing_ok(Format::Gzip, &gz));
    }

    #[test]
    fn run_verifies_every_kind_the_fake_can_do() {
        let (_f, d, pool) = fake::setup(Mode::Reverse);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let opts = RunOptions {
            jobs: JobKind::parse_list("crc32c,copy,fill,compare").unwrap(),
            // Over MAX_XFER: every kind splits into jobs.
            size: fake::MAX_XFER as usize + 1000,
            seed: 3,
            level: 0,
        };
        let v = run(&mut q, &opts);
        let res = v["results"].as_array().unwrap();
        assert_eq!(res[0]["job"], "crc32c");
        assert_eq!(res[0]["crc32c"], res[0]["expected"], "{v}");
        for r in res {
            assert_eq!(r["ok"], true, "{v}");
        }
        assert_eq!(v["totals"]["failed"], 0);
        // The second compare stops at the piece that differs.
        let diff_at = res[3]["diff_at"].as_u64().unwrap();
        let diff_jobs = if diff_at < u64::from(fake::MAX_XFER) {
            1
        } else {
            2
        };
        assert_eq!(
            v["totals"]["device_jobs"],
            8 + diff_jobs,
            "2 CRC32C, 2 copy, 2 fill, 2 + {diff_jobs} compare jobs"
        );
        assert_eq!(v["ok"], true);

        let small = RunOptions { size: 3000, ..opts };
        let v = run(&mut q, &small);
        assert_eq!(v["ok"], true, "{v}");
        let res = v["results"].as_array().unwrap();
        assert_eq!(res[0]["crc32c"], res[0]["expected"]);
        assert_eq!(res[3]["equal_result"], Value::Null);
        assert_eq!(res[3]["diff_result"], res[3]["diff_at"]);
        assert_eq!(v["totals"]["bytes"], 4 * 3000);
    }

    #[test]
    fn run_reports_a_failing_engine_as_not_ok() {
        let (_f, d, pool) = fake::setup(Mode::InOrder);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let opts = RunOptions {
            jobs: vec![JobKind::Compress(Format::Deflate)],
            size: 100,
            seed: 1,
            level: 1,
        };
        let v = run(&mut q, &opts);
        assert_eq!(v["ok"], false);
        assert!(
            v["results"][0]["error"]
                .as_str()
                .unwrap()
                .contains("EngineError")
        );
    }

    #[test]
    fn defang_clears_only_the_enable_bit_of_q_ctrl() {
        let ctrl = u64::from(regs::queue(3) + regs::Q_CTRL);
        assert_eq!(defang(ctrl, 4, 0xffff_ffff), 0xffff_fffe);
        assert_eq!(defang(ctrl - 1, 4, 0xffff_ffff), 0xffff_feff);
        assert_eq!(defang(ctrl - 3, 4, 0xffff_ffff), 0xfeff_ffff);
        assert_eq!(defang(ctrl + 1, 1, 0xff), 0xff);
        assert_eq!(defang(ctrl - 4, 4, 0xffff_ffff), 0xffff_ffff);
        assert_eq!(defang(u64::from(regs::DEV_CTRL), 4, 3), 3);
    }

    #[test]
    fn garbage_latches_errors_and_leaves_the_device_sane() {
        let (f, d, _pool) = fake::setup(Mode::InOrder);
        let v = garbage(&d, &*f, 300, 11, &[4], &mut || false);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["accesses"], 300);
        assert_eq!(
            v["reads"].as_u64().unwrap() + v["writes"].as_u64().unwrap(),
            300
        );
        assert_eq!(v["id_after"], regs::ID_MAGIC);
        assert_eq!(v["err_latched"], true, "{v}");
        assert!(v["err_count"].as_u64().unwrap() > 0, "{v}");
        assert!(!f.queue_enabled(0) && !f.queue_enabled(1));
        assert_eq!(
            v,
            garbage(&d, &*f, 300, 11, &[4], &mut || false),
            "deterministic for a seed"
        );
        // Told to go on twice: two more rounds, then asked a third time.
        let mut asked = 0;
        let v = garbage(&d, &*f, 300, 11, &[4], &mut || {
            asked += 1;
            asked <= 2
        });
        assert_eq!(asked, 3);
        assert_eq!(v["accesses"], 300 + 2 * GARBAGE_ROUND);
        // Unsupported widths count as access failures, not crashes.
        let v = garbage(&d, &*f, 50, 2, &[1, 2], &mut || false);
        assert_eq!(v["access_failures"], 50);
    }
}
