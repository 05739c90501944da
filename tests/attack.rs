//! The attack suite: a hostile VMM against its own instance, with a victim
//! instance on the same process (this test process serves both, as the
//! daemon does) running verified jobs throughout.
//!
//! After each attack: the process is alive and serving, every one of the
//! victim's results verified and the victim kept completing jobs while the
//! attack ran (no gap), the attacker's socket takes a fresh, well-behaved
//! VMM that runs a job, and this process's fd count and RSS are back within
//! bounds. The tests run one at a time (fd counts are process-wide).
//!
//! `docs/security.md` lists every attack, what it gets and which test here
//! shows it.

mod common;
mod transport_support;

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::RAM_BASE;
use common::victim::{RAM_SIZE, Victim, fresh_vmm_runs_a_job, proc_fds, proc_rss_kib};
use parking_lot::Mutex;
use transport_support::attacks::{assert_closed_by_server, header};
use transport_support::send_with_fds;
use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::soft::SoftAccel;
use wdvirt::daemon::instance::{Instance, InstanceSpec};
use wdvirt::transport::Limits;
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_guest::Device;
use zerocopy::IntoBytes;

/// One attack at a time: fd counts and RSS are the whole process's.
static SERIAL: Mutex<()> = Mutex::new(());

fn config() -> WdConfig {
    WdConfig {
        queues: 2,
        max_depth: 64,
        ..WdConfig::default()
    }
}

fn fd_count() -> usize {
    proc_fds(std::process::id())
}

fn rss_kib() -> u64 {
    proc_rss_kib(std::process::id())
}

/// The victim's own instance on `accel` (serving `dir/victim.sock`) and
/// the victim running on it.
fn victim_on(accel: &SharedAccelerator, dir: &Path) -> (Instance, Victim) {
    let instance = common::instance(accel, dir, "victim", 1, config());
    let victim = Victim::start(instance.socket());
    (instance, victim)
}

/// The attacker's instance and the process state before the attack.
struct Arena {
    accel: SharedAccelerator,
    attacker: Instance,
    victim: Victim,
    fds_before: usize,
    rss_before: u64,
    jobs_before: u64,
    _victim_instance: Instance,
    _dir: tempfile::TempDir,
    _serial: parking_lot::MutexGuard<'static, ()>,
}

impl Arena {
    fn new(limits: Limits) -> Arena {
        let serial = SERIAL.lock();
        watchdog();
        let accel: SharedAccelerator = SoftAccel::new(1);
        let dir = tempfile::tempdir().unwrap();
        let (victim_instance, victim) = victim_on(&accel, dir.path());
        let spec = InstanceSpec {
            name: "attacker".into(),
            socket: dir.path().join("attacker.sock"),
            config: config(),
            type_name: wdvirt::vdev::wd::DEFAULT_TYPE_NAME.into(),
        };
        let attacker = Instance::start_with_limits(spec, accel.clone(), 2, limits).unwrap();
        // A first well-behaved VMM on each side, so lazily made threads and
        // maps are counted in the baseline.
        fresh_vmm_runs_a_job(attacker.socket());
        victim.assert_progress(0, "before the attack");
        Arena {
            accel,
            attacker,
            fds_before: fd_count(),
            rss_before: rss_kib(),
            jobs_before: victim.jobs(),
            victim,
            _victim_instance: victim_instance,
            _dir: dir,
            _serial: serial,
        }
    }

    fn socket(&self) -> PathBuf {
        self.attacker.socket().to_owned()
    }

    /// What every attack must leave: the victim ran throughout and
    /// verified, the attacker's socket serves a fresh VMM, and fds and
    /// memory are back within bounds.
    fn after(mut self, what: &str) {
        self.check(what);
        let jobs = self.victim.finish();
        assert!(jobs > self.jobs_before, "{what}");
        drop(self.accel);
        FINISHED.lock().push(*CURRENT.lock());
    }

