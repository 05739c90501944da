//! A VMM speaking arbitrary vfio-user to a real `transport::Connection` over
//! a `UnixStream::pair()`, served against a real `PciFunction<WdDevice>` on
//! the software accelerator (as `daemon::instance` builds it).
//!
//! The input is a list of chunks. Most become one well-framed message (the
//! harness sets `size`, numbers the ids, and can attach a memfd to DMA_MAP or
//! an eventfd to SET_IRQS, since fds cannot come from bytes); a chunk may
//! also be raw bytes that break the framing. A writer thread sends them all
//! and shuts its half; the fuzz thread reads replies until the server closes.
//!
//! Asserted: nothing panics; `run` ends with `Ok` (peer closed, or a bad
//! frame it refused), never an I/O error; every reply is a well-formed reply
//! header of the size it announces; and until the first raw chunk the
//! server answers every request that wants an answer, in order, with its id
//! and command — so a refused request never costs the stream its sync.
#![no_main]

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
use wdvirt::transport::Connection;
use wdvirt::transport::wire::{
    Command, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_COMMAND, FLAG_TYPE_MASK, FLAG_TYPE_REPLY,
    HEADER_SIZE,
};
use wdvirt::vdev::wd::WdConfig;
use wdvirt_fuzz::{Input, function, memfd};

struct Chunk {
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
    /// (id, cmd) of the reply this message must get, if any.
    expect: Option<(u16, u16)>,
    raw: bool,
}

fn header(id: u16, cmd: u16, body_len: usize, flags: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_SIZE + body_len);
    h.extend_from_slice(&id.to_ne_bytes());
    h.extend_from_slice(&cmd.to_ne_bytes());
    h.extend_from_slice(&((HEADER_SIZE + body_len) as u32).to_ne_bytes());
    h.extend_from_slice(&flags.to_ne_bytes());
    h.extend_from_slice(&0u32.to_ne_bytes());
    h
}

