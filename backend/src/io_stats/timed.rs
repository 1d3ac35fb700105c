//! `timed_stats`: latency minimum, maximum and average, and average queue
//! depth, over the last stretch of each interval an export was given
//! (`stats-intervals`), in QEMU's `BlockDeviceTimedStats` shape.
//!
//! As QEMU's timed average does, each interval of length P has windows
//! of length P that start every P/2, and a query reads the oldest one
//! still open: between P/2 and P of history. Windows start at multiples
//! of P/2 from one process-wide epoch, so every queue's windows line up
//! and add. A queue keeps the two windows that contain "now", in slots
//! tagged with the window's number; its thread is the only writer.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};

/// The most intervals one export may have.
pub const MAX_INTERVALS: usize = 8;
/// The longest interval, in seconds: a year.
pub const MAX_INTERVAL_S: u64 = 365 * 24 * 3600;

/// Checks `stats-intervals`: at most [`MAX_INTERVALS`] lengths, each of
/// 1 s to [`MAX_INTERVAL_S`].
pub fn check_intervals(lengths: &[u64]) -> Result<(), String> {
    if lengths.len() > MAX_INTERVALS {
        return Err(format!(
            "at most {MAX_INTERVALS} stats-intervals are accepted, not {}",
            lengths.len()
        ));
    }
    match lengths.iter().position(|&s| s == 0 || s > MAX_INTERVAL_S) {
        Some(i) => Err(format!(
            "stats-intervals.{i} is {}: an interval is 1 to {MAX_INTERVAL_S} seconds",
            lengths[i]
        )),
        None => Ok(()),
    }
}

/// Kinds with timed stats, in the order of [`super::HISTOGRAM_OPS`].
const KINDS: usize = 3;

#[derive(Default)]
struct Acc {
    count: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
}

#[derive(Default)]
struct Slot {
    /// Which window the slot holds, plus one (0: none yet).
    tag: AtomicU64,
    acc: [Acc; KINDS],
}

/// One interval's two open windows, for one queue.
pub struct Interval {
    half_ns: u64,
    length_s: u64,
    slots: [Slot; 2],
}

#[inline]
fn set(a: &AtomicU64, v: u64) {
    a.store(v, Relaxed);
}

impl Interval {
    /// An interval of `length_s` seconds (1 to [`MAX_INTERVAL_S`]).
    pub fn new(length_s: u64) -> Interval {
        Interval {
            half_ns: length_s.clamp(1, MAX_INTERVAL_S) * 500_000_000,
            length_s,
            slots: Default::default(),
        }
    }

    /// Accounts a latency of kind `kind` that ended at `now_ns` (since
    /// the stats epoch) in both windows open then.
    #[inline]
    pub fn record(&self, kind: usize, ns: u64, now_ns: u64) {
        let k = now_ns / self.half_ns;
        for w in [k, k.wrapping_sub(1)] {
            if w == u64::MAX {
                continue;
            }
            let slot = &self.slots[(w % 2) as usize];
            if slot.tag.load(Relaxed) != w + 1 {
                for a in &slot.acc {
                    set(&a.count, 0);
                    set(&a.sum_ns, 0);
                    set(&a.min_ns, u64::MAX);
                    set(&a.max_ns, 0);
                }
                slot.tag.store(w + 1, Relaxed);
            }
            let a = &slot.acc[kind];
            set(&a.count, a.count.load(Relaxed) + 1);
            set(&a.sum_ns, a.sum_ns.load(Relaxed).wrapping_add(ns));
            if ns < a.min_ns.load(Relaxed) {
                set(&a.min_ns, ns);
            }
            if ns > a.max_ns.load(Relaxed) {
                set(&a.max_ns, ns);
            }
        }
    }

