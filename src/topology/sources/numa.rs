//! NUMA nodes: `/sys/devices/system/node/nodeN/{cpulist,meminfo,distance}`
//! (Documentation/ABI/stable/sysfs-devices-node), the online CPUs
//! (`devices/system/cpu/online`) and the generic initiators
//! (`has_generic_initiator`).

use std::collections::BTreeMap;
use std::path::Path;

use super::{Ctx, Source};
use crate::topology::model::{Discovery, NumaInfo};
use crate::topology::sysfs::{ProblemKind, Sysfs, clip};

use crate::config::MAX_NODE;

pub struct NumaSource;

impl Source for NumaSource {
    fn name(&self) -> &'static str {
        "numa"
    }

    fn read(&self, sys: &Sysfs, found: &mut Discovery) {
        let mut cx = Ctx {
            sys,
            found,
            source: self.name(),
        };
        let online = sys.path("devices/system/cpu/online");
        if let Some(cpus) = cx.need(&online, sys.read_cpulist(&online)) {
            cx.found.cpus_online = cpus;
        }
        let dir = sys.path("devices/system/node");
        let gi_path = dir.join("has_generic_initiator");
        let gi = cx
            .optional(&gi_path, sys.read_cpulist(&gi_path))
            .unwrap_or_default();
        let mut ids = Vec::new();
        for (name, path) in cx.entries(&dir) {
            let Some(digits) = name.strip_prefix("node") else {
                continue;
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            match digits.parse::<u32>() {
                Ok(id) if id <= MAX_NODE => ids.push((id, path)),
                _ => cx.problem(
                    &path,
                    ProblemKind::OutOfRange {
                        value: clip(digits),
                        expected: "a node id 0..=1023",
                    },
                ),
            }
        }
        ids.sort();
        // The `distance` row lists every online node, in id order
        // (drivers/base/node.c: for_each_online_node); without `online`,
        // the node directories stand for it.
        let online_path = dir.join("online");
        let order: Vec<u32> = match cx.optional(&online_path, sys.read_cpulist(&online_path)) {
            Some(list) if !list.is_empty() => list,
            _ => ids.iter().map(|(id, _)| *id).collect(),
        };
        for (id, path) in ids {
            if let Some(n) = read_node(&mut cx, id, &path, &order, &gi) {
                cx.found.numa.push(n);
            }
        }
        check_cpus_in_one_node(&mut cx, &dir);
    }
}

fn read_node(cx: &mut Ctx, id: u32, dir: &Path, order: &[u32], gi: &[u32]) -> Option<NumaInfo> {
    let cpulist = dir.join("cpulist");
    // Without its CPUs a node cannot be placed near: skip it whole.
    let cpus = cx.need(&cpulist, cx.sys.read_cpulist(&cpulist))?;
    let meminfo = dir.join("meminfo");
    let memory_kib =
        cx.optional(&meminfo, cx.sys.read_text(&meminfo))
            .and_then(|t| match mem_total(&t) {
                Ok(v) => Some(v),
                Err(k) => {
                    cx.problem(&meminfo, k);
                    None
                }
            });
    let dpath = dir.join("distance");
    let mut distances = BTreeMap::new();
    if let Some(text) = cx.optional(&dpath, cx.sys.read_text(&dpath)) {
        match parse_distances(&text, order) {
            Ok(d) => distances = d,
            Err(k) => cx.problem(&dpath, k),
        }
    }
    Some(NumaInfo {
        id,
        cpus,
        memory_kib,
        distances,
        generic_initiator: gi.contains(&id),
    })
}

/// `Node 0 MemTotal:  5596920 kB` → 5596920.
pub(super) fn mem_total(text: &str) -> Result<u64, ProblemKind> {
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("Node"), Some(_), Some("MemTotal:"), Some(v)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            return v.parse::<u64>().map_err(|_| ProblemKind::Garbage {
                expected: "MemTotal in kB",
                found: clip(v),
            });
        }
    }
    Err(ProblemKind::Garbage {
        expected: "a `Node N MemTotal: X kB` line",
        found: clip(text.lines().next().unwrap_or("")),
    })
}

/// One SLIT row: a distance 1..=255 per node of `order`.
pub(super) fn parse_distances(
    text: &str,
    order: &[u32],
) -> Result<BTreeMap<u32, u32>, ProblemKind> {
    let values: Vec<&str> = text.split_whitespace().collect();
    if values.len() != order.len() {
        return Err(ProblemKind::Garbage {
            expected: "one distance per node",
            found: format!("{} values for {} nodes", values.len(), order.len()),
        });
    }
    let mut out = BTreeMap::new();
    for (v, &to) in values.iter().zip(order) {
        let d = crate::topology::sysfs::parse_uint(v, 255, "a distance 1..=255")?;
        if d == 0 {
            return Err(ProblemKind::OutOfRange {
                value: "0".into(),
                expected: "a distance 1..=255",
            });
        }
        out.insert(to, d as u32);
    }
    Ok(out)
}

/// A CPU listed by two nodes is a broken tree: keep it in the first only.
fn check_cpus_in_one_node(cx: &mut Ctx, dir: &Path) {
    let mut owner: BTreeMap<u32, u32> = BTreeMap::new();
    let mut clashes = Vec::new();
    for n in &mut cx.found.numa {
        n.cpus.retain(|&c| match owner.get(&c) {
            Some(&first) => {
                clashes.push((n.id, c, first));
                false
            }
            None => {
                owner.insert(c, n.id);
                true
            }
        });
    }
    for (id, cpu, first) in clashes {
        cx.problem(
            &dir.join(format!("node{id}/cpulist")),
            ProblemKind::Skipped(format!(
                "CPU {cpu} is already in node{first}; left out of node{id}"
            )),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_distance_rows_parse_or_say_why_not() {
        assert_eq!(
            mem_total("Node 2 MemTotal:       16777216 kB\nNode 2 MemFree: 1 kB"),
            Ok(16777216)
        );
        assert!(mem_total("garbage").is_err());
        let d = parse_distances("10 21", &[0, 1]).unwrap();
        assert_eq!(d[&1], 21);
        assert!(parse_distances("10", &[0, 1]).is_err());
        assert!(parse_distances("10 0", &[0, 1]).is_err());
        assert!(parse_distances("10 999", &[0, 1]).is_err());
    }
}
