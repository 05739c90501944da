//! zlib's C API (as `libz-rs-sys` implements it in Rust), wrapped: the only
//! `unsafe` of stream (de)compression. Raw deflate only (the formats'
//! headers and trailers are written and checked by `stream.rs`); what the
//! stream engine needs beyond flate2's API is a preset dictionary on both
//! sides, `Z_BLOCK` stops with `data_type`, and `inflatePrime`.

use std::ffi::c_int;

use libz_rs_sys as z;

pub use z::{Z_BLOCK, Z_BUF_ERROR, Z_FINISH, Z_FULL_FLUSH, Z_OK, Z_STREAM_END, Z_SYNC_FLUSH};

/// An open raw deflate or inflate stream.
pub struct Zstream {
    /// Boxed: zlib keeps a pointer back to the stream in its state, so the
    /// stream must not move after init.
    strm: Box<z::z_stream>,
    inflate: bool,
}

/// What one call did.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub code: c_int,
    /// Input bytes taken.
    pub read: usize,
    /// Output bytes written.
    pub written: usize,
    /// zlib's `data_type` after the call (inflate: bits 5:0 unused bits in
    /// the bit buffer, 64 last block, 128 at a block boundary).
    pub data_type: c_int,
}

const STREAM_SIZE: c_int = std::mem::size_of::<z::z_stream>() as c_int;

impl Zstream {
    /// A raw deflate stream (32 KiB window) at `level` (1..=9).
    pub fn deflate(level: c_int) -> Option<Zstream> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a default z_stream (no allocator functions, so
        // the library's own) at a stable heap address that outlives the
        // stream (ended in `drop`); the version and size are the library's
        // own, so the ABI check passes.
        let r = unsafe {
            z::deflateInit2_(
                &mut *strm,
                level,
                z::Z_DEFLATED,
                -15,
                8,
                z::Z_DEFAULT_STRATEGY,
                z::zlibVersion(),
                STREAM_SIZE,
            )
        };
        (r == z::Z_OK).then_some(Zstream {
            strm,
            inflate: false,
        })
    }

    /// A raw inflate stream (32 KiB window).
    pub fn inflate() -> Option<Zstream> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: as in `deflate`.
        let r = unsafe { z::inflateInit2_(&mut *strm, -15, z::zlibVersion(), STREAM_SIZE) };
        (r == z::Z_OK).then_some(Zstream {
            strm,
            inflate: true,
        })
    }

    /// Presets the window (before the first `step`).
    pub fn set_dictionary(&mut self, dict: &[u8]) -> bool {
        let Ok(len) = u32::try_from(dict.len()) else {
            return false;
        };
        // SAFETY: the stream was initialised by `deflate`/`inflate`; `dict`
        // is valid for `len` bytes for the call, which copies it.
        let r = unsafe {
            if self.inflate {
                z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len)
            } else {
                z::deflateSetDictionary(&mut *self.strm, dict.as_ptr(), len)
            }
        };
        r == z::Z_OK
    }

    /// Inflate: inserts `bits` (0..=7) bits of `value` ahead of the input.
    pub fn prime(&mut self, bits: u8, value: u8) -> bool {
        if !self.inflate || bits > 7 {
            return false;
        }
        // SAFETY: an initialised inflate stream; zlib only stores the bits.
        let r = unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), c_int::from(value)) };
        r == z::Z_OK
    }

    /// One call of deflate or inflate from `input` into `output`.
    pub fn step(&mut self, input: &[u8], output: &mut [u8], flush: c_int) -> Step {
        // Jobs are at most MAX_XFER (a u32) long; clamp anyway.
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = avail_in;
        s.next_out = output.as_mut_ptr();
        s.avail_out = avail_out;
        // SAFETY: an initialised stream; `next_in`/`next_out` point at
        // `avail_in`/`avail_out` valid bytes of slices that outlive the call
        // (zlib reads and writes only within them), and are cleared below so
        // no dangling pointer stays in the stream.
        let code = unsafe {
            if self.inflate {
                z::inflate(s, flush)
            } else {
                z::deflate(s, flush)
            }
        };
        let step = Step {
            code,
            read: (avail_in - s.avail_in) as usize,
            written: (avail_out - s.avail_out) as usize,
            data_type: s.data_type,
        };
        s.next_in = std::ptr::null();
        s.avail_in = 0;
        s.next_out = std::ptr::null_mut();
        s.avail_out = 0;
        step
    }
}

impl Drop for Zstream {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised and is ended once, here.
        unsafe {
            if self.inflate {
                z::inflateEnd(&mut *self.strm);
            } else {
                z::deflateEnd(&mut *self.strm);
            }
        }
    }
}
