//! Migration v2 over vfio-user, through a real socket: DEVICE_FEATURE
//! (MIGRATION, MIG_DEVICE_STATE, DMA_LOGGING_START/STOP/REPORT),
//! MIG_DATA_READ and MIG_DATA_WRITE, as a VMM sends them.
//!
//! The protocol cases run against the transport's fake device
//! (`transport_support::FakeDevice::migratable`: BAR0 is its register block,
//! `quiesce` sets a flag that refuses BAR0 writes, every `Migratable` call is
//! logged), driven by wdvirt's own client (`wdvirt::vmm::client`) or by raw
//! bytes for the malformed ones. The dirty-page cases run the real device
//! (`PciFunction<WdDevice>` on the software accelerator) with the guest
//! driver's jobs.

mod transport_support;

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use parking_lot::Mutex;
use transport_support::{FakeDevice, Log, Served, serve_device};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};
use wdvirt::accel::soft::SoftAccel;
use wdvirt::migration::fsm::{self, ALL_STATES, MigState};
use wdvirt::migration::stream::{self, Compat};
use wdvirt::transport::wire;
use wdvirt::transport::{Connection, Limits, Listener};
use wdvirt::vdev::pci::{Interrupts, PciFunction};
use wdvirt::vdev::wd::{WdConfig, WdDevice};
use wdvirt::vmm::client::VfioUserClient;
use wdvirt::vmm::{GuestRam, LoopbackVmm, VmmError};
use wdvirt_abi::{CQE_SIZE, JobStatus, Opcode};
use wdvirt_guest::{Device, JobSpec};
use zerocopy::IntoBytes;

const GET: u32 = VFIO_DEVICE_FEATURE_GET;
const SET: u32 = VFIO_DEVICE_FEATURE_SET;
const PROBE: u32 = VFIO_DEVICE_FEATURE_PROBE;

/// A fake device served on one end of a socket pair, under `limits`.
fn serve_fake(dev: FakeDevice, log: Arc<Mutex<Log>>, limits: &Limits) -> (Served, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    let conn = Connection::from_stream(a)
        .unwrap()
        .with_limits(limits, Default::default());
    (serve_device(conn, dev, log), b)
}

/// A migratable fake device (BAR0 filled with `pattern`) and a client.
fn fake(pattern: u8) -> (Served, VfioUserClient, Arc<Mutex<Log>>) {
    fake_with(pattern, &Limits::default(), |_| {})
}

fn fake_with(
    pattern: u8,
    limits: &Limits,
    change: impl FnOnce(&mut FakeDevice),
) -> (Served, VfioUserClient, Arc<Mutex<Log>>) {
    let (mut dev, log) = FakeDevice::migratable();
    for (i, b) in dev.regions[0].iter_mut().enumerate() {
        *b = pattern ^ (i as u8).wrapping_mul(31);
    }
    change(&mut dev);
    let (served, sock) = serve_fake(dev, log.clone(), limits);
    let client = VfioUserClient::from_stream(sock).unwrap();
    (served, client, log)
}

fn errno(r: Result<impl std::fmt::Debug, VmmError>) -> i32 {
    match r {
        Err(VmmError::Refused { errno, .. }) => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn calls(log: &Arc<Mutex<Log>>) -> Vec<&'static str> {
    std::mem::take(&mut log.lock().mig_calls)
}

fn bar0(c: &mut VfioUserClient) -> Vec<u8> {
    let mut b = vec![0u8; transport_support::BAR0_SIZE as usize];
    c.region_read(0, 0, &mut b).unwrap();
    b
}

/// What each direct arc must call on the device, written out here apart
/// from the transport's own table.
fn arc_calls(from: MigState, to: MigState) -> &'static [&'static str] {
    use MigState::*;
    match (from, to) {
        (Running, Stop) => &["quiesce"],
        (Stop, Running) => &["resume"],
        (Running, PreCopy) => &["compat"],
        (PreCopy, StopCopy) => &["quiesce", "save"],
        (Stop, StopCopy) => &["compat", "save"],
        (Stop, Resuming) => &["compat"],
        (Resuming, Stop) => &["restore"],
        (PreCopy, Running) | (StopCopy, Stop) => &[],
        _ => panic!("{from:?} -> {to:?} is not an arc"),
    }
}

/// A valid stream for the fake device: its compat and a BAR0-sized state.
fn valid_stream(fill: u8) -> Vec<u8> {
    stream::encode(&transport_support::fake_compat(), &vec![fill; 0x1000])
}

