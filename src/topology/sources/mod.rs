//! One reader per interface Linux offers, behind one small trait. Each reads
//! its part of the tree into the shared [`Discovery`], files a [`Problem`]
//! for every entry it cannot use, and goes on: nothing here fails as a
//! whole. Later sources may use what earlier ones found (UACCE and IDXD
//! devices take their locality from the PCI functions; the software engines
//! from the NUMA nodes), so [`discover`] runs them in a fixed order.

mod idxd;
mod numa;
mod pci;
mod soft;
mod uacce;

use std::path::Path;

pub use idxd::IdxdSource;
pub use numa::NumaSource;
pub use pci::PciSource;
pub use soft::SoftSource;
pub use uacce::UacceSource;

use super::model::{Discovery, Problem};
use super::sysfs::{ProblemKind, Sysfs};

/// A reader of one interface.
pub trait Source {
    /// Short name for problems and listings (`numa`, `uacce`, ...).
    fn name(&self) -> &'static str;
    /// Adds what it finds under `sys` to `found`.
    fn read(&self, sys: &Sysfs, found: &mut Discovery);
}

/// Every source, in the order their dependencies need.
pub fn all_sources() -> Vec<Box<dyn Source>> {
    vec![
        Box::new(NumaSource),
        Box::new(PciSource),
        Box::new(UacceSource),
        Box::new(IdxdSource),
        Box::new(SoftSource),
    ]
}

/// What placement needs: every source but the walk of all PCI functions.
/// The functions behind an accelerator are still read, on demand
/// ([`pci::function`]); the others only `wdvirt topology` shows.
pub fn placement_sources() -> Vec<Box<dyn Source>> {
    all_sources()
        .into_iter()
        .filter(|s| s.name() != PciSource.name())
        .collect()
}

/// Reads the whole tree under `root` with every source (all PCI functions
/// included).
pub fn discover(root: &Path) -> Discovery {
    discover_with(&Sysfs::new(root), &all_sources())
}

/// Reads `sys` with `sources`, in order.
pub fn discover_with(sys: &Sysfs, sources: &[Box<dyn Source>]) -> Discovery {
    let mut found = Discovery {
        root: sys.root().display().to_string(),
        ..Discovery::default()
    };
    if !sys.exists() {
        found.problems.push(Problem {
            path: sys.root().display().to_string(),
            reader: "sysfs",
            kind: ProblemKind::Missing,
        });
        return found;
    }
    for s in sources {
        s.read(sys, &mut found);
    }
    // Names identify accelerators everywhere (YAML, API, placement): a name
    // found twice (two interfaces, or a software engine named like a
    // device) keeps its first finding only.
    let mut seen = std::collections::BTreeSet::new();
    let mut dropped = Vec::new();
    found.accelerators.retain(|a| {
        let first = seen.insert(a.name.clone());
        if !first {
            dropped.push(a.clone());
        }
        first
    });
    for a in dropped {
        found.problems.push(Problem {
            path: a.path,
            reader: a.interface.backend().name(),
            kind: ProblemKind::Skipped(format!(
                "another accelerator is already named '{}'; this one is left out",
                a.name
            )),
        });
    }
    for p in &found.problems {
        tracing::debug!(reader = p.reader, "discovery: {p}");
    }
    found
}

/// A source's view while it reads: the tree and where problems go.
pub(crate) struct Ctx<'a> {
    pub sys: &'a Sysfs,
    pub found: &'a mut Discovery,
    pub source: &'static str,
}

