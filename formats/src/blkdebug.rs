//! The `blkdebug` filter: requests pass to the `image` child unless an
//! `inject-error` rule matches them, in which case they fail with the
//! rule's errno. For testing what jobs and guests do when I/O fails.
//!
//! A rule matches a request of its type (`iotype`, or the type its `event`
//! implies: `read_aio` reads, `write_aio` writes) that covers its `sector`
//! (any sector when -1). With `once` it fires a single time. QEMU's state
//! machine (`state`, `set-state`) and its metadata events are not
//! modelled.

use std::sync::atomic::{AtomicBool, Ordering};

use strata_graph::{
    BlockError, Filter, GraphError, GraphView, IoFuture, IoOp, IoVecs, NodeBuilder, NodeId, SlotId,
};

/// One `inject-error` rule.
#[derive(Debug)]
pub struct Rule {
    op: IoOp,
    errno: i32,
    sector: Option<u64>,
    once: bool,
    spent: AtomicBool,
}

impl Rule {
    /// A rule failing requests of type `op` that cover `sector` (any
    /// sector when `None`) with `errno`; with `once`, only the first.
    pub fn new(op: IoOp, errno: i32, sector: Option<u64>, once: bool) -> Rule {
        Rule {
            op,
            errno,
            sector,
            once,
            spent: AtomicBool::new(false),
        }
    }

    fn fires(&self, op: IoOp, offset: u64, len: u64) -> bool {
        if self.op != op || self.spent.load(Ordering::Relaxed) {
            return false;
        }
        let hit = self
            .sector
            .is_none_or(|s| (offset..offset + len.max(1)).contains(&(s * 512)));
        if hit && self.once {
            return !self.spent.swap(true, Ordering::Relaxed);
        }
        hit
    }
}

/// An open blkdebug node.
pub struct BlkdebugNode {
    image: SlotId,
    rules: Vec<Rule>,
}

impl BlkdebugNode {
    /// A blkdebug node over `image` with `rules`.
    pub fn open(
        b: &mut NodeBuilder<'_>,
        image: NodeId,
        rules: Vec<Rule>,
    ) -> Result<Self, GraphError> {
        Ok(BlkdebugNode {
            image: b.attach("image", image)?,
            rules,
        })
    }

    fn injected(&self, op: IoOp, offset: u64, len: u64) -> Option<BlockError> {
        self.rules
            .iter()
            .find(|r| r.fires(op, offset, len))
            .map(|r| BlockError::errno(op, offset, r.errno))
    }
}

impl Filter for BlkdebugNode {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    fn child(&self) -> SlotId {
        self.image
    }

    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        match self.injected(IoOp::Read, offset, buf.len()) {
            Some(e) => IoFuture::ready(Err(e)),
            None => g.via(self.image, |c| c.read(g, offset, buf)),
        }
    }

    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        match self.injected(IoOp::Write, offset, buf.len()) {
            Some(e) => IoFuture::ready(Err(e)),
            None => g.via(self.image, |c| c.write(g, offset, buf)),
        }
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> IoFuture<'a> {
        match self.injected(IoOp::WriteZeroes, offset, len) {
            Some(e) => IoFuture::ready(Err(e)),
            None => g.via(self.image, |c| c.write_zeroes(g, offset, len, unmap)),
        }
    }

    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        match self.injected(IoOp::Discard, offset, len) {
            Some(e) => IoFuture::ready(Err(e)),
            None => g.via(self.image, |c| c.discard(g, offset, len)),
        }
    }

    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a> {
        match self.injected(IoOp::Flush, 0, 0) {
            Some(e) => IoFuture::ready(Err(e)),
            None => g.via(self.image, |c| c.flush(g)),
        }
    }
}
