//! The `null-co` protocol driver: a disk of a fixed size that stores
//! nothing. Writes succeed and vanish; reads return zeroes, or leave the
//! buffer untouched with `read-zeroes=off` (for benchmarks that measure
//! the I/O path alone).

use strata_graph::{BlockDriver, BlockError, GraphView, IoFuture, IoOp, IoVecs};

/// Options of a null node.
#[derive(Clone, Debug)]
pub struct NullOptions {
    /// The size in bytes.
    pub size: u64,
    /// Whether reads fill the buffer with zeroes.
    pub read_zeroes: bool,
}

/// An open null node.
pub struct NullNode {
    opts: NullOptions,
}

impl NullNode {
    /// A null node with `opts`.
    pub fn new(opts: NullOptions) -> Self {
        NullNode { opts }
    }

    fn done(&self, op: IoOp, offset: u64, len: u64) -> IoFuture<'static> {
        IoFuture::ready(BlockError::check_range(op, offset, len, self.opts.size))
    }
}

impl BlockDriver for NullNode {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }

    fn size(&self, _g: &GraphView) -> Result<u64, BlockError> {
        Ok(self.opts.size)
    }

    fn read<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        let res = BlockError::check_range(IoOp::Read, offset, buf.len(), self.opts.size);
        if res.is_ok() && self.opts.read_zeroes {
            buf.zero();
        }
        IoFuture::ready(res)
    }

    fn write<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        self.done(IoOp::Write, offset, buf.len())
    }

    fn write_zeroes<'a>(
        &'a self,
        _g: &'a GraphView,
        offset: u64,
        len: u64,
        _: bool,
    ) -> IoFuture<'a> {
        self.done(IoOp::WriteZeroes, offset, len)
    }

    fn discard<'a>(&'a self, _g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        self.done(IoOp::Discard, offset, len)
    }

    fn flush<'a>(&'a self, _g: &'a GraphView) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }
}
