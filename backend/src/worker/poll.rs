//! When a queue thread busy-polls instead of sleeping.

use std::time::{Duration, Instant};

/// The adaptive busy-poll windows of one queue, after QEMU's: after work,
/// the thread spins this long for more before it sleeps. A sleep that
/// ended soon (before `max`) grows the window; a long one closes it, so an
/// idle queue costs no CPU.
///
/// There are two windows, because a sleep means different things with and
/// without I/O in flight. With none, the thread waits for the guest, whose
/// next kick usually comes within microseconds of a completion. With some,
/// it waits for the disk too, which may take far longer than `max`: that
/// closes the I/O window (spinning through a disk wait is wasted), but says
/// nothing about how soon the guest answers.
pub(crate) struct PollWindow {
    max: Duration,
    /// Used while nothing is in flight: waiting for the guest.
    guest: Duration,
    /// Used while I/O is in flight.
    io: Duration,
    /// When the thread last went to sleep, and whether I/O was in flight.
    pub slept_at: Option<(Instant, bool)>,
}

impl PollWindow {
    /// A window starts this small and doubles.
    const START: Duration = Duration::from_micros(4);

    pub fn new(max_ns: u64) -> Self {
        PollWindow {
            max: Duration::from_nanos(max_ns),
            guest: Duration::ZERO,
            io: Duration::ZERO,
            slept_at: None,
        }
    }

    /// How long to spin, given whether I/O is in flight.
    pub fn window(&self, io_in_flight: bool) -> Duration {
        if io_in_flight {
            self.io
        } else {
            self.guest
        }
    }

    /// An event woke the thread: adapt the window it slept under to how
    /// long it slept.
    pub fn woke(&mut self) {
        let Some((at, io_in_flight)) = self.slept_at.take() else {
            return;
        };
        let max = self.max;
        let window = if io_in_flight {
            &mut self.io
        } else {
            &mut self.guest
        };
        if at.elapsed() > max {
            *window = Duration::ZERO;
        } else if *window < max {
            *window = (*window * 2).clamp(Self::START.min(max), max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_below_its_starting_size_still_adapts() {
        let mut p = PollWindow::new(1000);
        p.slept_at = Some((Instant::now(), false));
        p.woke();
        assert!(p.window(false) <= Duration::from_nanos(1000));
    }

    #[test]
    fn a_long_wait_for_io_leaves_the_guest_window_open() {
        let mut p = PollWindow::new(32_768);
        for _ in 0..4 {
            p.slept_at = Some((Instant::now(), false));
            p.woke();
        }
        let open = p.window(false);
        assert!(!open.is_zero());
        p.slept_at = Some((Instant::now() - Duration::from_millis(1), true));
        p.woke();
        assert_eq!(p.window(true), Duration::ZERO);
        assert_eq!(p.window(false), open);
        // The guest going quiet closes its window.
        p.slept_at = Some((Instant::now() - Duration::from_millis(1), false));
        p.woke();
        assert_eq!(p.window(false), Duration::ZERO);
    }
}
