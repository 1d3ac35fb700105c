//! The `throttle` filter: requests wait until their throttle group admits
//! them, then pass to the `file` child unchanged.

pub mod group;

use std::sync::Arc;

use strata_graph::{Filter, GraphError, GraphView, IoFuture, IoVecs, NodeBuilder, NodeId, SlotId};

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

impl Filter for ThrottleNode {
    fn driver_name(&self) -> &'static str {
        "throttle"
    }

    fn child(&self) -> SlotId {
        self.file
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
}
