//! Dirty logging for live migration (VHOST_F_LOG_ALL, LOG_SHMFD): while
//! the frontend asks for it, every page of guest memory the device writes
//! gets its bit set in a bitmap the frontend shares (SET_LOG_BASE), one
//! bit per 4 KiB of guest physical address, set atomically. QEMU copies
//! those pages again before the guest runs on the destination.
//!
//! What the device writes: the data of IN and GET_ID requests and every
//! status byte (marked when the request finishes, before it reaches the
//! used ring), used elements, the used index and avail_event (the used
//! ring, marked whenever it is written). While logging is off this costs
//! one relaxed load and a predictable branch. While it is on, each queue
//! thread marks through a [`Marker`] that keeps the bitmap cached, and
//! sets bits with plain stores: no locked instruction and no fence.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use arc_swap::cache::Cache;
use arc_swap::ArcSwapOption;

use super::shared_map::SharedMap;

/// The bytes of guest memory one bit stands for.
pub const LOG_PAGE: u64 = 4096;
/// Largest log accepted: enough for 128 TiB of guest memory.
const MAX_LOG: u64 = 4 << 30;

/// A connection's dirty log: whether logging is on, and the bitmap.
#[derive(Default)]
pub struct DirtyLog {
    active: AtomicBool,
    bitmap: Arc<ArcSwapOption<Bitmap>>,
}

impl DirtyLog {
    /// True while the frontend wants writes logged: the hot path's one
    /// check.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Turns logging on or off (LOG_ALL in SET_FEATURES). Off means no
    /// marking at all, not marking into a stale bitmap.
    pub fn set_active(&self, on: bool) {
        if on != self.active.swap(on, Ordering::SeqCst) {
            tracing::info!("dirty logging {}", if on { "on" } else { "off" });
        }
    }

    /// Installs the bitmap the frontend shared (SET_LOG_BASE).
    pub fn set_bitmap(&self, bitmap: Arc<Bitmap>) {
        self.bitmap.store(Some(bitmap));
    }

    /// A marker for one queue thread.
    pub fn marker(self: &Arc<Self>) -> Marker {
        Marker {
            log: Arc::clone(self),
            bitmap: Cache::new(Arc::clone(&self.bitmap)),
        }
    }
}

/// One thread's way to mark a [`DirtyLog`]: the bitmap stays cached until
/// the frontend replaces it, so marking takes no reference and no lock.
pub struct Marker {
    log: Arc<DirtyLog>,
    bitmap: Cache<Arc<ArcSwapOption<Bitmap>>, Option<Arc<Bitmap>>>,
}

impl Marker {
    /// Marks the pages of each `(gpa, len)` range, when logging is on
    /// and the frontend shared a bitmap. The ranges are worked out only
    /// then: while logging is off, a caller pays one load.
    #[inline]
    pub fn mark<I: IntoIterator<Item = (u64, u64)>>(&mut self, ranges: impl FnOnce() -> I) {
        if !self.log.active() {
            return;
        }
        if let Some(b) = self.bitmap.load() {
            b.mark(ranges());
        }
    }
}

/// The frontend's log bitmap, mapped.
pub struct Bitmap(SharedMap);

