//! One export's counters: a [`QueueStats`] per queue (vhost-user) or per
//! connection (NBD), what ended connections counted, and the histograms
//! the operator set, which new queues start with.

use std::sync::{Arc, Mutex, MutexGuard};

use super::latency::{BoundaryError, UserHistogram};
use super::{QueueStats, Totals, HISTOGRAM_OPS};

/// What `block-latency-histogram-set` asks of one kind of request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistogramChange {
    /// Keep it as it is.
    Keep,
    /// Stop counting it.
    Remove,
    /// Start again from empty bins over these boundaries.
    Set(Vec<u64>),
}

#[derive(Default)]
struct Inner {
    live: Vec<Arc<QueueStats>>,
    ended: Totals,
    boundaries: [Option<Vec<u64>>; HISTOGRAM_OPS.len()],
}

/// The counters of one export, added up when queried.
#[derive(Default)]
pub struct ExportStats {
    inner: Mutex<Inner>,
    /// `stats-intervals`, in seconds.
    intervals: Vec<u64>,
}

impl ExportStats {
    /// Counters for an export with `stats-intervals` of these lengths.
    pub fn new(intervals: Vec<u64>) -> ExportStats {
        ExportStats {
            inner: Mutex::default(),
            intervals,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters for a new queue or connection, with the histograms set now.
    pub fn add_queue(&self) -> Arc<QueueStats> {
        let mut g = self.lock();
        let q = Arc::new(QueueStats::with_intervals(&self.intervals));
        for (i, b) in g.boundaries.iter().enumerate() {
            if let Some(b) = b {
                q.set_histogram(i, UserHistogram::new(b).ok());
            }
        }
        g.live.push(Arc::clone(&q));
        q
    }

    /// Folds an ended connection's counters into the export's, so
    /// reconnecting clients do not grow the list.
    pub fn end_queue(&self, q: &Arc<QueueStats>) {
        let mut g = self.lock();
        g.live.retain(|x| !Arc::ptr_eq(x, q));
        g.ended.merge(&Totals::of([q]));
        // Its windows would go stale: timed stats cover live queues.
        g.ended.timed.clear();
    }

    /// Every queue's counters, ended ones included, added up.
    pub fn totals(&self) -> Totals {
        let g = self.lock();
        let mut t = Totals::of(&g.live);
        t.merge(&g.ended);
        t
    }

    /// Each live queue's counters, in the order they were added; what
    /// ended queues counted goes to the first.
    pub fn per_queue(&self) -> Vec<Totals> {
        let g = self.lock();
        let mut v: Vec<Totals> = g.live.iter().map(|q| Totals::of([q])).collect();
        match v.first_mut() {
            Some(first) => first.merge(&g.ended),
            None => v.push(g.ended.clone()),
        }
        v
    }

    /// Applies `block-latency-histogram-set`, per kind of
    /// [`HISTOGRAM_OPS`]. Every boundary list is checked before anything
    /// changes.
    pub fn set_histograms(
        &self,
        changes: &[HistogramChange; HISTOGRAM_OPS.len()],
    ) -> Result<(), (usize, BoundaryError)> {
        for (i, c) in changes.iter().enumerate() {
            if let HistogramChange::Set(b) = c {
                super::latency::check(b).map_err(|e| (i, e))?;
            }
        }
        let mut g = self.lock();
        for (i, c) in changes.iter().enumerate() {
            let b = match c {
                HistogramChange::Keep => continue,
                HistogramChange::Remove => None,
                HistogramChange::Set(b) => Some(b.clone()),
            };
            for q in &g.live {
                q.set_histogram(i, b.as_deref().and_then(|b| UserHistogram::new(b).ok()));
            }
            g.ended.user[i] = None;
            g.boundaries[i] = b;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io_stats::Op;
    use std::time::Instant;

    #[test]
    fn histograms_reach_live_and_later_queues_and_restart_empty() {
        let s = ExportStats::default();
        let a = s.add_queue();
        a.done(Op::Read, 512, Instant::now(), true, None);
        let set = HistogramChange::Set(vec![u64::MAX / 2]);
        s.set_histograms(&[set.clone(), HistogramChange::Keep, set])
            .unwrap();
        let b = s.add_queue();
        a.done(Op::Read, 512, Instant::now(), true, None);
        b.done(Op::Read, 512, Instant::now(), true, None);
        b.done(Op::Flush, 0, Instant::now(), true, None);
        s.end_queue(&b);
        let t = s.totals();
        // Counted from the change on: the read before it is not in a bin.
        assert_eq!(t.user[0].as_ref().unwrap().bins, [2, 0]);
        assert!(t.user[1].is_none());
        assert_eq!(t.user[2].as_ref().unwrap().bins, [1, 0]);
        assert_eq!(t.ops[0][0], 3);

        let bad = HistogramChange::Set(vec![5, 3]);
        let err = s
            .set_histograms(&[HistogramChange::Remove, bad, HistogramChange::Keep])
            .unwrap_err();
        assert_eq!(err.0, 1);
        // Refused as a whole: the read histogram is still there.
        assert!(s.totals().user[0].is_some());

        s.set_histograms(&[
            HistogramChange::Remove,
            HistogramChange::Keep,
            HistogramChange::Keep,
        ])
        .unwrap();
        assert!(s.totals().user[0].is_none());
    }
}