    /// [`after`](Arena::after), with the arena kept for the next attack.
    fn check(&mut self, what: &str) {
        self.victim.assert_progress(self.jobs_before, what);
        fresh_vmm_runs_a_job(self.attacker.socket());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let fds = fd_count();
            if fds <= self.fds_before + 8 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {fds} fds open, {} before the attack",
                self.fds_before
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let rss = rss_kib();
        assert!(
            rss < self.rss_before + 64 * 1024,
            "{what}: RSS {rss} KiB, {} KiB before",
            self.rss_before
        );
        let report = self.attacker.report();
        assert_eq!(report.transport_totals.panics, 0, "{what}");
        self.jobs_before = self.victim.jobs();
    }
}

/// A hang is a failure, not a CI timeout: the whole process exits if a
/// test is still running after a minute.
fn watchdog() {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let me = STARTED.fetch_add(1, Ordering::AcqRel) + 1;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        if STARTED.load(Ordering::Acquire) == me && !FINISHED.lock().contains(&me) {
            eprintln!("attack test {me} hung for 60 s: something is wedged");
            std::process::exit(101);
        }
    });
    *CURRENT.lock() = me;
}

static FINISHED: Mutex<Vec<u64>> = Mutex::new(Vec::new());
static CURRENT: Mutex<u64> = Mutex::new(0);

fn memfds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| rustix::fs::memfd_create("attack", rustix::fs::MemfdFlags::CLOEXEC).unwrap())
        .collect()
}

/// Containment failure 1 of issue 21: an unfinished GET_INFO, one byte per
/// `sendmsg`, each byte with 253 fds. Before: the server kept every fd until
/// the message was whole (7,800 fds for 31 bytes; 20,000 in half a second).
/// Now fds past a message's budget (none for GET_INFO) are closed as they
/// arrive, and the control buffer takes only one more than a message may
/// carry, so the kernel never installs the rest.
#[test]
fn fds_past_a_messages_budget_are_refused_as_they_arrive() {
    let arena = Arena::new(Limits::default());
    let base = fd_count() + 253; // the attacker's own memfds
    transport_support::attacks::fd_flood_in_an_unfinished_message(&arena.socket(), &mut || {
        let during = fd_count();
        assert!(
            during < base + 64,
            "the server holds {} fds for one unfinished message",
            during - base
        );
        arena
            .victim
            .assert_progress(arena.jobs_before, "during the fd flood");
    });
    let stats = arena.attacker.report().transport.unwrap();
    assert_eq!(stats.fds_truncated, 1, "{stats:?}");
    assert_eq!(stats.fds_received, 0, "{stats:?}");
    // Each of the 32 bytes brought what the control buffer holds (room for
    // max_msg_fds + 1, give or take its alignment), all closed on arrival.
    let per_byte = stats.fds_refused / 32;
    assert_eq!(stats.fds_refused % 32, 0, "{stats:?}");
    assert!((17..=20).contains(&per_byte), "{stats:?}");
    arena.after("fds flood");
}

/// A SET_IRQS carrying 253 eventfds, past VERSION, with a body that is
/// served when it carries one: refused with EINVAL for its fds, which past
/// `max_msg_fds` never arrive or are closed on arrival.
#[test]
fn a_message_carrying_hundreds_of_fds_is_refused() {
    let arena = Arena::new(Limits::default());
    transport_support::attacks::hundreds_of_fds_in_one_message(&arena.socket());
    // The statistics of the attack's connection, the last one.
    let after = arena.attacker.report().transport.unwrap();
    // Of the 253, 16 kept with the message (then closed with it), the few
    // more the control buffer had room for closed on arrival, the rest
    // closed by the kernel (MSG_CTRUNC); the message counted as
    // truncated. The single eventfd served before and after makes 2 more.
    assert_eq!(after.fds_truncated, 1, "{after:?}");
    assert_eq!(after.fds_received, 16 + 2, "{after:?}");
    assert!((1..=4).contains(&after.fds_refused), "{after:?}");
    arena.after("hundreds of fds in one message");
}

