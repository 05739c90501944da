//! docs/device-spec.md is checked against the code it documents: every table
//! row must match the ABI crate and the device's register table, and every
//! code in the crate must appear in the document.

use wdvirt::vdev::wd::regs::{Access, GLOBAL, QUEUE, RegDef};
use wdvirt_abi::{JobStatus, Opcode, RegError, pci};

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
    u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

fn check_registers(rows: &[Vec<String>], defs: &[RegDef]) {
    assert_eq!(rows.len(), defs.len(), "row count");
    for (row, d) in rows.iter().zip(defs) {
        let access = match d.access {
            Access::ReadOnly => "RO",
            Access::ReadWrite => "RW",
            Access::W1c => "W1C",
        };
        assert_eq!(parse_hex(&row[0]), d.offset, "offset of {}", d.name);
        assert_eq!(row[1], d.name);
        assert_eq!(row[2], access, "access of {}", d.name);
        assert_eq!(row[3], d.width.to_string(), "width of {}", d.name);
    }
}

#[test]
fn register_tables_match_the_device() {
    let doc = spec();
    check_registers(&table(&doc, "### 2.1 Global registers"), GLOBAL);
    check_registers(&table(&doc, "### 2.2 Queue registers"), QUEUE);
    assert!(doc.contains(&format!("`0x{:x}`", wdvirt_abi::regs::ID_MAGIC)));
    assert!(doc.contains(&format!(
        "`0x{:x} + q * 0x{:x}`",
        wdvirt_abi::regs::QUEUE_BASE,
        wdvirt_abi::regs::QUEUE_STRIDE
    )));
}

#[test]
fn pci_identity_matches() {
    let doc = spec();
    let rows = table(&doc, "## 1. PCI function");
    let get = |k: &str| {
        rows.iter()
            .find(|r| r[0] == k)
            .map(|r| r[1].clone())
            .unwrap()
    };
    assert!(get("vendor ID").starts_with(&format!("`0x{:04x}`", pci::VENDOR_ID)));
    assert_eq!(get("device ID"), format!("`0x{:04x}`", pci::DEVICE_ID));
    assert!(get("class code").starts_with(&format!("`0x{:06x}`", pci::CLASS_CODE)));
    assert!(get("BAR0").contains(&format!("{} KiB", pci::BAR0_SIZE / 1024)));
    assert!(get("BAR0").contains(&format!("`0x{:x}`", pci::MSIX_TABLE_OFFSET)));
    assert!(get("BAR0").contains(&format!("`0x{:x}`", pci::MSIX_PBA_OFFSET)));
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
        reserved: [10, 0, 0],
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
            "reserved" => 10,
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
