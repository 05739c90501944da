//! Job latency: from the moment the device takes a descriptor from the
//! ring to the moment it writes the completion, so it includes any time the
//! job waited for an engine (or for the scheduler).
//!
//! The time a job was fetched travels in its cookie: the guest's tag fills
//! the low 32 bits (all the completion returns), so the device stamps the
//! high 32 with a flag and a coarse clock (64 ns ticks, 31 bits: it wraps
//! after 137 s, and a job older than that reads as younger). No table of
//! jobs in flight, no allocation, one clock read per batch and one per
//! completion. The histogram is `histogram`'s `AtomicHistogram`: one
//! relaxed `fetch_add` per job into a bucket, readable from any thread
//! while the worker records; allocated on a queue's first timed job, so an
//! idle instance pays nothing for it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use histogram::{AtomicHistogram, Histogram};
use serde::{Deserialize, Serialize};

/// log2 of ticks per nanosecond: 64 ns.
const TICK_SHIFT: u32 = 6;
const TICK_MASK: u64 = (1 << 31) - 1;
/// Set in a stamped cookie (an unstamped one never reached an engine).
const STAMPED: u64 = 1 << 63;

/// Buckets: 2^5 per power of two (at most 3 % wide), values up to 2^38 ns
/// (275 s, past the clock's wrap). About 8.5 KiB per timed queue.
const GROUPING_POWER: u8 = 5;
const MAX_VALUE_POWER: u8 = 38;

/// The bounds (ns) of the cumulative buckets shown to Prometheus (`le`)
/// and kept in [`LatencySummary::buckets`]: 1 µs to 2 min, 1-2-5 steps.
pub const BOUNDS_NS: [u64; 25] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    120_000_000_000,
];

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// The stamp clock now.
pub fn now() -> u32 {
    ((EPOCH.elapsed().as_nanos() >> TICK_SHIFT) as u64 & TICK_MASK) as u32
}

/// `cookie` with its high half replaced by the stamp for `now`.
pub fn stamp(cookie: u64, now: u32) -> u64 {
    (cookie & 0xffff_ffff) | STAMPED | ((now as u64 & TICK_MASK) << 32)
}

/// When a stamped cookie was stamped; `None` for one never stamped.
pub fn stamped_at(cookie: u64) -> Option<u32> {
    (cookie & STAMPED != 0).then_some(((cookie >> 32) & TICK_MASK) as u32)
}

/// Nanoseconds since a stamp (modulo the clock's wrap).
pub fn elapsed_ns(since: u32) -> u64 {
    ns_between(since, now())
}

/// Nanoseconds from the stamp `since` to the reading `now` (both from
/// [`now`]; modulo the clock's wrap).
pub fn ns_between(since: u32, now: u32) -> u64 {
    ((now as u64).wrapping_sub(since as u64) & TICK_MASK) << TICK_SHIFT
}

/// One queue's latency histogram and the sum of what it recorded.
#[derive(Default)]
pub struct Latency {
    hist: OnceLock<AtomicHistogram>,
    sum_ns: AtomicU64,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latency")
            .field("allocated", &self.hist.get().is_some())
            .field("sum_ns", &self.sum_ns)
            .finish()
    }
}

fn new_histogram() -> AtomicHistogram {
    AtomicHistogram::new(GROUPING_POWER, MAX_VALUE_POWER)
        .expect("constant histogram parameters are valid (tested)")
}

