//! The scheduler as the device and the backends meet it: a decorator of
//! an [`Accelerator`] whose queue pairs ([`Lane`]s) queue jobs in the
//! scheduling core ([`Fair`]) and submit them to the backend's own queue
//! pairs when their turn comes.
//!
//! The decisions are taken where something changes, on the thread that
//! changed it, under one lock per accelerator: a queue worker offering a
//! batch, an engine finishing a job (the backend's [`EngineObserver`]
//! call, so a freed engine is refilled without waking anyone), and a timer
//! thread for the one event nothing else marks, a rate-limited instance's
//! bucket filling. An idle accelerator's timer sleeps without a deadline.
//!
//! Batches reach the backend in the order they were decided, whichever
//! thread decided them: a decision appends to one outbox under the lock,
//! and one thread at a time empties it, submitting outside the lock (see
//! [`Shared::deliver`]). With one engine, a queue's jobs therefore run, and
//! complete, in the order the queue submitted them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::{Condvar, Mutex, MutexGuard};

use super::Map;
use super::clock::MonotonicClock;
use super::fair::{Batch, Fair, LaneId, QUANTUM_NS, TenantId};
use super::policy::Policy;
use super::snapshot::TenantSnapshot;
use crate::accel::{
    AccelError, Accelerator, AddressSpace, EngineObserver, Job, JobResult, Pasid, QueuePair,
    SharedAccelerator, Wake,
};

/// How often the timer looks again at a rate-limited instance whose
/// tokens are there but whose jobs wait for engine room (completions
/// dispatch it first, as a rule).
const BUSY_RECHECK: Duration = Duration::from_millis(1);

struct LaneIo {
    qp: Arc<dyn QueuePair>,
    wake: Option<Wake>,
}

struct State {
    fair: Fair<Job>,
    lanes: Map<LaneId, LaneIo>,
    next_lane: LaneId,
    /// Batches decided and not yet submitted, oldest first.
    outbox: VecDeque<(Arc<dyn QueuePair>, Batch<Job>)>,
    /// A thread is emptying `outbox` (submitting outside the lock).
    delivering: bool,
    /// The deadline the timer thread sleeps to (`None`: no deadline).
    timer_at: Option<u64>,
    stop: bool,
}

impl State {
    /// A decided batch into the outbox, for its lane's queue pair (a lane
    /// closed meanwhile has had its jobs withdrawn: nothing to post).
    fn post(&mut self, b: Batch<Job>) {
        if let Some(io) = self.lanes.get(&b.lane) {
            self.outbox.push_back((io.qp.clone(), b));
        }
    }
}

struct Shared {
    state: Mutex<State>,
    timer: Condvar,
    clock: MonotonicClock,
}

/// What a decision leaves to do once it is taken: the wake-ups for queue
/// workers (its batches are in the outbox).
#[derive(Default)]
struct Pumped {
    wakes: Vec<Wake>,
}

impl Shared {
    /// Decide every batch that may go now and append it to the outbox. The
    /// caller has them submitted ([`Shared::deliver`]) and calls the
    /// wake-ups once the lock is released.
    fn pump(&self, st: &mut State, now: u64) -> Pumped {
        let mut out = Pumped::default();
        for b in st.fair.dispatch(now) {
            st.post(b);
        }
        if let Some(at) = st.fair.next_wake()
            && st.timer_at.is_none_or(|t| at < t)
        {
            self.timer.notify_one();
        }
        for l in st.fair.take_wakes() {
            if let Some(w) = st.lanes.get(&l).and_then(|io| io.wake.clone()) {
                out.wakes.push(w);
            }
        }
        out
    }

