//! The data path, whole and bare, side by side in one run.
//!
//! For each case (deflate level 1 of 4 KiB and of 64 KiB, SHA-256 of 64 KiB,
//! copy of 64 B) it measures:
//!
//! * **direct**: one thread calling [`wdvirt::accel::ops::run`] on the same
//!   bytes in a loop — one engine's worth of compute, nothing else;
//! * **device**: the whole path — guest driver → vfio-user socket → device
//!   model → queue worker → software engine → CQE in guest memory — with a
//!   [`SoftAccel`] of **one** engine (the same compute), one instance, the
//!   in-process [`LoopbackVmm`], one queue of depth 256, jobs in batches
//!   through [`Queue::run_batch`], every input and output pre-staged in DMA
//!   buffers so the driver copies nothing in the timed loop.
//!
//! It prints jobs/s, GB/s (of input), the ratio device/direct, doorbells and
//! interrupts per job (from `Instance::report`), and host CPU per job in each
//! mode; then an idle check: one second with the queue enabled and nothing
//! submitted, reporting the CPU the process used and the wake-ups.
//!
//! ```text
//! cargo bench --bench datapath              # ~30 s
//! cargo bench --bench datapath -- --quick   # a few seconds (or WDVIRT_BENCH_QUICK=1)
//! cargo bench --bench datapath -- --slicing # long compress jobs: slices against one shot
//! ```
//!
//! CPU time comes from `/proc/self/task/*/schedstat` (nanoseconds, per
//! thread, so the device column can be split by thread) and, as a cross-check
//! at tick resolution, `/proc/self/stat` utime+stime.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::ops::{self, Scratch};
use wdvirt::accel::soft::SoftAccel;
use wdvirt::daemon::instance::{Instance, InstanceSpec};
use wdvirt::stats::QueueSnapshot;
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_abi::{JobStatus, Opcode};
use wdvirt_guest::{Device, DmaPool, Format, JobSpec, PoolBuffer, Queue};

const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 64 << 20;
const DEPTH: u32 = 256;
/// Distinct source/destination buffer pairs the jobs cycle through (in both
/// modes), so consecutive jobs do not hit one buffer.
const SLOTS: usize = 8;

type GQueue = Queue<Arc<LoopbackVmm>, Arc<GuestRam>>;
type Buf = PoolBuffer<Arc<GuestRam>>;

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    op: Opcode,
    len: usize,
    dst_len: usize,
    param: u64,
    /// Jobs per `run_batch` call.
    batch: usize,
}

fn cases() -> Vec<Case> {
    // Batches of at most ~50 ms, so that rounds end close to their budget.
    let deflate = |name, len, batch| Case {
        name,
        op: Opcode::DeflateCompress,
        len,
        dst_len: Format::Deflate.compress_bound(len),
        param: 1,
        batch,
    };
    vec![
        deflate("deflate-1 4 KiB", 4 << 10, 1024),
        deflate("deflate-1 64 KiB", 64 << 10, 256),
        // Over accel::soft::SLICE: the engine compresses it in slices with
        // zlib (other instances' jobs may run between them), where the
        // direct call is libdeflate's one shot; the ratio is what slicing costs.
        deflate("deflate-1 896 KiB", 896 << 10, 8),
        Case {
            name: "sha256 64 KiB",
            op: Opcode::Sha256,
            len: 64 << 10,
            dst_len: 32,
            param: 0,
            batch: 1024,
        },
        Case {
            name: "copy 64 B",
            op: Opcode::Copy,
            len: 64,
            dst_len: 64,
            param: 0,
            batch: 4096,
        },
    ]
}

/// Text-like data that compresses about 3:1 (the guest tool's generator).
fn corpus(len: usize, seed: u64) -> Vec<u8> {
    wdvirt_guest::workload::gen_data(seed, len)
}

// ---- CPU accounting --------------------------------------------------------

/// Nanoseconds of CPU per thread class, summed over the process's threads.
#[derive(Clone, Debug, Default)]
struct Cpu {
    by_class: BTreeMap<&'static str, u64>,
    /// utime + stime of the whole process, in clock ticks.
    ticks: u64,
    /// Voluntary + involuntary context switches over all threads.
    switches: u64,
}

