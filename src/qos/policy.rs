//! What one instance is entitled to on a shared accelerator, as the
//! scheduler applies it. Built from a YAML `qos_policies` entry
//! (`crate::config::QosPolicy`); replaced at run time by `wdvirt modify`.

use serde::{Deserialize, Serialize};

use crate::config::QosPolicy;

/// Weight of an instance no policy was applied to (a `wdvirt serve`
/// instance, or a test's): every such instance shares alike.
pub const DEFAULT_WEIGHT: u32 = 100;

/// A burst given for a rate without one: this many nanoseconds of the rate
/// (100 ms), at least one token.
pub const DEFAULT_BURST_NS: u64 = 100_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Share of engine time under contention, against the other instances'
    /// weights (1..=10000).
    pub weight: u32,
    /// Jobs per second and how many may go at once after a rest.
    pub jobs_per_sec: Option<u64>,
    pub burst_jobs: Option<u64>,
    /// Source bytes per second, and the burst.
    pub bytes_per_sec: Option<u64>,
    pub burst_bytes: Option<u64>,
    /// Jobs at the engines at once.
    pub max_in_flight: Option<u32>,
    /// Per guest queue, its priority among the instance's queues: the
    /// instance's turn goes to its highest-priority queue with work (equal
    /// priorities take turns). Queues not listed have priority 0.
    pub queue_priorities: Vec<u8>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            weight: DEFAULT_WEIGHT,
            jobs_per_sec: None,
            burst_jobs: None,
            bytes_per_sec: None,
            burst_bytes: None,
            max_in_flight: None,
            queue_priorities: Vec::new(),
        }
    }
}

impl Policy {
    pub fn from_config(p: &QosPolicy) -> Policy {
        Policy {
            weight: p.weight,
            jobs_per_sec: p.rate.jobs_per_sec,
            burst_jobs: p.rate.burst_jobs,
            bytes_per_sec: p.rate.bytes_per_sec,
            burst_bytes: p.rate.burst_bytes,
            max_in_flight: p.max_in_flight,
            queue_priorities: p.queue_priorities.clone(),
        }
    }

    /// The weight the scheduler divides by (never 0).
    pub fn weight(&self) -> u64 {
        u64::from(self.weight.max(1))
    }

    /// `(rate, burst)` of the jobs bucket, if limited.
    pub fn jobs_bucket(&self) -> Option<(u64, u64)> {
        self.jobs_per_sec.map(|r| (r, burst(r, self.burst_jobs)))
    }

    /// `(rate, burst)` of the bytes bucket, if limited.
    pub fn bytes_bucket(&self) -> Option<(u64, u64)> {
        self.bytes_per_sec.map(|r| (r, burst(r, self.burst_bytes)))
    }

    /// Queue `q`'s priority.
    pub fn priority(&self, q: u32) -> u8 {
        self.queue_priorities.get(q as usize).copied().unwrap_or(0)
    }
}

fn burst(rate: u64, given: Option<u64>) -> u64 {
    given
        .unwrap_or_else(|| (rate as u128 * DEFAULT_BURST_NS as u128 / 1_000_000_000) as u64)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_without_a_burst_gets_a_tenth_of_a_second() {
        let p = Policy {
            jobs_per_sec: Some(50_000),
            bytes_per_sec: Some(5),
            burst_bytes: None,
            ..Policy::default()
        };
        assert_eq!(p.jobs_bucket(), Some((50_000, 5_000)));
        assert_eq!(p.bytes_bucket(), Some((5, 1)), "at least one token");
        let q = Policy {
            queue_priorities: vec![0, 3],
            ..Policy::default()
        };
        assert_eq!((q.priority(1), q.priority(7)), (3, 0));
    }
}
