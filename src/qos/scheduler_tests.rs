//! The scheduler in front of the real software engines.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wdvirt_abi::{JobStatus, Opcode};

use super::*;
use crate::accel::soft::SoftAccel;
use crate::qos::fair::{LANE_HELD, LANE_HELD_MAX};

const TIMEOUT: Duration = Duration::from_secs(10);

fn nop(cookie: u64) -> Job {
    Job {
        op: Opcode::Nop,
        src: 0,
        src_len: 0,
        dst: 0,
        dst_len: 0,
        param: 0,
        ctx: 0,
        cookie,
        slot: 0,
    }
}

fn scheduled(engines: usize) -> Arc<ScheduledAccel> {
    ScheduledAccel::new(SoftAccel::new(engines), engines).unwrap()
}

/// Offer `jobs` until all are taken, waiting for the wake-up when refused.
fn submit_all(qp: &dyn QueuePair, jobs: &[Job], woken: &crossbeam_channel::Receiver<()>) {
    let mut sent = 0;
    while sent < jobs.len() {
        let n = qp.submit(&jobs[sent..]).unwrap();
        sent += n;
        if sent < jobs.len() {
            woken.recv_timeout(TIMEOUT).expect("woken when room opens");
        }
    }
}

fn waker(qp: &dyn QueuePair) -> crossbeam_channel::Receiver<()> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    qp.set_wake(Arc::new(move || {
        let _ = tx.try_send(());
    }));
    rx
}

