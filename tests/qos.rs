//! QoS through the daemon, as an operator and a guest meet it: policies
//! from the YAML applied when an instance starts, changed on a running
//! instance with `wdvirt modify --qos`, and a guest driver on the device
//! counting and checking every job meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_guest::Device;

mod common;

use common::daemon::Daemon;

/// One engine; a free policy and one of 50 jobs/s with a burst of 10: far
/// below what a guest doing one CRC at a time gets on a loaded host (about
/// 200 jobs/s at the worst seen), so the limit shows however busy the
/// machine.
const HOST: &str = r#"
accelerators:
  - {name: soft0, backend: soft, engines: 1, queue_pairs: 8, operations: [all], pasids: 8}
qos_policies:
  - {name: free, weight: 100}
  - name: slow
    weight: 100
    rate: {jobs_per_sec: 50, burst_jobs: 10}
types:
  - {name: one, queues: 1, operations: [all], max_depth: 256, qos: free}
  - {name: slow-one, queues: 1, operations: [all], max_depth: 256, qos: slow}
"#;

const SLOW_RATE: f64 = 50.0;
const SLOW_BURST: f64 = 10.0;

/// The daemon on [`HOST`]; SIGTERM at the end must stop it.
fn daemon() -> Daemon {
    Daemon::builder(HOST).terminate_on_drop().start()
}

impl Daemon {
    /// Defines and starts an instance of `ty`; returns its socket.
    fn started(&self, ty: &str, name: &str) -> PathBuf {
        self.json(&["define", "--type", ty, "--name", name]);
        let v = self.json(&["start", name]);
        PathBuf::from(v["socket"].as_str().unwrap())
    }
}

/// A guest that runs CRC32C jobs one after another until told to stop,
/// checking each result and noting when each completed.
struct Guest {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Instant>>>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Guest {
    fn start(socket: &std::path::Path) -> Guest {
        let vmm = Arc::new(
            LoopbackVmm::connect(socket, GuestRam::new(common::RAM_BASE, 4 << 20).unwrap())
                .unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let (s, d) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let dev = Device::probe(vmm.clone()).unwrap();
            dev.enable().unwrap();
            let pool = vmm.dma_pool().unwrap();
            let mut q = dev.queue(0, 64, dev.info().cap_ops, &pool).unwrap();
            let mut n = 0u64;
            while !s.load(Ordering::Acquire) {
                let data = n.to_le_bytes();
                let crc = q.crc32c(&data).expect("a job failed or was lost");
                assert_eq!(crc, wdvirt_guest::crc::crc32c(&data), "job {n}");
                d.lock().push(Instant::now());
                n += 1;
            }
            n
        });
        Guest {
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Jobs completed in `[from, to)`.
    fn between(&self, from: Instant, to: Instant) -> usize {
        self.done
            .lock()
            .iter()
            .filter(|&&t| t >= from && t < to)
            .count()
    }

    /// Stops the guest; returns the jobs it completed and checked.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn jobs_ok(d: &Daemon, name: &str) -> u64 {
    let v = d.json(&["list"]);
    let i = v.as_array().unwrap();
    let me = i.iter().find(|x| x["name"] == name).unwrap();
    me["report"]["queues"][0]["jobs_ok"].as_u64().unwrap()
}

#[test]
fn the_types_policy_holds_from_the_first_job() {
    let d = daemon();
    let socket = d.started("slow-one", "vm1");
    let guest = Guest::start(&socket);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let n = guest.between(
        t0 - Duration::from_secs(10),
        t0 + Duration::from_millis(1000),
    );
    let total = guest.finish();
    // 50 jobs/s and a burst of 10: however fast the guest and the host.
    assert!(
        n as f64 <= SLOW_RATE * 1.0 + SLOW_BURST + 5.0,
        "{n} jobs in the first second"
    );
    assert!(n as f64 > SLOW_RATE / 2.0, "the instance barely ran ({n})");
    assert_eq!(
        jobs_ok(&d, "vm1"),
        total,
        "the device counted what the guest did"
    );
}

#[test]
fn modify_qos_on_a_running_instance_takes_effect_at_once_and_no_job_is_lost_or_repeated() {
    let d = daemon();
    let socket = d.started("one", "vm1");
    let guest = Guest::start(&socket);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let before = guest.between(t0, t0 + Duration::from_millis(1000));
    // What this host gives the guest unlimited, measured in this run: the
    // limit must be well below it to be told apart.
    assert!(
        before as f64 > 3.0 * SLOW_RATE,
        "the guest ran only {before} jobs in a second without a limit: too slow a host to tell"
    );

    // Down to 50 jobs/s: from the moment the CLI returns.
    let v = d.json(&["modify", "vm1", "--qos", "slow"]);
    assert_eq!(v["qos"], "slow");
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let slow = guest.between(t1, t1 + Duration::from_millis(1000));
    assert!(
        slow as f64 <= SLOW_RATE + SLOW_BURST + 5.0,
        "{slow} jobs in the second after --qos slow"
    );

    // Back to the type's policy: the limit is gone at once.
    let v = d.json(&["modify", "vm1", "--type-qos"]);
    assert_eq!(v["qos"], "free");
    let t2 = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let free = guest.between(t2, t2 + Duration::from_millis(1000));
    assert!(
        free as f64 > 2.0 * SLOW_RATE,
        "only {free} jobs in the second after --type-qos ({before} before the limit)"
    );
    // Every job the guest submitted completed once with the right result
    // (the guest checks each), and the device counted exactly those.
    let total = guest.finish();
    assert_eq!(jobs_ok(&d, "vm1"), total);
    let listed = d.json(&["list"]);
    assert_eq!(listed[0]["report"]["queues"][0]["jobs_failed"], 0);
}
