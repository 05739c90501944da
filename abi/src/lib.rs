//! The guest-visible ABI of the wdvirt virtual accelerator, defined once.
//!
//! Both the device model (`wdvirt::vdev`) and the guest driver (`wdvirt-guest`)
//! use these constants and layouts; `docs/device-spec.md` documents them and a
//! test reads the document back against this file. Nothing here knows about
//! sockets, threads or guest memory: it is plain data.
//!
//! All multi-byte values are little-endian.
#![no_std]

/// PCI identity of a wdvirt instance.
pub mod pci {
    /// Vendor ID. 0x7764 ("wd") is not assigned by the PCI-SIG; wdvirt uses it
    /// for an experimental virtual function (see docs/device-spec.md).
    pub const VENDOR_ID: u16 = 0x7764;
    /// Device ID of the WarpDrive-style accelerator function.
    pub const DEVICE_ID: u16 = 0x0001;
    pub const SUBSYSTEM_VENDOR_ID: u16 = VENDOR_ID;
    pub const SUBSYSTEM_ID: u16 = 0x0001;
    pub const REVISION: u8 = 0x01;
    /// Class code: base 0x12 (processing accelerator), subclass 0, prog-if 0.
    pub const CLASS_CODE: u32 = 0x12_00_00;

    /// BAR0: control registers (trapped), MSI-X table and PBA.
    pub const BAR_CONTROL: u8 = 0;
    /// BAR2: doorbell pages, one 4 KiB page per queue.
    pub const BAR_DOORBELL: u8 = 2;

    /// Size of BAR0 (32-bit, non-prefetchable memory BAR).
    pub const BAR0_SIZE: u64 = 0x4000;
    /// MSI-X table inside BAR0.
    pub const MSIX_TABLE_OFFSET: u32 = 0x2000;
    /// MSI-X pending-bit array inside BAR0.
    pub const MSIX_PBA_OFFSET: u32 = 0x3000;
    /// Size of one doorbell page.
    pub const DOORBELL_STRIDE: u64 = 0x1000;
    /// Size of BAR2 for `queues` queues (a power of two, as PCI requires).
    pub const fn bar2_size(queues: u32) -> u64 {
        let bytes = (queues as u64) * DOORBELL_STRIDE;
        if bytes <= DOORBELL_STRIDE {
            DOORBELL_STRIDE
        } else {
            bytes.next_power_of_two()
        }
    }
}

/// BAR0 register map. Global registers, then one block per queue.
pub mod regs {
    /// RO. Reads [`ID_MAGIC`].
    pub const ID: u32 = 0x000;
    /// RO. ABI version, major << 16 | minor.
    pub const VERSION: u32 = 0x004;
    /// RO. Bit mask of opcodes this instance may use (`1 << opcode`).
    pub const CAP_OPS: u32 = 0x008;
    /// RO. Number of queues of this instance.
    pub const NUM_QUEUES: u32 = 0x00c;
    /// RO. Largest queue depth (a power of two).
    pub const MAX_DEPTH: u32 = 0x010;
    /// RO. Largest source or destination length of one job, in bytes.
    pub const MAX_XFER: u32 = 0x014;
    /// RW. Device control: [`DEV_CTRL_ENABLE`], [`DEV_CTRL_RESET`].
    pub const DEV_CTRL: u32 = 0x020;
    /// RO. Device status: [`DEV_STATUS_ENABLED`].
    pub const DEV_STATUS: u32 = 0x024;
    /// W1C. Bit 0 set while an access error is latched; writing 1 clears
    /// `ERR_STATUS`, `ERR_CODE` and `ERR_OFFSET`.
    pub const ERR_STATUS: u32 = 0x028;
    /// RO. [`crate::RegError`] code of the first refused access since the last clear.
    pub const ERR_CODE: u32 = 0x02c;
    /// RO. Offset of that access in its BAR (BAR0, or BAR2 for a doorbell read).
    pub const ERR_OFFSET: u32 = 0x030;
    /// RO. Refused accesses since device reset (saturating).
    pub const ERR_COUNT: u32 = 0x034;

