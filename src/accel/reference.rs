//! Tests' independent implementation of the formats (flate2, zlib's
//! algorithm in Rust): what the engines' output is checked against.

use std::io::{Read, Write};

use wdvirt_abi::Format;

/// Decodes a whole `format` stream; panics if flate2 refuses it.
pub fn decode(format: Format, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        Format::Deflate => flate2::read::DeflateDecoder::new(data).read_to_end(&mut out),
        Format::Zlib => flate2::read::ZlibDecoder::new(data).read_to_end(&mut out),
        Format::Gzip => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
    }
    .expect("flate2 refuses the stream");
    out
}

/// Encodes `data` as one `format` stream at zlib's default level.
pub fn encode(format: Format, data: &[u8]) -> Vec<u8> {
    let lvl = flate2::Compression::new(6);
    match format {
        Format::Deflate => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), lvl);
            e.write_all(data).and_then(|()| e.finish())
        }
        Format::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), lvl);
            e.write_all(data).and_then(|()| e.finish())
        }
        Format::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), lvl);
            e.write_all(data).and_then(|()| e.finish())
        }
    }
    .expect("flate2 encodes into memory")
}