#[test]
fn jobs_of_two_instances_each_complete_exactly_once_and_are_charged_to_their_own() {
    let accel = scheduled(2);
    accel.set_policy(
        1,
        Policy {
            weight: 300,
            ..Policy::default()
        },
    );
    let a = accel.open_queue_pair(1, 0).unwrap();
    let b = accel.open_queue_pair(2, 0).unwrap();
    let (wa, wb) = (waker(&*a), waker(&*b));
    let jobs: Vec<Job> = (0..2000).map(nop).collect();
    std::thread::scope(|s| {
        s.spawn(|| submit_all(&*a, &jobs, &wa));
        s.spawn(|| submit_all(&*b, &jobs, &wb));
    });
    for qp in [&a, &b] {
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let r = qp.completions().recv_timeout(TIMEOUT).expect("completion");
            assert_eq!(r.status, JobStatus::Ok);
            assert!(seen.insert(r.cookie), "cookie {} twice", r.cookie);
        }
        assert!(qp.completions().try_recv().is_err(), "an extra completion");
    }
    // The engine reports a job's time just after sending its result.
    let deadline = Instant::now() + TIMEOUT;
    let (sa, sb) = loop {
        let (sa, sb) = (accel.snapshot(1).unwrap(), accel.snapshot(2).unwrap());
        if (sa.engine_ns > 0 && sb.engine_ns > 0) || Instant::now() > deadline {
            break (sa, sb);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(sa.engine_ns > 0 && sb.engine_ns > 0, "each charged its own");
    assert_eq!(sa.policy.weight, 300);
    assert_eq!(sb.policy, Policy::default(), "an instance no policy named");
    assert_eq!((sa.jobs_waiting, sb.jobs_waiting), (0, 0));
}

#[test]
fn a_rate_limited_instance_is_served_by_the_timer_when_nothing_else_moves() {
    let accel = scheduled(1);
    accel.set_policy(
        4,
        Policy {
            jobs_per_sec: Some(200),
            burst_jobs: Some(1),
            ..Policy::default()
        },
    );
    let qp = accel.open_queue_pair(4, 0).unwrap();
    let t = Instant::now();
    assert_eq!(qp.submit(&(0..5).map(nop).collect::<Vec<_>>()).unwrap(), 5);
    for _ in 0..5 {
        qp.completions().recv_timeout(TIMEOUT).expect("completion");
    }
    // One at once, then one each 5 ms: no sooner (the limit holds).
    assert!(
        t.elapsed() >= Duration::from_millis(19),
        "{:?}",
        t.elapsed()
    );
    let s = accel.snapshot(4).unwrap();
    assert!(s.throttled_ns.rate >= 15_000_000, "{:?}", s.throttled_ns);
}

#[test]
fn a_full_queue_is_refused_then_woken_and_closing_drops_what_waits() {
    let accel = scheduled(1);
    // A cap of 0 jobs in flight is not a policy the YAML allows; a rate of
    // 1 job/s holds everything back just as well.
    accel.set_policy(
        9,
        Policy {
            jobs_per_sec: Some(1),
            burst_jobs: Some(1),
            ..Policy::default()
        },
    );
    let qp = accel.open_queue_pair(9, 0).unwrap();
    let woken = Arc::new(AtomicUsize::new(0));
    let w = woken.clone();
    qp.set_wake(Arc::new(move || {
        w.fetch_add(1, Ordering::SeqCst);
    }));
    let jobs: Vec<Job> = (0..3000).map(nop).collect();
    let mut taken = qp.submit(&jobs).unwrap();
    assert_eq!(taken, LANE_HELD, "a queue of unmeasured jobs holds 128");
    // One went to the engines at once, and once it is measured (a nop
    // costs next to nothing) the queue may hold more of them: offers are
    // taken until it is full, and then refused.
    loop {
        let n = qp.submit(&jobs[taken..]).unwrap();
        if n == 0 {
            break;
        }
        taken += n;
    }
    assert!(
        (LANE_HELD + 1..=LANE_HELD_MAX + 1).contains(&taken),
        "{taken} taken"
    );
    assert_eq!(qp.submit(&jobs[taken..]).unwrap(), 0, "full");
    let r = qp.completions().recv_timeout(TIMEOUT).unwrap();
    assert_eq!(r.cookie, 0);
    // Lifting the limit lets them go, and the refused worker is woken.
    accel.set_policy(9, Policy::default());
    let deadline = Instant::now() + TIMEOUT;
    while woken.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "never woken");
        std::thread::sleep(Duration::from_millis(1));
    }
    for _ in 1..taken {
        qp.completions().recv_timeout(TIMEOUT).expect("completion");
    }
    // Closing: what waits is dropped without a result, later offers fail.
    accel.set_policy(
        9,
        Policy {
            jobs_per_sec: Some(1),
            burst_jobs: Some(1),
            ..Policy::default()
        },
    );
    let more = qp.submit(&jobs[..50]).unwrap();
    assert_eq!(more, 50, "room again");
    qp.close();
    assert!(qp.submit(&jobs[..1]).is_err());
    std::thread::sleep(Duration::from_millis(20));
    let ran = qp.completions().try_iter().count();
    assert!(ran <= 1, "{ran} dropped jobs ran");
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn withdraw_gives_back_the_jobs_still_waiting_in_order_and_the_rest_still_complete() {
    let accel = scheduled(1);
    // One job a second after a burst of 3: almost everything waits.
    accel.set_policy(
        4,
        Policy {
            jobs_per_sec: Some(1),
            burst_jobs: Some(3),
            ..Policy::default()
        },
    );
    let qp = accel.open_queue_pair(4, 0).unwrap();
    let jobs: Vec<Job> = (0..40).map(nop).collect();
    let taken = qp.submit(&jobs).unwrap();
    let back = qp.withdraw();
    let started = taken - back.len();
    assert!(
        !back.is_empty() && started >= 1,
        "{taken} taken, {} back",
        back.len()
    );
    // The newest jobs come back, oldest first: exactly those not started.
    let cookies: Vec<u64> = back.iter().map(|j| j.cookie).collect();
    assert_eq!(cookies, (started as u64..taken as u64).collect::<Vec<_>>());
    let mut done: Vec<u64> = (0..started)
        .map(|_| qp.completions().recv_timeout(TIMEOUT).unwrap().cookie)
        .collect();
    done.sort();
    assert_eq!(done, (0..started as u64).collect::<Vec<_>>());
    assert!(
        qp.completions()
            .recv_timeout(Duration::from_millis(50))
            .is_err(),
        "a withdrawn job ran"
    );
    assert_eq!(qp.in_flight(), 0);
    // The lane stays open: the jobs can be offered again.
    assert!(qp.submit(&back[..1]).unwrap() <= 1);
}