/// Limits set on the instance are what VERSION advertises and what the
/// connection holds to: `max_msg_fds`, `max_dma_maps` (ENOSPC at the
/// next map) and a `max_data_xfer_size` that fits in `max_message_size`
/// (an access of that size is never E2BIG; one byte more is EINVAL).
#[test]
fn version_advertises_the_instances_limits_and_they_hold() {
    let limits = Limits {
        max_msg_fds: 4,
        max_dma_maps: 8,
        max_message_size: 8192,
        ..Limits::default()
    };
    let arena = Arena::new(limits);
    let mut c = transport_support::RawClient::new(UnixStream::connect(arena.socket()).unwrap());
    let reply = c.version();
    let json: serde_json::Value =
        serde_json::from_slice(&reply.body[4..reply.body.len() - 1]).unwrap();
    let caps = &json["capabilities"];
    assert_eq!(caps["max_msg_fds"], 4, "{json}");
    assert_eq!(caps["max_dma_maps"], 8, "{json}");
    let xfer = caps["max_data_xfer_size"].as_u64().unwrap();
    assert_eq!(xfer, 8192 - 32, "{json}");
    // The largest access it advertises fits (an error, if any, is the
    // device's: the connection goes on); one byte more is refused.
    let body = transport_support::RawClient::region_write_body(0, 0, &vec![0; xfer as usize]);
    assert_eq!(16 + body.len(), 8192);
    let r = c.request(10, &body, &[]);
    assert!(!r.is_error() || r.errno() != libc::E2BIG, "{r:?}");
    assert_eq!(c.region_read(0, 0, xfer as u32 + 1).errno(), libc::EINVAL);
    // Eight maps, then ENOSPC.
    for i in 0..8 {
        let r = c.dma_map(RW, 0, 0x1_0000_0000 + i * 0x1000, 0x1000, &[]);
        assert!(!r.is_error(), "map {i}: {r:?}");
    }
    let r = c.dma_map(RW, 0, 0x2_0000_0000, 0x1000, &[]);
    assert_eq!(r.errno(), libc::ENOSPC);
    assert!(!c.region_read(0, 0, 4).is_error());
    drop(c);
    arena.after("non-default limits");
}

/// Containment failure 3: a VMM sends 17 bytes of a 116-byte message, the
/// 17th carrying its own end of the connection, then closes. Before: the
/// server held the peer end itself, never saw EOF, and that instance never
/// served a VMM again. Now the socket is refused on arrival (closed at
/// once, so the close is seen), and a message that does not finish within
/// the deadline ends the connection anyway.
#[test]
fn half_a_message_carrying_the_vmms_own_socket_does_not_keep_it_open() {
    let arena = Arena::new(Limits::default());
    let t = transport_support::attacks::own_socket_in_half_a_message(&arena.socket());
    // Well within the 5 s message deadline: the close itself is seen.
    fresh_vmm_runs_a_job(&arena.socket());
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the server waited {:?} for the rest of the message",
        t.elapsed()
    );
    arena.after("own socket in half a message");
}

/// Half a header, then silence: the connection is closed once the message
/// deadline passes (here 300 ms), and its instance serves the next VMM.
#[test]
fn half_a_header_then_a_stall_is_closed_at_the_deadline() {
    let limits = Limits {
        message_timeout_ms: 300,
        ..Limits::default()
    };
    let arena = Arena::new(limits);
    let mut s = UnixStream::connect(arena.socket()).unwrap();
    s.write_all(&header(1, 64).as_bytes()[..7]).unwrap();
    assert_closed_by_server(&mut s, Duration::from_secs(5), "half a header");
    // Half a body too.
    let mut s = UnixStream::connect(arena.socket()).unwrap();
    let mut msg = header(1, 64).as_bytes().to_vec();
    msg.extend_from_slice(&[b' '; 20]);
    s.write_all(&msg).unwrap();
    assert_closed_by_server(&mut s, Duration::from_secs(5), "half a body");
    let stats = arena.attacker.report().transport.unwrap();
    assert_eq!(stats.stalled, 1, "{stats:?}");
    arena.after("half a message, then a stall");
}