#[test]
fn the_migration_feature_is_advertised_only_by_a_device_that_can_migrate() {
    let (_s, mut c, _log) = fake(1);
    let flags = c.migration_flags().unwrap();
    assert_eq!(
        flags,
        u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY)
    );
    for (feature, ops, ok) in [
        (VFIO_DEVICE_FEATURE_MIGRATION, GET, true),
        (VFIO_DEVICE_FEATURE_MIGRATION, SET, false),
        (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, GET | SET, true),
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_START, SET, true),
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_START, GET, false),
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, SET, true),
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, GET, true),
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, 0, true),
        (3, 0, false),
    ] {
        assert_eq!(
            c.probe(feature, ops).unwrap(),
            ok,
            "feature {feature} ops {ops:#x}"
        );
    }
    assert_eq!(c.mig_state().unwrap(), MigState::Running);

    // A device without a migration side has none of the five features.
    let (dev, log) = FakeDevice::new();
    let (_s2, sock) = serve_fake(dev, log, &Limits::default());
    let mut plain = VfioUserClient::from_stream(sock).unwrap();
    assert_eq!(errno(plain.migration_flags()), libc::ENOTSUP);
    assert_eq!(errno(plain.mig_state()), libc::ENOTSUP);
    assert_eq!(
        errno(plain.dirty_log_start(4096, &[(0, 1 << 20)])),
        libc::ENOTSUP
    );
    assert_eq!(errno(plain.mig_read(16)), libc::ENOTSUP);
    for f in [1, 2, 6, 7, 8] {
        assert!(!plain.probe(f, 0).unwrap());
    }
}

#[test]
fn device_feature_flags_and_sizes_are_checked_before_the_feature() {
    let (_s, mut c, _log) = fake(1);
    let feature = |c: &mut VfioUserClient, argsz: u32, flags: u32, data: &[u8]| {
        let mut body = wire::DeviceFeature { argsz, flags }.as_bytes().to_vec();
        body.extend_from_slice(data);
        errno(c.request(wire::Command::DeviceFeature, &body, &[]))
    };
    let mig = VFIO_DEVICE_FEATURE_MIGRATION;
    assert_eq!(
        feature(&mut c, 4, mig | GET, &[]),
        libc::EINVAL,
        "argsz < 8"
    );
    assert_eq!(
        feature(&mut c, 64, mig | 1 << 19, &[]),
        libc::EINVAL,
        "unknown flag"
    );
    assert_eq!(feature(&mut c, 64, mig, &[]), libc::EINVAL, "no operation");
    assert_eq!(
        feature(&mut c, 64, mig | GET | SET, &[]),
        libc::EINVAL,
        "GET and SET"
    );
    assert_eq!(
        feature(&mut c, 64, 11 | GET, &[]),
        libc::ENOTSUP,
        "MIG_DATA_SIZE"
    );
    assert_eq!(feature(&mut c, 64, 0xffff | GET, &[]), libc::ENOTSUP);
    assert_eq!(
        feature(&mut c, 64, mig | SET, &[]),
        libc::EINVAL,
        "SET MIGRATION"
    );
    assert_eq!(
        feature(&mut c, 8, mig | GET, &[]),
        libc::EINVAL,
        "no room for the reply"
    );
    assert_eq!(
        feature(&mut c, 64, mig | PROBE | SET, &[]),
        libc::EINVAL,
        "PROBE of SET"
    );
    // A PROBE reply echoes the request.
    let probe = wire::DeviceFeature {
        argsz: 8,
        flags: mig | PROBE | GET,
    };
    let reply = c
        .request(wire::Command::DeviceFeature, probe.as_bytes(), &[])
        .unwrap();
    assert_eq!(reply, probe.as_bytes());
    let state = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    assert_eq!(
        feature(&mut c, 64, state | SET, &[2, 0]),
        libc::EINVAL,
        "short data"
    );
    // The stream stays in sync after every refusal.
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    let mut raw = [0u8; 4];
    c.region_read(0, 0, &mut raw).unwrap();
}

/// Every pair of states, set through the socket: each allowed target is
/// reached by the fsm's path with exactly the device calls of its arcs;
/// each forbidden one gets the fsm's errno and leaves state and device as
/// they were.
#[test]
fn every_pair_of_states_set_through_the_socket() {
    let usable = [
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::PreCopy,
    ];
    let mut refused = 0;
    let mut taken = 0;
    for from in usable {
        for target in 0..=9u32 {
            let (_s, mut c, log) = fake(7);
            assert_eq!(c.set_mig_state(from).unwrap(), from);
            if from == MigState::Resuming {
                c.mig_write(&valid_stream(7), 333).unwrap();
            }
            calls(&log);
            let expect = MigState::from_u32(target).and_then(|t| fsm::path(from, t));
            let got = c.set_mig_state_raw(target);
            match expect {
                Ok(steps) => {
                    taken += 1;
                    assert_eq!(got.unwrap() as u32, target, "{from:?} -> {target}");
                    assert_eq!(c.mig_state().unwrap() as u32, target);
                    let mut at = from;
                    let mut want = Vec::new();
                    for s in steps {
                        want.extend_from_slice(arc_calls(at, s));
                        at = s;
                    }
                    assert_eq!(calls(&log), want, "{from:?} -> {target}");
                }
                Err(r) => {
                    refused += 1;
                    assert_eq!(errno(got), r.errno() as i32, "{from:?} -> {target}");
                    assert_eq!(c.mig_state().unwrap(), from, "{from:?} -> {target}");
                    assert!(calls(&log).is_empty(), "{from:?} -> {target}");
                }
            }
        }
    }
    // 5 × 10 targets: ERROR, the two P2P states, 8 and 9 are refused from
    // everywhere, and STOP_COPY -> PRE_COPY.
    assert_eq!((taken, refused), (24, 26));
}

