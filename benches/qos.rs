//! The QoS scheduler under contention, through the whole device path, with
//! wall-clock figures (the unit tests check the same properties exactly on
//! a simulated engine; this shows what the real engines give).
//!
//! One software engine shared by instances on real vfio-user sockets, each
//! with an in-process VMM and a guest driver keeping its queues full of
//! pre-staged jobs (submit into every free slot, poll). The share
//! instances of parts 1–4 have four queues of depth 4096 each, driven by
//! one guest thread, so that a guest thread or queue worker kept off a
//! core on a busy host does not leave its instance without work (with one
//! queue of 1024 it did, and the work-conserving scheduler rightly gave
//! its time away). Engine time per instance comes from the scheduler's own
//! accounting (`ScheduledAccel::snapshot`: what the engine measured per
//! job).
//!
//! ```text
//! cargo bench --bench qos                             # ~60 s
//! cargo bench --bench qos -- --quick                  # ~15 s (or WDVIRT_BENCH_QUICK=1)
//! cargo bench --bench qos -- --plots docs/qos         # also writes shares.svg, latency.svg
//! cargo bench --bench qos -- --queues 1 --depth 1024  # share instances' queues and depth
//! ```
//!
//! 1. **shares**: weights 1:2:4 on deflate-1 64 KiB, SHA-256 64 KiB and
//!    copy 64 KiB: engine-time shares against 1/7, 2/7, 4/7, overall and
//!    per 250 ms window (share over time); per instance its jobs/s, engine
//!    µs per job, and the time it had nothing waiting in the scheduler.
//! 2. **rate**: the SHA-256 instance limited to 64 MiB/s of source bytes
//!    while the others keep the engine busy: bytes per second achieved, as
//!    the guest counted them and as the engine ran them.
//! 3. **idle**: the deflate instance's guest stops: how long until the
//!    engine no longer runs its jobs, and the others' shares after.
//! 4. **policy change**: the SHA-256 instance's weight 2 → 12: its share
//!    in the 100 ms windows after the change.
//! 5. **long neighbour**: a victim running one deflate-1 of 16 KiB at a
//!    time beside a neighbour keeping its queue full of deflate-1 jobs of
//!    16 KiB (the victim's size), of 1 MiB (64 times it, the largest job),
//!    and of gzip level 12 of 1 MiB (the issue's hostile tenant, about
//!    0.25 s a job): the victim's latency p50/p99/max alone and beside
//!    each, and whom the scheduler's attribution names.
//! 6. **hostile tenant beside a busy one**: the issue's hostile tenant
//!    (four queues full of gzip level 12 of 1 MiB) and a well-behaved
//!    instance keeping its queues full of SHA-256 64 KiB, weights 1:1:
//!    each one's engine-time share against 1/2, overall and per 250 ms
//!    window, and whom the well-behaved one's attribution names.
//!
//! With `--plots DIR`: `DIR/shares.svg`, the engine-time share of each
//! share instance in 100 ms windows over parts 1–4 with its entitlement in
//! each part, and `DIR/latency.svg`, the victim's latency distribution in
//! each condition of part 5.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use wdvirt::accel::soft::SoftAccel;
use wdvirt::daemon::instance::{Instance, InstanceSpec};
use wdvirt::qos::{Policy, ScheduledAccel};
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_abi::{JobStatus, Opcode};
use wdvirt_guest::{Device, Format, JobSpec};

const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 64 << 20;
/// Queues per share tenant and their depth (`--queues`, `--depth`): enough
/// that a guest or queue worker kept off a core for a while (a busy 2-core
/// host) does not leave its instance without work for the engine.
const QUEUES: u32 = 4;
const DEPTH: u32 = 4096;

#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    op: Opcode,
    len: usize,
    dst_len: usize,
    param: u64,
}

const DEFLATE: Load = Load {
    name: "deflate-1 64 KiB",
    op: Opcode::DeflateCompress,
    len: 64 << 10,
    dst_len: (64 << 10) + 1024,
    param: 1,
};
const SHA: Load = Load {
    name: "sha256 64 KiB",
    op: Opcode::Sha256,
    len: 64 << 10,
    dst_len: 32,
    param: 0,
};
const COPY: Load = Load {
    name: "copy 64 KiB",
    op: Opcode::Copy,
    len: 64 << 10,
    dst_len: 64 << 10,
    param: 0,
};

