//! Framing, VERSION and connection lifecycle, byte by byte: exact errnos for
//! malformed frames, No_reply, ordering, stop, and two connections at once.

mod transport_support;

use std::io::Write;
use std::time::{Duration, Instant};

use transport_support::*;
use wdvirt::transport::Disconnect;
use wdvirt::transport::wire::{self, Header};
use zerocopy::IntoBytes;

const EINVAL: i32 = libc::EINVAL;

#[test]
fn command_before_version_is_einval_then_version_works() {
    let (served, mut c) = serve_pair();
    assert_eq!(c.region_read(0, 0, 4).errno(), EINVAL);
    assert_eq!(
        c.request(4, &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .errno(),
        EINVAL
    );
    c.version();
    assert_eq!(c.region_read(0, 0, 4).ok().body.len(), 16 + 4);
    // A second VERSION is refused.
    assert_eq!(c.request(1, &version_body("{}"), &[]).errno(), EINVAL);
    drop(c);
    assert_eq!(served.join().unwrap(), Disconnect::PeerClosed);
}

#[test]
fn version_reply_fits_the_request_and_is_nul_terminated() {
    for json in [QEMU_CAPS, r#"{"capabilities":{"max_msg_fds":1}}"#, "{}"] {
        let (_served, mut c) = serve_pair();
        let body = version_body(json);
        let r = c.request(1, &body, &[]).ok();
        assert!(
            r.header.size as usize <= 16 + body.len(),
            "{json}: reply {} B",
            r.header.size
        );
        assert_eq!(&r.body[..4], &[0, 0, 0, 0], "major 0 minor 0");
        assert_eq!(*r.body.last().unwrap(), 0, "NUL-terminated");
        let v: serde_json::Value = serde_json::from_slice(&r.body[4..r.body.len() - 1]).unwrap();
        assert!(v.is_object());
    }
    // QEMU's own request: 214 bytes, and the reply keeps the essentials.
    let (_served, mut c) = serve_pair();
    let r = c.version();
    assert!(r.header.size <= 214);
    let v: serde_json::Value = serde_json::from_slice(&r.body[4..r.body.len() - 1]).unwrap();
    assert_eq!(v["capabilities"]["max_msg_fds"], 16);
    assert_eq!(v["capabilities"]["max_data_xfer_size"], 1 << 20);
    assert_eq!(v["capabilities"]["pgsizes"], 4096);
    assert_eq!(v["capabilities"]["write_multiple"], true);
}

#[test]
fn malformed_version_is_einval() {
    for body in [version_body("{nope"), version_body("[]"), vec![0, 0], {
        let mut b = version_body("{}");
        b.pop();
        b
    }] {
        let (_served, mut c) = serve_pair();
        assert_eq!(c.request(1, &body, &[]).errno(), EINVAL, "{body:?}");
        // Still not negotiated: the next command is refused too.
        assert_eq!(c.region_read(0, 0, 4).errno(), EINVAL);
        c.version();
    }
}

#[test]
fn truncated_bodies_are_einval_and_the_stream_stays_in_sync() {
    let (served, mut c) = serve_pair();
    c.version();
    // Each well-framed but too short for its struct.
    for (cmd, len) in [
        (2u16, 31usize),
        (3, 23),
        (4, 15),
        (5, 31),
        (7, 15),
        (8, 19),
        (9, 15),
        (10, 15),
        (15, 7),
    ] {
        assert_eq!(
            c.request(cmd, &vec![0u8; len], &[]).errno(),
            EINVAL,
            "cmd {cmd} len {len}"
        );
    }
    // REGION_WRITE whose data is shorter than its count.
    let mut body = RawClient::region_write_body(0, 0, &[1, 2, 3, 4]);
    body.truncate(18);
    assert_eq!(c.request(10, &body, &[]).errno(), EINVAL);
    assert!(c.region_read(0, 0, 4).ok().body.len() == 20);
    assert_eq!(served.stats.snapshot().errors_sent, 10);
}

#[test]
fn header_size_below_16_is_einval_then_close() {
    let (served, mut c) = serve_pair();
    c.version();
    let h = Header {
        id: 77,
        cmd: 9,
        size: 12,
        flags: 0,
        error: 0,
    };
    c.send_raw(h.as_bytes(), &[]);
    let r = c.recv();
    assert_eq!(r.header.id, 77);
    assert_eq!(r.errno(), EINVAL);
    c.expect_eof();
    assert_eq!(served.join().unwrap(), Disconnect::BadFrame { size: 12 });
}

#[test]
fn oversize_header_gets_an_error_then_close() {
    let (served, mut c) = serve_pair();
    c.version();
    let h = Header {
        id: 5,
        cmd: 10,
        size: 64 << 20,
        flags: 0,
        error: 0,
    };
    c.send_raw(h.as_bytes(), &[]);
    let r = c.recv();
    assert_eq!(r.header.id, 5);
    assert_eq!(r.errno(), libc::E2BIG);
    c.expect_eof();
    let stats = served.stats.clone();
    let log = served.log.clone();
    assert_eq!(
        served.join().unwrap(),
        Disconnect::BadFrame { size: 64 << 20 }
    );
    assert_eq!(stats.snapshot().bad_frames, 1);
    assert_eq!(log.lock().disconnected, 1);
}

#[test]
fn unknown_command_is_enosys_and_the_next_message_is_answered() {
    let (_served, mut c) = serve_pair();
    c.version();
    assert_eq!(
        c.request(99, &[1, 2, 3, 4, 5, 6, 7], &[]).errno(),
        libc::ENOSYS
    );
    assert_eq!(
        c.request(6, &[0u8; 16], &[]).errno(),
        libc::ENOSYS,
        "GET_REGION_IO_FDS"
    );
    assert_eq!(
        c.request(11, &[0u8; 16], &[]).errno(),
        libc::ENOSYS,
        "DMA_READ from a client"
    );
    let r = c.region_read(7, 0, 4).ok();
    assert_eq!(r.body.len(), 20);
}

#[test]
fn an_unknown_device_feature_is_enotsup_after_its_body() {
    let (_served, mut c) = serve_pair();
    c.version();
    // argsz, flags (GET | feature 11 = MIG_DATA_SIZE, not in vfio-user),
    // then payload.
    let mut body = vec![0u8; 16];
    body[..4].copy_from_slice(&16u32.to_ne_bytes());
    body[4..8].copy_from_slice(&(0x10000u32 | 11).to_ne_bytes());
    assert_eq!(c.request(16, &body, &[]).errno(), libc::ENOTSUP);
    c.region_read(0, 0, 8).ok();
}

#[test]
fn fds_on_a_command_that_takes_none_are_einval() {
    let (_served, mut c) = serve_pair();
    c.version();
    let e = eventfd();
    let a = wire::RegionAccess {
        offset: 0,
        region: 0,
        count: 4,
    };
    assert_eq!(
        c.request(9, a.as_bytes(), &borrow(std::slice::from_ref(&e)))
            .errno(),
        EINVAL
    );
    c.region_read(0, 0, 4).ok();
}

#[test]
fn no_reply_write_gets_no_reply_even_on_error() {
    let (served, mut c) = serve_pair();
    c.version();
    // Posted write that succeeds, one the device refuses, one out of range.
    c.send(
        10,
        wire::FLAG_NO_REPLY,
        &RawClient::region_write_body(0, 0x10, &[0xaa; 4]),
        &[],
    );
    c.send(
        10,
        wire::FLAG_NO_REPLY,
        &RawClient::region_write_body(0, BAR0_BUSY, &[1; 4]),
        &[],
    );
    c.send(
        10,
        wire::FLAG_NO_REPLY,
        &RawClient::region_write_body(0, BAR0_SIZE, &[1; 4]),
        &[],
    );
    // The next thing read is the reply to this read.
    let r = c.region_read(0, 0x10, 4).ok();
    assert_eq!(&r.body[16..], &[0xaa; 4]);
    let s = served.stats.snapshot();
    assert_eq!(s.posted_write_errors, 2);
    assert_eq!(s.errors_sent, 0);
    // A waited write to the busy register does get EBUSY.
    assert_eq!(c.region_write(0, BAR0_BUSY, &[1; 4]).errno(), libc::EBUSY);
}

#[test]
fn stray_replies_from_the_client_are_dropped() {
    let (served, mut c) = serve_pair();
    c.version();
    c.send(11, wire::FLAG_TYPE_REPLY, &[0u8; 16], &[]);
    c.send(11, wire::FLAG_TYPE_REPLY | wire::FLAG_ERROR, &[], &[]);
    c.region_read(0, 0, 4).ok();
    assert_eq!(served.stats.snapshot().stray_replies, 2);
    // An unknown message type is refused.
    let id = c.send(9, 2, &[0u8; 16], &[]);
    let r = c.recv();
    assert_eq!((r.header.id, r.errno()), (id, EINVAL));
}

#[test]
fn stop_handle_ends_an_idle_connection() {
    let (served, mut c) = serve_pair();
    c.version();
    served.stop.stop();
    let log = served.log.clone();
    assert_eq!(served.join().unwrap(), Disconnect::Stopped);
    assert_eq!(log.lock().disconnected, 1);
    drop(c);
}

#[test]
fn a_stuck_peer_does_not_delay_another_connection() {
    // Two listeners, one connection each, each served on its own thread.
    let (_d1, stuck, mut s) = serve_listener();
    s.version();
    // Half a header, then silence.
    let h = Header {
        id: 1,
        cmd: 9,
        size: 32,
        flags: 0,
        error: 0,
    };
    s.stream.write_all(&h.as_bytes()[..7]).unwrap();

    let (_d2, other, mut c) = serve_listener();
    let t0 = Instant::now();
    c.version();
    for i in 0..50u32 {
        c.region_write(0, 0x40, &i.to_ne_bytes()).ok();
        let r = c.region_read(0, 0x40, 4).ok();
        assert_eq!(&r.body[16..], &i.to_ne_bytes());
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "served while the other peer is stuck"
    );
    assert!(
        !stuck.thread.is_finished(),
        "the stuck connection is still waiting"
    );

    // The stuck one can still be stopped mid-message.
    stuck.stop.stop();
    assert_eq!(stuck.join().unwrap(), Disconnect::Stopped);
    drop(c);
    assert_eq!(other.join().unwrap(), Disconnect::PeerClosed);
}

#[test]
fn peer_closing_mid_message_is_peer_closed() {
    let (served, mut c) = serve_pair();
    c.version();
    let h = Header {
        id: 1,
        cmd: 10,
        size: 40,
        flags: 0,
        error: 0,
    };
    c.stream.write_all(h.as_bytes()).unwrap();
    c.stream.write_all(&[0u8; 5]).unwrap();
    drop(c);
    assert_eq!(served.join().unwrap(), Disconnect::PeerClosed);
}
