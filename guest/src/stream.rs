//! Streams of any length through the device (ABI 1.1 `stream-compress` /
//! `stream-decompress`): one job per piece, the device's context for the
//! stream kept in a DMA buffer between pieces. Pieces of one stream depend
//! on each other, so they run one after another.

use wdvirt_abi::{CQE_STREAM_END, Opcode, stream as s};

use crate::dma::DmaMemory;
use crate::error::DriverError;
use crate::jobs::{Format, JobSpec};
use crate::mmio::Mmio;
use crate::queue::Queue;

impl<M: Mmio, D: DmaMemory> Queue<M, D> {
    /// The largest input piece whose compressed form surely fits one job.
    fn stream_piece(&self, want: usize) -> usize {
        let max = self.max_xfer as usize;
        let fits = (max.saturating_sub(256) / 9) * 8;
        want.clamp(1, fits.max(1))
    }

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
        if u64::from(level) > s::MAX_LEVEL {
            return Err(DriverError::InvalidArgument(format!(
                "stream level {level} is over {}",
                s::MAX_LEVEL
            )));
        }
        let piece = self.stream_piece(piece);
        let cap = format.compress_bound(piece).min(self.max_xfer as usize);
        let ctx = self.stage(s::CTX_SIZE as usize)?;
        let src = self.stage(piece)?;
        let dst = self.stage(cap)?;
        let mut out = Vec::with_capacity(data.len() / 2);
        let pieces: Vec<&[u8]> = if data.is_empty() {
            vec![data]
        } else {
            data.chunks(piece).collect()
        };
        let last = pieces.len() - 1;
        for (i, p) in pieces.into_iter().enumerate() {
            src.write(0, p)?;
            let flush = if i == last {
                s::FLUSH_FINISH
            } else {
                s::FLUSH_SYNC
            };
            let start = if i == 0 { s::START } else { 0 };
            let param = format.code()
                | u64::from(level) << s::LEVEL_SHIFT
                | flush << s::FLUSH_SHIFT
                | start;
            let cqe = self.run_one(
                JobSpec::new(Opcode::StreamCompress)
                    .src(src.addr(), p.len() as u32)
                    .dst(dst.addr(), cap as u32)
                    .ctx(ctx.addr())
                    .param(param),
            )?;
            out.extend_from_slice(&Self::read_output(&dst, cqe.bytes, cap as u32)?);
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
        let max = self.max_xfer as usize;
        let ctx = self.stage(s::CTX_SIZE as usize)?;
        let src = self.stage(max)?;
        let dst = self.stage(max)?;
        let mut out = Vec::new();
        let mut at = 0;
        let mut start = s::START;
        loop {
            let piece = &data[at..(at + max).min(data.len())];
            src.write(0, piece)?;
            let cqe = self.run_one(
                JobSpec::new(Opcode::StreamDecompress)
                    .src(src.addr(), piece.len() as u32)
                    .dst(dst.addr(), max as u32)
                    .ctx(ctx.addr())
                    .param(format.code() | start),
            )?;
            start = 0;
            if cqe.result as usize > piece.len() {
                return Err(DriverError::InvalidArgument(format!(
                    "device reported {} bytes consumed of {}",
                    cqe.result,
                    piece.len()
                )));
            }
            out.extend_from_slice(&Self::read_output(&dst, cqe.bytes, max as u32)?);
            at += cqe.result as usize;
            if cqe.flags & CQE_STREAM_END != 0 {
                return Ok((out, at));
            }
            // A piece that moved nothing: the input ends inside a block (or
            // the stream has no end), or one block is longer than a job.
            if cqe.result == 0 && cqe.bytes == 0 {
                if piece.len() < max {
                    return Err(DriverError::TruncatedStream { consumed: at });
                }
                return Err(DriverError::InvalidArgument(format!(
                    "a deflate block at byte {at} is longer than MAX_XFER ({max})"
                )));
            }
        }
    }
}
