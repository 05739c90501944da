//! IDXD devices and work queues: `/sys/bus/dsa/devices/{dsaN,iaxN}` and
//! `wqN.M` (Documentation/ABI/stable/sysfs-driver-dma-idxd). A device's
//! `op_cap` says which opcodes it runs; a work queue is a queue an instance
//! can be given when its `type` is `user` and its `state` is `enabled`.

use wdvirt_abi::Opcode;

use super::{Ctx, Source, locality, parent_pci};
use crate::partition::PASID_MAX;
use crate::topology::model::{Detail, Discovery, FoundAccelerator, Interface, WorkQueue};
use crate::topology::sysfs::{ProblemKind, Sysfs, clip};

pub struct IdxdSource;

/// `op_cap` as 256 bits, word 0 = opcodes 0..63. Two formats exist: four
/// `%#llx` words, lowest first, separated by spaces (5.13 to 6.0), and a
/// `%*pb` bitmap, comma-separated 32-bit hex groups, highest first (6.1+).
pub fn parse_op_cap(text: &str) -> Result<[u64; 4], ProblemKind> {
    let bad = || ProblemKind::Garbage {
        expected: "an op_cap bitmap",
        found: clip(text),
    };
    let mut words = [0u64; 4];
    let t = text.trim();
    if t.contains("0x") {
        let parts: Vec<&str> = t.split_whitespace().collect();
        if parts.is_empty() || parts.len() > 4 {
            return Err(bad());
        }
        for (w, p) in words.iter_mut().zip(parts) {
            let hex = p.strip_prefix("0x").ok_or_else(bad)?;
            *w = u64::from_str_radix(hex, 16).map_err(|_| bad())?;
        }
    } else {
        let groups: Vec<&str> = t.split(',').collect();
        if groups.is_empty() || groups.len() > 8 {
            return Err(bad());
        }
        for (i, g) in groups.iter().rev().enumerate() {
            if g.is_empty() || g.len() > 8 {
                return Err(bad());
            }
            let v = u64::from(u32::from_str_radix(g, 16).map_err(|_| bad())?);
            words[i / 2] |= v << (32 * (i % 2));
        }
    }
    Ok(words)
}

fn has(words: &[u64; 4], opcode: u32) -> bool {
    words[(opcode / 64) as usize] & (1 << (opcode % 64)) != 0
}

/// wdvirt operations a device of `device_type` runs, from its opcodes
/// (DSA spec 1.2 §8.3: 0x03 memory move, 0x04 fill, 0x05 compare, 0x10 CRC
/// generation (CRC-32C); IAA spec §8: 0x42 decompress, 0x43 compress).
pub fn idxd_ops(device_type: &str, words: &[u64; 4]) -> u32 {
    use Opcode::*;
    let table: &[(u32, Opcode)] = match device_type {
        "dsa" => &[(0x03, Copy), (0x04, Fill), (0x05, Compare), (0x10, Crc32c)],
        "iax" => &[(0x42, DeflateDecompress), (0x43, DeflateCompress)],
        _ => &[],
    };
    table
        .iter()
        .filter(|(code, _)| has(words, *code))
        .fold(0, |m, (_, op)| m | op.bit())
}

impl Source for IdxdSource {
    fn name(&self) -> &'static str {
        "idxd"
    }

    fn read(&self, sys: &Sysfs, found: &mut Discovery) {
        let mut cx = Ctx {
            sys,
            found,
            source: self.name(),
        };
        let entries = cx.entries(&sys.path("bus/dsa/devices"));
        for (name, path) in &entries {
            let (device_type, id) = match device_name(name) {
                Some(x) => x,
                None => continue, // wqN.M, engineN.M, groupN.M: read per device
            };
            let wqs: Vec<&(String, std::path::PathBuf)> = entries
                .iter()
                .filter(|(n, _)| {
                    n.strip_prefix("wq")
                        .and_then(|r| r.split_once('.'))
                        .is_some_and(|(dev, _)| dev == id.to_string())
                })
                .collect();
            if let Some(a) = read_device(&mut cx, name, path, device_type, &wqs) {
                cx.found.accelerators.push(a);
            }
        }
    }
}

/// `dsa3` → ("dsa", 3); `iax1` → ("iax", 1).
fn device_name(name: &str) -> Option<(&'static str, u32)> {
    for t in ["dsa", "iax"] {
        if let Some(d) = name.strip_prefix(t)
            && !d.is_empty()
            && d.bytes().all(|b| b.is_ascii_digit())
        {
            return d.parse().ok().map(|id| (t, id));
        }
    }
    None
}

