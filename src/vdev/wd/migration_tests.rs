//! Migration driven the way a VMM drives it: two accelerator functions
//! (`PciFunction<WdDevice>`, each on its own software accelerator, each
//! with its own memfd guest RAM of the same layout), the guest driver of
//! `wdvirt_guest` running a continuous mixed load through one of them, and
//! a "VMM" that pauses the guest, quiesces the device (`Migratable`),
//! saves, wraps the state in the stream envelope, copies the guest's RAM,
//! has the other device check the compatibility block and restore, resumes
//! it and lets the guest go on there. The calls are the ones the transport
//! makes for MIG_DEVICE_STATE and MIG_DATA_READ/WRITE.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use sha2::Digest;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use wdvirt_abi::{CompletionEntry, JobStatus, Opcode, RegError, regs as r};
use wdvirt_guest::{
    Device, DmaAllocator, DmaError, DmaMemory, DmaPool, JobSpec, Mmio, MmioError, PoolBuffer,
};

use super::WdConfig;
use super::WdDevice;
use crate::accel::soft::SoftAccel;
use crate::accel::{
    AccelError, Accelerator, AddressSpace, EngineObserver, Job, JobResult, Pasid, QueuePair,
    SharedAccelerator, Wake,
};
use crate::migration::stream::{self, Compat, DEFAULT_MAX_STREAM, StreamError};
use crate::vdev::device::{DeviceError, DmaMapping, VfioUserDevice};
use crate::vdev::dma::tests::memfd;
use crate::vdev::pci::state::FunctionState;
use crate::vdev::pci::{Interrupts, PciFunction};

const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 16 << 20;
const CONFIG: u32 = 7;

type Function = PciFunction<WdDevice>;

/// Guest RAM as the VMM holds it: a memfd, mapped here.
struct Ram {
    file: File,
    mem: GuestMemoryMmap,
}

impl Ram {
    fn new() -> Arc<Ram> {
        let file = File::from(memfd(RAM_SIZE));
        let region = GuestRegionMmap::from_range(
            GuestAddress(RAM),
            RAM_SIZE as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )
        .unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        Arc::new(Ram { file, mem })
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; RAM_SIZE as usize];
        self.mem.read_slice(&mut v, GuestAddress(RAM)).unwrap();
        v
    }

    fn copy_to(&self, other: &Ram) {
        other
            .mem
            .write_slice(&self.bytes(), GuestAddress(RAM))
            .unwrap();
    }
}

/// One side: a function on its own engines, its RAM mapped for it.
struct Host {
    _accel: SharedAccelerator,
    sched: Arc<crate::qos::ScheduledAccel>,
    dev: Arc<Mutex<Function>>,
    ram: Arc<Ram>,
}

fn config(queues: u32, max_depth: u32) -> WdConfig {
    WdConfig {
        queues,
        max_depth,
        ..WdConfig::default()
    }
}

impl Host {
    fn new(cfg: WdConfig, pasid: u32, type_name: &str) -> Host {
        Host::on(SoftAccel::new(1), cfg, pasid, type_name)
    }

    fn on(accel: SharedAccelerator, cfg: WdConfig, pasid: u32, type_name: &str) -> Host {
        let sched = crate::qos::ScheduledAccel::new(accel.clone(), 1).unwrap();
        let interrupts = Interrupts::new(cfg.queues as u16);
        let mut model =
            WdDevice::new(cfg, sched.clone(), pasid, Arc::new(interrupts.clone())).unwrap();
        model.set_type_name(type_name);
        let mut dev = PciFunction::new(model, interrupts);
        let ram = Ram::new();
        dev.dma_map(DmaMapping {
            iova: RAM,
            size: RAM_SIZE,
            readable: true,
            writable: true,
            fd: Some((std::os::fd::OwnedFd::from(ram.file.try_clone().unwrap()), 0)),
        })
        .unwrap();
        // Memory decoding and bus mastering on, as a VMM and guest do.
        dev.region_write(CONFIG, 4, &0b110u16.to_le_bytes())
            .unwrap();
        Host {
            _accel: accel,
            sched,
            dev: Arc::new(Mutex::new(dev)),
            ram,
        }
    }

    fn compat(&self) -> Compat {
        self.dev.lock().migration().unwrap().compat()
    }

    /// What the source side of a VMM does from RUNNING to the end of
    /// STOP_COPY: quiesce, save, wrap in the envelope.
    fn stop_and_save(&self) -> Vec<u8> {
        let mut d = self.dev.lock();
        let m = d.migration().unwrap();
        let compat = m.compat();
        m.quiesce().unwrap();
        let state = m.save().unwrap();
        stream::encode(&compat, &state)
    }

    /// What the destination side does: check the envelope against its own
    /// compatibility block, stop, restore. Nothing changes on error.
    fn load(&self, s: &[u8]) -> Result<(), LoadError> {
        let mut d = self.dev.lock();
        let m = d.migration().unwrap();
        let state = stream::decode(s, &m.compat(), DEFAULT_MAX_STREAM)?;
        m.quiesce()?;
        m.restore(&state)?;
        Ok(())
    }

    fn resume(&self) {
        self.dev.lock().migration().unwrap().resume().unwrap();
    }

    fn saved(&self) -> Vec<u8> {
        self.dev.lock().migration().unwrap().save().unwrap()
    }
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// The guest's view: registers of whichever function it runs on now, and
/// that function's RAM. The VMM holds the write lock while it moves the
/// guest: that is the guest paused (vCPUs stopped).
struct Active {
    dev: Arc<Mutex<Function>>,
    ram: Arc<Ram>,
}

#[derive(Clone)]
struct Machine(Arc<RwLock<Active>>);

impl Machine {
    fn on(host: &Host) -> Machine {
        Machine(Arc::new(RwLock::new(Active {
            dev: host.dev.clone(),
            ram: host.ram.clone(),
        })))
    }
}

impl Mmio for Machine {
    fn read32(&self, bar: u8, offset: u64) -> Result<u32, MmioError> {
        // The guest stays on one function for the whole access: the VMM
        // cannot move it in the middle.
        let mut b = [0u8; 4];
        let a = self.0.read();
        a.dev
            .lock()
            .region_read(bar.into(), offset, &mut b)
            .map_err(|e| MmioError::Transport(e.to_string()))?;
        Ok(u32::from_le_bytes(b))
    }
    fn write32(&self, bar: u8, offset: u64, value: u32) -> Result<(), MmioError> {
        let a = self.0.read();
        a.dev
            .lock()
            .region_write(bar.into(), offset, &value.to_le_bytes())
            .map_err(|e| MmioError::Transport(e.to_string()))
    }
}

fn dma_err(addr: u64, len: usize) -> DmaError {
    DmaError::OutOfRange {
        addr,
        len: len as u64,
    }
}

impl DmaMemory for Machine {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let a = self.0.read();
        a.ram
            .mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| dma_err(addr, buf.len()))
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let a = self.0.read();
        a.ram
            .mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| dma_err(addr, data.len()))
    }
    fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        let a = self.0.read();
        a.ram
            .mem
            .load(GuestAddress(addr), std::sync::atomic::Ordering::Acquire)
            .map_err(|_| dma_err(addr, 4))
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), DmaError> {
        let a = self.0.read();
        a.ram
            .mem
            .store(
                value,
                GuestAddress(addr),
                std::sync::atomic::Ordering::Release,
            )
            .map_err(|_| dma_err(addr, 4))
    }
}

