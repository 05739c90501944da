//! The scheduling core: which instance's jobs the engines take next, and
//! what each instance is charged. Plain data and arithmetic on a time passed
//! in: no threads, no locks, no queue pairs, so the tests drive it with a
//! simulated engine on a clock they move by hand.
//!
//! * **Fair share of engine time** (start-time fair queueing). Each tenant
//!   (an instance on this accelerator, by PASID) has a virtual time: the
//!   engine nanoseconds it has used, divided by its weight. The engines'
//!   next batch goes to the backlogged, eligible tenant whose virtual time
//!   plus the estimated cost of its jobs already dispatched is smallest. A
//!   job is charged what the engine measured when it ends, not bytes or a
//!   count: a 64 KiB deflate costs what it costs. An idle tenant takes no
//!   part, so its share goes to the busy ones at once (work-conserving);
//!   coming back, it starts from the current virtual time, with no credit
//!   for its rest.
//! * **Eligibility.** A tenant at its `max_in_flight` waits for a
//!   completion (cap); one whose token buckets (jobs/s, bytes/s) do not
//!   hold its next job waits for them to fill (rate); otherwise it waits
//!   only for its turn (share). Time in each state is accounted. A policy
//!   change is like coming back from idle: no credit for the time its old
//!   limits held the tenant back.
//! * **Batches.** The engines hold at most about `engines × QUANTUM_NS` of
//!   estimated work (and at least one job per engine), and are refilled
//!   when half of it is done, in batches from one queue: a batch of tiny
//!   copies is many jobs, one of large deflates is one. Per finished job:
//!   three hash-map look-ups, a pass over the waiting tenants
//!   (interference), and a dispatch only when the engines are hungry or
//!   the tenant left its cap ([`Fair::finished`] says which).
//! * **Queues of one tenant**: strict priority, equal priorities in turn.
//! * **Interference**: when a job ends, its engine time is added, for every
//!   other tenant that was waiting for its turn meanwhile, to what that
//!   tenant lost to this one.

use std::collections::VecDeque;

use super::Map;
use super::bucket::TokenBucket;
use super::policy::Policy;
use super::snapshot::{Interference, TenantSnapshot, Throttled};

/// An instance on one accelerator: its PASID.
pub type TenantId = u32;
/// One queue pair of a tenant.
pub type LaneId = u64;

/// Estimated engine time a batch may add, per engine.
pub const QUANTUM_NS: u64 = 200_000;
/// Jobs the engines may hold at once, per engine, however small.
pub const MAX_JOBS_PER_ENGINE: u32 = 512;
/// Most jobs in one batch.
pub const MAX_BATCH: usize = 64;
/// Jobs a queue may have waiting in the scheduler; more stay in its ring.
/// Queues of small jobs may hold more: enough for [`LANE_HOLD_NS`] of
/// engine time (up to [`LANE_HELD_MAX`]), so that a tenant of tiny jobs is
/// not left without work to show the scheduler while its worker is being
/// woken for more (and loses its share to the work-conserving rule).
pub const LANE_HELD: usize = 128;
pub const LANE_HELD_MAX: usize = 1024;
/// Engine time of the jobs a queue may hold waiting.
pub const LANE_HOLD_NS: u64 = 5_000_000;
/// Only jobs estimated to take at most this long run on a worker's
/// thread ([`Fair::lend`]): the hop to an engine thread and back costs
/// about 1 µs, as much as a small job (a copy of up to some 10 KiB) and
/// a fifth of one of 5 µs, and little beside a longer one; a worker
/// running long jobs would be late to its ring, its completions and a
/// stop, and leave the engine threads idle.
pub const LEND_JOB_NS: u64 = 5_000;
/// Bytes a job is counted as beyond its source, in the cost model (the
/// fixed cost of a job, however small).
const JOB_OVERHEAD_BYTES: u64 = 1024;

/// What the scheduler needs to know of a job.
pub trait Work {
    /// Source bytes (what a bytes/s limit counts).
    fn bytes(&self) -> u64;
    /// Jobs of one class cost about the same per byte (an opcode and, for
    /// compression, its level). Estimates are kept per tenant and class, so
    /// cheap jobs cannot make a batch of expensive ones look cheap.
    fn class(&self) -> u32;
}

