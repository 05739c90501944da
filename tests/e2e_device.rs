//! End to end, as a VMM and a guest would drive it: a wdvirt instance on the
//! software accelerator, served on a real UNIX socket; the rust-vmm
//! `vfio_user` client (an independent implementation) connects, reads config
//! space, maps memfd guest RAM; the guest driver runs real jobs through the
//! rings; results are compared with direct library calls on the same bytes.

use std::sync::Arc;

use sha2::Digest;
use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::soft::SoftAccel;
use wdvirt::daemon::instance::{Instance, InstanceSpec};
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_abi::{JobStatus, Opcode, RegError, pci, regs};
use wdvirt_guest::{Device, DmaPool, Format, JobSpec};

mod common;
use common::{RAM_BASE, Rig};

const RAM_SIZE: u64 = 64 << 20;

/// Ours, for the general-purpose tests.
fn start(accel: &SharedAccelerator, name: &str, pasid: u32, config: WdConfig) -> Rig {
    common::start(accel, name, pasid, config, RAM_SIZE)
}

fn pool(vmm: &LoopbackVmm) -> DmaPool<Arc<GuestRam>> {
    vmm.dma_pool().unwrap()
}

/// Text-like data that compresses about 3:1 (the guest tool's generator).
fn corpus(len: usize, seed: u64) -> Vec<u8> {
    wdvirt_guest::workload::gen_data(seed, len)
}

#[test]
fn config_space_shows_the_documented_identity_bars_and_capabilities() {
    let accel: SharedAccelerator = SoftAccel::new(1);
    let rig = start(
        &accel,
        "cfg",
        1,
        WdConfig {
            queues: 4,
            ..WdConfig::default()
        },
    );
    let v = &rig.vmm;
    assert_eq!(v.config_read(0, 2).unwrap() as u16, pci::VENDOR_ID);
    assert_eq!(v.config_read(2, 2).unwrap() as u16, pci::DEVICE_ID);
    assert_eq!(v.config_read(8, 4).unwrap() >> 8, pci::CLASS_CODE);
    assert_eq!(
        v.config_read(0x2c, 2).unwrap() as u16,
        pci::SUBSYSTEM_VENDOR_ID
    );
    // BAR sizes from region info, and by the BAR-sizing write of all-ones.
    assert_eq!(v.region_size(0), Some(pci::BAR0_SIZE));
    assert_eq!(v.region_size(2), Some(pci::bar2_size(4)));
    assert_eq!(v.region_size(1), Some(0));
    for (bar, size) in [(0u64, pci::BAR0_SIZE), (2, pci::bar2_size(4))] {
        v.config_write(0x10 + 4 * bar, 4, 0xffff_ffff).unwrap();
        assert_eq!(
            v.config_read(0x10 + 4 * bar, 4).unwrap(),
            !(size as u32 - 1),
            "BAR{bar} sizing"
        );
    }
    v.config_write(0x30, 4, 0xffff_ffff).unwrap();
    assert_eq!(v.config_read(0x30, 4).unwrap(), 0, "no ROM");
    // Capability list: PCIe, MSI-X, PM, each once, ending in 0.
    let mut ids = Vec::new();
    let mut ptr = v.config_read(0x34, 1).unwrap() as u64;
    while ptr != 0 && ids.len() < 16 {
        ids.push(v.config_read(ptr, 1).unwrap() as u8);
        ptr = v.config_read(ptr + 1, 1).unwrap() as u64;
    }
    assert_eq!(ids, vec![0x10, 0x11, 0x01]);
    assert_ne!(v.config_read(6, 2).unwrap() & 0x10, 0, "STATUS.CAP_LIST");
    drop(rig.instance);
}