    /// First per-queue block.
    pub const QUEUE_BASE: u32 = 0x1000;
    /// Size of one per-queue block.
    pub const QUEUE_STRIDE: u32 = 0x40;
    /// Offset of queue `q`'s block.
    pub const fn queue(q: u32) -> u32 {
        QUEUE_BASE + q * QUEUE_STRIDE
    }

    /// RW, 64-bit (one 8-byte or two 4-byte accesses). Guest address of the
    /// submission ring; aligned to [`crate::RING_ALIGN`].
    pub const Q_SQ_BASE: u32 = 0x00;
    /// RW, 64-bit. Guest address of the completion ring; aligned to [`crate::RING_ALIGN`].
    pub const Q_CQ_BASE: u32 = 0x08;
    /// RW, 64-bit. Guest address of the queue's [`crate::RingIndexes`]; aligned to 64.
    pub const Q_IDX_BASE: u32 = 0x10;
    /// RW. Entries in each ring: a power of two in `2..=MAX_DEPTH`.
    pub const Q_DEPTH: u32 = 0x18;
    /// RW. Opcodes this queue accepts; must be a subset of `Q_CAP_OPS`.
    pub const Q_OPS: u32 = 0x1c;
    /// RW. [`Q_CTRL_ENABLE`], [`Q_CTRL_RESET`].
    pub const Q_CTRL: u32 = 0x20;
    /// RO. [`Q_STATUS_ENABLED`], [`Q_STATUS_ERROR`]; bits 15:8 the queue error code.
    pub const Q_STATUS: u32 = 0x24;
    /// RW. MSI-X vector for completions, or [`NO_VECTOR`].
    pub const Q_MSIX_VECTOR: u32 = 0x28;
    /// RW. Interrupt coalescing: bits 15:0 completions per interrupt (0 = 1),
    /// bits 31:16 longest delay in microseconds before a pending interrupt fires.
    pub const Q_IRQ_COALESCE: u32 = 0x2c;
    /// RO. Completions written since the queue or the device was last reset (wraps).
    pub const Q_COMPLETED: u32 = 0x30;
    /// RO (ABI 1.1). Opcodes this queue may be given in `Q_OPS`: `CAP_OPS`, or
    /// a subset the host chose for this queue. A 1.0 device has no such
    /// register (a read is refused): use `CAP_OPS` there.
    pub const Q_CAP_OPS: u32 = 0x34;

    pub const ID_MAGIC: u32 = 0x3156_4457; // "WDV1"
    /// 1.1: 1.0 plus `Q_CAP_OPS` and the self-describing SHA-256 state.
    pub const ABI_VERSION: u32 = 1 << 16 | 1;

    pub const DEV_CTRL_ENABLE: u32 = 1 << 0;
    /// Self-clearing: disables every queue and restores reset values.
    pub const DEV_CTRL_RESET: u32 = 1 << 1;
    pub const DEV_STATUS_ENABLED: u32 = 1 << 0;
    pub const ERR_STATUS_LATCHED: u32 = 1 << 0;

    pub const Q_CTRL_ENABLE: u32 = 1 << 0;
    /// Self-clearing: disables the queue and clears its configuration.
    pub const Q_CTRL_RESET: u32 = 1 << 1;
    pub const Q_STATUS_ENABLED: u32 = 1 << 0;
    pub const Q_STATUS_ERROR: u32 = 1 << 1;
    pub const NO_VECTOR: u32 = 0xffff;
}

/// Alignment of submission and completion rings.
pub const RING_ALIGN: u64 = 64;
/// Alignment of the ring-index block.
pub const IDX_ALIGN: u64 = 64;