    /// The oldest open window as of `now_ns`.
    pub fn read(&self, now_ns: u64) -> Window {
        let k = now_ns / self.half_ns;
        let oldest = k.saturating_sub(1);
        let mut out = Window {
            length_s: self.length_s,
            elapsed_ns: now_ns - oldest * self.half_ns,
            kinds: [Kind::default(); KINDS],
        };
        let slot = &self.slots[(oldest % 2) as usize];
        if slot.tag.load(Relaxed) == oldest + 1 {
            for (o, a) in out.kinds.iter_mut().zip(&slot.acc) {
                *o = Kind {
                    count: a.count.load(Relaxed),
                    sum_ns: a.sum_ns.load(Relaxed),
                    min_ns: a.min_ns.load(Relaxed),
                    max_ns: a.max_ns.load(Relaxed),
                };
            }
            // The writer moved on to a newer window while we read.
            if slot.tag.load(Relaxed) != oldest + 1 {
                out.kinds = [Kind::default(); KINDS];
            }
        }
        out
    }
}

/// One kind's figures in a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    count: u64,
    sum_ns: u64,
    min_ns: u64,
    max_ns: u64,
}

impl Default for Kind {
    fn default() -> Self {
        Kind {
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

/// One interval's window, added up over queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    length_s: u64,
    elapsed_ns: u64,
    kinds: [Kind; KINDS],
}

impl Window {
    /// Adds another queue's window over the same interval in.
    pub fn merge(&mut self, other: &Window) {
        if self.length_s != other.length_s {
            return;
        }
        for (a, b) in self.kinds.iter_mut().zip(&other.kinds) {
            a.count += b.count;
            a.sum_ns = a.sum_ns.wrapping_add(b.sum_ns);
            a.min_ns = a.min_ns.min(b.min_ns);
            a.max_ns = a.max_ns.max(b.max_ns);
        }
    }

    /// QEMU's `BlockDeviceTimedStats`.
    pub fn to_json(&self) -> Value {
        let [rd, wr, fl] = self.kinds;
        let min = |k: Kind| if k.count == 0 { 0 } else { k.min_ns };
        let avg = |k: Kind| k.sum_ns.checked_div(k.count).unwrap_or(0);
        let depth = |k: Kind| {
            if self.elapsed_ns == 0 {
                0.0
            } else {
                k.sum_ns as f64 / self.elapsed_ns as f64
            }
        };
        json!({
            "interval_length": self.length_s,
            "min_rd_latency_ns": min(rd), "max_rd_latency_ns": rd.max_ns,
            "avg_rd_latency_ns": avg(rd),
            "min_wr_latency_ns": min(wr), "max_wr_latency_ns": wr.max_ns,
            "avg_wr_latency_ns": avg(wr),
            "min_flush_latency_ns": min(fl), "max_flush_latency_ns": fl.max_ns,
            "avg_flush_latency_ns": avg(fl),
            "avg_rd_queue_depth": depth(rd), "avg_wr_queue_depth": depth(wr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_query_reads_the_oldest_open_window() {
        let i = Interval::new(10);
        // Windows start every 5 s; at 12 s the oldest open one began at 5 s.
        i.record(0, 100, 2 * S);
        i.record(0, 300, 7 * S);
        i.record(1, 50, 11 * S);
        let w = i.read(12 * S).to_json();
        assert_eq!(w["interval_length"], 10);
        assert_eq!(w["min_rd_latency_ns"], 300);
        assert_eq!(w["max_rd_latency_ns"], 300);
        assert_eq!(w["avg_wr_latency_ns"], 50);
        assert_eq!(w["avg_rd_queue_depth"], 300.0 / (7 * S) as f64);
        // At 16 s that window has closed; the one from 10 s has the write.
        let w = i.read(16 * S).to_json();
        assert_eq!(w["max_rd_latency_ns"], 0);
        assert_eq!(w["min_wr_latency_ns"], 50);
        // Long idle: nothing.
        let w = i.read(100 * S).to_json();
        assert_eq!(w["avg_wr_latency_ns"], 0);
        assert_eq!(w["min_rd_latency_ns"], 0);
    }

    #[test]
    fn queues_windows_add_up() {
        let (a, b) = (Interval::new(60), Interval::new(60));
        a.record(2, 10, S);
        b.record(2, 30, 2 * S);
        let mut w = a.read(3 * S);
        w.merge(&b.read(3 * S));
        let j = w.to_json();
        assert_eq!(
            (
                j["min_flush_latency_ns"].as_u64(),
                j["max_flush_latency_ns"].as_u64()
            ),
            (Some(10), Some(30))
        );
        assert_eq!(j["avg_flush_latency_ns"], 20);
    }
}
