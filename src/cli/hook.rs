//! `wdvirt hook qemu NAME OPERATION SUBOPERATION EXTRA`: what libvirt runs
//! (through `/etc/libvirt/hooks/qemu.d/wdvirt`) around a domain's QEMU,
//! with the domain XML on stdin. The work is `libvirt::hook`'s; this reads
//! stdin, reaches the daemon over its API, and reports on stderr (libvirt
//! reads a hook's stdout as XML for some operations, so nothing goes there).
//! A failure exits 1 with the message libvirt shows its user.

use std::io::Read;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::client::{ApiClient, ApiError};
use crate::daemon::action::{Action, Outcome};
use crate::daemon::view::InstanceView;
use crate::libvirt::hook::{self, Daemon, DaemonError, Operation};

#[derive(Args, Debug)]
pub struct HookArgs {
    #[command(subcommand)]
    pub driver: HookDriver,
}

#[derive(Subcommand, Debug)]
pub enum HookDriver {
    /// libvirt's QEMU driver hook (docs/libvirt.md).
    Qemu(QemuHookArgs),
}

#[derive(Args, Debug)]
pub struct QemuHookArgs {
    /// The domain's name.
    #[arg(allow_hyphen_values = true)]
    pub name: String,
    /// prepare, start, started, stopped, release, migrate, restore,
    /// reconnect, attach, ...
    #[arg(allow_hyphen_values = true)]
    pub operation: String,
    /// begin or end.
    #[arg(allow_hyphen_values = true)]
    pub suboperation: String,
    /// libvirt's extra argument (`-` mostly).
    #[arg(allow_hyphen_values = true, default_value = "-")]
    pub extra: String,
}

/// The hook's actions go through the CLI's one mapping to the API's paths
/// (`client::route`); each answers with an instance.
impl Daemon for ApiClient {
    fn handle(&self, action: Action) -> Result<Outcome, DaemonError> {
        self.act::<InstanceView>(&action)
            .map(|v| Outcome::Instance(Box::new(v)))
            .map_err(|e| {
                let api = e.downcast_ref::<ApiError>();
                DaemonError {
                    status: api.map(|a| a.status),
                    kind: api.map(|a| a.kind.clone()),
                    message: format!("{e:#}"),
                }
            })
    }
}

pub fn run(api: &ApiClient, a: HookArgs) -> anyhow::Result<ExitCode> {
    let HookDriver::Qemu(a) = a.driver;
    // Always read the whole XML: libvirt writes it to every hook, and a
    // hook that exits without reading it gets libvirt a broken pipe.
    let mut xml = String::new();
    std::io::stdin()
        .read_to_string(&mut xml)
        .map_err(|e| anyhow::anyhow!("cannot read the domain XML on stdin: {e}"))?;
    let op = Operation::from_args(&a.operation, &a.suboperation);
    tracing::debug!(domain = %a.name, "hook {} {} {}: {op:?}", a.operation, a.suboperation, a.extra);
    match hook::run(op, &a.name, &xml, api) {
        Ok(report) => {
            for line in report {
                eprintln!("wdvirt: {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // Every variant's message carries its cause already.
            eprintln!("wdvirt: {} {} refused: {e}", a.operation, a.suboperation);
            Ok(ExitCode::from(1))
        }
    }
}