/// Job opcodes. The allowed-operation masks use `1 << opcode`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Nop = 0,
    DeflateCompress = 1,
    DeflateDecompress = 2,
    ZlibCompress = 3,
    ZlibDecompress = 4,
    GzipCompress = 5,
    GzipDecompress = 6,
    Crc32c = 7,
    Sha256 = 8,
    Copy = 9,
    Fill = 10,
    Compare = 11,
    /// ABI 1.1: one piece of a compressed stream of any length (see [`stream`]).
    StreamCompress = 12,
    /// ABI 1.1: one piece of the decompression of a stream of any length.
    StreamDecompress = 13,
}

impl Opcode {
    pub const ALL: [Opcode; 14] = [
        Opcode::Nop,
        Opcode::DeflateCompress,
        Opcode::DeflateDecompress,
        Opcode::ZlibCompress,
        Opcode::ZlibDecompress,
        Opcode::GzipCompress,
        Opcode::GzipDecompress,
        Opcode::Crc32c,
        Opcode::Sha256,
        Opcode::Copy,
        Opcode::Fill,
        Opcode::Compare,
        Opcode::StreamCompress,
        Opcode::StreamDecompress,
    ];
    pub const fn from_u8(v: u8) -> Option<Opcode> {
        if (v as usize) < Self::ALL.len() {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }
    pub const fn bit(self) -> u32 {
        1 << (self as u8)
    }
    /// A stream piece: it carries a context (`SubmissionEntry::ctx`).
    pub const fn is_stream(self) -> bool {
        matches!(self, Opcode::StreamCompress | Opcode::StreamDecompress)
    }
    /// The opcodes whose bits are set in `mask` (`CAP_OPS`, `Q_OPS`, ...),
    /// in opcode order; bits of no opcode are skipped.
    pub fn in_mask(mask: u32) -> impl Iterator<Item = Opcode> {
        Self::ALL.into_iter().filter(move |op| mask & op.bit() != 0)
    }
    pub const fn name(self) -> &'static str {
        match self {
            Opcode::Nop => "nop",
            Opcode::DeflateCompress => "deflate-compress",
            Opcode::DeflateDecompress => "deflate-decompress",
            Opcode::ZlibCompress => "zlib-compress",
            Opcode::ZlibDecompress => "zlib-decompress",
            Opcode::GzipCompress => "gzip-compress",
            Opcode::GzipDecompress => "gzip-decompress",
            Opcode::Crc32c => "crc32c",
            Opcode::Sha256 => "sha256",
            Opcode::Copy => "copy",
            Opcode::Fill => "fill",
            Opcode::Compare => "compare",
            Opcode::StreamCompress => "stream-compress",
            Opcode::StreamDecompress => "stream-decompress",
        }
    }
    pub fn from_name(name: &str) -> Option<Opcode> {
        Self::ALL.iter().copied().find(|op| op.name() == name)
    }
    /// Whether the job writes to `dst`.
    pub const fn writes_dst(self) -> bool {
        !matches!(self, Opcode::Nop | Opcode::Crc32c | Opcode::Compare)
    }
    /// Whether the job reads `src`.
    pub const fn reads_src(self) -> bool {
        !matches!(self, Opcode::Nop | Opcode::Fill)
    }
}

