//! A hostile guest, deterministic and bounded, for CI: 20,000 seeded random
//! BAR0, BAR2 and config-space accesses (raw REGION_READ/WRITE through the
//! real socket, via the rust-vmm client) interleaved with rounds of random
//! descriptors on a queue it set up properly. Meanwhile a second instance on
//! the same accelerator runs checked jobs. Afterwards the hostile instance
//! must still serve a clean driver session (probe, enable after
//! `DEV_CTRL_RESET`, a CRC32C job), and the second instance must have seen
//! no failure and no register error.
//!
//! Every access stays inside its region: the rust-vmm client cannot read an
//! error reply (it blocks), and out-of-range accesses are the transport's
//! business (`tests/transport_region.rs`, the `vfio_user_session` fuzz
//! target). A watchdog turns a hang into a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::soft::SoftAccel;
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::{CONFIG_REGION, GuestRam, LoopbackVmm};
use wdvirt_abi::{JobStatus, SubmissionEntry, idx, pci, regs};
use wdvirt_guest::{Device, DmaMemory, DmaPool, JobSpec};

const SEED: u64 = 0x6877_6476_6972_7401;
mod common;
use common::{RAM_BASE, Rig};

const RAM_SIZE: u64 = 4 << 20;
const ROUNDS: usize = 20;
const ACCESSES_PER_ROUND: usize = 1000;
const SQES_PER_ROUND: usize = 48;
const QUEUES: u32 = 4;

fn start(accel: &SharedAccelerator, name: &str, pasid: u32) -> Rig {
    let config = WdConfig {
        queues: QUEUES,
        max_depth: 64,
        ..WdConfig::default()
    };
    common::start(accel, name, pasid, config, RAM_SIZE)
}

fn pool(vmm: &LoopbackVmm) -> DmaPool<Arc<GuestRam>> {
    vmm.dma_pool().unwrap()
}

/// A value a hostile guest might write: anything, small numbers, depths,
/// masks, addresses in (and at the edges of) its RAM.
fn value(rng: &mut StdRng) -> u64 {
    match rng.random_range(0..6) {
        0 => rng.random(),
        1 => rng.random_range(0..4),
        2 => 1 << rng.random_range(0..12),
        3 => RAM_BASE + (rng.random_range(0..RAM_SIZE + 0x1000) & !0x3f),
        4 => u64::MAX - rng.random_range(0..0x100),
        _ => rng.random::<u32>() as u64,
    }
}

/// One in-range access to BAR0, BAR2 or config space.
fn random_access(rng: &mut StdRng, vmm: &LoopbackVmm) {
    const WIDTHS: [usize; 7] = [1, 2, 4, 4, 8, 8, 16];
    let (region, size, offset) = match rng.random_range(0..20) {
        // BAR0 registers: globals and the queue blocks (one past the last).
        0..=8 => {
            let off = if rng.random_bool(0.3) {
                rng.random_range(0..0x40)
            } else {
                regs::QUEUE_BASE as u64 + rng.random_range(0..(QUEUES as u64 + 1) * 0x40)
            };
            (0, pci::BAR0_SIZE, off)
        }
        // BAR0 anywhere: holes, the MSI-X table and PBA.
        9..=11 => (0, pci::BAR0_SIZE, rng.random_range(0..pci::BAR0_SIZE)),
        12..=14 => {
            let size = pci::bar2_size(QUEUES);
            (2, size, rng.random_range(0..size))
        }
        _ => (CONFIG_REGION, 4096, rng.random_range(0..0x100)),
    };
    let mut len = WIDTHS[rng.random_range(0..WIDTHS.len())];
    if region == CONFIG_REGION {
        len = len.min(4);
    }
    let offset = if rng.random_bool(0.8) {
        offset & !(len as u64 - 1)
    } else {
        offset
    }
    .min(size - len as u64);
    if rng.random_bool(0.5) {
        let mut data = [0u8; 16];
        data[..8].copy_from_slice(&value(rng).to_le_bytes());
        data[8..].copy_from_slice(&value(rng).to_le_bytes());
        vmm.region_write(region, offset, &data[..len]).unwrap();
    } else {
        let mut data = [0u8; 16];
        vmm.region_read(region, offset, &mut data[..len]).unwrap();
    }
}

