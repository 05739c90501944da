//! PCI functions: `/sys/bus/pci/devices/ADDR/{vendor,device,class,
//! numa_node,local_cpulist,iommu_group,config}`
//! (Documentation/ABI/testing/sysfs-bus-pci). The PASID capability is read
//! from the extended capability list of `config` (PCIe base spec 7.8.8,
//! "PASID Extended Capability Structure", ID 001Bh).

use super::{Ctx, Source};
use crate::topology::model::{Discovery, PasidCap, PciFunction};
use crate::topology::sysfs::{ProblemKind, Sysfs};

/// Extended capabilities start here (PCIe base spec 7.6.3).
const EXT_CAP_START: usize = 0x100;
const PASID_CAP_ID: u32 = 0x001b;

pub struct PciSource;

/// `DDDD:BB:DD.F` in hex.
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && [0..4, 5..7, 8..10, 11..12]
            .iter()
            .all(|r| b[r.clone()].iter().all(u8::is_ascii_hexdigit))
}

impl Source for PciSource {
    fn name(&self) -> &'static str {
        "pci"
    }

    fn read(&self, sys: &Sysfs, found: &mut Discovery) {
        let mut cx = Ctx {
            sys,
            found,
            source: self.name(),
        };
        for (name, path) in cx.entries(&sys.path("bus/pci/devices")) {
            if !is_pci_address(&name) {
                cx.problem(
                    &path,
                    ProblemKind::Garbage {
                        expected: "a PCI address DDDD:BB:DD.F",
                        found: name,
                    },
                );
                continue;
            }
            if cx.found.pci_function(&name).is_some() {
                continue; // read already, for an accelerator
            }
            if let Some(f) = read_function(&mut cx, name, &path) {
                cx.found.pci.push(f);
            }
        }
    }
}

/// The PCI function at `address` read into `cx.found.pci`, unless it is
/// there already: the functions behind accelerators are read on demand, so
/// placement never walks every function of the host. An address with no
/// `bus/pci/devices` entry is left unread, silently (a device that is not on
/// PCI).
pub(crate) fn ensure(cx: &mut Ctx, address: &str) {
    if cx.found.pci_function(address).is_some() {
        return;
    }
    let path = cx.sys.path("bus/pci/devices").join(address);
    if std::fs::symlink_metadata(&path).is_err() {
        return;
    }
    let mut pcx = Ctx {
        sys: cx.sys,
        found: &mut *cx.found,
        source: "pci",
    };
    if let Some(f) = read_function(&mut pcx, address.to_string(), &path) {
        cx.found.pci.push(f);
    }
}

/// One function's attributes and the PASID capability of its config space.
fn read_function(cx: &mut Ctx, name: String, path: &std::path::Path) -> Option<PciFunction> {
    let sys = cx.sys;
    if let Err(k) = sys.resolve(path) {
        cx.problem(path, k);
        return None;
    }
    let hex16 = |cx: &mut Ctx, attr: &str| {
        let p = path.join(attr);
        cx.optional(&p, sys.read_uint(&p, 0xffff, "a 16-bit hex id"))
            .map(|v| v as u16)
    };
    let vendor = hex16(cx, "vendor");
    let device = hex16(cx, "device");
    let p = path.join("class");
    let class = cx
        .optional(&p, sys.read_uint(&p, 0xff_ffff, "a 24-bit class code"))
        .map(|v| v as u32);
    let p = path.join("numa_node");
    let numa_node = match cx.optional(&p, sys.read_int(&p)) {
        Some(-1) | None => None,
        Some(n) if (0..=i64::from(crate::config::MAX_NODE)).contains(&n) => Some(n as u32),
        Some(n) => {
            cx.problem(
                &p,
                ProblemKind::OutOfRange {
                    value: n.to_string(),
                    expected: "-1 or a node id 0..=1023 (config::MAX_NODE)",
                },
            );
            None
        }
    };
    let p = path.join("local_cpulist");
    let local_cpus = cx.optional(&p, sys.read_cpulist(&p)).unwrap_or_default();
    let p = path.join("iommu_group");
    let iommu_group = if std::fs::symlink_metadata(&p).is_ok() {
        cx.need(&p, sys.link_name(&p))
            .and_then(|n| match n.parse() {
                Ok(g) => Some(g),
                Err(_) => {
                    cx.problem(
                        &p,
                        ProblemKind::Garbage {
                            expected: "a link to kernel/iommu_groups/N",
                            found: n,
                        },
                    );
                    None
                }
            })
    } else {
        None
    };
    let p = path.join("config");
    let pasid = match sys.read_bytes(&p, 4096) {
        Ok(bytes) => match pasid_cap(&bytes) {
            Ok(c) => c,
            Err(why) => {
                cx.problem(&p, ProblemKind::Skipped(why));
                PasidCap::Unknown
            }
        },
        Err(ProblemKind::Missing) => PasidCap::Unknown,
        Err(k) => {
            cx.problem(&p, k);
            PasidCap::Unknown
        }
    };
    Some(PciFunction {
        address: name,
        vendor,
        device,
        class,
        numa_node,
        local_cpus,
        iommu_group,
        pasid,
    })
}

