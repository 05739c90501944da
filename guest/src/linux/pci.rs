//! Finding the device in sysfs and turning on memory space and bus master.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use wdvirt_abi::pci;

use super::LinuxError;

pub const SYSFS_PCI: &str = "/sys/bus/pci/devices";

/// PCI command register (PCI Local Bus 3.0, 6.2.2): bit 1 memory space, bit 2 bus master.
pub const COMMAND_OFFSET: u64 = 4;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_MASTER: u16 = 1 << 2;
/// `IORESOURCE_MEM` in a sysfs `resource` line's flags.
pub const IORESOURCE_MEM: u64 = 0x200;

/// One line of a sysfs `resource` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
}

impl Resource {
    pub fn size(&self) -> u64 {
        if self.start == 0 && self.end == 0 {
            0
        } else {
            self.end - self.start + 1
        }
    }
    pub fn is_mem(&self) -> bool {
        self.flags & IORESOURCE_MEM != 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    pub bdf: String,
    pub path: PathBuf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub resources: Vec<Resource>,
}

impl PciDevice {
    pub fn resource(&self, bar: u8) -> Option<Resource> {
        self.resources.get(bar as usize).copied()
    }
    pub fn resource_path(&self, bar: u8) -> PathBuf {
        self.path.join(format!("resource{bar}"))
    }
}

fn read_text(path: &Path) -> Result<String, LinuxError> {
    fs::read_to_string(path).map_err(LinuxError::io("reading", path))
}

pub fn parse_hex(s: &str) -> Option<u64> {
    let t = s.trim();
    u64::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

fn hex_file(path: &Path) -> Result<u64, LinuxError> {
    let text = read_text(path)?;
    parse_hex(&text).ok_or(LinuxError::Parse {
        path: path.to_path_buf(),
        text,
    })
}

/// Parses a sysfs `resource` file: one `start end flags` line per resource.
pub fn parse_resource(text: &str) -> Option<Vec<Resource>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace().map(parse_hex);
            let r = Resource {
                start: it.next()??,
                end: it.next()??,
                flags: it.next()??,
            };
            (r.end >= r.start || r.start == 0).then_some(r)
        })
        .collect()
}

/// Every PCI function under `root` (normally [`SYSFS_PCI`]) with the wdvirt
/// vendor and device IDs, sorted by address.
pub fn find_devices(root: &Path) -> Result<Vec<PciDevice>, LinuxError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(root).map_err(LinuxError::io("listing", root))? {
        let entry = entry.map_err(LinuxError::io("listing", root))?;
        let path = entry.path();
        let (Ok(vendor), Ok(device)) = (
            hex_file(&path.join("vendor")),
            hex_file(&path.join("device")),
        ) else {
            continue;
        };
        if vendor != u64::from(pci::VENDOR_ID) || device != u64::from(pci::DEVICE_ID) {
            continue;
        }
        let class = hex_file(&path.join("class"))? as u32;
        let rpath = path.join("resource");
        let text = read_text(&rpath)?;
        let resources = parse_resource(&text).ok_or(LinuxError::Parse { path: rpath, text })?;
        found.push(PciDevice {
            bdf: entry.file_name().to_string_lossy().into_owned(),
            path,
            vendor: vendor as u16,
            device: device as u16,
            class,
            resources,
        });
    }
    found.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(found)
}

/// The device at `bdf`, or the first one found.
pub fn find_device(root: &Path, bdf: Option<&str>) -> Result<PciDevice, LinuxError> {
    let all = find_devices(root)?;
    let pick = match bdf {
        Some(b) => all.into_iter().find(|d| d.bdf == b),
        None => all.into_iter().next(),
    };
    pick.ok_or(LinuxError::NoDevice {
        vendor: pci::VENDOR_ID,
        device: pci::DEVICE_ID,
        root: root.to_path_buf(),
    })
}