impl Work for crate::accel::Job {
    fn bytes(&self) -> u64 {
        u64::from(self.src_len)
    }
    fn class(&self) -> u32 {
        use wdvirt_abi::Opcode;
        // Only a compression level changes what a byte costs; other
        // opcodes' `param` (a CRC seed, a fill byte, SHA-256 flags) does
        // not, and must not split their jobs into classes measured apart.
        let level = match self.op {
            Opcode::DeflateCompress | Opcode::ZlibCompress | Opcode::GzipCompress => {
                self.param.min(255) as u32
            }
            _ => 0,
        };
        u32::from(self.op as u8) | level << 8
    }
}

/// Jobs of one queue, for the engines.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<J> {
    pub lane: LaneId,
    pub jobs: Vec<J>,
}

/// Why a tenant with jobs waiting is not at the engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Nothing waiting.
    None,
    /// Eligible: waiting for its turn or for engine room.
    Share,
    /// Its token buckets do not hold its next job.
    Rate,
    /// At its `max_in_flight`.
    Cap,
}

#[derive(Debug)]
struct Lane<J> {
    tenant: TenantId,
    queue: u32,
    pending: VecDeque<J>,
    /// Jobs dispatched, not finished, and their summed estimate.
    in_flight: u32,
    est_in_flight: u64,
    /// Estimated engine time dispatched, for turns between equal queues.
    served_ns: u64,
    /// Refused jobs at its last offer: wake its worker when room opens.
    wants_wake: bool,
    /// Jobs it may hold waiting, from the estimate of its last offer.
    held_limit: usize,
    /// Closed: takes nothing more, waits only for its jobs to finish.
    closed: bool,
}

#[derive(Debug, Default)]
struct Account {
    engine_ns: u64,
    rate_ns: u64,
    cap_ns: u64,
    share_ns: u64,
    /// Engine time other tenants' jobs held while this one waited its turn.
    lost_to: Map<TenantId, u64>,
}

#[derive(Debug)]
struct Tenant {
    policy: Policy,
    /// Its lanes, highest priority first.
    lanes: Vec<LaneId>,
    /// Engine ns used / weight.
    vtime: f64,
    in_flight: u32,
    est_in_flight: u64,
    pending: usize,
    jobs: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    /// Engine ns per byte (source plus a fixed overhead), by job class.
    costs: Map<u32, f64>,
    wait: Wait,
    wait_since: u64,
    acct: Account,
}

impl Tenant {
    fn new(policy: Policy, now: u64) -> Tenant {
        let mut t = Tenant {
            policy: Policy::default(),
            lanes: Vec::new(),
            vtime: 0.0,
            in_flight: 0,
            est_in_flight: 0,
            pending: 0,
            jobs: None,
            bytes: None,
            costs: Map::default(),
            wait: Wait::None,
            wait_since: now,
            acct: Account::default(),
        };
        t.set_policy(policy, now);
        t
    }

    fn set_policy(&mut self, p: Policy, now: u64) {
        let tune = |old: Option<TokenBucket>, spec: Option<(u64, u64)>| {
            spec.map(|(rate, burst)| match old {
                Some(b) => b.retuned(rate, burst, now),
                None => TokenBucket::new(rate, burst, now),
            })
        };
        self.jobs = tune(self.jobs, p.jobs_bucket());
        self.bytes = tune(self.bytes, p.bytes_bucket());
        self.policy = p;
    }

    /// Virtual time counting what is dispatched and not yet charged.
    fn key(&self) -> f64 {
        self.vtime + self.est_in_flight as f64 / self.policy.weight() as f64
    }

    fn capped(&self) -> bool {
        self.policy
            .max_in_flight
            .is_some_and(|m| self.in_flight >= m)
    }

    /// Whether the buckets hold a job of `bytes` now.
    fn rate_allows(&self, bytes: u64) -> bool {
        self.jobs.as_ref().is_none_or(|b| b.allows(1))
            && self.bytes.as_ref().is_none_or(|b| b.allows(bytes))
    }

