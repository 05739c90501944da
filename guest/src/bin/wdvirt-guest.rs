//! `wdvirt-guest`: finds the wdvirt device in a Linux guest, maps its BARs
//! and runs jobs in poll mode. Prints human-readable lines and exactly one
//! machine-readable `WDVIRT-RESULT {json}` line; exits 0 when that result is ok.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use wdvirt_guest::cli::{self, Command, ToolOptions};

fn emit(v: &Value) -> ExitCode {
    println!("WDVIRT-RESULT {v}");
    if v["ok"] == json!(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn failure(mode: &str, error: impl std::fmt::Display) -> Value {
    json!({ "mode": mode, "ok": false, "error": error.to_string() })
}

/// Whether standard input has a line (or has ended) for us, without
/// waiting: on the guest's serial console a line is readable only once its
/// newline has arrived.
fn stdin_ready() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDIN_FILENO,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

fn main() -> ExitCode {
    let mut opts = match cli::parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("wdvirt-guest: {e}\n{}", cli::USAGE);
            return emit(&failure("args", e));
        }
    };
    if opts.command == Command::Cmdline {
        let line = match std::fs::read_to_string("/proc/cmdline") {
            Ok(l) => l,
            Err(e) => return emit(&failure("cmdline", format!("/proc/cmdline: {e}"))),
        };
        let args = cli::args_from_cmdline(&line);
        println!("wdvirt-guest: from /proc/cmdline: {}", args.join(" "));
        opts = match cli::parse_args(args) {
            Ok(o) if o.command == Command::Cmdline => {
                return emit(&failure("cmdline", "wdvirt.mode=cmdline loops"));
            }
            Ok(o) => o,
            Err(e) => return emit(&failure("cmdline", e)),
        };
    }
    if opts.command == Command::Help {
        println!("{}", cli::USAGE);
        return ExitCode::SUCCESS;
    }
    #[cfg(target_os = "linux")]
    {
        emit(&linux_main::run(&opts))
    }
    #[cfg(not(target_os = "linux"))]
    {
        emit(&failure(
            "unsupported",
            "the wdvirt-guest tool runs in a Linux guest",
        ))
    }
}

#[cfg(target_os = "linux")]
mod linux_main {
    use super::*;
    use std::path::Path;

    use wdvirt_guest::linux::bar::BarMmio;
    use wdvirt_guest::linux::hugepage::HugeMemory;
    use wdvirt_guest::linux::pci::{self, PciDevice};
    use wdvirt_guest::workload::{self, JobKind};
    use wdvirt_guest::{Device, DeviceInfo, DmaPool};

    fn mode(c: &Command) -> &'static str {
        match c {
            Command::Probe => "probe",
            Command::Run(_) => "run",
            Command::Garbage { .. } => "garbage",
            Command::Cmdline => "cmdline",
            Command::Help => "help",
        }
    }

    fn device_json(pd: &PciDevice, command: (u16, u16), info: &DeviceInfo) -> Value {
        let bars: Vec<Value> = pd
            .resources
            .iter()
            .take(6)
            .enumerate()
            .filter(|(_, r)| r.size() > 0)
            .map(|(i, r)| json!({ "bar": i, "start": format!("{:#x}", r.start), "size": r.size(), "mem": r.is_mem() }))
            .collect();
        json!({
            "bdf": pd.bdf,
            "vendor": format!("{:04x}", pd.vendor),
            "device": format!("{:04x}", pd.device),
            "class": format!("{:06x}", pd.class),
            "bars": bars,
            "command_before": format!("{:#06x}", command.0),
            "command_after": format!("{:#06x}", command.1),
            "version": format!("{}.{}", info.version_major(), info.version_minor()),
            "cap_ops": info.ops().iter().map(|o| o.name()).collect::<Vec<_>>(),
            "num_queues": info.num_queues,
            "max_depth": info.max_depth,
            "max_xfer": info.max_xfer,
        })
    }

    pub fn run(opts: &ToolOptions) -> Value {
        let m = mode(&opts.command);
        match go(opts) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("wdvirt-guest: {e}");
                failure(m, e)
            }
        }
    }

    fn go(opts: &ToolOptions) -> Result<Value, Box<dyn std::error::Error>> {
        let pd = pci::find_device(Path::new(pci::SYSFS_PCI), opts.bdf.as_deref())?;
        println!(
            "wdvirt-guest: found {} [{:04x}:{:04x}] class {:06x}",
            pd.bdf, pd.vendor, pd.device, pd.class
        );
        for (i, r) in pd
            .resources
            .iter()
            .take(6)
            .enumerate()
            .filter(|(_, r)| r.size() > 0)
        {
            println!(
                "wdvirt-guest:   BAR{i} {:#x} size {:#x}{}",
                r.start,
                r.size(),
                if r.is_mem() { " mem" } else { "" }
            );
        }
        let command = pci::enable_memory_and_master(&pd)?;
        println!(
            "wdvirt-guest: command register {:#06x} -> {:#06x}",
            command.0, command.1
        );
        let bars = Arc::new(BarMmio::open(&pd)?);
        let dev = Device::probe(bars.clone())?;
        let info = *dev.info();
        println!(
            "wdvirt-guest: ABI {}.{}, {} queues, depth <= {}, MAX_XFER {}, ops {:?}",
            info.version_major(),
            info.version_minor(),
            info.num_queues,
            info.max_depth,
            info.max_xfer,
            info.ops().iter().map(|o| o.name()).collect::<Vec<_>>()
        );
        let device = device_json(&pd, command, &info);
        let mut result = match &opts.command {
            Command::Probe => {
                dev.enable()?;
                json!({ "mode": "probe", "ok": true, "enabled": dev.is_enabled()? })
            }
            Command::Run(run) => {
                dev.enable()?;
                let mem = HugeMemory::allocate(opts.hugepages as usize)?;
                for (p, l) in mem.regions() {
                    println!("wdvirt-guest: DMA hugepage at phys {p:#x} ({l:#x} bytes)");
                }
                let alloc = mem.allocator()?;
                let pool = DmaPool::new(mem, alloc);
                let depth = if opts.depth == 0 {
                    info.max_depth.min(64)
                } else {
                    opts.depth
                };
                let ops = run.jobs.iter().fold(0, |m, j: &JobKind| m | j.ops_mask());
                let mut q = dev.queue(opts.queue, depth, ops, &pool)?;
                q.set_timeout(Duration::from_secs(opts.timeout_secs));
                let v = workload::run(&mut q, run);
                println!(
                    "wdvirt-guest: doorbells rung {}, device completed {}",
                    q.doorbells_rung(),
                    q.device_completed()?
                );
                v
            }
            Command::Garbage {
                count,
                seed,
                widths,
                until_stdin,
            } => {
                let mut go_on = || *until_stdin && !stdin_ready();
                workload::garbage(&dev, &*bars, *count, *seed, widths, &mut go_on)
            }
            Command::Cmdline | Command::Help => failure("internal", "nothing to run"),
        };
        result["device"] = device;
        Ok(result)
    }
}