impl Ctx<'_> {
    pub fn problem(&mut self, path: &Path, kind: ProblemKind) {
        let p = Problem {
            path: self.sys.show(path),
            reader: self.source,
            kind,
        };
        if !self.found.problems.contains(&p) {
            self.found.problems.push(p);
        }
    }

    /// An attribute that must be there: its value, or a problem filed.
    pub fn need<T>(&mut self, p: &Path, r: Result<T, ProblemKind>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(k) => {
                self.problem(p, k);
                None
            }
        }
    }

    /// An attribute that may be absent (older kernels, optional features):
    /// `None` silently when missing, a problem when present but bad.
    pub fn optional<T>(&mut self, p: &Path, r: Result<T, ProblemKind>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(ProblemKind::Missing) => None,
            Err(k) => {
                self.problem(p, k);
                None
            }
        }
    }

    /// The entries of a directory that may be absent (no such driver loaded).
    pub fn entries(&mut self, dir: &Path) -> Vec<(String, std::path::PathBuf)> {
        match self.sys.list(dir) {
            Ok((list, truncated)) => {
                if truncated {
                    self.problem(dir, ProblemKind::TooManyEntries);
                }
                list
            }
            Err(ProblemKind::Missing) => Vec::new(),
            Err(k) => {
                self.problem(dir, k);
                Vec::new()
            }
        }
    }
}

/// The NUMA node of a device: the PCI function's `numa_node`, else the one
/// node holding every CPU of its `local_cpulist`.
pub(crate) fn locality(found: &Discovery, pci: Option<&str>) -> Option<u32> {
    let f = found.pci_function(pci?)?;
    if f.numa_node.is_some() {
        return f.numa_node;
    }
    if f.local_cpus.is_empty() {
        return None;
    }
    let holders: Vec<u32> = found
        .numa
        .iter()
        .filter(|n| f.local_cpus.iter().all(|c| n.cpus.contains(c)))
        .map(|n| n.id)
        .collect();
    match holders.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// The PCI address a class or bus device sits under: its `device` link if it
/// has one, else the directory it really lives in.
pub(crate) fn parent_pci(cx: &mut Ctx, entry: &Path) -> Option<String> {
    let link = entry.join("device");
    let dir = if std::fs::symlink_metadata(&link).is_ok() {
        cx.sys
            .resolve(&link)
            .map_err(|k| cx.problem(&link, k))
            .ok()?
    } else {
        let real = cx
            .sys
            .resolve(entry)
            .map_err(|k| cx.problem(entry, k))
            .ok()?;
        real.parent()?.to_path_buf()
    };
    let name = dir.file_name()?.to_string_lossy().into_owned();
    pci::is_pci_address(&name).then_some(name)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use crate::topology::sysfs::{parse_cpulist, parse_uint};

    /// Every parser of attribute text and config space, on random and
    /// mutated input: an answer or a typed problem, never a panic.
    #[test]
    fn parsers_never_panic_on_random_input() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let seeds = [
            "0-3,8",
            "Node 0 MemTotal:  5596920 kB",
            "10 21 31",
            "0x3f03ff 0xc 0x0 0x0",
            "00000000,0000000c,00000000,003f03ff",
            "0x1f",
        ];
        for _ in 0..20_000 {
            let mut bytes: Vec<u8> = seeds[rng.random_range(0..seeds.len())].as_bytes().to_vec();
            for _ in 0..rng.random_range(0..6) {
                let at = rng.random_range(0..=bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes.insert(at, rng.random()),
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ if at < bytes.len() => {
                        bytes[at] = b"0123456789abcdefx-, \n"[rng.random_range(0..21)]
                    }
                    _ => {}
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_cpulist(&text);
            let _ = parse_uint(&text, u64::MAX, "x");
            let _ = super::numa::mem_total(&text);
            let _ = super::numa::parse_distances(&text, &[0, 1, 2]);
            let _ = super::idxd::parse_op_cap(&text);
        }
        for _ in 0..2_000 {
            let len = [0usize, 64, 256, 4096][rng.random_range(0..4)];
            let mut cfg: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if len == 4096 && rng.random_bool(0.5) {
                // A plausible first header pointing anywhere.
                let next: u32 = rng.random_range(0..0x1000);
                cfg[0x100..0x104].copy_from_slice(&(0x000f | next << 20).to_le_bytes());
            }
            let _ = super::pci::pasid_cap(&cfg);
        }
    }
}
