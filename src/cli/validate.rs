//! `wdvirt validate`: check configuration files with no daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config;
use crate::topology::{self, host};

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  wdvirt validate policies/default.yaml
  wdvirt validate /etc/wdvirt/            # every *.yaml and *.yml file in it
  wdvirt validate host.yaml types.yaml    # one configuration from two files
  wdvirt validate --sysfs tests/sysfs/kunpeng920-2s tests/sysfs/types.yaml
                                          # on a recorded host, not this one

A good configuration prints, for example:
  ok: 1 accelerators, 4 types, 3 policies
A bad one prints each error with its place and exits 1:
  types.yaml:7:10: error: unknown QoS policy 'bogus' (defined: gold, bronze)
     |
   7 |     qos: bogus
     |          ^

The format is documented in docs/configuration.md; `wdvirt schema` prints
its JSON Schema.")]
pub struct ValidateArgs {
    /// YAML files, or directories whose `*.yaml`/`*.yml` files are read (not
    /// recursively). All of them are checked together as one configuration:
    /// names must be unique across files, and a type may use a policy or an
    /// accelerator defined in another file.
    #[arg(required = true, value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
    /// Print a JSON object on stdout instead: `{"ok": true, "accelerators": N,
    /// "types": N, "qos_policies": N, "numa_nodes": N, "config": {...}}`, or
    /// `{"ok": false, "errors": [{"file", "line", "column", "message",
    /// "rendered"}]}` (exit status 1).
    #[arg(long)]
    pub json: bool,
    /// The sysfs tree whose host the files are checked on (merged as the
    /// daemon merges them): `/sys`, or a recorded tree of another machine.
    #[arg(long, value_name = "DIR", default_value = topology::DEFAULT_SYSFS)]
    pub sysfs: PathBuf,
}

pub fn run(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    // On the host under --sysfs: what discovery finds, merged with the files,
    // as the daemon would see it (`daemon::catalog::load_on`).
    let on = host::load(&a.sysfs, &topology::placement_sources(), |names| {
        config::load_paths_on(&a.paths, names)
    });
    let loaded = match on {
        Err(host::LoadError::Config(e)) => Err(e),
        Err(e) => return Err(e.into()),
        // What only the host graph shows: types no placement can meet.
        Ok(on) => match crate::daemon::catalog::check_placeable(&on.cfg, &on.host) {
            Ok(_) => Ok(on.cfg),
            Err(crate::daemon::catalog::CatalogError::Config(e)) => Err(e),
            Err(other) => Err(config::ConfigErrors(vec![config::Located::at(
                config::Place {
                    file: a
                        .paths
                        .first()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    line: 0,
                    column: 0,
                },
                config::ConfigError::Topology {
                    reason: other.to_string(),
                },
            )])),
        },
    };
    match loaded {
        Ok(c) => {
            if a.json {
                let out = serde_json::json!({
                    "ok": true,
                    "accelerators": c.accelerators.len(),
                    "types": c.types.len(),
                    "qos_policies": c.qos_policies.len(),
                    "numa_nodes": c.numa_nodes.len(),
                    "config": c,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "ok: {} accelerators, {} types, {} policies",
                    c.accelerators.len(),
                    c.types.len(),
                    c.qos_policies.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            if a.json {
                let records: Vec<_> = errors.0.iter().map(|e| e.record()).collect();
                let out = serde_json::json!({ "ok": false, "errors": records });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for e in &errors.0 {
                    eprintln!("{e}\n");
                }
                let n = errors.0.len();
                eprintln!(
                    "wdvirt: {n} error{} in the configuration",
                    if n == 1 { "" } else { "s" }
                );
            }
            Ok(ExitCode::from(1))
        }
    }
}
