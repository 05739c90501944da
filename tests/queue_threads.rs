//! No thread of an instance outlives it: a queue worker's thread, idle or
//! running, ends with its queue, its device's reset and its instance's
//! stop. (Since the idle threads are joined on drop this holds at once;
//! before, a detached thread ended "soon", and AddressSanitizer's leak
//! check in the `bar0_accesses` fuzz target once caught one before it had
//! — a race too narrow for this test to catch.) One test in this binary,
//! so that the process's thread count is this test's alone.

use std::sync::Arc;

use wdvirt::accel::SharedAccelerator;
use wdvirt::accel::soft::SoftAccel;
use wdvirt::vdev::wd::WdConfig;
use wdvirt_abi::{JobStatus, Opcode};
use wdvirt_guest::{Device, JobSpec};

mod common;

/// Threads of this process named `wd-queue-*` (the queue workers).
fn queue_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("wd-queue-"))
        .count()
}

#[test]
fn an_instance_stopped_leaves_no_queue_thread_behind() {
    assert_eq!(queue_threads(), 0);
    let accel: SharedAccelerator = SoftAccel::new(1);
    let rig = common::start(&accel, "threads", 1, WdConfig::default(), 16 << 20);
    {
        let dev = Device::probe(rig.vmm.clone()).unwrap();
        dev.enable().unwrap();
        let pool = rig.vmm.dma_pool().unwrap();
        let src = pool.alloc(4096, 64).unwrap();
        let mut queues: Vec<_> = (0..4)
            .map(|q| dev.queue(q, 32, dev.info().cap_ops, &pool).unwrap())
            .collect();
        for q in &mut queues {
            let jobs: Vec<JobSpec> = (0..40)
                .map(|_| JobSpec::new(Opcode::Crc32c).src(src.addr(), 4096))
                .collect();
            let done = q.run_batch(&jobs).unwrap();
            assert!(done.iter().all(|c| c.status == JobStatus::Ok.code()));
        }
        assert_eq!(queue_threads(), 4, "one thread per running queue");
        // Queues disabled by the guest: their threads end with them.
        drop(queues);
        dev.reset().unwrap();
        assert_eq!(queue_threads(), 0, "after the guest's reset");
        // Running again, then the instance stopped under them.
        dev.enable().unwrap();
        let mut q = dev.queue(2, 32, dev.info().cap_ops, &pool).unwrap();
        let jobs = vec![JobSpec::new(Opcode::Crc32c).src(src.addr(), 4096)];
        q.run_batch(&jobs).unwrap();
        assert_eq!(queue_threads(), 1);
    }
    let common::Rig { instance, vmm, .. } = rig;
    drop(vmm);
    instance.stop();
    assert_eq!(queue_threads(), 0, "after the instance stopped");
    drop(Arc::clone(&accel));
}
