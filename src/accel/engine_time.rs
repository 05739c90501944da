//! What a software engine has finished and not yet told its observers, and
//! what each of those jobs cost it.
//!
//! A job's engine time is the time the engine's thread spent on a CPU for
//! it, not the wall-clock time between its start and its end. On a host
//! with more runnable threads than cores the engine thread is preempted,
//! and wall-clock time bills the tenant whose job happened to be running
//! for time the host gave to somebody else: at 256 instances on 2 cores the
//! starved instances were charged 224 µs a job against 58 µs for the
//! others, which a fair scheduler answers by starving them further.
//!
//! The thread's CPU clock is a system call (about 0.2 µs here, against
//! 25 ns for the monotonic clock): read for every 64-byte copy it would
//! cost a tenth of the job. So it is read when jobs are reported (at most
//! [`RUN_JOBS`] jobs or [`RUN_NS`] of time together; before the engine
//! sleeps; between a long job's slices), and only once the thread has been
//! awake [`READ_NS`] since the last reading. The jobs reported are charged
//! their wall-clock time times the share of that awake time the thread
//! spent on a CPU. A run reported without a reading was awake less than
//! [`READ_NS`] since the last one, so no preemption in it lasted longer:
//! it is charged its wall-clock time, at most that much too much. A job
//! that measured its own CPU time (a sliced one, which reads the clock at
//! every slice) is charged exactly that.
//!
//! A run may hold jobs of several queue pairs; each observer is told of
//! its own, in the order they ended, with its lock taken once per stretch
//! of consecutive jobs.

use std::sync::Arc;
use std::time::Instant;

use super::{EngineObserver, Job};

/// A run is reported after this many jobs...
pub(super) const RUN_JOBS: usize = 32;
/// ...or this much wall-clock time on its jobs, so that no instance's
/// charge is late by more than this.
pub(super) const RUN_NS: u64 = 50_000;

/// The calling thread's CPU time, in ns.
pub(super) fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// The thread's CPU clock is read when it has been awake this long since
/// the last reading (and jobs are reported).
pub(super) const READ_NS: u64 = 100_000;

/// One engine's finished, unreported jobs, and its thread's time.
#[derive(Default)]
pub(super) struct Finished {
    /// The observers of this run's jobs, each once.
    observers: Vec<Arc<dyn EngineObserver>>,
    /// Each job with its time so far (wall-clock until reported)...
    jobs: Vec<(Job, u64)>,
    /// ...and its observer, an index into `observers`.
    whose: Vec<u8>,
    /// The jobs' wall-clock time, summed.
    wall_ns: u64,
    /// The thread's CPU time when last read...
    cpu_mark: u64,
    /// ...the time it has been awake since, up to when it last woke...
    awake_ns: u64,
    /// ...and when that was, while it is awake.
    woke: Option<Instant>,
}

impl Finished {
    /// Call on the engine's thread before its first job.
    pub(super) fn begin(&mut self) {
        self.cpu_mark = thread_cpu_ns();
    }

    /// A job is starting at `at` (the thread woke then if it slept).
    pub(super) fn job_starts(&mut self, at: Instant) {
        if self.woke.is_none() {
            self.woke = Some(at);
        }
    }

    /// The thread is about to sleep until more work comes (its finished
    /// jobs reported).
    pub(super) fn sleeps(&mut self) {
        if let Some(w) = self.woke.take() {
            self.awake_ns += w.elapsed().as_nanos() as u64;
        }
    }

    /// `job`, to be told to `observer`, ended after `wall_ns`. Returns
    /// whether the run is full (the caller reports it).
    pub(super) fn push(
        &mut self,
        observer: &Arc<dyn EngineObserver>,
        job: Job,
        wall_ns: u64,
    ) -> bool {
        let i = match self.observers.iter().position(|o| Arc::ptr_eq(o, observer)) {
            Some(i) => i,
            None => {
                self.observers.push(observer.clone());
                self.observers.len() - 1
            }
        };
        self.jobs.push((job, wall_ns));
        self.whose.push(i as u8);
        self.wall_ns += wall_ns;
        self.jobs.len() >= RUN_JOBS || self.wall_ns >= RUN_NS
    }

    /// `job` ended having measured its own CPU time, `cpu_ns`: the run so
    /// far is reported, then the job alone, as it is.
    pub(super) fn push_exact(
        &mut self,
        observer: &Arc<dyn EngineObserver>,
        job: Job,
        cpu_ns: u64,
        end: Instant,
    ) {
        self.report(Some(end));
        // The long job's time is in no later run's reading.
        self.read_cpu(Instant::now());
        self.push(observer, job, cpu_ns);
        self.tell(end);
    }

    /// Reports the run: scales its jobs' times to the thread's CPU time if
    /// it is time to read it, and tells each observer of its jobs (the
    /// last of the run ended at `end`; now if not known).
    pub(super) fn report(&mut self, end: Option<Instant>) {
        if self.jobs.is_empty() {
            return;
        }
        let now = Instant::now();
        let awake = self.awake_ns
            + self
                .woke
                .map_or(0, |w| now.saturating_duration_since(w).as_nanos() as u64);
        if awake >= READ_NS {
            let on_cpu = self.read_cpu(now);
            if on_cpu < awake {
                for (_, ns) in &mut self.jobs {
                    *ns = (u128::from(*ns) * u128::from(on_cpu) / u128::from(awake)) as u64;
                }
            }
        }
        self.tell(end.unwrap_or(now));
    }

    /// Reads the thread's CPU clock at `now`; returns the CPU time since
    /// the last reading, and starts the next awake time.
    fn read_cpu(&mut self, now: Instant) -> u64 {
        let cpu = thread_cpu_ns();
        let on_cpu = cpu.saturating_sub(self.cpu_mark);
        self.cpu_mark = cpu;
        self.awake_ns = 0;
        self.woke = Some(now);
        on_cpu
    }

    /// Tells each observer of its jobs, as they are.
    fn tell(&mut self, end: Instant) {
        let mut from = 0;
        while from < self.jobs.len() {
            let who = self.whose[from];
            let to = from + self.whose[from..].iter().take_while(|&&w| w == who).count();
            self.observers[who as usize].jobs_finished(&self.jobs[from..to], end);
            from = to;
        }
        self.observers.clear();
        self.jobs.clear();
        self.whose.clear();
        self.wall_ns = 0;
    }
}
