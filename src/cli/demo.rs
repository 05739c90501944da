//! `wdvirt demo`: the main job on the embedded default. Starts instances on
//! the built-in software accelerator, each on its own vfio-user socket; for
//! each, an in-process VMM connects, maps guest RAM, and the guest driver
//! runs a job mix through the rings. Every result is checked against a
//! direct library call on the same bytes, and each instance's counters are
//! printed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use sha2::Digest;
use wdvirt_guest::{Device, Format};

use crate::accel::SharedAccelerator;
use crate::daemon::instance::{Instance, InstanceReport, InstanceSpec};
use crate::partition::PasidAllocator;
use crate::vdev::wd::WdConfig;
use crate::vmm::{GuestRam, LoopbackVmm};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Instances to start, each with its own socket, PASID and guest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub instances: u32,
    /// Rounds of the job mix per instance (each round: deflate, zlib and
    /// gzip round trips, CRC32C, SHA-256, copy, fill, compare).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rounds: u32,
    /// Bytes of input per job (at most 1 MiB, the instance's MAX_XFER).
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub size: u32,
    /// Software engine threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub engines: u16,
    /// Directory for the instances' sockets (default: a fresh temporary one).
    #[arg(long, value_name = "DIR")]
    pub socket_dir: Option<PathBuf>,
    /// Drive instances that are already served (e.g. started with `wdvirt
    /// start`) instead of starting its own: the in-process VMM connects to
    /// each SOCKET. Repeatable. Each instance needs every operation on its
    /// queue 0 (type `all-4q` in policies/default.yaml).
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["instances", "engines", "socket_dir"])]
    pub connect: Vec<PathBuf>,
    /// Print the result as JSON (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct GuestResult {
    jobs: u64,
    verified: u64,
    mismatches: Vec<String>,
    bytes_in: u64,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct DemoInstance {
    guest: GuestResult,
    device: InstanceReport,
}

/// One served instance the demo only connects to: its counters are the
/// daemon's (`wdvirt list`).
#[derive(Debug, Serialize)]
struct ConnectedInstance {
    socket: PathBuf,
    guest: GuestResult,
}

/// Runs the guest side on every socket at once, one thread each.
fn drive_all(
    sockets: &[PathBuf],
    rounds: u32,
    size: u32,
    quiet: bool,
) -> anyhow::Result<Vec<GuestResult>> {
    let guests: Vec<_> = sockets
        .iter()
        .enumerate()
        .map(|(i, socket)| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let r = drive(&socket, rounds, size as usize, i as u64 + 1);
                if !quiet && let Ok(r) = &r {
                    eprintln!(
                        "  {}: guest finished {} jobs in {:.2} s",
                        socket.display(),
                        r.jobs,
                        r.seconds
                    );
                }
                r
            })
        })
        .collect();
    guests
        .into_iter()
        .zip(sockets)
        .map(|(g, s)| {
            g.join()
                .map_err(|_| anyhow::anyhow!("guest thread panicked"))?
                .with_context(|| s.display().to_string())
        })
        .collect()
}

fn check_all<'a>(results: impl Iterator<Item = &'a GuestResult>) -> anyhow::Result<ExitCode> {
    let bad: usize = results.map(|r| r.mismatches.len()).sum();
    if bad > 0 {
        bail!("{bad} result(s) did not match the direct library call");
    }
    Ok(ExitCode::SUCCESS)
}