fn chunks(data: &[u8]) -> Vec<Chunk> {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut out = Vec::new();
    let mut id: u16 = 0;
    if mode & 1 == 0 {
        // A valid VERSION first (major 0, minor 0, no capabilities), so the
        // fuzzer starts past the handshake; with bit 0 set it must do it.
        let mut bytes = header(id, Command::Version as u16, 4, FLAG_TYPE_COMMAND);
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        out.push(Chunk {
            bytes,
            fd: None,
            expect: Some((id, Command::Version as u16)),
            raw: false,
        });
        id += 1;
    }
    while !input.is_empty() && out.len() < 64 {
        let h = input.u8();
        let cmd = (input.u8() % 20) as u16;
        let len = (input.u16() % 512) as usize;
        if h & 7 == 7 {
            out.push(Chunk {
                bytes: input.take(len).to_vec(),
                fd: None,
                expect: None,
                raw: true,
            });
            continue;
        }
        let mut body = Vec::new();
        if h & 0x80 != 0
            && (cmd == Command::RegionRead as u16 || cmd == Command::RegionWrite as u16)
        {
            // Shaped register access: region 0..=8, an offset near the
            // start of it, 0..=16 bytes.
            let region = (input.u8() % 9) as u32;
            let offset = input.u16() as u64;
            let count = (input.u8() % 17) as u32;
            body.extend_from_slice(&offset.to_ne_bytes());
            body.extend_from_slice(&region.to_ne_bytes());
            body.extend_from_slice(&count.to_ne_bytes());
            if cmd == Command::RegionWrite as u16 {
                body.extend_from_slice(input.take(count as usize));
            }
        } else {
            body.extend_from_slice(input.take(len));
        }
        let no_reply = h & 0x08 != 0;
        let msg_type = if h & 0x30 == 0x30 {
            (h >> 6) as u32 & FLAG_TYPE_MASK // reply (1) or an unknown type
        } else {
            FLAG_TYPE_COMMAND
        };
        let flags = msg_type | if no_reply { FLAG_NO_REPLY } else { 0 };
        let fd = if h & 0x40 != 0 && cmd == Command::DmaMap as u16 {
            Some(memfd(0x1_0000))
        } else if h & 0x40 != 0 && cmd == Command::DeviceSetIrqs as u16 {
            Some(rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd"))
        } else {
            None
        };
        let mut bytes = header(id, cmd, body.len(), flags);
        bytes.extend_from_slice(&body);
        let expect = (msg_type != FLAG_TYPE_REPLY && !no_reply).then_some((id, cmd));
        out.push(Chunk {
            bytes,
            fd,
            expect,
            raw: false,
        });
        id = id.wrapping_add(1);
    }
    out
}

/// Sends every chunk; stops quietly once the server has hung up.
fn send_all(sock: &UnixStream, chunks: &[Chunk]) {
    for c in chunks {
        let mut sent = 0;
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        while sent < c.bytes.len() {
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds;
            if sent == 0
                && let Some(fd) = &c.fd
            {
                fds = [fd.as_fd()];
                assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
            }
            let iov = [IoSlice::new(&c.bytes[sent..])];
            match sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return,
            }
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// Reads replies until EOF: (id, cmd, error flag) of each.
fn read_replies(mut sock: &UnixStream) -> Vec<(u16, u16, bool)> {
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; HEADER_SIZE];
        match sock.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return replies,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return replies,
            Err(e) => panic!("reading replies: {e}"),
        }
        let id = u16::from_ne_bytes([h[0], h[1]]);
        let cmd = u16::from_ne_bytes([h[2], h[3]]);
        let size = u32::from_ne_bytes(h[4..8].try_into().unwrap()) as usize;
        let flags = u32::from_ne_bytes(h[8..12].try_into().unwrap());
        let error = u32::from_ne_bytes(h[12..16].try_into().unwrap());
        assert_eq!(flags & FLAG_TYPE_MASK, FLAG_TYPE_REPLY, "reply {id} type");
        assert!(size >= HEADER_SIZE, "reply {id} size {size}");
        let is_error = flags & FLAG_ERROR != 0;
        if is_error {
            assert_ne!(error, 0, "error reply {id} without an errno");
            assert_eq!(size, HEADER_SIZE, "error reply {id} with a body");
        }
        let mut body = vec![0u8; size - HEADER_SIZE];
        sock.read_exact(&mut body)
            .unwrap_or_else(|e| panic!("reply {id} announced {size} bytes: {e}"));
        replies.push((id, cmd, is_error));
    }
}

fuzz_target!(|data: &[u8]| {
    let chunks = chunks(data);
    let (client, server) = UnixStream::pair().expect("socketpair");
    let mut conn = Connection::from_stream(server).expect("connection");
    let dev = parking_lot::Mutex::new(function(WdConfig {
        queues: 2,
        max_depth: 64,
        ..WdConfig::default()
    }));
    let (ended, replies) = std::thread::scope(|s| {
        let server = s.spawn(|| {
            let ended = conn.run(&dev);
            // Closing our end is what tells the reader we are done.
            drop(conn);
            ended
        });
        let sender = s.spawn(|| send_all(&client, &chunks));
        let replies = read_replies(&client);
        // Joined by hand: the scope's own join returns once a thread's
        // closure has ended, before the thread has exited and freed its
        // thread-locals, which LeakSanitizer then reports as leaked.
        sender.join().expect("sender thread");
        (server.join().expect("server thread"), replies)
    });
    let ended = ended.unwrap_or_else(|e| panic!("the connection failed: {e}"));

    let in_sync: Vec<(u16, u16)> = chunks
        .iter()
        .take_while(|c| !c.raw)
        .filter_map(|c| c.expect)
        .collect();
    let all_framed = chunks.iter().all(|c| !c.raw);
    if all_framed {
        assert_eq!(
            ended,
            wdvirt::transport::Disconnect::PeerClosed,
            "well-framed input must be served to the end"
        );
        assert_eq!(replies.len(), in_sync.len(), "one reply per request");
    }
    for (i, want) in in_sync.iter().enumerate() {
        let Some(&(id, cmd, _)) = replies.get(i) else {
            // Only after raw bytes may the server stop early.
            assert!(!all_framed, "missing reply to {want:?}");
            break;
        };
        assert_eq!((id, cmd), *want, "reply {i} out of order");
    }
});
