//! Convenience operations: stage bytes through DMA buffers, run the job,
//! copy the result back. Each is one job of at most `MAX_XFER` bytes, except
//! [`Queue::compress_chunks`], which runs one job per chunk and returns one
//! standard stream per chunk.

use wdvirt_abi::{Opcode, RING_ALIGN};

use crate::dma::{DmaMemory, PoolBuffer};
use crate::error::DriverError;
use crate::jobs::{Format, JobSpec, check};
use crate::mmio::Mmio;
use crate::queue::Queue;

impl<M: Mmio, D: DmaMemory> Queue<M, D> {
    pub(crate) fn check_len(&self, len: usize) -> Result<u32, DriverError> {
        match u32::try_from(len) {
            Ok(l) if l <= self.max_xfer => Ok(l),
            _ => Err(DriverError::TooLarge {
                len,
                max: self.max_xfer,
            }),
        }
    }

    /// A staging buffer of at least one byte (the allocator refuses zero).
    pub(crate) fn stage(&self, len: usize) -> Result<PoolBuffer<D>, DriverError> {
        Ok(self.pool.alloc(len.max(1) as u64, RING_ALIGN)?)
    }

    pub(crate) fn stage_data(&self, data: &[u8]) -> Result<PoolBuffer<D>, DriverError> {
        let b = self.stage(data.len())?;
        b.write(0, data)?;
        Ok(b)
    }

    pub(crate) fn run_one(
        &mut self,
        job: JobSpec,
    ) -> Result<wdvirt_abi::CompletionEntry, DriverError> {
        let cqe = self.run_batch(&[job])?.into_iter().next();
        let cqe = cqe.ok_or(DriverError::InvalidArgument(
            "batch returned no completion".into(),
        ))?;
        check(&cqe)?;
        Ok(cqe)
    }

    /// Reads the `bytes` a job reported writing, refusing a count over the capacity it was given.
    pub(crate) fn read_output(
        buf: &PoolBuffer<D>,
        bytes: u32,
        cap: u32,
    ) -> Result<Vec<u8>, DriverError> {
        if bytes > cap {
            return Err(DriverError::InvalidArgument(format!(
                "device reported {bytes} bytes written into {cap}"
            )));
        }
        Ok(buf.to_vec(bytes as usize)?)
    }

    /// Compresses `data` (at most `MAX_XFER` bytes) into one `format` stream.
    /// `level` 0 means the device default.
    pub fn compress(
        &mut self,
        format: Format,
        level: u32,
        data: &[u8],
    ) -> Result<Vec<u8>, DriverError> {
        let len = self.check_len(data.len())?;
        let cap = format
            .compress_bound(data.len())
            .min(self.max_xfer as usize) as u32;
        let src = self.stage_data(data)?;
        let dst = self.stage(cap as usize)?;
        let job = JobSpec::new(format.compress_op())
            .src(src.addr(), len)
            .dst(dst.addr(), cap)
            .param(u64::from(level));
        let cqe = self.run_one(job)?;
        Self::read_output(&dst, cqe.bytes, cap)
    }

    /// Decompresses one `format` stream whose output is at most `max_output`
    /// bytes (clamped to `MAX_XFER`).
    pub fn decompress(
        &mut self,
        format: Format,
        data: &[u8],
        max_output: usize,
    ) -> Result<Vec<u8>, DriverError> {
        let len = self.check_len(data.len())?;
        let cap = max_output.min(self.max_xfer as usize) as u32;
        let src = self.stage_data(data)?;
        let dst = self.stage(cap as usize)?;
        let cqe = self.run_one(
            JobSpec::new(format.decompress_op())
                .src(src.addr(), len)
                .dst(dst.addr(), cap),
        )?;
        Self::read_output(&dst, cqe.bytes, cap)
    }

    /// Compresses `data` in independent chunks of `chunk` bytes (clamped to
    /// `MAX_XFER`), as many in flight as the ring and the DMA pool allow.
    /// Returns one complete `format` stream per chunk, in order.
    pub fn compress_chunks(
        &mut self,
        format: Format,
        level: u32,
        data: &[u8],
        chunk: usize,
    ) -> Result<Vec<Vec<u8>>, DriverError> {
        let chunk = chunk.clamp(1, self.max_xfer.max(1) as usize);
        let pieces: Vec<&[u8]> = data.chunks(chunk).collect();
        let cap = |n: usize| format.compress_bound(n).min(self.max_xfer as usize);
        let caps: Vec<usize> = pieces.iter().map(|p| cap(p.len())).collect();
        self.run_staged(format.compress_op(), u64::from(level), &pieces, &caps)
    }

