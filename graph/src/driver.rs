//! The asynchronous interface every block driver implements.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use recycle_box::{coerce_box, RecycleBox};

use crate::{BlockError, GraphView, IoVecs, SlotPerm};

/// The future a driver returns for one request.
///
/// Requests that finish at once (a range error, a null read, a filter
/// handing its child's future straight through) need no storage; the rest
/// keep their state machine in a box from the thread's pool, which goes
/// back to the pool when the future is dropped. A box too small for the
/// next future is replaced by one that fits, so the pool soon holds only
/// boxes as large as the largest future in use, and requests then allocate
/// nothing. (Each thread keeps up to `POOL_MAX` boxes.) Futures run on the
/// thread that issued the request (one executor per queue thread), so they
/// need not be `Send`.
pub enum IoFuture<'a, T = ()> {
    /// Already finished.
    Ready(Option<Result<T, BlockError>>),
    /// Still running.
    Running(Pooled<'a, T>),
}

/// A running driver future, in a box that goes back to the thread's pool
/// when it is dropped.
pub struct Pooled<'a, T>(Option<Pin<RecycleBox<DynIo<'a, T>>>>);

type DynIo<'a, T> = dyn Future<Output = Result<T, BlockError>> + 'a;

/// Boxes kept per thread for futures; beyond this many, a freed box is
/// returned to the allocator.
const POOL_MAX: usize = 1024;

thread_local! {
    static POOL: RefCell<Vec<RecycleBox<()>>> = const { RefCell::new(Vec::new()) };
}

impl<'a, T> IoFuture<'a, T> {
    /// A future that has already finished with `res`.
    pub fn ready(res: Result<T, BlockError>) -> Self {
        IoFuture::Ready(Some(res))
    }

    /// Boxes `fut`, in a box from the thread's pool if it has one. (A box
    /// too small for `fut` is grown, so the pool settles on boxes that
    /// hold the largest futures in use.)
    pub fn new(fut: impl Future<Output = Result<T, BlockError>> + 'a) -> Self {
        let boxed = match POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten() {
            Some(empty) => RecycleBox::recycle(empty, fut),
            None => RecycleBox::new(fut),
        };
        let boxed: RecycleBox<DynIo<'a, T>> = coerce_box!(boxed);
        IoFuture::Running(Pooled(Some(RecycleBox::into_pin(boxed))))
    }
}

impl<T> Drop for Pooled<'_, T> {
    fn drop(&mut self) {
        if let Some(fut) = self.0.take() {
            // Drop the future first: it may hold futures that return their
            // own boxes to the pool.
            let empty = RecycleBox::vacate_pinned(fut);
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(empty);
                }
            });
        }
    }
}

// The result is moved out, never pinned in place.
impl<T> Unpin for IoFuture<'_, T> {}

impl<T> Future for IoFuture<'_, T> {
    type Output = Result<T, BlockError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            IoFuture::Ready(res) => {
                Poll::Ready(res.take().expect("IoFuture polled after completion"))
            }
            IoFuture::Running(Pooled(Some(fut))) => fut.as_mut().poll(cx),
            IoFuture::Running(Pooled(None)) => {
                unreachable!("a pooled future is only emptied by drop")
            }
        }
    }
}

/// The answer of [`BlockDriver::block_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// How many bytes the answer covers.
    pub len: u64,
    /// The node (or the storage below it) holds the data, rather than
    /// passing reads on to a backing node.
    pub allocated: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// Where the data is in the file below, when it is in one piece there
    /// (what `qemu-img map` calls the offset).
    pub offset: Option<u64>,
}

/// What a node tells monitoring about itself, beyond its size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Bytes the node's storage takes on the host (what QEMU calls the
    /// actual size): for a thin image, how full it is.
    pub allocated_bytes: Option<u64>,
    /// The node's metadata caches.
    pub caches: Vec<CacheStats>,
}

/// Lookups in one cache of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// Which cache (`l2`, ...).
    pub name: &'static str,
    /// Lookups it answered.
    pub hits: u64,
    /// Lookups that had to read the image.
    pub misses: u64,
}

