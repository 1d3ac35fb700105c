//! Filters: nodes with one child that requests pass through. A filter
//! overrides only what it changes; everything else goes to the child
//! unchanged, as QEMU's `bdrv_filter_*` defaults do.

use crate::{
    default_child_perm, BlockDriver, BlockError, BlockStatus, GraphView, IoFuture, IoVecs, SlotId,
    SlotPerm,
};

/// A node that passes requests to the node in one slot. Every
/// [`BlockDriver`] method defaults to passing through; implementing this
/// trait implements [`BlockDriver`].
pub trait Filter: Send + Sync + 'static {
    /// The driver's name as the command line spells it.
    fn driver_name(&self) -> &'static str;

    /// The slot requests go through.
    fn child(&self) -> SlotId;

    /// See [`BlockDriver::child_perm`].
    fn child_perm(&self, role: &str, parents: SlotPerm) -> SlotPerm {
        default_child_perm(role, parents)
    }

    /// See [`BlockDriver::size`].
    fn size(&self, g: &GraphView) -> Result<u64, BlockError> {
        g.child(self.child())?.size(g)
    }

    /// See [`BlockDriver::request_alignment`].
    fn request_alignment(&self, g: &GraphView) -> u32 {
        g.child(self.child()).map_or(1, |c| c.request_alignment(g))
    }

    /// See [`BlockDriver::zeroes_fast`].
    fn zeroes_fast(&self, g: &GraphView, offset: u64, len: u64) -> bool {
        g.child(self.child())
            .is_ok_and(|c| c.zeroes_fast(g, offset, len))
    }

    /// See [`BlockDriver::read`].
    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        g.via(self.child(), |c| c.read(g, offset, buf))
    }

    /// See [`BlockDriver::write`].
    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        g.via(self.child(), |c| c.write(g, offset, buf))
    }

    /// See [`BlockDriver::write_zeroes`].
    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> IoFuture<'a> {
        g.via(self.child(), |c| c.write_zeroes(g, offset, len, may_unmap))
    }

    /// See [`BlockDriver::discard`].
    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        g.via(self.child(), |c| c.discard(g, offset, len))
    }

    /// See [`BlockDriver::flush`].
    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a> {
        g.via(self.child(), |c| c.flush(g))
    }

    /// See [`BlockDriver::block_status`].
    fn block_status<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        g.via(self.child(), |c| c.block_status(g, offset, len))
    }

    /// See [`BlockDriver::fill_unallocated`].
    fn fill_unallocated<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        buf: &'a IoVecs<'a>,
    ) -> IoFuture<'a> {
        g.via(self.child(), |c| c.fill_unallocated(g, offset, buf))
    }

    /// See [`BlockDriver::resize`].
    fn resize<'a>(&'a self, g: &'a GraphView, size: u64) -> IoFuture<'a> {
        g.via(self.child(), |c| c.resize(g, size))
    }
}

impl<F: Filter> BlockDriver for F {
    fn driver_name(&self) -> &'static str {
        Filter::driver_name(self)
    }

    fn size(&self, g: &GraphView) -> Result<u64, BlockError> {
        Filter::size(self, g)
    }

    fn child_perm(&self, role: &str, parents: SlotPerm) -> SlotPerm {
        Filter::child_perm(self, role, parents)
    }

    fn request_alignment(&self, g: &GraphView) -> u32 {
        Filter::request_alignment(self, g)
    }

    fn zeroes_fast(&self, g: &GraphView, offset: u64, len: u64) -> bool {
        Filter::zeroes_fast(self, g, offset, len)
    }

    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        Filter::read(self, g, offset, buf)
    }

    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        Filter::write(self, g, offset, buf)
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> IoFuture<'a> {
        Filter::write_zeroes(self, g, offset, len, may_unmap)
    }

    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        Filter::discard(self, g, offset, len)
    }

    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a> {
        Filter::flush(self, g)
    }

    fn block_status<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        Filter::block_status(self, g, offset, len)
    }

    fn fill_unallocated<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        buf: &'a IoVecs<'a>,
    ) -> IoFuture<'a> {
        Filter::fill_unallocated(self, g, offset, buf)
    }

    fn resize<'a>(&'a self, g: &'a GraphView, size: u64) -> IoFuture<'a> {
        Filter::resize(self, g, size)
    }
}