fn run_connected(a: &DemoArgs) -> anyhow::Result<ExitCode> {
    if !a.json {
        eprintln!(
            "wdvirt demo: driving {} served instance(s), {} rounds of 8 jobs x {} KiB each",
            a.connect.len(),
            a.rounds,
            a.size / 1024
        );
    }
    let results: Vec<ConnectedInstance> = drive_all(&a.connect, a.rounds, a.size, a.json)?
        .into_iter()
        .zip(&a.connect)
        .map(|(guest, socket)| ConnectedInstance {
            socket: socket.clone(),
            guest,
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!(
            "{:<40} {:>7} {:>9} {:>10} {:>9}",
            "socket", "jobs", "verified", "MiB in", "MB/s"
        );
        for r in &results {
            println!(
                "{:<40} {:>7} {:>9} {:>10.1} {:>9.0}",
                r.socket.display(),
                r.guest.jobs,
                r.guest.verified,
                r.guest.bytes_in as f64 / (1 << 20) as f64,
                r.guest.bytes_in as f64 / r.guest.seconds.max(1e-9) / 1e6,
            );
        }
        if results.iter().all(|r| r.guest.mismatches.is_empty()) {
            println!("every result matched a direct library call");
        }
    }
    check_all(results.iter().map(|r| &r.guest))
}

/// Text-like data that compresses about 3:1 (the guest tool's generator).
fn corpus(len: usize, seed: u64) -> Vec<u8> {
    wdvirt_guest::workload::gen_data(seed, len)
}

/// The guest's side of one instance: connect, probe, run the mix, verify.
fn drive(
    socket: &std::path::Path,
    rounds: u32,
    size: usize,
    seed: u64,
) -> anyhow::Result<GuestResult> {
    let ram = GuestRam::new(0x1_0000_0000, 64 << 20)?;
    let vmm = Arc::new(LoopbackVmm::connect(socket, ram).context("VMM connect")?);
    let dev = Device::probe(vmm.clone()).context("probe")?;
    dev.enable()?;
    let pool = vmm.dma_pool()?;
    let mut q = dev.queue(0, 64, dev.info().cap_ops, &pool)?;
    let mut r = GuestResult {
        jobs: 0,
        verified: 0,
        mismatches: Vec::new(),
        bytes_in: 0,
        seconds: 0.0,
    };
    let started = Instant::now();
    let check = |r: &mut GuestResult, what: &str, ok: bool, jobs: u64| {
        r.jobs += jobs;
        if ok {
            r.verified += jobs;
        } else {
            r.mismatches.push(what.to_string());
        }
    };
    for round in 0..rounds {
        let data = corpus(size, seed ^ round as u64);
        for f in [Format::Deflate, Format::Zlib, Format::Gzip] {
            let packed = q.compress(f, 1, &data)?;
            // The direct library call decodes the device's stream...
            let mut plain = vec![0u8; data.len()];
            let mut scratch = crate::accel::ops::Scratch::new();
            let direct = crate::accel::ops::decompress(f, &packed, &mut plain, &mut scratch);
            let direct_ok =
                direct.map(|n| n as usize == data.len()).unwrap_or(false) && plain == data;
            // ...and the device decodes it too.
            let back = q.decompress(f, &packed, data.len())?;
            check(
                &mut r,
                &format!("{f:?} round {round}"),
                direct_ok && back == data,
                2,
            );
        }
        let crc = q.crc32c(&data)?;
        check(
            &mut r,
            "crc32c",
            crc == crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &data) as u32,
            1,
        );
        let sha = q.sha256(&data)?;
        check(
            &mut r,
            "sha256",
            sha[..] == sha2::Sha256::digest(&data)[..],
            1,
        );
        check(&mut r, "copy", q.copy(&data)? == data, 1);
        check(
            &mut r,
            "fill",
            q.fill(0x5a, data.len())? == vec![0x5a; data.len()],
            1,
        );
        check(&mut r, "compare", q.compare(&data, &data)?.is_none(), 1);
        r.bytes_in += 8 * data.len() as u64;
    }
    r.seconds = started.elapsed().as_secs_f64();
    Ok(r)
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    if !a.connect.is_empty() {
        return run_connected(&a);
    }
    let tmp;
    let dir = match &a.socket_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("wdvirt-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let accel: SharedAccelerator = super::soft_accel(a.engines)?;
    let pasids = PasidAllocator::default();
    let mut instances = Vec::new();
    for i in 0..a.instances {
        let spec = InstanceSpec {
            name: format!("wd{i}"),
            socket: dir.join(format!("wd{i}.sock")),
            config: WdConfig::default(),
            type_name: crate::vdev::wd::DEFAULT_TYPE_NAME.into(),
        };
        instances.push(Instance::start(spec, accel.clone(), pasids.allocate()?)?);
    }
    if !a.json {
        eprintln!(
            "wdvirt demo: {} instance(s) on the software accelerator ({} engines), {} rounds of 8 jobs x {} KiB each",
            a.instances,
            a.engines,
            a.rounds,
            a.size / 1024
        );
    }
    let sockets: Vec<PathBuf> = instances.iter().map(|i| i.socket().to_path_buf()).collect();
    let results: Vec<DemoInstance> = drive_all(&sockets, a.rounds, a.size, a.json)?
        .into_iter()
        .zip(&instances)
        .map(|(guest, inst)| DemoInstance {
            guest,
            device: inst.report(),
        })
        .collect();
    drop(instances);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_table(&results);
    }
    check_all(results.iter().map(|r| &r.guest))
}

fn print_table(results: &[DemoInstance]) {
    println!(
        "{:<6} {:>5} {:>7} {:>9} {:>7} {:>7} {:>10} {:>10} {:>9} {:>9}",
        "inst",
        "pasid",
        "jobs",
        "verified",
        "ok",
        "failed",
        "MiB in",
        "MiB out",
        "doorbells",
        "MB/s"
    );
    for r in results {
        let q = crate::stats::QueueSnapshot::total(&r.device.queues);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "{:<6} {:>5} {:>7} {:>9} {:>7} {:>7} {:>10.1} {:>10.1} {:>9} {:>9.0}",
            r.device.name,
            r.device.pasid,
            r.guest.jobs,
            r.guest.verified,
            q.jobs_ok,
            q.jobs_failed,
            mib(r.guest.bytes_in),
            mib(q.bytes_out),
            q.doorbells,
            r.guest.bytes_in as f64 / r.guest.seconds.max(1e-9) / 1e6,
        );
    }
    let all_ok = results.iter().all(|r| r.guest.mismatches.is_empty());
    println!(
        "{}",
        if all_ok {
            "every result matched a direct library call"
        } else {
            "MISMATCHES: see above"
        }
    );
}