impl Bitmap {
    /// Maps `size` bytes of `file` at `offset`.
    pub fn map(file: &File, offset: u64, size: u64) -> io::Result<Arc<Bitmap>> {
        if size > MAX_LOG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a dirty log of {size} bytes (at most {MAX_LOG})"),
            ));
        }
        Ok(Arc::new(Bitmap(SharedMap::map(
            file,
            offset,
            size,
            "dirty log",
        )?)))
    }

    fn byte(&self, byte: usize) -> &AtomicU8 {
        // SAFETY: callers keep `byte < len`, inside the mapping; an atomic
        // byte may alias shared memory the frontend also updates
        // atomically.
        unsafe { &*self.0.ptr().add(byte).cast::<AtomicU8>() }
    }

    /// Marks the pages of each `(gpa, len)` range of guest physical
    /// addresses, which the caller already wrote. Pages past the end of
    /// the log are not marked: the frontend sized it for all of guest
    /// memory.
    pub fn mark(&self, ranges: impl IntoIterator<Item = (u64, u64)>) {
        let pages = self.0.len() as u64 * 8;
        for (gpa, len) in ranges {
            if len == 0 {
                continue;
            }
            let first = gpa / LOG_PAGE;
            let last = gpa.saturating_add(len - 1) / LOG_PAGE;
            for page in first..=last.min(pages - 1) {
                let (byte, bit) = (self.byte((page / 8) as usize), 1 << (page % 8));
                // A plain store, released after the writes it logs: the
                // frontend, which clears bits with an atomic exchange and
                // then copies their pages, sees the data whenever it sees
                // the bit. Storing even when the bit looks set needs no
                // fence; a bit the frontend cleared in between is set again
                // (the page is copied once more), never lost. A locked OR
                // or a fence would wait for those writes to leave the store
                // buffer, which costs more than the rest of the marking.
                byte.store(byte.load(Ordering::Relaxed) | bit, Ordering::Release);
            }
        }
    }

    /// The bit of `page`.
    pub fn is_marked(&self, page: u64) -> bool {
        let byte = (page / 8) as usize;
        byte < self.0.len() && self.byte(byte).load(Ordering::Relaxed) & (1 << (page % 8)) != 0
    }
}

/// A memfd of `size` bytes with a bitmap mapped on it, as a frontend
/// shares one; for tests.
#[cfg(test)]
pub(crate) fn test_bitmap(size: u64) -> (Arc<Bitmap>, File) {
    // SAFETY: a static NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"strata-test-log".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    (Bitmap::map(&file, 0, size).unwrap(), file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_marks_every_page_it_touches_and_no_other() {
        let (b, _f) = test_bitmap(64);
        b.mark([(4095, 2)]);
        assert!(b.is_marked(0) && b.is_marked(1));
        assert!(!b.is_marked(2));
        b.mark([(10 * LOG_PAGE, 1)]);
        assert!(b.is_marked(10) && !b.is_marked(9) && !b.is_marked(11));
        b.mark([(20 * LOG_PAGE, 3 * LOG_PAGE)]);
        assert!((20..23).all(|p| b.is_marked(p)) && !b.is_marked(23));
        b.mark([(0, 0)]);
        // Past the end of the log: nothing, and no fault.
        b.mark([(u64::MAX - 10, 100), (64 * 8 * LOG_PAGE, LOG_PAGE)]);
        assert!(!b.is_marked(64 * 8));
    }

    #[test]
    fn the_bits_are_where_the_frontend_reads_them() {
        let (b, f) = test_bitmap(4096);
        b.mark([(9 * LOG_PAGE, 1)]);
        let mut bytes = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut bytes, 0).unwrap();
        assert_eq!(bytes, [0, 0b10], "page 9: byte 1, bit 1");
    }

    #[test]
    fn marking_stops_when_logging_is_turned_off() {
        let log = Arc::new(DirtyLog::default());
        let mut m = log.marker();
        let (b, _f) = test_bitmap(64);
        log.set_bitmap(Arc::clone(&b));
        m.mark(|| [(0, 1)]);
        assert!(!b.is_marked(0), "not on yet");
        log.set_active(true);
        m.mark(|| [(LOG_PAGE, 1)]);
        assert!(b.is_marked(1));
        log.set_active(false);
        m.mark(|| [(2 * LOG_PAGE, 1)]);
        assert!(!b.is_marked(2), "off again");
    }

    #[test]
    fn a_marker_follows_a_new_bitmap() {
        let log = Arc::new(DirtyLog::default());
        let mut m = log.marker();
        log.set_active(true);
        let (old, _f) = test_bitmap(64);
        log.set_bitmap(Arc::clone(&old));
        m.mark(|| [(0, 1)]);
        let (new, _g) = test_bitmap(64);
        log.set_bitmap(Arc::clone(&new));
        m.mark(|| [(LOG_PAGE, 1)]);
        assert!(old.is_marked(0) && !old.is_marked(1));
        assert!(new.is_marked(1) && !new.is_marked(0));
    }

    #[test]
    fn a_log_that_does_not_fit_is_refused() {
        let (_b, f) = test_bitmap(8192);
        assert!(Bitmap::map(&f, 0, 16384).is_err());
        assert!(Bitmap::map(&f, 100, 64).is_err());
        assert!(Bitmap::map(&f, 0, 0).is_err());
    }
}