    /// Submit the outbox's batches to the backend, oldest first, each
    /// without the lock (the backend's submit, a channel send and an engine
    /// woken, is no one else's wait). One thread at a time does it: a
    /// thread that finds another delivering leaves its batches to it, so
    /// batches reach the backend in the order they were decided. Were each
    /// thread to submit its own, one preempted between its decision and its
    /// submit (a busy host) would let a later batch of the same queue pass
    /// it, and a younger job complete before an older one on one engine.
    /// Returns the wake-ups that a refused batch's re-pump decided.
    fn deliver(&self, st: &mut MutexGuard<'_, State>) -> Vec<Wake> {
        let mut wakes = Vec::new();
        if st.delivering {
            return wakes;
        }
        st.delivering = true;
        while let Some((qp, b)) = st.outbox.pop_front() {
            let res = MutexGuard::unlocked(st, || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| qp.submit(&b.jobs)))
            });
            // A backend that panics in submit: the next thread delivers the
            // rest of the outbox (the flag would otherwise stay set and no
            // batch on this accelerator would ever reach it again), and the
            // panic goes on to the caller (a connection thread contains it).
            let res = match res {
                Ok(r) => r,
                Err(panic) => {
                    st.delivering = false;
                    std::panic::resume_unwind(panic)
                }
            };
            match res {
                Ok(n) if n == b.jobs.len() => {}
                Ok(n) => {
                    // A backend queue pair takes all it is given: never here.
                    tracing::error!(
                        taken = n,
                        offered = b.jobs.len(),
                        "a backend queue pair took part of a batch"
                    );
                }
                Err(e) => {
                    // The backend is shutting down, or the queue closing:
                    // its jobs are gone with it.
                    tracing::warn!("the engines refused a batch: {e}");
                    // Their engine room is free again: other lanes' jobs
                    // may go now, as after any finished job.
                    let mut again = false;
                    for j in &b.jobs {
                        again |= st.fair.finished(b.lane, j, 0);
                    }
                    if again {
                        let now = self.clock.now_ns();
                        wakes.extend(self.pump(st, now).wakes);
                    }
                }
            }
        }
        st.delivering = false;
        wakes
    }

    /// Decide, deliver, release the lock, then wake the workers.
    fn pump_unlocked(&self, mut st: MutexGuard<'_, State>, now: u64) {
        let mut wakes = self.pump(&mut st, now).wakes;
        wakes.extend(self.deliver(&mut st));
        drop(st);
        for w in wakes {
            w();
        }
    }

    /// The timer thread: sleeps until a rate-limited instance may go again.
    fn timer_loop(&self) {
        let mut st = self.state.lock();
        while !st.stop {
            let now = self.clock.now_ns();
            match st.fair.next_wake() {
                Some(at) if at > now => {
                    st.timer_at = Some(at);
                    let _ = self.timer.wait_for(&mut st, Duration::from_nanos(at - now));
                }
                Some(_) => {
                    st.timer_at = None;
                    let mut wakes = self.pump(&mut st, now).wakes;
                    wakes.extend(self.deliver(&mut st));
                    if !wakes.is_empty() {
                        MutexGuard::unlocked(&mut st, || wakes.into_iter().for_each(|w| w()));
                    }
                    // Still due: the engines are full, and their
                    // completions pump. Look again in a while rather than
                    // spin on a deadline already past.
                    let now = self.clock.now_ns();
                    if st.fair.next_wake().is_some_and(|at| at <= now) {
                        st.timer_at = Some(now + BUSY_RECHECK.as_nanos() as u64);
                        let _ = self.timer.wait_for(&mut st, BUSY_RECHECK);
                    }
                }
                None => {
                    st.timer_at = None;
                    self.timer.wait(&mut st);
                }
            }
        }
    }
}

/// An accelerator whose engines take jobs in the scheduler's order. See
/// the module documentation.
pub struct ScheduledAccel {
    inner: SharedAccelerator,
    shared: Arc<Shared>,
    timer: Mutex<Option<JoinHandle<()>>>,
}

impl ScheduledAccel {
    /// Schedule `inner`'s `engines` engines.
    pub fn new(inner: SharedAccelerator, engines: usize) -> std::io::Result<Arc<ScheduledAccel>> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                fair: Fair::new(engines as u32),
                lanes: Map::default(),
                next_lane: 0,
                outbox: VecDeque::new(),
                delivering: false,
                timer_at: None,
                stop: false,
            }),
            timer: Condvar::new(),
            clock: MonotonicClock::default(),
        });
        let theirs = shared.clone();
        let timer = std::thread::Builder::new()
            .name(format!("wd-qos-{}", inner.name()))
            .spawn(move || theirs.timer_loop())?;
        Ok(Arc::new(ScheduledAccel {
            inner,
            shared,
            timer: Mutex::new(Some(timer)),
        }))
    }

    /// Apply `policy` to the instance of `pasid`, now: the jobs it has
    /// queued stay queued and its next turns follow the new policy.
    pub fn set_policy(&self, pasid: Pasid, policy: Policy) {
        let mut st = self.shared.state.lock();
        let now = self.shared.clock.now_ns();
        st.fair.set_policy(pasid, policy, now);
        self.shared.pump_unlocked(st, now);
    }

    pub fn policy(&self, pasid: Pasid) -> Option<Policy> {
        self.shared.state.lock().fair.policy(pasid).cloned()
    }

    /// Forget an instance that has stopped (its queues are closed).
    pub fn remove_tenant(&self, pasid: Pasid) {
        let mut st = self.shared.state.lock();
        st.fair.remove_tenant(pasid);
        let now = self.shared.clock.now_ns();
        self.shared.pump_unlocked(st, now);
    }

    /// The scheduler's accounting for the instance of `pasid`.
    pub fn snapshot(&self, pasid: Pasid) -> Option<TenantSnapshot> {
        let st = self.shared.state.lock();
        st.fair.snapshot(pasid, self.shared.clock.now_ns())
    }

    /// Every instance's accounting, by PASID.
    pub fn snapshots(&self) -> Vec<TenantSnapshot> {
        let st = self.shared.state.lock();
        let now = self.shared.clock.now_ns();
        st.fair
            .tenants()
            .into_iter()
            .filter_map(|t| st.fair.snapshot(t, now))
            .collect()
    }
}