/// Containment failure 2: the VMM clears O_NONBLOCK on its MSI-X eventfd
/// (the open file description is shared with the server) and fills the
/// counter. Before: the queue worker's completion interrupt blocked forever
/// holding the interrupt lock and the bus-master guard; the instance then
/// refused every later VMM as "already connected". Now an eventfd write
/// never blocks, whatever the flags.
#[test]
fn a_vmm_making_its_eventfd_blocking_and_full_wedges_nothing() {
    let arena = Arena::new(Limits::default());
    let vmm = Arc::new(
        LoopbackVmm::connect(&arena.socket(), GuestRam::new(RAM_BASE, RAM_SIZE).unwrap()).unwrap(),
    );
    transport_support::attacks::blocking_full_eventfd(vmm, &mut || {
        arena.attacker.report().queues[0].jobs_ok
    });
    arena.after("blocking, full eventfd");
}

/// A device that panics on one magic BAR0 write — a stand-in for a bug, the
/// only way to make the serving thread panic (no input may). Everything
/// else goes to the real device stack.
struct Panicky(wdvirt::vdev::pci::PciFunction<wdvirt::vdev::wd::WdDevice>);

const PANIC_OFFSET: u64 = 0x38;
const PANIC_VALUE: [u8; 4] = *b"BUG!";

mod panicky {
    use super::*;
    use wdvirt::vdev::device::*;

    impl VfioUserDevice for Panicky {
        fn device_info(&self) -> DeviceInfo {
            self.0.device_info()
        }
        fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
            self.0.region_info(index)
        }
        fn irq_info(&self, index: u32) -> Result<IrqInfo, DeviceError> {
            self.0.irq_info(index)
        }
        fn region_read(&mut self, i: u32, off: u64, data: &mut [u8]) -> Result<(), DeviceError> {
            self.0.region_read(i, off, data)
        }
        fn region_write(&mut self, i: u32, off: u64, data: &[u8]) -> Result<(), DeviceError> {
            if i == 0 && off == PANIC_OFFSET && data == PANIC_VALUE {
                panic!("injected bug");
            }
            self.0.region_write(i, off, data)
        }
        fn set_irqs(
            &mut self,
            index: u32,
            action: IrqAction,
            start: u32,
            count: u32,
            data: IrqData,
        ) -> Result<(), DeviceError> {
            self.0.set_irqs(index, action, start, count, data)
        }
        fn dma_map(&mut self, map: DmaMapping) -> Result<(), DeviceError> {
            self.0.dma_map(map)
        }
        fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DeviceError> {
            self.0.dma_unmap(iova, size)
        }
        fn dma_unmap_all(&mut self) -> Result<(), DeviceError> {
            self.0.dma_unmap_all()
        }
        fn reset(&mut self) -> Result<(), DeviceError> {
            self.0.reset()
        }
        fn disconnected(&mut self) {
            self.0.disconnected()
        }
        fn migration(&mut self) -> Option<&mut dyn wdvirt::vdev::device::Migratable> {
            self.0.migration()
        }
        fn survivable(&mut self) -> Option<&mut dyn wdvirt::vdev::device::Survivable> {
            None
        }
    }
}