    /// When the buckets will hold a job of `bytes`.
    fn rate_ready_at(&self, bytes: u64) -> u64 {
        let j = self.jobs.as_ref().map_or(0, |b| b.ready_at(1));
        let b = self.bytes.as_ref().map_or(0, |b| b.ready_at(bytes));
        j.max(b)
    }

    /// A job's estimated engine time; `None` for a class not measured yet.
    fn estimate<J: Work>(&self, j: &J) -> Option<u64> {
        self.estimate_after(j, &mut None)
    }

    /// As [`Tenant::estimate`], for jobs taken in turn: `last` is the class
    /// looked up before and its cost, so a run of one class's jobs looks
    /// the class up once.
    fn estimate_after<J: Work>(&self, j: &J, last: &mut Option<(u32, Option<f64>)>) -> Option<u64> {
        let class = j.class();
        let per_byte = match *last {
            Some((c, per_byte)) if c == class => per_byte,
            _ => {
                let per_byte = self.costs.get(&class).copied();
                *last = Some((class, per_byte));
                per_byte
            }
        }?;
        Some(((j.bytes() + JOB_OVERHEAD_BYTES) as f64 * per_byte) as u64 + 1)
    }

    /// `j` ran for `engine_ns`: its class's cost moves an eighth of the way
    /// to what it cost. Jobs measured in turn keep their class's cost in
    /// `run` (taken out of the map, put back by [`Tenant::measured_end`]
    /// or when the next job is of another class), so a run of one class's
    /// jobs looks the class up once.
    fn measured<J: Work>(&mut self, j: &J, engine_ns: u64, run: &mut Option<(u32, f64)>) {
        if engine_ns == 0 {
            // Not run (the backend refused it): says nothing of its cost.
            return;
        }
        let sample = engine_ns as f64 / (j.bytes() + JOB_OVERHEAD_BYTES) as f64;
        let class = j.class();
        match run {
            Some((c, cost)) if *c == class => *cost = (*cost * 7.0 + sample) / 8.0,
            _ => {
                self.measured_end(run);
                let cost = self
                    .costs
                    .get(&class)
                    .map_or(sample, |c| (c * 7.0 + sample) / 8.0);
                *run = Some((class, cost));
            }
        }
    }

    /// Puts the cost a run of [`Tenant::measured`] holds back in the map.
    fn measured_end(&mut self, run: &mut Option<(u32, f64)>) {
        if let Some((class, cost)) = run.take() {
            self.costs.insert(class, cost);
        }
    }

    fn refill(&mut self, now: u64) {
        if let Some(b) = &mut self.jobs {
            b.refill(now);
        }
        if let Some(b) = &mut self.bytes {
            b.refill(now);
        }
    }

    /// Close the current wait interval at `now` and start `next`.
    fn enter(&mut self, next: Wait, now: u64) {
        // Engines report their end times from several threads: a time may
        // come a little behind the last one seen.
        let now = now.max(self.wait_since);
        let spent = now - self.wait_since;
        match self.wait {
            Wait::None => {}
            Wait::Share => self.acct.share_ns += spent,
            Wait::Rate => self.acct.rate_ns += spent,
            Wait::Cap => self.acct.cap_ns += spent,
        }
        self.wait = next;
        self.wait_since = now;
    }
}

/// The scheduling state of one accelerator. See the module documentation.
#[derive(Debug)]
pub struct Fair<J> {
    engines: u32,
    tenants: Map<TenantId, Tenant>,
    lanes: Map<LaneId, Lane<J>>,
    /// Tenants with jobs pending.
    backlog: Vec<TenantId>,
    /// Dispatched and not finished, over all tenants.
    out_jobs: u32,
    out_est: u64,
    /// Engines lent to callers running a batch on their own thread
    /// ([`Fair::lend`]): each batch's lane, and its share of `out_jobs`
    /// and `out_est`.
    lent: Vec<(LaneId, u32, u64)>,
    /// The virtual time of the last tenant served.
    vnow: f64,
    /// Lanes whose worker is to be woken (room opened).
    wakes: Vec<LaneId>,
}