impl Cpu {
    fn total_ns(&self) -> u64 {
        self.by_class.values().sum()
    }
    fn since(&self, before: &Cpu) -> Cpu {
        let mut by_class = self.by_class.clone();
        for (k, v) in by_class.iter_mut() {
            *v = v.saturating_sub(before.by_class.get(k).copied().unwrap_or(0));
        }
        Cpu {
            by_class,
            ticks: self.ticks.saturating_sub(before.ticks),
            switches: self.switches.saturating_sub(before.switches),
        }
    }
}

fn class_of(tid: &str, comm: &str) -> &'static str {
    if tid == std::process::id().to_string() {
        // The main thread: the guest driver in device mode, the engine
        // call in direct mode.
        "main"
    } else if comm.starts_with("wd-engine") {
        "engine"
    } else if comm.starts_with("wd-queue") {
        "queue"
    } else if comm.starts_with("wd-inst") || comm.starts_with("wd-vmm") {
        "server"
    } else {
        "other"
    }
}

fn sample_cpu() -> Cpu {
    let mut cpu = Cpu::default();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for task in dir.flatten() {
            let p = task.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            let ns = std::fs::read_to_string(p.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            let tid = task.file_name();
            let class = class_of(&tid.to_string_lossy(), comm.trim());
            *cpu.by_class.entry(class).or_default() += ns;
            let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
            for line in status.lines() {
                if let Some(v) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    cpu.switches += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    // Fields 14 and 15 of /proc/self/stat, counted after the ")" that ends
    // the command name (which may contain spaces).
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state).
        let tick = |i: usize| {
            f.get(i - 3)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        };
        cpu.ticks = tick(14) + tick(15);
    }
    cpu
}

// ---- measurements ----------------------------------------------------------

#[derive(Default)]
struct Measure {
    jobs: u64,
    secs: f64,
    cpu: Cpu,
}

impl Measure {
    fn jobs_per_s(&self) -> f64 {
        self.jobs as f64 / self.secs
    }
    fn gb_per_s(&self, len: usize) -> f64 {
        self.jobs_per_s() * len as f64 / 1e9
    }
    fn cpu_us_per_job(&self) -> f64 {
        self.cpu.total_ns() as f64 / 1e3 / self.jobs as f64
    }
    fn add(&mut self, other: Measure) {
        self.jobs += other.jobs;
        self.secs += other.secs;
        for (k, v) in other.cpu.by_class {
            *self.cpu.by_class.entry(k).or_default() += v;
        }
        self.cpu.ticks += other.cpu.ticks;
        self.cpu.switches += other.cpu.switches;
    }
}

/// The engine datapath called directly, as an engine thread runs it after
/// its bounce-buffer copy (which is not done here).
struct Direct<'a> {
    case: &'a Case,
    inputs: &'a [Vec<u8>],
    dsts: Vec<Vec<u8>>,
    scratch: Scratch,
    next: usize,
}

impl<'a> Direct<'a> {
    /// Warm up (tables allocated, caches filled); returns the outputs, the
    /// reference the device's must equal.
    fn new(case: &'a Case, inputs: &'a [Vec<u8>]) -> (Self, Vec<(Vec<u8>, u32)>) {
        let mut d = Direct {
            case,
            inputs,
            dsts: (0..SLOTS).map(|_| vec![0u8; case.dst_len]).collect(),
            scratch: Scratch::new(),
            next: 0,
        };
        let mut reference = Vec::new();
        for (i, dst) in d.dsts.iter_mut().enumerate() {
            let out = ops::run(case.op, &inputs[i], dst, case.param, &mut d.scratch)
                .unwrap_or_else(|s| panic!("{}: direct call failed: {s:?}", case.name));
            reference.push((dst[..out.bytes as usize].to_vec(), out.result));
        }
        (d, reference)
    }

