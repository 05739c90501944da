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
//! 25 ns for the monotonic clock): read twice per 64-byte copy it would
//! cost a fifth of the job. So it is read twice per *run*: a run opens
//! with the first job after a report and closes when its jobs are reported
//! (at most [`RUN_JOBS`] jobs or [`RUN_NS`] of time; before the engine
//! sleeps; between a long job's slices). Each job of a run is charged its
//! wall-clock time times the share of the run the thread was on a CPU. A
//! job that measured its own CPU time (a sliced one, which reads the clock
//! at every slice) is charged exactly that.
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

/// One engine's finished, unreported jobs.
#[derive(Default)]
pub(super) struct Finished {
    /// The observers of this run's jobs, each once.
    observers: Vec<Arc<dyn EngineObserver>>,
    /// Each job with its time so far (wall-clock until the run closes)...
    jobs: Vec<(Job, u64)>,
    /// ...and its observer, an index into `observers`.
    whose: Vec<u8>,
    /// The jobs' wall-clock time, summed.
    wall_ns: u64,
    /// When the run opened, and the thread's CPU time then.
    opened: Option<(Instant, u64)>,
}

impl Finished {
    /// A job is starting at `at`: opens a run if none is open.
    pub(super) fn job_starts(&mut self, at: Instant) {
        if self.opened.is_none() {
            self.opened = Some((at, thread_cpu_ns()));
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
    /// far is reported, then the job alone.
    pub(super) fn push_exact(
        &mut self,
        observer: &Arc<dyn EngineObserver>,
        job: Job,
        cpu_ns: u64,
        end: Instant,
    ) {
        self.report(Some(end));
        self.push(observer, job, cpu_ns);
        self.report(Some(end));
    }

    /// Closes the run: scales its jobs' times to the thread's CPU time and
    /// tells each observer of its jobs (the last of the run ended at
    /// `end`; now if not known).
    pub(super) fn report(&mut self, end: Option<Instant>) {
        if let Some((wall0, cpu0)) = self.opened.take() {
            let wall = wall0.elapsed().as_nanos() as u64;
            let cpu = thread_cpu_ns().saturating_sub(cpu0);
            if cpu < wall {
                for (_, ns) in &mut self.jobs {
                    *ns = (u128::from(*ns) * u128::from(cpu) / u128::from(wall)) as u64;
                }
            }
        }
        if self.jobs.is_empty() {
            return;
        }
        let end = end.unwrap_or_else(Instant::now);
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
