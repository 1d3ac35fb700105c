//! `copy-mode=write-blocking`: a guest write is written to the mirror's
//! target too before it completes, so the job's dirty map does not grow
//! with the guest's writes. What must never happen is the target ending
//! older than the source: a background copy that read the range before the
//! guest wrote it, or another guest write to the same range, could land on
//! the target after this one. So every such operation registers its range
//! here first, and a guest write that overlaps another marks the range
//! dirty instead of writing the target; the job copies it again.

use std::sync::{Arc, Mutex};

use crate::dirty::DirtyMap;

/// The ranges being written to the target, and where to mark.
pub struct WriteBlocking {
    /// The job's dirty map.
    pub dirty: Arc<DirtyMap>,
    ops: Mutex<Vec<(u64, u64, u64)>>,
    next: std::sync::atomic::AtomicU64,
}

/// A registered operation; it ends when dropped.
pub struct Op<'a> {
    wb: &'a WriteBlocking,
    id: u64,
    start: u64,
    end: u64,
}

impl WriteBlocking {
    /// Contended ranges are marked in `dirty`.
    pub fn new(dirty: Arc<DirtyMap>) -> Self {
        WriteBlocking {
            dirty,
            ops: Mutex::new(Vec::new()),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn ops(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64, u64)>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an operation on `len` bytes at `offset`, before it reads
    /// or writes anything.
    pub fn begin(&self, offset: u64, len: u64) -> Op<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let end = offset.saturating_add(len);
        self.ops().push((id, offset, end));
        Op {
            wb: self,
            id,
            start: offset,
            end,
        }
    }
}

impl Op<'_> {
    /// True when another registered operation overlaps this one.
    pub fn contended(&self) -> bool {
        self.wb
            .ops()
            .iter()
            .any(|&(id, s, e)| id != self.id && s < self.end && self.start < e)
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        let id = self.id;
        self.wb.ops().retain(|o| o.0 != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_overlapping_operations_contend() {
        let wb = WriteBlocking::new(Arc::new(DirtyMap::new(1 << 20, 4096)));
        let a = wb.begin(0, 4096);
        let b = wb.begin(4096, 4096);
        assert!(!a.contended() && !b.contended());
        let c = wb.begin(4095, 2);
        assert!(a.contended() && b.contended() && c.contended());
        drop(c);
        assert!(!a.contended());
    }
}
