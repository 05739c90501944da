//! Streams of any length through the device (ABI 1.1 `stream-compress` /
//! `stream-decompress`): one job per piece, the device's context for the
//! stream kept in a DMA buffer between pieces. Pieces of one stream depend
//! on each other, so they run one after another.
//!
//! [`StreamCompressor`] and [`StreamDecompressor`] take a stream a piece at
//! a time, so a caller can produce and check a stream far larger than its
//! memory; [`Queue::stream_compress`] and [`Queue::stream_decompress`] do a
//! whole buffer with them.

use wdvirt_abi::{CQE_STREAM_END, Opcode, stream as s};

use crate::dma::{DmaMemory, PoolBuffer};
use crate::error::DriverError;
use crate::jobs::{Format, JobSpec};
use crate::mmio::Mmio;
use crate::queue::Queue;

/// What a compress piece of `n` input bytes may write at most (§4.1: the
/// device promises `n · 9/8 + 256` always fits).
fn piece_bound(n: usize) -> usize {
    n + n / 8 + 256
}

/// Compresses one stream a piece at a time: each [`push`](Self::push) is
/// one `stream-compress` job, the context kept in DMA memory between them.
pub struct StreamCompressor<D: DmaMemory> {
    format: Format,
    level: u32,
    piece: usize,
    cap: usize,
    ctx: PoolBuffer<D>,
    src: PoolBuffer<D>,
    dst: PoolBuffer<D>,
    started: bool,
    finished: bool,
}

impl<D: DmaMemory> StreamCompressor<D> {
    /// A stream in `format` at `level` (0 means 1, at most 9), taking
    /// pieces of at most `piece` bytes (less when a piece's output could
    /// not fit one job: see [`piece_len`](Self::piece_len)).
    pub fn new<M: Mmio>(
        q: &Queue<M, D>,
        format: Format,
        level: u32,
        piece: usize,
    ) -> Result<Self, DriverError> {
        if u64::from(level) > s::MAX_LEVEL {
            return Err(DriverError::InvalidArgument(format!(
                "stream level {level} is over {}",
                s::MAX_LEVEL
            )));
        }
        let max = q.max_xfer() as usize;
        let fits = max.saturating_sub(256) / 9 * 8;
        let piece = piece.clamp(1, fits.max(1));
        let cap = piece_bound(piece).min(max);
        Ok(StreamCompressor {
            format,
            level,
            piece,
            cap,
            ctx: q.stage(s::CTX_SIZE as usize)?,
            src: q.stage(piece)?,
            dst: q.stage(cap)?,
            started: false,
            finished: false,
        })
    }

    /// The most input one [`push`](Self::push) takes.
    pub fn piece_len(&self) -> usize {
        self.piece
    }

    /// Compresses `data` (at most [`piece_len`](Self::piece_len) bytes) as
    /// the stream's next piece and returns its output. `last` ends the
    /// stream (a FINISH flush: the format's trailer); other pieces end with
    /// a sync flush, so everything pushed so far is decodable. The outputs
    /// of all pieces, in order, are one standard stream.
    pub fn push<M: Mmio>(
        &mut self,
        q: &mut Queue<M, D>,
        data: &[u8],
        last: bool,
    ) -> Result<Vec<u8>, DriverError> {
        if self.finished {
            return Err(DriverError::InvalidArgument(
                "the stream has already ended".into(),
            ));
        }
        if data.len() > self.piece {
            return Err(DriverError::TooLarge {
                len: data.len(),
                max: self.piece as u32,
            });
        }
        self.src.write(0, data)?;
        let flush = if last { s::FLUSH_FINISH } else { s::FLUSH_SYNC };
        let start = if self.started { 0 } else { s::START };
        let param = self.format.code()
            | u64::from(self.level) << s::LEVEL_SHIFT
            | flush << s::FLUSH_SHIFT
            | start;
        let cqe = q.run_one(
            JobSpec::new(Opcode::StreamCompress)
                .src(self.src.addr(), data.len() as u32)
                .dst(self.dst.addr(), self.cap as u32)
                .ctx(self.ctx.addr())
                .param(param),
        )?;
        self.started = true;
        self.finished = last;
        Queue::<M, D>::read_output(&self.dst, cqe.bytes, self.cap as u32)
    }
}

/// Decompresses one stream a piece at a time: compressed bytes go in with
/// [`push`](Self::push) in any amounts, each whole deflate block the device
/// can decode comes out through a callback, and input the device has not
/// consumed yet (a block cut by the end of what was pushed) waits for the
/// next push. It holds at most about one job's input.
pub struct StreamDecompressor<D: DmaMemory> {
    format: Format,
    max: usize,
    ctx: PoolBuffer<D>,
    src: PoolBuffer<D>,
    dst: PoolBuffer<D>,
    /// Pushed, not yet consumed.
    pending: Vec<u8>,
    started: bool,
    ended: bool,
    consumed: usize,
}

/// What one decompress piece did.
struct Step {
    consumed: usize,
    produced: usize,
}

impl<D: DmaMemory> StreamDecompressor<D> {
    pub fn new<M: Mmio>(q: &Queue<M, D>, format: Format) -> Result<Self, DriverError> {
        let max = q.max_xfer() as usize;
        Ok(StreamDecompressor {
            format,
            max,
            ctx: q.stage(s::CTX_SIZE as usize)?,
            src: q.stage(max)?,
            dst: q.stage(max)?,
            pending: Vec::new(),
            started: false,
            ended: false,
            consumed: 0,
        })
    }