    /// Runs `op` once per input (src = input, dst capacity = `caps[i]`) in
    /// windows of as many jobs as the ring and the DMA pool hold, and returns
    /// each job's output. Fails on the first failed job.
    pub fn run_staged(
        &mut self,
        op: Opcode,
        param: u64,
        inputs: &[&[u8]],
        caps: &[usize],
    ) -> Result<Vec<Vec<u8>>, DriverError> {
        if inputs.len() != caps.len() {
            return Err(DriverError::InvalidArgument(
                "one capacity per input needed".into(),
            ));
        }
        for (i, c) in inputs.iter().zip(caps) {
            self.check_len(i.len())?;
            self.check_len(*c)?;
        }
        let mut outputs = Vec::with_capacity(inputs.len());
        let mut start = 0;
        while start < inputs.len() {
            // Stage a window: up to one ring's worth, fewer if memory runs out.
            let mut staged = Vec::new();
            let mut jobs = Vec::new();
            for i in start..inputs.len().min(start + self.depth() as usize) {
                let bufs = self
                    .stage_data(inputs[i])
                    .and_then(|s| Ok((s, self.stage(caps[i])?)));
                match bufs {
                    Ok((s, d)) => {
                        jobs.push(
                            JobSpec::new(op)
                                .src(s.addr(), inputs[i].len() as u32)
                                .dst(d.addr(), caps[i] as u32)
                                .param(param),
                        );
                        staged.push((s, d));
                    }
                    Err(e) if staged.is_empty() => return Err(e),
                    Err(_) => break,
                }
            }
            let cqes = self.run_batch(&jobs)?;
            for (i, cqe) in cqes.iter().enumerate() {
                check(cqe).map_err(|e| match e {
                    DriverError::JobFailed { status, .. } => DriverError::JobFailed {
                        tag: (start + i) as u32,
                        status,
                    },
                    other => other,
                })?;
                outputs.push(Self::read_output(
                    &staged[i].1,
                    cqe.bytes,
                    caps[start + i] as u32,
                )?);
            }
            start += jobs.len();
        }
        Ok(outputs)
    }

    /// The largest piece of a buffer that one job moves.
    fn piece(&self) -> usize {
        (self.max_xfer as usize).max(1)
    }

    /// CRC32C of `data`, of any length: one job per `MAX_XFER` piece, each
    /// continuing from the CRC so far (`param`).
    pub fn crc32c(&mut self, data: &[u8]) -> Result<u32, DriverError> {
        let mut crc = 0u32;
        for part in data.chunks(self.piece()) {
            let src = self.stage_data(part)?;
            let job = JobSpec::new(Opcode::Crc32c)
                .src(src.addr(), part.len() as u32)
                .param(u64::from(crc));
            crc = self.run_one(job)?.result;
        }
        Ok(crc)
    }

    /// SHA-256 of `data`, of any length: one job per `MAX_XFER` piece, the
    /// running state kept by the device in a DMA buffer between pieces
    /// (`SHA256_MORE` / `SHA256_RESUME`).
    pub fn sha256(&mut self, data: &[u8]) -> Result<[u8; 32], DriverError> {
        let state_len = wdvirt_abi::SHA256_STATE_SIZE;
        let state = self.stage(state_len as usize)?;
        // A staging buffer may still hold a state from an abandoned chain,
        // which the device refuses to start over (spec §4).
        state.zero()?;
        // (Empty data is still one job: the device says what it thinks of it.)
        let pieces: Vec<&[u8]> = if data.is_empty() {
            vec![data]
        } else {
            data.chunks(self.piece()).collect()
        };
        let mut parts = pieces.into_iter().peekable();
        let mut first = true;
        while let Some(part) = parts.next() {
            let resume = if first { 0 } else { wdvirt_abi::SHA256_RESUME };
            let more = if parts.peek().is_some() {
                wdvirt_abi::SHA256_MORE
            } else {
                0
            };
            first = false;
            let src = self.stage_data(part)?;
            let job = JobSpec::new(Opcode::Sha256)
                .src(src.addr(), part.len() as u32)
                .dst(state.addr(), state_len)
                .param(resume | more);
            let cqe = self.run_one(job)?;
            let want = if more != 0 { state_len } else { 32 };
            if cqe.bytes != want {
                return Err(DriverError::InvalidArgument(format!(
                    "SHA-256 job wrote {} bytes, not {want}",
                    cqe.bytes
                )));
            }
        }
        let mut digest = [0u8; 32];
        state.read(0, &mut digest)?;
        Ok(digest)
    }

    /// Has the device copy `data` and returns the copy.
    pub fn copy(&mut self, data: &[u8]) -> Result<Vec<u8>, DriverError> {
        let len = self.check_len(data.len())?;
        let src = self.stage_data(data)?;
        let dst = self.stage(data.len())?;
        let cqe = self.run_one(
            JobSpec::new(Opcode::Copy)
                .src(src.addr(), len)
                .dst(dst.addr(), len),
        )?;
        Self::read_output(&dst, cqe.bytes, len)
    }

    /// Has the device fill `len` bytes with `pattern`.
    pub fn fill(&mut self, pattern: u8, len: usize) -> Result<Vec<u8>, DriverError> {
        let l = self.check_len(len)?;
        let dst = self.stage(len)?;
        let cqe = self.run_one(
            JobSpec::new(Opcode::Fill)
                .dst(dst.addr(), l)
                .param(u64::from(pattern)),
        )?;
        Self::read_output(&dst, cqe.bytes, l)
    }

