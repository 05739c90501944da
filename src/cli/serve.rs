//! `wdvirt serve`: instances on one software accelerator, until interrupted.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::daemon::instance::{Instance, InstanceSpec};
use crate::partition::PasidAllocator;
use crate::stats::QueueSnapshot;
use crate::transport::Limits;
use crate::vdev::wd::{ShapeError, WdConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Path of the vfio-user socket to create (a stale socket file is replaced;
    /// a live one is refused). Repeat it to serve several instances, each with
    /// its own PASID, all on the same accelerator.
    #[arg(long, value_name = "PATH", required = true)]
    pub socket: Vec<PathBuf>,
    /// Instance name shown in logs and reports (one socket only; by default
    /// each instance is named after its socket file, `wd0.sock` -> `wd0`).
    #[arg(long)]
    pub name: Option<String>,
    /// Queues the instance offers its guest (1..=64).
    #[arg(long, default_value_t = 4, value_parser = parse_queues)]
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
    /// Print each instance's counters on exit as a JSON array instead of a
    /// summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// What one VMM may cost the process (docs/security.md). Hitting a limit
/// gets the VMM an errno (or its connection closed) and counts in the
/// instance's `transport_totals`. A value outside a limit's range is
/// refused here, with the range in the message.
#[derive(Args, Debug)]
pub struct LimitArgs {
    /// Most fds one vfio-user message may carry (1..=252).
    #[arg(long, default_value_t = Limits::default().max_msg_fds,
          value_parser = ranged(Limits::MSG_FDS_RANGE))]
    pub max_msg_fds: usize,
    /// DMA maps one VMM may hold (1..=65535).
    #[arg(long, default_value_t = Limits::default().max_dma_maps,
          value_parser = ranged(Limits::DMA_MAPS_RANGE))]
    pub max_dma_maps: usize,
    /// Largest vfio-user message in bytes (4096..=1052672); VERSION
    /// advertises the largest region access that fits in it.
    #[arg(long, default_value_t = Limits::default().max_message_size,
          value_parser = ranged(Limits::MESSAGE_SIZE_RANGE))]
    pub max_message_size: u32,
    /// Milliseconds a started message (or an unread reply) may take before
    /// the connection is closed (10..=600000).
    #[arg(long, default_value_t = Limits::default().message_timeout_ms,
          value_parser = ranged(Limits::MESSAGE_TIMEOUT_MS_RANGE))]
    pub message_timeout_ms: u64,
    /// Warning lines per second per instance; the rest go to debug level.
    #[arg(long, default_value_t = Limits::default().log_lines_per_sec)]
    pub log_lines_per_sec: u32,
}

/// A clap parser for an integer limit that refuses values outside `range`.
fn ranged<T>(range: std::ops::RangeInclusive<T>) -> clap::builder::RangedU64ValueParser<T>
where
    T: TryFrom<u64> + TryInto<u64> + Copy + Clone + Send + Sync + 'static,
    <T as TryFrom<u64>>::Error: std::error::Error + Send + Sync + 'static,
{
    let wide = |v: T| v.try_into().unwrap_or(u64::MAX);
    clap::builder::RangedU64ValueParser::<T>::new().range(wide(*range.start())..=wide(*range.end()))
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_msg_fds: self.max_msg_fds,
            max_dma_maps: self.max_dma_maps,
            max_message_size: self.max_message_size,
            message_timeout_ms: self.message_timeout_ms,
            log_lines_per_sec: self.log_lines_per_sec,
            ..Limits::default()
        }
    }
}

/// `--max-depth`, by the device's own rule.
pub fn parse_depth(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    ShapeError::check_depth(v).map_err(|e| e.to_string())
}

/// `--queues`, by the device's own rule.
pub fn parse_queues(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    ShapeError::check_queues(v).map_err(|e| e.to_string())
}

/// The instances' names: `--name` for a single socket, else the socket files' stems.
fn instance_names(a: &ServeArgs) -> anyhow::Result<Vec<String>> {
    if let Some(name) = &a.name {
        anyhow::ensure!(
            a.socket.len() == 1,
            "--name names one instance, but {} sockets were given (each is named after its socket file)",
            a.socket.len()
        );
        return Ok(vec![name.clone()]);
    }
    let names: Vec<String> = a
        .socket
        .iter()
        .map(|p| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .with_context(|| format!("socket path {} has no file name", p.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    for (i, n) in names.iter().enumerate() {
        anyhow::ensure!(
            !names[..i].contains(n),
            "two sockets would both name an instance {n:?}; give them different file names"
        );
    }
    Ok(names)
}

pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let names = instance_names(&a)?;
    let accel = super::soft_accel(a.engines)?;
    let pasids = PasidAllocator::default();
    let config = WdConfig {
        queues: a.queues,
        max_depth: a.max_depth,
        ops: a.ops,
        ..WdConfig::default()
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let mut instances = Vec::new();
    for (name, socket) in names.into_iter().zip(&a.socket) {
        let pasid = pasids.allocate()?;
        let spec = InstanceSpec {
            name: name.clone(),
            socket: socket.clone(),
            config,
            type_name: crate::vdev::wd::DEFAULT_TYPE_NAME.into(),
        };
        // On an error the instances started so far stop as they drop.
        instances.push(Instance::start_with_limits(
            spec,
            accel.clone(),
            pasid,
            a.limits.limits(),
        )?);
        eprintln!(
            "wdvirt: serving instance {name} (PASID {pasid}, {} queues) at {}",
            a.queues,
            socket.display(),
        );
    }
    eprintln!(
        "wdvirt: connect a VMM, e.g. QEMU: -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{}\"}}}}'\n\
         wdvirt: Ctrl-C to stop",
        a.socket[0].display()
    );
    let signal = signals.forever().next();
    let reports: Vec<_> = instances.iter().map(Instance::report).collect();
    instances.into_iter().for_each(Instance::stop);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for report in &reports {
            let total = QueueSnapshot::total(&report.queues);
            println!(
                "wdvirt: {}: {} connection(s), {} jobs ok, {} failed, {} refused register accesses",
                report.name,
                report.connections,
                total.jobs_ok,
                total.jobs_failed,
                report.device.register_errors
            );
        }
        println!("wdvirt: stopped by signal {}", signal.unwrap_or(0));
    }
    Ok(ExitCode::SUCCESS)
}
