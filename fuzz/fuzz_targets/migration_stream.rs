//! The migration stream reader (`migration::stream::StreamReader`) on
//! arbitrary bytes, fed in pieces whose sizes the input chooses: never
//! panics, never holds more than its cap, and what it accepts keeps its
//! promises. The first byte picks the piece size; the rest is the stream.
//! Read in pieces or whole, a stream gets the same verdict (the first
//! error found may differ: pieces reveal a bad prefix before the cap is
//! reached), and an accepted state survives a re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wdvirt::migration::stream::{self, Compat, QueueCompat, StreamReader};

const CAP: usize = 1 << 16;

fn expect() -> Compat {
    Compat {
        abi_version: 1 << 16 | 1,
        type_name: "t".into(),
        queues: vec![QueueCompat { max_depth: 8, ops: 3 }; 2],
        max_xfer: 4096,
    }
}

fn read(pieces: usize, data: &[u8]) -> Result<Vec<u8>, stream::StreamError> {
    let mut r = StreamReader::new(expect(), CAP);
    for piece in data.chunks(pieces) {
        r.push(piece)?;
        assert!(r.received() <= CAP);
    }
    r.finish()
}

fuzz_target!(|input: &[u8]| {
    let Some((&size, data)) = input.split_first() else {
        return;
    };
    let pieces = usize::from(size).max(1);
    let piecewise = read(pieces, data);
    let whole = stream::decode(data, &expect(), CAP);
    match (piecewise, whole) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b);
            let again = stream::encode(&expect(), &a);
            assert_eq!(stream::decode(&again, &expect(), CAP), Ok(a));
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("pieces of {pieces}: {a:?}, whole: {b:?}"),
    }
});