#[test]
fn a_failed_arc_leaves_the_device_in_error_until_a_reset() {
    let (_s, mut c, log) = fake_with(3, &Limits::default(), |d| {
        d.mig.as_mut().unwrap().fail = Some("resume");
    });
    c.set_mig_state(MigState::Stop).unwrap();
    assert_eq!(errno(c.set_mig_state(MigState::Running)), libc::EBUSY);
    assert_eq!(c.mig_state().unwrap(), MigState::Error);
    for s in ALL_STATES {
        assert_eq!(errno(c.set_mig_state(s)), libc::EINVAL, "{s:?} from ERROR");
        assert_eq!(c.mig_state().unwrap(), MigState::Error);
    }
    assert_eq!(errno(c.mig_read(64)), libc::EINVAL);
    assert_eq!(errno(c.mig_write(b"x", 1)), libc::EINVAL);
    calls(&log);
    c.reset().unwrap();
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    assert_eq!(log.lock().resets, 1);
    // And the machine works again.
    c.set_mig_state(MigState::Stop).unwrap();
    c.set_mig_state(MigState::Running).unwrap();
    assert_eq!(calls(&log), ["quiesce", "resume"]);
}

/// A device that cannot stop in time (EBUSY from quiesce: it runs on as
/// before) leaves the migration where it was, not in ERROR: the VMM tries
/// again and the stream reads whole.
#[test]
fn a_quiesce_that_fails_busy_leaves_the_state_where_it_was() {
    let busy_once = |d: &mut transport_support::FakeDevice| {
        d.mig.as_mut().unwrap().fail = Some("quiesce");
    };
    let (_s, mut c, log) = fake_with(3, &Limits::default(), busy_once);
    c.set_mig_state(MigState::PreCopy).unwrap();
    let mut whole = c.mig_read_all(1000).unwrap();
    assert_eq!(errno(c.set_mig_state(MigState::StopCopy)), libc::EBUSY);
    assert_eq!(c.mig_state().unwrap(), MigState::PreCopy);
    // The device runs on: its registers take writes.
    c.region_write(0, 0x10, &[1, 2, 3, 4]).unwrap();
    c.set_mig_state(MigState::StopCopy).unwrap();
    whole.extend(c.mig_read_all(1000).unwrap());
    let compat = transport_support::fake_compat();
    stream::decode(&whole, &compat, 1 << 20).expect("the stream reads whole");
    c.set_mig_state(MigState::Running).unwrap();
    assert_eq!(log.lock().resets, 0);
    // The same from RUNNING straight to STOP.
    let (_s, mut c, _log) = fake_with(3, &Limits::default(), busy_once);
    assert_eq!(errno(c.set_mig_state(MigState::Stop)), libc::EBUSY);
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    c.set_mig_state(MigState::Stop).unwrap();
    c.set_mig_state(MigState::Running).unwrap();
}

/// The whole stream read in pieces from a source (PRE_COPY, then
/// STOP_COPY) and written in other pieces to a destination equals a direct
/// `encode` of the source's compat and saved state, and the destination
/// ends up with the source's registers.
#[test]
fn a_stream_read_in_chunks_and_written_to_another_server_equals_a_direct_save() {
    let (src_s, mut src, src_log) = fake_with(0x5a, &Limits::default(), |d| {
        d.mig.as_mut().unwrap().state_extra = 10_000;
    });
    let (dst_s, mut dst, dst_log) = fake(0x00);
    let regs = bar0(&mut src);
    assert_ne!(regs, bar0(&mut dst));

    src.set_mig_state(MigState::PreCopy).unwrap();
    let mut pre = Vec::new();
    loop {
        let piece = src.mig_read(7).unwrap();
        pre.extend_from_slice(&piece);
        if piece.len() < 7 {
            break;
        }
    }
    assert!(src.mig_read(7).unwrap().is_empty(), "PRE_COPY has no more");
    // The source still runs: its registers take writes.
    src.region_write(0, 0x10, &[1, 2, 3, 4]).unwrap();
    let mut regs = regs;
    regs[0x10..0x14].copy_from_slice(&[1, 2, 3, 4]);

    dst.set_mig_state(MigState::Resuming).unwrap();
    dst.mig_write(&pre, 5).unwrap();

    src.set_mig_state(MigState::StopCopy).unwrap();
    assert_eq!(
        errno(src.region_write(0, 0x10, &[0])),
        libc::EBUSY,
        "quiesced: the register block takes no write"
    );
    let rest = src.mig_read_all(1000).unwrap();
    assert!(src.mig_read(1000).unwrap().is_empty());
    let mut whole = pre.clone();
    whole.extend_from_slice(&rest);

    let mut state = regs.clone();
    state.extend((0..10_000).map(|i| i as u8));
    let direct = stream::encode(&transport_support::fake_compat(), &state);
    assert_eq!(pre.len(), stream::compat_prefix_len(&direct));
    assert_eq!(whole, direct);

    dst.mig_write(&rest, 13).unwrap();
    dst.set_mig_state(MigState::Running).unwrap();
    assert_eq!(bar0(&mut dst), regs);
    assert_eq!(calls(&src_log), ["compat", "quiesce", "save"]);
    assert_eq!(calls(&dst_log), ["quiesce", "compat", "restore", "resume"]);
    // The source, told to carry on after all, resumes.
    src.set_mig_state(MigState::Running).unwrap();
    assert_eq!(calls(&src_log), ["resume"]);
    // The connections count what they did.
    let (s, d) = (src_s.stats.snapshot(), dst_s.stats.snapshot());
    assert_eq!(s.migration_bytes_read, whole.len() as u64);
    assert_eq!(d.migration_bytes_written, whole.len() as u64);
    // Source: PRE_COPY, STOP_COPY, then STOP, RUNNING; destination: STOP,
    // RESUMING, then STOP, RUNNING.
    assert_eq!((s.migration_arcs, d.migration_arcs), (4, 4));
}

