//! Latency histograms: a fixed one per queue and kind for the metrics
//! endpoint, and the ones an operator sets with QMP
//! `block-latency-histogram-set`, in QEMU's shape.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};

/// Upper bounds of the fixed buckets, in ns: 1 µs, then ×4 up to about
/// 4 s. Coarse on purpose: every export, queue and kind is a series.
pub const BOUNDS_NS: [u64; 12] = {
    let mut b = [0; 12];
    let mut i = 0;
    while i < 12 {
        b[i] = 1000 << (2 * i);
        i += 1;
    }
    b
};

/// Fixed buckets, the last one unbounded.
pub const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// The fixed bucket of a latency: the first whose bound is at least `ns`.
#[inline]
pub fn bucket(ns: u64) -> usize {
    let us = ns.div_ceil(1000);
    if us <= 1 {
        return 0;
    }
    // us ≤ 4^i ⇔ ceil(log2(us)) ≤ 2i.
    let log2 = 64 - (us - 1).leading_zeros() as usize;
    log2.div_ceil(2).min(BUCKETS - 1)
}

/// Why `block-latency-histogram-set` refused boundaries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BoundaryError {
    /// QEMU's rule: every boundary above zero, strictly ascending.
    #[error(
        "boundaries must be greater than zero and strictly ascending (boundary {index} is {value})"
    )]
    NotAscending {
        /// Its position in the list.
        index: usize,
        /// Its value.
        value: u64,
    },
    /// More than this daemon keeps.
    #[error("at most {MAX_BOUNDARIES} boundaries are accepted, not {0}")]
    TooMany(usize),
}

/// The most boundaries one histogram may have: QMP input sizes the bins.
pub const MAX_BOUNDARIES: usize = 1024;

/// A histogram over boundaries the operator chose, counted by one thread.
#[derive(Debug)]
pub struct UserHistogram {
    boundaries: Box<[u64]>,
    bins: Box<[AtomicU64]>,
}

impl UserHistogram {
    /// Empty bins for `boundaries` (ns, above zero, strictly ascending).
    pub fn new(boundaries: &[u64]) -> Result<UserHistogram, BoundaryError> {
        check(boundaries)?;
        Ok(UserHistogram {
            boundaries: boundaries.into(),
            bins: (0..=boundaries.len()).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Counts a latency: bin `i` holds [boundary i-1, boundary i).
    #[inline]
    pub fn record(&self, ns: u64) {
        let i = self.boundaries.partition_point(|&b| b <= ns);
        let bin = &self.bins[i];
        bin.store(bin.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// The boundaries and what the bins hold now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            boundaries: self.boundaries.to_vec(),
            bins: self.bins.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

/// Checks boundaries as QEMU's `block_latency_histogram_set` does.
pub fn check(boundaries: &[u64]) -> Result<(), BoundaryError> {
    if boundaries.len() > MAX_BOUNDARIES {
        return Err(BoundaryError::TooMany(boundaries.len()));
    }
    let mut prev = 0;
    for (index, &value) in boundaries.iter().enumerate() {
        if value <= prev {
            return Err(BoundaryError::NotAscending { index, value });
        }
        prev = value;
    }
    Ok(())
}

/// A user histogram's counts at one moment, added up over queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The boundaries, in ns.
    pub boundaries: Vec<u64>,
    /// One more than the boundaries.
    pub bins: Vec<u64>,
}

impl Snapshot {
    /// Adds `other` in. Queues of one export always share boundaries; a
    /// node's exports may not, and then the first one's are kept.
    pub fn merge(&mut self, other: &Snapshot) {
        if self.boundaries == other.boundaries {
            for (a, b) in self.bins.iter_mut().zip(&other.bins) {
                *a += b;
            }
        }
    }

    /// QEMU's `BlockLatencyHistogramInfo`.
    pub fn to_json(&self) -> Value {
        json!({"boundaries": self.boundaries, "bins": self.bins})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_latency_lands_in_the_first_bucket_that_holds_it(ns in 0u64..u64::MAX / 2) {
            let i = bucket(ns);
            let want = BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BUCKETS - 1);
            prop_assert_eq!(i, want);
        }
    }

    #[test]
    fn user_bins_are_half_open_as_qemu_documents() {
        // QEMU's example: [10, 50, 100] gives [0,10) [10,50) [50,100) [100,∞).
        let h = UserHistogram::new(&[10, 50, 100]).unwrap();
        for ns in [0, 9, 10, 49, 50, 99, 100, 1 << 40] {
            h.record(ns);
        }
        assert_eq!(h.snapshot().bins, [2, 2, 2, 2]);
    }

    #[test]
    fn boundaries_that_do_not_ascend_are_refused_by_position() {
        assert_eq!(
            UserHistogram::new(&[10, 10]).unwrap_err(),
            BoundaryError::NotAscending {
                index: 1,
                value: 10
            }
        );
        assert_eq!(
            check(&[0]).unwrap_err(),
            BoundaryError::NotAscending { index: 0, value: 0 }
        );
        assert!(check(&vec![1; MAX_BOUNDARIES + 1]).is_err());
        assert!(check(&[]).is_ok());
    }
}