    fn round(&mut self, budget: Duration) -> Measure {
        let before = sample_cpu();
        let start = Instant::now();
        let mut jobs = 0u64;
        while start.elapsed() < budget {
            // Read the clock every few jobs only.
            for _ in 0..16 {
                let i = self.next % SLOTS;
                self.next += 1;
                let r = ops::run(
                    self.case.op,
                    &self.inputs[i],
                    &mut self.dsts[i],
                    self.case.param,
                    &mut self.scratch,
                );
                std::hint::black_box(&r);
                jobs += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = sample_cpu().since(&before);
        Measure { jobs, secs, cpu }
    }
}

fn queue_stats(instance: &Instance) -> QueueSnapshot {
    instance.report().queues[0]
}

/// The whole path: buffers staged in guest RAM once, then `case.batch` jobs
/// per `run_batch`.
struct DevicePath<'a> {
    case: &'a Case,
    q: &'a mut GQueue,
    instance: &'a Instance,
    /// Keeps the staged buffers allocated.
    _bufs: Vec<(Buf, Buf)>,
    jobs: Vec<JobSpec>,
}

impl<'a> DevicePath<'a> {
    fn new(
        case: &'a Case,
        inputs: &[Vec<u8>],
        reference: &[(Vec<u8>, u32)],
        instance: &'a Instance,
        q: &'a mut GQueue,
        pool: &DmaPool<Arc<GuestRam>>,
    ) -> Self {
        let mut bufs = Vec::new();
        for input in inputs.iter().take(SLOTS) {
            let src = pool.alloc(case.len as u64, 64).expect("DMA pool: source");
            let dst = pool
                .alloc(case.dst_len as u64, 64)
                .expect("DMA pool: destination");
            src.write(0, input).expect("stage input");
            bufs.push((src, dst));
        }
        let jobs: Vec<JobSpec> = (0..case.batch)
            .map(|i| {
                let (src, dst) = &bufs[i % SLOTS];
                JobSpec::new(case.op)
                    .src(src.addr(), case.len as u32)
                    .dst(dst.addr(), case.dst_len as u32)
                    .param(case.param)
            })
            .collect();
        // Warm-up, and a check that the path computes what the engine does.
        let done = q.run_batch(&jobs[..SLOTS]).expect("warm-up batch");
        for (((c, (_, dst)), (want, result)), input) in
            done.iter().zip(&bufs).zip(reference).zip(inputs)
        {
            assert_eq!(
                c.status,
                JobStatus::Ok.code(),
                "{} of {} B: job failed",
                case.name,
                case.len
            );
            if case.op == Opcode::DeflateCompress && case.len > wdvirt::accel::soft::SLICE {
                // Compressed in slices, not libdeflate's one shot: the
                // engine's rule for a long job says which bytes.
                let mut engine = vec![0u8; case.dst_len];
                let n = wdvirt::accel::soft::compress_as_engine(
                    Format::Deflate,
                    case.param,
                    input,
                    &mut engine,
                    &mut ops::Scratch::new(),
                )
                .expect("compress as the engine does");
                let out = dst.to_vec(c.bytes as usize).expect("read output");
                assert!(
                    out == engine[..n as usize],
                    "{}: device output differs from the engine's",
                    case.name
                );
                continue;
            }
            assert_eq!(c.bytes as usize, want.len(), "{}: output length", case.name);
            assert_eq!(c.result, *result, "{}: result word", case.name);
            let out = dst.to_vec(want.len()).expect("read output");
            assert!(
                &out == want,
                "{}: device output differs from direct",
                case.name
            );
        }
        DevicePath {
            case,
            q,
            instance,
            _bufs: bufs,
            jobs,
        }
    }