/// Truncated, corrupted, oversize and overlong streams written in RESUMING
/// are refused with the stream's errno (at the write that shows it, or at
/// RESUMING -> STOP), the device is never restored, and its registers are
/// unchanged after the reset that leaves ERROR.
#[test]
fn bad_streams_are_refused_and_the_destination_is_unchanged() {
    let good = valid_stream(0xee);
    let prefix = stream::compat_prefix_len(&good);
    let mut flipped_state = good.clone();
    flipped_state[prefix + 100] ^= 4;
    let mut flipped_magic = good.clone();
    flipped_magic[0] ^= 1;
    let mut longer = good.clone();
    longer.extend_from_slice(b"xyz");
    /// (what, bytes, destination cap, errno at the write, errno at STOP)
    type Case = (&'static str, Vec<u8>, usize, Option<i32>, i32);
    let cases: [Case; 5] = [
        // (what, bytes, destination cap, errno at the write, errno at STOP)
        (
            "truncated",
            good[..good.len() - 5].to_vec(),
            1 << 20,
            None,
            libc::EINVAL,
        ),
        (
            "a flipped state bit",
            flipped_state,
            1 << 20,
            None,
            libc::EINVAL,
        ),
        (
            "a flipped magic bit",
            flipped_magic,
            1 << 20,
            Some(libc::EINVAL),
            libc::EINVAL,
        ),
        (
            "over the cap",
            good.clone(),
            4096,
            Some(libc::EFBIG),
            libc::EFBIG,
        ),
        (
            "trailing bytes",
            longer,
            1 << 20,
            Some(libc::EINVAL),
            libc::EINVAL,
        ),
    ];
    for (what, bytes, cap, at_write, at_stop) in cases {
        let limits = Limits {
            max_migration_stream: cap,
            ..Limits::default()
        };
        let (_s, mut dst, log) = fake_with(0x11, &limits, |_| {});
        let before = bar0(&mut dst);
        dst.set_mig_state(MigState::Resuming).unwrap();
        let wrote = dst.mig_write(&bytes, 1000);
        match at_write {
            None => wrote.unwrap(),
            Some(e) => {
                assert_eq!(errno(wrote), e, "{what}");
                // Later pieces are refused the same way.
                assert_eq!(errno(dst.mig_write(b"more", 4)), e, "{what}");
            }
        }
        assert_eq!(errno(dst.set_mig_state(MigState::Stop)), at_stop, "{what}");
        assert_eq!(dst.mig_state().unwrap(), MigState::Error, "{what}");
        assert!(!calls(&log).contains(&"restore"), "{what}");
        dst.reset().unwrap();
        assert_eq!(bar0(&mut dst), before, "{what}");
    }

    // A source whose state would make a stream over its own cap fails the
    // arc that saves it.
    let limits = Limits {
        max_migration_stream: 4096,
        ..Limits::default()
    };
    let (_s, mut src, _log) = fake_with(0x22, &limits, |_| {});
    assert_eq!(errno(src.set_mig_state(MigState::StopCopy)), libc::EFBIG);
    assert_eq!(src.mig_state().unwrap(), MigState::Error);
}

/// A destination that is another device refuses the compatibility block,
/// which the source sends in PRE_COPY while it still runs; the source then
/// goes back to RUNNING having never stopped.
#[test]
fn a_destination_with_another_compat_refuses_during_pre_copy() {
    type Change = fn(&mut Compat);
    let changes: [(&str, Change); 4] = [
        ("type", |c| c.type_name = "other".into()),
        ("queue count", |c| c.queues.truncate(1)),
        ("depth", |c| c.queues[1].max_depth = 128),
        ("device version", |c| c.abi_version = 2 << 16),
    ];
    for (what, change) in changes {
        let (_s, mut src, src_log) = fake(0x33);
        let regs = bar0(&mut src);
        src.set_mig_state(MigState::PreCopy).unwrap();
        let pre = src.mig_read_all(4096).unwrap();
        let (_d, mut dst, dst_log) = fake_with(0, &Limits::default(), |d| {
            change(&mut d.mig.as_mut().unwrap().compat)
        });
        dst.set_mig_state(MigState::Resuming).unwrap();
        assert_eq!(errno(dst.mig_write(&pre, 4096)), libc::EINVAL, "{what}");
        assert_eq!(errno(dst.set_mig_state(MigState::Stop)), libc::EINVAL);
        assert!(!calls(&dst_log).contains(&"restore"));
        src.set_mig_state(MigState::Running).unwrap();
        assert_eq!(
            calls(&src_log),
            ["compat"],
            "{what}: the source never stopped"
        );
        src.region_write(0, 0, &[9]).unwrap();
        assert_eq!(bar0(&mut src)[1..], regs[1..]);
    }
}

#[test]
fn a_connection_that_ends_while_logging_stops_the_log() {
    let (served, mut c, log) = fake(1);
    c.dirty_log_start(4096, &[(0, 1 << 20)]).unwrap();
    c.set_mig_state(MigState::PreCopy).unwrap();
    drop(c);
    served.join().unwrap();
    let log = log.lock();
    assert_eq!(
        log.mig_calls,
        ["dirty_log_start", "compat", "dirty_log_stop"]
    );
    assert_eq!(log.disconnected, 1);
}

#[test]
fn mig_data_messages_are_checked() {
    let (_s, mut c, _log) = fake(1);
    let read = |c: &mut VfioUserClient, argsz: u32, size: u32, extra: &[u8]| {
        let mut body = wire::MigData { argsz, size }.as_bytes().to_vec();
        body.extend_from_slice(extra);
        c.request(wire::Command::MigDataRead, &body, &[])
    };
    assert_eq!(errno(c.mig_read(8)), libc::EINVAL, "READ in RUNNING");
    assert_eq!(
        errno(c.mig_write(b"abc", 3)),
        libc::EINVAL,
        "WRITE in RUNNING"
    );
    c.set_mig_state(MigState::PreCopy).unwrap();
    assert_eq!(
        errno(read(&mut c, 8 + 16, 16, &[0])),
        libc::EINVAL,
        "long body"
    );
    assert_eq!(
        errno(read(&mut c, 8 + 15, 16, &[])),
        libc::EINVAL,
        "argsz < 8 + size"
    );
    let over = (1 << 20) + 1;
    assert_eq!(
        errno(read(&mut c, 8 + over, over, &[])),
        libc::EINVAL,
        "over 1 MiB"
    );
    assert_eq!(
        errno(c.mig_write(b"abc", 3)),
        libc::EINVAL,
        "WRITE in PRE_COPY"
    );
    let got = read(&mut c, 100, 16, &[]).unwrap();
    assert_eq!(
        got[..8],
        wire::MigData {
            argsz: 24,
            size: 16
        }
        .as_bytes()[..]
    );
    assert_eq!(got[8..16], stream::MAGIC, "PRE_COPY starts with the magic");
    assert_eq!(got[16..20], stream::STREAM_VERSION.to_le_bytes());

    c.set_mig_state(MigState::Running).unwrap();
    c.set_mig_state(MigState::Resuming).unwrap();
    let write = |c: &mut VfioUserClient, argsz: u32, size: u32, data: &[u8]| {
        let mut body = wire::MigData { argsz, size }.as_bytes().to_vec();
        body.extend_from_slice(data);
        c.request(wire::Command::MigDataWrite, &body, &[])
    };
    assert_eq!(
        errno(write(&mut c, 16, 9, b"12345678")),
        libc::EINVAL,
        "size > data"
    );
    assert_eq!(
        errno(write(&mut c, 16, 7, b"12345678")),
        libc::EINVAL,
        "size < data"
    );
    assert_eq!(
        errno(write(&mut c, 4, 8, b"WDVMIG\r\n")),
        libc::EINVAL,
        "argsz < 8"
    );
    assert!(
        write(&mut c, 8, 8, b"WDVMIG\r\n").unwrap().is_empty(),
        "no reply data"
    );
    assert!(write(&mut c, 8, 0, b"").is_ok(), "an empty piece");
}

#[test]
fn dma_logging_start_stop_and_report_are_checked() {
    let (_s, mut c, log) = fake(1);
    assert_eq!(
        errno(c.dirty_report(0x10000, 0x1000, 4096)),
        libc::EINVAL,
        "before START"
    );
    /// (what, page size, ranges, errno)
    type Bad = (&'static str, u64, Vec<(u64, u64)>, i32);
    let bad: [Bad; 6] = [
        ("page size not a power of two", 3000, vec![], libc::EINVAL),
        ("unaligned range", 4096, vec![(0x1000, 0x800)], libc::EINVAL),
        ("empty range", 4096, vec![(0x1000, 0)], libc::EINVAL),
        (
            "overlapping ranges",
            4096,
            vec![(0, 0x4000), (0x2000, 0x4000)],
            libc::EINVAL,
        ),
        (
            "wrapping range",
            4096,
            vec![(u64::MAX - 0xfff, 0x2000)],
            libc::EOVERFLOW,
        ),
        (
            "257 ranges",
            4096,
            (0..257).map(|i| (i * 0x1000, 0x1000)).collect(),
            libc::E2BIG,
        ),
    ];
    for (what, page, ranges, e) in bad {
        assert_eq!(errno(c.dirty_log_start(page, &ranges)), e, "{what}");
    }
    // num_ranges that does not match the bytes.
    let ctl = wire::DmaLoggingControl {
        page_size: 4096,
        num_ranges: 2,
        reserved: 0,
    };
    let mut data = ctl.as_bytes().to_vec();
    data.extend_from_slice(
        wire::DmaLoggingRange {
            iova: 0,
            length: 4096,
        }
        .as_bytes(),
    );
    assert_eq!(
        errno(c.feature(VFIO_DEVICE_FEATURE_DMA_LOGGING_START | SET, &data, 0)),
        libc::EINVAL
    );
    assert!(calls(&log).is_empty(), "nothing reached the device");

    // A hint of 64 KiB: the device logs 4 KiB pages and says so.
    let ranges = [(0x10000, 0x100000), (0x400000, 0x10000)];
    assert_eq!(c.dirty_log_start(0x10000, &ranges).unwrap(), 4096);
    assert_eq!(
        errno(c.dirty_log_start(4096, &ranges)),
        libc::EBUSY,
        "already on"
    );
    assert_eq!(calls(&log), ["dirty_log_start"]);

    // Bit i of word i / 64 is page i of the report.
    log.lock().dirty.extend([
        0x10000,
        0x10000 + 3 * 4096 + 0xfff,
        0x10000 + 64 * 4096 + 5,
        0x400000 + 0x2000,
    ]);
    let bits = c.dirty_report(0x10000, 0x100000, 4096).unwrap();
    assert_eq!(bits, vec![0b1001, 1, 0, 0]);
    assert_eq!(
        c.dirty_report(0x10000, 0x100000, 4096).unwrap(),
        vec![0; 4],
        "cleared"
    );
    assert_eq!(c.dirty_report(0x400000, 0x10000, 8192).unwrap(), vec![0b10]);

    for (what, iova, len, page, e) in [
        ("outside the ranges", 0x300000, 0x1000, 4096, libc::EINVAL),
        ("across two ranges", 0x10000, 0x400000, 4096, libc::EINVAL),
        ("page under 4 KiB", 0x10000, 0x1000, 2048, libc::EINVAL),
        (
            "page not a power of two",
            0x10000,
            0x3000,
            0x3000,
            libc::EINVAL,
        ),
        ("unaligned", 0x11000, 0x2000, 8192, libc::EINVAL),
        ("empty", 0x10000, 0, 4096, libc::EINVAL),
        ("wrapping", u64::MAX - 0xfff, 0x2000, 4096, libc::EOVERFLOW),
    ] {
        assert_eq!(errno(c.dirty_report(iova, len, page)), e, "{what}");
    }
    // A reply the client has no room for is refused before the bits are
    // read, so none is lost.
    log.lock().dirty.insert(0x20000);
    let r = wire::DmaLoggingReport {
        iova: 0x10000,
        length: 0x100000,
        page_size: 4096,
    };
    assert_eq!(
        errno(c.feature(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT | GET,
            r.as_bytes(),
            24 + 31
        )),
        libc::EINVAL
    );
    assert_eq!(c.dirty_report(0x10000, 0x100000, 4096).unwrap()[0], 1 << 16);

    c.dirty_log_stop().unwrap();
    assert_eq!(
        errno(c.dirty_report(0x10000, 0x1000, 4096)),
        libc::EINVAL,
        "after STOP"
    );
    c.dirty_log_stop().unwrap();
    let stops = calls(&log)
        .iter()
        .filter(|c| **c == "dirty_log_stop")
        .count();
    assert_eq!(stops, 1, "a second STOP does not reach the device");

    // No ranges: refused, as the kernel's vfio_ioctl_device_feature_logging_start
    // does (EINVAL). A bitmap over the data cap is E2BIG.
    assert_eq!(errno(c.dirty_log_start(4096, &[])), libc::EINVAL);
    c.dirty_log_start(4096, &[(0, 1 << 46)]).unwrap();
    assert_eq!(errno(c.dirty_report(0, 1 << 46, 4096)), libc::E2BIG);
    assert_eq!(c.dirty_report(0, 1 << 30, 1 << 20).unwrap().len(), 16);
}

const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 16 << 20;
const PAGE: u64 = 4096;

/// The pages (guest addresses) a bitmap from `iova` in `page` units names.
fn pages(bits: &[u64], iova: u64, page: u64) -> BTreeSet<u64> {
    (0..bits.len() as u64 * 64)
        .filter(|i| bits[(i / 64) as usize] & 1 << (i % 64) != 0)
        .map(|i| iova + i * page)
        .collect()
}

fn pages_of(addr: u64, len: u64, page: u64) -> impl Iterator<Item = u64> {
    let first = (addr - RAM_BASE) / page;
    let last = (addr + len - 1 - RAM_BASE) / page;
    (first..=last).map(move |p| RAM_BASE + p * page)
}

/// The real device (`PciFunction<WdDevice>` on the software accelerator)
/// advertises the MIGRATION feature and runs the guest driver's jobs whose
/// destinations the test chose; the DMA_LOGGING_REPORT through the socket
/// names exactly the pages it wrote: the jobs' outputs, the completion-ring
/// slots and the ring-index block, bit for bit, and nothing the guest wrote
/// itself.
#[test]
fn the_dirty_report_equals_the_pages_the_real_device_wrote() {
    let interrupts = Interrupts::new(2);
    let cfg = WdConfig {
        queues: 2,
        ..WdConfig::default()
    };
    let model = WdDevice::new(cfg, SoftAccel::new(1), 21, Arc::new(interrupts.clone())).unwrap();
    let dev = PciFunction::try_new(model, interrupts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.sock");
    let listener = Listener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let mut conn = listener.accept().unwrap();
        conn.run(&parking_lot::Mutex::new(dev))
    });
    let ram = GuestRam::new(RAM_BASE, RAM_SIZE).unwrap();
    let vmm = Arc::new(LoopbackVmm::connect_migratable(&path, ram).unwrap());
    assert_eq!(
        vmm.migration().unwrap().migration_flags().unwrap(),
        u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY)
    );
    let drv = Device::probe(vmm.clone()).unwrap();
    drv.enable().unwrap();
    let pool = vmm.dma_pool().unwrap();
    let mut q = drv.queue(0, 64, drv.info().cap_ops, &pool).unwrap();
    let (_sq, cq, idx) = q.ring_addresses();
    let src = pool.alloc(4 * PAGE, PAGE).unwrap();
    let data: Vec<u8> = (0..4 * PAGE).map(|i| (i * 7 + 1) as u8).collect();
    src.write(0, &data).unwrap();
    let dst = pool.alloc(16 * PAGE, PAGE).unwrap();
    let d = dst.addr();

    assert_eq!(
        vmm.migration()
            .unwrap()
            .dirty_log_start(PAGE, &[(RAM_BASE, RAM_SIZE)])
            .unwrap(),
        PAGE
    );
    let report = |page: u64| {
        let bits = vmm
            .migration()
            .unwrap()
            .dirty_report(RAM_BASE, RAM_SIZE, page)
            .unwrap();
        pages(&bits, RAM_BASE, page)
    };
    assert!(report(PAGE).is_empty(), "nothing written since START");

    let jobs = [
        // 2.5 pages copied to the middle of dst page 1: pages 1..=3.
        JobSpec::new(Opcode::Copy)
            .src(src.addr(), (5 * PAGE / 2) as u32)
            .dst(d + PAGE + 100, (5 * PAGE / 2) as u32),
        // 200 bytes across the boundary of pages 7 and 8.
        JobSpec::new(Opcode::Fill)
            .dst(d + 8 * PAGE - 100, 200)
            .param(0xa5),
        // Reads only.
        JobSpec::new(Opcode::Crc32c).src(src.addr(), 4 * PAGE as u32),
        // 32 bytes into page 12.
        JobSpec::new(Opcode::Sha256)
            .src(src.addr(), 64)
            .dst(d + 12 * PAGE, 32),
    ];
    let done = q.run_batch(&jobs).unwrap();
    assert!(
        done.iter().all(|c| c.status == JobStatus::Ok.code()),
        "{done:?}"
    );
    assert_eq!(
        dst.to_vec(16 * PAGE as usize).unwrap()[PAGE as usize + 100..][..10],
        data[..10]
    );

    let mut want = BTreeSet::new();
    want.extend(pages_of(d + PAGE + 100, 5 * PAGE / 2, PAGE));
    want.extend(pages_of(d + 8 * PAGE - 100, 200, PAGE));
    want.extend(pages_of(d + 12 * PAGE, 32, PAGE));
    for slot in 0..jobs.len() as u64 {
        want.extend(pages_of(cq + slot * CQE_SIZE as u64, CQE_SIZE as u64, PAGE));
    }
    want.extend(pages_of(idx, 64, PAGE));
    assert_eq!(report(PAGE), want);
    assert!(report(PAGE).is_empty(), "a report clears what it reports");

    // In 8 KiB units, one more job: its page pair, its completion slot's and
    // the index block's.
    let fill = [JobSpec::new(Opcode::Fill).dst(d + 5 * PAGE, 16).param(1)];
    q.run_batch(&fill).unwrap();
    let mut want = BTreeSet::new();
    let pair = |a: u64| RAM_BASE + (a - RAM_BASE) / (2 * PAGE) * (2 * PAGE);
    want.insert(pair(d + 5 * PAGE));
    want.insert(pair(cq + jobs.len() as u64 * CQE_SIZE as u64));
    want.insert(pair(idx));
    assert_eq!(report(2 * PAGE), want);

    vmm.migration().unwrap().dirty_log_stop().unwrap();
    assert_eq!(
        errno(
            vmm.migration()
                .unwrap()
                .dirty_report(RAM_BASE, RAM_SIZE, PAGE)
        ),
        libc::EINVAL
    );
    drop(server);
}

