//! The last data extent a driver's block-status query found, so that the
//! next query inside it needs no system call (QEMU's block-status cache).
//! An NBD client reading at random asks for status before every read.
//!
//! Only data is remembered. Calling a hole data is never wrong, only less
//! precise (the bytes read back as zeroes either way), so an entry that a
//! writer the node does not know about made stale costs nothing. What the
//! node itself does to punch holes forgets the entry.

use std::ops::Range;
use std::sync::Mutex;

/// One remembered data extent, and a generation that every forgetting
/// bumps, so that a query that raced with a discard cannot store what it
/// saw before the discard.
#[derive(Debug, Default)]
pub struct DataExtentCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    extent: Option<Range<u64>>,
}

impl DataExtentCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many of the `len` bytes at `offset` are known to be data (at
    /// least 1), or `None` when `offset` is outside the remembered extent.
    pub fn lookup(&self, offset: u64, len: u64) -> Option<u64> {
        let inner = self.lock();
        let e = inner.extent.as_ref().filter(|e| e.contains(&offset))?;
        Some((e.end - offset).min(len).max(1))
    }

    /// The generation to hand to [`fill`](Self::fill): read it before the
    /// query whose answer is to be remembered.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Remembers `extent` as data, unless the cache was told to forget
    /// since `generation` was read.
    pub fn fill(&self, generation: u64, extent: Range<u64>) {
        let mut inner = self.lock();
        if inner.generation == generation && !extent.is_empty() {
            inner.extent = Some(extent);
        }
    }

    /// Forgets the extent: call it once anything that may turn data into a
    /// hole (a discard, zeroing, a shrink) is done, before it completes.
    pub fn forget(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.extent = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_inside_the_extent_only() {
        let c = DataExtentCache::default();
        assert_eq!(c.lookup(0, 4096), None);
        c.fill(c.generation(), 4096..65536);
        assert_eq!(c.lookup(4096, 4096), Some(4096));
        assert_eq!(c.lookup(61440, 65536), Some(4096), "clipped to the extent");
        assert_eq!(c.lookup(65536, 4096), None);
        assert_eq!(c.lookup(0, 4096), None);
    }

    #[test]
    fn a_query_that_raced_with_a_forget_is_not_remembered() {
        let c = DataExtentCache::default();
        let before = c.generation();
        c.forget();
        c.fill(before, 0..4096);
        assert_eq!(c.lookup(0, 1), None);
        c.fill(c.generation(), 0..4096);
        c.forget();
        assert_eq!(c.lookup(0, 1), None);
    }
}
