//! `wdvirt libvirt snippet` (the XML a domain needs to get instances) and
//! `wdvirt libvirt install-hook` (the hook libvirt runs around QEMU).
//! Neither needs a running daemon.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::libvirt::install;
use crate::libvirt::metadata::{Ask, MAX_INSTANCES};
use crate::libvirt::snippet;

#[derive(Args, Debug)]
pub struct LibvirtArgs {
    #[command(subcommand)]
    pub command: LibvirtCommand,
}

#[derive(Subcommand, Debug)]
pub enum LibvirtCommand {
    /// Print the <memoryBacking>, <metadata> and <qemu:commandline>
    /// fragments that give a domain wdvirt instances.
    ///
    /// Example: wdvirt libvirt snippet --type zip --count 2 --domain vm1
    Snippet(SnippetArgs),
    /// Install the hook as HOOKS_DIR/qemu.d/wdvirt (idempotent), calling
    /// this wdvirt binary with the daemon's API socket (--api). Restart
    /// libvirtd afterwards if it had no hooks before: it looks for them
    /// when it starts.
    InstallHook(InstallHookArgs),
}

#[derive(Args, Debug)]
pub struct SnippetArgs {
    /// The instance type (`wdvirt types` lists them).
    #[arg(long = "type", short = 't', value_name = "TYPE")]
    pub type_name: String,
    /// How many instances of it.
    #[arg(long, short = 'c', default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_INSTANCES)))]
    pub count: u32,
    /// The domain's name: instance names and sockets follow from it.
    #[arg(long, short = 'd', default_value = "DOMAIN")]
    pub domain: String,
    /// A QoS policy overriding the type's.
    #[arg(long, value_name = "POLICY")]
    pub qos: Option<String>,
    /// Place near this NUMA node (the VM's).
    #[arg(long, value_name = "NODE")]
    pub numa: Option<u32>,
    /// The daemon's run directory as QEMU sees it.
    #[arg(long, value_name = "DIR", default_value = "/run/wdvirt")]
    pub run_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct InstallHookArgs {
    /// libvirt's hooks directory.
    #[arg(long, value_name = "DIR", default_value = install::DEFAULT_HOOKS_DIR)]
    pub hooks_dir: PathBuf,
    /// The wdvirt binary the hook runs (default: this one), as libvirtd
    /// sees it.
    #[arg(long, value_name = "PATH")]
    pub wdvirt: Option<PathBuf>,
}

pub fn run(api: &Path, a: LibvirtArgs) -> anyhow::Result<()> {
    match a.command {
        LibvirtCommand::Snippet(s) => {
            let ask = Ask {
                type_name: s.type_name,
                count: s.count,
                qos: s.qos,
                numa: s.numa,
            };
            print!("{}", snippet::fragments(&s.domain, &ask, &s.run_dir));
            Ok(())
        }
        LibvirtCommand::InstallHook(h) => {
            let wdvirt = match h.wdvirt {
                Some(p) => p,
                None => std::env::current_exe()
                    .and_then(std::fs::canonicalize)
                    .context("cannot tell where this wdvirt binary is; give --wdvirt")?,
            };
            let script = install::script(&wdvirt, api)?;
            let changed = install::install(&h.hooks_dir, &script)?;
            let path = install::hook_path(&h.hooks_dir);
            if changed {
                eprintln!(
                    "wdvirt: installed {} (runs {} with --api {})",
                    path.display(),
                    wdvirt.display(),
                    api.display()
                );
            } else {
                eprintln!("wdvirt: {} is up to date", path.display());
            }
            println!("{}", path.display());
            Ok(())
        }
    }
}
