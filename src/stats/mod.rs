//! Counters that every stage updates and anyone may read: per instance and
//! per queue, plain atomics and an atomic latency histogram (no
//! process-global registry, no lock on the path a job takes), snapshotted
//! into serialisable structs for listings, `wdvirt stats`, `wdvirt top` and
//! Prometheus.
//!
//! Files by role: `latency` (the per-queue histogram and the clock stamped
//! into a job's cookie), `report` (what `wdvirt stats` shows: queues,
//! instances and VMs, and the scheduler's part), `prometheus` (the text
//! exposition of a report). Neighbours: `vdev` records into these counters
//! (its queue worker calls [`QueueStats::fetched`] and
//! [`QueueStats::completed`]); the daemon reads them. The job types come
//! from `accel`.

pub mod latency;
pub mod prometheus;
pub mod report;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;
use wdvirt_abi::JobStatus;

use crate::accel::{Job, JobResult};

pub use self::latency::Latency;

macro_rules! counters {
    ($(#[$m:meta])* $name:ident / $snap:ident { $($(#[$fm:meta])* $f:ident,)* }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name { $($(#[$fm])* pub $f: AtomicU64,)* }
        /// A point-in-time copy.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
        pub struct $snap { $(#[serde(default)] pub $f: u64,)* }
        impl $name {
            pub fn snapshot(&self) -> $snap { $snap { $($f: self.$f.load(Relaxed),)* } }
        }
        impl $snap {
            /// Adds `o`'s counts to these, field by field.
            pub fn add(&mut self, o: &$snap) { $(self.$f += o.$f;)* }
            /// The field-by-field sum of `all` (an instance's queues, say).
            pub fn total<'a>(all: impl IntoIterator<Item = &'a $snap>) -> $snap {
                all.into_iter().fold($snap::default(), |mut t, o| { t.add(o); t })
            }
        }
    };
}

counters! {
    /// The plain counters of one queue of one instance (see [`QueueStats`]).
    QueueCounters / QueueSnapshot {
        /// Descriptors the device took from the submission ring (each gets
        /// exactly one completion, unless the queue is stopped first).
        jobs_submitted,
        /// Jobs completed with status OK.
        jobs_ok,
        /// Jobs completed with an error status.
        jobs_failed,
        /// Jobs taken but never completed: the queue was stopped or reset
        /// while they were with the engines, or their completion entry
        /// could not be written.
        jobs_dropped,
        /// Source bytes of the jobs handed to an engine.
        bytes_in,
        /// Bytes written at `dst` by jobs completed OK.
        bytes_out,
        /// Doorbell writes received.
        doorbells,
        /// MSI-X interrupts raised.
        interrupts,
        /// Times the worker went to sleep with the doorbell armed.
        sleeps,
    }
}

/// Slots of [`QueueStats::by_status`]: one per `JobStatus` code, the last
/// for a code this build does not know (none today).
pub const STATUS_SLOTS: usize = 16;

/// One queue of one instance: its counters, failures by status, how full
/// its ring was at the worker's last look, and its latency histogram.
/// Written by the queue's worker thread only; read by anyone.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub counters: QueueCounters,
    /// Failed completions by `JobStatus` code (the OK slot stays 0: OKs
    /// are `jobs_ok`).
    pub by_status: [AtomicU64; STATUS_SLOTS],
    /// Submissions the guest had posted that the device had not taken yet,
    /// at the worker's last pass over the ring (at most its depth).
    pub ring_waiting: AtomicU64,
    /// Time from a job's fetch from the ring to its completion.
    pub latency: Latency,
}

impl std::ops::Deref for QueueStats {
    type Target = QueueCounters;
    /// The plain counters, by their old names (`stats.doorbells`).
    fn deref(&self) -> &QueueCounters {
        &self.counters
    }
}

impl QueueStats {
    pub fn snapshot(&self) -> QueueSnapshot {
        self.counters.snapshot()
    }

    /// The worker's pass over the submission ring: `taken` descriptors
    /// consumed for good (`sq_head` published past them: run, or refused
    /// with an error completion), `waiting` left behind (the guest's
    /// `sq_tail` minus the new head, at most the depth). Entries the
    /// scheduler did not take stay in the ring and are counted when taken.
    pub fn fetched(&self, taken: u32, waiting: u32) {
        self.ring_waiting.store(waiting as u64, Relaxed);
        if taken > 0 {
            add(&self.counters.jobs_submitted, taken as u64);
        }
    }

    /// Stamp the cookies of `batch`, the valid jobs about to be offered to
    /// an engine, with the time for [`QueueStats::completed`]. One clock
    /// read. A job the scheduler puts back is stamped again when offered
    /// again: latency runs from the offer that was taken.
    pub fn stamp(&self, batch: &mut [Job]) {
        let now = latency::now();
        for j in batch {
            j.cookie = latency::stamp(j.cookie, now);
        }
    }

    /// One completion written to the guest's ring; `now` is
    /// [`latency::now`] read once for the worker's pass.
    pub fn completed(&self, r: &JobResult, now: u32) {
        let c = &self.counters;
        if r.status == JobStatus::Ok {
            add(&c.jobs_ok, 1);
            add(&c.bytes_out, r.bytes as u64);
        } else {
            add(&c.jobs_failed, 1);
            let slot = (r.status.code() as usize).min(STATUS_SLOTS - 1);
            add(&self.by_status[slot], 1);
        }
        if let Some(since) = latency::stamped_at(r.cookie) {
            self.latency.record(latency::ns_between(since, now));
        }
    }

    /// The queue stopped with `n` jobs taken and not completed.
    pub fn dropped(&self, n: u64) {
        if n > 0 {
            add(&self.counters.jobs_dropped, n);
        }
    }

    /// Completions by status name, zero counts left out.
    pub fn failed_by_status(&self) -> std::collections::BTreeMap<String, u64> {
        self.by_status
            .iter()
            .enumerate()
            .filter(|(code, _)| *code != JobStatus::Ok.code() as usize)
            .filter_map(|(code, n)| {
                let n = n.load(Relaxed);
                (n > 0).then(|| (status_name(code as u16), n))
            })
            .collect()
    }
}

/// A status code's name as the device spec spells it (`BadAddress`).
pub fn status_name(code: u16) -> String {
    JobStatus::from_code(code).map_or_else(|| format!("code{code}"), |s| s.name().to_string())
}

counters! {
    /// One instance, beyond its queues.
    InstanceStats / InstanceSnapshot {
        /// BAR0 accesses refused (`ERR_COUNT` without saturation).
        register_errors,
        /// Doorbell writes to a queue that is not enabled.
        stray_doorbells,
        dma_maps,
        dma_unmaps,
        resets,
        /// Bus Master changes the engines did not take (a backend that
        /// could not grant or revoke the PASID's DMA).
        engine_dma_failures,
        /// Unmap-alls done without the engines quiesced first (a backend
        /// that could not quiesce the PASID): the maps are gone, but a job
        /// running then may have finished with the old memory.
        unquiesced_unmaps,
    }
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use wdvirt_abi::Opcode;

    fn job(tag: u32) -> Job {
        Job {
            op: Opcode::Copy,
            src: 0,
            src_len: 64,
            dst: 0,
            dst_len: 64,
            param: 0,
            ctx: 0,
            cookie: tag as u64,
            slot: 0,
        }
    }

    fn result(cookie: u64, status: JobStatus, bytes: u32) -> JobResult {
        JobResult {
            cookie,
            slot: 0,
            status,
            bytes,
            result: 0,
            stream_end: false,
        }
    }

    #[test]
    fn a_fetch_and_its_completions_are_counted_by_status_with_their_latency() {
        let s = QueueStats::default();
        let mut batch = [job(7), job(u32::MAX)];
        // Three taken: one was refused by the descriptor check (not in the batch).
        s.stamp(&mut batch);
        s.fetched(3, 5);
        assert_eq!(
            batch[0].cookie as u32, 7,
            "the guest's tag survives the stamp"
        );
        assert_eq!(batch[1].cookie as u32, u32::MAX);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let now = latency::now();
        s.completed(&result(batch[0].cookie, JobStatus::Ok, 64), now);
        s.completed(&result(batch[1].cookie, JobStatus::BadAddress, 0), now);
        // The refused one: never stamped, so counted but not timed.
        s.completed(&result(9, JobStatus::BadOpcode, 0), now);
        let snap = s.snapshot();
        assert_eq!(
            (
                snap.jobs_submitted,
                snap.jobs_ok,
                snap.jobs_failed,
                snap.bytes_out
            ),
            (3, 1, 2, 64)
        );
        assert_eq!(s.ring_waiting.load(Relaxed), 5);
        assert_eq!(
            s.failed_by_status(),
            [("BadAddress".to_string(), 1), ("BadOpcode".to_string(), 1)]
                .into_iter()
                .collect()
        );
        let h = s.latency.load().expect("two timed jobs");
        let l = latency::LatencySummary::of(Some(&h), s.latency.sum_ns());
        assert_eq!(l.count, 2);
        assert!(l.p50_ns >= 2_000_000 && l.max_ns < 2_000_000_000, "{l:?}");
    }

    #[test]
    fn an_empty_pass_updates_only_the_ring_level() {
        let s = QueueStats::default();
        s.fetched(0, 4);
        assert_eq!(s.ring_waiting.load(Relaxed), 4);
        assert_eq!(s.snapshot(), QueueSnapshot::default());
        assert!(
            s.latency.load().is_none(),
            "no histogram until a job is timed"
        );
    }
}