    /// Compares two buffers of equal length: `None` when equal, else the
    /// offset of the first difference (as the device reports it, saturating
    /// at `u32::MAX - 1`).
    pub fn compare(&mut self, a: &[u8], b: &[u8]) -> Result<Option<u32>, DriverError> {
        if a.len() != b.len() {
            return Err(DriverError::InvalidArgument(format!(
                "compare of {} and {} bytes",
                a.len(),
                b.len()
            )));
        }
        // One job per piece; the first piece that differs decides.
        let piece = self.piece();
        for (k, (pa, pb)) in a.chunks(piece).zip(b.chunks(piece)).enumerate() {
            let sa = self.stage_data(pa)?;
            let sb = self.stage_data(pb)?;
            let len = pa.len() as u32;
            let cqe = self.run_one(
                JobSpec::new(Opcode::Compare)
                    .src(sa.addr(), len)
                    .dst(sb.addr(), len),
            )?;
            if let Some(at) = cqe.result.checked_sub(1) {
                let offset = (k * piece) as u64 + u64::from(at);
                return Ok(Some(u32::try_from(offset).unwrap_or(u32::MAX)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use wdvirt_abi::{ALL_OPS, JobStatus};

    use super::*;
    use crate::fake::{self, Mode};

    #[test]
    fn staged_operations_round_trip_through_the_device() {
        let (_f, d, pool) = fake::setup(Mode::Reverse);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let before = pool.free_bytes();
        assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(q.copy(&data).unwrap(), data);
        assert_eq!(q.fill(0xa5, 300).unwrap(), vec![0xa5; 300]);
        let mut other = data.clone();
        assert_eq!(q.compare(&data, &other).unwrap(), None);
        other[4321] ^= 1;
        assert_eq!(q.compare(&data, &other).unwrap(), Some(4321));
        assert!(matches!(
            q.compare(&data, &other[1..]),
            Err(DriverError::InvalidArgument(_))
        ));
        assert_eq!(pool.free_bytes(), before, "staging buffers are returned");
    }

    #[test]
    fn oversized_inputs_are_refused_before_submission() {
        let (f, d, pool) = fake::setup(Mode::InOrder);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let big = vec![0u8; fake::MAX_XFER as usize + 1];
        // (CRC32C, SHA-256 and compare split big inputs into pieces instead.)
        assert!(matches!(
            q.compress(Format::Gzip, 1, &big),
            Err(DriverError::TooLarge { .. })
        ));
        assert_eq!(f.doorbells(0), 0);
    }

    #[test]
    fn engine_failures_surface_as_job_failed() {
        let (_f, d, pool) = fake::setup(Mode::InOrder);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        // The fake has no compressor: it fails the job, and the driver says so.
        let e = q
            .compress(Format::Zlib, 3, b"hello hello hello")
            .unwrap_err();
        assert_eq!(e.job_status(), Some(JobStatus::EngineError));
    }

    #[test]
    fn run_staged_windows_more_inputs_than_the_ring() {
        let (f, d, pool) = fake::setup(Mode::Reverse);
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let inputs: Vec<Vec<u8>> = (0..11u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
        let caps: Vec<usize> = refs.iter().map(|r| r.len()).collect();
        let out = q.run_staged(Opcode::Copy, 0, &refs, &caps).unwrap();
        assert_eq!(out, inputs);
        assert!(f.max_in_flight(0) <= 4);
        // A failing job is reported with its index in the whole input.
        let caps_small: Vec<usize> = caps
            .iter()
            .enumerate()
            .map(|(i, c)| if i == 6 { 1 } else { *c })
            .collect();
        let e = q
            .run_staged(Opcode::Copy, 0, &refs, &caps_small)
            .unwrap_err();
        assert!(matches!(e, DriverError::JobFailed { tag: 6, .. }));
        assert_eq!(e.job_status(), Some(JobStatus::DstTooSmall));
    }

    #[test]
    fn run_staged_shrinks_windows_when_memory_is_short() {
        let f = fake::FakeDevice::new(Mode::InOrder);
        let d = crate::Device::probe(f.clone()).unwrap();
        d.enable().unwrap();
        // 8 KiB: rings (4*64+4*16+64) plus room for about two 1 KiB src+dst pairs.
        let pool = crate::DmaPool::new(
            f.memory(),
            crate::DmaAllocator::new(fake::MEM_BASE, 5 * 1024).unwrap(),
        );
        let mut q = d.queue(0, 4, ALL_OPS, &pool).unwrap();
        let inputs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1024]).collect();
        let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
        let out = q.run_staged(Opcode::Copy, 0, &refs, &[1024; 5]).unwrap();
        assert_eq!(out, inputs);
        assert!(
            f.max_in_flight(0) < 4,
            "windows were limited by memory, not by the ring"
        );
    }
}
