//! The `raw` format driver: the bytes of its `file` child, optionally a
//! window of them (`offset`, `size`).

use crate::image::{format_of, ImageFormat, PROBE_LEN};
use strata_graph::{
    AlignedBuf, BlockDriver, BlockError, BlockStatus, GraphError, GraphView, IoFuture, IoOp,
    IoVecs, NodeBuilder, NodeId, SlotId,
};

/// Options of a `raw` node.
#[derive(Clone, Debug, Default)]
pub struct RawOptions {
    /// Where the window starts in the child.
    pub offset: u64,
    /// The window's length; by default, the rest of the child.
    pub size: Option<u64>,
    /// Refuse writes that would make the image probe as another format.
    /// For images whose format was probed: otherwise a guest could write a
    /// qcow2 header naming a host file as its backing file, and read that
    /// file after the next start.
    pub guard_format: bool,
}

/// Why a raw node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The window does not fit in the child.
    #[error("offset {offset} plus size {size} ends past the end of the {child_size}-byte file")]
    WindowTooLarge {
        /// The `offset` option.
        offset: u64,
        /// The window's size.
        size: u64,
        /// The child's size.
        child_size: u64,
    },
    /// The window's start or size breaks the child's alignment (O_DIRECT).
    #[error("offset {offset} and size {size} must be multiples of {align} bytes (the file's request alignment)")]
    Misaligned {
        /// The `offset` option.
        offset: u64,
        /// The window's size.
        size: u64,
        /// The child's alignment.
        align: u32,
    },
    /// Attaching the child failed.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// The child could not report its size.
    #[error("cannot size the file child: {0}")]
    Child(#[from] BlockError),
}

/// An open raw node.
pub struct RawNode {
    file: SlotId,
    offset: u64,
    size: Option<u64>,
    guard_format: bool,
}

/// What a raw node whose format was probed carries over a reopen: its
/// probe guard.
pub struct FormatGuard;

impl RawNode {
    /// Opens a raw node over `file`, attaching it as the node's `file` child.
    pub fn open(
        b: &mut NodeBuilder<'_>,
        file: NodeId,
        opts: &RawOptions,
    ) -> Result<Self, RawError> {
        let slot = b.attach("file", file)?;
        let child = b.view().child(slot)?;
        let child_size = child.size(b.view())?;
        let size = opts.size.unwrap_or(child_size.saturating_sub(opts.offset));
        if opts
            .offset
            .checked_add(size)
            .is_none_or(|end| end > child_size)
        {
            return Err(RawError::WindowTooLarge {
                offset: opts.offset,
                size,
                child_size,
            });
        }
        let align = child.request_alignment(b.view());
        if opts.offset % u64::from(align) != 0
            || (opts.size.is_some() && size % u64::from(align) != 0)
        {
            return Err(RawError::Misaligned {
                offset: opts.offset,
                size,
                align,
            });
        }
        // A guarded node stays guarded through reopen: whoever reopens it
        // writable (to commit into it) writes the same probed image.
        let was_guarded = b
            .previous()
            .and_then(|p| p.reopen_state())
            .is_some_and(|s| s.is::<FormatGuard>());
        Ok(RawNode {
            file: slot,
            offset: opts.offset,
            size: opts.size,
            guard_format: opts.guard_format || was_guarded,
        })
    }

    /// Checks the range and resolves the child, or says why not.
    fn route<'a>(
        &self,
        g: &'a GraphView,
        op: IoOp,
        offset: u64,
        len: u64,
    ) -> Result<&'a dyn BlockDriver, BlockError> {
        BlockError::check_range(op, offset, len, self.size(g)?)?;
        g.child(self.file)
    }
}