/// The VMM moves the running guest from `from` to `to`: pause the guest,
/// stop and save the source, copy RAM, load and resume the destination,
/// point the guest at it. Returns the device state that moved.
fn migrate(m: &Machine, from: &Host, to: &Host) -> FunctionState {
    let mut active = m.0.write();
    assert!(Arc::ptr_eq(&active.dev, &from.dev));
    let s = from.stop_and_save();
    from.ram.copy_to(&to.ram);
    to.load(&s).unwrap();
    to.resume();
    active.dev = to.dev.clone();
    active.ram = to.ram.clone();
    let state = stream::decode(&s, &to.compat(), DEFAULT_MAX_STREAM).unwrap();
    serde_json::from_slice(&state).unwrap()
}

/// Submissions in the rings the device had not taken at the stop (the
/// guest's `sq_tail` against the saved `sq_head`), over all queues.
fn untaken(st: &FunctionState, ram: &Ram) -> usize {
    st.model["queues"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| !q["ring"].is_null())
        .map(|q| {
            let idx = q["config"]["idx_base"].as_u64().unwrap();
            let tail: u32 = ram
                .mem
                .read_obj(GuestAddress(idx + wdvirt_abi::idx::SQ_TAIL))
                .unwrap();
            let head = q["ring"]["sq_head"].as_u64().unwrap() as u32;
            tail.wrapping_sub(head) as usize
        })
        .sum()
}

/// Jobs given back by the scheduler at the stop, over all queues.
fn pending_jobs(st: &FunctionState) -> usize {
    st.model["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["ring"]["pending"].as_array().map_or(0, Vec::len))
        .sum()
}

const SLOT_SRC: u64 = 8 << 10;
const SLOT_DST: u64 = 16 << 10;

/// What one tag's job was, to check its result.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Copy,
    Crc,
    Sha,
    Deflate,
}

/// Deterministic input of job `seq` on queue `q`: compressible text-like
/// bytes, different for every job.
fn input(q: u32, seq: u32, len: usize) -> Vec<u8> {
    wdvirt_guest::workload::gen_data(u64::from(q) << 32 | u64::from(seq), len)
}

/// One queue of the guest's load: rings kept full of mixed jobs, each
/// slot with its own buffers, each tag a sequence number.
struct QueueLoad {
    q: wdvirt_guest::Queue<Machine, Machine>,
    index: u32,
    src: PoolBuffer<Machine>,
    dst: PoolBuffer<Machine>,
    free: Vec<u32>,
    next: u32,
    /// tag -> (slot, kind, input)
    out: HashMap<u32, (u32, Kind, Vec<u8>)>,
    seen: Vec<bool>,
    completed: u64,
    /// Completions that came while an older job of the queue was still
    /// outstanding (with one engine the contract is submission order):
    /// their number and the first few as (tag, oldest outstanding tag).
    overtaken: u32,
    overtakes: Vec<(u32, u32)>,
}

impl QueueLoad {
    fn new(dev: &Device<Machine>, pool: &DmaPool<Machine>, index: u32, depth: u32) -> Self {
        let q = dev.queue(index, depth, dev.info().cap_ops, pool).unwrap();
        QueueLoad {
            q,
            index,
            src: pool.alloc(SLOT_SRC * u64::from(depth), 64).unwrap(),
            dst: pool.alloc(SLOT_DST * u64::from(depth), 64).unwrap(),
            free: (0..depth).collect(),
            next: 0,
            out: HashMap::new(),
            seen: Vec::new(),
            completed: 0,
            overtaken: 0,
            overtakes: Vec::new(),
        }
    }

