//! `wdvirt demo` (placeholder until the guest driver lands).
use std::process::ExitCode;
use clap::Args;
#[derive(Args, Debug)]
pub struct DemoArgs {}
pub fn run(_a: DemoArgs) -> anyhow::Result<ExitCode> { Ok(ExitCode::SUCCESS) }
