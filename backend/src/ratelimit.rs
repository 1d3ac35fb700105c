//! Rate-limited logging: a guest can send bad requests as fast as it likes,
//! and the log must not grow as fast.

use std::time::{Duration, Instant};

/// Lets through at most `burst` events per `period`, then counts the rest
/// and reports the count with the next event let through.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    /// A limit of `burst` events per `period`.
    pub const fn new(burst: u32, period: Duration) -> Self {
        RateLimit {
            period,
            burst,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether to log this event; if so, how many were dropped before it.
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= self.period)
        {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_burst_through_then_counts() {
        let mut r = RateLimit::new(2, Duration::from_millis(50));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.check(), Some(2), "reports what it dropped");
    }
}