#[test]
fn guest_driver_jobs_over_the_socket_equal_direct_library_calls() {
    let accel: SharedAccelerator = SoftAccel::new(2);
    let rig = start(&accel, "jobs", 3, WdConfig::default());
    let dev = Device::probe(rig.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool = pool(&rig.vmm);
    let mut q = dev.queue(0, 64, dev.info().cap_ops, &pool).unwrap();

    let data = corpus(512 << 10, 7);
    for (format, level) in [(Format::Deflate, 1), (Format::Zlib, 6), (Format::Gzip, 9)] {
        let packed = q.compress(format, level, &data).unwrap();
        assert!(
            packed.len() < data.len() / 2,
            "{format:?} compressed to {}",
            packed.len()
        );
        // An independent decoder reads the device's output...
        let mut plain = Vec::new();
        use std::io::Read;
        match format {
            Format::Deflate => {
                flate2::read::DeflateDecoder::new(&packed[..]).read_to_end(&mut plain)
            }
            Format::Zlib => flate2::read::ZlibDecoder::new(&packed[..]).read_to_end(&mut plain),
            Format::Gzip => flate2::read::GzDecoder::new(&packed[..]).read_to_end(&mut plain),
        }
        .unwrap();
        assert_eq!(plain, data, "{format:?}");
        // ...and the device reads its own.
        assert_eq!(q.decompress(format, &packed, data.len()).unwrap(), data);
    }
    assert_eq!(
        q.crc32c(&data).unwrap(),
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &data) as u32
    );
    assert_eq!(
        q.sha256(&data).unwrap()[..],
        sha2::Sha256::digest(&data)[..]
    );
    assert_eq!(q.copy(&data[..4096]).unwrap(), &data[..4096]);
    assert_eq!(q.fill(0xa5, 1000).unwrap(), vec![0xa5; 1000]);
    let mut other = data[..8192].to_vec();
    other[5000] ^= 1;
    assert_eq!(q.compare(&data[..8192], &other).unwrap(), Some(5000));

    let report = rig.instance.report();
    assert_eq!(report.queues[0].jobs_failed, 0);
    assert_eq!(report.queues[0].jobs_ok, 11);
    assert_eq!(report.pasid, 3);
    assert_eq!(report.connections, 1);
}

#[test]
fn batches_keep_the_ring_full_and_need_few_doorbells() {
    let accel: SharedAccelerator = SoftAccel::new(2);
    let rig = start(&accel, "batch", 4, WdConfig::default());
    let dev = Device::probe(rig.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool = pool(&rig.vmm);
    let mut q = dev.queue(1, 32, dev.info().cap_ops, &pool).unwrap();
    let data = corpus(4096, 3);
    let src = pool.alloc(4096, 64).unwrap();
    src.write(0, &data).unwrap();
    let jobs: Vec<JobSpec> = (0..500)
        .map(|_| JobSpec::new(Opcode::Crc32c).src(src.addr(), 4096))
        .collect();
    let done = q.run_batch(&jobs).unwrap();
    let want = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &data) as u32;
    assert_eq!(done.len(), 500);
    assert!(
        done.iter()
            .all(|c| c.status == JobStatus::Ok.code() && c.result == want)
    );
    let report = rig.instance.report();
    assert_eq!(report.queues[1].jobs_ok, 500);
    assert!(
        report.queues[1].doorbells < 500,
        "event suppression: {} doorbells for 500 jobs",
        report.queues[1].doorbells
    );
}