fn read32(vmm: &LoopbackVmm, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    vmm.region_read(0, offset as u64, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Memory decode and bus mastering back on, as a driver's probe would.
fn restore_command(vmm: &LoopbackVmm) {
    let cmd = vmm.config_read(4, 2).unwrap();
    vmm.config_write(4, 2, cmd | 0b110).unwrap();
}

/// A descriptor a hostile guest might write: buffers in its scratch area,
/// anywhere in RAM (its own rings included), outside RAM or overflowing.
fn random_sqe(rng: &mut StdRng, tag: u32, scratch: u64) -> SubmissionEntry {
    let addr = |rng: &mut StdRng| match rng.random_range(0..8) {
        0..=3 => scratch + rng.random_range(0..0x1_0000),
        4 => RAM_BASE + rng.random_range(0..RAM_SIZE),
        5 => rng.random_range(0..0x10_0000),
        6 => u64::MAX - rng.random_range(0..0x1000),
        _ => rng.random(),
    };
    let len = |rng: &mut StdRng| match rng.random_range(0..5) {
        0 => 0,
        1 => rng.random_range(1..64),
        2 => rng.random_range(1..0x4000),
        3 => rng.random_range(0x4000..0x1_2000),
        _ => rng.random(),
    };
    let dirty = rng.random_bool(0.1);
    SubmissionEntry {
        opcode: if rng.random_bool(0.05) {
            rng.random()
        } else {
            rng.random_range(0..13)
        },
        flags: if dirty { rng.random() } else { 0 },
        reserved0: 0,
        tag,
        src: addr(rng),
        dst: addr(rng),
        src_len: len(rng),
        dst_len: len(rng),
        param: if rng.random_bool(0.8) {
            rng.random_range(0..13)
        } else {
            rng.random()
        },
        ctx: 0,
        reserved: if dirty && rng.random_bool(0.5) {
            [rng.random(), 0]
        } else {
            [0; 2]
        },
    }
}

/// The well-behaved tenant: checked CRC32C and copy jobs until told to stop.
fn good_tenant(vmm: Arc<LoopbackVmm>, stop: Arc<AtomicBool>) -> u64 {
    let dev = Device::probe(vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool = pool(&vmm);
    let mut q = dev.queue(0, 32, dev.info().cap_ops, &pool).unwrap();
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let crc = wdvirt_guest::crc::crc32c(&data);
    let mut jobs = 0;
    while !stop.load(Ordering::Acquire) || jobs < 20 {
        assert_eq!(q.crc32c(&data).unwrap(), crc);
        assert_eq!(q.copy(&data[..4096]).unwrap(), &data[..4096]);
        jobs += 2;
    }
    jobs
}

fn hostile_guest(bad: &Rig) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let vmm = &bad.vmm;
    let pool = pool(vmm);
    let scratch = pool.alloc(0x1_0000, 4096).unwrap();
    let mut completed = 0;
    let mut failed = 0;
    for round in 0..ROUNDS {
        for _ in 0..ACCESSES_PER_ROUND {
            random_access(&mut rng, vmm);
        }
        assert_eq!(read32(vmm, regs::ID), regs::ID_MAGIC, "round {round}");

        // Random descriptors on a queue set up properly.
        restore_command(vmm);
        let dev = Device::probe(vmm.clone()).unwrap();
        dev.reset().unwrap();
        dev.enable().unwrap();
        let qi = rng.random_range(0..QUEUES);
        let mut q = dev.queue(qi, 16, dev.info().cap_ops, &pool).unwrap();
        let sqes: Vec<SubmissionEntry> = (0..SQES_PER_ROUND as u32)
            .map(|tag| random_sqe(&mut rng, tag, scratch.addr()))
            .collect();
        let mut sent = 0;
        let mut done = Vec::new();
        while done.len() < sqes.len() {
            sent += q.submit(&sqes[sent..]).unwrap();
            q.wait(&mut done, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("round {round}: queue {qi} stalled: {e}"));
        }
        let mut tags: Vec<u32> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..SQES_PER_ROUND as u32).collect::<Vec<_>>());
        for c in &done {
            let status = JobStatus::from_code(c.status)
                .unwrap_or_else(|| panic!("round {round}: status {} is no JobStatus", c.status));
            if status == JobStatus::Ok {
                completed += 1;
            } else {
                failed += 1;
            }
        }
        // Then scribble over the ring indexes the driver owns (a tail far
        // ahead, a head that goes backwards) and ring the doorbell: the
        // worker re-runs stale entries or waits, it must not fall over.
        let (_, _, idx_block) = q.ring_addresses();
        let ram = vmm.ram();
        for _ in 0..4 {
            let tail: u32 = rng.random();
            ram.write_u32(idx_block + idx::SQ_TAIL, tail).unwrap();
            ram.write_u32(idx_block + idx::CQ_HEAD, rng.random())
                .unwrap();
            vmm.region_write(2, qi as u64 * pci::DOORBELL_STRIDE, &tail.to_le_bytes())
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
        drop(q);
    }
    (completed, failed)
}

/// Set by any panic in this process: a server, queue worker or engine
/// thread that dies is logged, not propagated, so the test looks for it.
static PANICKED: AtomicBool = AtomicBool::new(false);

#[test]
fn a_hostile_guest_leaves_its_device_usable_and_its_neighbour_untouched() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        default_hook(info);
    }));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let accel: SharedAccelerator = SoftAccel::new(2);
        let bad = start(&accel, "hostile", 21);
        let good = start(&accel, "neighbour", 22);
        let stop = Arc::new(AtomicBool::new(false));
        let tenant = {
            let (vmm, stop) = (good.vmm.clone(), stop.clone());
            std::thread::spawn(move || good_tenant(vmm, stop))
        };

        let (ok_jobs, failed_jobs) = hostile_guest(&bad);
        stop.store(true, Ordering::Release);
        let good_jobs = tenant.join().expect("the neighbour's jobs");

        // The hostile instance still serves a clean driver session.
        let vmm = &bad.vmm;
        restore_command(vmm);
        let dev = Device::probe(vmm.clone()).unwrap();
        dev.reset().unwrap();
        assert_eq!(
            dev.register_error_count().unwrap(),
            0,
            "reset clears ERR_COUNT"
        );
        dev.enable().unwrap();
        let pool = pool(vmm);
        let mut q = dev.queue(0, 8, dev.info().cap_ops, &pool).unwrap();
        assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
        let src = pool.alloc(64, 64).unwrap();
        let done = q
            .run_batch(&[JobSpec::new(wdvirt_abi::Opcode::Crc32c).src(src.addr(), 64)])
            .unwrap();
        assert_eq!(done[0].status, JobStatus::Ok.code());
        assert!(dev.last_register_error().unwrap().is_none());

        let b = bad.instance.report();
        let g = good.instance.report();
        tx.send((ok_jobs, failed_jobs, good_jobs, b, g)).unwrap();
    });
    let (ok_jobs, failed_jobs, good_jobs, b, g) = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the hostile-guest run finished (or it panicked: see above)");

    eprintln!(
        "hostile: {} register errors, {ok_jobs} jobs ok, {failed_jobs} refused, {} stray doorbells; \
         neighbour: {good_jobs} jobs",
        b.device.register_errors, b.device.stray_doorbells
    );
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "a thread panicked (see above)"
    );
    // The hostile guest did reach the interesting paths.
    assert!(b.device.register_errors > 1000, "{:?}", b.device);
    assert!(
        failed_jobs > 100 && ok_jobs > 10,
        "ok {ok_jobs} failed {failed_jobs}"
    );
    assert_eq!(b.connections, 1, "the hostile VMM was never disconnected");
    // The neighbour ran every job it submitted, and saw no error at all.
    let jobs: u64 = g.queues.iter().map(|q| q.jobs_ok).sum();
    let failures: u64 = g.queues.iter().map(|q| q.jobs_failed).sum();
    assert_eq!((jobs, failures), (good_jobs, 0));
    assert_eq!(g.device.register_errors, 0);
    assert_eq!(g.transport.map(|t| t.errors_sent), Some(0));
}