    /// Fill every free slot.
    fn fill(&mut self) {
        let mut sqes = Vec::new();
        while let Some(slot) = self.free.pop() {
            let seq = self.next;
            self.next += 1;
            let kind = [Kind::Copy, Kind::Crc, Kind::Sha, Kind::Deflate][(seq % 4) as usize];
            let len = match kind {
                Kind::Deflate => 8 << 10,
                _ => 4 << 10,
            };
            let data = input(self.index, seq, len);
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

    /// Take every completion written and check each against its input.
    fn reap(&mut self) -> usize {
        let mut cqes = Vec::new();
        self.q.poll(&mut cqes).unwrap();
        for c in &cqes {
            self.check(c);
        }
        cqes.len()
    }

    fn check(&mut self, c: &CompletionEntry) {
        // Tags are submission sequence numbers: the oldest job outstanding
        // is the smallest tag not yet completed.
        if let Some(&oldest) = self.out.keys().min()
            && oldest != c.tag
        {
            self.overtaken += 1;
            if self.overtakes.len() < 8 {
                self.overtakes.push((c.tag, oldest));
            }
        }
        let (slot, kind, data) = self.out.remove(&c.tag).unwrap_or_else(|| {
            panic!(
                "queue {}: tag {} completed twice or never submitted",
                self.index, c.tag
            )
        });
        let tag = c.tag as usize;
        if self.seen.len() <= tag {
            self.seen.resize(tag + 1, false);
        }
        assert!(!self.seen[tag], "queue {}: tag {tag} twice", self.index);
        self.seen[tag] = true;
        assert_eq!(
            c.status,
            JobStatus::Ok.code(),
            "queue {} tag {}: {kind:?} failed",
            self.index,
            c.tag
        );
        let at = u64::from(slot) * SLOT_DST;
        match kind {
            Kind::Copy => assert_eq!(self.dst.to_vec_at(at, data.len()), data),
            Kind::Crc => assert_eq!(c.result, crate::accel::ops::crc32c(&data)),
            Kind::Sha => assert_eq!(
                self.dst.to_vec_at(at, 32),
                sha2::Sha256::digest(&data).to_vec()
            ),
            Kind::Deflate => {
                let packed = self.dst.to_vec_at(at, c.bytes as usize);
                let mut plain = vec![0u8; data.len()];
                let n = libdeflater::Decompressor::new()
                    .deflate_decompress(&packed, &mut plain)
                    .unwrap();
                assert_eq!(&plain[..n], &data[..], "queue {} tag {}", self.index, c.tag);
            }
        }
        self.free.push(slot);
        self.completed += 1;
    }
}

trait ReadAt {
    fn to_vec_at(&self, offset: u64, len: usize) -> Vec<u8>;
}

impl ReadAt for PoolBuffer<Machine> {
    fn to_vec_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(offset, &mut v).unwrap();
        v
    }
}

/// The guest: its queues, driven by one thread until told to stop.
struct Guest {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<QueueLoad>>>,
}

impl Guest {
    fn start(m: &Machine, queues: u32, depth: u32) -> Guest {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, flag) = (m.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let dev = Device::probe(m.clone()).unwrap();
            dev.enable().unwrap();
            let pool = DmaPool::new(m.clone(), DmaAllocator::new(RAM, RAM_SIZE).unwrap());
            let mut loads: Vec<QueueLoad> = (0..queues)
                .map(|q| QueueLoad::new(&dev, &pool, q, depth))
                .collect();
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                let mut got = 0;
                for l in &mut loads {
                    l.fill();
                    got += l.reap();
                }
                if got == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            // Drain: every job submitted must complete.
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
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<QueueLoad> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("the guest failed")
    }
}

/// Completions the guest has taken, over all queues (read while running).
fn wait_progress(m: &Machine, dev_queues: u32, at_least: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let total: u32 = (0..dev_queues)
            .map(|q| {
                m.read32(0, u64::from(r::queue(q) + r::Q_COMPLETED))
                    .unwrap()
            })
            .sum();
        if total >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no progress: {total} completions"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn completed_total(m: &Machine, queues: u32) -> u32 {
    (0..queues)
        .map(|q| {
            m.read32(0, u64::from(r::queue(q) + r::Q_COMPLETED))
                .unwrap()
        })
        .sum()
}

/// Owed interrupts count completions since the last interrupt, not jobs
/// in the ring: with a coalescing count past the depth (and Bus Master
/// cleared before it is reached) a source saves more than the depth, and
/// its peer takes that; past depth + count it is refused.
#[test]
fn owed_interrupts_past_the_depth_travel_up_to_the_coalescing_count() {
    let a = Host::new(config(4, 1024), 5, "all-4q");
    let m = Machine::on(&a);
    RawQueue::enable(&m, 32, 0, 0xffff << 16 | 100);
    let s = a.stop_and_save();
    let good: FunctionState =
        serde_json::from_slice(&stream::decode(&s, &a.compat(), DEFAULT_MAX_STREAM).unwrap())
            .unwrap();
    let dest = Host::new(config(4, 1024), 9, "all-4q");
    a.ram.copy_to(&dest.ram);
    for (owed, taken) in [(64u32, true), (132, true), (133, false)] {
        let mut st = good.clone();
        st.model["queues"][0]["ring"]["irq_pending"] = owed.into();
        let bytes = serde_json::to_vec(&st).unwrap();
        let got = dest.load(&stream::encode(&a.compat(), &bytes));
        match (got, taken) {
            (Ok(()), true) => {}
            (Err(LoadError::Device(e)), false) => {
                assert!(e.to_string().contains("133 owed interrupts"), "{e}")
            }
            (got, _) => panic!("{owed} owed interrupts: {got:?}"),
        }
    }
}

/// A read of a doorbell page latches WriteOnly with the offset in BAR2
/// (spec §2), which reaches past BAR0's 16 KiB once a function has more
/// than four queues: a state the source made is one its peer takes, so a
/// stray read of a high doorbell cannot keep a VM from migrating (or a
/// restarted daemon from adopting it). Any other code's offset stays
/// inside BAR0.
#[test]
fn a_doorbell_read_of_a_high_queue_page_travels_in_err_offset() {
    let a = Host::new(config(8, 1024), 5, "eight");
    let mut b = [0u8; 4];
    a.dev.lock().region_read(2, 0x5000, &mut b).unwrap();
    a.dev
        .lock()
        .region_read(0, u64::from(r::ERR_OFFSET), &mut b)
        .unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x5000, "queue 5's doorbell page");
    let s = a.stop_and_save();
    let dest = Host::new(config(8, 1024), 9, "eight");
    dest.load(&s).expect("a state the source produced");
    dest.resume();
    dest.dev
        .lock()
        .region_read(0, u64::from(r::ERR_OFFSET), &mut b)
        .unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x5000);
    dest.dev
        .lock()
        .region_read(0, u64::from(r::ERR_CODE), &mut b)
        .unwrap();
    assert_eq!(u32::from_le_bytes(b), RegError::WriteOnly.code() as u32);
    // Past the function's BAR2, or a BAR2 offset with another code: refused.
    let good: FunctionState =
        serde_json::from_slice(&stream::decode(&s, &a.compat(), DEFAULT_MAX_STREAM).unwrap())
            .unwrap();
    for (code, offset) in [
        (RegError::WriteOnly, 0x8000),
        (RegError::OutOfRange, 0x5000),
    ] {
        let mut st = good.clone();
        st.model["err"]["code"] = code.code().into();
        st.model["err"]["offset"] = offset.into();
        let bytes = serde_json::to_vec(&st).unwrap();
        let Err(LoadError::Device(e)) = dest.load(&stream::encode(&a.compat(), &bytes)) else {
            panic!("{code:?} at {offset:#x}: not refused by the device")
        };
        assert!(
            e.to_string().contains(&format!("ERR_OFFSET {offset:#x}")),
            "{code:?}: {e}"
        );
    }
}

#[test]
fn a_loaded_guest_migrated_back_and_forth_fifty_times_sees_every_job_once_and_right() {
    const QUEUES: u32 = 4;
    const DEPTH: u32 = 32;
    const ROUNDS: u32 = 50;
    let a = Host::new(config(QUEUES, 1024), 5, "all-4q");
    let b = Host::new(config(QUEUES, 1024), 9, "all-4q");
    let m = Machine::on(&a);
    let guest = Guest::start(&m, QUEUES, DEPTH);
    let mut hosts = [&a, &b];
    let mut before = 0;
    let (mut moved, mut waiting) = (0, 0);
    // At least ROUNDS stops, and on (up to four times as many) until the
    // stops have found both jobs in flight and entries not yet taken.
    let mut round = 0;
    while round < ROUNDS || (moved == 0 || waiting == 0) && round < 4 * ROUNDS {
        round += 1;
        // Work in flight on every queue at the moment of the stop.
        wait_progress(&m, QUEUES, before + 40);
        let st = migrate(&m, hosts[0], hosts[1]);
        moved += pending_jobs(&st);
        waiting += untaken(&st, &hosts[1].ram);
        hosts.swap(0, 1);
        // Q_COMPLETED travelled with the state: the count goes on.
        let now = completed_total(&m, QUEUES);
        assert!(now >= before + 40, "round {round}: {now} after {before}");
        before = now;
    }
    wait_progress(&m, QUEUES, before + 40);
    eprintln!("over {round} stops: {moved} jobs moved pending, {waiting} entries left in rings");
    assert!(moved > 0 && waiting > 0, "no stop found work in flight");
    let loads = guest.finish();
    for l in &loads {
        assert!(l.out.is_empty());
        assert_eq!(l.completed, u64::from(l.next), "queue {}", l.index);
        assert!(
            l.seen.iter().all(|&s| s),
            "queue {}: a tag never completed",
            l.index
        );
        assert!(
            l.next > 4 * ROUNDS,
            "queue {} ran only {} jobs",
            l.index,
            l.next
        );
        // One engine: completion order is submission order, across the
        // stops too.
        assert_eq!(
            l.overtaken, 0,
            "queue {}: completions before an older job's, first (tag, oldest outstanding): {:?}",
            l.index, l.overtakes
        );
    }
    let total: u64 = loads.iter().map(|l| l.completed).sum();
    assert_eq!(u64::from(completed_total(&m, QUEUES)), total);
    assert!(
        hosts[0]
            .dev
            .lock()
            .model()
            .enabled_state()
            .1
            .iter()
            .all(|&e| e),
        "every queue still enabled on the last destination"
    );
}

