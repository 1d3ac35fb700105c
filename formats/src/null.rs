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
    /// How long every request takes (`latency-ns`).
    pub latency: std::time::Duration,
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

    fn done(&self, res: Result<(), BlockError>) -> IoFuture<'static> {
        let latency = self.opts.latency;
        if latency.is_zero() {
            return IoFuture::ready(res);
        }
        IoFuture::new(async move {
            // A failed timer only shortens the simulated latency.
            let _ = strata_runtime::reactor::sleep(latency).await;
            res
        })
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
        self.done(res)
    }

    fn write<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        self.done(BlockError::check_range(
            IoOp::Write,
            offset,
            buf.len(),
            self.opts.size,
        ))
    }

    fn zeroes_fast(&self, _g: &GraphView, _offset: u64, _len: u64) -> bool {
        true
    }

    fn write_zeroes<'a>(
        &'a self,
        _g: &'a GraphView,
        offset: u64,
        len: u64,
        _: bool,
    ) -> IoFuture<'a> {
        self.done(BlockError::check_range(
            IoOp::WriteZeroes,
            offset,
            len,
            self.opts.size,
        ))
    }

    fn discard<'a>(&'a self, _g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        self.done(BlockError::check_range(
            IoOp::Discard,
            offset,
            len,
            self.opts.size,
        ))
    }

    fn flush<'a>(&'a self, _g: &'a GraphView) -> IoFuture<'a> {
        self.done(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_runtime::reactor::block_on;

    fn read(node: &NullNode, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let g = GraphView::default();
        let iov = IoVecs::from_slice(buf);
        block_on(node.read(&g, offset, &iov)).unwrap()
    }

    #[test]
    fn reads_zeroes_by_default_and_leaves_buffers_alone_when_told() {
        let zeroes = NullNode::new(NullOptions {
            size: 1 << 20,
            read_zeroes: true,
            latency: Default::default(),
        });
        let mut buf = [0xaau8; 4096];
        read(&zeroes, 4096, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 4096]);

        let raw = NullNode::new(NullOptions {
            size: 1 << 20,
            read_zeroes: false,
            latency: Default::default(),
        });
        let mut buf = [0xaau8; 4096];
        read(&raw, 4096, &mut buf).unwrap();
        assert_eq!(buf, [0xaau8; 4096]);
    }

    #[test]
    fn checks_ranges_and_accepts_everything_else() {
        let node = NullNode::new(NullOptions {
            size: 8192,
            read_zeroes: true,
            latency: Default::default(),
        });
        let g = GraphView::default();
        let mut buf = [0u8; 4096];
        assert!(matches!(
            read(&node, 8192, &mut buf),
            Err(BlockError::OutOfRange {
                op: IoOp::Read,
                offset: 8192,
                len: 4096,
                size: 8192
            })
        ));
        let iov = IoVecs::from_slice(&mut buf);
        block_on(node.write(&g, 4096, &iov)).unwrap().unwrap();
        block_on(node.write_zeroes(&g, 0, 8192, true))
            .unwrap()
            .unwrap();
        block_on(node.discard(&g, 0, 8192)).unwrap().unwrap();
        block_on(node.flush(&g)).unwrap().unwrap();
        assert!(block_on(node.discard(&g, 4096, 8192)).unwrap().is_err());
        assert_eq!(node.size(&g).unwrap(), 8192);
    }

    #[test]
    fn latency_delays_completion() {
        let node = NullNode::new(NullOptions {
            size: 8192,
            read_zeroes: true,
            latency: std::time::Duration::from_millis(20),
        });
        let start = std::time::Instant::now();
        block_on(node.flush(&GraphView::default()))
            .unwrap()
            .unwrap();
        assert!(start.elapsed() >= std::time::Duration::from_millis(20));
    }
}
