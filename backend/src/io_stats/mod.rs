//! I/O accounting in the shape of QEMU's `BlockDeviceStats`, for
//! `query-blockstats`.
//!
//! Each queue thread counts into its own [`QueueStats`]: it is the only
//! writer, so a count is a relaxed load and store, never a locked
//! read-modify-write, and no cache line is shared between queues on the
//! data path. A query reads every queue's counters and adds them up.

mod export_stats;
pub mod latency;
pub mod timed;

pub use export_stats::{ExportStats, HistogramChange};

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use serde_json::{json, Value};

use latency::{Snapshot, UserHistogram, BUCKETS};

/// The kinds QEMU accounts separately. Write-zeroes counts as a write,
/// discard as an unmap, as QEMU's virtio-blk does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Reads.
    Read = 0,
    /// Writes and write-zeroes.
    Write = 1,
    /// Flushes.
    Flush = 2,
    /// Discards.
    Unmap = 3,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    bytes: AtomicU64,
    ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
}

/// The kinds with a user histogram, in QEMU's order: read, write, flush.
pub const HISTOGRAM_OPS: [Op; 3] = [Op::Read, Op::Write, Op::Flush];

/// One queue's counters. Written by that queue's thread only.
#[derive(Default)]
#[repr(align(64))]
pub struct QueueStats {
    ops: [Counters; 4],
    highest_write: AtomicU64,
    /// When the last request ended, in ns since [`epoch`]; 0 for never.
    last_ns: AtomicU64,
    /// Requests begun and not yet done.
    in_flight: AtomicU64,
    /// Per [`Op`]: successful requests by [`latency::bucket`].
    latency: [[AtomicU64; BUCKETS]; 4],
    /// Per [`HISTOGRAM_OPS`]: the operator's histogram, if set. Replaced
    /// whole by the monitor, so the queue never sees half a change.
    user: [ArcSwapOption<UserHistogram>; 3],
    /// The export's `stats-intervals`, for `timed_stats`.
    timed: Box<[timed::Interval]>,
}

/// A request in flight on a queue; see [`QueueStats::begin`].
pub struct InFlight<'a>(&'a QueueStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        add(&self.0.in_flight, u64::MAX);
    }
}

/// A fixed start for the `last_ns` stamps.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Adds `by` to a counter only this thread writes.
#[inline]
fn add(c: &AtomicU64, by: u64) {
    c.store(c.load(Relaxed).wrapping_add(by), Relaxed);
}

impl QueueStats {
    /// Counters for a queue of an export with `stats-intervals` of these
    /// lengths, in seconds.
    pub fn with_intervals(intervals: &[u64]) -> QueueStats {
        QueueStats {
            timed: intervals.iter().map(|&s| timed::Interval::new(s)).collect(),
            ..QueueStats::default()
        }
    }

    /// Counts a request that ran: `bytes` moved, started at `start`, and
    /// for a successful write the end of the range it wrote.
    #[inline]
    pub fn done(&self, op: Op, bytes: u64, start: Instant, ok: bool, write_end: Option<u64>) {
        let now = Instant::now();
        let stamp = now.duration_since(epoch()).as_nanos() as u64;
        let c = &self.ops[op as usize];
        if ok {
            let ns = now.duration_since(start).as_nanos() as u64;
            add(&c.ops, 1);
            add(&c.bytes, bytes);
            add(&c.ns, ns);
            add(&self.latency[op as usize][latency::bucket(ns)], 1);
            if let Some(i) = HISTOGRAM_OPS.iter().position(|&o| o == op) {
                if let Some(h) = &*self.user[i].load() {
                    h.record(ns);
                }
                for t in &self.timed {
                    t.record(i, ns, stamp);
                }
            }
            if let Some(end) = write_end {
                if end > self.highest_write.load(Relaxed) {
                    self.highest_write.store(end, Relaxed);
                }
            }
        } else {
            add(&c.failed, 1);
        }
        self.last_ns.store(stamp.max(1), Relaxed);
    }

    /// Counts a request as in flight until the guard drops: when it is
    /// done, held for `block-export-resume`, or abandoned.
    #[inline]
    pub fn begin(&self) -> InFlight<'_> {
        add(&self.in_flight, 1);
        InFlight(self)
    }

    /// Starts counting kind `i` of [`HISTOGRAM_OPS`] into empty bins over
    /// `boundaries`, or stops with `None`.
    pub fn set_histogram(&self, i: usize, h: Option<UserHistogram>) {
        self.user[i].store(h.map(Arc::new));
    }

    /// Counts a request refused before it ran (out of range, misaligned,
    /// a write to a read-only export).
    pub fn invalid(&self, op: Op) {
        add(&self.ops[op as usize].invalid, 1);
    }
}

/// Counters added up over queues.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Per [`Op`]: operations, bytes, ns, failed, invalid.
    pub ops: [[u64; 5]; 4],
    /// The end of the highest range written.
    pub highest_write: u64,
    /// The last request's end, ns since the epoch; 0 for never.
    pub last_ns: u64,
    /// Requests running now.
    pub in_flight: u64,
    /// Per [`Op`]: successful requests by fixed latency bucket.
    pub latency: [[u64; BUCKETS]; 4],
    /// Per [`HISTOGRAM_OPS`]: the operator's histogram, if set.
    pub user: [Option<Snapshot>; 3],
    /// Per stats interval: its oldest open window.
    pub timed: Vec<timed::Window>,
}

