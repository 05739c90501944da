//! A live migration's cost, as the VMM sees it (`wdvirt::vmm::migrate`):
//! two instances of the same shape served in this process (each on its
//! own socket, the production path: a one-engine software accelerator
//! under the QoS scheduler), a guest (the real driver over the VMM's 16 MiB
//! memfd RAM) keeping every queue's ring (depth 64) full of 4 KiB copy and
//! CRC32C jobs, and the VM moved back and forth with work in flight.
//!
//! For 1, 4 and 16 queues it prints the downtime (STOP_COPY on the source
//! to RUNNING on the destination: median, 90th percentile, worst) beside
//! the issue's 5 ms target, its parts' medians (the source's stop and
//! save, the last pages' copy, the destination's restore and resume), the
//! dirty-page rounds run while the guest ran,
//! the device stream's size and the pages copied while stopped.
//!
//! ```text
//! cargo bench --bench migration              # 30 migrations per row
//! cargo bench --bench migration -- --quick   # 8 (or WDVIRT_BENCH_QUICK=1)
//! ```

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::soft::SoftAccel;
use wdvirt::daemon::instance::{Instance, InstanceSpec};
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::migrate::{self, Figures, MigrateOptions, Vm};
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_abi::Opcode;
use wdvirt_guest::{Device, JobSpec};

const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 16 << 20;
const DEPTH: u32 = 64;
const JOB: u64 = 4 << 10;
const TARGET: Duration = Duration::from_millis(5);

/// The guest: every queue kept full until `stop`; `done` counts completions.
fn guest(vm: Arc<Vm>, queues: u32, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let dev = Device::probe(vm.clone()).expect("probe");
    dev.enable().expect("enable");
    let pool = vm.dma_pool().expect("pool");
    let mut qs: Vec<_> = (0..queues)
        .map(|q| {
            let queue = dev
                .queue(q, DEPTH, dev.info().cap_ops, &pool)
                .expect("queue");
            let src = pool.alloc(JOB * u64::from(DEPTH), 64).expect("src");
            let dst = pool.alloc(JOB * u64::from(DEPTH), 64).expect("dst");
            src.write(
                0,
                &wdvirt_guest::workload::gen_data(u64::from(q), (JOB * u64::from(DEPTH)) as usize),
            )
            .expect("input");
            (queue, src, dst, DEPTH, 0u32)
        })
        .collect();
    let mut cqes = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let mut got = 0;
        for (queue, src, dst, free, next) in &mut qs {
            let sqes: Vec<_> = (0..*free)
                .map(|_| {
                    let slot = u64::from(*next % DEPTH);
                    *next = next.wrapping_add(1);
                    let s = src.addr() + slot * JOB;
                    let spec = if *next % 2 == 0 {
                        JobSpec::new(Opcode::Copy)
                            .src(s, JOB as u32)
                            .dst(dst.addr() + slot * JOB, JOB as u32)
                    } else {
                        JobSpec::new(Opcode::Crc32c).src(s, JOB as u32)
                    };
                    spec.to_sqe(*next)
                })
                .collect();
            if !sqes.is_empty() {
                *free -= queue.submit(&sqes).expect("submit") as u32;
            }
            cqes.clear();
            let n = queue.poll(&mut cqes).expect("poll");
            *free += n as u32;
            got += n;
        }
        done.fetch_add(got as u64, Ordering::Release);
        if got == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

fn median(d: impl Iterator<Item = Duration>) -> Duration {
    let mut v: Vec<Duration> = d.collect();
    v.sort();
    pct(&v, 50)
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn row(queues: u32, migrations: u32) -> Vec<Figures> {
    let accel: SharedAccelerator =
        wdvirt::qos::ScheduledAccel::new(SoftAccel::new(1), 1).expect("scheduler");
    let dir = tempfile::tempdir().expect("temp dir");
    let start = |name: &str, pasid: u32| {
        let spec = InstanceSpec {
            name: name.into(),
            socket: dir.path().join(format!("{name}.sock")),
            config: WdConfig {
                queues,
                ..WdConfig::default()
            },
            type_name: wdvirt::vdev::wd::DEFAULT_TYPE_NAME.into(),
        };
        Instance::start(spec, accel.clone(), pasid).expect("instance")
    };
    let (_a, _b) = (start("a", 1), start("b", 2));
    let sockets = [dir.path().join("a.sock"), dir.path().join("b.sock")];
    let ram = GuestRam::new(RAM_BASE, RAM_SIZE).expect("guest RAM");
    let vm = Vm::new(LoopbackVmm::connect_migratable(&sockets[0], ram).expect("connect"));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let g = {
        let (vm, stop, done) = (vm.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || guest(vm, queues, stop, done))
    };
    let mut out = Vec::new();
    for i in 0..migrations {
        // Work in flight: the guest has run a while since the last move.
        let want = done.load(Ordering::Acquire) + 50;
        let deadline = Instant::now() + Duration::from_secs(20);
        while done.load(Ordering::Acquire) < want {
            assert!(Instant::now() < deadline, "the guest made no progress");
            std::thread::sleep(Duration::from_millis(1));
        }
        let to = &sockets[(i as usize + 1) % 2];
        let f = migrate::migrate(&vm, to, &MigrateOptions::default(), &mut |_| {
            ControlFlow::Continue(())
        })
        .expect("migration");
        out.push(f);
    }
    stop.store(true, Ordering::Release);
    g.join().expect("the guest failed");
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("WDVIRT_BENCH_QUICK").is_some();
    let migrations = if quick { 8 } else { 30 };
    println!(
        "{migrations} migrations per row, 16 MiB guest RAM, depth {DEPTH}, rings kept full of 4 KiB copy/CRC32C jobs"
    );
    println!(
        "{:>6} | {:>10} {:>10} {:>10} | {:>9} | {:>9} {:>9} {:>9} | {:>6} | {:>8} | {:>10} | {:>9}",
        "queues",
        "downtime50",
        "p90",
        "worst",
        "p50/5ms",
        "src stop",
        "copy",
        "dst run",
        "rounds",
        "stream B",
        "stop pages",
        "RAM MiB"
    );
    for queues in [1, 4, 16] {
        let figs = row(queues, migrations);
        let mut d: Vec<Duration> = figs.iter().map(|f| f.downtime).collect();
        d.sort();
        let n = figs.len() as f64;
        let mean = |x: &dyn Fn(&Figures) -> f64| figs.iter().map(x).sum::<f64>() / n;
        println!(
            "{:>6} | {:>10.2?} {:>10.2?} {:>10.2?} | {:>9.2} | {:>9.2?} {:>9.2?} {:>9.2?} | {:>6.1} | {:>8.0} | {:>10.0} | {:>9.1}",
            queues,
            pct(&d, 50),
            pct(&d, 90),
            d[d.len() - 1],
            pct(&d, 50).as_secs_f64() / TARGET.as_secs_f64(),
            median(figs.iter().map(|f| f.source_stop)),
            median(figs.iter().map(|f| f.stop_copy)),
            median(figs.iter().map(|f| f.destination_resume)),
            mean(&|f| f64::from(f.pre_copy_rounds)),
            mean(&|f| f.stream_bytes as f64),
            mean(&|f| f.stop_pages as f64),
            mean(&|f| f.ram_bytes as f64) / f64::from(1 << 20),
        );
    }
}
