//! A running "VM" migrated between two real `wdvirt daemon`s by the
//! in-process VMM (`wdvirt::vmm::migrate`): the guest is the real driver
//! (`wdvirt_guest`) over the VMM's memfd RAM, keeping several queues full
//! of compress / hash / copy jobs and checking every result, while the VMM
//! moves its RAM (dirty rounds) and its device (the vfio-user migration
//! commands through each instance's socket) back and forth.
//!
//! `WDVIRT_MIGRATIONS=100 cargo test --test migration` for the recorded
//! long run (20 by default).

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use sha2::Digest;
use wdvirt::vmm::migrate::{self, Figures, MigrateError, MigrateOptions, Phase, Progress, Vm};
use wdvirt::vmm::{GuestRam, LoopbackVmm};
use wdvirt_abi::{CompletionEntry, JobStatus, Opcode};
use wdvirt_guest::{Device, DmaPool, JobSpec, PoolBuffer};

const RAM_BASE: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 16 << 20;
const QUEUES: u32 = 4;
const DEPTH: u32 = 32;

/// One engine (the tests share two cores); a QoS cap, so that the
/// scheduler holds jobs back at the stops (they move as pending); a second
/// type of another shape.
const HOST: &str = r#"
accelerators:
  - name: soft0
    backend: soft
    engines: 1
    queue_pairs: 16
    operations: [all]
    pasids: 4
qos_policies:
  - name: capped
    weight: 100
    max_in_flight: 16
types:
  - name: quad
    queues: 4
    operations: [all]
    max_depth: 256
    qos: capped
  - name: pair
    queues: 2
    operations: [all]
    max_depth: 256
    qos: capped
"#;

/// A daemon with one started instance `vm` of `ty`; its socket.
fn host(ty: &str) -> (Daemon, PathBuf) {
    let d = Daemon::start(HOST);
    d.json(&["define", "--type", ty, "--name", "vm"]);
    d.json(&["start", "vm"]);
    let s = d.socket("vm");
    (d, s)
}

fn boot(socket: &std::path::Path) -> Arc<Vm> {
    let ram = GuestRam::new(RAM_BASE, RAM_SIZE).unwrap();
    Vm::new(LoopbackVmm::connect_migratable(socket, ram).unwrap())
}

const SLOT_SRC: u64 = 8 << 10;
const SLOT_DST: u64 = 16 << 10;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Copy,
    Crc,
    Sha,
    Deflate,
}

/// One queue of the guest's load: its ring kept full of mixed jobs, each
/// slot with its own buffers, each tag the job's sequence number.
struct QueueLoad {
    q: wdvirt_guest::Queue<Arc<Vm>, Arc<Vm>>,
    index: u32,
    src: PoolBuffer<Arc<Vm>>,
    dst: PoolBuffer<Arc<Vm>>,
    free: Vec<u32>,
    next: u32,
    /// One past the highest tag completed.
    expect: u32,
    /// Completions read from the ring.
    completed: u32,
    /// Completions that came before an older job's (the ABI promises
    /// completion order, not submission order).
    reordered: u32,
    /// tag -> (slot, kind, input)
    out: HashMap<u32, (u32, Kind, Vec<u8>)>,
}

impl QueueLoad {
    fn new(dev: &Device<Arc<Vm>>, pool: &DmaPool<Arc<Vm>>, index: u32) -> Self {
        QueueLoad {
            q: dev.queue(index, DEPTH, dev.info().cap_ops, pool).unwrap(),
            index,
            src: pool.alloc(SLOT_SRC * u64::from(DEPTH), 64).unwrap(),
            dst: pool.alloc(SLOT_DST * u64::from(DEPTH), 64).unwrap(),
            free: (0..DEPTH).collect(),
            next: 0,
            expect: 0,
            completed: 0,
            reordered: 0,
            out: HashMap::new(),
        }
    }

