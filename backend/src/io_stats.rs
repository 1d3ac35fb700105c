//! I/O accounting in the shape of QEMU's `BlockDeviceStats`, for
//! `query-blockstats`.
//!
//! Each queue thread counts into its own [`QueueStats`]: it is the only
//! writer, so a count is a relaxed load and store, never a locked
//! read-modify-write, and no cache line is shared between queues on the
//! data path. A query reads every queue's counters and adds them up.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

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

/// One queue's counters. Written by that queue's thread only.
#[derive(Default)]
#[repr(align(64))]
pub struct QueueStats {
    ops: [Counters; 4],
    highest_write: AtomicU64,
    /// When the last request ended, in ns since [`epoch`]; 0 for never.
    last_ns: AtomicU64,
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
    /// Counts a request that ran: `bytes` moved, started at `start`, and
    /// for a successful write the end of the range it wrote.
    #[inline]
    pub fn done(&self, op: Op, bytes: u64, start: Instant, ok: bool, write_end: Option<u64>) {
        let now = Instant::now();
        let c = &self.ops[op as usize];
        if ok {
            add(&c.ops, 1);
            add(&c.bytes, bytes);
            add(&c.ns, now.duration_since(start).as_nanos() as u64);
            if let Some(end) = write_end {
                if end > self.highest_write.load(Relaxed) {
                    self.highest_write.store(end, Relaxed);
                }
            }
        } else {
            add(&c.failed, 1);
        }
        let stamp = now.duration_since(epoch()).as_nanos() as u64;
        self.last_ns.store(stamp.max(1), Relaxed);
    }

    /// Counts a request refused before it ran (out of range, misaligned,
    /// a write to a read-only export).
    pub fn invalid(&self, op: Op) {
        add(&self.ops[op as usize].invalid, 1);
    }
}

/// Counters added up over queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Per [`Op`]: operations, bytes, ns, failed, invalid.
    pub ops: [[u64; 5]; 4],
    /// The end of the highest range written.
    pub highest_write: u64,
    /// The last request's end, ns since the epoch; 0 for never.
    pub last_ns: u64,
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
            "timed_stats": [],
        });
        if self.last_ns > 0 {
            let now = Instant::now().duration_since(epoch()).as_nanos() as u64;
            v["idle_time_ns"] = json!(now.saturating_sub(self.last_ns));
        }
        v
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