impl RawNode {
    /// Writes `buf` at `offset` (which touches the probed bytes) as long
    /// as the image still probes as raw afterwards.
    ///
    /// GUEST-INPUT: the first block decides whether the write is allowed,
    /// so it is snapshotted once; the check reads the snapshot and the
    /// snapshot is what is written, whatever the guest does to its buffer
    /// meanwhile.
    async fn guarded_write(
        &self,
        g: &GraphView,
        child: &dyn BlockDriver,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        let refuse = || BlockError::errno(IoOp::Write, offset, libc::EPERM);
        // With the guard on, requests are aligned to at least 512 bytes
        // (see request_alignment), so one touching the probed bytes starts
        // at 0 and covers them.
        if offset != 0 || buf.len() < PROBE_LEN as u64 {
            return Err(refuse());
        }
        let block = u64::from(self.request_alignment(g)).max(PROBE_LEN as u64);
        let head_len = buf.len().min(block);
        let mut head = AlignedBuf::snapshot(buf, 0, head_len as usize, 4096)?;
        if format_of(&head.as_slice()[..PROBE_LEN]) != ImageFormat::Raw {
            return Err(refuse());
        }
        let mut iov = head.iovecs_mut();
        iov.append(&buf.slice(head_len, buf.len() - head_len));
        child.write(g, self.offset, &iov).await
    }
}

/// Forwards a request to the child, or returns the routing error.
macro_rules! forward {
    ($self:ident, $g:ident, $op:expr, $offset:ident, $len:expr, |$child:ident, $at:ident| $call:expr) => {
        match $self.route($g, $op, $offset, $len) {
            Ok($child) => {
                let $at = $offset + $self.offset;
                $call
            }
            Err(e) => IoFuture::ready(Err(e)),
        }
    };
}

impl BlockDriver for RawNode {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn reopen_state(&self) -> Option<std::sync::Arc<dyn std::any::Any + Send + Sync>> {
        self.guard_format.then(|| {
            std::sync::Arc::new(FormatGuard) as std::sync::Arc<dyn std::any::Any + Send + Sync>
        })
    }

    fn size(&self, g: &GraphView) -> Result<u64, BlockError> {
        match self.size {
            Some(size) => Ok(size),
            None => Ok(g.child(self.file)?.size(g)?.saturating_sub(self.offset)),
        }
    }

    fn stats(&self, g: &GraphView) -> strata_graph::NodeStats {
        let allocated = g
            .child(self.file)
            .ok()
            .and_then(|f| f.stats(g).allocated_bytes);
        strata_graph::NodeStats {
            allocated_bytes: allocated,
            caches: Vec::new(),
        }
    }

    fn request_alignment(&self, g: &GraphView) -> u32 {
        let child = g.child(self.file).map_or(1, |c| c.request_alignment(g));
        if self.guard_format {
            child.max(512)
        } else {
            child
        }
    }

    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        forward!(self, g, IoOp::Read, offset, buf.len(), |c, at| c
            .read(g, at, buf))
    }

    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        if self.guard_format && offset < PROBE_LEN as u64 {
            return match self.route(g, IoOp::Write, offset, buf.len()) {
                Ok(c) => IoFuture::new(self.guarded_write(g, c, offset, buf)),
                Err(e) => IoFuture::ready(Err(e)),
            };
        }
        forward!(self, g, IoOp::Write, offset, buf.len(), |c, at| c
            .write(g, at, buf))
    }

    fn zeroes_fast(&self, g: &GraphView, offset: u64, len: u64) -> bool {
        self.route(g, IoOp::WriteZeroes, offset, len)
            .is_ok_and(|c| c.zeroes_fast(g, offset + self.offset, len))
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> IoFuture<'a> {
        forward!(self, g, IoOp::WriteZeroes, offset, len, |c, at| c
            .write_zeroes(g, at, len, may_unmap))
    }

    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        forward!(self, g, IoOp::Discard, offset, len, |c, at| c
            .discard(g, at, len))
    }

    fn block_status<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        let child = match self.route(g, IoOp::Read, offset, len) {
            Ok(c) => c,
            Err(e) => return IoFuture::ready(Err(e)),
        };
        let shift = self.offset;
        IoFuture::new(async move {
            let st = child.block_status(g, offset + shift, len).await?;
            Ok(BlockStatus {
                len: st.len.min(len),
                ..st
            })
        })
    }

    fn resize<'a>(&'a self, g: &'a GraphView, size: u64) -> IoFuture<'a> {
        if self.size.is_some() {
            return IoFuture::ready(Err(BlockError::Unsupported {
                op: IoOp::Resize,
                driver: "raw with an explicit size",
            }));
        }
        let shift = self.offset;
        g.via(self.file, |c| c.resize(g, size + shift))
    }

    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a> {
        g.via(self.file, |c| c.flush(g))
    }
}
