//! The configuration layer: YAML files describing the host's accelerators and
//! NUMA graph, QoS policies and instance types, parsed with spans and validated
//! into a plain [`Config`]. Every error names `file:line:column`, shows the line
//! with a caret and says what was expected ([`ConfigErrors`]).
//!
//! Neighbours: `cli` (validate, schema) and `daemon` read it; `partition`
//! places instances of its types on its accelerators. It knows nothing of
//! them: it only reads files. `docs/configuration.md` is the format's manual.

mod error;
mod model;
mod raw;
mod types;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use error::{ConfigError, ConfigErrors, ErrorRecord, Located, Note, Place};
pub use model::{
    Accelerator, Backend, Config, DaemonSettings, Endpoint, Function, InstanceType, Link, NumaNode,
    Placement, QosPolicy, RateLimit, ops_names,
};
pub use validate::{
    HostNames, MAX_CPU, MAX_ENGINES, MAX_NODE, accelerator_name_ok, node_ref, parse_cpu_list,
    valid_name,
};

use validate::{Parsed, line_of};

/// The example configuration shipped in `policies/default.yaml`: one software
/// accelerator and a few types, usable on any Linux machine.
pub const DEFAULT_YAML: &str = include_str!("../../policies/default.yaml");

/// Files bigger than this are refused before parsing (a config is a few KiB).
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// Whether `s` has the shape of a Linux user or group name (or a number):
/// 1 to 32 of `[A-Za-z0-9._-]`, not starting with `-`. Whether it exists
/// is a question for the daemon's host (`daemon::access`). The one rule
/// for `daemon:`'s accounts and a libvirt domain's DAC label.
pub fn is_account_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// [`DEFAULT_YAML`], validated.
pub fn embedded_default() -> Result<Config, ConfigErrors> {
    load_str("policies/default.yaml", DEFAULT_YAML)
}

/// Parse and validate one document; `name` is what errors call the file.
pub fn load_str(name: &str, text: &str) -> Result<Config, ConfigErrors> {
    load_str_on(name, text, &HostNames::default())
}

/// As [`load_str`], on a host where discovery found `host`'s names.
pub fn load_str_on(name: &str, text: &str, host: &HostNames) -> Result<Config, ConfigErrors> {
    let parsed = parse(name, text).map_err(|e| ConfigErrors(vec![*e]))?;
    validate::validate(&[parsed], host).map_err(ConfigErrors)
}

/// Load files and directories (each directory's `*.yaml` and `*.yml` files,
/// not recursing, in name order) as one configuration: their sections are
/// concatenated, then validated together, so names must be unique across
/// files and a type may name a policy from another file. Every file is parsed
/// even after one fails, and every error found is returned.
pub fn load_paths(paths: &[PathBuf]) -> Result<Config, ConfigErrors> {
    load_paths_on(paths, &HostNames::default())
}

/// As [`load_paths`], on a host where discovery found `host`'s names: the
/// files may name those accelerators and NUMA nodes without declaring them.
pub fn load_paths_on(paths: &[PathBuf], host: &HostNames) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for p in expand(paths, &mut errors) {
        let name = p.display().to_string();
        match read(&p) {
            Ok(text) => match parse(&name, &text) {
                Ok(f) => files.push(f),
                Err(e) => errors.push(*e),
            },
            Err(e) => errors.push(whole(&name, ConfigError::Io(e))),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    validate::validate(&files, host).map_err(ConfigErrors)
}

/// The JSON Schema of a configuration file (draft 2020-12), for editors.
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(raw::RawFile)).unwrap_or_default()
}

fn whole(name: &str, error: ConfigError) -> Located {
    Located {
        place: Place {
            file: name.to_string(),
            line: 0,
            column: 0,
        },
        source_line: String::new(),
        error,
        note: None,
    }
}

fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// Files named directly, and the YAML files of directories named.
fn expand(paths: &[PathBuf], errors: &mut Vec<Located>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        let name = p.display().to_string();
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let entries = match std::fs::read_dir(p) {
            Ok(e) => e,
            Err(e) => {
                errors.push(whole(&name, ConfigError::Io(e.to_string())));
                continue;
            }
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| is_yaml(f) && f.is_file())
            .collect();
        if found.is_empty() {
            errors.push(whole(
                &name,
                ConfigError::EmptyDirectory { path: p.clone() },
            ));
        }
        found.sort();
        out.extend(found);
    }
    out
}

fn read(p: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(p).map_err(|e| e.to_string())?;
    let mut text = String::new();
    // Read one byte past the cap to tell "at the cap" from "over it".
    let n = f
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if n as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "larger than {} MiB: not a configuration file",
            MAX_FILE_BYTES >> 20
        ));
    }
    Ok(text)
}

fn parse(name: &str, text: &str) -> Result<Parsed, Box<Located>> {
    let mut opts = serde_saphyr::Options::default();
    // We render our own snippet, uniform with the semantic errors.
    opts.with_snippet = false;
    match serde_saphyr::from_str_with_options::<Option<raw::RawFile>>(text, opts) {
        Ok(raw) => Ok(Parsed {
            name: name.to_string(),
            text: text.to_string(),
            raw: raw.unwrap_or_default(),
        }),
        Err(e) => {
            use serde_saphyr::MessageFormatter;
            let msg = serde_saphyr::UserMessageFormatter.format_message(e.without_snippet());
            let (line, column) = e
                .location()
                .map_or((0, 0), |l| (l.line() as u32, l.column() as u32));
            Err(Box::new(Located {
                place: Place {
                    file: name.to_string(),
                    line,
                    column,
                },
                source_line: line_of(text, line),
                error: ConfigError::Yaml(explain(&msg)),
                note: None,
            }))
        }
    }
}

/// The parser's terse messages, said with what was expected.
fn explain(msg: &str) -> String {
    let m = error::printable(msg);
    match m.as_str() {
        "invalid u32" => "expected a whole number from 0 to 4294967295".into(),
        "invalid u64" => "expected a whole number from 0 to 18446744073709551615".into(),
        "expected sequence start" => "expected a list (`- item` lines or `[a, b]`)".into(),
        "expected mapping start" => {
            "expected a mapping (`key: value` lines or `{key: value}`)".into()
        }
        "expected string scalar" => "expected a string".into(),
        _ => m,
    }
}