/// Containment 4: a panic while serving a connection (a bug) is contained
/// and counted; the device is reset as after any disconnect, the same
/// device serves the next VMM through the real socket, and the victim on
/// the same accelerator never notices.
#[test]
fn a_panic_in_a_connection_is_contained_counted_and_the_device_serves_again() {
    use wdvirt::transport::{Listener, TransportError};
    use wdvirt::vdev::pci::{Interrupts, PciFunction};
    use wdvirt::vdev::wd::WdDevice;
    let _serial = SERIAL.lock();
    let accel: SharedAccelerator = SoftAccel::new(1);
    let dir = tempfile::tempdir().unwrap();
    let (_victim_instance, victim) = victim_on(&accel, dir.path());
    let path = dir.path().join("panicky.sock");
    let listener = Listener::bind(&path).unwrap();
    let interrupts = Interrupts::new(2);
    let model = WdDevice::new(config(), accel.clone(), 3, Arc::new(interrupts.clone())).unwrap();
    let device = Arc::new(Mutex::new(Panicky(PciFunction::new(model, interrupts))));
    let server = {
        let device = device.clone();
        std::thread::spawn(move || {
            let mut ends = Vec::new();
            for _ in 0..2 {
                let mut conn = listener.accept().unwrap();
                let stats = conn.stats();
                let end = conn.run(&*device);
                ends.push((end, stats.snapshot().panics));
            }
            ends
        })
    };
    let jobs_before = victim.jobs();
    {
        let vmm = Arc::new(
            LoopbackVmm::connect(&path, GuestRam::new(RAM_BASE, RAM_SIZE).unwrap()).unwrap(),
        );
        let dev = Device::probe(vmm.clone()).unwrap();
        dev.enable().unwrap();
        // The bug: the server thread unwinds mid-message and the socket
        // is shut, so this VMM sees its connection end.
        assert!(vmm.region_write(0, PANIC_OFFSET, &PANIC_VALUE).is_err());
    }
    // The device was reset: the next VMM finds it disabled and runs a job.
    fresh_vmm_runs_a_job(&path);
    let ends = server.join().unwrap();
    match &ends[0] {
        (Err(TransportError::Panicked(m)), 1) => assert!(m.contains("injected bug"), "{m}"),
        other => panic!("the first connection ended with {other:?}"),
    }
    assert!(ends[1].0.is_ok(), "{:?}", ends[1]);
    victim.assert_progress(jobs_before, "after the panic");
    victim.finish();
}

/// A raw VMM on the attacker's socket, past VERSION.
fn raw_client(arena: &Arena) -> transport_support::RawClient {
    transport_support::attacks::raw_client(&arena.socket())
}

const RW: u32 = 3;

/// Every fd a DMA_MAP must not take, each refused with its errno while the
/// connection goes on serving; then overlapping maps, and tiny maps
/// past the map limit (its default, 1024, plus ten), stopped there.
#[test]
fn dma_map_with_fds_that_are_not_guest_memory_is_refused() {
    let arena = Arena::new(Limits::default());
    let mut c = raw_client(&arena);
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    let dir: OwnedFd = std::fs::File::open("/tmp").unwrap().into();
    let (sock, _sock2) = UnixStream::pair().unwrap();
    let sock: OwnedFd = sock.into();
    let zero: OwnedFd = std::fs::File::open("/dev/zero").unwrap().into();
    let unsealed = transport_support::memfd(0x10_0000);
    let small = transport_support::sealed_memfd(0x1000);
    let good = transport_support::sealed_memfd(0x10_0000);
    let cases: [(&str, &OwnedFd, u64, u64, i32); 7] = [
        ("a pipe", &pipe_r, 0, 0x1000, libc::EINVAL),
        ("a directory", &dir, 0, 0x1000, libc::EINVAL),
        ("a socket", &sock, 0, 0x1000, libc::EINVAL),
        ("/dev/zero", &zero, 0, 0x1000, libc::EINVAL),
        ("an unsealed memfd", &unsealed, 0, 0x1000, libc::EINVAL),
        (
            "a sealed memfd smaller than the map",
            &small,
            0,
            0x10_0000,
            libc::EINVAL,
        ),
        (
            "an offset past the end",
            &good,
            0x20_0000,
            0x1000,
            libc::EINVAL,
        ),
    ];
    let mut got = Vec::new();
    for (what, fd, offset, size, _) in &cases {
        let r = c.dma_map(RW, *offset, 0x1000_0000, *size, &[fd.as_fd()]);
        got.push((*what, if r.is_error() { r.errno() } else { 0 }));
    }
    let want: Vec<(&str, i32)> = cases.iter().map(|c| (c.0, c.4)).collect();
    assert_eq!(got, want);
    // Overlapping maps: the second is refused with EEXIST.
    c.dma_map(RW, 0, 0x2000_0000, 0x10_0000, &[good.as_fd()])
        .ok();
    let r = c.dma_map(RW, 0, 0x2008_0000, 0x10_0000, &[good.as_fd()]);
    assert_eq!(r.errno(), libc::EEXIST, "overlapping map");
    // Tiny fd-less maps until the limit: ENOSPC, then still in sync.
    let limit = Limits::default().max_dma_maps as u64;
    let mut refused_at = None;
    for i in 0..limit + 10 {
        let r = c.dma_map(RW, 0, 0x1_0000_0000 + i * 0x1000, 0x1000, &[]);
        if r.is_error() {
            assert_eq!(r.errno(), libc::ENOSPC);
            refused_at.get_or_insert(i);
        }
    }
    // One map (the good one) was already held.
    assert_eq!(refused_at, Some(limit - 1), "the map limit");
    assert!(!c.region_read(0, 0, 4).is_error());

    // SET_IRQS with fds that are not eventfds.
    let flags = vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_EVENTFD
        | vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
    for fd in [&pipe_r, &good, &zero] {
        let r = c.set_irqs(flags, 2, 0, 1, &[fd.as_fd()]);
        assert_eq!(r.errno(), libc::EINVAL, "SET_IRQS with a non-eventfd");
    }
    drop(c);
    drop((
        pipe_r, _pipe_w, dir, sock, _sock2, zero, unsealed, small, good,
    ));
    arena.after("DMA_MAP and SET_IRQS with bad fds");
}