/// A backend whose next submit, once armed, says so and then waits to be
/// let go: the thread delivering a batch held between the scheduler's
/// decision and the engines' queue, as a busy host's preemption holds it.
struct HeldSubmit {
    inner: Arc<SoftAccel>,
    armed: Arc<std::sync::atomic::AtomicBool>,
    entered: crossbeam_channel::Sender<()>,
    release: crossbeam_channel::Receiver<()>,
}

impl Accelerator for HeldSubmit {
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
        Ok(Box::new(HeldQp {
            inner: self.inner.open_queue_pair(pasid, queue)?,
            armed: self.armed.clone(),
            entered: self.entered.clone(),
            release: self.release.clone(),
        }))
    }
    fn set_dma_allowed(&self, pasid: Pasid, allowed: bool) -> Result<(), AccelError> {
        self.inner.set_dma_allowed(pasid, allowed)
    }
    fn quiesced(&self, pasid: Pasid, f: &mut dyn FnMut()) -> Result<(), AccelError> {
        self.inner.quiesced(pasid, f)
    }
}

struct HeldQp {
    inner: Box<dyn QueuePair>,
    armed: Arc<std::sync::atomic::AtomicBool>,
    entered: crossbeam_channel::Sender<()>,
    release: crossbeam_channel::Receiver<()>,
}

impl QueuePair for HeldQp {
    fn submit(&self, jobs: &[Job]) -> Result<usize, AccelError> {
        if self.armed.swap(false, Ordering::AcqRel) {
            let _ = self.entered.send(());
            let _ = self.release.recv_timeout(TIMEOUT);
        }
        self.inner.submit(jobs)
    }
    fn set_wake(&self, wake: Wake) {
        self.inner.set_wake(wake)
    }
    fn observe(&self, observer: Arc<dyn EngineObserver>) {
        self.inner.observe(observer)
    }
    fn completions(&self) -> &Receiver<JobResult> {
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

#[test]
fn a_batch_held_on_its_way_to_the_engine_is_not_overtaken_by_a_later_one() {
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (release, release_rx) = crossbeam_channel::unbounded();
    let accel = ScheduledAccel::new(
        Arc::new(HeldSubmit {
            inner: SoftAccel::new(1),
            armed: armed.clone(),
            entered: entered_tx,
            release: release_rx,
        }),
        1,
    )
    .unwrap();
    let qp: Arc<dyn QueuePair> = Arc::from(accel.open_queue_pair(1, 0).unwrap());
    // Nops measured first: then a few cheap jobs leave the engine hungry,
    // so a second submit decides a batch of its own at once.
    for c in 0..8 {
        assert_eq!(qp.submit(&[nop(c)]).unwrap(), 1);
        qp.completions().recv_timeout(TIMEOUT).unwrap();
    }
    armed.store(true, Ordering::Release);
    let first = {
        let qp = qp.clone();
        std::thread::spawn(move || qp.submit(&(100..103).map(nop).collect::<Vec<_>>()))
    };
    entered
        .recv_timeout(TIMEOUT)
        .expect("the first batch is on its way");
    // Another thread (the engine refilling itself, another queue's worker)
    // decides the lane's next batch meanwhile.
    assert_eq!(
        qp.submit(&(103..106).map(nop).collect::<Vec<_>>()).unwrap(),
        3
    );
    std::thread::sleep(Duration::from_millis(20));
    release.send(()).unwrap();
    assert_eq!(first.join().unwrap().unwrap(), 3);
    let order: Vec<u64> = (0..6)
        .map(|_| qp.completions().recv_timeout(TIMEOUT).unwrap().cookie)
        .collect();
    assert_eq!(
        order,
        (100..106).collect::<Vec<_>>(),
        "one engine, one lane: FIFO"
    );
}
