//! UACCE devices: `/sys/class/uacce/NAME/{api,flags,available_instances,
//! algorithms,region_mmio_size,region_dus_size,isolate,isolate_strategy}`
//! (Documentation/ABI/testing/sysfs-driver-uacce; `isolate*` since 6.1) and
//! the parent PCI function for locality. HiSilicon's QM names a device
//! `DRIVER-ID` (`hisi_zip-0`, `hisi_sec2-1`) and lists one algorithm per line
//! (`zlib`, `gzip`, `deflate`, `lz77_zstd`; `cipher`, `digest`, `aead`).

use wdvirt_abi::Opcode;

use super::{Ctx, Source, locality, parent_pci};
use crate::config::accelerator_name_ok;
use crate::partition::{MAX_QUEUE_PAIRS, PASID_MAX};
use crate::topology::model::{Detail, Discovery, FoundAccelerator, Interface};
use crate::topology::sysfs::{ProblemKind, Sysfs, clip};

/// `UACCE_DEV_SVA` (include/uapi/misc/uacce/uacce.h): shared virtual
/// addressing, i.e. the device tags each queue with its process's PASID.
pub const UACCE_DEV_SVA: u32 = 0x1;

pub struct UacceSource;

/// wdvirt operations an algorithm name stands for (names not listed run
/// nothing wdvirt offers).
pub fn algorithm_ops(alg: &str) -> u32 {
    use Opcode::*;
    match alg {
        "zlib" => ZlibCompress.bit() | ZlibDecompress.bit(),
        "gzip" => GzipCompress.bit() | GzipDecompress.bit(),
        "deflate" => DeflateCompress.bit() | DeflateDecompress.bit(),
        // SEC's digest engine includes SHA-256.
        "digest" => Sha256.bit(),
        _ => 0,
    }
}

impl Source for UacceSource {
    fn name(&self) -> &'static str {
        "uacce"
    }

    fn read(&self, sys: &Sysfs, found: &mut Discovery) {
        let mut cx = Ctx {
            sys,
            found,
            source: self.name(),
        };
        for (name, path) in cx.entries(&sys.path("class/uacce")) {
            if let Some(a) = read_device(&mut cx, &name, &path) {
                cx.found.accelerators.push(a);
            }
        }
    }
}

fn read_device(cx: &mut Ctx, name: &str, path: &std::path::Path) -> Option<FoundAccelerator> {
    if !accelerator_name_ok(name) {
        cx.problem(
            path,
            ProblemKind::Skipped(format!(
                "{:?} cannot name an accelerator (1-63 of A-Z a-z 0-9 . _ -)",
                clip(name)
            )),
        );
        return None;
    }
    if let Err(k) = cx.sys.resolve(path) {
        cx.problem(path, k);
        return None;
    }
    let sys = cx.sys;
    let attr = |a: &str| path.join(a);
    let api = cx.need(&attr("api"), sys.read_text(&attr("api")))?;
    let flags = cx.need(
        &attr("flags"),
        sys.read_uint(&attr("flags"), u64::from(u32::MAX), "a flags word"),
    )? as u32;
    let available = cx.need(
        &attr("available_instances"),
        sys.read_uint(
            &attr("available_instances"),
            u64::from(MAX_QUEUE_PAIRS),
            "a queue count 0..=65536",
        ),
    )? as u32;
    let algorithms: Vec<String> = cx
        .need(&attr("algorithms"), sys.read_text(&attr("algorithms")))?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let size = |cx: &mut Ctx, a: &str| {
        cx.optional(
            &attr(a),
            sys.read_uint(&attr(a), 1 << 40, "a size in bytes"),
        )
    };
    let region_mmio_size = size(cx, "region_mmio_size");
    let region_dus_size = size(cx, "region_dus_size");
    let isolate = cx
        .optional(
            &attr("isolate"),
            sys.read_uint(&attr("isolate"), 1, "0 or 1"),
        )
        .map(|v| v == 1);
    let isolate_strategy = cx
        .optional(
            &attr("isolate_strategy"),
            sys.read_uint(&attr("isolate_strategy"), 65535, "0..=65535"),
        )
        .map(|v| v as u32);
    let pci = parent_pci(cx, path);
    let ops = algorithms.iter().fold(0, |m, a| m | algorithm_ops(a));
    let skip = |cx: &mut Ctx, why: String| {
        cx.problem(path, ProblemKind::Skipped(why));
        None::<FoundAccelerator>
    };
    if ops == 0 {
        return skip(
            cx,
            format!(
                "runs none of wdvirt's operations (algorithms: {})",
                if algorithms.is_empty() {
                    "none".to_string()
                } else {
                    algorithms.join(", ")
                }
            ),
        );
    }
    if isolate == Some(true) {
        return skip(
            cx,
            "isolated by the kernel after repeated hardware errors (isolate = 1)".into(),
        );
    }
    if available == 0 {
        return skip(cx, "no free queue (available_instances = 0)".into());
    }
    if let Some(a) = &pci {
        super::pci::ensure(cx, a);
    }
    let pasid_cap = pci
        .as_deref()
        .and_then(|a| cx.found.pci_function(a))
        .and_then(|f| f.pasid.capacity());
    // With SVA every queue is bound to its process's PASID; without it the
    // device shares one address space, so it can hold one instance.
    let pasids = if flags & UACCE_DEV_SVA != 0 {
        pasid_cap.filter(|&c| c > 0).unwrap_or(PASID_MAX)
    } else {
        1
    };
    let numa_node = locality(cx.found, pci.as_deref());
    Some(FoundAccelerator {
        name: name.to_string(),
        interface: Interface::Uacce,
        path: cx.sys.show(path),
        engines: 1,
        queue_pairs: available,
        ops,
        pasids,
        numa_node,
        pci,
        detail: Detail::Uacce {
            api,
            flags,
            algorithms,
            available_instances: available,
            region_mmio_size,
            region_dus_size,
            isolate,
            isolate_strategy,
        },
    })
}
