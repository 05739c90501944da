//! Time as the scheduler sees it: nanoseconds on the host's monotonic
//! clock, from an origin fixed when the scheduler starts. (The scheduling
//! core, [`super::fair`], takes the time as an argument; its tests pass a
//! simulated one.)

use std::time::Instant;

/// The host's monotonic clock, as nanoseconds since its creation.
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl MonotonicClock {
    /// Nanoseconds since the origin; never goes back.
    pub fn now_ns(&self) -> u64 {
        self.at(Instant::now())
    }

    /// `t` as nanoseconds since the origin (0 for a time before it).
    pub fn at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.0).as_nanos() as u64
    }
}