    fn fill(&mut self) {
        let mut sqes = Vec::new();
        while let Some(slot) = self.free.pop() {
            let seq = self.next;
            self.next += 1;
            let kind = [Kind::Copy, Kind::Crc, Kind::Sha, Kind::Deflate][(seq % 4) as usize];
            let len = if matches!(kind, Kind::Deflate) {
                8 << 10
            } else {
                4 << 10
            };
            let data =
                wdvirt_guest::workload::gen_data(u64::from(self.index) << 32 | u64::from(seq), len);
            let s = self.src.addr() + u64::from(slot) * SLOT_SRC;
            let d = self.dst.addr() + u64::from(slot) * SLOT_DST;
            self.src.write(u64::from(slot) * SLOT_SRC, &data).unwrap();
            let spec = match kind {
                Kind::Copy => JobSpec::new(Opcode::Copy)
                    .src(s, len as u32)
                    .dst(d, len as u32),
                Kind::Crc => JobSpec::new(Opcode::Crc32c).src(s, len as u32),
                Kind::Sha => JobSpec::new(Opcode::Sha256).src(s, len as u32).dst(d, 32),
                Kind::Deflate => JobSpec::new(Opcode::DeflateCompress)
                    .src(s, len as u32)
                    .dst(d, SLOT_DST as u32)
                    .param(1),
            };
            sqes.push(spec.to_sqe(seq));
            self.out.insert(seq, (slot, kind, data));
        }
        if !sqes.is_empty() {
            let n = self.q.submit(&sqes).unwrap();
            assert_eq!(n, sqes.len(), "the ring had room for every free slot");
        }
    }

    fn reap(&mut self) -> usize {
        let mut cqes = Vec::new();
        self.q.poll(&mut cqes).unwrap();
        for c in &cqes {
            self.check(c);
        }
        cqes.len()
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.dst.read(at, &mut v).unwrap();
        v
    }

    /// A completion: a job submitted and not completed before (a repeat
    /// fails here), its result right.
    fn check(&mut self, c: &CompletionEntry) {
        if c.tag != self.expect {
            self.reordered += 1;
        }
        self.expect = self.expect.max(c.tag + 1);
        self.completed += 1;
        let (slot, kind, data) = self
            .out
            .remove(&c.tag)
            .unwrap_or_else(|| panic!("queue {}: tag {} completed twice", self.index, c.tag));
        assert_eq!(
            c.status,
            JobStatus::Ok.code(),
            "queue {} tag {}: {kind:?} failed",
            self.index,
            c.tag
        );
        let at = u64::from(slot) * SLOT_DST;
        match kind {
            Kind::Copy => assert_eq!(self.read(at, data.len()), data, "tag {}", c.tag),
            Kind::Crc => assert_eq!(c.result, wdvirt::accel::ops::crc32c(&data)),
            Kind::Sha => assert_eq!(self.read(at, 32), sha2::Sha256::digest(&data).to_vec()),
            Kind::Deflate => {
                let packed = self.read(at, c.bytes as usize);
                let mut plain = Vec::new();
                flate2::read::DeflateDecoder::new(&packed[..])
                    .read_to_end(&mut plain)
                    .unwrap();
                assert_eq!(plain, data, "queue {} tag {}", self.index, c.tag);
            }
        }
        self.free.push(slot);
    }
}

/// The guest: its queues driven by one thread until told to stop, then
/// drained. `done` counts completions checked.
struct Guest {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<QueueLoad>>>,
}

