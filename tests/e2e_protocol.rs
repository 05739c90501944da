//! Bad vfio-user messages sent to a real wdvirt instance get their exact
//! errnos, while a second instance on the same accelerator runs jobs
//! unaffected; after the bad peer is gone, the instance serves a good VMM.

#[path = "transport_support/mod.rs"]
mod support;

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use support::{RawClient, borrow};
use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::soft::SoftAccel;
use wdvirt::daemon::instance::Instance;
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_guest::{Device, Format};

mod common;

const RAM: u64 = common::RAM_BASE;

fn instance(accel: &SharedAccelerator, dir: &std::path::Path, name: &str, pasid: u32) -> Instance {
    common::instance(accel, dir, name, pasid, WdConfig::default())
}

/// Guest RAM as QEMU's memory-backend-memfd makes it (sealed).
use support::sealed_memfd as memfd;

fn run_jobs(socket: std::path::PathBuf, rounds: u32) -> u64 {
    let vmm =
        Arc::new(LoopbackVmm::connect(&socket, GuestRam::new(RAM, 8 << 20).unwrap()).unwrap());
    let dev = Device::probe(vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool = vmm.dma_pool().unwrap();
    let mut q = dev.queue(0, 32, dev.info().cap_ops, &pool).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i / 7 % 13) as u8).collect();
    for _ in 0..rounds {
        let z = q.compress(Format::Zlib, 1, &data).unwrap();
        assert_eq!(q.decompress(Format::Zlib, &z, data.len()).unwrap(), data);
    }
    2 * rounds as u64
}

#[test]
fn malformed_messages_get_exact_errnos_and_harm_nothing_else() {
    let accel: SharedAccelerator = SoftAccel::new(2);
    let dir = tempfile::tempdir().unwrap();
    let bad = instance(&accel, dir.path(), "bad", 1);
    let good = instance(&accel, dir.path(), "good", 2);
    let good_socket = good.socket().to_path_buf();
    let worker = std::thread::spawn(move || run_jobs(good_socket, 30));

    let mut c = RawClient::new(UnixStream::connect(bad.socket()).unwrap());
    assert_eq!(
        c.request(3, &[0; 24], &[]).errno(),
        libc::EINVAL,
        "DMA_UNMAP before VERSION"
    );
    c.version();
    let ram = memfd(1 << 20);
    assert!(
        !c.dma_map(3, 0, RAM, 1 << 20, &borrow(std::slice::from_ref(&ram)))
            .is_error()
    );
    let other = memfd(1 << 20);
    assert_eq!(
        c.dma_map(
            3,
            0,
            RAM + 4096,
            4096,
            &borrow(std::slice::from_ref(&other))
        )
        .errno(),
        libc::EEXIST,
        "overlap"
    );
    let two = [memfd(4096), memfd(4096)];
    assert_eq!(
        c.dma_map(3, 0, 0x4000_0000, 4096, &borrow(&two)).errno(),
        libc::EINVAL,
        "two fds on one map"
    );
    assert_eq!(
        c.dma_map(3, 0, 0x4000_0010, 4096, &[]).errno(),
        libc::EINVAL,
        "unaligned iova"
    );
    assert_eq!(
        c.request(2, &[0; 8], &[]).errno(),
        libc::EINVAL,
        "truncated DMA_MAP"
    );
    assert_eq!(
        c.request(0x7777, &[], &[]).errno(),
        libc::ENOSYS,
        "unknown command"
    );
    assert_eq!(
        c.request(16, &[0; 16], &[]).errno(),
        libc::EINVAL,
        "DEVICE_FEATURE with argsz 0"
    );
    let mut feature = 16u32.to_ne_bytes().to_vec();
    feature.extend_from_slice(&(0x10000u32 | 11).to_ne_bytes());
    assert_eq!(
        c.request(16, &feature, &[]).errno(),
        libc::ENOTSUP,
        "DEVICE_FEATURE of a feature vfio-user does not have"
    );
    assert_eq!(
        c.region_read(0, wdvirt_abi::pci::BAR0_SIZE - 2, 4).errno(),
        libc::EINVAL,
        "read past BAR0"
    );
    assert_eq!(
        c.region_read(42, 0, 4).errno(),
        libc::EINVAL,
        "no such region"
    );
    assert_eq!(
        c.set_irqs(0x24, 2, 3, 2, &[]).errno(),
        libc::EINVAL,
        "MSI-X vectors past the count"
    );
    // Still in sync: a good request is answered.
    let id = c.region_read(7, 0, 4).ok();
    assert_eq!(
        u16::from_le_bytes([id.body[16], id.body[17]]),
        wdvirt_abi::pci::VENDOR_ID
    );
    // An unframeable header ends the connection.
    c.send_raw(
        &[1, 0, 9, 0, 255, 255, 255, 127, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
    );
    assert_eq!(c.recv().errno(), libc::E2BIG);
    c.expect_eof();

    let good_jobs = worker.join().unwrap();
    let g = good.report();
    assert_eq!(
        (g.queues[0].jobs_ok, g.queues[0].jobs_failed),
        (good_jobs, 0)
    );
    assert_eq!(g.transport.unwrap().errors_sent, 0);
    let b = bad.report();
    assert!(b.transport.unwrap().errors_sent >= 10, "{:?}", b.transport);
    // The bad peer is gone; the instance serves the next VMM normally.
    let before = bad.report().queues[0].jobs_ok;
    run_jobs(bad.socket().to_path_buf(), 1);
    let after = bad.report();
    assert_eq!(
        (
            after.queues[0].jobs_ok - before,
            after.queues[0].jobs_failed
        ),
        (2, 0)
    );
    assert_eq!(after.connections, 2);
}

#[test]
fn unsealed_guest_memory_is_refused_and_the_connection_goes_on() {
    let accel: SharedAccelerator = SoftAccel::new(1);
    let dir = tempfile::tempdir().unwrap();
    let inst = instance(&accel, dir.path(), "unsealed", 3);
    let mut c = RawClient::new(UnixStream::connect(inst.socket()).unwrap());
    c.version();
    let fd = support::memfd(1 << 20);
    assert_eq!(
        c.dma_map(3, 0, RAM, 1 << 20, &borrow(std::slice::from_ref(&fd)))
            .errno(),
        libc::EINVAL
    );
    // The refused range is free for a proper map.
    let sealed = memfd(1 << 20);
    assert!(
        !c.dma_map(3, 0, RAM, 1 << 20, &borrow(std::slice::from_ref(&sealed)))
            .is_error()
    );
}