#[test]
fn bad_mmio_and_descriptors_get_their_codes_while_a_second_instance_keeps_working() {
    let accel: SharedAccelerator = SoftAccel::new(2);
    let bad = start(
        &accel,
        "bad",
        5,
        WdConfig {
            ops: !Opcode::Sha256.bit() & wdvirt_abi::ALL_OPS,
            ..WdConfig::default()
        },
    );
    let good = start(&accel, "good", 6, WdConfig::default());

    // The good instance works throughout, on another thread.
    let good_vmm = good.vmm.clone();
    let worker = std::thread::spawn(move || {
        let dev = Device::probe(good_vmm.clone()).unwrap();
        dev.enable().unwrap();
        let pool = pool(&good_vmm);
        let mut q = dev.queue(0, 64, dev.info().cap_ops, &pool).unwrap();
        let data = corpus(64 << 10, 11);
        let mut done = 0;
        for _ in 0..20 {
            let packed = q.compress(Format::Gzip, 1, &data).unwrap();
            assert_eq!(
                q.decompress(Format::Gzip, &packed, data.len()).unwrap(),
                data
            );
            assert_eq!(
                q.sha256(&data).unwrap()[..],
                sha2::Sha256::digest(&data)[..]
            );
            done += 3;
        }
        done
    });

    let v = &bad.vmm;
    let dev = Device::probe(v.clone()).unwrap();
    dev.enable().unwrap();
    let q0 = regs::queue(0) as u64;
    let write = |off: u64, data: &[u8]| v.region_write(0, off, data).unwrap();
    let code = || {
        let mut b = [0u8; 4];
        v.region_read(0, regs::ERR_CODE as u64, &mut b).unwrap();
        v.region_write(0, regs::ERR_STATUS as u64, &1u32.to_le_bytes())
            .unwrap();
        RegError::from_code(u32::from_le_bytes(b) as u16)
    };
    write(regs::DEV_CTRL as u64 + 1, &[1]);
    assert_eq!(
        code(),
        Some(RegError::BadWidth),
        "byte write to a 32-bit register"
    );
    write(regs::DEV_CTRL as u64 + 2, &[0; 4]);
    assert_eq!(code(), Some(RegError::Unaligned));
    write(0xf00, &[0; 4]);
    assert_eq!(code(), Some(RegError::OutOfRange));
    write(regs::NUM_QUEUES as u64, &[9, 0, 0, 0]);
    assert_eq!(code(), Some(RegError::ReadOnly));
    write(regs::DEV_CTRL as u64, &0x8000_0001u32.to_le_bytes());
    assert_eq!(code(), Some(RegError::ReservedBits));
    write(q0 + regs::Q_DEPTH as u64, &48u32.to_le_bytes());
    assert_eq!(code(), Some(RegError::BadDepth));
    write(q0 + regs::Q_OPS as u64, &Opcode::Sha256.bit().to_le_bytes());
    assert_eq!(code(), Some(RegError::OpNotAllowed));
    // A ring outside the memory the VMM mapped.
    write(q0 + regs::Q_SQ_BASE as u64, &0x4000u64.to_le_bytes());
    write(
        q0 + regs::Q_CQ_BASE as u64,
        &(RAM_BASE + 0x1000).to_le_bytes(),
    );
    write(
        q0 + regs::Q_IDX_BASE as u64,
        &(RAM_BASE + 0x2000).to_le_bytes(),
    );
    write(q0 + regs::Q_DEPTH as u64, &16u32.to_le_bytes());
    write(q0 + regs::Q_CTRL as u64, &regs::Q_CTRL_ENABLE.to_le_bytes());
    assert_eq!(code(), Some(RegError::RingUnmapped));
    // The instance is still usable after all that: bad descriptors next.
    write(q0 + regs::Q_CTRL as u64, &regs::Q_CTRL_RESET.to_le_bytes());
    let pool = pool(v);
    let mut q = dev.queue(0, 16, dev.info().cap_ops, &pool).unwrap();
    let buf = pool.alloc(8192, 64).unwrap();
    let (sq, _, _) = q.ring_addresses();
    let cases = [
        (
            JobSpec::new(Opcode::Copy)
                .src(0x1000, 64)
                .dst(buf.addr(), 64),
            JobStatus::BadAddress,
        ),
        (
            JobSpec::new(Opcode::Copy)
                .src(buf.addr(), 64)
                .dst(RAM_BASE + RAM_SIZE - 32, 64),
            JobStatus::BadAddress,
        ),
        (
            JobSpec::new(Opcode::Copy)
                .src(u64::MAX - 16, 64)
                .dst(buf.addr(), 64),
            JobStatus::BadLength,
        ),
        (
            JobSpec::new(Opcode::Copy).src(buf.addr(), 64).dst(sq, 64),
            JobStatus::OverlapsRing,
        ),
        (
            JobSpec::new(Opcode::Sha256)
                .src(buf.addr(), 64)
                .dst(buf.addr() + 4096, 32),
            JobStatus::OpNotAllowed,
        ),
        (
            JobSpec::new(Opcode::Crc32c).src(buf.addr(), 64),
            JobStatus::Ok,
        ),
    ];
    let jobs: Vec<JobSpec> = cases.iter().map(|c| c.0).collect();
    let done = q.run_batch(&jobs).unwrap();
    for (c, (_, want)) in done.iter().zip(&cases) {
        assert_eq!(JobStatus::from_code(c.status), Some(*want));
    }
    // An unknown opcode, written raw.
    let raw = wdvirt_abi::SubmissionEntry {
        opcode: 200,
        tag: 77,
        ..Default::default()
    };
    q.submit(&[raw]).unwrap();
    let mut out = Vec::new();
    q.wait(&mut out, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(
        (out[0].tag, JobStatus::from_code(out[0].status)),
        (77, Some(JobStatus::BadOpcode))
    );

    let good_jobs = worker.join().unwrap();
    let g = good.instance.report();
    assert_eq!(
        (g.queues[0].jobs_ok, g.queues[0].jobs_failed),
        (good_jobs, 0)
    );
    assert_eq!(
        g.device.register_errors, 0,
        "the other instance saw none of it"
    );
    let b = bad.instance.report();
    assert_eq!(b.queues[0].jobs_failed, 6);
    assert!(b.device.register_errors >= 8);
}

#[test]
fn a_vmm_reconnecting_finds_a_fresh_device() {
    let accel: SharedAccelerator = SoftAccel::new(1);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("re.sock");
    let spec = InstanceSpec {
        name: "re".into(),
        socket: socket.clone(),
        config: WdConfig::default(),
        type_name: wdvirt::vdev::wd::DEFAULT_TYPE_NAME.into(),
    };
    let instance = Instance::start(spec, accel, 9).unwrap();
    for round in 0..2 {
        let vmm = Arc::new(
            LoopbackVmm::connect(&socket, GuestRam::new(RAM_BASE, 4 << 20).unwrap()).unwrap(),
        );
        let dev = Device::probe(vmm.clone()).unwrap();
        assert!(
            !dev.is_enabled().unwrap(),
            "round {round}: device starts disabled"
        );
        dev.enable().unwrap();
        let pool = pool(&vmm);
        let mut q = dev.queue(0, 8, dev.info().cap_ops, &pool).unwrap();
        assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
    }
    assert_eq!(instance.report().connections, 2);
}

/// Program a queue by hand (the driver polls and never sets a vector).
fn manual_queue(
    vmm: &LoopbackVmm,
    q: u32,
    depth: u32,
    vector: u32,
    coalesce: u32,
) -> (u64, u64, u64) {
    let (sq, cq, idx) = (
        RAM_BASE + 0x10_0000,
        RAM_BASE + 0x20_0000,
        RAM_BASE + 0x30_0000,
    );
    let b = regs::queue(q) as u64;
    let w32 = |off: u64, v: u32| vmm.region_write(0, off, &v.to_le_bytes()).unwrap();
    let w64 = |off: u64, v: u64| vmm.region_write(0, off, &v.to_le_bytes()).unwrap();
    w32(regs::DEV_CTRL as u64, regs::DEV_CTRL_ENABLE);
    w64(b + regs::Q_SQ_BASE as u64, sq);
    w64(b + regs::Q_CQ_BASE as u64, cq);
    w64(b + regs::Q_IDX_BASE as u64, idx);
    w32(b + regs::Q_DEPTH as u64, depth);
    w32(b + regs::Q_OPS as u64, wdvirt_abi::ALL_OPS);
    w32(b + regs::Q_MSIX_VECTOR as u64, vector);
    w32(b + regs::Q_IRQ_COALESCE as u64, coalesce);
    w32(b + regs::Q_CTRL as u64, regs::Q_CTRL_ENABLE);
    let mut st = [0u8; 4];
    vmm.region_read(0, b + regs::Q_STATUS as u64, &mut st)
        .unwrap();
    assert_eq!(u32::from_le_bytes(st), regs::Q_STATUS_ENABLED);
    (sq, cq, idx)
}

fn eventfd_count(fd: &std::os::fd::OwnedFd, wait: std::time::Duration) -> u64 {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut b = [0u8; 8];
        if rustix::io::read(fd, &mut b).is_ok() {
            return u64::from_ne_bytes(b);
        }
        if std::time::Instant::now() > deadline {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn completions_raise_msix_through_the_vmm_eventfd_with_coalescing() {
    use wdvirt_guest::DmaMemory;
    let accel: SharedAccelerator = SoftAccel::new(1);
    let rig = start(&accel, "irq", 8, WdConfig::default());
    let efd = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
    )
    .unwrap();
    rig.vmm
        .enable_msix_vector(1, std::os::fd::AsFd::as_fd(&efd))
        .unwrap();
    // Queue 2 on vector 1: an interrupt per 8 completions, or after 50 ms.
    let depth = 64;
    let (sq, _cq, idx) = manual_queue(&rig.vmm, 2, depth, 1, 8 | (50_000 << 16));
    let ram = rig.vmm.ram();
    let buf = RAM_BASE + 0x40_0000;
    ram.write(buf, b"123456789").unwrap();
    let submit = |from: u32, n: u32| {
        for t in from..from + n {
            let e = wdvirt_abi::SubmissionEntry {
                opcode: Opcode::Crc32c as u8,
                tag: t,
                src: buf,
                src_len: 9,
                ..Default::default()
            };
            ram.write(sq + (t % depth) as u64 * 64, &e.to_bytes())
                .unwrap();
        }
        ram.write_u32(idx, from + n).unwrap();
        rig.vmm
            .region_write(2, 2 * 0x1000, &0u32.to_le_bytes())
            .unwrap();
    };
    // 16 completions submitted together: at least one interrupt per 8
    // completions written at once (several may be written between two
    // looks), so one or two in all, never one per job.
    submit(0, 16);
    let mut seen = eventfd_count(&efd, std::time::Duration::from_secs(5));
    std::thread::sleep(std::time::Duration::from_millis(150));
    seen += eventfd_count(&efd, std::time::Duration::ZERO);
    assert!(
        (1..=2).contains(&seen),
        "16 completions at 8 per interrupt gave {seen}"
    );
    assert_eq!(rig.instance.report().queues[2].interrupts, seen);
    // One more: below the count, so it fires on the 50 ms timer.
    ram.write_u32(idx + 4, 16).unwrap();
    submit(16, 1);
    assert_eq!(eventfd_count(&efd, std::time::Duration::from_secs(5)), 1);
    let report = rig.instance.report();
    assert_eq!(
        (report.queues[2].jobs_ok, report.queues[2].interrupts),
        (17, seen + 1)
    );
}

#[test]
fn a_second_vmm_on_a_busy_instance_is_refused_at_once_and_the_first_is_unaffected() {
    let accel: SharedAccelerator = SoftAccel::new(1);
    let rig = start(&accel, "busy", 10, WdConfig::default());
    let dev = Device::probe(rig.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let t = std::time::Instant::now();
    let second = LoopbackVmm::connect(
        rig.instance.socket(),
        GuestRam::new(RAM_BASE, 4 << 20).unwrap(),
    );
    assert!(second.is_err(), "the second VMM must not be served");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "refused fast, not by timeout: {:?}",
        t.elapsed()
    );
    let pool = pool(&rig.vmm);
    let mut q = dev.queue(0, 8, dev.info().cap_ops, &pool).unwrap();
    assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
    let r = rig.instance.report();
    assert_eq!((r.connections, r.refused_connections), (1, 1));
}

/// The guest tool's BAR0 access for `garbage`, over the VMM's socket.
struct SocketBar<'a>(&'a LoopbackVmm);
impl wdvirt_guest::workload::RawBar for SocketBar<'_> {
    fn read(&self, offset: u64, width: u8) -> Result<u32, wdvirt_guest::MmioError> {
        let mut b = [0u8; 4];
        self.0
            .region_read(0, offset, &mut b[..width as usize])
            .map_err(|e| wdvirt_guest::MmioError::Transport(e.to_string()))?;
        Ok(u32::from_le_bytes(b))
    }
    fn write(&self, offset: u64, width: u8, value: u32) -> Result<(), wdvirt_guest::MmioError> {
        self.0
            .region_write(0, offset, &value.to_le_bytes()[..width as usize])
            .map_err(|e| wdvirt_guest::MmioError::Transport(e.to_string()))
    }
}

