//! wdvirt's own software engines: one software accelerator per NUMA node
//! that has usable CPUs, with one engine per usable CPU (capped), linked to
//! that node. Usable: online, in the node, and — on the running machine's
//! own `/sys` — in this process's CPU affinity (a recorded tree describes
//! another machine, whose affinity we cannot know).

use super::{Ctx, Source};
use crate::topology::model::{Detail, Discovery, FoundAccelerator, Interface};
use crate::topology::sysfs::{ProblemKind, Sysfs, parse_cpulist};

/// What each discovered software accelerator offers, as `policies/default.yaml`
/// declares its `soft0`: queue pairs and PASIDs.
const QUEUE_PAIRS: u32 = 256;
const PASIDS: u32 = 1024;

#[derive(Clone, Debug, Default)]
pub struct SoftSource;

/// This process's CPU affinity (`Cpus_allowed_list` of /proc/self/status).
fn own_affinity() -> Option<Vec<u32>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpulist(list).ok()
}

impl Source for SoftSource {
    fn name(&self) -> &'static str {
        "soft"
    }

    fn read(&self, sys: &Sysfs, found: &mut Discovery) {
        let mut cx = Ctx {
            sys,
            found,
            source: self.name(),
        };
        let affinity = if sys.is_live() { own_affinity() } else { None };
        let usable = |cpus: &[u32], online: &[u32]| -> Vec<u32> {
            cpus.iter()
                .copied()
                .filter(|c| online.is_empty() || online.contains(c))
                .filter(|c| affinity.as_ref().is_none_or(|a| a.contains(c)))
                .collect()
        };
        let online = cx.found.cpus_online.clone();
        let mut groups: Vec<(Option<u32>, Vec<u32>)> = cx
            .found
            .numa
            .iter()
            .map(|n| (Some(n.id), usable(&n.cpus, &online)))
            .filter(|(_, cpus)| !cpus.is_empty())
            .collect();
        if groups.is_empty() {
            // No NUMA nodes (a kernel without CONFIG_NUMA) or none readable:
            // one accelerator on every usable CPU, linked to no node.
            let cpus = if online.is_empty() {
                affinity.clone().unwrap_or_default()
            } else {
                usable(&online, &online)
            };
            if cpus.is_empty() {
                cx.problem(
                    &sys.path("devices/system/cpu/online"),
                    ProblemKind::Skipped(
                        "no usable CPU found; the software accelerator gets one engine".into(),
                    ),
                );
            }
            groups.push((None, cpus));
        }
        for (node, cpus) in groups {
            let name = format!("soft{}", node.unwrap_or(0));
            cx.found.accelerators.push(FoundAccelerator {
                path: node.map_or_else(
                    || "devices/system/cpu/online".to_string(),
                    |n| format!("devices/system/node/node{n}"),
                ),
                name,
                interface: Interface::Soft,
                engines: (cpus.len() as u32).clamp(1, crate::config::MAX_ENGINES),
                queue_pairs: QUEUE_PAIRS,
                ops: wdvirt_abi::ALL_OPS,
                pasids: PASIDS,
                numa_node: node,
                pci: None,
                detail: Detail::Soft { cpus },
            });
        }
    }
}