impl<J: Work> Fair<J> {
    pub fn new(engines: u32) -> Fair<J> {
        Fair {
            engines: engines.max(1),
            tenants: Map::default(),
            lanes: Map::default(),
            backlog: Vec::new(),
            out_jobs: 0,
            out_est: 0,
            lent: Vec::new(),
            vnow: 0.0,
            wakes: Vec::new(),
        }
    }

    /// Apply `policy` to `tenant` (created if new). Jobs already taken stay
    /// where they are: nothing is dropped or repeated, only the next
    /// decisions change.
    pub fn set_policy(&mut self, tenant: TenantId, policy: Policy, now: u64) {
        let vnow = self.vnow;
        match self.tenants.get_mut(&tenant) {
            Some(t) => {
                t.set_policy(policy, now);
                // No credit carried into the new policy: a tenant its rate
                // limit (or cap) held has fallen behind in virtual time, and
                // with the limit lifted it would have the engines until it
                // caught up. While a limit holds, that lag is what lets its
                // tokens go at once when they come; it is bounded by them.
                t.vtime = t
                    .vtime
                    .max(vnow - t.est_in_flight as f64 / t.policy.weight() as f64);
            }
            None => {
                let mut t = Tenant::new(policy, now);
                t.vtime = self.vnow;
                self.tenants.insert(tenant, t);
            }
        }
        self.sort_lanes(tenant);
    }

    pub fn policy(&self, tenant: TenantId) -> Option<&Policy> {
        self.tenants.get(&tenant).map(|t| &t.policy)
    }

    /// Forget a tenant whose lanes are all gone (its instance stopped).
    pub fn remove_tenant(&mut self, tenant: TenantId) {
        let lanes: Vec<LaneId> = self
            .tenants
            .get(&tenant)
            .map(|t| t.lanes.clone())
            .unwrap_or_default();
        for l in lanes {
            self.remove_lane(l);
        }
        self.backlog.retain(|&t| t != tenant);
        self.tenants.remove(&tenant);
    }