#[test]
fn jobs_a_rate_limit_holds_back_move_with_the_device_and_run_once_there() {
    const QUEUES: u32 = 2;
    let a = Host::new(config(QUEUES, 1024), 5, "zip");
    let b = Host::new(config(QUEUES, 1024), 9, "zip");
    // About 2000 jobs a second on each side: the scheduler holds most of
    // each ring back, so a stop finds jobs taken that no engine started.
    for (h, pasid) in [(&a, 5), (&b, 9)] {
        h.sched.set_policy(
            pasid,
            crate::qos::Policy {
                jobs_per_sec: Some(2000),
                burst_jobs: Some(4),
                ..crate::qos::Policy::default()
            },
        );
    }
    let m = Machine::on(&a);
    let guest = Guest::start(&m, QUEUES, 64);
    let mut hosts = [&a, &b];
    let mut before = 0;
    let mut moved = 0;
    for _ in 0..10 {
        wait_progress(&m, QUEUES, before + 10);
        let st = migrate(&m, hosts[0], hosts[1]);
        moved += pending_jobs(&st);
        hosts.swap(0, 1);
        before = completed_total(&m, QUEUES);
    }
    assert!(moved > 0, "no stop found a job held back by the scheduler");
    let loads = guest.finish();
    for l in &loads {
        assert_eq!(l.completed, u64::from(l.next), "queue {}", l.index);
        assert!(l.seen.iter().all(|&s| s), "queue {}", l.index);
    }
}

/// A busy host as the scheduler meets it: every `STALL_EVERY`th batch a
/// queue worker's thread hands the engines arrives `STALL` late, as when
/// the thread is preempted between the scheduler's decision and the
/// engines' queue (two cores shared with other work), while the engine
/// thread goes on running and refilling itself.
struct Preempted {
    inner: Arc<SoftAccel>,
    calls: Arc<std::sync::atomic::AtomicU32>,
}

const STALL_EVERY: u32 = 3;
const STALL: Duration = Duration::from_millis(2);

impl Preempted {
    fn new() -> Arc<Preempted> {
        Arc::new(Preempted {
            inner: SoftAccel::new(1),
            calls: Arc::default(),
        })
    }
}

impl Accelerator for Preempted {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn supported_ops(&self) -> u32 {
        self.inner.supported_ops()
    }
    fn max_xfer(&self) -> u32 {
        self.inner.max_xfer()
    }
    fn bind_pasid(&self, pasid: Pasid, space: AddressSpace) -> Result<(), AccelError> {
        self.inner.bind_pasid(pasid, space)
    }
    fn unbind_pasid(&self, pasid: Pasid) -> Result<(), AccelError> {
        self.inner.unbind_pasid(pasid)
    }
    fn open_queue_pair(&self, pasid: Pasid, queue: u32) -> Result<Box<dyn QueuePair>, AccelError> {
        Ok(Box::new(PreemptedQp {
            inner: self.inner.open_queue_pair(pasid, queue)?,
            calls: self.calls.clone(),
        }))
    }
    fn set_dma_allowed(&self, pasid: Pasid, allowed: bool) -> Result<(), AccelError> {
        self.inner.set_dma_allowed(pasid, allowed)
    }
    fn quiesced(&self, pasid: Pasid, f: &mut dyn FnMut()) -> Result<(), AccelError> {
        self.inner.quiesced(pasid, f)
    }
}

struct PreemptedQp {
    inner: Box<dyn QueuePair>,
    calls: Arc<std::sync::atomic::AtomicU32>,
}

impl QueuePair for PreemptedQp {
    fn submit(&self, jobs: &[Job]) -> Result<usize, AccelError> {
        let worker = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("wd-queue-"));
        if worker
            && self
                .calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % STALL_EVERY
                == STALL_EVERY - 1
        {
            std::thread::sleep(STALL);
        }
        self.inner.submit(jobs)
    }
    fn set_wake(&self, wake: Wake) {
        self.inner.set_wake(wake)
    }
    fn observe(&self, observer: Arc<dyn EngineObserver>) {
        self.inner.observe(observer)
    }
    fn completions(&self) -> &crossbeam_channel::Receiver<JobResult> {
        self.inner.completions()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn running(&self) -> usize {
        self.inner.running()
    }
    fn withdraw(&self) -> Vec<Job> {
        self.inner.withdraw()
    }
    fn close(&self) {
        self.inner.close()
    }
}

/// Each queue's completions, in the order the guest reads them, against
/// its submissions: with one engine the device keeps submission order, on
/// the source, across the stop (jobs the engine has finish there; the ones
/// the scheduler held go first on the destination) and there. The host is
/// busy (`Preempted`) and the scheduler holds jobs back (a cap of 16 in
/// flight, as the daemons' test type has), so stops find jobs pending.
#[test]
fn on_a_busy_host_each_queue_completes_in_submission_order_across_migrations() {
    const QUEUES: u32 = 4;
    const ROUNDS: u32 = 20;
    let a = Host::on(Preempted::new(), config(QUEUES, 1024), 5, "all-4q");
    let b = Host::on(Preempted::new(), config(QUEUES, 1024), 9, "all-4q");
    for (h, pasid) in [(&a, 5), (&b, 9)] {
        h.sched.set_policy(
            pasid,
            crate::qos::Policy {
                max_in_flight: Some(16),
                ..crate::qos::Policy::default()
            },
        );
    }
    let m = Machine::on(&a);
    let guest = Guest::start(&m, QUEUES, 32);
    let mut hosts = [&a, &b];
    let (mut before, mut moved) = (0, 0);
    for _ in 0..ROUNDS {
        wait_progress(&m, QUEUES, before + 40);
        moved += pending_jobs(&migrate(&m, hosts[0], hosts[1]));
        hosts.swap(0, 1);
        before = completed_total(&m, QUEUES);
    }
    wait_progress(&m, QUEUES, before + 40);
    assert!(moved > 0, "no stop found a job the scheduler held");
    let loads = guest.finish();
    for l in &loads {
        assert_eq!(l.completed, u64::from(l.next), "queue {}", l.index);
        assert_eq!(
            l.overtaken, 0,
            "queue {}: {} of {} completions came before an older job's; first (tag, oldest outstanding): {:?}",
            l.index, l.overtaken, l.completed, l.overtakes
        );
    }
}

#[test]
fn a_restore_onto_a_parked_device_reuses_its_queue_pairs() {
    // Each side's engines have exactly one queue pair per queue: a restore
    // that opened new ones beside the parked ones would find none free.
    let tight = || {
        SoftAccel::with_config(crate::accel::soft::SoftAccelConfig {
            engines: 1,
            max_queue_pairs: 2,
            ..Default::default()
        })
        .unwrap()
    };
    let a = Host::on(tight(), config(2, 1024), 5, "zip");
    let b = Host::on(tight(), config(2, 1024), 9, "zip");
    let m = Machine::on(&a);
    let guest = Guest::start(&m, 2, 32);
    let mut hosts = [&a, &b];
    let mut before = 0;
    for _ in 0..6 {
        wait_progress(&m, 2, before + 20);
        migrate(&m, hosts[0], hosts[1]);
        hosts.swap(0, 1);
        before = completed_total(&m, 2);
    }
    let loads = guest.finish();
    assert!(loads.iter().all(|l| l.completed == u64::from(l.next)));
}