/// The compressed container formats the device speaks, and their opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// Raw DEFLATE (RFC 1951).
    Deflate,
    /// zlib (RFC 1950).
    Zlib,
    /// gzip (RFC 1952).
    Gzip,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Deflate, Format::Zlib, Format::Gzip];

    pub const fn compress_op(self) -> Opcode {
        match self {
            Format::Deflate => Opcode::DeflateCompress,
            Format::Zlib => Opcode::ZlibCompress,
            Format::Gzip => Opcode::GzipCompress,
        }
    }
    pub const fn decompress_op(self) -> Opcode {
        match self {
            Format::Deflate => Opcode::DeflateDecompress,
            Format::Zlib => Opcode::ZlibDecompress,
            Format::Gzip => Opcode::GzipDecompress,
        }
    }
    /// The format and direction (`true` = compress) of `op`, if it is a
    /// (de)compression opcode.
    pub const fn of(op: Opcode) -> Option<(Format, bool)> {
        match op {
            Opcode::DeflateCompress => Some((Format::Deflate, true)),
            Opcode::DeflateDecompress => Some((Format::Deflate, false)),
            Opcode::ZlibCompress => Some((Format::Zlib, true)),
            Opcode::ZlibDecompress => Some((Format::Zlib, false)),
            Opcode::GzipCompress => Some((Format::Gzip, true)),
            Opcode::GzipDecompress => Some((Format::Gzip, false)),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Format::Deflate => "deflate",
            Format::Zlib => "zlib",
            Format::Gzip => "gzip",
        }
    }
    pub fn from_name(s: &str) -> Option<Format> {
        Self::ALL.into_iter().find(|f| f.name() == s)
    }
    /// The format's code in a stream job's `param` ([`stream::FORMAT_MASK`]).
    pub const fn code(self) -> u64 {
        match self {
            Format::Deflate => 0,
            Format::Zlib => 1,
            Format::Gzip => 2,
        }
    }
    pub const fn from_code(code: u64) -> Option<Format> {
        match code {
            0 => Some(Format::Deflate),
            1 => Some(Format::Zlib),
            2 => Some(Format::Gzip),
            _ => None,
        }
    }
    /// A destination size that holds the compressed form of `len` bytes at
    /// any level: stored blocks cost 5 bytes per 64 KiB, plus the largest
    /// header and trailer (gzip, 18 bytes), with margin.
    pub const fn compress_bound(self, len: usize) -> usize {
        len + len / 8 + 128
    }
}

/// `Sha256` `param` bit: `dst` holds the state an earlier [`SHA256_MORE`] job
/// wrote; hashing continues from it.
pub const SHA256_RESUME: u64 = 1 << 0;
/// `Sha256` `param` bit: more data follows; write the running state (opaque,
/// [`SHA256_STATE_SIZE`] bytes) to `dst` instead of the digest.
pub const SHA256_MORE: u64 = 1 << 1;
/// Bytes of a SHA-256 running state, and the `dst_len` a job with
/// [`SHA256_RESUME`] or [`SHA256_MORE`] needs.
pub const SHA256_STATE_SIZE: u32 = 128;

/// The layout of a SHA-256 running state ([`SHA256_STATE_SIZE`] bytes in
/// guest memory). It is self-describing and backend-neutral: any engine
/// (software or hardware) reads and writes exactly this, so a state can move
/// between backends, and a buffer that is not a state (all-zero, a digest, a
/// forgotten [`SHA256_MORE`]) is refused instead of silently hashed on.
pub mod sha256_state {
    /// u32 at 0: [`MAGIC`].
    pub const MAGIC_OFFSET: usize = 0;
    /// u16 at 4: [`VERSION`].
    pub const VERSION_OFFSET: usize = 4;
    /// u16 at 6: [`FLAG_VALID`]; no other bit may be set.
    pub const FLAGS_OFFSET: usize = 6;
    /// u64 at 8: message bytes hashed so far (less than 2^61).
    pub const LENGTH_OFFSET: usize = 8;
    /// 8 × u32 at 16: the chaining value H0..H7 (FIPS 180-4), each little-endian.
    pub const H_OFFSET: usize = 16;
    /// 64 bytes at 48: the partial block, `length % 64` bytes; the rest zero.
    pub const BLOCK_OFFSET: usize = 48;
    /// 16 bytes at 112: reserved, zero.
    pub const RESERVED_OFFSET: usize = 112;
    /// "WDS2" read as a little-endian u32.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"WDS2");
    pub const VERSION: u16 = 1;
    /// Set in every state a [`crate::SHA256_MORE`] job writes.
    pub const FLAG_VALID: u16 = 1;
}

