//! Discovery, the host graph and `wdvirt topology` / `wdvirt plan`, on the
//! recorded sysfs trees of `tests/sysfs/` (built from the kernel's ABI by
//! `tests/sysfs/make-trees.py`), on malformed trees made here, and on this
//! machine's own `/sys`.

use std::path::{Path, PathBuf};

use wdvirt::topology::{self, Detail, Interface, PasidCap, ProblemKind};

fn tree(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sysfs")
        .join(name)
}

#[test]
fn scratch_print() {
    for t in ["kunpeng920-2s", "spr-dsa-iaa", "hbm-shared"] {
        let d = topology::discover(&tree(t));
        println!("{}", serde_json::to_string_pretty(&d).unwrap());
    }
    let d = topology::discover(Path::new("/sys"));
    println!("{}", serde_json::to_string_pretty(&d).unwrap());
    let _ = (
        Detail::Soft { cpus: vec![] },
        Interface::Soft,
        PasidCap::Absent,
        ProblemKind::Missing,
    );
}