    fn round(&mut self, budget: Duration) -> Measure {
        let before = sample_cpu();
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget {
            let done = self.q.run_batch(&self.jobs).expect("run_batch");
            // A cheap check that stays in the loop: every job succeeded.
            assert!(
                done.iter().all(|c| c.status == JobStatus::Ok.code()),
                "{}: a job failed",
                self.case.name
            );
            n += done.len() as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = sample_cpu().since(&before);
        Measure { jobs: n, secs, cpu }
    }
}

/// One instance on its own scheduled software accelerator, connected
/// through the loopback VMM, with queue 0 enabled. Fields drop in order:
/// the queue before the instance.
struct Rig {
    q: GQueue,
    pool: DmaPool<Arc<GuestRam>>,
    instance: Instance,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// The production path: `engines` engines under the QoS scheduler (as
    /// the daemon, `serve` and `demo` run them).
    fn start(engines: usize) -> Rig {
        let accel: SharedAccelerator =
            wdvirt::qos::ScheduledAccel::new(SoftAccel::new(engines), engines).expect("scheduler");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("bench.sock");
        let spec = InstanceSpec {
            name: format!("bench-{engines}"),
            socket: socket.clone(),
            config: WdConfig::default(),
            type_name: wdvirt::vdev::wd::DEFAULT_TYPE_NAME.into(),
        };
        let instance = Instance::start(spec, accel, 1).expect("start instance");
        let vmm = Arc::new(
            LoopbackVmm::connect(
                &socket,
                GuestRam::new(RAM_BASE, RAM_SIZE).expect("guest RAM"),
            )
            .expect("connect"),
        );
        let dev = Device::probe(vmm.clone()).expect("probe");
        dev.enable().expect("enable");
        let pool = vmm.dma_pool().expect("allocator");
        let q = dev
            .queue(0, DEPTH, dev.info().cap_ops, &pool)
            .expect("queue 0");
        Rig {
            q,
            pool,
            instance,
            _dir: dir,
        }
    }
}

/// Sizes of the sweep, 64 B to 1 MiB.
const SWEEP_SIZES: [usize; 6] = [64, 512, 4 << 10, 64 << 10, 256 << 10, 1 << 20];

/// One case of the sweep: `op` on `len` bytes.
fn sweep_case(op: Opcode, len: usize) -> Case {
    let (name, dst_len, param) = match op {
        // Within the device's MAX_XFER (1 MiB): the text compresses 3:1.
        Opcode::DeflateCompress => (
            "deflate-1",
            Format::Deflate.compress_bound(len).min(1 << 20),
            1,
        ),
        Opcode::Crc32c => ("crc32c", 64, 0),
        Opcode::Fill => ("fill", len, 0xa5),
        _ => ("copy", len, 0),
    };
    Case {
        name,
        op,
        len,
        dst_len,
        param,
        // About 8 MiB of input per batch, within 8..=4096 jobs.
        batch: ((8 << 20) / len).clamp(8, 4096),
    }
}

fn size_name(len: usize) -> String {
    match len {
        l if l >= 1 << 20 => format!("{} MiB", l >> 20),
        l if l >= 1 << 10 => format!("{} KiB", l >> 10),
        l => format!("{l} B"),
    }
}

/// One row of the sweep: jobs/s direct and through the device with one
/// and with two engines, and the device side's CPU per job.
struct SweepRow {
    op: &'static str,
    len: usize,
    direct: f64,
    device: [f64; 2],
    device_cpu_us: [f64; 2],
}

/// `--sweep`: copy, fill, CRC32C and deflate-1 from 64 B to 1 MiB, each
/// through the device with one engine and with two (two instances, each
/// on its own scheduled accelerator) and called directly, in alternating
/// rounds. Prints the table and, with `--plot FILE`, draws it. Other
/// arguments select operations by name (`copy`, `fill`, `crc32c`,
/// `deflate-1`).
fn size_sweep(quick: bool, plot: Option<&std::path::Path>, filters: &[String]) {
    let (rounds, round) = if quick {
        (2, Duration::from_millis(100))
    } else {
        (3, Duration::from_millis(300))
    };
    let mut rigs = [Rig::start(1), Rig::start(2)];
    println!(
        "size sweep: device with 1 and 2 software engines against the direct call on one thread, {rounds} alternating rounds of {} ms each",
        round.as_millis()
    );
    println!(
        "{:<10} {:>7} {:>11} {:>11} {:>6} {:>9} {:>11} {:>6} {:>9} {:>6}",
        "op",
        "size",
        "direct/s",
        "1 eng/s",
        "ratio",
        "dev µs/j",
        "2 eng/s",
        "ratio",
        "dev µs/j",
        "2/1"
    );
    let mut rows = Vec::new();
    for op in [
        Opcode::Copy,
        Opcode::Fill,
        Opcode::Crc32c,
        Opcode::DeflateCompress,
    ] {
        for len in SWEEP_SIZES {
            let case = sweep_case(op, len);
            if !filters.is_empty() && !filters.iter().any(|f| case.name.contains(f.as_str())) {
                continue;
            }
            let inputs: Vec<Vec<u8>> = (0..SLOTS).map(|i| corpus(len, 17 + i as u64)).collect();
            let (mut direct, reference) = Direct::new(&case, &inputs);
            let mut paths: Vec<DevicePath> = rigs
                .iter_mut()
                .map(|r| {
                    DevicePath::new(&case, &inputs, &reference, &r.instance, &mut r.q, &r.pool)
                })
                .collect();
            let mut d = Measure::default();
            let mut v = [Measure::default(), Measure::default()];
            for _ in 0..rounds {
                d.add(direct.round(round));
                for (m, p) in v.iter_mut().zip(&mut paths) {
                    m.add(p.round(round));
                }
            }
            // The device side: every thread but the guest driver's.
            let dev_cpu = |m: &Measure| {
                let driver = m.cpu.by_class.get("main").copied().unwrap_or(0);
                (m.cpu.total_ns() - driver) as f64 / 1e3 / m.jobs as f64
            };
            let row = SweepRow {
                op: case.name,
                len,
                direct: d.jobs_per_s(),
                device: [v[0].jobs_per_s(), v[1].jobs_per_s()],
                device_cpu_us: [dev_cpu(&v[0]), dev_cpu(&v[1])],
            };
            println!(
                "{:<10} {:>7} {:>11.0} {:>11.0} {:>6.3} {:>9.2} {:>11.0} {:>6.3} {:>9.2} {:>6.2}",
                row.op,
                size_name(len),
                row.direct,
                row.device[0],
                row.device[0] / row.direct,
                row.device_cpu_us[0],
                row.device[1],
                row.device[1] / row.direct,
                row.device_cpu_us[1],
                row.device[1] / row.device[0],
            );
            rows.push(row);
        }
    }
    if let Some(path) = plot {
        match plot_sweep(path, &rows) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => println!("could not write {}: {e}", path.display()),
        }
    }
}

const COLOURS: [plotters::style::RGBColor; 4] = [
    plotters::style::RGBColor(0x1f, 0x77, 0xb4),
    plotters::style::RGBColor(0x2c, 0xa0, 0x2c),
    plotters::style::RGBColor(0xd6, 0x27, 0x28),
    plotters::style::RGBColor(0x94, 0x67, 0xbd),
];

/// Jobs/s against size (direct dashed, one engine solid, two engines
/// thin) above, and the device/direct ratio against size below.
fn plot_sweep(path: &std::path::Path, rows: &[SweepRow]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(520);
    let x = (48f64..1.4 * (1 << 20) as f64).log_scale();
    let hi = rows
        .iter()
        .flat_map(|r| [r.direct, r.device[0], r.device[1]])
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Jobs per second against job size: direct call (dashed), device with 1 engine (thick), 2 engines (thin)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(x.clone(), (100f64..hi * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("job size (bytes, log scale)")
        .y_desc("jobs/s (log scale)")
        .x_label_formatter(&|v| size_name(*v as usize))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()?;
    let ops: Vec<&str> = rows.iter().fold(Vec::new(), |mut v, r| {
        if !v.contains(&r.op) {
            v.push(r.op);
        }
        v
    });
    let series = |op: &str, f: &dyn Fn(&SweepRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r.op == op)
            .map(|r| (r.len as f64, f(r)))
            .collect()
    };
    for (i, op) in ops.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                series(op, &|r| r.device[0]),
                c.stroke_width(3),
            ))?
            .label(*op)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(LineSeries::new(
            series(op, &|r| r.device[1]),
            c.stroke_width(1),
        ))?;
        chart.draw_series(DashedLineSeries::new(
            series(op, &|r| r.direct),
            6,
            4,
            c.stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    let mut ratio = ChartBuilder::on(&bottom)
        .caption(
            "Device / direct jobs per second: 1 engine (thick), 2 engines (thin)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(x, 0f64..2.1f64)?;
    ratio
        .configure_mesh()
        .x_desc("job size (bytes, log scale)")
        .y_desc("device / direct")
        .x_label_formatter(&|v| size_name(*v as usize))
        .draw()?;
    for (i, op) in ops.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        ratio.draw_series(LineSeries::new(
            series(op, &|r| r.device[0] / r.direct),
            c.stroke_width(3),
        ))?;
        ratio.draw_series(LineSeries::new(
            series(op, &|r| r.device[1] / r.direct),
            c.stroke_width(1),
        ))?;
    }
    ratio.draw_series(LineSeries::new(
        [(48.0, 1.0), (1.4 * (1 << 20) as f64, 1.0)],
        BLACK.mix(0.3),
    ))?;
    root.present()?;
    Ok(())
}

/// `--slicing`: what compressing a long job in slices costs against
/// libdeflate's one shot, both called directly on one thread (no device):
/// output size and time at levels 1, 6 and 12, on 4 MiB of the guest tool's
/// text in 1 MiB jobs.
fn slicing_cost() {
    use wdvirt::accel::soft::compress_as_engine;
    let data = corpus(4 << 20, 21);
    let mut scratch = ops::Scratch::new();
    let mut dst = vec![0u8; 2 << 20];
    println!("1 MiB deflate jobs, 4 MiB of text: libdeflate one shot against the engine's slices");
    println!("level   one-shot bytes      ms   sliced bytes      ms   size ratio   time ratio");
    for level in [1u64, 6, 12] {
        let mut run = |sliced: bool| {
            let t = Instant::now();
            let mut bytes = 0u64;
            for piece in data.chunks(1 << 20) {
                let n = if sliced {
                    compress_as_engine(Format::Deflate, level, piece, &mut dst, &mut scratch)
                } else {
                    ops::compress(Format::Deflate, level, piece, &mut dst, &mut scratch)
                };
                bytes += u64::from(n.expect("compress"));
            }
            (bytes, t.elapsed().as_secs_f64() * 1e3)
        };
        let (ob, oms) = run(false);
        let (sb, sms) = run(true);
        println!(
            "{level:>5} {ob:>16} {oms:>7.1} {sb:>14} {sms:>7.1} {:>12.3} {:>12.2}",
            sb as f64 / ob as f64,
            sms / oms
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--slicing") {
        slicing_cost();
        return;
    }
    // `cargo bench` passes `--bench` (and any filter) to harness = false
    // targets: only `--quick` means anything here.
    let quick = std::env::args().skip(1).any(|a| a == "--quick")
        || std::env::var_os("WDVIRT_BENCH_QUICK").is_some_and(|v| v != "0" && !v.is_empty());
    // Other arguments select cases by substring, as libtest filters do.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--plot"))
        .map(|(_, a)| a.clone())
        .collect();
    let verbose = std::env::var_os("WDVIRT_BENCH_VERBOSE").is_some();
    let sweep_mode = std::env::args().any(|a| a == "--sweep");
    let plot = std::env::args()
        .skip_while(|a| a != "--plot")
        .nth(1)
        .map(std::path::PathBuf::from);
    // Direct and device alternate in short rounds, so that load from other
    // processes on this shared machine falls on both modes alike.
    let (rounds, round) = if quick {
        (2, Duration::from_millis(150))
    } else {
        (4, Duration::from_millis(400))
    };

    if sweep_mode {
        size_sweep(quick, plot.as_deref(), &filters);
        return;
    }
    let mut rig = Rig::start(1);
    let (instance, q, pool) = (&rig.instance, &mut rig.q, &rig.pool);

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "wdvirt datapath: 1 software engine, queue depth {DEPTH}, {rounds} alternating rounds of {} ms per mode and case{}",
        round.as_millis(),
        if quick { " (--quick)" } else { "" }
    );
    println!(
        "{:<16} {:>10} {:>6} {:>10} {:>6} {:>6} {:>11} {:>8} {:>3} {:>7} {:>7} {:>9}  device CPU µs/job by thread",
        "case",
        "direct/s",
        "GB/s",
        "device/s",
        "GB/s",
        "ratio",
        "(rounds)",
        "bell/job",
        "irq",
        "cpu dir",
        "cpu dev",
        "cpu ratio",
    );
    for case in cases()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
    {
        let inputs: Vec<Vec<u8>> = (0..SLOTS)
            .map(|i| corpus(case.len, 17 + i as u64))
            .collect();
        let (mut direct, reference) = Direct::new(&case, &inputs);
        let mut path = DevicePath::new(&case, &inputs, &reference, instance, q, pool);
        let (mut d, mut v) = (Measure::default(), Measure::default());
        let (mut lo, mut hi) = (f64::MAX, 0f64);
        let s0 = queue_stats(path.instance);
        for _ in 0..rounds {
            let a = direct.round(round);
            let b = path.round(round);
            let r = b.jobs_per_s() / a.jobs_per_s();
            (lo, hi) = (lo.min(r), hi.max(r));
            d.add(a);
            v.add(b);
        }
        let s1 = queue_stats(path.instance);
        let split: Vec<String> = v
            .cpu
            .by_class
            .iter()
            .filter(|(_, ns)| **ns > 0)
            .map(|(k, ns)| {
                let us = *ns as f64 / 1e3 / v.jobs as f64;
                // Two decimals where a job costs under a microsecond.
                let digits = if us < 10.0 { 2 } else { 1 };
                format!("{k} {us:.digits$}")
            })
            .collect();
        println!(
            "{:<16} {:>10.0} {:>6.3} {:>10.0} {:>6.3} {:>6.3} {:>11} {:>8.4} {:>3} {:>7.2} {:>7.2} {:>9.3}  {}",
            case.name,
            d.jobs_per_s(),
            d.gb_per_s(case.len),
            v.jobs_per_s(),
            v.gb_per_s(case.len),
            v.jobs_per_s() / d.jobs_per_s(),
            format!("{lo:.2}–{hi:.2}"),
            (s1.doorbells - s0.doorbells) as f64 / v.jobs as f64,
            s1.interrupts - s0.interrupts,
            d.cpu_us_per_job(),
            v.cpu_us_per_job(),
            d.cpu_us_per_job() / v.cpu_us_per_job(),
            split.join(", "),
        );
        // Where the time went: how much of a core the direct loop and the
        // device's engine thread got (below 100 % = preempted or starved),
        // and the engine thread's CPU per job against the bare call.
        let engine_ns = v.cpu.by_class.get("engine").copied().unwrap_or(0) as f64;
        println!(
            "    direct thread busy {:.0} %, engine thread busy {:.0} %, engine CPU/job {:.1} µs vs direct {:.1} µs, {:.3} context switches/job",
            d.cpu.total_ns() as f64 / 1e7 / d.secs,
            engine_ns / 1e7 / v.secs,
            engine_ns / 1e3 / v.jobs as f64,
            d.cpu_us_per_job(),
            v.cpu.switches as f64 / v.jobs as f64,
        );
        if verbose {
            println!(
                "    direct: {} jobs in {:.2} s, {} ticks, {} cs; device: {} jobs in {:.2} s, {} ticks, {} cs, {} worker sleeps",
                d.jobs,
                d.secs,
                d.cpu.ticks,
                d.cpu.switches,
                v.jobs,
                v.secs,
                v.cpu.ticks,
                v.cpu.switches,
                s1.sleeps - s0.sleeps
            );
        }
    }

    // Idle: the instance connected, queue 0 enabled, nothing submitted.
    let s0 = queue_stats(instance);
    let before = sample_cpu();
    std::thread::sleep(Duration::from_secs(1));
    let idle = sample_cpu().since(&before);
    let s1 = queue_stats(instance);
    println!(
        "idle 1 s (queue enabled, nothing submitted): {} CPU ticks (of {} per s), {:.0} µs CPU, {} queue-worker wake-ups, {} context switches in the process (the sleeping main thread's included)",
        idle.ticks,
        clock_ticks(),
        idle.total_ns() as f64 / 1e3,
        s1.sleeps - s0.sleeps,
        idle.switches,
    );
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}