/// Stream compression and decompression across jobs (ABI 1.1): a stream of
/// any length goes through the device one job per piece, the state between
/// pieces kept by the device in a context of [`stream::CTX_SIZE`] bytes in
/// guest memory at the job's `ctx`, laid out as below (backend-neutral:
/// the window of the last 32 KiB of uncompressed data and the position in
/// the compressed stream, never a library's internal state).
pub mod stream {
    /// `param` bits 1:0: the [`crate::Format`] code.
    pub const FORMAT_MASK: u64 = 0x3;
    /// `param` bits 11:8 (compress): the level, 1..=9 (0 means 1).
    pub const LEVEL_SHIFT: u32 = 8;
    pub const LEVEL_MASK: u64 = 0xf << LEVEL_SHIFT;
    pub const MAX_LEVEL: u64 = 9;
    /// `param` bits 13:12 (compress): how the piece ends, one of the `FLUSH_*`.
    pub const FLUSH_SHIFT: u32 = 12;
    pub const FLUSH_MASK: u64 = 0x3 << FLUSH_SHIFT;
    /// The output ends on a byte boundary: everything so far decodes.
    pub const FLUSH_SYNC: u64 = 0;
    /// As SYNC, and later output does not refer to earlier data: a decoder
    /// may start afresh here (the window is emptied).
    pub const FLUSH_FULL: u64 = 1;
    /// The stream ends: last block and the format's trailer.
    pub const FLUSH_FINISH: u64 = 2;
    /// `param` bit 16: the first piece of a stream; the context is
    /// initialised, whatever it held. Without it the context must hold a
    /// stream in progress of the same direction and format.
    pub const START: u64 = 1 << 16;
    /// Every `param` bit a stream-compress job may set.
    pub const COMPRESS_PARAM: u64 = FORMAT_MASK | LEVEL_MASK | FLUSH_MASK | START;
    /// Every `param` bit a stream-decompress job may set.
    pub const DECOMPRESS_PARAM: u64 = FORMAT_MASK | START;

    /// Bytes of a stream context: a 64-byte header and the 32 KiB window.
    pub const CTX_SIZE: u32 = 64 + WINDOW_SIZE;
    pub const WINDOW_SIZE: u32 = 32 * 1024;
    /// u32 at 0: [`MAGIC`].
    pub const MAGIC_OFFSET: usize = 0;
    /// u16 at 4: [`VERSION`].
    pub const VERSION_OFFSET: usize = 4;
    /// u16 at 6: the `FLAG_*` bits.
    pub const FLAGS_OFFSET: usize = 6;
    /// u8 at 8: the format code.
    pub const FORMAT_OFFSET: usize = 8;
    /// u8 at 9 (decompress): bits (0..=7) of the next compressed byte already
    /// taken, whose remaining high bits are held at 10.
    pub const BITS_OFFSET: usize = 9;
    /// u8 at 10: those bits' values, in the low bits.
    pub const BIT_VALUE_OFFSET: usize = 10;
    /// u32 at 12: the format's check value of the uncompressed data so far
    /// (Adler-32 for zlib, CRC-32 for gzip, 0 for raw deflate).
    pub const CHECK_OFFSET: usize = 12;
    /// u64 at 16: uncompressed bytes so far.
    pub const PLAIN_OFFSET: usize = 16;
    /// u64 at 24: compressed bytes so far (header and trailer included).
    pub const PACKED_OFFSET: usize = 24;
    /// u32 at 32: bytes of the window in use (0..=32768).
    pub const WINDOW_LEN_OFFSET: usize = 32;
    /// 28 bytes at 36: reserved, zero.
    pub const RESERVED_OFFSET: usize = 36;
    /// 32 KiB at 64: the last uncompressed bytes (`window length` of them).
    pub const WINDOW_OFFSET: usize = 64;
    /// "WDZ1" read as a little-endian u32.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"WDZ1");
    pub const VERSION: u16 = 1;
    /// Set in every context a stream job wrote.
    pub const FLAG_VALID: u16 = 1 << 0;
    /// A compression context (else decompression).
    pub const FLAG_COMPRESS: u16 = 1 << 1;
    /// The format's header has been written or read.
    pub const FLAG_HEADER_DONE: u16 = 1 << 2;
    /// Decompress: the last deflate block has been read; the trailer is next.
    pub const FLAG_DEFLATE_DONE: u16 = 1 << 3;
    /// The stream has ended (a later piece needs START).
    pub const FLAG_ENDED: u16 = 1 << 4;
}

