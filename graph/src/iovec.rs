//! Scatter-gather lists over memory the I/O path does not own.
//!
//! Guest RAM is the usual case: it stays mapped while a request holds the
//! guest memory, and the guest may touch it at any time, so Rust references
//! to it would be unsound. [`IoVecs`] carries raw `iovec`s instead, in the
//! exact layout io_uring and `preadv` take, and a lifetime that ties them to
//! whoever vouched for the memory.

use std::marker::PhantomData;

use smallvec::SmallVec;
use vm_memory::VolatileSlice;

/// The most segments one list may hold (Linux's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// A list of memory segments, valid for reads and writes for `'m`.
pub struct IoVecs<'m> {
    iov: SmallVec<[libc::iovec; 4]>,
    len: u64,
    _memory: PhantomData<&'m mut [u8]>,
}

impl Default for IoVecs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'m> IoVecs<'m> {
    /// An empty list.
    pub fn new() -> Self {
        IoVecs {
            iov: SmallVec::new(),
            len: 0,
            _memory: PhantomData,
        }
    }

    /// Appends a segment. Empty segments are skipped.
    ///
    /// # Safety
    ///
    /// `base..base + len` must be valid for reads and writes for `'m`, and no
    /// Rust reference to it may exist while the list is in use. Concurrent
    /// access by a guest is allowed: the list only ever copies in and out.
    pub unsafe fn push(&mut self, base: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.iov.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
        self.len += len as u64;
    }

    /// Appends the segments of `other`, which must be valid for as long.
    pub fn append(&mut self, other: &IoVecs<'m>) {
        for v in other.as_iovecs() {
            // SAFETY: `other` vouches for its segments for 'm.
            unsafe { self.push(v.iov_base.cast(), v.iov_len) };
        }
    }

    /// A list over `buf`, borrowed for as long as the list lives.
    pub fn from_slice(buf: &'m mut [u8]) -> Self {
        let mut v = IoVecs::new();
        // SAFETY: the exclusive borrow of `buf` lasts for 'm, so the memory is
        // valid and unaliased for the list's whole life.
        unsafe { v.push(buf.as_mut_ptr(), buf.len()) };
        v
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the list covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, in the layout `preadv` and io_uring take.
    pub fn as_iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// True when every segment starts and ends on a multiple of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.iov
            .iter()
            .all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
    }

    /// The sub-list covering `len` bytes from `offset`.
    ///
    /// # Panics
    ///
    /// When the range is not inside the list: that is a bug in the caller.
    pub fn slice(&self, offset: u64, len: u64) -> IoVecs<'m> {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "slice {offset}+{len} of a {}-byte list",
            self.len
        );
        let mut out = IoVecs::new();
        let mut skip = offset;
        let mut want = len;
        for v in &self.iov {
            if want == 0 {
                break;
            }
            let seg = v.iov_len as u64;
            if skip >= seg {
                skip -= seg;
                continue;
            }
            let take = (seg - skip).min(want);
            // SAFETY: a sub-range of a segment this list already vouches for,
            // for the same lifetime.
            unsafe { out.push(v.iov_base.cast::<u8>().add(skip as usize), take as usize) };
            want -= take;
            skip = 0;
        }
        out
    }

    /// Visits `(pointer, length, position in the list)` for each segment
    /// piece overlapping `len` bytes from `offset`.
    fn for_each_piece(&self, offset: u64, len: u64, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut done = 0u64;
        let mut pos = 0u64;
        for v in &self.iov {
            let seg = v.iov_len as u64;
            let start = offset + done;
            if done == len {
                break;
            }
            if start >= pos + seg {
                pos += seg;
                continue;
            }
            let within = start - pos;
            let take = (seg - within).min(len - done);
            // SAFETY: `within + take <= seg`, inside the segment.
            let p = unsafe { v.iov_base.cast::<u8>().add(within as usize) };
            f(p, take as usize, done as usize);
            done += take;
            pos += seg;
        }
        assert_eq!(
            done, len,
            "range {offset}+{len} of a {}-byte list",
            self.len
        );
    }

    /// Fills `len` bytes from `offset` with zeroes.
    pub fn zero_range(&self, offset: u64, len: u64) {
        self.for_each_piece(offset, len, |p, n, _| {
            // SAFETY: `p..p+n` lies in a segment valid for writes (see `push`).
            unsafe { std::ptr::write_bytes(p, 0, n) }
        });
    }

    /// Fills the whole list with zeroes.
    pub fn zero(&self) {
        self.zero_range(0, self.len);
    }

    /// Copies `src` into the list, starting `offset` bytes in, with
    /// vm-memory's volatile copy (the list may be guest memory).
    pub fn copy_from_slice(&self, offset: u64, src: &[u8]) {
        self.for_each_piece(offset, src.len() as u64, |p, n, at| {
            // SAFETY: `p..p+n` lies in a segment valid for reads and writes
            // for as long as the list lives (see `push`); it cannot overlap
            // `src`, which is a live Rust borrow.
            let dst = unsafe { VolatileSlice::<()>::new(p, n) };
            dst.copy_from(&src[at..at + n]);
        });
    }

    /// Copies `dst.len()` bytes out of the list, starting `offset` bytes
    /// in, with vm-memory's volatile copy: each byte is read once, so `dst`
    /// is a snapshot even while a guest writes the list.
    pub fn copy_to_slice(&self, offset: u64, dst: &mut [u8]) {
        self.for_each_piece(offset, dst.len() as u64, |p, n, at| {
            // SAFETY: as in `copy_from_slice`.
            let src = unsafe { VolatileSlice::<()>::new(p, n) };
            src.copy_to(&mut dst[at..at + n]);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_segments(mem: &mut [u8]) -> IoVecs<'_> {
        let (a, rest) = mem.split_at_mut(3);
        let (b, c) = rest.split_at_mut(5);
        let mut v = IoVecs::new();
        for s in [a, b, c] {
            // SAFETY: disjoint pieces of one exclusive borrow.
            unsafe { v.push(s.as_mut_ptr(), s.len()) };
        }
        v
    }

    #[test]
    fn slice_crosses_segments() {
        let mut mem: Vec<u8> = (0..16).collect();
        let v = three_segments(&mut mem);
        assert_eq!(v.len(), 16);
        let s = v.slice(2, 9);
        assert_eq!(s.len(), 9);
        assert_eq!(s.as_iovecs().len(), 3);
        let mut out = [0u8; 9];
        s.copy_to_slice(0, &mut out);
        assert_eq!(out, [2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn copy_and_zero_ranges() {
        let mut mem = vec![0xffu8; 16];
        let v = three_segments(&mut mem);
        v.copy_from_slice(1, &[1, 2, 3, 4, 5, 6]);
        v.zero_range(10, 4);
        drop(v);
        assert_eq!(
            mem,
            [0xff, 1, 2, 3, 4, 5, 6, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0xff, 0xff]
        );
    }

    #[test]
    #[should_panic(expected = "slice 10+7")]
    fn slice_past_end_panics() {
        let mut mem = vec![0u8; 16];
        three_segments(&mut mem).slice(10, 7);
    }

    #[test]
    fn alignment_checks_every_segment() {
        let mut buf = crate::AlignedBuf::zeroed(8192, 4096).unwrap();
        let v = buf.iovecs_mut();
        assert!(v.is_aligned(4096));
        assert!(!v.slice(512, 4096).is_aligned(4096));
        assert!(v.slice(4096, 4096).is_aligned(4096));
    }
}