/// Walks the extended capability list of a config space image for the
/// PASID capability. Shorter than 4 KiB (an unprivileged reader of the real
/// `/sys` gets 64 bytes) means unknown.
pub fn pasid_cap(config: &[u8]) -> Result<PasidCap, String> {
    if config.len() < 4096 {
        return Ok(PasidCap::Unknown);
    }
    let dword = |at: usize| {
        u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]])
    };
    let mut at = EXT_CAP_START;
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let header = dword(at);
        // No extended capability at all reads as 0 (or all ones).
        if header == 0 || header == u32::MAX {
            return Ok(PasidCap::Absent);
        }
        if header & 0xffff == PASID_CAP_ID {
            // PASID Capability register: bit 1 execute, bit 2 privileged
            // mode, bits 12:8 max PASID width.
            let cap = u16::from_le_bytes([config[at + 4], config[at + 5]]);
            return Ok(PasidCap::Present {
                max_width: ((cap >> 8) & 0x1f) as u8,
                execute: cap & 0x2 != 0,
                privileged: cap & 0x4 != 0,
            });
        }
        let next = (header >> 20) as usize;
        if next == 0 {
            return Ok(PasidCap::Absent);
        }
        if next < EXT_CAP_START || next & 3 != 0 || next + 8 > config.len() || !seen.insert(next) {
            return Err(format!(
                "extended capability list broken at {at:#x} (next {next:#x}); PASID support unknown"
            ));
        }
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_caps(caps: &[(usize, u32, u32, u16)]) -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        for &(at, id, next, reg) in caps {
            let h = id | 1 << 16 | next << 20;
            c[at..at + 4].copy_from_slice(&h.to_le_bytes());
            c[at + 4..at + 6].copy_from_slice(&reg.to_le_bytes());
        }
        c
    }

    #[test]
    fn the_pasid_capability_is_found_down_the_list() {
        let c = with_caps(&[(0x100, 0x0001, 0x150, 0), (0x150, 0x001b, 0, 0x1400)]);
        assert_eq!(
            pasid_cap(&c),
            Ok(PasidCap::Present {
                max_width: 20,
                execute: false,
                privileged: false
            })
        );
        assert_eq!(pasid_cap(&c).unwrap().capacity(), Some((1 << 20) - 1));
        let c = with_caps(&[(0x100, 0x0001, 0, 0)]);
        assert_eq!(pasid_cap(&c), Ok(PasidCap::Absent));
        assert_eq!(pasid_cap(&[0u8; 64]), Ok(PasidCap::Unknown));
        // A list that loops back on itself, or points below 0x100.
        let c = with_caps(&[(0x100, 0x0001, 0x150, 0), (0x150, 0x000f, 0x150, 0)]);
        assert!(pasid_cap(&c).unwrap_err().contains("broken at 0x150"));
        let c = with_caps(&[(0x100, 0x0001, 0x40, 0)]);
        assert!(pasid_cap(&c).is_err());
    }

    #[test]
    fn addresses_are_checked() {
        assert!(is_pci_address("0000:75:00.0"));
        assert!(!is_pci_address("0000:75:00"));
        assert!(!is_pci_address("../../etc/x.y"));
    }
}
