//! Which parts of a disk changed since a job last copied them: one bit per
//! granule, set by the I/O path without locks, taken by the job.

use std::sync::atomic::{AtomicU64, Ordering};

/// A dirty bitmap over a disk of fixed size.
pub struct DirtyMap {
    granularity: u64,
    size: u64,
    words: Vec<AtomicU64>,
}

impl DirtyMap {
    /// A clean map of `size` bytes in granules of `granularity` (a power
    /// of two).
    pub fn new(size: u64, granularity: u64) -> Self {
        debug_assert!(granularity.is_power_of_two());
        let granules = size.div_ceil(granularity);
        DirtyMap {
            granularity,
            size,
            words: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Marks `len` bytes at `offset` as changed.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        for g in offset / self.granularity..end.div_ceil(self.granularity) {
            self.words[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::Release);
        }
    }

    /// Clears and returns up to `max` bytes of changed ranges, as
    /// (offset, length) runs in ascending order.
    pub fn take(&self, max: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut taken = 0;
        for (i, w) in self.words.iter().enumerate() {
            if taken >= max {
                break;
            }
            if w.load(Ordering::Acquire) == 0 {
                continue;
            }
            let bits = w.swap(0, Ordering::AcqRel);
            for b in 0..64 {
                if bits & (1 << b) == 0 {
                    continue;
                }
                let off = (i as u64 * 64 + b) * self.granularity;
                let len = self.granularity.min(self.size - off);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == off => last.1 += len,
                    _ => out.push((off, len)),
                }
                taken += len;
            }
        }
        out
    }

    /// Bytes currently marked.
    pub fn dirty_bytes(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum::<u64>()
            * self.granularity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_merge_into_runs_and_taking_clears() {
        let m = DirtyMap::new(1 << 20, 4096);
        m.mark(0, 1);
        m.mark(4096, 8192);
        m.mark(1 << 19, 4096);
        assert_eq!(m.dirty_bytes(), 4 * 4096);
        assert_eq!(m.take(u64::MAX), vec![(0, 3 * 4096), (1 << 19, 4096)]);
        assert_eq!(m.dirty_bytes(), 0);
        assert!(m.take(u64::MAX).is_empty());
        // Past the end is ignored; the last granule may be short.
        let m = DirtyMap::new(5000, 4096);
        m.mark(4500, 10_000);
        m.mark(9000, 1);
        assert_eq!(m.take(u64::MAX), vec![(4096, 904)]);
    }
}