impl Latency {
    pub fn record(&self, ns: u64) {
        let h = self.hist.get_or_init(new_histogram);
        // Only a value past the top bucket can fail; the clock wraps first.
        let _ = h.increment(ns.min((1 << MAX_VALUE_POWER) - 1));
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// A copy of the histogram (`None` until a job was timed).
    pub fn load(&self) -> Option<Histogram> {
        self.hist.get().map(AtomicHistogram::load)
    }

    pub fn sum_ns(&self) -> u64 {
        self.sum_ns.load(Relaxed)
    }
}

/// Histograms of queues, instances and VMs added together.
pub fn merge(into: &mut Option<Histogram>, other: Option<&Histogram>) {
    let Some(other) = other else { return };
    *into = Some(match into.take() {
        // Same parameters everywhere, so adding cannot fail; keep what we
        // had if it somehow did.
        Some(h) => h.wrapping_add(other).unwrap_or(h),
        None => other.clone(),
    });
}

/// What a histogram says, in nanoseconds. Percentiles are the upper edge
/// of the bucket they fall in (at most 3 % above the true value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Jobs timed (those that reached an engine).
    pub count: u64,
    pub sum_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    /// Jobs at or under each bound of [`BOUNDS_NS`] (cumulative, as
    /// Prometheus's `le` buckets; a bucket of the histogram that straddles
    /// a bound counts under it when its middle does).
    #[serde(default)]
    pub buckets: Vec<u64>,
}

impl LatencySummary {
    pub fn of(h: Option<&Histogram>, sum_ns: u64) -> LatencySummary {
        let Some(h) = h else {
            return LatencySummary {
                buckets: vec![0; BOUNDS_NS.len()],
                ..Default::default()
            };
        };
        let mut count = 0u64;
        let mut max = 0;
        let mut buckets = vec![0u64; BOUNDS_NS.len()];
        for b in h.iter().filter(|b| b.count() > 0) {
            count += b.count();
            max = max.max(b.end());
            let mid = b.start() + (b.end() - b.start()) / 2;
            for (i, &bound) in BOUNDS_NS.iter().enumerate() {
                if mid <= bound {
                    buckets[i] += b.count();
                }
            }
        }
        let pct = |p: f64| h.quantile_bucket(p).ok().flatten().map_or(0, |b| b.end());
        LatencySummary {
            count,
            sum_ns,
            mean_ns: sum_ns.checked_div(count).unwrap_or(0),
            p50_ns: pct(0.5),
            p90_ns: pct(0.9),
            p99_ns: pct(0.99),
            p999_ns: pct(0.999),
            max_ns: max,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_keep_the_tag_and_measure_time() {
        let t = now();
        let c = stamp(0xdead_beef_1234_5678, t);
        assert_eq!(c as u32, 0x1234_5678);
        assert_eq!(stamped_at(c), Some(t));
        assert_eq!(stamped_at(0x1234_5678), None, "a tag alone is unstamped");
        std::thread::sleep(std::time::Duration::from_millis(3));
        let ns = elapsed_ns(t);
        assert!((3_000_000..1_000_000_000).contains(&ns), "{ns}");
    }

    #[test]
    fn the_clock_wraps_without_a_huge_latency() {
        // A stamp taken just before the 31-bit tick counter wrapped.
        let since = TICK_MASK as u32 - 1;
        assert_eq!(ns_between(since, 3), 5 << TICK_SHIFT);
        assert_eq!(ns_between(3, 3), 0);
    }

    #[test]
    fn summaries_give_percentiles_and_cumulative_buckets() {
        let l = Latency::default();
        for _ in 0..90 {
            l.record(3_000); // 3 µs
        }
        for _ in 0..10 {
            l.record(40_000_000); // 40 ms
        }
        let s = LatencySummary::of(l.load().as_ref(), l.sum_ns());
        assert_eq!(s.count, 100);
        assert_eq!(s.sum_ns, 90 * 3_000 + 10 * 40_000_000);
        assert!((3_000..=3_100).contains(&s.p50_ns), "{s:?}");
        assert!((40_000_000..=41_300_000).contains(&s.p99_ns), "{s:?}");
        let at = |bound| s.buckets[BOUNDS_NS.iter().position(|&b| b == bound).unwrap()];
        assert_eq!(
            (at(2_000), at(5_000), at(20_000_000), at(50_000_000)),
            (0, 90, 90, 100)
        );
        assert_eq!(*s.buckets.last().unwrap(), 100);
        let mut merged = l.load();
        merge(&mut merged, l.load().as_ref());
        assert_eq!(LatencySummary::of(merged.as_ref(), 0).count, 200);
        assert_eq!(LatencySummary::of(None, 0).buckets.len(), BOUNDS_NS.len());
    }
}