impl Guest {
    fn start(vm: &Arc<Vm>, queues: u32) -> Guest {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (vm, flag, count) = (vm.clone(), stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let dev = Device::probe(vm.clone()).unwrap();
            dev.enable().unwrap();
            let pool = vm.dma_pool().unwrap();
            let mut loads: Vec<QueueLoad> = (0..queues)
                .map(|q| QueueLoad::new(&dev, &pool, q))
                .collect();
            while !flag.load(Ordering::Acquire) {
                let mut got = 0;
                for l in &mut loads {
                    l.fill();
                    got += l.reap();
                }
                count.fetch_add(got as u64, Ordering::Release);
                if got == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while loads.iter().any(|l| !l.out.is_empty()) {
                assert!(Instant::now() < deadline, "jobs never completed");
                for l in &mut loads {
                    l.reap();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            loads
        });
        Guest {
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Waits until `more` further jobs have been checked.
    fn progress(&self, more: u64) {
        let want = self.done.load(Ordering::Acquire) + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.done.load(Ordering::Acquire) < want {
            assert!(
                self.thread.as_ref().is_some_and(|t| !t.is_finished()),
                "the guest failed"
            );
            assert!(Instant::now() < deadline, "the guest made no progress");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops, drains and returns the queues; every job submitted completed
    /// once (a gap in the ring stalls the driver, whose phase-bit reading
    /// stops at it, and fails the drain).
    fn finish(mut self) -> Vec<QueueLoad> {
        self.stop.store(true, Ordering::Release);
        let loads = self
            .thread
            .take()
            .unwrap()
            .join()
            .expect("the guest failed");
        for l in &loads {
            assert!(l.out.is_empty());
            assert_eq!(l.completed, l.next, "queue {}", l.index);
        }
        loads
    }
}

/// The device's count of completions on every queue (Q_COMPLETED), which
/// travels with the state.
fn device_completed(vm: &Vm, queues: u32) -> u64 {
    use wdvirt_guest::Mmio;
    (0..queues)
        .map(|q| {
            let off = u64::from(wdvirt_abi::regs::queue(q) + wdvirt_abi::regs::Q_COMPLETED);
            u64::from(vm.read32(0, off).unwrap())
        })
        .sum()
}

fn go(vm: &Vm, to: &std::path::Path) -> Result<Figures, MigrateError> {
    migrate::migrate(vm, to, &MigrateOptions::default(), &mut |_| {
        ControlFlow::Continue(())
    })
}

#[test]
fn a_loaded_vm_migrates_back_and_forth_between_two_daemons_every_job_once_and_right() {
    let n: u32 = std::env::var("WDVIRT_MIGRATIONS")
        .ok()
        .map(|v| v.parse().expect("WDVIRT_MIGRATIONS is a number"))
        .unwrap_or(20);
    let (_a, sa) = host("quad");
    let (_b, sb) = host("quad");
    let vm = boot(&sa);
    let guest = Guest::start(&vm, QUEUES);
    let sockets = [&sa, &sb];
    let (mut downtime, mut worst, mut rounds, mut stream, mut ram) =
        (Duration::ZERO, Duration::ZERO, 0, 0, 0);
    for i in 0..n {
        // Work in flight on every queue at each stop.
        guest.progress(40);
        let mut phases = Vec::new();
        let f = migrate::migrate(
            &vm,
            sockets[(i as usize + 1) % 2],
            &MigrateOptions::default(),
            &mut |p: &Progress| {
                phases.push(p.phase);
                ControlFlow::Continue(())
            },
        )
        .unwrap_or_else(|e| panic!("migration {i}: {e}"));
        assert_eq!(phases.first(), Some(&Phase::Connected));
        assert_eq!(phases.last(), Some(&Phase::Done));
        assert!(phases.contains(&Phase::PreCopy) && phases.contains(&Phase::StopCopy));
        assert!(f.ram_bytes >= RAM_SIZE, "all of RAM at least once");
        assert!(f.stream_bytes > 0 && f.pre_copy_rounds >= 1);
        downtime += f.downtime;
        worst = worst.max(f.downtime);
        rounds += f.pre_copy_rounds;
        stream += f.stream_bytes;
        ram += f.ram_bytes;
    }
    guest.progress(40);
    let loads = guest.finish();
    let total: u64 = loads.iter().map(|l| u64::from(l.next)).sum();
    // Every completion the device counted (Q_COMPLETED travels with the
    // state) is one the driver read: no ring slot skipped or read twice.
    assert_eq!(device_completed(&vm, QUEUES), total, "Q_COMPLETED went on");
    let reordered: u32 = loads.iter().map(|l| l.reordered).sum();
    for l in &loads {
        assert!(l.next > 2 * n, "queue {} ran only {} jobs", l.index, l.next);
    }
    eprintln!(
        "{n} migrations, {total} jobs checked ({reordered} completed before an older job): downtime mean {:?} worst {worst:?}, \
         {:.1} rounds, {} B stream, {} KiB RAM per migration",
        downtime / n.max(1),
        f64::from(rounds) / f64::from(n.max(1)),
        stream / u64::from(n.max(1)),
        ram / u64::from(n.max(1)) / 1024
    );
}

#[test]
fn a_destination_of_another_type_refuses_at_pre_copy_and_the_guest_runs_on() {
    let (_a, sa) = host("quad");
    let (_b, sb) = host("pair");
    let (_c, sc) = host("quad");
    let vm = boot(&sa);
    let guest = Guest::start(&vm, QUEUES);
    guest.progress(40);
    let mut phases = Vec::new();
    let e = migrate::migrate(&vm, &sb, &MigrateOptions::default(), &mut |p| {
        phases.push(p.phase);
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(e, MigrateError::Refused(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("refused") && msg.contains("source runs on"),
        "{msg}"
    );
    assert_eq!(phases, [Phase::Connected], "nothing copied");
    // The source still serves the guest, whose jobs go on verifying.
    guest.progress(100);
    // And it can still move to a destination that fits.
    go(&vm, &sc).unwrap();
    guest.progress(100);
    guest.finish();
}

#[test]
fn a_failure_or_a_cancel_before_the_destination_runs_leaves_the_source_running() {
    let (_a, sa) = host("quad");
    let (mut b, sb) = host("quad");
    let (_c, sc) = host("quad");
    let vm = boot(&sa);
    let guest = Guest::start(&vm, QUEUES);
    let on_a = vm.vmm();

    // Cancelled at each phase up to STOP_COPY (the source already stopped
    // there): the source runs again, the guest never notices.
    for at in [
        Phase::Connected,
        Phase::PreCopy,
        Phase::RamRound,
        Phase::StopCopy,
    ] {
        guest.progress(40);
        let e = migrate::migrate(&vm, &sb, &MigrateOptions::default(), &mut |p| {
            if p.phase == at {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
        assert!(matches!(e, MigrateError::Cancelled(p) if p == at), "{e:?}");
        assert!(Arc::ptr_eq(&vm.vmm(), &on_a), "still on the source");
        assert_eq!(
            on_a.migration().unwrap().mig_state().unwrap(),
            wdvirt::migration::MigState::Running
        );
    }
    guest.progress(100);

    // The destination's daemon dies while RAM is copied: the source runs on.
    let e = migrate::migrate(&vm, &sb, &MigrateOptions::default(), &mut |p| {
        if p.phase == Phase::RamRound {
            b.kill9();
        }
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(e, MigrateError::Failed { .. }), "{e:?}");
    assert!(e.to_string().contains("source runs on"), "{e}");
    assert!(Arc::ptr_eq(&vm.vmm(), &on_a));
    assert_eq!(
        on_a.migration().unwrap().mig_state().unwrap(),
        wdvirt::migration::MigState::Running
    );
    guest.progress(100);

    // A destination that is not there at all.
    let gone = sb.with_file_name("nobody.sock");
    let e = go(&vm, &gone).unwrap_err();
    assert!(matches!(e, MigrateError::Destination { .. }), "{e:?}");
    assert!(Arc::ptr_eq(&vm.vmm(), &on_a));
    assert_eq!(
        on_a.migration().unwrap().mig_state().unwrap(),
        wdvirt::migration::MigState::Running
    );
    guest.progress(40);

    // And then a good one; the source, still connected through the handle
    // kept here, is left in STOP with its dirty log stopped.
    go(&vm, &sc).unwrap();
    assert!(!Arc::ptr_eq(&vm.vmm(), &on_a));
    let mut c = on_a.migration().unwrap();
    assert_eq!(c.mig_state().unwrap(), wdvirt::migration::MigState::Stop);
    let r = c.dirty_report(RAM_BASE, RAM_SIZE, migrate::PAGE);
    assert!(
        matches!(r, Err(wdvirt::vmm::VmmError::Refused { errno, .. }) if errno == libc::EINVAL),
        "{r:?}"
    );
    drop(c);
    guest.progress(100);
    guest.finish();
}
