//! The qcow2 node as the graph sees it: [`BlockDriver`] over the read and
//! write paths.

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use strata_graph::{
    BlockDriver, BlockError, BlockStatus, GraphView, IoFuture, IoOp, IoVecs, NodeStats, Perm,
    SlotPerm,
};

use super::node::Qcow2Node;
use super::write::Zeroing;

impl BlockDriver for Qcow2Node {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn child_perm(&self, role: &str, parents: SlotPerm) -> SlotPerm {
        let mut p = strata_graph::default_child_perm(role, parents);
        if role == "file" {
            // The metadata must stay as read, and is written whether or not
            // the guest writes: no one else may write or resize the file.
            p.need |= Perm::CONSISTENT_READ;
            p.share -= Perm::WRITE | Perm::RESIZE;
            if !self.read_only {
                p.need |= Perm::WRITE | Perm::RESIZE;
            }
        }
        p
    }

    fn size(&self, _g: &GraphView) -> Result<u64, BlockError> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn stats(&self, g: &GraphView) -> NodeStats {
        NodeStats {
            allocated_bytes: g
                .child(self.file)
                .ok()
                .and_then(|f| f.stats(g).allocated_bytes),
            caches: vec![self.l2.stats()],
        }
    }

    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(self.read_impl(g, offset, buf))
    }

    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(self.write_impl(g, offset, buf))
    }

    /// Whole clusters (whole subclusters in an image with extended L2
    /// entries) are zeroed in metadata; anything less is written.
    fn zeroes_fast(&self, _g: &GraphView, offset: u64, len: u64) -> bool {
        let unit = if self.g.extended {
            self.g.subcluster_size()
        } else {
            self.g.cluster_size()
        };
        !self.read_only && offset % unit == 0 && len % unit == 0
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> IoFuture<'a> {
        IoFuture::new(self.zero_impl(
            g,
            offset,
            len,
            if may_unmap {
                Zeroing::Unmap
            } else {
                Zeroing::Keep
            },
        ))
    }

    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        if !self.discard {
            if let Err(e) = BlockError::check_range(
                IoOp::Discard,
                offset,
                len,
                self.size.load(Ordering::Relaxed),
            ) {
                return IoFuture::ready(Err(e));
            }
            return IoFuture::ready(Ok(()));
        }
        IoFuture::new(self.zero_impl(g, offset, len, Zeroing::Discard))
    }

    fn reopen_state(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        Some(Arc::clone(&self.inner) as Arc<dyn Any + Send + Sync>)
    }

    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a> {
        IoFuture::new(async move {
            // A node reopened read-only may still hold metadata its
            // writable predecessor changed: write it even then.
            let io = self.io(g);
            let res = match self.lock_meta(io).await {
                Ok(mut meta) => meta.write_back(io, &self.l2, &self.g).await,
                Err(e) => Err(e),
            };
            res.map_err(|e| e.to_block(IoOp::Flush, 0))
        })
    }

    fn block_status<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        IoFuture::new(self.status_impl(g, offset, len))
    }

    fn resize<'a>(&'a self, g: &'a GraphView, size: u64) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.resize_impl(g, size)
                .await
                .map_err(|e| e.to_block(IoOp::Resize, size))
        })
    }

    fn fill_unallocated<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        buf: &'a IoVecs<'a>,
    ) -> IoFuture<'a> {
        IoFuture::new(self.fill_impl(g, offset, buf))
    }

    fn change_backing_file<'a>(
        &'a self,
        g: &'a GraphView,
        file: Option<&'a str>,
        format: Option<&'a str>,
    ) -> IoFuture<'a> {
        IoFuture::new(async move {
            if self.read_only {
                return Err(BlockError::ReadOnly {
                    op: IoOp::ChangeBackingFile,
                });
            }
            let mut meta = self.meta.lock().await;
            // Everything the old chain made visible is in place first.
            meta.write_back(self.io(g), &self.l2, &self.g)
                .await
                .and(Ok(()))
                .map_err(|e| e.to_block(IoOp::Flush, 0))?;
            super::backing_file::set_backing_file(
                &mut meta,
                self.io(g),
                self.g.cluster_size(),
                file,
                format,
            )
            .await
            .map_err(|e| e.to_block(IoOp::ChangeBackingFile, 0))
        })
    }
}