#[test]
fn quiesce_and_resume_in_place_under_load_keep_every_job() {
    const QUEUES: u32 = 2;
    let a = Host::new(config(QUEUES, 1024), 5, "zip");
    let m = Machine::on(&a);
    let guest = Guest::start(&m, QUEUES, 64);
    let mut before = 0;
    for _ in 0..20 {
        wait_progress(&m, QUEUES, before + 30);
        {
            let _paused = m.0.write();
            let mut d = a.dev.lock();
            let mig = d.migration().unwrap();
            mig.quiesce().unwrap();
            let saved = mig.save().unwrap();
            // A second quiesce is no change, and saves the same state.
            mig.quiesce().unwrap();
            assert_eq!(mig.save().unwrap(), saved);
            mig.resume().unwrap();
        }
        before = completed_total(&m, QUEUES);
    }
    let loads = guest.finish();
    for l in &loads {
        assert_eq!(l.completed, u64::from(l.next));
        assert!(l.seen.iter().all(|&s| s));
    }
}

#[test]
fn after_quiesce_the_device_writes_no_guest_memory_and_refuses_region_writes() {
    let a = Host::new(config(2, 1024), 5, "zip");
    let m = Machine::on(&a);
    let guest = Guest::start(&m, 2, 64);
    wait_progress(&m, 2, 50);
    let paused = m.0.write();
    a.dev.lock().migration().unwrap().quiesce().unwrap();
    let ram = a.ram.bytes();
    std::thread::sleep(Duration::from_millis(100));
    assert!(ram == a.ram.bytes(), "guest memory changed after quiesce");
    // A doorbell, a register write, a config write: refused, nothing started.
    let mut d = a.dev.lock();
    for (region, offset) in [(2u32, 0u64), (0, u64::from(r::DEV_CTRL)), (CONFIG, 4)] {
        let err = d.region_write(region, offset, &[0; 4]).unwrap_err();
        assert_eq!(err.errno(), libc::EBUSY as u32, "region {region}");
    }
    assert!(ram == a.ram.bytes());
    // Reads still answer (a VMM may look).
    let mut b = [0u8; 4];
    d.region_read(0, u64::from(r::ID), &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), r::ID_MAGIC);
    d.migration().unwrap().resume().unwrap();
    drop(d);
    drop(paused);
    let before = completed_total(&m, 2);
    wait_progress(&m, 2, before + 20);
    let loads = guest.finish();
    assert!(loads.iter().all(|l| l.completed == u64::from(l.next)));
}

/// A source with work in flight on every queue.
fn loaded_source() -> (Host, Machine, Guest) {
    let a = Host::new(config(4, 1024), 5, "all-4q");
    let m = Machine::on(&a);
    let guest = Guest::start(&m, 4, 32);
    wait_progress(&m, 4, 40);
    (a, m, guest)
}

#[test]
fn a_destination_of_another_shape_refuses_before_anything_and_the_source_runs_on() {
    let (a, m, guest) = loaded_source();
    let paused = m.0.write();
    let s = a.stop_and_save();
    let cases: [(Host, &str); 4] = [
        (
            Host::new(config(4, 1024), 9, "hash"),
            "type 'hash' here, 'all-4q' in the stream",
        ),
        (
            Host::new(config(2, 1024), 9, "all-4q"),
            "2 queues here, 4 in the stream",
        ),
        (
            Host::new(config(4, 512), 9, "all-4q"),
            "queue 0: depth limit 512 here, 1024 in the stream",
        ),
        (
            Host::new(
                WdConfig {
                    ops: 1 << Opcode::Copy as u32,
                    ..config(4, 1024)
                },
                9,
                "all-4q",
            ),
            "queue 0: operations",
        ),
    ];
    for (dest, says) in &cases {
        let before = dest.saved_running();
        let err = dest.load(&s).unwrap_err();
        assert!(err.to_string().contains(says), "{err} / {says}");
        assert!(matches!(
            err,
            LoadError::Stream(StreamError::Incompatible(_))
        ));
        assert_eq!(dest.saved_running(), before, "the destination changed");
    }
    // Another device ABI version in the stream (a newer source).
    let mut compat = a.compat();
    compat.abi_version += 1 << 16;
    let state = stream::decode(&s, &a.compat(), DEFAULT_MAX_STREAM).unwrap();
    let newer = stream::encode(&compat, &state);
    let err = cases[0].0.load(&newer).unwrap_err();
    assert!(err.to_string().contains("device ABI 1."), "{err}");
    // The source goes on where it stopped.
    a.resume();
    drop(paused);
    let before = completed_total(&m, 4);
    wait_progress(&m, 4, before + 40);
    let loads = guest.finish();
    assert!(loads.iter().all(|l| l.completed == u64::from(l.next)));
}

impl Host {
    /// The state of a destination that is running (not stopped): saved
    /// between a quiesce and a resume, so the comparison itself changes
    /// nothing.
    fn saved_running(&self) -> Vec<u8> {
        let mut d = self.dev.lock();
        let m = d.migration().unwrap();
        m.quiesce().unwrap();
        let s = m.save().unwrap();
        m.resume().unwrap();
        s
    }
}

#[test]
fn a_corrupted_state_in_a_valid_envelope_gets_a_typed_error_and_changes_nothing() {
    let (a, m, guest) = loaded_source();
    let paused = m.0.write();
    let s = a.stop_and_save();
    let dest = Host::new(config(4, 1024), 9, "all-4q");
    a.ram.copy_to(&dest.ram);
    // The destination holds a good state first, so "unchanged" means
    // something: its enabled queues, positions and registers.
    dest.load(&s).unwrap();
    let baseline = dest.saved();
    let good: FunctionState =
        serde_json::from_slice(&stream::decode(&s, &a.compat(), DEFAULT_MAX_STREAM).unwrap())
            .unwrap();
    type Corrupt = fn(&mut FunctionState);
    let cases: Vec<(&str, Corrupt, &str)> = vec![
        (
            "ring outside the maps",
            |st| st.model["queues"][1]["config"]["sq_base"] = (RAM + RAM_SIZE).into(),
            "queue 1: submission ring at 0x1100000",
        ),
        (
            "a completion ring straddling the end of the maps",
            |st| st.model["queues"][0]["config"]["cq_base"] = (RAM + RAM_SIZE - 64).into(),
            "queue 0: completion ring at 0x10fffc0 (+0x200)",
        ),
        (
            "depth over the limit",
            |st| st.model["queues"][2]["config"]["depth"] = 2048.into(),
            "queue 2: depth 2048",
        ),
        (
            "depth not a power of two",
            |st| st.model["queues"][0]["config"]["depth"] = 48.into(),
            "queue 0: depth 48",
        ),
        (
            "a queue missing",
            |st| {
                st.model["queues"].as_array_mut().unwrap().pop();
            },
            "the state has 3 queues, this instance 4",
        ),
        (
            "held results beyond the ring",
            |st| {
                let held: Vec<serde_json::Value> = (0..33)
                    .map(|t| serde_json::json!({"tag": t, "status": 0, "bytes": 0, "result": 0, "stream_end": false}))
                    .collect();
                st.model["queues"][0]["ring"]["held"] = held.into();
            },
            "queue 0: 33 held results, more than its depth 32",
        ),
        (
            "a huge interrupt count",
            |st| st.model["queues"][3]["ring"]["irq_pending"] = u32::MAX.into(),
            "queue 3: 4294967295 owed interrupts",
        ),
        (
            "positions that do not add up",
            |st| {
                let t = st.model["queues"][1]["ring"]["cq_tail"].as_u64().unwrap();
                st.model["queues"][1]["ring"]["cq_tail"] = (t.wrapping_sub(5) & 0xffff_ffff).into();
            },
            "queue 1: positions do not add up",
        ),
        (
            "a vector the function lacks",
            |st| st.model["queues"][0]["config"]["vector"] = 9.into(),
            "queue 0: MSI-X vector 9 (the function has 4)",
        ),
        (
            "operations the queue may not run",
            |st| st.model["queues"][0]["config"]["ops"] = u32::MAX.into(),
            "queue 0: operations 0xffffffff",
        ),
        (
            "a misaligned ring",
            |st| st.model["queues"][0]["config"]["cq_base"] = (RAM + 8).into(),
            "queue 0: completion ring address 0x100008 is not aligned",
        ),
        (
            "a PASID smuggled in",
            |st| st.model["pasid"] = 1.into(),
            "unknown field `pasid`",
        ),
        (
            "another model version",
            |st| st.model["version"] = 7.into(),
            "device state version 7",
        ),
        (
            "a read-only config register changed",
            |st| st.pci.config.push((0, 0xdead)),
            "config register vendor id",
        ),
        (
            "pending bits past the last vector",
            |st| st.pci.interrupts.msix_pba[0] = 1 << 40,
            "PBA word 0",
        ),
        (
            "an MSI-X table of another size",
            |st| {
                st.pci.interrupts.msix_entries.push([0, 0, 0, 1]);
            },
            "5 MSI-X entries, the function has 4",
        ),
        (
            "another function state version",
            |st| st.version = 2,
            "function state version 2",
        ),
    ];
    for (what, corrupt, says) in cases {
        let mut st = good.clone();
        corrupt(&mut st);
        let bytes = serde_json::to_vec(&st).unwrap();
        // A valid envelope around it: only the content is wrong.
        let Err(err) = dest.load(&stream::encode(&a.compat(), &bytes)) else {
            panic!("{what}: accepted")
        };
        let LoadError::Device(e) = &err else {
            panic!("{what}: refused by the envelope: {err}")
        };
        assert_eq!(e.errno(), libc::EINVAL as u32, "{what}: {e}");
        assert!(e.to_string().contains(says), "{what}: {e} / {says}");
        assert_eq!(dest.saved(), baseline, "{what}: the destination changed");
    }
    // Not JSON at all.
    let err = dest
        .load(&stream::encode(&a.compat(), b"\x00\xffgarbage"))
        .unwrap_err();
    assert!(err.to_string().contains("does not parse"), "{err}");
    assert_eq!(dest.saved(), baseline);
    dest.resume();
    a.resume();
    drop(paused);
    let loads = guest.finish();
    assert!(loads.iter().all(|l| l.completed == u64::from(l.next)));
}

