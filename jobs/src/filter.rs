//! The filter a commit job puts above the image it commits: `commit_top`
//! above an intermediate image, `mirror_top` above the active layer. Both
//! pass every request through. They exist for what they ask of the chain
//! below: nothing beyond their parents' needs, and they share everything,
//! so the job may write into the base while it is still a backing node.
//! `mirror_top` also records what the guest changes, for the job to copy
//! again, or with `copy-mode=write-blocking` writes it to the mirror's
//! target before the guest's request completes.

use std::sync::Arc;

use strata_graph::{
    Filter, GraphError, GraphView, IoFuture, IoVecs, NodeBuilder, NodeId, Perm, SlotId, SlotPerm,
};

use crate::dirty::DirtyMap;
use crate::write_blocking::WriteBlocking;

/// A commit or mirror job's filter node.
pub struct TopFilter {
    child: SlotId,
    name: &'static str,
    dirty: Option<Arc<DirtyMap>>,
    blocking: Option<(NodeId, Arc<WriteBlocking>)>,
}

impl TopFilter {
    /// A `commit_top` (no `dirty`) or `mirror_top` (with `dirty`) filter
    /// over `top`; with `blocking`, guest writes also go to that node.
    pub fn open(
        b: &mut NodeBuilder<'_>,
        top: NodeId,
        dirty: Option<Arc<DirtyMap>>,
        blocking: Option<(NodeId, Arc<WriteBlocking>)>,
    ) -> Result<Self, GraphError> {
        Ok(TopFilter {
            child: b.attach("backing", top)?,
            name: if dirty.is_some() {
                "mirror_top"
            } else {
                "commit_top"
            },
            dirty,
            blocking,
        })
    }

    fn written<'a>(&'a self, offset: u64, len: u64, io: IoFuture<'a>) -> IoFuture<'a> {
        match &self.dirty {
            None => io,
            Some(d) => IoFuture::new(async move {
                let res = io.await;
                // Even a failed write may have changed some of the range.
                d.mark(offset, len);
                res
            }),
        }
    }

    /// A write-class request, written through to the target when the
    /// copy mode says so and nothing else is writing the same range.
    fn mirrored<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        io: IoFuture<'a>,
        to_target: impl FnOnce(&'a dyn strata_graph::BlockDriver) -> IoFuture<'a> + 'a,
    ) -> IoFuture<'a> {
        let Some((target, wb)) = &self.blocking else {
            return self.written(offset, len, io);
        };
        IoFuture::new(async move {
            let op = wb.begin(offset, len);
            let res = io.await;
            let copied = match (&res, g.node(*target)) {
                (Ok(()), Some(t)) if !op.contended() => to_target(t.driver()).await.is_ok(),
                _ => false,
            };
            if !copied {
                wb.dirty.mark(offset, len);
            }
            res
        })
    }
}

impl Filter for TopFilter {
    fn driver_name(&self) -> &'static str {
        self.name
    }

    fn child(&self) -> SlotId {
        self.child
    }

    fn child_perm(&self, _role: &str, parents: SlotPerm) -> SlotPerm {
        SlotPerm {
            need: parents.need,
            share: Perm::all(),
        }
    }

    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        self.mirrored(
            g,
            offset,
            buf.len(),
            g.via(self.child, |c| c.write(g, offset, buf)),
            move |t| t.write(g, offset, buf),
        )
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> IoFuture<'a> {
        self.mirrored(
            g,
            offset,
            len,
            g.via(self.child, |c| c.write_zeroes(g, offset, len, unmap)),
            move |t| t.write_zeroes(g, offset, len, unmap),
        )
    }

    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        self.written(
            offset,
            len,
            g.via(self.child, |c| c.discard(g, offset, len)),
        )
    }

    fn fill_unallocated<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        buf: &'a IoVecs<'a>,
    ) -> IoFuture<'a> {
        self.written(
            offset,
            buf.len(),
            g.via(self.child, |c| c.fill_unallocated(g, offset, buf)),
        )
    }
}
