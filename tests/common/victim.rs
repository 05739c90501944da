//! What the attack suites share (`tests/attack.rs` against this process,
//! `tests/attack_daemon.rs` against a `wdvirt daemon`): a victim VMM
//! running verified jobs throughout, the well-behaved VMM an attacker's
//! socket must still serve afterwards, and a process's fds, RSS and CPU
//! time read from `/proc`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_guest::Device;

use super::RAM_BASE;

/// Guest RAM of the victim's and the fresh VMMs.
pub const RAM_SIZE: u64 = 4 << 20;

/// A VMM on `socket` with [`RAM_SIZE`] of guest RAM mapped.
pub fn connect(socket: &Path) -> Result<LoopbackVmm, wdvirt::vmm::VmmError> {
    LoopbackVmm::connect(socket, GuestRam::new(RAM_BASE, RAM_SIZE).unwrap())
}

/// Fds open in process `pid`.
pub fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Resident memory of process `pid`, KiB (`VmRSS` of `/proc/PID/status`).
pub fn proc_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The process's CPU time so far, in clock ticks (`utime + stime`, fields
/// 14 and 15 of `/proc/PID/stat`; the command name before them may hold
/// spaces, so fields are counted after its closing parenthesis).
pub fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The victim's driver on its own instance: CRC32C and copy jobs on queue
/// 0, each checked against a direct computation and counted, paused on
/// request, until finished. A wrong result ends its thread (a test sees it
/// in [`Victim::assert_progress`] or [`Victim::finish`]).
pub struct Victim {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    jobs: Arc<AtomicU64>,
    /// The longest time between two of its completions, ns, since
    /// [`Victim::longest_gap`] last read it (pauses left out).
    gap_ns: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Victim {
    /// The victim on the instance serving `socket`.
    pub fn start(socket: &Path) -> Victim {
        Victim::on(Arc::new(connect(socket).unwrap()))
    }

    /// The victim's driver on `vmm`.
    pub fn on(vmm: Arc<LoopbackVmm>) -> Victim {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let jobs = Arc::new(AtomicU64::new(0));
        let gap_ns = Arc::new(AtomicU64::new(0));
        let (s, p, j, g) = (stop.clone(), pause.clone(), jobs.clone(), gap_ns.clone());
        let thread = std::thread::spawn(move || {
            let dev = Device::probe(vmm.clone()).unwrap();
            dev.enable().unwrap();
            let pool = vmm.dma_pool().unwrap();
            let mut q = dev.queue(0, 32, dev.info().cap_ops, &pool).unwrap();
            let mut n = 0u32;
            let mut last: Option<Instant> = None;
            while !s.load(Ordering::Acquire) {
                if p.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                    last = None;
                    continue;
                }
                let data: Vec<u8> = (0..8192u32)
                    .map(|i| (i ^ n).wrapping_mul(31) as u8)
                    .collect();
                let crc = wdvirt_guest::crc::crc32c(&data);
                assert_eq!(q.crc32c(&data).unwrap(), crc, "victim job {n}");
                assert_eq!(
                    q.copy(&data[..4096]).unwrap(),
                    &data[..4096],
                    "victim copy {n}"
                );
                n += 1;
                j.fetch_add(2, Ordering::Release);
                let now = Instant::now();
                if let Some(l) = last {
                    g.fetch_max((now - l).as_nanos() as u64, Ordering::Relaxed);
                }
                last = Some(now);
            }
        });
        Victim {
            stop,
            pause,
            jobs,
            gap_ns,
            thread: Some(thread),
        }
    }

    /// Jobs verified so far.
    pub fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Acquire)
    }

    /// The longest time between two of the victim's completions (a CRC
    /// and a copy) since the last call, pauses left out.
    pub fn longest_gap(&self) -> Duration {
        Duration::from_nanos(self.gap_ns.swap(0, Ordering::Relaxed))
    }

    /// Holds the victim between jobs (`true`) or lets it go on.
    pub fn pause(&self, paused: bool) {
        self.pause.store(paused, Ordering::Release);
    }

    /// Waits until the victim completes more jobs than `since`: it was not
    /// stopped (a gap would show as no progress), and none failed.
    pub fn assert_progress(&self, since: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.jobs() <= since {
            assert!(
                !self.thread.as_ref().unwrap().is_finished(),
                "{what}: a victim job failed"
            );
            assert!(
                Instant::now() < deadline,
                "{what}: the victim made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the victim; its verified jobs (fails if one went wrong).
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("a victim job failed");
        self.jobs()
    }
}

/// A well-behaved VMM connects to `socket` (retrying while the last one is
/// torn down), resets the device and runs one verified job on queue 1.
pub fn fresh_vmm_runs_a_job(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let vmm = loop {
        match connect(socket) {
            Ok(v) => break Arc::new(v),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the attacker's socket takes no new VMM: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let dev = Device::probe(vmm.clone()).unwrap();
    dev.reset().unwrap();
    dev.enable().unwrap();
    let pool = vmm.dma_pool().unwrap();
    let mut q = dev.queue(1, 16, dev.info().cap_ops, &pool).unwrap();
    assert_eq!(q.crc32c(b"123456789").unwrap(), 0xe306_9283);
}