#[test]
fn msix_and_config_space_travel_and_the_destination_keeps_its_own_eventfds() {
    let a = Host::new(config(2, 1024), 5, "zip");
    let b = Host::new(config(2, 1024), 9, "zip");
    {
        let mut d = a.dev.lock();
        // MSI-X enabled (control at 0x82), vector 1 programmed and masked,
        // left pending by a trigger; cache line size set.
        d.region_write(CONFIG, 0x82, &0x8000u16.to_le_bytes())
            .unwrap();
        let table = u64::from(wdvirt_abi::pci::MSIX_TABLE_OFFSET);
        for (k, v) in [0xfee0_0000u32, 0, 0x4041, 1].into_iter().enumerate() {
            d.region_write(0, table + 16 + 4 * k as u64, &v.to_le_bytes())
                .unwrap();
        }
        d.region_write(CONFIG, 0x0c, &[0x10]).unwrap();
        d.interrupts().trigger_msix(1);
        assert_eq!(d.interrupts().msix_pending(1), Some(true));
    }
    let s = a.stop_and_save();
    b.load(&s).unwrap();
    b.resume();
    let mut d = b.dev.lock();
    let mut v = [0u8; 4];
    d.region_read(CONFIG, 0x82, &mut v[..2]).unwrap();
    assert_eq!(u16::from_le_bytes([v[0], v[1]]) & 0x8000, 0x8000);
    d.region_read(CONFIG, 0x0c, &mut v[..1]).unwrap();
    assert_eq!(v[0], 0x10);
    d.region_read(CONFIG, 4, &mut v[..2]).unwrap();
    assert_eq!(u16::from_le_bytes([v[0], v[1]]) & 0b110, 0b110);
    let table = u64::from(wdvirt_abi::pci::MSIX_TABLE_OFFSET);
    d.region_read(0, table + 16 + 8, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 0x4041);
    assert!(d.interrupts().msix_enabled());
    assert_eq!(d.interrupts().msix_pending(1), Some(true));
    assert_eq!(
        d.interrupts().msix_has_eventfd(1),
        Some(false),
        "no fd from the stream"
    );
}

#[test]
fn save_needs_a_stopped_device_and_a_reset_leaves_the_stop() {
    let a = Host::new(config(2, 1024), 5, "zip");
    let mut d = a.dev.lock();
    let m = d.migration().unwrap();
    assert_eq!(m.save().unwrap_err().errno(), libc::EBUSY as u32);
    assert_eq!(m.restore(b"{}").unwrap_err().errno(), libc::EBUSY as u32);
    m.quiesce().unwrap();
    m.save().unwrap();
    // VFIO migration v2: a reset goes back to RUNNING.
    d.reset().unwrap();
    assert!(!d.is_stopped());
    d.region_write(CONFIG, 4, &0b110u16.to_le_bytes()).unwrap();
}

/// The compatibility block names the ABI, the type, each queue's depth
/// limit and operations, and the transfer limit.
#[test]
fn the_compatibility_block_describes_the_instance() {
    let h = Host::new(
        WdConfig {
            queue_ops: {
                let mut o = [None; super::MAX_QUEUES];
                o[1] = Some(1 << Opcode::Crc32c as u32);
                o
            },
            ..config(2, 256)
        },
        5,
        "hash",
    );
    let c = h.compat();
    assert_eq!(c.abi_version, r::ABI_VERSION);
    assert_eq!(c.type_name, "hash");
    assert_eq!(c.queues.len(), 2);
    assert_eq!(c.queues[0].max_depth, 256);
    assert_eq!(c.queues[1].ops, 1 << Opcode::Crc32c as u32);
    assert_ne!(c.queues[0].ops, c.queues[1].ops);
}

/// 16 queues with rings in use stay well under a few tens of KiB.
#[test]
fn the_state_of_sixteen_queues_is_small() {
    let a = Host::new(config(16, 1024), 5, "big");
    let m = Machine::on(&a);
    let guest = Guest::start(&m, 16, 16);
    wait_progress(&m, 16, 100);
    let paused = m.0.write();
    let s = a.stop_and_save();
    assert!(s.len() < 16 << 10, "{} bytes", s.len());
    a.resume();
    drop(paused);
    drop(guest.finish());
}

