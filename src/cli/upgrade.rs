//! `wdvirt upgrade`: the running daemon becomes a new program without any
//! VM losing its device, and the command says how long the API was away.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::client::ApiClient;
use crate::daemon::action::{Action, UpgradeRequest, UpgradeView};

#[derive(Args, Debug)]
pub struct UpgradeArgs {
    /// The program to run (default: the daemon's own program file as it is
    /// on disk now, e.g. after a package upgrade replaced it). It must run
    /// and say it is wdvirt (`--version`), or the daemon refuses.
    #[arg(long, value_name = "PATH")]
    pub exe: Option<PathBuf>,
    /// Print JSON (for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Upgraded {
    #[serde(flatten)]
    view: UpgradeView,
    /// From the request to the new program's API answering (its instances
    /// are all taken over by then).
    api_back_ms: f64,
}

/// How long the new program may take to answer.
const PATIENCE: Duration = Duration::from_secs(20);

pub fn run(api_path: &std::path::Path, a: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(api_path);
    let started = Instant::now();
    let exe = a.exe.map(|e| std::path::absolute(&e).unwrap_or(e));
    let view: UpgradeView = api.act(&Action::Upgrade(UpgradeRequest { exe }))?;
    if !a.json {
        eprintln!(
            "wdvirt: the daemon (pid {}) is becoming {} ({}), handing over {} instances ({} with a VMM)…",
            view.pid,
            view.exe.display(),
            view.version,
            view.instances,
            view.attached
        );
    }
    // The old program's API goes away, the new one's answers once it has
    // taken every instance over.
    std::thread::sleep(Duration::from_millis(20));
    let back = loop {
        let listed: anyhow::Result<serde_json::Value> =
            api.act(&Action::ListInstances { defined: false });
        if listed.is_ok() {
            break started.elapsed();
        }
        anyhow::ensure!(
            started.elapsed() < PATIENCE,
            "the daemon's API did not come back within {PATIENCE:?} (see its log; every instance waits in the fd holder for a daemon to start)"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Upgraded {
        view,
        api_back_ms: back.as_secs_f64() * 1e3,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        eprintln!(
            "wdvirt: upgraded: pid {} runs {}; its API answered again after {:.1} ms",
            out.view.pid,
            out.view.exe.display(),
            out.api_back_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}
