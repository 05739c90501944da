//! `wdvirt holder`: the process that keeps the daemon's fds across its
//! restarts (`crate::restart::holder`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::restart::holder::{DEFAULT_SOCKET, Holder};

/// `wdvirt holder`'s arguments (its help text is `Command::Holder`'s: the
/// holder keeps the daemon's fds across its restarts; the daemon starts it
/// by itself, an operator runs it by hand only to debug).
#[derive(Args, Debug)]
pub struct HolderArgs {
    /// The holder's socket (SOCK_SEQPACKET, mode 0600). A holder already
    /// answering there is refused; a dead one's socket file is replaced.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Serves until `quit` or a signal: exit 0; any failure: exit 1.
pub fn run(a: HolderArgs) -> anyhow::Result<ExitCode> {
    Holder::serve(&a.socket).with_context(|| format!("fd holder at {}", a.socket.display()))?;
    Ok(ExitCode::SUCCESS)
}