/// Framing attacks, one connection each: a header claiming 4 GiB; VERSION
/// with a megabyte of JSON, and with more than a message may hold; random
/// bytes after a valid VERSION. (Requests whose replies are never read:
/// `a_vmm_that_reads_no_replies_is_closed_and_never_holds_the_device`.)
#[test]
fn framing_attacks_end_only_their_own_connection() {
    let limits = Limits {
        message_timeout_ms: 500,
        ..Limits::default()
    };
    let mut arena = Arena::new(limits);
    let socket = arena.socket();
    transport_support::attacks::framing(&socket, Duration::from_secs(5), &mut |what| {
        arena.check(what)
    });
    arena.after("framing attacks");
}

/// Requests whose replies are never read: the server's reply waits at most
/// the message deadline, without the device's lock (the daemon reads the
/// device meanwhile), then the connection is closed.
#[test]
fn a_vmm_that_reads_no_replies_is_closed_and_never_holds_the_device() {
    let limits = Limits {
        message_timeout_ms: 3_000,
        ..Limits::default()
    };
    let arena = Arena::new(limits);
    let (s, c, sent, last_ok) = transport_support::attacks::requests_never_read(&arena.socket());
    let report = arena.attacker.report();
    assert!(
        arena.attacker.attached() && last_ok.elapsed() < Duration::from_millis(2_500),
        "the connection ended before the device was read"
    );
    assert!(
        report.live.is_some(),
        "the device is locked while the server waits to send"
    );
    // At the deadline the connection is closed, stalled.
    let deadline = Instant::now() + Duration::from_secs(10);
    while arena.attacker.attached() {
        assert!(Instant::now() < deadline, "still attached");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = arena.attacker.report().transport.unwrap();
    assert_eq!(stats.stalled, 1, "{stats:?}, {sent} sent");
    drop(c);
    drop(s);
    arena.after("requests whose replies are never read");
}

/// `wdvirt serve` refuses a limit outside its range, naming the range,
/// rather than serving with another value.
#[test]
fn serve_refuses_a_limit_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .args(["serve", "--max-msg-fds", "300", "--socket"])
        .arg(dir.path().join("x.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-msg-fds") && err.contains("300") && err.contains("1..=252"),
        "{err}"
    );
    assert!(!dir.path().join("x.sock").exists());
}

/// Hundreds of connections at once: one is served, the rest closed at
/// once; the accept thread is not held 200 ms for each.
#[test]
fn hundreds_of_connections_are_closed_at_once() {
    let arena = Arena::new(Limits::default());
    let took = transport_support::attacks::hundreds_of_connections(&arena.socket());
    assert!(took < Duration::from_secs(5), "300 refusals took {took:?}");
    let report = arena.attacker.report();
    assert!(report.refused_connections >= 300);
    // One warning line per refusal at most 10 a second: the rest are
    // counted, with the connections' own, in the instance's budget.
    assert!(report.log_lines_suppressed >= 200, "{report:?}");
    arena.after("hundreds of connections");
}

