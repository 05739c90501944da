//! What an operator installs beside the binary, generated from the clap
//! definitions the binary itself parses with: shell completions and man
//! pages (`wdvirt.1` and one `wdvirt-SUBCOMMAND.1` each).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    ///
    /// Example: wdvirt completions bash > /usr/share/bash-completion/completions/wdvirt
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Directory to write the pages into (created if missing).
    ///
    /// Example: wdvirt man /usr/local/share/man/man1
    pub dir: PathBuf,
}

pub fn completions(a: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "wdvirt", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub fn man(a: ManArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let cmd = super::Cli::command();
    clap_mangen::generate_to(cmd, &a.dir)
        .with_context(|| format!("cannot write man pages into {}", a.dir.display()))?;
    eprintln!("wdvirt: man pages written to {}", a.dir.display());
    Ok(ExitCode::SUCCESS)
}
