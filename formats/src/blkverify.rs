//! The `blkverify` driver: every request goes to both the `test` child
//! (the image under test) and the `raw` child (a trusted copy), and every
//! read is compared. A mismatch fails the read and is logged as an error.

use futures::future::join;
use strata_graph::{
    AlignedBuf, BlockDriver, BlockError, GraphError, GraphView, IoFuture, IoOp, IoVecs,
    NodeBuilder, NodeId, SlotId,
};

/// An open blkverify node.
pub struct BlkverifyNode {
    test: SlotId,
    raw: SlotId,
}

impl BlkverifyNode {
    /// Verifies `test` against `raw`.
    pub fn open(b: &mut NodeBuilder<'_>, test: NodeId, raw: NodeId) -> Result<Self, GraphError> {
        Ok(BlkverifyNode {
            test: b.attach("test", test)?,
            raw: b.attach("raw", raw)?,
        })
    }

    async fn both<'a>(
        &'a self,
        g: &'a GraphView,
        op: impl Fn(&'a dyn BlockDriver) -> IoFuture<'a>,
    ) -> Result<(), BlockError> {
        let (t, r) = join(g.via(self.test, &op), g.via(self.raw, &op)).await;
        t.and(r)
    }

    async fn read_compared(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        let len = buf.len();
        let mut reference = AlignedBuf::zeroed(len as usize, 4096);
        let ref_iov = reference.iovecs_mut();
        let (t, r) = join(
            g.via(self.test, |c| c.read(g, offset, buf)),
            g.via(self.raw, |c| c.read(g, offset, &ref_iov)),
        )
        .await;
        t?;
        r?;
        drop(ref_iov);
        let mut got = vec![0u8; len as usize];
        buf.copy_to_slice(0, &mut got);
        if let Some(at) = got
            .iter()
            .zip(reference.as_slice())
            .position(|(a, b)| a != b)
        {
            tracing::error!(
                "blkverify: read of {len} bytes at byte {offset}: test and raw differ at byte {}",
                offset + at as u64
            );
            return Err(BlockError::errno(IoOp::Read, offset + at as u64, libc::EIO));
        }
        Ok(())
    }
}

impl BlockDriver for BlkverifyNode {
    fn driver_name(&self) -> &'static str {
        "blkverify"
    }

    fn size(&self, g: &GraphView) -> Result<u64, BlockError> {
        g.child(self.test)?.size(g)
    }

    fn request_alignment(&self, g: &GraphView) -> u32 {
        [self.test, self.raw]
            .iter()
            .filter_map(|&s| g.child(s).ok())
            .map(|c| c.request_alignment(g))
            .max()
            .unwrap_or(1)
    }

    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(self.read_compared(g, offset, buf))
    }

    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(self.both(g, move |c| c.write(g, offset, buf)))
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> IoFuture<'a> {
        IoFuture::new(self.both(g, move |c| c.write_zeroes(g, offset, len, unmap)))
    }

    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        IoFuture::new(self.both(g, move |c| c.discard(g, offset, len)))
    }

    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a> {
        IoFuture::new(self.both(g, move |c| c.flush(g)))
    }
}
