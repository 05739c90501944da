//! The command line: a thin layer that parses arguments into an action and
//! prints results. `anyhow` lives here and nowhere below.

pub mod client;
mod ctl;
mod daemon;
mod demo;
mod holder;
mod hook;
mod install;
mod libvirt;
mod migrate;
mod schema;
mod serve;
mod stats;
mod top;
mod topology;
mod upgrade;
mod validate;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Share WarpDrive-style accelerators (compression, hashing, data movement)
/// between virtual machines. Each instance is a virtual PCI device served over
/// vfio-user, running its jobs on a physical accelerator — by default the
/// built-in software accelerator.
#[derive(Parser, Debug)]
#[command(name = "wdvirt", version, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `wdvirt=debug`.
    #[arg(long, global = true, env = "WDVIRT_LOG", default_value = "warn")]
    pub log: String,
    /// The daemon's API socket (the daemon serves it; the other commands
    /// call it).
    #[arg(
        long,
        global = true,
        env = "WDVIRT_API",
        value_name = "PATH",
        default_value = "/run/wdvirt/api.sock"
    )]
    pub api: std::path::PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start instances on the built-in software accelerator, drive each over its
    /// real vfio-user socket with the guest driver, verify every result against
    /// a direct library call, and report what each instance did.
    Demo(demo::DemoArgs),
    /// Serve one instance on the software accelerator at a UNIX socket until
    /// interrupted (SIGINT/SIGTERM). A VMM connects with, for QEMU:
    /// -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"PATH"}}'
    Serve(serve::ServeArgs),
    /// Run the daemon that owns instances: it loads instance types from YAML,
    /// keeps definitions under --state-dir across restarts, starts `auto`
    /// ones, and answers the commands below on its API socket (--api).
    Daemon(daemon::DaemonArgs),
    /// List instance types and how many more of each fit now.
    Types(ctl::TypesArgs),
    /// List accelerators: how full their queue-pair and PASID pools are, and
    /// the host graph's distances between them and the NUMA nodes.
    Accelerators(ctl::AcceleratorsArgs),
    /// Define an instance of a type (persistent); prints its UUID.
    ///
    /// Example: wdvirt define --type zip --name vm1-zip --auto
    Define(ctl::DefineArgs),
    /// Remove a stopped instance's definition.
    Undefine(ctl::IdArgs),
    /// Start a defined instance; prints the vfio-user socket a VMM connects to.
    Start(ctl::IdArgs),
    /// Stop a started instance (its VMM loses the device).
    Stop(ctl::IdArgs),
    /// Change a definition (auto-start, type, NUMA hint, QoS policy).
    Modify(ctl::ModifyArgs),
    /// List started instances, or with --defined every definition.
    List(ctl::ListArgs),
    /// Statistics of started instances per VM, instance and queue: jobs,
    /// failures by status, bytes, ring occupancy, latency percentiles.
    Stats(stats::StatsArgs),
    /// A live view per VM (throughput, share, latency, who waits on whom),
    /// refreshed in place; q quits.
    Top(top::TopArgs),
    /// Print a shell completion script.
    Completions(install::CompletionsArgs),
    /// Write man pages (wdvirt.1 and one per subcommand) into a directory.
    Man(install::ManArgs),
    /// Check configuration files (accelerators, QoS policies, instance types)
    /// without a daemon: every error with its file:line:column.
    Validate(validate::ValidateArgs),
    /// Print the JSON Schema of the configuration files (for editors).
    Schema(schema::SchemaArgs),
    /// Show the host graph: NUMA nodes (CPUs, memory, distances), the
    /// accelerators found behind UACCE, IDXD and the software engines, with
    /// their free queue pairs and PASIDs, and the links between them; as
    /// text, --json, --dot or an --svg picture.
    Topology(topology::TopologyArgs),
    /// Dry-run placement of a type: whether, where and how many instances
    /// fit now, and what stops each accelerator that cannot take one.
    /// Exits 2 when fewer than --count fit.
    Plan(topology::PlanArgs),
    /// What libvirt runs around a domain's QEMU (installed by `wdvirt
    /// libvirt install-hook`): NAME OPERATION SUBOPERATION EXTRA, the
    /// domain XML on stdin.
    Hook(hook::HookArgs),
    /// libvirt integration: the domain XML fragments, the hook's install.
    Libvirt(libvirt::LibvirtArgs),
    /// Run a VM process: guest RAM and an instance's function, the guest
    /// driver's verified load on N queues, a control socket for `wdvirt
    /// migrate`; or, with --incoming, wait for a migration and run the VM
    /// received.
    Vm(vm::VmArgs),
    /// Live-migrate a running `wdvirt vm` to a `wdvirt vm --incoming`
    /// process (same host or over TCP), showing its progress; any failure
    /// leaves the VM running on the source.
    Migrate(migrate::MigrateArgs),
    /// Replace the running daemon's program (after a package upgrade, say)
    /// without stopping any instance: the daemon execs the new program,
    /// which takes every instance and its VMM back from the fd holder, jobs
    /// in flight included. Prints how long the API was away.
    ///
    /// Example: wdvirt upgrade --exe /usr/local/bin/wdvirt
    Upgrade(upgrade::UpgradeArgs),
    /// Hold the daemon's file descriptors (instance sockets, VMM
    /// connections, guest memory) across its restarts. The daemon starts it
    /// by itself; run it by hand only to debug. --socket defaults to
    /// /run/wdvirt/holder.sock.
    Holder(holder::HolderArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Each VMM holds fds here (guest memory, eventfds, its socket): use all
    // the fds the hard limit allows.
    match crate::transport::raise_fd_limit() {
        Ok((soft, hard)) => tracing::info!("fd limit {soft} (hard {hard})"),
        Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    let api = client::ApiClient::new(&cli.api);
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Completions(a) => install::completions(a),
        Command::Man(a) => install::man(a),
        Command::Daemon(a) => daemon::run(a, cli.api.clone()),
        Command::Types(a) => ctl::types(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Accelerators(a) => ctl::accelerators(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Define(a) => ctl::define(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Undefine(a) => ctl::undefine(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Start(a) => ctl::start(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Stop(a) => ctl::stop(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Modify(a) => ctl::modify(&api, a).map(|()| ExitCode::SUCCESS),
        Command::List(a) => ctl::list(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Stats(a) => stats::run(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Top(a) => top::run(&api, a).map(|()| ExitCode::SUCCESS),
        Command::Validate(a) => validate::run(a),
        Command::Schema(a) => schema::run(a),
        Command::Topology(a) => topology::topology(a, &api, &cli.api),
        Command::Plan(a) => topology::plan(a, &api, &cli.api),
        Command::Hook(a) => hook::run(&api, a),
        Command::Libvirt(a) => libvirt::run(&cli.api, a).map(|()| ExitCode::SUCCESS),
        Command::Vm(a) => vm::run(a),
        Command::Migrate(a) => migrate::run(a),
        Command::Upgrade(a) => upgrade::run(&cli.api, a),
        Command::Holder(a) => holder::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wdvirt: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The built-in software accelerator with `engines` engine threads, its
/// engines shared between instances by the QoS scheduler (equal weights).
pub fn soft_accel(engines: u16) -> anyhow::Result<std::sync::Arc<crate::qos::ScheduledAccel>> {
    use anyhow::Context;
    let cfg = crate::accel::soft::SoftAccelConfig {
        engines: engines as usize,
        ..Default::default()
    };
    let soft = crate::accel::soft::SoftAccel::with_config(cfg)
        .context("cannot start the software accelerator's engines")?;
    let n = soft.engines();
    crate::qos::ScheduledAccel::new(soft, n).context("cannot start the QoS scheduler")
}

/// Parse an operation list like `deflate-compress,sha256` or `all`.
pub fn parse_ops(s: &str) -> Result<u32, String> {
    if s == "all" {
        return Ok(wdvirt_abi::ALL_OPS);
    }
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .try_fold(0u32, |mask, name| {
            wdvirt_abi::Opcode::from_name(name)
                .map(|op| mask | op.bit())
                .ok_or_else(|| {
                    let known: Vec<_> = wdvirt_abi::Opcode::ALL.iter().map(|o| o.name()).collect();
                    format!(
                        "unknown operation '{name}' (known: all, {})",
                        known.join(", ")
                    )
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_lists_parse_and_unknown_names_are_named_in_the_error() {
        assert_eq!(parse_ops("all"), Ok(wdvirt_abi::ALL_OPS));
        let m = parse_ops("sha256, crc32c").unwrap();
        assert_eq!(
            m,
            wdvirt_abi::Opcode::Sha256.bit() | wdvirt_abi::Opcode::Crc32c.bit()
        );
        let e = parse_ops("sha256,bogus").unwrap_err();
        assert!(
            e.contains("'bogus'") && e.contains("deflate-compress"),
            "{e}"
        );
    }
}
