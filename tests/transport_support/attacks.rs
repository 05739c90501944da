//! Attacks on an instance's socket that `tests/attack.rs` makes against an
//! instance in the test process and `tests/attack_daemon.rs` against a
//! `wdvirt daemon` process. Each takes the attacker's socket; what must
//! hold after it (the victim, fds, memory, a fresh VMM) is the caller's
//! to check, through `check` where an attack has several steps.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use wdvirt::transport::wire::Header;
use zerocopy::IntoBytes;

use super::RawClient;

/// A header of `cmd` claiming `size` bytes.
pub fn header(cmd: u16, size: u32) -> Header {
    Header {
        id: 1,
        cmd,
        size,
        flags: 0,
        error: 0,
    }
}

/// Waits until the peer closed `s` (EOF or reset), or fails after `within`.
pub fn assert_closed_by_server(s: &mut UnixStream, within: Duration, what: &str) {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // an error reply before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: not closed after {:?}: {e}", t.elapsed()),
        }
    }
}

/// A raw VMM on `socket`, past VERSION.
pub fn raw_client(socket: &Path) -> RawClient {
    let mut c = RawClient::new(UnixStream::connect(socket).unwrap());
    c.version();
    c
}

/// A header claiming 4 GiB (E2BIG, then closed); VERSION with a megabyte
/// of JSON (an ordinary reply: the unknown capability is ignored); a
/// header past the largest message (E2BIG, closed); 4 KiB of random bytes
/// after a valid VERSION, four times (refused or ended; closed within
/// `closed_within`, the message deadline and some). `check` runs after
/// each of the three kinds.
pub fn framing(socket: &Path, closed_within: Duration, check: &mut dyn FnMut(&str)) {
    let mut c = RawClient::new(UnixStream::connect(socket).unwrap());
    c.send_raw(header(1, u32::MAX).as_bytes(), &[]);
    assert_eq!(c.recv().errno(), libc::E2BIG);
    c.expect_eof();
    check("a header claiming 4 GiB");

    let mut c = RawClient::new(UnixStream::connect(socket).unwrap());
    let mut json = String::from(r#"{"capabilities":{"x":""#);
    json.push_str(&"a".repeat(1 << 20));
    json.push_str(r#""}}"#);
    let body = super::version_body(&json);
    let id = c.send(1, 0, &body, &[]);
    let r = c.recv().ok();
    assert_eq!(r.header.id, id);
    assert!(r.header.size < 256, "reply of {} bytes", r.header.size);
    assert!(!c.region_read(0, 0, 4).is_error());
    drop(c);
    let mut c = RawClient::new(UnixStream::connect(socket).unwrap());
    c.send_raw(header(1, 2 << 20).as_bytes(), &[]);
    assert_eq!(c.recv().errno(), libc::E2BIG);
    c.expect_eof();
    check("VERSION with a megabyte of JSON, and a message past the largest");

    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for _ in 0..4 {
        let mut s = UnixStream::connect(socket).unwrap();
        let mut c = RawClient::new(s.try_clone().unwrap());
        c.version();
        let junk: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
        let _ = s.write_all(&junk);
        assert_closed_by_server(&mut s, closed_within, "random bytes");
    }
    check("random bytes after VERSION");
}

/// Containment failure 1 of issue 21: an unfinished GET_INFO, past
/// VERSION, sent one byte per `sendmsg`, each byte with 253 memfds.
/// `during` runs once the server has had 300 ms to read the first 31
/// bytes (the caller counts the server's fds then); the last byte gets
/// the message refused with EINVAL for its fds alone, and the same
/// GET_INFO without fds is served before and after (the stream in sync).
pub fn fd_flood_in_an_unfinished_message(socket: &Path, during: &mut dyn FnMut()) {
    let fds: Vec<OwnedFd> = (0..253)
        .map(|_| rustix::fs::memfd_create("attack", rustix::fs::MemfdFlags::CLOEXEC).unwrap())
        .collect();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let mut s = UnixStream::connect(socket).unwrap();
    let mut c = RawClient::new(s.try_clone().unwrap());
    c.version();
    let info = wdvirt::transport::wire::DeviceInfo {
        argsz: 16,
        ..Default::default()
    };
    assert!(!c.request(4, info.as_bytes(), &[]).is_error());
    let mut msg = header(4, 32).as_bytes().to_vec();
    msg.extend_from_slice(info.as_bytes());
    for b in &msg[..31] {
        super::send_with_fds(&s, std::slice::from_ref(b), &borrowed).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    during();
    super::send_with_fds(&s, &msg[31..], &borrowed).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    let error = u32::from_ne_bytes(reply[12..16].try_into().unwrap());
    assert_eq!(error, libc::EINVAL as u32, "GET_INFO with fds");
    assert!(!c.request(4, info.as_bytes(), &[]).is_error());
}

/// A SET_IRQS carrying 253 eventfds, past VERSION, with a body that is
/// served when it carries one: refused with EINVAL for its fds (never
/// served short of them); the same body with one eventfd is served before
/// and after.
pub fn hundreds_of_fds_in_one_message(socket: &Path) {
    use vfio_bindings::bindings::vfio::{
        VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX,
    };
    let efds: Vec<OwnedFd> = (0..253).map(|_| super::eventfd()).collect();
    let mut c = raw_client(socket);
    let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    let msix = VFIO_PCI_MSIX_IRQ_INDEX;
    let one = [efds[0].as_fd()];
    assert!(!c.set_irqs(flags, msix, 0, 1, &one).is_error());
    let r = c.set_irqs(flags, msix, 0, 1, &super::borrow(&efds));
    assert_eq!(r.errno(), libc::EINVAL);
    assert!(!c.set_irqs(flags, msix, 0, 1, &one).is_error());
}

/// 17 bytes of a 116-byte DMA_MAP, the 17th carrying the VMM's own end of
/// the connection, then close; returns when it closed. The server must
/// see the close at once, not at the message deadline (before: never): the
/// caller times a fresh VMM from then.
pub fn own_socket_in_half_a_message(socket: &Path) -> Instant {
    let s = UnixStream::connect(socket).unwrap();
    let mut msg = header(2, 116).as_bytes().to_vec();
    msg.extend_from_slice(&[0; 100]);
    (&s).write_all(&msg[..16]).unwrap();
    super::send_with_fds(&s, &msg[16..17], &[s.as_fd()]).unwrap();
    drop(s);
    Instant::now()
}

/// 300 connections at once to an instance a raw VMM holds: each closed by
/// the server. Returns how long the 300 refusals took.
pub fn hundreds_of_connections(socket: &Path) -> Duration {
    let busy = raw_client(socket);
    let t = Instant::now();
    let mut conns: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(socket).unwrap())
        .collect();
    for s in &mut conns {
        assert_closed_by_server(s, Duration::from_secs(10), "an extra connection");
    }
    let took = t.elapsed();
    drop(conns);
    drop(busy);
    took
}
