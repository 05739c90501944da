//! `wdvirt schema`: the configuration's JSON Schema, for editors.

use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  wdvirt schema > wdvirt.schema.json
  # then, for editors using yaml-language-server, first line of a config file:
  # yaml-language-server: $schema=./wdvirt.schema.json

The schema states every key, its type and its range; unknown keys are
refused. Checks across entries (unique names, QoS policies and accelerators
that exist, types some accelerator can host) are made by `wdvirt validate`.")]
pub struct SchemaArgs {}

pub fn run(_: SchemaArgs) -> anyhow::Result<ExitCode> {
    println!(
        "{}",
        serde_json::to_string_pretty(&crate::config::schema())?
    );
    Ok(ExitCode::SUCCESS)
}