impl Totals {
    /// Every queue's counters, added up.
    pub fn of<'a>(queues: impl IntoIterator<Item = &'a Arc<QueueStats>>) -> Totals {
        let mut t = Totals::default();
        for q in queues {
            t.add(q);
        }
        t
    }

    fn add(&mut self, q: &QueueStats) {
        for (sum, c) in self.ops.iter_mut().zip(&q.ops) {
            let fields = [&c.ops, &c.bytes, &c.ns, &c.failed, &c.invalid];
            for (s, f) in sum.iter_mut().zip(fields) {
                *s += f.load(Relaxed);
            }
        }
        self.highest_write = self.highest_write.max(q.highest_write.load(Relaxed));
        self.last_ns = self.last_ns.max(q.last_ns.load(Relaxed));
        self.in_flight = self.in_flight.wrapping_add(q.in_flight.load(Relaxed));
        for (sum, buckets) in self.latency.iter_mut().zip(&q.latency) {
            for (s, b) in sum.iter_mut().zip(buckets) {
                *s += b.load(Relaxed);
            }
        }
        let now = Instant::now().duration_since(epoch()).as_nanos() as u64;
        let timed: Vec<_> = q.timed.iter().map(|t| t.read(now)).collect();
        merge_timed(&mut self.timed, &timed);
        let user = q
            .user
            .iter()
            .map(|h| h.load().as_ref().map(|h| h.snapshot()));
        for (sum, h) in self.user.iter_mut().zip(user) {
            merge_user(sum, h.as_ref());
        }
    }

    /// Adds `other` in.
    pub fn merge(&mut self, other: &Totals) {
        for (a, b) in self.ops.iter_mut().zip(&other.ops) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.highest_write = self.highest_write.max(other.highest_write);
        self.last_ns = self.last_ns.max(other.last_ns);
        self.in_flight = self.in_flight.wrapping_add(other.in_flight);
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        for (sum, h) in self.user.iter_mut().zip(&other.user) {
            merge_user(sum, h.as_ref());
        }
        merge_timed(&mut self.timed, &other.timed);
    }

    /// QEMU's `BlockDeviceStats`, with `idle_time_ns` once there was I/O.
    pub fn to_json(&self) -> Value {
        let [rd, wr, fl, un] = self.ops;
        let mut v = json!({
            "rd_bytes": rd[1], "wr_bytes": wr[1], "unmap_bytes": un[1],
            "rd_operations": rd[0], "wr_operations": wr[0],
            "flush_operations": fl[0], "unmap_operations": un[0],
            "rd_total_time_ns": rd[2], "wr_total_time_ns": wr[2],
            "flush_total_time_ns": fl[2], "unmap_total_time_ns": un[2],
            "wr_highest_offset": self.highest_write,
            "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
            "failed_rd_operations": rd[3], "failed_wr_operations": wr[3],
            "failed_flush_operations": fl[3], "failed_unmap_operations": un[3],
            "invalid_rd_operations": rd[4], "invalid_wr_operations": wr[4],
            "invalid_flush_operations": fl[4], "invalid_unmap_operations": un[4],
            "account_invalid": true, "account_failed": true,
            "timed_stats": self.timed.iter().map(timed::Window::to_json).collect::<Vec<_>>(),
        });
        for (key, h) in ["rd", "wr", "flush"].iter().zip(&self.user) {
            if let Some(h) = h {
                v[format!("{key}_latency_histogram")] = h.to_json();
            }
        }
        if self.last_ns > 0 {
            let now = Instant::now().duration_since(epoch()).as_nanos() as u64;
            v["idle_time_ns"] = json!(now.saturating_sub(self.last_ns));
        }
        v
    }
}

/// Adds windows of the same intervals; a node's exports with other
/// intervals than the first's add nothing.
fn merge_timed(sum: &mut Vec<timed::Window>, other: &[timed::Window]) {
    if sum.is_empty() {
        sum.extend_from_slice(other);
    } else if sum.len() == other.len() {
        for (a, b) in sum.iter_mut().zip(other) {
            a.merge(b);
        }
    }
}

fn merge_user(sum: &mut Option<Snapshot>, h: Option<&Snapshot>) {
    match (sum.as_mut(), h) {
        (Some(s), Some(h)) => s.merge(h),
        (None, Some(h)) => *sum = Some(h.clone()),
        (_, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_add_up_and_render_as_qemu_names_them() {
        let (a, b) = (
            Arc::new(QueueStats::default()),
            Arc::new(QueueStats::default()),
        );
        let t0 = Instant::now();
        a.done(Op::Read, 4096, t0, true, None);
        b.done(Op::Read, 8192, t0, true, None);
        b.done(Op::Write, 512, t0, true, Some(1 << 20));
        a.done(Op::Write, 512, t0, false, None);
        a.invalid(Op::Unmap);
        let t = Totals::of([&a, &b]);
        let v = t.to_json();
        assert_eq!(v["rd_operations"], 2);
        assert_eq!(v["rd_bytes"], 12288);
        assert_eq!(v["wr_operations"], 1);
        assert_eq!(v["failed_wr_operations"], 1);
        assert_eq!(v["invalid_unmap_operations"], 1);
        assert_eq!(v["wr_highest_offset"], 1 << 20);
        assert!(v["idle_time_ns"].is_u64());
        assert!(Totals::default().to_json().get("idle_time_ns").is_none());
    }
}
