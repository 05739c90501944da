//! `wdvirt daemon`: the service that owns instances.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::daemon::{self, DaemonPaths};

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Instance types, QoS policies and accelerators: a YAML file or a
    /// directory of them (repeatable; see `wdvirt validate`, `policies/`).
    #[arg(long, value_name = "PATH", default_value = "/etc/wdvirt")]
    pub config: Vec<PathBuf>,
    /// Where definitions persist (one JSON file per instance).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/wdvirt")]
    pub state_dir: PathBuf,
    /// Where instance sockets are created (`NAME.sock`).
    #[arg(long, value_name = "DIR", default_value = "/run/wdvirt")]
    pub run_dir: PathBuf,
}

pub fn run(a: DaemonArgs, api: PathBuf) -> anyhow::Result<ExitCode> {
    let paths = DaemonPaths {
        config: a.config,
        state_dir: a.state_dir,
        run_dir: a.run_dir,
        api,
    };
    let catalog = daemon::catalog::Catalog::load(&paths.config).map_err(anyhow::Error::msg)?;
    let registry = daemon::open(&paths, catalog)?;
    daemon::run(&paths, registry, || {
        eprintln!("wdvirt: daemon ready, API at {}", paths.api.display());
    })?;
    Ok(ExitCode::SUCCESS)
}