/// The real device served twice; a source runs guest jobs, goes PRE_COPY
/// (the destination takes the compatibility block while the source still
/// runs jobs), STOP_COPY, the rest of the stream and the guest's memory
/// move, the destination resumes with its queue enabled, and the source,
/// told to run on after all, still runs jobs. Then a destination fed a cut
/// stream lands in ERROR, and a reset gives back a device that runs jobs.
#[test]
fn the_real_device_migrates_through_the_socket() {
    use wdvirt_guest::DmaMemory;
    let dir = tempfile::tempdir().unwrap();
    let serve_real = |name: &str| {
        let interrupts = Interrupts::new(2);
        let cfg = WdConfig {
            queues: 2,
            ..WdConfig::default()
        };
        let model =
            WdDevice::new(cfg, SoftAccel::new(1), 30, Arc::new(interrupts.clone())).unwrap();
        let dev = PciFunction::try_new(model, interrupts).unwrap();
        let path = dir.path().join(name);
        let listener = Listener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let mut conn = listener.accept().unwrap();
            conn.run(&parking_lot::Mutex::new(dev))
        });
        let ram = GuestRam::new(RAM_BASE, RAM_SIZE).unwrap();
        Arc::new(LoopbackVmm::connect_migratable(&path, ram).unwrap())
    };
    let (a, b) = (serve_real("a.sock"), serve_real("b.sock"));
    let drv = Device::probe(a.clone()).unwrap();
    drv.enable().unwrap();
    let pool = a.dma_pool().unwrap();
    let mut q = drv.queue(0, 64, drv.info().cap_ops, &pool).unwrap();
    assert_eq!(q.fill(3, 100).unwrap(), vec![3; 100]);

    a.migration()
        .unwrap()
        .set_mig_state(MigState::PreCopy)
        .unwrap();
    let pre = a.migration().unwrap().mig_read_all(4096).unwrap();
    b.migration()
        .unwrap()
        .set_mig_state(MigState::Resuming)
        .unwrap();
    b.migration().unwrap().mig_write(&pre, 4096).unwrap();
    assert_eq!(q.fill(4, 100).unwrap(), vec![4; 100], "PRE_COPY runs jobs");
    a.migration()
        .unwrap()
        .set_mig_state(MigState::StopCopy)
        .unwrap();
    let rest = a.migration().unwrap().mig_read_all(65536).unwrap();
    let mut ram = vec![0u8; RAM_SIZE as usize];
    a.ram().read(RAM_BASE, &mut ram).unwrap();
    b.ram().write(RAM_BASE, &ram).unwrap();
    b.migration().unwrap().mig_write(&rest, 65536).unwrap();
    b.migration()
        .unwrap()
        .set_mig_state(MigState::Running)
        .unwrap();
    assert!(Device::probe(b.clone()).unwrap().is_enabled().unwrap());
    a.migration()
        .unwrap()
        .set_mig_state(MigState::Running)
        .unwrap();
    assert_eq!(q.fill(5, 100).unwrap(), vec![5; 100]);

    let c = serve_real("c.sock");
    c.migration()
        .unwrap()
        .set_mig_state(MigState::Resuming)
        .unwrap();
    c.migration().unwrap().mig_write(&pre[..20], 4096).unwrap();
    assert_eq!(
        errno(c.migration().unwrap().set_mig_state(MigState::Stop)),
        libc::EINVAL
    );
    assert_eq!(c.migration().unwrap().mig_state().unwrap(), MigState::Error);
    c.migration().unwrap().reset().unwrap();
    // A reset clears the Command register, as a guest's reset would.
    c.config_write(4, 2, 0b110).unwrap();
    let drv_c = Device::probe(c.clone()).unwrap();
    drv_c.enable().unwrap();
    let pool_c = c.dma_pool().unwrap();
    let mut qc = drv_c.queue(0, 64, drv_c.info().cap_ops, &pool_c).unwrap();
    assert_eq!(qc.fill(6, 100).unwrap(), vec![6; 100]);
}

/// Under a smaller message limit, the client learns the server's transfer
/// size from VERSION and splits reads and writes by it; a read asking for
/// more than that is refused.
#[test]
fn streams_move_within_the_servers_message_limit() {
    let limits = Limits {
        max_message_size: 8192,
        ..Limits::default()
    };
    let (_s, mut src, _l) = fake_with(0x44, &limits, |d| {
        d.mig.as_mut().unwrap().state_extra = 30_000;
    });
    let (_d, mut dst, _l2) = fake_with(0, &limits, |_| {});
    let xfer = limits.max_data_xfer_size();
    assert_eq!(src.max_xfer(), xfer);
    let regs = bar0(&mut src);
    src.set_mig_state(MigState::StopCopy).unwrap();
    assert_eq!(errno(src.mig_read(xfer + 1)), libc::EINVAL);
    let whole = src.mig_read_all(1 << 20).unwrap();
    assert!(whole.len() > 4 * xfer as usize);
    dst.set_mig_state(MigState::Resuming).unwrap();
    dst.mig_write(&whole, 1 << 20).unwrap();
    dst.set_mig_state(MigState::Running).unwrap();
    assert_eq!(bar0(&mut dst), regs);
}