/// `CompletionEntry::flags` bit 1: a stream-decompress job read the end of
/// its stream (last block and trailer); `result` says how much of `src` it
/// consumed, so any bytes after it (another gzip member) are left.
pub const CQE_STREAM_END: u16 = 1 << 1;

/// Every opcode.
pub const ALL_OPS: u32 = (1 << Opcode::ALL.len()) - 1;

/// Submission queue entry, 64 bytes.
///
/// * `src`/`src_len`: input (`Fill`: unused; `Compare`: first buffer).
/// * `dst`/`dst_len`: output buffer and its capacity (`Compare`: second
///   buffer, `dst_len` must equal `src_len`; `Crc32c`: unused; `Sha256`: 32 bytes).
/// * `param`: `Fill` byte pattern (low 8 bits), or the compression level (1..=12, 0 = default 1)
///   for compress opcodes.
/// * `reserved` must be zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmissionEntry {
    pub opcode: u8,
    pub flags: u8,
    pub reserved0: u16,
    pub tag: u32,
    pub src: u64,
    pub dst: u64,
    pub src_len: u32,
    pub dst_len: u32,
    pub param: u64,
    /// Stream opcodes: guest address of the stream context; 0 otherwise.
    pub ctx: u64,
    pub reserved: [u64; 2],
}

/// Completion queue entry, 16 bytes.
///
/// * `status`: a [`JobStatus`] code.
/// * `flags` bit 0: the phase bit. The device writes 1 on its first pass
///   through the ring, 0 on the second, and so on.
/// * `bytes`: bytes written to `dst`.
/// * `result`: CRC32C value, or for `Compare` 0 when equal and else the
///   offset of the first difference plus one (saturating).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionEntry {
    pub tag: u32,
    pub status: u16,
    pub flags: u16,
    pub bytes: u32,
    pub result: u32,
}

pub const SQE_SIZE: usize = 64;
pub const CQE_SIZE: usize = 16;
pub const CQE_PHASE: u16 = 1;

/// The ring-index block a queue's `Q_IDX_BASE` points at, 64 bytes in guest
/// memory. The driver owns `sq_tail` and `cq_head`; the device owns `sq_head`
/// and `flags`. Indexes are free-running u32 counters (not masked).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingIndexes {
    /// Driver: submissions written so far.
    pub sq_tail: u32,
    /// Driver: completions consumed so far.
    pub cq_head: u32,
    /// Device: submissions consumed so far.
    pub sq_head: u32,
    /// Device: [`IDX_FLAG_NO_DOORBELL`] while it is polling `sq_tail` itself.
    pub flags: u32,
    pub reserved: [u32; 12],
}

/// Offsets inside [`RingIndexes`].
pub mod idx {
    pub const SQ_TAIL: u64 = 0;
    pub const CQ_HEAD: u64 = 4;
    pub const SQ_HEAD: u64 = 8;
    pub const FLAGS: u64 = 12;
    pub const SIZE: u64 = 64;
}

/// Set by the device while it is busy and will read `sq_tail` again before it
/// sleeps: the driver need not ring the doorbell (event suppression).
pub const IDX_FLAG_NO_DOORBELL: u32 = 1;