/// A doorbell storm: 20,000 doorbell writes, posted (No_reply) as QEMU
/// sends them, on queues that are enabled and not.
#[test]
fn a_doorbell_storm_harms_nobody() {
    let arena = Arena::new(Limits::default());
    let mut c = raw_client(&arena);
    for i in 0..20_000u64 {
        let body =
            transport_support::RawClient::region_write_body(2, (i % 2) * 0x1000, &[1, 0, 0, 0]);
        c.send(10, wdvirt::transport::wire::FLAG_NO_REPLY, &body, &[]);
    }
    assert!(!c.region_read(0, 0, 4).is_error());
    drop(c);
    arena.after("a doorbell storm");
}

/// The same containment seen from outside, against a `wdvirt serve` process
/// hosting a victim and an attacker, with limits set on its command line:
/// an fd flood in an unfinished message and a stalled half header leave
/// the process's fd count and RSS where they were, the victim's jobs
/// verify throughout, a fresh VMM runs a job on the attacker's socket, and
/// the hits are counted in the attacker's `transport_totals`.
#[test]
fn a_wdvirt_serve_process_contains_an_fd_flood_and_a_stall() {
    let _serial = SERIAL.lock();
    watchdog();
    let dir = tempfile::tempdir().unwrap();
    let (victim_sock, attacker_sock) = (
        dir.path().join("victim.sock"),
        dir.path().join("attacker.sock"),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wdvirt"))
        .args([
            "serve",
            "--json",
            "--queues",
            "2",
            "--message-timeout-ms",
            "300",
            "--socket",
        ])
        .arg(&victim_sock)
        .arg("--socket")
        .arg(&attacker_sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(victim_sock.exists() && attacker_sock.exists()) {
        assert!(Instant::now() < deadline, "wdvirt serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = Victim::start(&victim_sock);
    fresh_vmm_runs_a_job(&attacker_sock);
    victim.assert_progress(0, "before the attacks");
    let (fds_before, rss_before) = (proc_fds(pid), proc_rss_kib(pid));
    let jobs_before = victim.jobs();

    // The fd flood: 31 bytes of GET_INFO, each with 253 fds.
    let fds = memfds(253);
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let s = UnixStream::connect(&attacker_sock).unwrap();
    let mut msg = header(4, 32).as_bytes().to_vec();
    msg.extend_from_slice(&[0; 16]);
    for b in &msg[..31] {
        send_with_fds(&s, std::slice::from_ref(b), &borrowed).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let during = proc_fds(pid);
    assert!(
        during < fds_before + 64,
        "wdvirt serve holds {during} fds, {fds_before} before"
    );
    // Unfinished: closed at the 300 ms deadline, its fds with it.
    let mut s = s;
    assert_closed_by_server(&mut s, Duration::from_secs(5), "the unfinished GET_INFO");
    drop(fds);
    // Half a header, then a stall.
    let mut s = UnixStream::connect(&attacker_sock).unwrap();
    s.write_all(&header(1, 64).as_bytes()[..7]).unwrap();
    assert_closed_by_server(&mut s, Duration::from_secs(5), "half a header");

    fresh_vmm_runs_a_job(&attacker_sock);
    victim.assert_progress(jobs_before, "after the fd flood and the stall");
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_fds(pid) > fds_before + 4 {
        assert!(
            Instant::now() < deadline,
            "wdvirt serve: {} fds, {fds_before} before",
            proc_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss = proc_rss_kib(pid);
    assert!(
        rss < rss_before + 64 * 1024,
        "RSS {rss} KiB, {rss_before} KiB before"
    );
    victim.finish();

    let reports = common::stop_serve(&mut child);
    let attacker = reports.iter().find(|r| r["name"] == "attacker").unwrap();
    let totals = &attacker["transport_totals"];
    assert!(
        totals["fds_refused"].as_u64().unwrap() >= 31 * 16,
        "{totals}"
    );
    assert_eq!(totals["stalled"], 2, "{totals}");
    assert_eq!(attacker["transport_totals"]["panics"], 0, "{totals}");
    let victim = reports.iter().find(|r| r["name"] == "victim").unwrap();
    assert_eq!(victim["transport_totals"]["errors_sent"], 0, "{victim}");
    FINISHED.lock().push(*CURRENT.lock());
}

/// The guest's own device pulled from under its jobs: while a thread runs
/// jobs on the attacker's queue, another turns Bus Master off and on,
/// resets the device (`DEV_CTRL_RESET`) and rewrites ring bases, for a
/// second. The attacker's jobs may fail (its own doing); nothing else may.
/// Then rings placed at the very end of RAM and on top of each other.
#[test]
fn resets_bus_master_off_and_ring_changes_mid_job_stay_inside_the_instance() {
    let arena = Arena::new(Limits::default());
    let vmm = Arc::new(
        LoopbackVmm::connect(&arena.socket(), GuestRam::new(RAM_BASE, RAM_SIZE).unwrap()).unwrap(),
    );
    transport_support::attacks::resets_and_ring_changes_mid_job(vmm);
    arena.after("resets, Bus Master and ring changes mid-job");
}

/// A TCP socket whose last close waits up to `linger` for data its peer
/// never reads (the peer, returned, accepts and never reads; our send
/// buffer is full).
fn lingering_socket(linger: Duration) -> (OwnedFd, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (peer, _) = listener.accept().unwrap();
    rustix::net::sockopt::set_socket_linger(&s, Some(linger)).unwrap();
    s.set_nonblocking(true).unwrap();
    loop {
        match s.write(&[0u8; 65536]) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    (s.into(), peer)
}

/// Closing an fd a VMM sent can block: here a TCP socket with `SO_LINGER`
/// 20 s whose peer never reads, attached to a GET_INFO. It sits behind
/// 3,000 requests whose replies the VMM does not read yet, so the server
/// is blocked sending when the fd arrives and the VMM's own copy is closed
/// by then: the server's is the last reference. Before: the connection
/// thread waited the 20 s in `close`. Now the socket's linger is turned off
/// and it is closed on the closer thread (`transport::closer`): every reply
/// arrives at once, the GET_INFO refused (EINVAL), and the connection
/// serves on.
#[test]
fn an_fd_whose_close_would_block_never_holds_the_connection() {
    let arena = Arena::new(Limits::default());
    let s = UnixStream::connect(arena.socket()).unwrap();
    let mut c = transport_support::RawClient::new(s.try_clone().unwrap());
    c.version();
    let before = wdvirt::transport::closer::totals();
    const N: usize = 3000;
    let read = transport_support::RawClient::region_write_body(0, 0, &[0; 4]);
    let mut burst = Vec::new();
    for i in 0..N {
        let mut h = header(9, 32);
        h.id = i as u16;
        burst.extend_from_slice(h.as_bytes());
        burst.extend_from_slice(&read[..16]);
    }
    c.send_raw(&burst, &[]);
    let (sock, peer) = lingering_socket(Duration::from_secs(20));
    let get_info = [16u32, 0, 0, 0];
    let id = c.send(4, 0, get_info.as_bytes(), &[sock.as_fd()]);
    drop(sock);
    std::thread::sleep(Duration::from_millis(200));
    // The server has not answered everything, so it has not yet read the
    // GET_INFO (it serves in order): its copy of the socket will be the last.
    let queued = rustix::io::ioctl_fionread(&s).unwrap() as usize;
    assert!(
        queued < N * 36,
        "the server read the fd before the VMM closed it ({queued} bytes of replies)"
    );
    let t = Instant::now();
    for i in 0..N {
        let r = c.recv();
        assert_eq!((r.header.id, r.is_error()), (i as u16, false), "reply {i}");
    }
    let r = c.recv();
    assert_eq!(
        (r.header.id, r.errno()),
        (id, libc::EINVAL),
        "the GET_INFO with a socket"
    );
    assert!(!c.region_read(0, 0, 4).is_error());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the connection waited {:?} on a close",
        t.elapsed()
    );
    let after = wdvirt::transport::closer::totals();
    assert!(after.queued > before.queued, "{before:?} {after:?}");
    assert_eq!(after.leaked, before.leaked, "{after:?}");
    drop(peer);
    drop(c);
    drop(s);
    arena.after("a socket whose close lingers");
}