/// Figures for docs/migration.md: the whole stream (envelope, compatibility
/// block, state) of an instance with its rings in use, and the time from
/// the quiesce to the end of the save on the source and from the restore to
/// the end of the resume on the destination. Run with
/// `cargo test --lib migration_tests::print_ -- --ignored --nocapture`.
#[test]
#[ignore = "prints figures"]
fn print_stream_size_and_device_stop_times() {
    for queues in [1u32, 4, 16] {
        let a = Host::new(config(queues, 1024), 5, "t");
        let b = Host::new(config(queues, 1024), 9, "t");
        let m = Machine::on(&a);
        let guest = Guest::start(&m, queues, 16);
        wait_progress(&m, queues, 20 * queues);
        // The destination stops before the downtime, when a VMM takes it
        // to RESUMING (at PRE_COPY): not timed below.
        b.dev.lock().migration().unwrap().quiesce().unwrap();
        let paused = m.0.write();
        let t0 = Instant::now();
        let s = a.stop_and_save();
        let stop = t0.elapsed();
        a.ram.copy_to(&b.ram);
        let t1 = Instant::now();
        b.load(&s).unwrap();
        b.resume();
        let start = t1.elapsed();
        let st: FunctionState =
            serde_json::from_slice(&stream::decode(&s, &a.compat(), DEFAULT_MAX_STREAM).unwrap())
                .unwrap();
        println!(
            "{queues:>2} queues: stream {:>6} bytes, {} jobs pending; quiesce+save {:>8.3} ms, restore+resume {:>7.3} ms",
            s.len(),
            pending_jobs(&st),
            stop.as_secs_f64() * 1e3,
            start.as_secs_f64() * 1e3
        );
        // Back to the source, so that the guest finishes where it began.
        b.dev.lock().migration().unwrap().quiesce().unwrap();
        let back = b.dev.lock().migration().unwrap().save().unwrap();
        b.ram.copy_to(&a.ram);
        a.load(&stream::encode(&b.compat(), &back)).unwrap();
        a.resume();
        drop(paused);
        drop(guest.finish());
    }
}

/// A hand-driven queue 0 at fixed addresses, for the paths the guest
/// driver never takes (an interrupt vector, Bus Master cleared under load).
struct RawQueue {
    depth: u32,
    tail: u32,
    head: u32,
}

const SQ: u64 = RAM;
const CQ: u64 = RAM + 0x1_0000;
const IDX: u64 = RAM + 0x2_0000;
const BUF: u64 = RAM + 0x10_0000;

impl RawQueue {
    fn enable(m: &Machine, depth: u32, vector: u32, coalesce: u32) -> RawQueue {
        let b = u64::from(r::queue(0));
        m.write32(0, u64::from(r::DEV_CTRL), r::DEV_CTRL_ENABLE)
            .unwrap();
        m.write64(0, b + u64::from(r::Q_SQ_BASE), SQ).unwrap();
        m.write64(0, b + u64::from(r::Q_CQ_BASE), CQ).unwrap();
        m.write64(0, b + u64::from(r::Q_IDX_BASE), IDX).unwrap();
        m.write32(0, b + u64::from(r::Q_DEPTH), depth).unwrap();
        let ops = m.read32(0, u64::from(r::CAP_OPS)).unwrap();
        m.write32(0, b + u64::from(r::Q_OPS), ops).unwrap();
        m.write32(0, b + u64::from(r::Q_MSIX_VECTOR), vector)
            .unwrap();
        m.write32(0, b + u64::from(r::Q_IRQ_COALESCE), coalesce)
            .unwrap();
        m.write32(0, b + u64::from(r::Q_CTRL), r::Q_CTRL_ENABLE)
            .unwrap();
        let status = m.read32(0, b + u64::from(r::Q_STATUS)).unwrap();
        assert_eq!(status, r::Q_STATUS_ENABLED);
        RawQueue {
            depth,
            tail: 0,
            head: 0,
        }
    }

    /// `n` copies of 64 KiB, each from its own buffer.
    fn submit_copies(&mut self, m: &Machine, n: u32) {
        self.submit(m, n, |i| {
            JobSpec::new(Opcode::Copy)
                .src(BUF + i * (128 << 10), 64 << 10)
                .dst(BUF + i * (128 << 10) + (64 << 10), 64 << 10)
        });
    }

    /// `n` SHA-256 digests of the same 1 MiB (a few ms each).
    fn submit_digests(&mut self, m: &Machine, n: u32) {
        self.submit(m, n, |i| {
            JobSpec::new(Opcode::Sha256)
                .src(BUF, 1 << 20)
                .dst(BUF + (2 << 20) + i * 64, 32)
        });
    }

    /// `n` deflates of the same 1 MiB at level 12 (tens of ms each), all
    /// into one output buffer (the jobs run one after another).
    fn submit_deflates(&mut self, m: &Machine, n: u32) {
        m.write(BUF, &input(0, 0, 1 << 20)).unwrap();
        self.submit(m, n, |_| {
            JobSpec::new(Opcode::DeflateCompress)
                .src(BUF, 1 << 20)
                .dst(BUF + (4 << 20), 1 << 20)
                .param(12)
        });
    }

    fn submit(&mut self, m: &Machine, n: u32, job: impl Fn(u64) -> JobSpec) {
        for _ in 0..n {
            let i = u64::from(self.tail % self.depth);
            let sqe = job(i).to_sqe(self.tail);
            m.write(SQ + i * 64, &sqe.to_bytes()).unwrap();
            self.tail += 1;
        }
        m.write_u32(IDX + wdvirt_abi::idx::SQ_TAIL, self.tail)
            .unwrap();
        m.write32(2, 0, self.tail).unwrap();
    }

    /// Completions written since the last call, by phase bit.
    fn reap(&mut self, m: &Machine) -> Vec<CompletionEntry> {
        let mut out = Vec::new();
        loop {
            let slot = u64::from(self.head % self.depth);
            let mut b = [0u8; 16];
            m.read(CQ + slot * 16, &mut b).unwrap();
            let c = CompletionEntry::from_bytes(&b);
            let phase = u16::from((self.head / self.depth).is_multiple_of(2));
            if c.flags & 1 != phase {
                break;
            }
            out.push(c);
            self.head += 1;
        }
        m.write_u32(IDX + wdvirt_abi::idx::CQ_HEAD, self.head)
            .unwrap();
        out
    }
}

/// MSI-X Enable in the function's capability (Message Control at 0x82).
fn enable_msix(h: &Host) {
    h.dev
        .lock()
        .region_write(CONFIG, 0x82, &0x8000u16.to_le_bytes())
        .unwrap();
}