    pub fn add_lane(&mut self, lane: LaneId, tenant: TenantId, queue: u32, now: u64) {
        if !self.tenants.contains_key(&tenant) {
            self.set_policy(tenant, Policy::default(), now);
        }
        self.lanes.insert(
            lane,
            Lane {
                tenant,
                queue,
                pending: VecDeque::new(),
                in_flight: 0,
                est_in_flight: 0,
                served_ns: 0,
                wants_wake: false,
                held_limit: LANE_HELD,
                closed: false,
            },
        );
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.lanes.push(lane);
        }
        self.sort_lanes(tenant);
    }

    fn sort_lanes(&mut self, tenant: TenantId) {
        let Some(t) = self.tenants.get_mut(&tenant) else {
            return;
        };
        let lanes = &self.lanes;
        let prio = |l: &LaneId| lanes.get(l).map_or(0, |l| t.policy.priority(l.queue));
        let mut order = std::mem::take(&mut t.lanes);
        order.sort_by_key(|l| std::cmp::Reverse(prio(l)));
        t.lanes = order;
    }

    /// Drop a lane's pending jobs (its queue is stopping); it takes no more.
    /// Returns how many were dropped. Its dispatched jobs still finish.
    pub fn close_lane(&mut self, lane: LaneId, now: u64) -> usize {
        let Some(l) = self.lanes.get_mut(&lane) else {
            return 0;
        };
        l.closed = true;
        l.wants_wake = false;
        let dropped = l.pending.len();
        l.pending.clear();
        let tenant = l.tenant;
        self.unpend(tenant, dropped, now);
        dropped
    }

    /// Take back a lane's pending jobs, oldest first; the lane stays open
    /// and its dispatched jobs still finish.
    pub fn withdraw(&mut self, lane: LaneId, now: u64) -> Vec<J> {
        let Some(l) = self.lanes.get_mut(&lane) else {
            return Vec::new();
        };
        let jobs: Vec<J> = l.pending.drain(..).collect();
        let tenant = l.tenant;
        self.unpend(tenant, jobs.len(), now);
        jobs
    }

    /// Forget a lane. Jobs of it still running are no longer counted as
    /// the engines' (their completions will name a lane that is gone).
    pub fn remove_lane(&mut self, lane: LaneId) {
        let Some(l) = self.lanes.remove(&lane) else {
            return;
        };
        self.out_jobs -= l.in_flight;
        self.out_est -= l.est_in_flight;
        if let Some(t) = self.tenants.get_mut(&l.tenant) {
            t.lanes.retain(|&x| x != lane);
            t.in_flight -= l.in_flight;
            t.est_in_flight -= l.est_in_flight;
            t.pending -= l.pending.len();
            if t.pending == 0 {
                self.backlog.retain(|&x| x != l.tenant);
            }
        }
    }

    fn unpend(&mut self, tenant: TenantId, n: usize, now: u64) {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.pending -= n;
            if t.pending == 0 && n > 0 {
                t.enter(Wait::None, now);
                self.backlog.retain(|&x| x != tenant);
            }
        }
    }

    /// Take jobs from a queue's ring: as many as it may hold waiting (a
    /// prefix of `jobs`); the rest stay in the ring and the lane is marked
    /// to be woken when room opens.
    pub fn offer(&mut self, lane: LaneId, jobs: &[J], now: u64) -> usize
    where
        J: Clone,
    {
        let Some(l) = self.lanes.get(&lane) else {
            return 0;
        };
        if l.closed {
            return 0;
        }
        let limit = jobs
            .first()
            .and_then(|j| self.tenants.get(&l.tenant)?.estimate(j))
            .map_or(LANE_HELD, |e| {
                ((LANE_HOLD_NS / e.max(1)) as usize).clamp(LANE_HELD, LANE_HELD_MAX)
            });
        let l = self.lanes.get_mut(&lane).expect("looked up above");
        l.held_limit = limit;
        let n = jobs.len().min(limit.saturating_sub(l.pending.len()));
        let was_idle = l.pending.is_empty();
        l.pending.extend(jobs[..n].iter().cloned());
        l.wants_wake |= n < jobs.len();
        let tenant = l.tenant;
        if n == 0 {
            return 0;
        }
        if was_idle {
            // No credit among the tenant's queues for a rest either.
            let floor = self.tenants[&tenant]
                .lanes
                .iter()
                .filter(|&&x| x != lane)
                .filter_map(|x| self.lanes.get(x))
                .filter(|x| !x.pending.is_empty())
                .map(|x| x.served_ns)
                .min();
            if let (Some(f), Some(l)) = (floor, self.lanes.get_mut(&lane)) {
                l.served_ns = l.served_ns.max(f);
            }
        }
        let vnow = self.vnow;
        let t = self
            .tenants
            .get_mut(&tenant)
            .expect("a lane's tenant exists");
        if t.pending == 0 {
            // Back from idle: no credit for the rest.
            t.vtime = t
                .vtime
                .max(vnow - t.est_in_flight as f64 / t.policy.weight() as f64);
            t.enter(Wait::Share, now);
            self.backlog.push(tenant);
        }
        t.pending += n;
        n
    }

    /// The engines not lent, and the jobs and estimate they hold.
    fn at_engines(&self) -> (u32, u32, u64) {
        let (jobs, est) = self
            .lent
            .iter()
            .fold((0, 0), |(j, e), &(_, lj, le)| (j + lj, e + le));
        (
            self.engines.saturating_sub(self.lent.len() as u32),
            self.out_jobs.saturating_sub(jobs),
            self.out_est.saturating_sub(est),
        )
    }

    fn engines_full(&self) -> bool {
        let (engines, jobs, est) = self.at_engines();
        engines == 0
            || jobs >= engines * MAX_JOBS_PER_ENGINE
            || (jobs >= engines && est >= u64::from(engines) * QUANTUM_NS)
    }

    /// Whether the engines are low enough to take more: below one job per
    /// engine, or under half their time budget (so batches are large).
    fn engines_hungry(&self) -> bool {
        let (engines, jobs, est) = self.at_engines();
        engines > 0 && (jobs < engines || est * 2 < u64::from(engines) * QUANTUM_NS)
    }

    /// An engine for `lane`'s worker to run its next batch on its own
    /// thread, without the hop to an engine thread and back: when an
    /// engine holds nothing, `lane` has nothing dispatched (its jobs keep
    /// their order) and its tenant's turn has come as it would for the
    /// engines (share, cap and rate). The batch is decided and charged as
    /// any other, and the engine counts as busy until
    /// [`Fair::give_back`]: meanwhile nothing else is dispatched to it.
    /// A batch of another lane of the tenant (a queue of higher priority,
    /// or served less) is returned as it is, not lent: the caller posts it
    /// to the engines.
    pub fn lend(&mut self, lane: LaneId, now: u64) -> Option<Batch<J>> {
        let l = self.lanes.get(&lane)?;
        let (engines, jobs, _) = self.at_engines();
        if l.closed || l.in_flight > 0 || l.pending.is_empty() || jobs >= engines {
            return None;
        }
        let tenant = l.tenant;
        if self.pick(now, None) != Some(tenant) {
            self.account_waits(now);
            return None;
        }
        let b = self.batch_of(tenant, now, Some(LEND_JOB_NS));
        self.account_waits(now);
        let b = b?;
        if b.lane == lane {
            let l = &self.lanes[&lane];
            self.lent.push((lane, l.in_flight, l.est_in_flight));
        }
        Some(b)
    }

    /// The engine lent for `lane`'s batch is back. Call before the jobs
    /// that ran are each [`Fair::finished`] (any the caller did not run
    /// go to the engines, dispatched as they are).
    pub fn give_back(&mut self, lane: LaneId) {
        if let Some(i) = self.lent.iter().position(|&(l, ..)| l == lane) {
            self.lent.swap_remove(i);
        }
    }

    /// Every batch the engines should take now, in order. Also brings the
    /// tenants' wait accounting up to `now`.
    pub fn dispatch(&mut self, now: u64) -> Vec<Batch<J>> {
        let mut out = Vec::new();
        if self.engines_hungry() {
            while !self.engines_full() {
                match self.next_batch(now) {
                    Some(b) => out.push(b),
                    None => break,
                }
            }
        }
        self.account_waits(now);
        out
    }

    /// A job of `lane` that an engine runs in slices has reached the end
    /// of one, after `engine_ns` on it so far: the next batch of the tenant
    /// owed the most, if that is another tenant owed more than `lane`'s (a
    /// lower virtual time, counting what each has in flight, and for the
    /// running tenant at least what its job has used so far, which its
    /// estimate may be far below), to run between the slices though the
    /// engines are not hungry. So a tenant of short jobs waits for a slice
    /// of a neighbour's long job, not for all of it. A backend that cannot
    /// slice never asks.
    pub fn dispatch_beside(&mut self, lane: LaneId, engine_ns: u64, now: u64) -> Option<Batch<J>> {
        let running = self.lanes.get(&lane)?.tenant;
        let t = self.tenants.get(&running)?;
        let running_key = t
            .key()
            .max(t.vtime + engine_ns as f64 / t.policy.weight() as f64);
        let batch = self
            .pick(now, Some(running))
            .filter(|id| self.tenants[id].key() < running_key)
            .and_then(|id| self.batch_of(id, now, None));
        self.account_waits(now);
        batch
    }

    /// The tenant whose turn it is, if any may go (other than `besides`).
    fn pick(&mut self, now: u64, besides: Option<TenantId>) -> Option<TenantId> {
        let mut best: Option<(f64, TenantId)> = None;
        for &id in &self.backlog {
            if Some(id) == besides {
                continue;
            }
            let t = self.tenants.get_mut(&id).expect("backlogged tenants exist");
            t.refill(now);
            let Some(head) = first_pending(&self.lanes, t) else {
                continue;
            };
            if t.capped() || !t.rate_allows(head) {
                continue;
            }
            let k = t.key();
            if best.is_none_or(|(bk, bid)| k < bk || (k == bk && id < bid)) {
                best = Some((k, id));
            }
        }
        best.map(|(_, id)| id)
    }

    fn next_batch(&mut self, now: u64) -> Option<Batch<J>> {
        let id = self.pick(now, None)?;
        self.batch_of(id, now, None)
    }

    /// The next batch of tenant `id`: at least one job, more while the
    /// engines' time budget lasts; with `job_ns`, only jobs estimated to
    /// take at most that long (none if the first is not).
    fn batch_of(&mut self, id: TenantId, now: u64, job_ns: Option<u64>) -> Option<Batch<J>> {
        let budget = u64::from(self.engines) * QUANTUM_NS;
        let room_ns = budget.saturating_sub(self.out_est);
        let room_jobs = (self.engines * MAX_JOBS_PER_ENGINE).saturating_sub(self.out_jobs);
        let t = self.tenants.get_mut(&id).expect("picked");
        let small = |e: Option<u64>| job_ns.is_none_or(|max| e.is_some_and(|e| e <= max));
        // The lane: the first of the top priority with work, in turn.
        let top = t
            .lanes
            .iter()
            .filter_map(|l| self.lanes.get(l))
            .find(|l| !l.pending.is_empty())
            .map(|l| t.policy.priority(l.queue))?;
        // Among those, the one served least so far.
        let lane_id = t
            .lanes
            .iter()
            .copied()
            .filter_map(|id| self.lanes.get(&id).map(|l| (id, l)))
            .filter(|(_, l)| !l.pending.is_empty() && t.policy.priority(l.queue) == top)
            .min_by_key(|(id, l)| (l.served_ns, *id))
            .map(|(id, _)| id)?;
        let lane = self.lanes.get_mut(&lane_id).expect("listed");
        if !small(t.estimate(lane.pending.front()?)) {
            return None;
        }
        self.vnow = self.vnow.max(t.key());
        let mut jobs = Vec::new();
        let mut est = 0u64;
        let mut last = None;
        let cap_room = t
            .policy
            .max_in_flight
            .map_or(u32::MAX, |m| m.saturating_sub(t.in_flight));
        while let Some(j) = lane.pending.front() {
            let n = jobs.len() as u32;
            // A class never measured goes alone, counted as a whole
            // quantum, until its first job says what it costs.
            let e = t.estimate_after(j, &mut last);
            let e_ns = e.unwrap_or(QUANTUM_NS);
            if !jobs.is_empty()
                && (jobs.len() >= MAX_BATCH
                    || e.is_none()
                    || !small(e)
                    || est + e_ns > room_ns
                    || n >= room_jobs
                    || n >= cap_room
                    || !t.rate_allows(j.bytes()))
            {
                break;
            }
            if let Some(b) = &mut t.jobs {
                b.take(1);
            }
            if let Some(b) = &mut t.bytes {
                b.take(j.bytes());
            }
            est += e_ns;
            jobs.push(lane.pending.pop_front().expect("front exists"));
            if e.is_none() {
                break;
            }
        }
        let n = jobs.len();
        lane.in_flight += n as u32;
        lane.est_in_flight += est;
        lane.served_ns += est;
        if lane.wants_wake && lane.pending.len() <= lane.held_limit / 2 {
            lane.wants_wake = false;
            self.wakes.push(lane_id);
        }
        t.in_flight += n as u32;
        t.est_in_flight += est;
        self.out_jobs += n as u32;
        self.out_est += est;
        self.unpend(id, n, now);
        Some(Batch {
            lane: lane_id,
            jobs,
        })
    }

    /// `job` of `lane` ended after `engine_ns` of engine time. Returns
    /// whether [`Fair::dispatch`] may now have something to do: jobs wait,
    /// and the engines are hungry or the job's tenant has just left its
    /// cap. (Otherwise nothing changed that a dispatch would act on: what
    /// waits for engine room waits for hunger, a rate for the timer.)
    pub fn finished(&mut self, lane: LaneId, job: &J, engine_ns: u64) -> bool {
        self.finished_all(lane, [(job, engine_ns)])
    }

    /// Jobs of `lane` ended, each after its engine time: as
    /// [`Fair::finished`] for each in turn, with the lane and its tenant
    /// looked up once.
    pub fn finished_all<'j>(
        &mut self,
        lane: LaneId,
        done: impl IntoIterator<Item = (&'j J, u64)>,
    ) -> bool
    where
        J: 'j,
    {
        let Some(l) = self.lanes.get_mut(&lane) else {
            return false;
        };
        let tenant = l.tenant;
        let t = self
            .tenants
            .get_mut(&tenant)
            .expect("a lane's tenant exists");
        let was_capped = t.capped();
        let (mut n, mut used_ns) = (0, 0);
        let mut run = None;
        for (job, engine_ns) in done {
            if l.in_flight == 0 {
                break;
            }
            // Each job gives back the average estimate of those in flight,
            // so the sums reach 0 together.
            let est = l.est_in_flight / u64::from(l.in_flight);
            l.in_flight -= 1;
            l.est_in_flight -= est;
            self.out_jobs -= 1;
            self.out_est -= est;
            t.in_flight -= 1;
            t.est_in_flight -= est;
            t.vtime += engine_ns as f64 / t.policy.weight() as f64;
            t.measured(job, engine_ns, &mut run);
            used_ns += engine_ns;
            n += 1;
        }
        t.measured_end(&mut run);
        if n == 0 {
            return false;
        }
        t.acct.engine_ns += used_ns;
        let uncapped = was_capped && !t.capped();
        for id in &self.backlog {
            if *id == tenant {
                continue;
            }
            if let Some(o) = self.tenants.get_mut(id)
                && o.wait == Wait::Share
            {
                *o.acct.lost_to.entry(tenant).or_default() += used_ns;
            }
        }
        !self.backlog.is_empty() && (uncapped || self.engines_hungry())
    }

    fn account_waits(&mut self, now: u64) {
        for id in &self.backlog {
            let t = self.tenants.get_mut(id).expect("backlogged tenants exist");
            let head = first_pending(&self.lanes, t).unwrap_or(0);
            let w = if t.capped() {
                Wait::Cap
            } else if !t.rate_allows(head) {
                Wait::Rate
            } else {
                Wait::Share
            };
            if w != t.wait {
                t.enter(w, now);
            }
        }
    }

    /// When a rate-limited tenant's buckets will hold its next job, if any
    /// tenant waits for that alone (the caller sets a timer).
    pub fn next_wake(&self) -> Option<u64> {
        self.backlog
            .iter()
            .filter_map(|id| {
                let t = &self.tenants[id];
                let head = first_pending(&self.lanes, t)?;
                (!t.capped() && !t.rate_allows(head)).then(|| t.rate_ready_at(head))
            })
            .min()
    }

    /// Lanes whose workers should now be woken.
    pub fn take_wakes(&mut self) -> Vec<LaneId> {
        std::mem::take(&mut self.wakes)
    }

    /// Jobs a lane holds waiting.
    pub fn lane_pending(&self, lane: LaneId) -> usize {
        self.lanes.get(&lane).map_or(0, |l| l.pending.len())
    }

    /// A tenant's accounting up to `now`.
    pub fn snapshot(&self, tenant: TenantId, now: u64) -> Option<TenantSnapshot> {
        let t = self.tenants.get(&tenant)?;
        let ongoing = now.saturating_sub(t.wait_since);
        let plus = |w: Wait, v: u64| if t.wait == w { v + ongoing } else { v };
        let mut lost: Vec<Interference> = t
            .acct
            .lost_to
            .iter()
            .map(|(&pasid, &engine_ns)| Interference {
                neighbour_pasid: pasid,
                engine_ns,
            })
            .collect();
        lost.sort_by_key(|i| (std::cmp::Reverse(i.engine_ns), i.neighbour_pasid));
        Some(TenantSnapshot {
            pasid: tenant,
            policy: t.policy.clone(),
            engine_ns: t.acct.engine_ns,
            jobs_waiting: t.pending as u64,
            throttled_ns: Throttled {
                rate: plus(Wait::Rate, t.acct.rate_ns),
                cap: plus(Wait::Cap, t.acct.cap_ns),
                share: plus(Wait::Share, t.acct.share_ns),
            },
            interference: lost,
        })
    }

    pub fn tenants(&self) -> Vec<TenantId> {
        let mut v: Vec<TenantId> = self.tenants.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Source bytes of the tenant's next job (its top lane's head), if any.
fn first_pending<J: Work>(lanes: &Map<LaneId, Lane<J>>, t: &Tenant) -> Option<u64> {
    t.lanes
        .iter()
        .filter_map(|l| lanes.get(l))
        .find_map(|l| l.pending.front())
        .map(Work::bytes)
}

#[cfg(test)]
#[path = "fair_tests.rs"]
mod tests;
