//! Streams larger than one job, through a real instance over its vfio-user
//! socket: the guest driver compresses and decompresses a stream of many
//! MAX_XFER pieces, and zlib (flate2 on zlib-rs) is the independent judge
//! both ways. The 256 MiB run is `#[ignore]`d in the normal test run:
//! `cargo test --test stream_e2e -- --ignored` (docs/device-spec.md §4.1).

use std::sync::Arc;

use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::soft::SoftAccel;
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_abi::Opcode;
use wdvirt_guest::{Device, DmaPool, DriverError, Format};

mod common;

const RAM_SIZE: u64 = 64 << 20;

fn round_trip(total: usize, formats: &[Format]) {
    let accel: SharedAccelerator = SoftAccel::new(2);
    let rig = common::start(&accel, "stream", 5, WdConfig::default(), RAM_SIZE);
    let dev = Device::probe(rig.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool: DmaPool<Arc<GuestRam>> = LoopbackVmm::dma_pool(&rig.vmm).unwrap();
    let mut q = dev.queue(0, 8, dev.info().cap_ops, &pool).unwrap();
    let max = dev.info().max_xfer as usize;
    let data = wdvirt_guest::workload::gen_data(9, total);
    for &format in formats {
        // The device's stream, read back by zlib.
        let packed = q.stream_compress(format, 1, &data, max).unwrap();
        assert!(packed.len() > max, "{format:?}: more than one job's worth");
        assert!(
            common::flate2_decode(format, &packed) == data,
            "{format:?}: zlib reads it back"
        );
        // zlib's stream, read by the device, piece by piece.
        let theirs = common::flate2_encode(format, &data);
        let (back, used) = q.stream_decompress(format, &theirs).unwrap();
        assert_eq!(used, theirs.len(), "{format:?}: all consumed");
        assert!(back == data, "{format:?}: the device decodes zlib's stream");
        // And its own.
        let (back, _) = q.stream_decompress(format, &packed).unwrap();
        assert!(back == data, "{format:?}: round trip");
    }
    let r = rig.instance.report();
    assert_eq!(r.queues[0].jobs_failed, 0);
}

#[test]
fn a_32_mib_stream_round_trips_through_the_device_and_zlib() {
    round_trip(32 << 20, &[Format::Gzip, Format::Zlib, Format::Deflate]);
}

#[test]
#[ignore = "256 MiB, about a minute: cargo test --test stream_e2e -- --ignored"]
fn a_256_mib_stream_round_trips_through_the_device_and_zlib() {
    round_trip(256 << 20, &[Format::Gzip]);
}

#[test]
fn concatenated_gzip_members_are_decoded_one_stream_at_a_time() {
    let accel: SharedAccelerator = SoftAccel::new(1);
    let rig = common::start(&accel, "members", 6, WdConfig::default(), RAM_SIZE);
    let dev = Device::probe(rig.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool: DmaPool<Arc<GuestRam>> = LoopbackVmm::dma_pool(&rig.vmm).unwrap();
    let mut q = dev.queue(0, 8, dev.info().cap_ops, &pool).unwrap();
    let (a, b) = (
        wdvirt_guest::workload::gen_data(1, 3 << 20),
        wdvirt_guest::workload::gen_data(2, 100_000),
    );
    let both = [
        common::flate2_encode(Format::Gzip, &a),
        common::flate2_encode(Format::Gzip, &b),
    ]
    .concat();
    let (first, used) = q.stream_decompress(Format::Gzip, &both).unwrap();
    assert!(first == a);
    let (second, rest) = q.stream_decompress(Format::Gzip, &both[used..]).unwrap();
    assert!(second == b);
    assert_eq!(used + rest, both.len());
    // A stream cut short says so, with how far it got.
    let cut = &both[..used / 2];
    match q.stream_decompress(Format::Gzip, cut) {
        Err(DriverError::TruncatedStream { consumed }) => assert!(consumed <= cut.len()),
        other => panic!("{:?}", other.map(|(o, n)| (o.len(), n))),
    }
}

/// The guest tool's `run --jobs stream-...` (what a Linux guest runs) over a
/// real instance: one stream of the whole input, verified by round trip.
#[test]
fn the_guest_tools_stream_jobs_pass_over_a_real_instance() {
    use wdvirt_guest::workload::{JobKind, RunOptions};
    let accel: SharedAccelerator = SoftAccel::new(2);
    let rig = common::start(&accel, "tool", 7, WdConfig::default(), RAM_SIZE);
    let dev = Device::probe(rig.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool: DmaPool<Arc<GuestRam>> = LoopbackVmm::dma_pool(&rig.vmm).unwrap();
    let jobs: Vec<JobKind> = Format::ALL.into_iter().map(JobKind::Stream).collect();
    let ops = jobs.iter().fold(0, |m, j| m | j.ops_mask());
    let mut q = dev.queue(0, 8, ops, &pool).unwrap();
    let opts = RunOptions {
        jobs,
        size: 5 << 20,
        seed: 3,
        level: 12,
    };
    let report = wdvirt_guest::workload::run(&mut q, &opts);
    assert_eq!(report["ok"], true, "{report:#}");
    let data = wdvirt_guest::workload::gen_data(3, 5 << 20);
    let results = report["results"].as_array().unwrap();
    for (r, format) in results.iter().zip(Format::ALL) {
        common::assert_stream_job_matches_host(r, format, &data);
        assert_eq!(r["level"], 9, "level 12 asks for the most, 9");
        assert!(r["compressed"].as_u64().unwrap() < (5 << 20) / 2);
    }
    // Every piece was one compress job, and the decompressor took whole
    // MAX_XFER windows, plus the last few: the instance counted each.
    let reported = report["totals"]["device_jobs"].as_u64().unwrap();
    let counted = rig.instance.report().queues[0].jobs_ok;
    assert_eq!(counted, reported);
    let least: u64 = results
        .iter()
        .map(|r| r["pieces"].as_u64().unwrap() + r["compressed"].as_u64().unwrap() / (1 << 20))
        .sum();
    assert!(reported >= least, "{reported} jobs, at least {least}");
}

/// The tool's stream job at sizes the other tests do not reach: three times
/// the DMA memory a Linux guest has (4 hugepages), a stream shorter than a
/// header, and an empty one (one FINISH piece of nothing), each checked
/// against the host; the DMA buffers come back after each.
#[test]
fn the_guest_tools_stream_job_matches_the_host_at_sizes_far_apart() {
    use wdvirt_guest::workload::{JobKind, RunOptions};
    let accel: SharedAccelerator = SoftAccel::new(2);
    // 8 MiB of guest RAM, as the Linux guest's 4 hugepages: the stream is
    // three times that.
    let rig = common::start(&accel, "big", 8, WdConfig::default(), 8 << 20);
    let dev = Device::probe(rig.vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool: DmaPool<Arc<GuestRam>> = LoopbackVmm::dma_pool(&rig.vmm).unwrap();
    let ops = Opcode::StreamCompress.bit() | Opcode::StreamDecompress.bit();
    let mut q = dev.queue(0, 8, ops, &pool).unwrap();
    let free = pool.free_bytes();
    for size in [0usize, 333, (24 << 20) + 12345] {
        let opts = RunOptions {
            jobs: vec![JobKind::Stream(Format::Zlib)],
            size,
            seed: 4,
            level: 0,
        };
        let report = wdvirt_guest::workload::run(&mut q, &opts);
        assert_eq!(report["ok"], true, "{size}: {report:#}");
        let r = &report["results"][0];
        assert_eq!(r["level"], 0, "the device's default, 1");
        common::assert_stream_job_matches_host(
            r,
            Format::Zlib,
            &wdvirt_guest::workload::gen_data(4, size),
        );
    }
    assert_eq!(pool.free_bytes(), free, "the stream's buffers are returned");
}
