//! The `throttle` filter: requests wait until their throttle group admits
//! them, then pass to the `file` child unchanged.

pub mod group;

use std::sync::Arc;

use strata_graph::{
    BlockDriver, BlockError, BlockStatus, GraphError, GraphView, IoFuture, IoVecs, NodeBuilder,
    NodeId, SlotId,
};

use group::{Direction, ThrottleGroup};
use strata_runtime::reactor::sleep;

/// An open throttle node.
pub struct ThrottleNode {
    file: SlotId,
    group: Arc<ThrottleGroup>,
}

impl ThrottleNode {
    /// A throttle node over `file`, limited by `group`.
    pub fn open(
        b: &mut NodeBuilder<'_>,
        file: NodeId,
        group: Arc<ThrottleGroup>,
    ) -> Result<Self, GraphError> {
        Ok(ThrottleNode {
            file: b.attach("file", file)?,
            group,
        })
    }

    /// The group limiting this node.
    pub fn group(&self) -> &ThrottleGroup {
        &self.group
    }

    async fn admit(&self, dir: Direction, bytes: u64) {
        while let Some(wait) = self.group.try_admit(dir, bytes) {
            if let Err(e) = sleep(wait).await {
                // Without a timer, go on unthrottled rather than fail I/O.
                tracing::warn!("throttle: cannot wait: {e}");
                return;
            }
        }
    }
}

impl BlockDriver for ThrottleNode {
    fn driver_name(&self) -> &'static str {
        "throttle"
    }

    fn size(&self, g: &GraphView) -> Result<u64, BlockError> {
        g.child(self.file)?.size(g)
    }

    fn request_alignment(&self, g: &GraphView) -> u32 {
        g.child(self.file).map_or(1, |c| c.request_alignment(g))
    }

    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.admit(Direction::Read, buf.len()).await;
            g.child(self.file)?.read(g, offset, buf).await
        })
    }

    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.admit(Direction::Write, buf.len()).await;
            g.child(self.file)?.write(g, offset, buf).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.admit(Direction::Write, len).await;
            g.child(self.file)?
                .write_zeroes(g, offset, len, unmap)
                .await
        })
    }

    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.admit(Direction::Write, len).await;
            g.child(self.file)?.discard(g, offset, len).await
        })
    }

    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a> {
        g.via(self.file, |c| c.flush(g))
    }

    fn fill_unallocated<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        buf: &'a IoVecs<'a>,
    ) -> IoFuture<'a> {
        g.via(self.file, |c| c.fill_unallocated(g, offset, buf))
    }

    fn block_status<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        g.via(self.file, |c| c.block_status(g, offset, len))
    }
}
