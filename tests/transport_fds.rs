//! Fds the kernel drops on the way in (MSG_CTRUNC): when this process is
//! out of fds, a DMA_MAP or SET_IRQS EVENTFD whose fds never arrived is
//! refused with EMFILE and counted — never served as fd-less (RAM silently
//! unreachable) or as "de-assign". An accept that finds no fd free is a
//! transient error, and the VMM waits in the backlog. Each scenario runs in
//! a child process, since it lowers the process-wide RLIMIT_NOFILE.

mod transport_support;

use transport_support::*;

const RW: u32 = 3;
const MSIX: u32 = 2;

#[test]
fn messages_whose_fds_were_dropped_are_refused_with_emfile() {
    if !in_child_process("messages_whose_fds_were_dropped_are_refused_with_emfile") {
        return;
    }
    let (served, mut c) = serve_pair();
    c.version();
    let mem = memfd(0x10000);
    let efd = eventfd();
    {
        let _out = exhaust_fds();
        assert_eq!(
            c.dma_map(
                RW,
                0,
                0x100000,
                0x10000,
                &borrow(std::slice::from_ref(&mem))
            )
            .errno(),
            libc::EMFILE,
            "DMA_MAP whose fd was dropped"
        );
        assert_eq!(
            c.set_irqs(0x24, MSIX, 0, 1, &borrow(std::slice::from_ref(&efd)))
                .errno(),
            libc::EMFILE,
            "SET_IRQS EVENTFD whose fd was dropped"
        );
        // Messages without fds are still served meanwhile.
        c.dma_map(1, 0, 0xfffc0000, 0x40000, &[]).ok();
    }
    {
        let log = served.log.lock();
        assert_eq!(
            log.maps,
            [(0xfffc0000, 0x40000, true, false, None)],
            "the device never saw the fd-less remains"
        );
        assert!(log.irqs.is_empty(), "no de-assign reached the device");
    }
    let stats = served.stats.snapshot();
    assert_eq!(stats.fds_truncated, 2);
    assert_eq!(stats.errors_sent, 2);

    // With fds to spare again the same requests succeed: still in sync.
    c.dma_map(
        RW,
        0,
        0x100000,
        0x10000,
        &borrow(std::slice::from_ref(&mem)),
    )
    .ok();
    c.set_irqs(0x24, MSIX, 0, 1, &borrow(std::slice::from_ref(&efd)))
        .ok();
    let log = served.log.lock();
    assert_eq!(log.maps[1], (0x100000, 0x10000, true, true, Some(0)));
    assert_eq!(log.irqs.len(), 1);
    assert_eq!(log.irqs[0].5, 1, "the eventfd arrived");
}

#[test]
fn accept_without_a_free_fd_is_transient_and_the_vmm_waits() {
    if !in_child_process("accept_without_a_free_fd_is_transient_and_the_vmm_waits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.sock");
    let l = wdvirt::transport::Listener::bind(&path).unwrap();
    // The VMM's own socket needs an fd too: connect first.
    let vmm = std::os::unix::net::UnixStream::connect(&path).unwrap();
    {
        let _out = exhaust_fds();
        match l.accept() {
            Err(e) => {
                assert!(e.is_transient(), "{e:?}");
                assert_eq!(e.errno(), libc::EMFILE as u32);
            }
            Ok(_) => panic!("accepted with no fd free"),
        }
    }
    // Retried once fds are free again, the same VMM is served.
    let served = serve(l.accept().unwrap());
    let mut c = RawClient::new(vmm);
    c.version();
    drop(c);
    assert!(served.join().is_ok());
}