impl Drop for ScheduledAccel {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.timer.notify_all();
        if let Some(t) = self.timer.lock().take()
            && t.join().is_err()
        {
            tracing::error!("the scheduler's timer thread panicked");
        }
    }
}

impl Accelerator for ScheduledAccel {
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
    fn set_dma_allowed(&self, pasid: Pasid, allowed: bool) -> Result<(), AccelError> {
        self.inner.set_dma_allowed(pasid, allowed)
    }
    fn quiesced(&self, pasid: Pasid, f: &mut dyn FnMut()) -> Result<(), AccelError> {
        self.inner.quiesced(pasid, f)
    }

    fn open_queue_pair(&self, pasid: Pasid, queue: u32) -> Result<Box<dyn QueuePair>, AccelError> {
        let qp: Arc<dyn QueuePair> = Arc::from(self.inner.open_queue_pair(pasid, queue)?);
        let id = {
            let mut st = self.shared.state.lock();
            let id = st.next_lane;
            st.next_lane += 1;
            let now = self.shared.clock.now_ns();
            st.fair.add_lane(id, pasid as TenantId, queue, now);
            st.lanes.insert(
                id,
                LaneIo {
                    qp: qp.clone(),
                    wake: None,
                },
            );
            id
        };
        qp.observe(Arc::new(LaneObserver {
            shared: Arc::downgrade(&self.shared),
            lane: id,
        }));
        Ok(Box::new(Lane {
            id,
            shared: self.shared.clone(),
            qp,
            runs_here: AtomicBool::new(true),
        }))
    }
}

/// The backend's report of a finished job, for one lane.
struct LaneObserver {
    shared: Weak<Shared>,
    lane: LaneId,
}

impl EngineObserver for LaneObserver {
    fn job_finished(&self, job: &Job, engine_ns: u64, end: Instant) {
        self.jobs_finished(&[(*job, engine_ns)], end);
    }

    fn between_slices(&self, _job: &Job, engine_ns: u64) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut st = shared.state.lock();
        let now = shared.clock.now_ns();
        let Some(b) = st.fair.dispatch_beside(self.lane, engine_ns, now) else {
            return;
        };
        st.post(b);
        shared.pump_unlocked(st, now);
    }

    fn jobs_finished(&self, done: &[(Job, u64)], end: Instant) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut st = shared.state.lock();
        // Most completions leave nothing to decide: the engines still hold
        // enough, and the jobs' instance was not held at its cap.
        let decide = st
            .fair
            .finished_all(self.lane, done.iter().map(|(job, ns)| (job, *ns)));
        if decide {
            let now = shared.clock.at(end);
            shared.pump_unlocked(st, now);
        }
    }
}

/// One queue pair as the device sees it: jobs wait here for their turn.
pub struct Lane {
    id: LaneId,
    shared: Arc<Shared>,
    qp: Arc<dyn QueuePair>,
    /// The backend may run jobs on a caller's thread (until its
    /// `run_here` says it never does).
    runs_here: AtomicBool,
}

impl Lane {
    /// `jobs` offered to the scheduler: the lock still held, the time,
    /// and how many it took.
    fn offer(&self, jobs: &[Job]) -> Result<(MutexGuard<'_, State>, u64, usize), AccelError> {
        let mut st = self.shared.state.lock();
        if !st.lanes.contains_key(&self.id) {
            return Err(AccelError::Closed);
        }
        let now = self.shared.clock.now_ns();
        let taken = st.fair.offer(self.id, jobs, now);
        if taken == 0 && !jobs.is_empty() && st.fair.lane_pending(self.id) == 0 {
            // Refused with nothing of ours waiting: the lane is closed.
            return Err(AccelError::Closed);
        }
        Ok((st, now, taken))
    }
}

