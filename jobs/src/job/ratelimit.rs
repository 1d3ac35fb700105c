//! The `speed` limit of a job: bytes per second, accounted in slices of
//! 100 ms, so a job that ran ahead sleeps until its budget catches up.

use std::time::{Duration, Instant};

const SLICE: Duration = Duration::from_millis(100);

/// A job's budget. The first chunk of a slice always goes.
#[derive(Debug)]
pub(crate) struct RateLimit {
    start: Instant,
    end: Instant,
    dispatched: u64,
}

impl RateLimit {
    pub(crate) fn new() -> Self {
        let now = Instant::now();
        RateLimit {
            start: now,
            end: now,
            dispatched: 0,
        }
    }

    /// Records `bytes` done at `now`.
    pub(crate) fn account(&mut self, bytes: u64, now: Instant) {
        if now > self.end {
            self.start = now;
            self.end = now + SLICE;
            self.dispatched = 0;
        }
        self.dispatched += bytes;
    }

    /// How long to wait before the next chunk at `speed` bytes/s (0 means
    /// unlimited).
    pub(crate) fn delay(&mut self, speed: u64, now: Instant) -> Duration {
        if speed == 0 {
            self.dispatched = 0;
            return Duration::ZERO;
        }
        let quota = (speed as f64 * SLICE.as_secs_f64()).max(1.0);
        let slices = self.dispatched as f64 / quota;
        if slices >= 1.0 {
            self.end = self.start + SLICE.mul_f64(slices);
        }
        if (self.dispatched as f64) < quota {
            Duration::ZERO
        } else {
            self.end.saturating_duration_since(now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_spreads_chunks_over_time() {
        let mut r = RateLimit::new();
        let t0 = Instant::now();
        assert_eq!(r.delay(1 << 20, t0), Duration::ZERO);
        r.account(512 << 10, t0);
        // Half a second's worth of 1 MiB/s went out at once: wait ~0.5 s.
        let d = r.delay(1 << 20, t0);
        assert!(
            d > Duration::from_millis(400) && d <= Duration::from_millis(500),
            "{d:?}"
        );
        assert_eq!(r.delay(0, t0), Duration::ZERO, "speed 0 is unlimited");
        assert_eq!(
            r.delay(1 << 20, t0 + Duration::from_secs(1)),
            Duration::ZERO
        );
    }
}
