//! A device state (`Migratable::restore`, what MIG_DATA_WRITE delivers once
//! the stream's envelope passed) from arbitrary bytes, into a stopped
//! accelerator function with 64 KiB of guest RAM mapped: never panics; a
//! refused state leaves the function exactly as it was (its own saved state
//! unchanged); an accepted one saves to a state that restores to itself,
//! and the function resumes from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wdvirt::vdev::device::VfioUserDevice;
use wdvirt::vdev::wd::WdConfig;
use wdvirt_fuzz::{function, map_ram};

const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 0x1_0000;
const CONFIG: u32 = 7;

fuzz_target!(|data: &[u8]| {
    let mut f = function(WdConfig {
        queues: 2,
        max_depth: 64,
        ..WdConfig::default()
    });
    map_ram(&mut f, RAM, RAM_SIZE);
    f.region_write(CONFIG, 4, &0x6u16.to_le_bytes()).unwrap();
    let m = f.migration().expect("the accelerator migrates");
    m.quiesce().unwrap();
    let before = m.save().unwrap();
    match m.restore(data) {
        Err(e) => {
            assert!(e.errno() != 0);
            assert_eq!(m.save().unwrap(), before, "a refused state changed the device");
        }
        Ok(()) => {
            let after = m.save().unwrap();
            m.restore(&after).unwrap();
            assert_eq!(m.save().unwrap(), after);
            m.resume().unwrap();
        }
    }
});