    /// The stream's trailer has been read (STREAM_END).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Compressed bytes the device consumed so far; once the stream has
    /// ended, where it ends in what was pushed.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// One stream-decompress job on the start of `pending`.
    fn step<M: Mmio>(
        &mut self,
        q: &mut Queue<M, D>,
        out: &mut dyn FnMut(&[u8]),
    ) -> Result<Step, DriverError> {
        let n = self.pending.len().min(self.max);
        self.src.write(0, &self.pending[..n])?;
        let start = if self.started { 0 } else { s::START };
        let cqe = q.run_one(
            JobSpec::new(Opcode::StreamDecompress)
                .src(self.src.addr(), n as u32)
                .dst(self.dst.addr(), self.max as u32)
                .ctx(self.ctx.addr())
                .param(self.format.code() | start),
        )?;
        self.started = true;
        let used = cqe.result as usize;
        if used > n {
            return Err(DriverError::InvalidArgument(format!(
                "device reported {used} bytes consumed of {n}"
            )));
        }
        out(&Queue::<M, D>::read_output(
            &self.dst,
            cqe.bytes,
            self.max as u32,
        )?);
        self.pending.drain(..used);
        self.consumed += used;
        self.ended = cqe.flags & CQE_STREAM_END != 0;
        Ok(Step {
            consumed: used,
            produced: cqe.bytes as usize,
        })
    }

    /// The device moved nothing with `pending` as its input.
    fn stuck(&self) -> DriverError {
        if self.pending.len() < self.max {
            DriverError::TruncatedStream {
                consumed: self.consumed,
            }
        } else {
            DriverError::InvalidArgument(format!(
                "a deflate block at byte {} is longer than MAX_XFER ({})",
                self.consumed, self.max
            ))
        }
    }

    /// Adds `data` to the stream's input and decodes while a job's worth
    /// (MAX_XFER) of input is waiting, passing the output to `out` in order;
    /// [`finish`](Self::finish) decodes the rest. So every job but the last
    /// few gets a full window of input, and at most MAX_XFER plus `data`
    /// is held. Bytes pushed after the stream's end are not consumed (see
    /// [`consumed`](Self::consumed)).
    pub fn push<M: Mmio>(
        &mut self,
        q: &mut Queue<M, D>,
        data: &[u8],
        out: &mut dyn FnMut(&[u8]),
    ) -> Result<(), DriverError> {
        if self.ended {
            return Ok(());
        }
        self.pending.extend_from_slice(data);
        while !self.ended && self.pending.len() >= self.max {
            let step = self.step(q, out)?;
            if !self.ended && step.consumed == 0 && step.produced == 0 {
                return Err(self.stuck());
            }
        }
        Ok(())
    }

    /// No more input: decodes what is left up to the stream's end.
    /// Returns the compressed bytes the stream took; a stream without its
    /// end is [`DriverError::TruncatedStream`].
    pub fn finish<M: Mmio>(
        &mut self,
        q: &mut Queue<M, D>,
        out: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, DriverError> {
        while !self.ended {
            let step = self.step(q, out)?;
            if !self.ended && step.consumed == 0 && step.produced == 0 {
                return Err(self.stuck());
            }
        }
        Ok(self.consumed)
    }
}

impl<M: Mmio, D: DmaMemory> Queue<M, D> {
    /// Compresses `data`, of any length, into one `format` stream at
    /// `level` (0 means 1, at most 9): pieces of at most `piece` bytes, each
    /// ending with a sync flush, the last with the stream's end. The result
    /// is one standard stream (zlib, gzip or raw deflate decoders take it).
    pub fn stream_compress(
        &mut self,
        format: Format,
        level: u32,
        data: &[u8],
        piece: usize,
    ) -> Result<Vec<u8>, DriverError> {
        let mut c = StreamCompressor::new(self, format, level, piece)?;
        let mut out = Vec::with_capacity(data.len() / 2);
        let pieces: Vec<&[u8]> = if data.is_empty() {
            vec![data]
        } else {
            data.chunks(c.piece_len()).collect()
        };
        let last = pieces.len() - 1;
        for (i, p) in pieces.into_iter().enumerate() {
            out.extend_from_slice(&c.push(self, p, i == last)?);
        }
        Ok(out)
    }

    /// Decompresses the `format` stream at the start of `data`, of any
    /// length. Returns its output and how many bytes of `data` it took: the
    /// stream ends where its trailer does, so what follows (another gzip
    /// member, say) is left for the caller.
    pub fn stream_decompress(
        &mut self,
        format: Format,
        data: &[u8],
    ) -> Result<(Vec<u8>, usize), DriverError> {
        let mut d = StreamDecompressor::new(self, format)?;
        let mut out = Vec::new();
        let mut sink = |b: &[u8]| out.extend_from_slice(b);
        for piece in data.chunks(self.max_xfer as usize) {
            d.push(self, piece, &mut sink)?;
            if d.ended() {
                break;
            }
        }
        let used = d.finish(self, &mut sink)?;
        Ok((out, used))
    }
}
