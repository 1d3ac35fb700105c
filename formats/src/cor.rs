//! The `copy-on-read` filter: data read through it that the `file` child
//! only has from further down its backing chain is written into the child,
//! so the next read finds it there.

use strata_graph::{
    AlignedBuf, BlockError, Filter, GraphError, GraphView, IoFuture, IoVecs, NodeBuilder, NodeId,
    Perm, SlotId, SlotPerm,
};

/// Bytes copied up at a time.
const COPY_CHUNK: u64 = 1 << 20;

/// An open copy-on-read node.
pub struct CopyOnReadNode {
    file: SlotId,
}

impl CopyOnReadNode {
    /// A copy-on-read node over `file`.
    pub fn open(b: &mut NodeBuilder<'_>, file: NodeId) -> Result<Self, GraphError> {
        Ok(CopyOnReadNode {
            file: b.attach("file", file)?,
        })
    }

    /// Writes back the parts of a read that came from below the child.
    async fn copy_up(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        let child = g.child(self.file)?;
        let mut at = 0;
        while at < buf.len() {
            let st = child.block_status(g, offset + at, buf.len() - at).await?;
            // At most a chunk at a time: the copy below is bounded.
            let run = st.len.clamp(1, buf.len() - at).min(COPY_CHUNK);
            if !st.allocated {
                // Copy through a snapshot: the guest may change its buffer
                // while we write. A guest write that lands meanwhile wins:
                // fill_unallocated never replaces mapped data.
                let mut copy = AlignedBuf::snapshot(buf, at, run as usize, 4096)?;
                child
                    .fill_unallocated(g, offset + at, &copy.iovecs_mut())
                    .await?;
            }
            at += run;
        }
        Ok(())
    }
}

impl Filter for CopyOnReadNode {
    fn driver_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn child(&self) -> SlotId {
        self.file
    }

    fn child_perm(&self, role: &str, parents: SlotPerm) -> SlotPerm {
        let mut p = strata_graph::default_child_perm(role, parents);
        p.need |= Perm::WRITE_UNCHANGED;
        p
    }

    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(async move {
            g.child(self.file)?.read(g, offset, buf).await?;
            self.copy_up(g, offset, buf).await
        })
    }
}
