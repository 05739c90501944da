//! Attacks on an instance's socket that `tests/attack.rs` makes against an
//! instance in the test process and `tests/attack_daemon.rs` against a
//! `wdvirt daemon` process. Each takes the attacker's socket; what must
//! hold after it (the victim, fds, memory, a fresh VMM) is the caller's
//! to check, through `check` where an attack has several steps.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
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

/// Containment failure 2 of issue 21: the VMM `vmm` (connected to the
/// attacker's instance) clears O_NONBLOCK on its MSI-X eventfd (the open
/// file description is shared with the server) and fills the counter, then
/// runs 8 jobs on a queue that interrupts after every completion. The
/// jobs complete (`jobs_ok` reads the instance's count of them), the
/// connection answers promptly, the counter is still full (nothing lost
/// or waited on), and the VMM disconnects with it full and blocking again.
/// Before: the completion interrupt blocked forever, holding the device's
/// interrupt lock, and the instance refused every later VMM.
pub fn blocking_full_eventfd(vmm: Arc<wdvirt::vmm::LoopbackVmm>, jobs_ok: &mut dyn FnMut() -> u64) {
    use wdvirt_abi::regs;
    use wdvirt_guest::DmaMemory;
    let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    vmm.enable_msix_vector(0, efd.as_fd()).unwrap();
    // The server made it non-blocking; make it blocking again, and full.
    rustix::fs::fcntl_setfl(&efd, rustix::fs::OFlags::empty()).unwrap();
    rustix::io::write(&efd, &(u64::MAX - 1).to_ne_bytes()).unwrap();

    // Jobs on a queue that interrupts on vector 0 after every completion.
    let dev = wdvirt_guest::Device::probe(vmm.clone()).unwrap();
    dev.enable().unwrap();
    let ram = vmm.ram();
    let base = ram.base();
    let (sq, idx) = (base + 0x10_0000, base + 0x30_0000);
    let b = regs::queue(0) as u64;
    let w32 = |off: u64, v: u32| vmm.region_write(0, off, &v.to_le_bytes()).unwrap();
    let w64 = |off: u64, v: u64| vmm.region_write(0, off, &v.to_le_bytes()).unwrap();
    w64(b + regs::Q_SQ_BASE as u64, sq);
    w64(b + regs::Q_CQ_BASE as u64, base + 0x20_0000);
    w64(b + regs::Q_IDX_BASE as u64, idx);
    w32(b + regs::Q_DEPTH as u64, 16);
    w32(b + regs::Q_OPS as u64, wdvirt_abi::ALL_OPS);
    w32(b + regs::Q_MSIX_VECTOR as u64, 0);
    w32(b + regs::Q_IRQ_COALESCE as u64, 1);
    w32(b + regs::Q_CTRL as u64, regs::Q_CTRL_ENABLE);
    let buf = base + 0x38_0000;
    ram.write(buf, b"123456789").unwrap();
    for t in 0..8u32 {
        let e = wdvirt_abi::SubmissionEntry {
            opcode: wdvirt_abi::Opcode::Crc32c as u8,
            tag: t,
            src: buf,
            src_len: 9,
            ..Default::default()
        };
        ram.write(sq + t as u64 * 64, &e.to_bytes()).unwrap();
    }
    ram.write_u32(idx, 8).unwrap();
    vmm.region_write(2, 0, &0u32.to_le_bytes()).unwrap();
    // The jobs complete and the connection still answers promptly.
    let deadline = Instant::now() + Duration::from_secs(5);
    while jobs_ok() < 8 {
        assert!(Instant::now() < deadline, "the attacker's jobs stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    for _ in 0..10 {
        let mut id = [0u8; 4];
        vmm.region_read(0, regs::ID as u64, &mut id).unwrap();
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    // The counter is still full: nothing was lost or waited on.
    let mut st = [0u8; 8];
    rustix::fs::fcntl_setfl(&efd, rustix::fs::OFlags::NONBLOCK).unwrap();
    rustix::io::read(&efd, &mut st).unwrap();
    assert_eq!(u64::from_ne_bytes(st), u64::MAX - 1);
    rustix::fs::fcntl_setfl(&efd, rustix::fs::OFlags::empty()).unwrap();
    rustix::io::write(&efd, &(u64::MAX - 1).to_ne_bytes()).unwrap();
    // Disconnect (the device resets, joining its workers) with the counter
    // full and blocking; the caller then connects a fresh VMM.
    drop(dev);
    drop(vmm);
    drop(efd);
}

/// On the attacker's VMM `vmm`: Bus Master off and on, `DEV_CTRL_RESET`
/// and SQ-base rewrites every few ms for a second while a guest driver's
/// thread runs jobs (they may fail: the attacker's own doing); then rings
/// at the very end of RAM (the SQ running past it) and on top of each
/// other, which the queue refuses to start, with its error bit. What must
/// hold beyond the instance is the caller's to check.
pub fn resets_and_ring_changes_mid_job(vmm: Arc<wdvirt::vmm::LoopbackVmm>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use wdvirt_abi::regs;
    let base = vmm.ram().base();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, set_up) = std::sync::mpsc::channel();
    let worker = {
        let (vmm, stop) = (vmm.clone(), stop.clone());
        std::thread::spawn(move || {
            // Set up once, before the attack starts; the jobs then run
            // while the device is pulled away (a guest driver's enable
            // would wait out its own 30 s timeout on a device being reset
            // under it).
            let dev = wdvirt_guest::Device::probe(vmm.clone()).unwrap();
            dev.reset().unwrap();
            dev.enable().unwrap();
            let pool = vmm.dma_pool().unwrap();
            let mut q = dev.queue(0, 16, dev.info().cap_ops, &pool).unwrap();
            // A job lost to a reset is waited for this long.
            q.set_timeout(Duration::from_millis(100));
            ready.send(()).unwrap();
            let mut rounds = 0u32;
            while !stop.load(Ordering::Acquire) {
                let _ = q.crc32c(&[7u8; 4096]);
                rounds += 1;
            }
            rounds
        })
    };
    set_up
        .recv_timeout(Duration::from_secs(30))
        .expect("the attacker's driver set its queue up");
    let t = Instant::now();
    let b = regs::queue(0) as u64;
    while t.elapsed() < Duration::from_secs(1) {
        let cmd = vmm.config_read(4, 2).unwrap();
        vmm.config_write(4, 2, cmd & !0x4).unwrap();
        std::thread::sleep(Duration::from_millis(3));
        vmm.config_write(4, 2, cmd | 0x6).unwrap();
        vmm.region_write(
            0,
            b + regs::Q_SQ_BASE as u64,
            &(base + 0x8000).to_le_bytes(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(3));
        vmm.region_write(
            0,
            regs::DEV_CTRL as u64,
            &regs::DEV_CTRL_RESET.to_le_bytes(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    stop.store(true, Ordering::Release);
    worker.join().expect("the attacker's own driver thread");

    // Rings at the very end of RAM (the SQ runs past it) and on top of
    // each other: the queue refuses to start, with its error bit.
    let w32 = |off: u64, v: u32| vmm.region_write(0, off, &v.to_le_bytes()).unwrap();
    let w64 = |off: u64, v: u64| vmm.region_write(0, off, &v.to_le_bytes()).unwrap();
    let status = || {
        let mut st = [0u8; 4];
        vmm.region_read(0, b + regs::Q_STATUS as u64, &mut st)
            .unwrap();
        u32::from_le_bytes(st)
    };
    let end = base + vmm.ram().size();
    for (sq, cq, idx) in [
        (end - 64 * 8, base, base + 0x1_0000),
        (base, base, base + 0x1_0000),
        (base, base + 0x2_0000, base + 0x2_0000),
    ] {
        w32(regs::DEV_CTRL as u64, regs::DEV_CTRL_RESET);
        w32(regs::DEV_CTRL as u64, regs::DEV_CTRL_ENABLE);
        w64(b + regs::Q_SQ_BASE as u64, sq);
        w64(b + regs::Q_CQ_BASE as u64, cq);
        w64(b + regs::Q_IDX_BASE as u64, idx);
        w32(b + regs::Q_DEPTH as u64, 16);
        w32(b + regs::Q_OPS as u64, wdvirt_abi::ALL_OPS);
        w32(b + regs::Q_CTRL as u64, regs::Q_CTRL_ENABLE);
        let st = status();
        assert_eq!(
            st & (regs::Q_STATUS_ENABLED | regs::Q_STATUS_ERROR),
            regs::Q_STATUS_ERROR,
            "rings {sq:#x} {cq:#x} {idx:#x}: Q_STATUS {st:#x}"
        );
    }
    drop(vmm);
}

/// A VMM that sends requests (REGION_READs) and never reads the replies,
/// until both directions stay full: the server no longer reads (for
/// 200 ms), so it is blocked sending a reply, which it blocked on after
/// the last write that went through. Returns the socket, its client, the
/// requests sent and when the last went through; the caller checks the
/// server meanwhile (the device must not be locked) and that it closes the
/// connection at its message deadline.
pub fn requests_never_read(socket: &Path) -> (UnixStream, RawClient, u64, Instant) {
    let s = UnixStream::connect(socket).unwrap();
    let mut c = RawClient::new(s.try_clone().unwrap());
    c.version();
    let read = RawClient::region_write_body(0, 0, &[0; 4]);
    let mut msg = header(9, 32).as_bytes().to_vec();
    msg.extend_from_slice(&read[..16]);
    // Requests until both directions stay full: the server no longer reads
    // (for 200 ms, well inside the deadline), so it is blocked sending a
    // reply. It blocked after our last write that went through.
    s.set_nonblocking(true).unwrap();
    let t = Instant::now();
    let (mut sent, mut last_ok, mut full) = (0u64, Instant::now(), 0);
    while full < 10 {
        match (&s).write(&msg) {
            Ok(n) => {
                assert_eq!(n, msg.len(), "a short write");
                (sent, last_ok, full) = (sent + 1, Instant::now(), 0);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                full += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("after {sent} requests: {e}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{sent} requests sent"
        );
    }
    (s, c, sent, last_ok)
}
