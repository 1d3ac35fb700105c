//! The asynchronous interface every block driver implements.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::{BlockError, GraphView, IoVecs, SlotPerm};

/// The future a driver returns for one request.
///
/// Requests that finish at once (a range error, a null read, a filter
/// handing its child's future straight through) allocate nothing; the rest
/// box their state machine. Futures run on the thread that issued the
/// request (one executor per queue thread), so they need not be `Send`.
pub enum IoFuture<'a, T = ()> {
    /// Already finished.
    Ready(Option<Result<T, BlockError>>),
    /// Still running.
    Running(Pin<Box<dyn Future<Output = Result<T, BlockError>> + 'a>>),
}

impl<'a, T> IoFuture<'a, T> {
    /// A future that has already finished with `res`.
    pub fn ready(res: Result<T, BlockError>) -> Self {
        IoFuture::Ready(Some(res))
    }

    /// Boxes `fut`.
    pub fn new(fut: impl Future<Output = Result<T, BlockError>> + 'a) -> Self {
        IoFuture::Running(Box::pin(fut))
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
            IoFuture::Running(fut) => fut.as_mut().poll(cx),
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
