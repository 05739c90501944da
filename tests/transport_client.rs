//! The transport against an independent peer: rust-vmm's `vfio_user::Client`
//! (0.1.7), over a real listening socket. Also the listener's own rules.

mod transport_support;

use std::os::fd::AsRawFd;

use transport_support::*;
use wdvirt::transport::{Connection, Disconnect, Listener, TransportError};
use wdvirt::vdev::device::IrqAction;

fn listen() -> (tempfile::TempDir, std::path::PathBuf, Listener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.sock");
    let l = Listener::bind(&path).unwrap();
    (dir, path, l)
}

/// Accepts one connection on a thread and serves it.
fn serve_listener(l: Listener) -> std::thread::JoinHandle<(Served, Listener)> {
    std::thread::spawn(move || {
        let conn: Connection = l.accept().unwrap();
        (serve(conn), l)
    })
}

#[test]
fn rust_vmm_client_connects_and_sees_regions() {
    let (_dir, path, l) = listen();
    let t = serve_listener(l);
    let client = vfio_user::Client::new(&path).expect("VERSION + region infos");
    let (served, _l) = t.join().unwrap();

    let r0 = client.region(0).unwrap();
    assert_eq!(r0.size, BAR0_SIZE);
    assert_eq!(r0.flags, 3);
    assert!(r0.file_offset.is_none());
    let r2 = client.region(2).unwrap();
    assert_eq!(r2.size, BAR2_SIZE);
    assert_eq!(r2.flags & 0xc, 0xc, "MMAP|CAPS");
    assert!(r2.file_offset.is_some(), "the mmap fd came with the reply");
    let areas: Vec<(u64, u64)> = r2.sparse_areas.iter().map(|a| (a.offset, a.size)).collect();
    assert_eq!(areas, [(0x1000, 0x1000), (0x3000, 0x1000)]);
    assert_eq!(client.region(7).unwrap().size, CONFIG_SIZE);
    assert_eq!(client.region(1).unwrap().size, 0);

    drop(client);
    assert_eq!(served.stats.snapshot().errors_sent, 0);
    let log = served.log.clone();
    assert_eq!(served.join().unwrap(), Disconnect::PeerClosed);
    assert_eq!(log.lock().disconnected, 1);
}

#[test]
fn rust_vmm_client_region_round_trip_dma_irqs_reset() {
    let (_dir, path, l) = listen();
    let t = serve_listener(l);
    let mut client = vfio_user::Client::new(&path).unwrap();
    let (served, _l) = t.join().unwrap();

    // Region write then read back.
    client
        .region_write(0, 0x20, &[1, 2, 3, 4, 5, 6, 7, 8])
        .unwrap();
    let mut back = [0u8; 8];
    client.region_read(0, 0x20, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8]);
    client.region_write(7, 0x4, &[0x06, 0]).unwrap();
    let mut cfg = [0u8; 2];
    client.region_read(7, 0x4, &mut cfg).unwrap();
    assert_eq!(cfg, [0x06, 0]);

    // DMA map of a memfd: the device gets the fd, iova, size, offset.
    let mem = memfd(0x20000);
    rustix::io::pwrite(&mem, b"guest ram", 0x1000).unwrap();
    client
        .dma_map(0x1000, 0x100000, 0x10000, mem.as_raw_fd())
        .unwrap();
    {
        let log = served.log.lock();
        assert_eq!(log.maps, [(0x100000, 0x10000, true, true, Some(0x1000))]);
        let mut buf = [0u8; 9];
        rustix::io::pread(&log.map_fds[0], &mut buf, 0x1000).unwrap();
        assert_eq!(&buf, b"guest ram", "the device's fd is the same memory");
    }

    // IRQ info and an eventfd for MSI-X vector 0.
    let info = client.get_irq_info(2).unwrap();
    assert_eq!(info.count, IRQ_COUNTS[2]);
    let efd = eventfd();
    client.set_irqs(2, 0x24, 0, 1, &[efd.as_raw_fd()]).unwrap();
    {
        let log = served.log.lock();
        assert_eq!(log.irqs, [(2, IrqAction::Trigger, 0, 1, "eventfd", 1)]);
        rustix::io::write(&log.irq_fds[0], &1u64.to_ne_bytes()).unwrap();
    }
    let mut v = [0u8; 8];
    rustix::io::read(&efd, &mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 1, "the device signals our eventfd");

    client.reset().unwrap();
    client.dma_unmap(0x100000, 0x10000).unwrap();
    // A last round trip so every earlier reply is known to be consumed.
    client.region_read(0, 0x20, &mut back).unwrap();
    {
        let log = served.log.lock();
        assert_eq!(log.resets, 1);
        assert_eq!(log.unmaps, [(0x100000, 0x10000)]);
    }
    let stats = served.stats.snapshot();
    assert_eq!(stats.errors_sent, 0);
    assert_eq!(stats.fds_received, 2);

    client.shutdown().unwrap();
    assert_eq!(served.join().unwrap(), Disconnect::PeerClosed);
}

#[test]
fn listener_refuses_a_live_socket_and_replaces_a_stale_one() {
    let (_dir, path, l) = listen();
    match Listener::bind(&path) {
        Err(TransportError::SocketInUse { .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("bound over a live listener"),
    }
    assert_eq!(l.path(), path);
    assert!(l.as_raw_fd() >= 0);
    drop(l);
    assert!(!path.exists(), "drop removes our socket");

    // A stale socket file: bound, then its listener gone without cleanup.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let l = Listener::bind(&path).expect("stale socket replaced");
    drop(l);

    // Not a socket: refused, left alone.
    std::fs::write(&path, b"x").unwrap();
    assert!(matches!(
        Listener::bind(&path),
        Err(TransportError::Bind { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"x");
}

#[test]
fn accept_on_a_shut_down_listener_is_final() {
    // The daemon stops its accept loop by shutting the socket down.
    let (_dir, _path, l) = listen();
    rustix::net::shutdown(&l, rustix::net::Shutdown::Both).unwrap();
    match l.accept() {
        Err(e @ TransportError::Accept(_)) => {
            assert!(!e.is_transient(), "{e:?}");
            assert_eq!(e.errno(), libc::EINVAL as u32);
        }
        Err(e) => panic!("wrong error: {e:?}"),
        Ok(_) => panic!("accepted on a shut-down listener"),
    }
}