/// A node's behaviour: a format (raw, qcow2), a protocol (file, null) or a
/// filter. Offsets and lengths are in bytes of the node's own address space.
///
/// A driver never holds its children. It keeps the [`SlotId`](crate::SlotId)s
/// it was given when it was opened and resolves them through `g` on every
/// request, so a child swapped in the slot table is seen by the next request.
pub trait BlockDriver: Send + Sync + 'static {
    /// The driver's name as the command line spells it (`file`, `raw`, ...).
    fn driver_name(&self) -> &'static str;

    /// The node's current size in bytes.
    fn size(&self, g: &GraphView) -> Result<u64, BlockError>;

    /// What the node asks of its child in `role`, given what its own parents
    /// ask of it (see [`default_child_perm`](crate::default_child_perm)).
    fn child_perm(&self, role: &str, parents: SlotPerm) -> SlotPerm {
        crate::default_child_perm(role, parents)
    }

    /// First phase of a permission change: the node's parents will hold
    /// `perm` together. A node that mirrors its permissions outside the
    /// process (image locks) takes the new ones on top of the old, and
    /// refuses if it cannot; [`commit_perm`](Self::commit_perm) or
    /// [`abort_perm`](Self::abort_perm) follows.
    fn prepare_perm(
        &self,
        _perm: SlotPerm,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }

    /// The prepared permissions are now the node's: lets go of the rest.
    fn commit_perm(&self) {}

    /// The change did not happen: lets go of what was prepared.
    fn abort_perm(&self) {}

    /// The errno of a write-back failure the node cannot recover from (a
    /// failed fdatasync through the page cache): its flushes fail for good,
    /// and nothing may write metadata that could point at the lost data.
    fn write_back_error(&self) -> Option<i32> {
        None
    }

    /// The daemon is exiting, its requests drained and flushed: lets go of
    /// what would otherwise outlive the process in someone else's hands
    /// (a cluster's lock on the image). No request follows.
    fn close(&self) {}

    /// What the node reports for monitoring; nothing by default.
    fn stats(&self, _g: &GraphView) -> NodeStats {
        NodeStats::default()
    }

    /// True when the node cannot be written at all (opened read-only).
    fn is_read_only(&self) -> bool {
        false
    }

    /// The alignment, in bytes, that request offsets and lengths must have.
    fn request_alignment(&self, _g: &GraphView) -> u32 {
        1
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a>;

    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a>;

    /// Makes `len` bytes at `offset` read as zeroes. With `may_unmap` the
    /// driver may also release the space.
    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> IoFuture<'a>;

    /// Whether [`write_zeroes`](Self::write_zeroes) of `len` bytes at
    /// `offset` changes metadata rather than writing zeroes, so that it
    /// costs far less than a write (what NBD's FAST_ZERO asks). By default
    /// it does not.
    fn zeroes_fast(&self, _g: &GraphView, _offset: u64, _len: u64) -> bool {
        false
    }

    /// Tells the node that `len` bytes at `offset` are no longer needed.
    /// What they read as afterwards is up to the driver.
    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a>;

    /// Makes every completed write durable.
    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a>;

    /// Where the data of a range comes from, for the first run of bytes
    /// from `offset` that share one answer (at most `len`). By default all
    /// of it is data held by this node.
    fn block_status<'a>(
        &'a self,
        _g: &'a GraphView,
        _offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        IoFuture::ready(Ok(BlockStatus {
            len,
            allocated: true,
            zero: false,
            offset: None,
        }))
    }

    /// Writes `buf` at `offset` into the parts of the range that this node
    /// does not hold itself (where reads fall through to its backing
    /// node), and leaves alone the parts it holds, so nothing written by
    /// anyone else is ever replaced. Stream and copy-on-read use it with
    /// data that reads already return. A node without a backing node holds
    /// everything, so by default this does nothing.
    fn fill_unallocated<'a>(
        &'a self,
        _g: &'a GraphView,
        _offset: u64,
        _buf: &'a IoVecs<'a>,
    ) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }

    /// Records in the image's own metadata that its backing file is now
    /// `file`, of format `format` (or that it has none), durably.
    fn change_backing_file<'a>(
        &'a self,
        _g: &'a GraphView,
        _file: Option<&'a str>,
        _format: Option<&'a str>,
    ) -> IoFuture<'a> {
        IoFuture::ready(Err(BlockError::Unsupported {
            op: crate::IoOp::ChangeBackingFile,
            driver: self.driver_name(),
        }))
    }

    /// State a reopen of this node should carry over to its replacement
    /// (caches that must not go stale), if the driver has any.
    fn reopen_state(&self) -> Option<std::sync::Arc<dyn std::any::Any + Send + Sync>> {
        None
    }

    /// Changes the node's size.
    fn resize<'a>(&'a self, _g: &'a GraphView, _size: u64) -> IoFuture<'a> {
        IoFuture::ready(Err(BlockError::Unsupported {
            op: crate::IoOp::Resize,
            driver: self.driver_name(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address<T>(f: &IoFuture<'_, T>) -> *const u8 {
        match f {
            IoFuture::Running(Pooled(Some(fut))) => &**fut as *const _ as *const u8,
            _ => panic!("not a running future"),
        }
    }

    #[test]
    fn a_dropped_future_lends_its_box_to_the_next() {
        let big = [7u8; 512];
        let first = IoFuture::new(async move { Ok(big[511]) });
        let at = address(&first);
        drop(first);
        // Smaller, and of another type: fits the same box.
        let second = IoFuture::new(async { Ok(1u8) });
        assert_eq!(address(&second), at);
        assert_eq!(futures::executor::block_on(second).unwrap(), 1);
    }

    #[test]
    fn nested_futures_return_every_box() {
        POOL.with(|p| p.borrow_mut().clear());
        let outer = IoFuture::new(async {
            let inner = IoFuture::new(async { Ok(2u8) });
            inner.await
        });
        assert_eq!(futures::executor::block_on(outer).unwrap(), 2);
        assert_eq!(POOL.with(|p| p.borrow().len()), 2);
    }
}