#[test]
fn the_coalesced_interrupt_owed_at_the_stop_is_raised_before_quiesce_returns() {
    let a = Host::new(config(1, 1024), 5, "one");
    let b = Host::new(config(1, 1024), 9, "one");
    enable_msix(&a);
    let m = Machine::on(&a);
    // An interrupt every 100 completions or after 65 ms: three jobs leave
    // one owed for a long while.
    let mut q = RawQueue::enable(&m, 64, 0, 0xffff << 16 | 100);
    q.submit_copies(&m, 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < 3 {
        assert!(Instant::now() < deadline);
        done.extend(q.reap(&m));
    }
    let irq = |h: &Host| {
        let d = h.dev.lock();
        (
            d.interrupts().msix_pending(0),
            d.interrupts().msix_counters(0).unwrap().pending,
        )
    };
    assert_eq!(irq(&a), (Some(false), 0), "not yet raised: coalescing");
    let paused = m.0.write();
    let s = a.stop_and_save();
    // No eventfd: the raised vector is left pending in the PBA.
    assert_eq!(irq(&a), (Some(true), 1), "raised by the park");
    a.ram.copy_to(&b.ram);
    b.load(&s).unwrap();
    assert_eq!(b.dev.lock().interrupts().msix_pending(0), Some(true));
    b.resume();
    drop(paused);
    let st: FunctionState =
        serde_json::from_slice(&stream::decode(&s, &a.compat(), DEFAULT_MAX_STREAM).unwrap())
            .unwrap();
    assert_eq!(st.model["queues"][0]["ring"]["irq_pending"], 0);
}

#[test]
fn results_held_while_bus_master_is_off_travel_and_are_written_once_it_is_set() {
    // The stop must find a job on the engine: on a machine busy enough to
    // hold this thread for a whole job (a few ms) between the ring taken
    // and Bus Master off, none is, and the setup is tried again.
    let mut tries = 0;
    let (_a, b, m, mut q, st) = loop {
        tries += 1;
        let a = Host::new(config(1, 1024), 5, "one");
        let b = Host::new(config(1, 1024), 9, "one");
        let m = Machine::on(&a);
        let mut q = RawQueue::enable(&m, 64, r::NO_VECTOR, 0);
        q.submit_digests(&m, 60);
        // Every entry taken, most still waiting for the one engine.
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.read_u32(IDX + wdvirt_abi::idx::SQ_HEAD).unwrap() != 60 {
            assert!(Instant::now() < deadline, "the queue did not take its ring");
            std::thread::sleep(Duration::from_micros(100));
        }
        // Bus Master off with the engine busy: jobs reaching it now end
        // Aborted and their results wait for Bus Master.
        a.dev
            .lock()
            .region_write(CONFIG, 4, &0b010u16.to_le_bytes())
            .unwrap();
        let st = migrate(&m, &a, &b);
        let ring = &st.model["queues"][0]["ring"];
        if !ring["held"].as_array().unwrap().is_empty() {
            break (a, b, m, q, st);
        }
        assert!(tries < 5, "no result was held in {tries} tries: {ring}");
    };
    let ring = &st.model["queues"][0]["ring"];
    let held = ring["held"].as_array().unwrap().len();
    let written = ring["cq_tail"].as_u64().unwrap() as usize;
    assert_eq!(
        written + held + ring["pending"].as_array().unwrap().len(),
        60
    );
    // Nothing is written while Bus Master stays off on the destination...
    std::thread::sleep(Duration::from_millis(50));
    let mut tags: Vec<u32> = q.reap(&m).iter().map(|c| c.tag).collect();
    assert_eq!(tags.len(), written);
    // ...and everything once it is set: each job exactly once.
    b.dev
        .lock()
        .region_write(CONFIG, 4, &0b110u16.to_le_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tags.len() < 60 {
        assert!(Instant::now() < deadline, "{} of 60", tags.len());
        for c in q.reap(&m) {
            // Aborted: the job reached an engine while Bus Master was off.
            assert!(
                c.status == JobStatus::Aborted.code() || c.status == JobStatus::Ok.code(),
                "status {}",
                c.status
            );
            tags.push(c.tag);
        }
    }
    tags.sort();
    assert_eq!(tags, (0..60).collect::<Vec<_>>());
}

/// The fuzz target `device_state`'s seed, and what that target asserts,
/// over every truncation of it and a spread of single-bit flips: never a
/// panic; a refusal leaves the device's own state unchanged; an acceptance
/// saves to a state that restores to itself.
#[test]
fn a_stopped_device_takes_the_fuzz_seed_and_refuses_its_damaged_copies_unchanged() {
    let seed: &[u8] = include_bytes!("../../../fuzz/seeds/device_state/state");
    let a = Host::new(config(2, 64), 5, "t");
    let mut d = a.dev.lock();
    let m = d.migration().unwrap();
    m.quiesce().unwrap();
    m.restore(seed).expect("the seed is a valid state");
    let base = m.save().unwrap();
    let mut accepted = 0;
    let mut damaged: Vec<Vec<u8>> = (0..seed.len())
        .step_by(5)
        .map(|n| seed[..n].to_vec())
        .collect();
    for i in (0..seed.len()).step_by(3) {
        let mut v = seed.to_vec();
        v[i] ^= 1 << (i % 8);
        damaged.push(v);
    }
    for input in damaged {
        match m.restore(&input) {
            Err(e) => {
                assert_eq!(e.errno(), libc::EINVAL as u32, "{e}");
                assert_eq!(m.save().unwrap(), base, "refused, yet changed");
            }
            Ok(()) => {
                accepted += 1;
                let after = m.save().unwrap();
                m.restore(&after).unwrap();
                assert_eq!(m.save().unwrap(), after);
                m.restore(&base).unwrap();
            }
        }
    }
    // Flips inside numbers give other valid states; most damage is refused.
    assert!(
        accepted > 0 && accepted < seed.len() / 6,
        "{accepted} accepted"
    );
    m.resume().unwrap();
}

#[test]
fn a_quiesce_past_its_budget_fails_busy_and_the_queues_run_on_losing_nothing() {
    let a = Host::new(config(1, 1024), 5, "one");
    // A budget shorter than one job: deflating 1 MiB at level 12 takes
    // tens of milliseconds.
    a.dev
        .lock()
        .model_mut()
        .set_park_budget(Duration::from_micros(500));
    let m = Machine::on(&a);
    let mut q = RawQueue::enable(&m, 64, r::NO_VECTOR, 0);
    q.submit_deflates(&m, 6);
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.read_u32(IDX + wdvirt_abi::idx::SQ_HEAD).unwrap() != 6 {
        assert!(Instant::now() < deadline, "the queue did not take its ring");
        std::thread::sleep(Duration::from_micros(100));
    }
    {
        let mut d = a.dev.lock();
        let err = d.migration().unwrap().quiesce().unwrap_err();
        assert_eq!(err.errno(), libc::EBUSY as u32, "{err}");
        assert!(err.to_string().contains("not finished"), "{err}");
        assert!(
            !d.is_stopped(),
            "a failed quiesce leaves the device running"
        );
    }
    // Still running: registers take writes, and every job completes once.
    m.write32(2, 0, 6).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tags = Vec::new();
    while tags.len() < 6 {
        assert!(Instant::now() < deadline, "{} of 6", tags.len());
        for c in q.reap(&m) {
            assert_eq!(c.status, JobStatus::Ok.code());
            tags.push(c.tag);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    tags.sort();
    assert_eq!(tags, (0..6).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(20));
    assert!(q.reap(&m).is_empty(), "a job completed twice");
}

#[test]
fn unmapping_a_parked_queues_rings_stops_that_queue_as_when_running() {
    let a = Host::new(config(1, 1024), 5, "one");
    let m = Machine::on(&a);
    let _q = RawQueue::enable(&m, 64, r::NO_VECTOR, 0);
    let mut d = a.dev.lock();
    d.migration().unwrap().quiesce().unwrap();
    d.dma_unmap(RAM, RAM_SIZE).unwrap();
    let mut b = [0u8; 4];
    d.region_read(0, u64::from(r::queue(0) + r::Q_STATUS), &mut b)
        .unwrap();
    let status = u32::from_le_bytes(b);
    assert_eq!(status & r::Q_STATUS_ENABLED, 0);
    assert_eq!(
        status >> 8,
        u32::from(wdvirt_abi::RegError::RingUnmapped.code())
    );
    let st: FunctionState =
        serde_json::from_slice(&d.migration().unwrap().save().unwrap()).unwrap();
    assert!(st.model["queues"][0]["ring"].is_null(), "saved as disabled");
}
