//! docs/device-spec.md is checked against the code it documents: every row
//! of every table is read back against the ABI crate, the device's register
//! table, and a device created here (its config space and its registers'
//! reset values), and every code in the crate must appear in the document.

use std::sync::Arc;

use wdvirt::accel::soft::SoftAccel;
use wdvirt::vdev::function::{BarKind, FunctionModel, InterruptSink};
use wdvirt::vdev::pci::config::{
    CAP_ID_MSIX, CAP_ID_PCIE, CAP_ID_PM, PCIE_DEVCAP, PCIE_DEVCAP_FLR, PCIE_FLAGS,
};
use wdvirt::vdev::pci::{Interrupts, PciFunction};
use wdvirt::vdev::wd::regs::{self as wdregs, Access, GLOBAL, QUEUE, RegDef};
use wdvirt::vdev::wd::{MAX_QUEUES, WdConfig, WdDevice};
use wdvirt_abi::{JobStatus, Opcode, RegError, pci, regs, sha256_state};

fn spec() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/device-spec.md")).unwrap()
}

/// Rows of the first table after `heading`, split into trimmed cells.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("no section {heading}"));
    doc[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

fn parse_hex(s: &str) -> u32 {
    u32::from_str_radix(s.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("not a hex number: {s:?}"))
}

struct NoIrq;
impl InterruptSink for NoIrq {
    fn msix(&self, _vector: u16) -> bool {
        false
    }
}

/// An instance whose every "instance" value differs from the defaults, so a
/// documented reset value cannot match one by accident.
fn instance_config() -> WdConfig {
    let mut queue_ops = [None; MAX_QUEUES];
    queue_ops[1] = Some(Opcode::Crc32c.bit() | Opcode::Copy.bit());
    WdConfig {
        queues: 3,
        max_depth: 256,
        ops: wdvirt_abi::ALL_OPS & !Opcode::Fill.bit(),
        max_xfer: 1 << 19,
        queue_ops,
    }
}

fn device(cfg: WdConfig, pasid: u32) -> WdDevice {
    WdDevice::new(cfg, SoftAccel::new(1), pasid, Arc::new(NoIrq)).unwrap()
}

fn read(dev: &mut WdDevice, offset: u32, width: u8) -> u64 {
    let mut b = [0u8; 8];
    dev.bar_read(0, offset as u64, &mut b[..width as usize])
        .unwrap();
    u64::from_le_bytes(b)
}

/// Checks every row of a register table: offset, name, access and width
/// against the device's table, the meaning against `regs::meaning`, and the
/// reset value against `dev` (in queue `queue`'s block for queue registers).
fn check_registers(
    rows: &[Vec<String>],
    defs: &[RegDef],
    dev: &mut WdDevice,
    queue: Option<u32>,
    cfg: &WdConfig,
) {
    assert_eq!(rows.len(), defs.len(), "row count");
    for (row, d) in rows.iter().zip(defs) {
        assert_eq!(row.len(), 6, "columns of {}", d.name);
        let access = match d.access {
            Access::ReadOnly => "RO",
            Access::ReadWrite => "RW",
            Access::W1c => "W1C",
        };
        assert_eq!(parse_hex(&row[0]), d.offset, "offset of {}", d.name);
        assert_eq!(row[1], d.name);
        assert_eq!(row[2], access, "access of {}", d.name);
        assert_eq!(row[3], d.width.to_string(), "width of {}", d.name);
        assert_eq!(row[5], wdregs::meaning(d.reg), "meaning of {}", d.name);
        let at = queue.map_or(0, regs::queue) + d.offset;
        let got = read(dev, at, d.width);
        let want = if row[4] == "instance" {
            let q = queue.unwrap_or(0);
            match d.name {
                "CAP_OPS" => cfg.ops as u64,
                "NUM_QUEUES" => cfg.queues as u64,
                "MAX_DEPTH" => cfg.max_depth as u64,
                "MAX_XFER" => cfg.max_xfer as u64,
                "Q_CAP_OPS" => cfg.queue_cap_ops(q) as u64,
                other => panic!("{other} is not an instance value"),
            }
        } else {
            parse_hex(&row[4]) as u64
        };
        assert_eq!(got, want, "reset value of {}", d.name);
    }
}

#[test]
fn register_tables_match_the_device_and_its_reset_values() {
    let doc = spec();
    let cfg = instance_config();
    let mut dev = device(cfg, 1);
    let global = table(&doc, "### 2.1 Global registers");
    let queue = table(&doc, "### 2.2 Queue registers");
    let check_all = |dev: &mut WdDevice| {
        check_registers(&global, GLOBAL, dev, None, &cfg);
        for q in 0..cfg.queues {
            check_registers(&queue, QUEUE, dev, Some(q), &cfg);
        }
    };
    check_all(&mut dev);
    // After use and a DEV_CTRL.RESET, every register is back at its documented value.
    let w = |dev: &mut WdDevice, off: u32, v: u32| {
        dev.bar_write(0, off as u64, &v.to_le_bytes()).unwrap()
    };
    w(&mut dev, regs::DEV_CTRL, regs::DEV_CTRL_ENABLE);
    for q in 0..cfg.queues {
        w(&mut dev, regs::queue(q) + regs::Q_DEPTH, 8);
        w(&mut dev, regs::queue(q) + regs::Q_SQ_BASE, 0x1000);
        w(&mut dev, regs::queue(q) + regs::Q_MSIX_VECTOR, 0);
        w(&mut dev, regs::queue(q) + regs::Q_IRQ_COALESCE, 5);
        w(&mut dev, regs::queue(q) + regs::Q_CTRL, regs::Q_CTRL_ENABLE);
    }
    w(&mut dev, 0x800, 1);
    assert_ne!(read(&mut dev, regs::ERR_COUNT, 4), 0);
    w(&mut dev, regs::DEV_CTRL, regs::DEV_CTRL_RESET);
    check_all(&mut dev);
    assert!(doc.contains(&format!("`0x{:x}`", regs::ID_MAGIC)));
    assert!(doc.contains(&format!(
        "`0x{:x} + q * 0x{:x}`",
        regs::QUEUE_BASE,
        regs::QUEUE_STRIDE
    )));
    assert!(doc.contains(&format!(
        "(ABI {}.{})",
        regs::ABI_VERSION >> 16,
        regs::ABI_VERSION & 0xffff
    )));
}

/// Every row of §1, against the constants and the config space the device's
/// PCI layer builds.
#[test]
fn pci_rows_match_the_config_space() {
    let doc = spec();
    let rows = table(&doc, "## 1. PCI function");
    let queues = 5;
    let dev = device(
        WdConfig {
            queues,
            ..WdConfig::default()
        },
        2,
    );
    let layout = dev.layout();
    let f = PciFunction::new(dev, Interrupts::new(queues as u16));
    let cs = f.config();
    // The capability list, as a driver walks it.
    let mut caps = Vec::new();
    let mut at = cs.read_u8(0x34) as u16;
    while at != 0 && caps.len() < 16 {
        caps.push((cs.read_u8(at), at));
        at = cs.read_u8(at + 1) as u16;
    }
    let ids: Vec<u8> = caps.iter().map(|c| c.0).collect();
    let cap = |id: u8| caps.iter().find(|c| c.0 == id).unwrap().1;
    let mut seen = Vec::new();
    for row in &rows {
        let (k, v) = (row[0].as_str(), row[1].as_str());
        seen.push(k.to_string());
        match k {
            "vendor ID" => {
                assert_eq!(
                    v,
                    format!(
                        "`0x{:04x}` (not PCI-SIG assigned; experimental)",
                        pci::VENDOR_ID
                    )
                );
                assert_eq!(cs.read_u16(0), pci::VENDOR_ID);
            }
            "device ID" => {
                assert_eq!(v, format!("`0x{:04x}`", pci::DEVICE_ID));
                assert_eq!(cs.read_u16(2), pci::DEVICE_ID);
            }
            "subsystem vendor / ID" => {
                assert_eq!(
                    v,
                    format!(
                        "`0x{:04x}` / `0x{:04x}`",
                        pci::SUBSYSTEM_VENDOR_ID,
                        pci::SUBSYSTEM_ID
                    )
                );
                assert_eq!(cs.read_u16(0x2c), pci::SUBSYSTEM_VENDOR_ID);
                assert_eq!(cs.read_u16(0x2e), pci::SUBSYSTEM_ID);
            }
            "revision" => {
                assert_eq!(v, format!("`0x{:02x}`", pci::REVISION));
                assert_eq!(cs.read_u8(8), pci::REVISION);
            }
            "class code" => {
                assert_eq!(
                    v,
                    format!("`0x{:06x}` (processing accelerator)", pci::CLASS_CODE)
                );
                assert_eq!(cs.read_u32(8) >> 8, pci::CLASS_CODE);
            }
            "BAR0" => {
                assert_eq!(
                    v,
                    format!(
                        "32-bit memory, {} KiB: control registers, MSI-X table at `0x{:x}`, PBA at `0x{:x}`",
                        pci::BAR0_SIZE / 1024,
                        pci::MSIX_TABLE_OFFSET,
                        pci::MSIX_PBA_OFFSET
                    )
                );
                let b = layout.bars[0];
                assert_eq!((b.kind, b.size), (BarKind::Mem32, pci::BAR0_SIZE));
                assert_eq!(layout.msix_table, (0, pci::MSIX_TABLE_OFFSET));
                assert_eq!(layout.msix_pba, (0, pci::MSIX_PBA_OFFSET));
            }
            "BAR2" => {
                assert_eq!(
                    v,
                    format!(
                        "32-bit memory, one {} KiB doorbell page per queue (size rounded up to a power of two)",
                        pci::DOORBELL_STRIDE / 1024
                    )
                );
                let b = layout.bars[2];
                assert_eq!(b.kind, BarKind::Mem32);
                assert_eq!(
                    b.size,
                    (queues as u64 * pci::DOORBELL_STRIDE).next_power_of_two()
                );
            }
            "capabilities" => {
                assert_eq!(
                    v,
                    "PCI Express (endpoint, FLR), MSI-X (one vector per queue), power management"
                );
                assert_eq!(ids, [CAP_ID_PCIE, CAP_ID_MSIX, CAP_ID_PM], "in this order");
                let pcie = cap(CAP_ID_PCIE);
                assert_eq!((cs.read_u16(pcie + PCIE_FLAGS) >> 4) & 0xf, 0, "endpoint");
                assert_ne!(cs.read_u32(pcie + PCIE_DEVCAP) & PCIE_DEVCAP_FLR, 0, "FLR");
                let msix = cap(CAP_ID_MSIX);
                assert_eq!((cs.read_u16(msix + 2) & 0x7ff) + 1, queues as u16);
            }
            other => panic!("§1 row {other:?} is not checked"),
        }
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
}

#[test]
fn stream_param_and_context_layouts_match() {
    use wdvirt_abi::stream as st;
    let doc = spec();
    let params = table(&doc, "`param` of a stream piece");
    let bits: Vec<&str> = params.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(bits, ["1:0", "11:8", "13:12", "16"]);
    let mask = |r: &str| -> u64 {
        let (hi, lo) = r.split_once(':').unwrap_or((r, r));
        let (hi, lo): (u32, u32) = (hi.parse().unwrap(), lo.parse().unwrap());
        ((1u64 << (hi - lo + 1)) - 1) << lo
    };
    assert_eq!(mask(bits[0]), st::FORMAT_MASK);
    assert_eq!(mask(bits[1]), st::LEVEL_MASK);
    assert_eq!(mask(bits[2]), st::FLUSH_MASK);
    assert_eq!(mask(bits[3]), st::START);
    assert!(params[2][2].contains(&format!(
        "{} SYNC, {} FULL, {} FINISH",
        st::FLUSH_SYNC,
        st::FLUSH_FULL,
        st::FLUSH_FINISH
    )));
    for f in wdvirt_abi::Format::ALL {
        let name = if f == wdvirt_abi::Format::Deflate {
            "raw deflate"
        } else {
            f.name()
        };
        assert!(
            params[0][2].contains(&format!("{} {name}", f.code())),
            "{name}"
        );
    }
    let ctx = table(&doc, "The context's layout");
    let want = [
        (st::MAGIC_OFFSET, 4, "magic"),
        (st::VERSION_OFFSET, 2, "version"),
        (st::FLAGS_OFFSET, 2, "flags"),
        (st::FORMAT_OFFSET, 1, "format"),
        (st::BITS_OFFSET, 1, "decompress: bits"),
        (st::BIT_VALUE_OFFSET, 1, "the value"),
        (11, 1, "reserved"),
        (st::CHECK_OFFSET, 4, "check value"),
        (st::PLAIN_OFFSET, 8, "uncompressed bytes"),
        (st::PACKED_OFFSET, 8, "compressed bytes"),
        (st::WINDOW_LEN_OFFSET, 4, "bytes of the window"),
        (st::RESERVED_OFFSET, 28, "reserved"),
        (st::WINDOW_OFFSET, st::WINDOW_SIZE as usize, "the window"),
    ];
    assert_eq!(ctx.len(), want.len());
    let mut end = 0;
    for (row, (off, size, field)) in ctx.iter().zip(want) {
        assert_eq!(row[0], off.to_string(), "{field}");
        assert_eq!(row[1], size.to_string(), "{field}");
        assert!(row[2].starts_with(field), "{row:?}");
        assert_eq!(off, end, "fields are contiguous");
        end = off + size;
    }
    assert_eq!(end, st::CTX_SIZE as usize);
    assert!(ctx[0][2].contains(&format!("`0x{:08x}`", st::MAGIC)));
    let flags = &ctx[2][2];
    for (bit, name) in [
        (st::FLAG_VALID, "VALID"),
        (st::FLAG_COMPRESS, "COMPRESS"),
        (st::FLAG_HEADER_DONE, "HEADER_DONE"),
        (st::FLAG_DEFLATE_DONE, "DEFLATE_DONE"),
        (st::FLAG_ENDED, "ENDED"),
    ] {
        assert!(
            flags.contains(&format!("{} {name}", bit.trailing_zeros())),
            "{name}"
        );
    }
    assert!(doc.contains(&format!("context** of {} bytes", st::CTX_SIZE)));
    let cqe = table(&doc, "### 3.3 Completion entry");
    assert!(cqe[2][3].contains(&format!(
        "bit {} STREAM_END",
        wdvirt_abi::CQE_STREAM_END.trailing_zeros()
    )));
}

#[test]
fn sha256_state_layout_matches() {
    let rows = table(&spec(), "The state is self-describing");
    let want = [
        (sha256_state::MAGIC_OFFSET, 4, "magic"),
        (sha256_state::VERSION_OFFSET, 2, "version"),
        (sha256_state::FLAGS_OFFSET, 2, "flags"),
        (sha256_state::LENGTH_OFFSET, 8, "message bytes"),
        (sha256_state::H_OFFSET, 32, "chaining value"),
        (sha256_state::BLOCK_OFFSET, 64, "the partial block"),
        (sha256_state::RESERVED_OFFSET, 16, "reserved"),
    ];
    assert_eq!(rows.len(), want.len());
    let mut end = 0;
    for (row, (off, size, field)) in rows.iter().zip(want) {
        assert_eq!(row[0], off.to_string(), "{field}");
        assert_eq!(row[1], size.to_string(), "{field}");
        assert!(row[2].starts_with(field), "{row:?}");
        assert_eq!(off, end, "fields are contiguous");
        end = off + size;
    }
    assert_eq!(end, wdvirt_abi::SHA256_STATE_SIZE as usize);
    assert!(rows[0][2].contains(&format!("`0x{:08x}`", sha256_state::MAGIC)));
    assert!(rows[1][2].ends_with(&sha256_state::VERSION.to_string()));
}

#[test]
fn error_codes_and_statuses_match() {
    let doc = spec();
    let regs = table(&doc, "### 5.1 Register errors");
    assert_eq!(regs.len(), RegError::ALL.len());
    for (row, e) in regs.iter().zip(RegError::ALL) {
        assert_eq!(
            (row[0].as_str(), row[1].as_str(), row[2].as_str()),
            (e.code().to_string().as_str(), e.name(), e.text())
        );
    }
    let jobs = table(&doc, "### 5.2 Job status");
    assert_eq!(jobs.len(), JobStatus::ALL.len());
    for (row, e) in jobs.iter().zip(JobStatus::ALL) {
        assert_eq!(
            (row[0].as_str(), row[1].as_str(), row[2].as_str()),
            (e.code().to_string().as_str(), e.name(), e.text())
        );
    }
}

#[test]
fn opcodes_match() {
    let ops = table(&spec(), "## 4. Operations");
    assert_eq!(ops.len(), Opcode::ALL.len());
    for (row, op) in ops.iter().zip(Opcode::ALL) {
        assert_eq!(row[0], (op as u8).to_string());
        assert_eq!(row[1], op.name());
        assert_eq!(
            row[2] != "—",
            op.reads_src(),
            "reads column of {}",
            op.name()
        );
        assert_eq!(
            row[3] != "—",
            op.writes_dst(),
            "writes column of {}",
            op.name()
        );
    }
}

#[test]
fn descriptor_layouts_match() {
    let doc = spec();
    let sqe = table(&doc, "### 3.2 Submission entry");
    let sizes: u32 = sqe.iter().map(|r| r[2].parse::<u32>().unwrap()).sum();
    assert_eq!(sizes as usize, wdvirt_abi::SQE_SIZE);
    // Offsets in the table are where the ABI crate's encoder puts each field.
    let probe = wdvirt_abi::SubmissionEntry {
        opcode: 1,
        flags: 2,
        reserved0: 3,
        tag: 4,
        src: 5,
        dst: 6,
        src_len: 7,
        dst_len: 8,
        param: 9,
        ctx: 10,
        reserved: [11, 0],
    };
    let b = probe.to_bytes();
    for row in &sqe {
        let off: usize = row[0].parse().unwrap();
        let want = match row[1].as_str() {
            "opcode" => 1,
            "flags" => 2,
            "reserved0" => 3,
            "tag" => 4,
            "src" => 5,
            "dst" => 6,
            "src_len" => 7,
            "dst_len" => 8,
            "param" => 9,
            "ctx" => 10,
            "reserved" => 11,
            f => panic!("unknown field {f}"),
        };
        assert_eq!(b[off], want, "SQE field {} at {off}", row[1]);
    }
    let cqe = table(&doc, "### 3.3 Completion entry");
    let c = wdvirt_abi::CompletionEntry {
        tag: 1,
        status: 2,
        flags: 3,
        bytes: 4,
        result: 5,
    }
    .to_bytes();
    for row in &cqe {
        let off: usize = row[0].parse().unwrap();
        let want = match row[1].as_str() {
            "tag" => 1,
            "status" => 2,
            "flags" => 3,
            "bytes" => 4,
            "result" => 5,
            f => panic!("{f}"),
        };
        assert_eq!(c[off], want, "CQE field {} at {off}", row[1]);
    }
    let idx = table(&doc, "### 3.1 Ring-index block");
    let offs: Vec<u64> = idx.iter().map(|r| r[0].parse().unwrap()).collect();
    use wdvirt_abi::idx;
    assert_eq!(
        offs,
        vec![idx::SQ_TAIL, idx::CQ_HEAD, idx::SQ_HEAD, idx::FLAGS]
    );
}
