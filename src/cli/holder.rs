//! `wdvirt holder`: the process that keeps the daemon's fds across its
//! restarts (`crate::restart::holder`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::restart::holder::{DEFAULT_SOCKET, Holder, IDLE_EXIT};

/// `wdvirt holder`'s arguments (its help text is `Command::Holder`'s: the
/// holder keeps the daemon's fds across its restarts; the daemon starts it
/// by itself, an operator runs it by hand only to debug).
#[derive(Args, Debug)]
pub struct HolderArgs {
    /// The holder's socket (SOCK_SEQPACKET, mode 0600). A holder already
    /// answering there is refused; a dead one's socket file is replaced.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Exit after this many seconds keeping nothing with nobody connected
    /// (its daemon is gone and left nothing to take over).
    #[arg(long, value_name = "SECONDS", default_value_t = IDLE_EXIT.as_secs_f64())]
    pub idle_exit: f64,
}

/// Serves until `quit` or a signal: exit 0; any failure: exit 1.
pub fn run(a: HolderArgs) -> anyhow::Result<ExitCode> {
    let idle = std::time::Duration::try_from_secs_f64(a.idle_exit)
        .with_context(|| format!("--idle-exit {}", a.idle_exit))?;
    Holder::serve_idle(&a.socket, idle)
        .with_context(|| format!("fd holder at {}", a.socket.display()))?;
    Ok(ExitCode::SUCCESS)
}