fn read_device(
    cx: &mut Ctx,
    name: &str,
    path: &std::path::Path,
    device_type: &'static str,
    wqs: &[&(String, std::path::PathBuf)],
) -> Option<FoundAccelerator> {
    if let Err(k) = cx.sys.resolve(path) {
        cx.problem(path, k);
        return None;
    }
    let sys = cx.sys;
    let attr = |a: &str| path.join(a);
    let state = cx.need(&attr("state"), sys.read_text(&attr("state")))?;
    let skip = |cx: &mut Ctx, why: String| {
        cx.problem(path, ProblemKind::Skipped(why));
        None::<FoundAccelerator>
    };
    // A disabled device is skipped before its work queues are read.
    if state != "enabled" {
        return skip(cx, format!("device state is {state:?}, not enabled"));
    }
    let op_cap_text = cx.need(&attr("op_cap"), sys.read_text(&attr("op_cap")))?;
    let words = cx.need(&attr("op_cap"), parse_op_cap(&op_cap_text))?;
    let small = |cx: &mut Ctx, a: &str| {
        cx.optional(&attr(a), sys.read_uint(&attr(a), 4096, "0..=4096"))
            .map(|v| v as u32)
    };
    let max_engines = small(cx, "max_engines");
    let max_work_queues = small(cx, "max_work_queues");
    let pasid_enabled = cx
        .optional(
            &attr("pasid_enabled"),
            sys.read_uint(&attr("pasid_enabled"), 1, "0 or 1"),
        )
        .is_some_and(|v| v == 1);
    let version = cx.optional(&attr("version"), sys.read_text(&attr("version")));
    let ops = idxd_ops(device_type, &words);
    if ops == 0 {
        return skip(cx, "runs none of wdvirt's operations (op_cap)".into());
    }
    let mut work_queues = Vec::new();
    for (wq_name, wq_path) in wqs {
        let a = |x: &str| wq_path.join(x);
        let text = |cx: &mut Ctx, x: &str| cx.need(&a(x), sys.read_text(&a(x)));
        let (Some(kind), Some(mode), Some(wq_state)) =
            (text(cx, "type"), text(cx, "mode"), text(cx, "state"))
        else {
            continue;
        };
        let Some(size) = cx.need(&a("size"), sys.read_uint(&a("size"), 65536, "0..=65536")) else {
            continue;
        };
        let group_id = cx.optional(&a("group_id"), sys.read_int(&a("group_id")));
        work_queues.push(WorkQueue {
            name: wq_name.clone(),
            kind,
            mode,
            state: wq_state,
            size: size as u32,
            group_id,
        });
    }
    let pci = parent_pci(cx, path);
    let usable = work_queues.iter().filter(|w| w.usable()).count() as u32;
    if usable == 0 {
        return skip(
            cx,
            "no enabled user work queue (configure one with accel-config)".into(),
        );
    }
    if let Some(a) = &pci {
        super::pci::ensure(cx, a);
    }
    let pasids = if pasid_enabled {
        pci.as_deref()
            .and_then(|a| cx.found.pci_function(a))
            .and_then(|f| f.pasid.capacity())
            .filter(|&c| c > 0)
            .unwrap_or(PASID_MAX)
    } else {
        1
    };
    let numa_node = locality(cx.found, pci.as_deref()).or_else(|| {
        let p = attr("numa_node");
        match sys.read_int(&p) {
            Ok(n) if (0..=i64::from(crate::config::MAX_NODE)).contains(&n) => Some(n as u32),
            _ => None,
        }
    });
    Some(FoundAccelerator {
        name: name.to_string(),
        interface: Interface::Idxd,
        path: cx.sys.show(path),
        engines: max_engines
            .unwrap_or(1)
            .clamp(1, crate::config::MAX_ENGINES),
        queue_pairs: usable,
        ops,
        pasids,
        numa_node,
        pci,
        detail: Detail::Idxd {
            device_type: device_type.to_string(),
            version,
            state,
            max_engines,
            max_work_queues,
            pasid_enabled,
            op_cap: op_cap_text,
            work_queues,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_op_cap_formats_give_the_same_bits() {
        let old = parse_op_cap("0x3f03ff 0xc 0x0 0x0").unwrap();
        let new =
            parse_op_cap("00000000,00000000,00000000,00000000,00000000,0000000c,00000000,003f03ff")
                .unwrap();
        assert_eq!(old, new);
        assert!(has(&old, 0x03) && has(&old, 0x10) && has(&old, 0x42) && has(&old, 0x43));
        assert_eq!(
            idxd_ops("dsa", &old),
            Opcode::Copy.bit() | Opcode::Fill.bit() | Opcode::Compare.bit() | Opcode::Crc32c.bit()
        );
        assert_eq!(
            idxd_ops("iax", &old),
            Opcode::DeflateCompress.bit() | Opcode::DeflateDecompress.bit()
        );
        assert!(parse_op_cap("zz").is_err());
        assert!(parse_op_cap("0x1 0x2 0x3 0x4 0x5").is_err());
        assert!(parse_op_cap(",,,,,,,,,").is_err());
        assert_eq!(device_name("dsa12"), Some(("dsa", 12)));
        assert_eq!(device_name("wq0.1"), None);
    }
}
