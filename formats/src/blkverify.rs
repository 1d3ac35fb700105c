//! The `blkverify` driver: every request goes to both the `test` child
//! (the image under test) and the `raw` child (a trusted copy), and every
//! read is compared. A mismatch fails the read and is logged as an error.

use futures::future::join;
use strata_graph::{
    AlignedBuf, BlockDriver, BlockError, GraphError, GraphView, IoFuture, IoOp, IoVecs,
    NodeBuilder, NodeId, SlotId,
};

/// Bytes a read compares at a time.
const COMPARE_CHUNK: u64 = 1 << 20;

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

    /// Reads both children into buffers of its own, [`COMPARE_CHUNK`]
    /// bytes at a time, compares them, and hands the guest only what both
    /// agree on.
    async fn read_compared(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        let chunk = buf.len().min(COMPARE_CHUNK) as usize;
        let mut test = AlignedBuf::zeroed(chunk, 4096)?;
        let mut raw = AlignedBuf::zeroed(chunk, 4096)?;
        let mut at = 0;
        while at < buf.len() {
            let len = (buf.len() - at).min(COMPARE_CHUNK);
            let n = len as usize;
            let pos = offset + at;
            {
                let (t_iov, r_iov) = (test.iovecs_mut(), raw.iovecs_mut());
                let (t_iov, r_iov) = (t_iov.slice(0, len), r_iov.slice(0, len));
                let (t, r) = join(
                    g.via(self.test, |c| c.read(g, pos, &t_iov)),
                    g.via(self.raw, |c| c.read(g, pos, &r_iov)),
                )
                .await;
                t?;
                r?;
            }
            if let Some(i) = test.as_slice()[..n]
                .iter()
                .zip(&raw.as_slice()[..n])
                .position(|(a, b)| a != b)
            {
                tracing::error!(
                    "blkverify: read of {} bytes at byte {offset}: test and raw differ at byte {}",
                    buf.len(),
                    pos + i as u64
                );
                return Err(BlockError::errno(IoOp::Read, pos + i as u64, libc::EIO));
            }
            buf.copy_from_slice(at, &test.as_slice()[..n]);
            at += len;
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