/// An instance with a guest keeping its queue full of `load`.
struct Tenant {
    _instance: Instance,
    stop: Arc<AtomicBool>,
    jobs: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Tenant {
    /// An instance whose guest keeps `queues` queues of depth `depth` full.
    fn start(
        accel: &Arc<ScheduledAccel>,
        dir: &std::path::Path,
        pasid: u32,
        load: Load,
        queues: u32,
        depth: u32,
    ) -> Tenant {
        let socket = dir.join(format!("t{pasid}.sock"));
        let spec = InstanceSpec {
            name: format!("t{pasid}"),
            socket: socket.clone(),
            config: WdConfig {
                queues: queues.max(1),
                max_depth: depth,
                ..WdConfig::default()
            },
            type_name: wdvirt::vdev::wd::DEFAULT_TYPE_NAME.into(),
        };
        let instance = Instance::start(spec, accel.clone(), pasid).expect("instance");
        let stop = Arc::new(AtomicBool::new(false));
        let jobs = Arc::new(AtomicU64::new(0));
        let (s, j) = (stop.clone(), jobs.clone());
        let thread = std::thread::spawn(move || {
            let vmm = Arc::new(
                LoopbackVmm::connect(&socket, GuestRam::new(RAM_BASE, RAM_SIZE).unwrap())
                    .expect("connect"),
            );
            let dev = Device::probe(vmm.clone()).expect("probe");
            dev.enable().expect("enable");
            let pool = vmm.dma_pool().expect("pool");
            let mut qs: Vec<_> = (0..queues)
                .map(|i| dev.queue(i, depth, dev.info().cap_ops, &pool).unwrap())
                .collect();
            let src = pool.alloc(load.len as u64, 64).unwrap();
            src.write(0, &wdvirt_guest::workload::gen_data(pasid as u64, load.len))
                .unwrap();
            let dst = pool.alloc(load.dst_len as u64, 64).unwrap();
            let spec = JobSpec::new(load.op)
                .src(src.addr(), load.len as u32)
                .dst(dst.addr(), load.dst_len as u32)
                .param(load.param);
            // Keep every queue full: submit into every free slot, collect
            // what completed, nap briefly when nothing did.
            let (mut tag, mut out) = (0u32, Vec::new());
            let mut sqes = Vec::new();
            while !s.load(Ordering::Acquire) {
                let mut done = 0;
                for q in &mut qs {
                    let free = q.free_slots();
                    if free > 0 {
                        sqes.clear();
                        sqes.extend((0..free).map(|i| spec.to_sqe(tag.wrapping_add(i))));
                        tag = tag.wrapping_add(q.submit(&sqes).expect("submit") as u32);
                    }
                    out.clear();
                    let n = q.poll(&mut out).expect("poll");
                    assert!(out.iter().all(|c| c.status == JobStatus::Ok.code()));
                    done += n;
                }
                j.fetch_add(done as u64, Ordering::Relaxed);
                if done == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        Tenant {
            _instance: instance,
            stop,
            jobs,
            thread: Some(thread),
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        self.halt();
    }
}

fn engine_ns(accel: &ScheduledAccel, pasids: &[u32]) -> Vec<u64> {
    pasids
        .iter()
        .map(|&p| accel.snapshot(p).map_or(0, |s| s.engine_ns))
        .collect()
}

fn shares(before: &[u64], after: &[u64]) -> Vec<f64> {
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = d.iter().sum::<u64>().max(1);
    d.iter().map(|&x| x as f64 / total as f64).collect()
}

/// Engine time of `pasids` (from `start`) sampled every 250 ms for `span`:
/// the last sample, and the shares in each window.
fn share_windows(
    accel: &ScheduledAccel,
    pasids: &[u32],
    start: &[u64],
    span: Duration,
) -> (Vec<u64>, Vec<Vec<f64>>) {
    let (mut prev, mut windows) = (start.to_vec(), Vec::new());
    let t0 = Instant::now();
    while t0.elapsed() < span {
        std::thread::sleep(Duration::from_millis(250));
        let now = engine_ns(accel, pasids);
        windows.push(shares(&prev, &now));
        prev = now;
    }
    (prev, windows)
}

fn weight(accel: &ScheduledAccel, pasid: u32, w: u32) {
    accel.set_policy(
        pasid,
        Policy {
            weight: w,
            ..Policy::default()
        },
    );
}

/// Whom the scheduler's attribution names for `v`, most first.
fn interference(v: &wdvirt::qos::TenantSnapshot) -> String {
    v.interference
        .iter()
        .map(|i| {
            format!(
                "PASID {} {:.0} ms",
                i.neighbour_pasid,
                i.engine_ns as f64 / 1e6
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// A victim's latency for single deflate-1 jobs of 16 KiB over `for_`.
fn victim_latency(socket: &std::path::Path, for_: Duration) -> Vec<Duration> {
    let vmm =
        Arc::new(LoopbackVmm::connect(socket, GuestRam::new(RAM_BASE, 8 << 20).unwrap()).unwrap());
    let dev = Device::probe(vmm.clone()).unwrap();
    dev.enable().unwrap();
    let pool = vmm.dma_pool().unwrap();
    let mut q = dev.queue(0, 16, dev.info().cap_ops, &pool).unwrap();
    let data = wdvirt_guest::workload::gen_data(9, 16 << 10);
    let mut lat = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < for_ || lat.len() < 5 {
        let t = Instant::now();
        q.compress(Format::Deflate, 1, &data).unwrap();
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    lat
}

/// Options after `--`.
struct Args {
    quick: bool,
    /// Where to write the SVG plots, if anywhere.
    plots: Option<std::path::PathBuf>,
    /// Queues per instance in parts 1–4, and their depth.
    queues: u32,
    depth: u32,
}

fn args() -> Args {
    let mut a = Args {
        quick: std::env::var_os("WDVIRT_BENCH_QUICK").is_some_and(|v| v != "0" && !v.is_empty()),
        plots: None,
        queues: QUEUES,
        depth: DEPTH,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |what: &str| -> u32 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what} takes a number"))
        };
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--queues" => a.queues = num("--queues").clamp(1, 4),
            "--depth" => a.depth = num("--depth").next_power_of_two().clamp(2, 1 << 15),
            "--plots" => {
                let dir: std::path::PathBuf = it.next().expect("--plots takes a directory").into();
                std::fs::create_dir_all(&dir).expect("--plots: cannot create the directory");
                a.plots = Some(dir);
            }
            // `cargo bench` passes `--bench`; anything else is ignored too.
            _ => {}
        }
    }
    a
}

/// Seconds since the run began, and each share tenant's engine ns then.
type Samples = Vec<(f64, Vec<u64>)>;

/// Engine time of PASIDs 1–3 (the share tenants), every 100 ms, in a thread
/// of its own: the data of the share-over-time plot.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Samples>>,
}

impl Sampler {
    fn start(accel: &Arc<ScheduledAccel>, t0: Instant) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, accel) = (stop.clone(), accel.clone());
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut next = t0;
            while !s.load(Ordering::Acquire) {
                out.push((t0.elapsed().as_secs_f64(), engine_ns(&accel, &[1, 2, 3])));
                next += Duration::from_millis(100);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            out
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// A part of the run, for the share plot: when it began and what each of
/// deflate/SHA-256/copy is entitled to in it (`None`: no plain entitlement).
struct Phase {
    at: f64,
    label: &'static str,
    entitled: [Option<f64>; 3],
}

fn main() {
    let args = args();
    let scale = if args.quick { 0.3 } else { 1.0 };
    let secs = |s: f64| Duration::from_secs_f64(s * scale);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "share tenants: {} queue(s) of depth {} each",
        args.queues, args.depth
    );
    let dir = tempfile::tempdir().unwrap();
    let soft = SoftAccel::new(1);
    let accel = ScheduledAccel::new(soft.clone(), 1).unwrap();
    // Jobs the engine ran for a PASID (its queue pairs' counters).
    let engine_jobs = |pasid: u32| -> u64 {
        soft.stats()
            .queue_pairs
            .iter()
            .filter(|q| q.pasid == pasid)
            .map(|q| q.counters.jobs)
            .sum()
    };
    let pasids = [1, 2, 3];
    let want = [1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0];
    for (p, w) in pasids.iter().zip([1, 2, 4]) {
        weight(&accel, *p, w);
    }
    let run0 = Instant::now();
    let sampler = Sampler::start(&accel, run0);
    let mut phases = vec![Phase {
        at: 0.0,
        label: "weights 1:2:4",
        entitled: want.map(Some),
    }];
    let mut tenants: Vec<Tenant> = pasids
        .iter()
        .zip([DEFLATE, SHA, COPY])
        .map(|(&p, l)| Tenant::start(&accel, dir.path(), p, l, args.queues, args.depth))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // 1. Shares.
    println!(
        "\n1. weights 1:2:4, one engine, {} s",
        secs(10.0).as_secs_f64()
    );
    let start = engine_ns(&accel, &pasids);
    let snaps0: Vec<_> = pasids.iter().map(|&p| accel.snapshot(p).unwrap()).collect();
    let jobs0: Vec<u64> = tenants
        .iter()
        .map(|t| t.jobs.load(Ordering::Relaxed))
        .collect();
    let t0 = Instant::now();
    let (prev, windows) = share_windows(&accel, &pasids, &start, secs(10.0));
    let span1 = t0.elapsed();
    let total = shares(&start, &prev);
    println!(
        "instance                 weight  entitled  engine share  error     jobs/s  engine µs/job  nothing waiting"
    );
    for (i, l) in [DEFLATE, SHA, COPY].iter().enumerate() {
        let jobs = tenants[i].jobs.load(Ordering::Relaxed) - jobs0[i];
        let s = accel.snapshot(pasids[i]).unwrap();
        // Time it had no job waiting in the scheduler: its guest and queue
        // workers had not kept up (or all it had was at the engine).
        let waited = (s.throttled_ns.rate + s.throttled_ns.cap + s.throttled_ns.share)
            - (snaps0[i].throttled_ns.rate
                + snaps0[i].throttled_ns.cap
                + snaps0[i].throttled_ns.share);
        let dry = span1.as_nanos() as f64 - waited as f64;
        println!(
            "{:<24} {:>6}  {:>8.4}  {:>12.4}  {:>+5.1} %  {:>9.0}  {:>13.1}  {:>10.1} ms",
            l.name,
            [1, 2, 4][i],
            want[i],
            total[i],
            (total[i] / want[i] - 1.0) * 100.0,
            jobs as f64 / span1.as_secs_f64(),
            (prev[i] - start[i]) as f64 / 1e3 / jobs.max(1) as f64,
            dry.max(0.0) / 1e6,
        );
    }
    let worst = windows
        .iter()
        .flat_map(|w| w.iter().zip(&want).map(|(g, e)| (g / e - 1.0).abs()))
        .fold(0f64, f64::max);
    println!(
        "share over time (250 ms windows, deflate/sha/copy): {}",
        windows
            .iter()
            .take(12)
            .map(|w| format!("{:.2}/{:.2}/{:.2}", w[0], w[1], w[2]))
            .collect::<Vec<_>>()
            .join("  ")
    );
    println!("largest error in any 250 ms window: {:.1} %", worst * 100.0);

    // 2. Rate limit on the SHA-256 instance.
    let rate: u64 = 64 << 20;
    phases.push(Phase {
        at: run0.elapsed().as_secs_f64(),
        label: "SHA-256 at 64 MiB/s",
        entitled: [None; 3],
    });
    accel.set_policy(
        2,
        Policy {
            weight: 2,
            bytes_per_sec: Some(rate),
            burst_bytes: Some(1 << 20),
            ..Policy::default()
        },
    );
    std::thread::sleep(Duration::from_millis(200));
    let span = secs(10.0);
    // Jobs the guest saw complete (the scheduler counts none of its own).
    let (d0, e0) = (tenants[1].jobs.load(Ordering::Relaxed), engine_jobs(2));
    let t = Instant::now();
    std::thread::sleep(span);
    let (d1, e1) = (tenants[1].jobs.load(Ordering::Relaxed), engine_jobs(2));
    let elapsed = t.elapsed().as_secs_f64();
    let got = (d1 - d0) as f64 * (64 << 10) as f64 / elapsed;
    // The same from the engine's side (jobs it ran), to tell a guest that
    // collected late from a limit that held too tight.
    let ran = (e1 - e0) as f64 * (64 << 10) as f64 / elapsed;
    let s = accel.snapshot(2).unwrap();
    println!(
        "\n2. SHA-256 instance at {} MiB/s for {:.1} s: {:.2} MiB/s ({:+.2} %; engine side {:+.2} %), throttled by rate {:.1} s, by share {:.1} s",
        rate >> 20,
        span.as_secs_f64(),
        got / (1 << 20) as f64,
        (got / rate as f64 - 1.0) * 100.0,
        (ran / rate as f64 - 1.0) * 100.0,
        s.throttled_ns.rate as f64 / 1e9,
        s.throttled_ns.share as f64 / 1e9,
    );
    weight(&accel, 2, 2);
    phases.push(Phase {
        at: run0.elapsed().as_secs_f64(),
        label: "1:2:4 again",
        entitled: want.map(Some),
    });

    // 3. Idle: the deflate instance's guest stops.
    std::thread::sleep(Duration::from_millis(300));
    let stopped = Instant::now();
    phases.push(Phase {
        at: run0.elapsed().as_secs_f64(),
        label: "deflate idle",
        entitled: [Some(0.0), Some(1.0 / 3.0), Some(2.0 / 3.0)],
    });
    tenants[0].stop.store(true, Ordering::Release);
    let mut last = engine_ns(&accel, &pasids)[0];
    let mut quiet_at = None;
    while stopped.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(2));
        let e = engine_ns(&accel, &pasids)[0];
        if e != last {
            (last, quiet_at) = (e, None);
        } else if quiet_at.is_none() {
            quiet_at = Some(stopped.elapsed());
        }
    }
    tenants[0].halt();
    let b = engine_ns(&accel, &pasids);
    std::thread::sleep(secs(2.0));
    let after = shares(&b, &engine_ns(&accel, &pasids));
    println!(
        "\n3. deflate guest stopped: its last job ended {:.1} ms later (what it had queued); then sha/copy shares {:.3}/{:.3} (entitled 0.333/0.667)",
        quiet_at.unwrap_or_default().as_secs_f64() * 1e3,
        after[1],
        after[2]
    );

    // 4. Policy change: SHA-256 weight 2 -> 12 (entitled 12/16).
    let b = engine_ns(&accel, &pasids);
    std::thread::sleep(Duration::from_millis(300));
    let before = shares(&b, &engine_ns(&accel, &pasids));
    weight(&accel, 2, 12);
    phases.push(Phase {
        at: run0.elapsed().as_secs_f64(),
        label: "SHA-256 weight 12",
        entitled: [Some(0.0), Some(0.75), Some(0.25)],
    });
    let mut after = Vec::new();
    let mut prev = engine_ns(&accel, &pasids);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        let now = engine_ns(&accel, &pasids);
        after.push(shares(&prev, &now)[1]);
        prev = now;
    }
    println!(
        "\n4. SHA-256 weight 2 -> 12: share {:.3} before, then per 100 ms: {} (entitled 0.750)",
        before[1],
        after
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // A little more of the new weight, for the plot.
    std::thread::sleep(Duration::from_millis(500));
    let end = run0.elapsed().as_secs_f64();
    let samples = sampler.finish();
    drop(tenants);
    if let Some(dir) = &args.plots {
        let path = dir.join("shares.svg");
        match plot_shares(&path, &samples, &phases, end) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => println!("could not write {}: {e}", path.display()),
        }
    }

    // 5. A long-job neighbour.
    println!("\n5. victim: one deflate-1 of 16 KiB at a time; neighbour: queue full of");
    let victim_inst = Instance::start(
        InstanceSpec {
            name: "victim".into(),
            socket: dir.path().join("victim.sock"),
            config: WdConfig::default(),
            type_name: wdvirt::vdev::wd::DEFAULT_TYPE_NAME.into(),
        },
        accel.clone(),
        10,
    )
    .unwrap();
    let span = secs(4.0);
    let alone = victim_latency(victim_inst.socket(), span);
    let mut curves = vec![("alone".to_string(), alone.clone())];
    println!(
        "{:<30} p50 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms  ({} jobs)",
        "alone",
        percentile(&alone, 0.5).as_secs_f64() * 1e3,
        percentile(&alone, 0.99).as_secs_f64() * 1e3,
        alone.last().unwrap().as_secs_f64() * 1e3,
        alone.len()
    );
    for (i, (name, len, level)) in [
        ("deflate-1 16 KiB", 16usize << 10, 1u64),
        ("deflate-1 1 MiB", 1 << 20, 1),
        ("gzip-12 1 MiB", 1 << 20, 12),
    ]
    .into_iter()
    .enumerate()
    {
        let noisy = Load {
            name,
            op: if level == 1 {
                Opcode::DeflateCompress
            } else {
                Opcode::GzipCompress
            },
            len,
            dst_len: Format::Gzip.compress_bound(len).min(1 << 20),
            param: level,
        };
        let mut n = Tenant::start(&accel, dir.path(), 20 + i as u32, noisy, 1, 1024);
        std::thread::sleep(Duration::from_millis(300));
        let lat = victim_latency(victim_inst.socket(), span);
        let v = accel.snapshot(10).unwrap();
        println!(
            "{:<30} p50 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms  ({} jobs; p99/alone {:.1}; interference: {})",
            format!("beside {name}"),
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().unwrap().as_secs_f64() * 1e3,
            lat.len(),
            percentile(&lat, 0.99).as_secs_f64() / percentile(&alone, 0.99).as_secs_f64(),
            interference(&v)
        );
        curves.push((format!("beside {name}"), lat));
        n.halt();
    }
    // 6. The issue's hostile tenant beside a busy, well-behaved one.
    let hostile = Load {
        name: "gzip-12 1 MiB",
        op: Opcode::GzipCompress,
        len: 1 << 20,
        dst_len: Format::Gzip.compress_bound(1 << 20).min(1 << 20),
        param: 12,
    };
    let pair = [30, 31];
    println!(
        "\n6. hostile tenant ({} queues full of {}) beside a well-behaved one ({} queues full of {}), weights 1:1, {} s",
        QUEUES,
        hostile.name,
        args.queues,
        SHA.name,
        secs(10.0).as_secs_f64()
    );
    let both = [
        Tenant::start(&accel, dir.path(), pair[0], hostile, QUEUES, 1024),
        Tenant::start(&accel, dir.path(), pair[1], SHA, args.queues, args.depth),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let start = engine_ns(&accel, &pair);
    let jobs0: Vec<u64> = both
        .iter()
        .map(|t| t.jobs.load(Ordering::Relaxed))
        .collect();
    let t0 = Instant::now();
    let (prev, windows) = share_windows(&accel, &pair, &start, secs(10.0));
    let span6 = t0.elapsed().as_secs_f64();
    let worst = windows
        .iter()
        .flatten()
        .map(|s| (s / 0.5 - 1.0).abs())
        .fold(0f64, f64::max);
    let total = shares(&start, &prev);
    for (i, name) in ["hostile", "well-behaved"].iter().enumerate() {
        let jobs = both[i].jobs.load(Ordering::Relaxed) - jobs0[i];
        println!(
            "{name:<13} engine share {:.4} (entitled 0.5000, error {:+.1} %), {:.0} jobs/s, engine {:.1} µs/job",
            total[i],
            (total[i] / 0.5 - 1.0) * 100.0,
            jobs as f64 / span6,
            (prev[i] - start[i]) as f64 / 1e3 / jobs.max(1) as f64,
        );
    }
    let v = accel.snapshot(pair[1]).unwrap();
    println!(
        "largest error in any 250 ms window: {:.1} %; the well-behaved one's interference: {}",
        worst * 100.0,
        interference(&v)
    );
    drop(both);

    if let Some(dir) = &args.plots {
        let path = dir.join("latency.svg");
        match plot_latency(&path, &curves) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => println!("could not write {}: {e}", path.display()),
        }
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

const COLOURS: [RGBColor; 5] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Engine-time share per instance in each 100 ms window, with each part's
/// entitlement dashed in the instance's colour.
fn plot_shares(
    path: &std::path::Path,
    samples: &[(f64, Vec<u64>)],
    phases: &[Phase],
    end: f64,
) -> PlotResult {
    let root = SVGBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Engine-time share per instance, 100 ms windows (dashed: entitlement)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        // Room above 1.0 for the parts' names and the legend.
        .build_cartesian_2d(0f64..end, 0f64..1.4f64)?;
    chart
        .configure_mesh()
        .x_desc("time since the instances started (s)")
        .y_desc("share of engine time")
        .y_label_formatter(&|v| {
            if *v <= 1.0 {
                format!("{v:.1}")
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let names = [
        "deflate-1 64 KiB (w 1)",
        "SHA-256 64 KiB (w 2)",
        "copy 64 KiB (w 4)",
    ];
    for (i, name) in names.iter().enumerate() {
        let c = COLOURS[i];
        let pts: Vec<(f64, f64)> = samples
            .windows(2)
            .filter_map(|w| {
                let d: Vec<u64> = w[1].1.iter().zip(&w[0].1).map(|(a, b)| a - b).collect();
                let total: u64 = d.iter().sum();
                (total > 0).then(|| ((w[0].0 + w[1].0) / 2.0, d[i] as f64 / total as f64))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        for (k, p) in phases.iter().enumerate() {
            let Some(e) = p.entitled[i] else { continue };
            let until = phases.get(k + 1).map_or(end, |n| n.at);
            chart.draw_series(DashedLineSeries::new(
                [(p.at, e), (until, e)],
                6,
                4,
                c.mix(0.8).stroke_width(1),
            ))?;
        }
    }
    for (k, p) in phases.iter().enumerate() {
        // Names of short parts would overlap: every other one higher.
        let y = if k % 2 == 0 { 1.04 } else { 1.10 };
        chart.draw_series(LineSeries::new([(p.at, 0.0), (p.at, y)], BLACK.mix(0.25)))?;
        // Names near the right edge end at their line rather than start.
        let (x, h) = if p.at > end * 0.85 {
            (p.at - end * 0.004, HPos::Right)
        } else {
            (p.at + end * 0.004, HPos::Left)
        };
        let style = TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(h, VPos::Top));
        chart.draw_series(std::iter::once(Text::new(p.label, (x, y + 0.045), style)))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The victim's latency distribution (fraction of jobs done within x) in
/// each condition, on a log time axis.
fn plot_latency(path: &std::path::Path, curves: &[(String, Vec<Duration>)]) -> PlotResult {
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let lo = curves
        .iter()
        .filter_map(|(_, l)| l.first().map(ms))
        .fold(f64::MAX, f64::min)
        .max(1e-3);
    let hi = curves
        .iter()
        .filter_map(|(_, l)| l.last().map(ms))
        .fold(lo * 10.0, f64::max);
    let root = SVGBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Victim: one deflate-1 of 16 KiB at a time — fraction of jobs done within a latency",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..1.0f64)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of jobs")
        .x_label_formatter(&|v| format!("{v:.3}"))
        .draw()?;
    for (i, (name, lat)) in curves.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        // At most ~1000 points a curve: every k-th job, and the last.
        let k = (lat.len() / 1000).max(1);
        let n = lat.len() as f64;
        let pts: Vec<(f64, f64)> = lat
            .iter()
            .enumerate()
            .filter(|(j, _)| j % k == 0 || *j + 1 == lat.len())
            .map(|(j, d)| (ms(d), (j + 1) as f64 / n))
            .collect();
        let p99 = percentile(lat, 0.99).as_secs_f64() * 1e3;
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(format!("{name} (p99 {p99:.2} ms)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}
