//! A token bucket: `rate` tokens a second, holding at most `burst`.
//!
//! A job is let through when the bucket holds its cost, or is full when the
//! cost is larger than the whole burst; it then takes its full cost, and the
//! bucket may go into debt. So a job larger than the burst is never stuck,
//! and over any long interval what passes is `rate × time + burst` at most —
//! the long-run rate holds exactly whatever the job sizes.

/// Nanoseconds in a second.
const SEC: f64 = 1e9;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    /// Tokens per nanosecond.
    per_ns: f64,
    burst: f64,
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at_ns: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ns`. `rate` and `burst` are at least 1.
    pub fn new(rate: u64, burst: u64, now_ns: u64) -> TokenBucket {
        let burst = burst.max(1) as f64;
        TokenBucket {
            per_ns: rate.max(1) as f64 / SEC,
            burst,
            tokens: burst,
            at_ns: now_ns,
        }
    }

    /// The same bucket under new limits, keeping what it holds (up to the
    /// new burst) and any debt.
    pub fn retuned(&self, rate: u64, burst: u64, now_ns: u64) -> TokenBucket {
        let mut b = *self;
        b.refill(now_ns);
        let mut n = TokenBucket::new(rate, burst, now_ns);
        n.tokens = b.tokens.min(n.burst);
        n
    }

    pub fn refill(&mut self, now_ns: u64) {
        if now_ns > self.at_ns {
            let add = (now_ns - self.at_ns) as f64 * self.per_ns;
            self.tokens = (self.tokens + add).min(self.burst);
            self.at_ns = now_ns;
        }
    }

    /// Whether a job of `cost` may go now (after `refill`).
    pub fn allows(&self, cost: u64) -> bool {
        self.tokens >= (cost as f64).min(self.burst)
    }

    /// Charge a job that goes.
    pub fn take(&mut self, cost: u64) {
        self.tokens -= cost as f64;
    }

    /// When a job of `cost` may go, if not now (after `refill`).
    pub fn ready_at(&self, cost: u64) -> u64 {
        let need = (cost as f64).min(self.burst) - self.tokens;
        if need <= 0.0 {
            self.at_ns
        } else {
            self.at_ns + (need / self.per_ns).ceil() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_full_burst_then_the_rate() {
        let mut b = TokenBucket::new(1000, 10, 0);
        for _ in 0..10 {
            assert!(b.allows(1));
            b.take(1);
        }
        assert!(!b.allows(1));
        assert_eq!(b.ready_at(1), MS, "one token a millisecond");
        b.refill(MS / 2);
        assert!(!b.allows(1));
        b.refill(MS);
        assert!(b.allows(1));
        // Never more than the burst, however long it rested.
        b.refill(10_000 * MS);
        for _ in 0..10 {
            b.take(1);
        }
        assert!(!b.allows(1));
    }

    #[test]
    fn a_job_larger_than_the_burst_goes_when_full_and_leaves_debt() {
        let mut b = TokenBucket::new(1000, 100, 0);
        assert!(b.allows(250), "full: a job above the burst may go");
        b.take(250);
        // 150 tokens of debt, then 100 to fill: 250 ms.
        assert_eq!(b.ready_at(250), 250 * MS);
        b.refill(249 * MS);
        assert!(!b.allows(250));
        b.refill(250 * MS);
        assert!(b.allows(250));
    }

    #[test]
    fn retuning_keeps_debt_and_clamps_to_the_new_burst() {
        let mut b = TokenBucket::new(1000, 100, 0);
        b.take(150);
        let r = b.retuned(10, 5, 0);
        assert_eq!(r.ready_at(1), 5100 * MS, "51 tokens at 10/s");
        let full = TokenBucket::new(1000, 100, 0).retuned(1000, 5, 0);
        assert_eq!(full.tokens, 5.0, "a fuller bucket is cut to the new burst");
    }
}
