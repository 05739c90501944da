//! `wdvirt demo` (placeholder until the guest driver lands).
use clap::Args;
use std::process::ExitCode;
#[derive(Args, Debug)]
pub struct DemoArgs {}
pub fn run(_a: DemoArgs) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