/// Sets memory-space and bus-master enable by read-modify-write of the
/// command register in the sysfs `config` file. Returns (before, after).
pub fn enable_memory_and_master(dev: &PciDevice) -> Result<(u16, u16), LinuxError> {
    let path = dev.path.join("config");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(LinuxError::io("opening", &path))?;
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, COMMAND_OFFSET)
        .map_err(LinuxError::io("reading", &path))?;
    let before = u16::from_le_bytes(b);
    let after = before | COMMAND_MEMORY | COMMAND_MASTER;
    if after != before {
        f.write_all_at(&after.to_le_bytes(), COMMAND_OFFSET)
            .map_err(LinuxError::io("writing", &path))?;
    }
    f.read_exact_at(&mut b, COMMAND_OFFSET)
        .map_err(LinuxError::io("reading", &path))?;
    Ok((before, u16::from_le_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(tag: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("wdvirt-guest-sysfs-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dev = |bdf: &str, vendor: &str, device: &str| {
            let d = root.join(bdf);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            fs::write(d.join("device"), format!("{device}\n")).unwrap();
            fs::write(d.join("class"), "0x120000\n").unwrap();
            fs::write(
                d.join("resource"),
                "0x00000000fe000000 0x00000000fe003fff 0x0000000000040200\n\
                 0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                 0x00000000fe004000 0x00000000fe007fff 0x0000000000040200\n",
            )
            .unwrap();
            let mut config = vec![0u8; 64];
            config[4] = 0x01; // I/O space already on
            fs::write(d.join("config"), config).unwrap();
        };
        dev("0000:00:05.0", "0x7764", "0x0001");
        dev("0000:00:03.0", "0x7764", "0x0001");
        dev("0000:00:01.0", "0x8086", "0x1237");
        dev("0000:00:02.0", "0x7764", "0x0002");
        root
    }

    #[test]
    fn finds_wdvirt_functions_sorted_with_bars() {
        let root = fake_sysfs("find");
        let all = find_devices(&root).unwrap();
        assert_eq!(
            all.iter().map(|d| d.bdf.as_str()).collect::<Vec<_>>(),
            ["0000:00:03.0", "0000:00:05.0"]
        );
        let d = &all[0];
        assert_eq!(
            (d.vendor, d.device, d.class),
            (pci::VENDOR_ID, pci::DEVICE_ID, pci::CLASS_CODE)
        );
        assert_eq!(d.resource(0).unwrap().size(), pci::BAR0_SIZE);
        assert!(d.resource(0).unwrap().is_mem());
        assert_eq!(d.resource(1).unwrap().size(), 0);
        assert_eq!(d.resource(2).unwrap().size(), 0x4000);
        assert_eq!(
            find_device(&root, Some("0000:00:05.0")).unwrap().bdf,
            "0000:00:05.0"
        );
        assert!(matches!(
            find_device(&root, Some("0000:00:01.0")),
            Err(LinuxError::NoDevice { .. })
        ));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn command_register_gets_memory_and_master_bits() {
        let root = fake_sysfs("cmd");
        let d = find_device(&root, None).unwrap();
        assert_eq!(enable_memory_and_master(&d).unwrap(), (0x1, 0x7));
        let config = fs::read(d.path.join("config")).unwrap();
        assert_eq!(
            (config[4], config[5], config.len()),
            (0x7, 0, 64),
            "only the command register changed"
        );
        assert_eq!(enable_memory_and_master(&d).unwrap(), (0x7, 0x7));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn resource_parsing_refuses_junk() {
        assert!(parse_resource("0x1 0x2\n").is_none());
        assert!(parse_resource("zz 0x2 0x3\n").is_none());
        assert!(
            parse_resource("0x10 0x2 0x200\n").is_none(),
            "end before start"
        );
        assert_eq!(parse_resource("").unwrap(), vec![]);
        assert_eq!(parse_hex("0x7764\n"), Some(0x7764));
    }
}
