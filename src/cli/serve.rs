//! `wdvirt serve`: one instance on the software accelerator, until interrupted.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::daemon::instance::{Instance, InstanceSpec};
use crate::partition::PasidAllocator;
use crate::vdev::wd::WdConfig;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Path of the vfio-user socket to create (a stale socket file is replaced;
    /// a live one is refused).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Instance name shown in logs and reports.
    #[arg(long, default_value = "wd0")]
    pub name: String,
    /// Queues the instance offers its guest (1..=64).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub queues: u32,
    /// Largest ring depth the guest may program (a power of two, 2..=65536).
    #[arg(long, default_value_t = 1024, value_parser = parse_depth)]
    pub max_depth: u32,
    /// Operations the guest may use: `all`, or a comma list such as
    /// `deflate-compress,deflate-decompress,crc32c`.
    #[arg(long, default_value = "all", value_parser = super::parse_ops)]
    pub ops: u32,
    /// Software engine threads (the accelerator's "hardware engines").
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub engines: u16,
    /// Print the instance's counters as JSON on exit instead of a summary.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_depth(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v.is_power_of_two() && (2..=65536).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a power of two in 2..=65536"))
    }
}

pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let accel = super::soft_accel(a.engines)?;
    let pasids = PasidAllocator::default();
    let pasid = pasids.allocate()?;
    let config = WdConfig {
        queues: a.queues,
        max_depth: a.max_depth,
        ops: a.ops,
        ..WdConfig::default()
    };
    let spec = InstanceSpec {
        name: a.name.clone(),
        socket: a.socket.clone(),
        config,
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let instance = Instance::start(spec, accel, pasid)?;
    eprintln!(
        "wdvirt: serving instance {} (PASID {pasid}, {} queues) at {}\n\
         wdvirt: connect a VMM, e.g. QEMU: -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{}\"}}}}'\n\
         wdvirt: Ctrl-C to stop",
        a.name,
        a.queues,
        a.socket.display(),
        a.socket.display()
    );
    let signal = signals.forever().next();
    let report = instance.report();
    instance.stop();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let ok: u64 = report.queues.iter().map(|q| q.jobs_ok).sum();
        let failed: u64 = report.queues.iter().map(|q| q.jobs_failed).sum();
        println!(
            "wdvirt: stopped by signal {}: {} connection(s), {ok} jobs ok, {failed} failed, {} refused register accesses",
            signal.unwrap_or(0),
            report.connections,
            report.device.register_errors
        );
    }
    Ok(ExitCode::SUCCESS)
}