impl QueuePair for Lane {
    fn submit(&self, jobs: &[Job]) -> Result<usize, AccelError> {
        let (st, now, taken) = self.offer(jobs)?;
        self.shared.pump_unlocked(st, now);
        Ok(taken)
    }

    /// Offered as [`QueuePair::submit`] offers, then, while the scheduler
    /// lends this lane an idle engine ([`Fair::lend`]), each batch it
    /// decides runs on the caller's thread ([`QueuePair::run_here`]) and
    /// is charged the CPU time it took there; what the backend leaves (a
    /// job only its own engines run) goes to its engines as decided.
    fn submit_inline(&self, jobs: &[Job], done: &mut Vec<JobResult>) -> Result<usize, AccelError> {
        let (mut st, mut now, taken) = self.offer(jobs)?;
        let mut ran = Vec::new();
        // This thread is the queue's worker: after a quantum of jobs here
        // the rest go to the engines, and it goes back to its ring.
        let mut here_ns = 0;
        while here_ns < QUANTUM_NS && self.runs_here.load(Ordering::Relaxed) {
            let Some(b) = st.fair.lend(self.id, now) else {
                break;
            };
            if b.lane != self.id {
                st.post(b);
                break;
            }
            let n = MutexGuard::unlocked(&mut st, || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.qp.run_here(&b.jobs, &mut ran)
                }))
            });
            st.fair.give_back(self.id);
            // A backend that panics: the engine is back, the batch's jobs
            // stay counted as dispatched (their lane's close forgets them),
            // and the panic goes on to the worker.
            let n = n.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let n = match n {
                Some(n) => n.min(b.jobs.len()),
                None => {
                    self.runs_here.store(false, Ordering::Relaxed);
                    0
                }
            };
            st.fair.finished_all(
                self.id,
                ran.iter().zip(&b.jobs).map(|((_, ns), job)| (job, *ns)),
            );
            here_ns += ran.iter().map(|(_, ns)| ns).sum::<u64>();
            done.extend(ran.drain(..).map(|(r, _)| r));
            if n < b.jobs.len() {
                st.post(Batch {
                    lane: self.id,
                    jobs: b.jobs[n..].to_vec(),
                });
                break;
            }
            now = self.shared.clock.now_ns();
        }
        self.shared.pump_unlocked(st, now);
        Ok(taken)
    }

    fn set_wake(&self, wake: Wake) {
        if let Some(io) = self.shared.state.lock().lanes.get_mut(&self.id) {
            io.wake = Some(wake);
        }
    }

    /// The scheduler is the backend's observer; nothing above it watches
    /// engine time (a second observer is ignored, as the trait allows).
    fn observe(&self, _observer: Arc<dyn EngineObserver>) {}

    fn completions(&self) -> &Receiver<JobResult> {
        self.qp.completions()
    }

    fn in_flight(&self) -> usize {
        let waiting = self.shared.state.lock().fair.lane_pending(self.id);
        waiting + self.qp.in_flight()
    }

    fn running(&self) -> usize {
        self.qp.running()
    }

    /// Jobs still waiting for their turn go back to the caller; those the
    /// backend has are its engines' to run.
    fn withdraw(&self) -> Vec<Job> {
        let mut st = self.shared.state.lock();
        let now = self.shared.clock.now_ns();
        let jobs = st.fair.withdraw(self.id, now);
        self.shared.pump_unlocked(st, now);
        jobs
    }

    /// Jobs still waiting for their turn are dropped without a result (as a
    /// backend drops the jobs no engine started), then the backend's queue
    /// pair is closed.
    fn close(&self) {
        {
            let mut st = self.shared.state.lock();
            let now = self.shared.clock.now_ns();
            st.fair.close_lane(self.id, now);
            self.shared.pump_unlocked(st, now);
        }
        self.qp.close();
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let io = {
            let mut st = self.shared.state.lock();
            st.fair.remove_lane(self.id);
            let io = st.lanes.remove(&self.id);
            let now = self.shared.clock.now_ns();
            self.shared.pump_unlocked(st, now);
            io
        };
        // The backend's queue pair goes last, outside the lock.
        drop(io);
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
