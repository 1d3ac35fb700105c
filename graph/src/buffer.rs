//! Heap buffers aligned for O_DIRECT, for the few paths that cannot work in
//! place (misaligned guest buffers, zero-fill, metadata), and snapshots of
//! guest bytes that a decision is made on.
//!
//! Allocation failure is an error, never an abort: a guest or an image
//! decides how large some of these are.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::IoVecs;

/// A zero-initialised heap buffer with a chosen alignment.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out shared slices.
unsafe impl Sync for AlignedBuf {}

/// A buffer that could not be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot allocate a {len}-byte buffer")]
pub struct AllocError {
    /// The size asked for.
    pub len: usize,
}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    pub fn zeroed(len: usize, align: usize) -> Result<Self, AllocError> {
        let layout = Layout::from_size_align(len.max(1), align).map_err(|_| AllocError { len })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(AllocError { len })?;
        Ok(AlignedBuf { ptr, layout })
    }

    /// A snapshot of `len` bytes of `src` from `offset`: each byte is read
    /// once, and whatever happens to `src` afterwards, the snapshot is what
    /// a decision about those bytes is made on, and what is used after.
    pub fn snapshot(
        src: &IoVecs<'_>,
        offset: u64,
        len: usize,
        align: usize,
    ) -> Result<Self, AllocError> {
        let mut buf = Self::zeroed(len, align)?;
        src.copy_to_slice(offset, buf.as_mut_slice());
        Ok(buf)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// True for a zero-length buffer (never: allocations are at least 1 byte).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised bytes for as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// The contents, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    /// The buffer as a one-segment list.
    pub fn iovecs_mut(&mut self) -> IoVecs<'_> {
        IoVecs::from_slice(self.as_mut_slice())
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