#[test]
fn the_guest_tools_run_and_garbage_modes_pass_against_the_real_device() {
    use wdvirt_guest::workload::{self, JobKind, RunOptions};
    let accel: SharedAccelerator = SoftAccel::new(2);
    let rig = start(&accel, "tool", 11, WdConfig::default());
    let dev = Device::probe(rig.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool = pool(&rig.vmm);
    {
        let mut q = dev.queue(0, 64, dev.info().cap_ops, &pool).unwrap();
        let opts = RunOptions {
            jobs: JobKind::parse_list("deflate,zlib,gzip,crc32c,sha256,copy,fill,compare").unwrap(),
            size: 3 << 20,
            seed: 42,
            level: 1,
        };
        let report = workload::run(&mut q, &opts);
        assert_eq!(report["ok"], true, "{report:#}");
        assert_eq!(report["totals"]["failed"], 0);
        // What the guest counted is what the device did.
        let device_jobs = report["totals"]["device_jobs"].as_u64().unwrap();
        let r = rig.instance.report();
        assert_eq!(r.queues[0].jobs_ok + r.queues[0].jobs_failed, device_jobs);
    }
    let report = workload::garbage(&dev, &SocketBar(&rig.vmm), 3000, 7, &[1, 2, 4], &mut || {
        false
    });
    assert_eq!(report["ok"], true, "{report:#}");
    assert!(rig.instance.report().device.register_errors > 100);
}

/// Small jobs on the production stack (the engine under the QoS
/// scheduler): a guest's 64-byte copies run on its queue's worker thread,
/// lent the engine (`docs/qos.md`), are charged to its instance, and land
/// byte for byte; a neighbour's large jobs run on the engine thread beside
/// them, charged to it.
#[test]
fn small_jobs_run_on_the_queue_worker_charged_to_their_instance_beside_large_ones() {
    let soft = SoftAccel::new(1);
    let sched = wdvirt::qos::ScheduledAccel::new(soft.clone(), 1).unwrap();
    let accel: SharedAccelerator = sched.clone();
    let small = start(&accel, "small", 5, WdConfig::default());
    let large = start(&accel, "large", 6, WdConfig::default());
    let engine_jobs = || {
        soft.stats()
            .engines
            .iter()
            .map(|e| e.counters.jobs)
            .sum::<u64>()
    };

    // Alone: nearly every copy runs on the worker's thread. (The first
    // batch goes to the engine one job at a time: a class never measured
    // goes alone, and is lent only once its cost is known. On a loaded
    // host a copy interrupted while the engine timed it can look dearer
    // than 5 µs and send a batch or two more there, until its class's
    // average comes back down.)
    let dev = Device::probe(small.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool = pool(&small.vmm);
    let mut q = dev.queue(0, 256, dev.info().cap_ops, &pool).unwrap();
    let data = corpus(64 * 64, 9);
    let src = pool.alloc(data.len() as u64, 64).unwrap();
    src.write(0, &data).unwrap();
    let dst = pool.alloc(data.len() as u64, 64).unwrap();
    let copies: Vec<JobSpec> = (0..64u64)
        .map(|i| {
            JobSpec::new(Opcode::Copy)
                .src(src.addr() + i * 64, 64)
                .dst(dst.addr() + i * 64, 64)
        })
        .collect();
    let before = engine_jobs();
    for _ in 0..50 {
        let done = q.run_batch(&copies).unwrap();
        assert!(done.iter().all(|c| c.status == JobStatus::Ok.code()));
        assert_eq!(dst.to_vec(data.len()).unwrap(), data);
    }
    let on_engine = engine_jobs() - before;
    assert!(
        on_engine <= 4 * copies.len() as u64,
        "{on_engine} of 3200 small copies went through the engine thread"
    );
    let charged = sched.snapshot(5).unwrap().engine_ns;
    assert!(charged > 0, "the worker's jobs were charged nothing");

    // Beside a neighbour's 64 KiB SHA-256 jobs (measured over 5 µs: the
    // engine thread's), both verify and each is charged its own.
    let big = corpus(64 << 10, 4);
    let want = sha2::Sha256::digest(&big);
    let neighbour = std::thread::spawn(move || {
        let dev = Device::probe(large.vmm.clone()).unwrap();
        dev.enable().unwrap();
        let big_pool = large.vmm.dma_pool().unwrap();
        let mut q = dev.queue(0, 64, dev.info().cap_ops, &big_pool).unwrap();
        for _ in 0..100 {
            assert_eq!(q.sha256(&big).unwrap()[..], want[..]);
        }
        large
    });
    for _ in 0..50 {
        let done = q.run_batch(&copies).unwrap();
        assert!(done.iter().all(|c| c.status == JobStatus::Ok.code()));
        assert_eq!(dst.to_vec(data.len()).unwrap(), data);
    }
    let large = neighbour.join().unwrap();
    assert!(sched.snapshot(5).unwrap().engine_ns > charged);
    assert!(sched.snapshot(6).unwrap().engine_ns > 0);
    assert!(
        engine_jobs() - before >= 100,
        "the SHA-256 jobs ran on the engine"
    );
    assert_eq!(small.instance.report().queues[0].jobs_ok, 6400);
    assert_eq!(large.instance.report().queues[0].jobs_ok, 100);
}