impl SubmissionEntry {
    pub fn to_bytes(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.reserved0.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..16].copy_from_slice(&self.src.to_le_bytes());
        b[16..24].copy_from_slice(&self.dst.to_le_bytes());
        b[24..28].copy_from_slice(&self.src_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.dst_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.param.to_le_bytes());
        b[40..48].copy_from_slice(&self.ctx.to_le_bytes());
        for (i, r) in self.reserved.iter().enumerate() {
            b[48 + 8 * i..56 + 8 * i].copy_from_slice(&r.to_le_bytes());
        }
        b
    }
    pub fn from_bytes(b: &[u8; SQE_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        SubmissionEntry {
            opcode: b[0],
            flags: b[1],
            reserved0: u16::from_le_bytes([b[2], b[3]]),
            tag: u32_at(4),
            src: u64_at(8),
            dst: u64_at(16),
            src_len: u32_at(24),
            dst_len: u32_at(28),
            param: u64_at(32),
            ctx: u64_at(40),
            reserved: [u64_at(48), u64_at(56)],
        }
    }
}

impl CompletionEntry {
    pub fn to_bytes(&self) -> [u8; CQE_SIZE] {
        let mut b = [0u8; CQE_SIZE];
        b[0..4].copy_from_slice(&self.tag.to_le_bytes());
        b[4..6].copy_from_slice(&self.status.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.bytes.to_le_bytes());
        b[12..16].copy_from_slice(&self.result.to_le_bytes());
        b
    }
    pub fn from_bytes(b: &[u8; CQE_SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        CompletionEntry {
            tag: u32_at(0),
            status: u16::from_le_bytes([b[4], b[5]]),
            flags: u16::from_le_bytes([b[6], b[7]]),
            bytes: u32_at(8),
            result: u32_at(12),
        }
    }
}

macro_rules! codes {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:expr, $text:expr;)* }) => {
        $(#[$m])*
        #[repr(u16)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v = $n,)* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            pub const fn code(self) -> u16 { self as u16 }
            pub fn from_code(c: u16) -> Option<Self> {
                Self::ALL.iter().copied().find(|e| e.code() == c)
            }
            /// The one-line meaning documented in docs/device-spec.md.
            pub const fn text(self) -> &'static str {
                match self { $($name::$v => $text,)* }
            }
            pub const fn name(self) -> &'static str {
                match self { $($name::$v => stringify!($v),)* }
            }
        }
    };
}

codes! {
    /// Why a BAR0 access was refused (`ERR_CODE`).
    RegError {
        Unaligned = 1, "access not aligned to its width";
        BadWidth = 2, "access width not allowed for this register";
        OutOfRange = 3, "offset names no register";
        ReadOnly = 4, "write to a read-only register";
        ReservedBits = 5, "write sets reserved bits";
        BadDepth = 6, "queue depth not a power of two in 2..=MAX_DEPTH";
        RingUnmapped = 7, "ring or index block not inside memory the VMM mapped writable";
        OpNotAllowed = 8, "operation mask not a subset of the queue's Q_CAP_OPS";
        QueueBusy = 9, "queue configuration changed while the queue is enabled";
        BadVector = 10, "MSI-X vector out of range";
        Misaligned = 11, "ring or index address not aligned";
        DeviceDisabled = 12, "queue enabled while the device is disabled";
        RingsOverlap = 13, "submission ring, completion ring and index block overlap";
        WriteOnly = 14, "read of a write-only location";
        NoQueuePair = 15, "the accelerator has no free queue pair for this queue";
    }
}

codes! {
    /// Completion status of one job (`CompletionEntry::status`).
    JobStatus {
        Ok = 0, "job completed";
        BadOpcode = 1, "unknown opcode";
        OpNotAllowed = 2, "opcode not allowed on this queue";
        BadAddress = 3, "buffer not inside memory the VMM mapped (or not writable)";
        BadLength = 4, "length zero where data is needed, over MAX_XFER, or address + length overflows";
        OverlapsRing = 5, "buffer overlaps this queue's rings or index block";
        DstTooSmall = 6, "output does not fit in dst_len";
        CorruptInput = 7, "compressed input, or a SHA-256 running state, is not valid";
        ReservedNonZero = 8, "reserved field or flag not zero";
        EngineError = 9, "the engine failed the job";
        Aborted = 10, "bus mastering was off when the job reached the engine; nothing was read or written";
    }
}
