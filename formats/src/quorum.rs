//! The `quorum` driver: N children (`children.0` ..) that should hold the
//! same data. Reads are voted on, writes go to every child, and a child
//! that disagrees or fails is reported as a QUORUM_REPORT_BAD event.

use std::sync::Arc;

use futures::future::join_all;
use serde_json::json;
use strata_graph::{
    AlignedBuf, BlockDriver, BlockError, EventSink, GraphError, GraphView, IoFuture, IoOp, IoVecs,
    NodeBuilder, NodeId, SlotId,
};

/// How reads pick their data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPattern {
    /// Read every child and vote.
    Quorum,
    /// Read the children in order until one succeeds.
    Fifo,
}

/// Bytes a voted read compares at a time.
const VOTE_CHUNK: u64 = 1 << 20;

/// Options of a quorum node.
#[derive(Clone, Debug)]
pub struct QuorumOptions {
    /// How many children must agree.
    pub vote_threshold: usize,
    /// How reads pick their data.
    pub read_pattern: ReadPattern,
    /// Write the winning data back to children that disagreed.
    pub rewrite_corrupted: bool,
}

/// Why a quorum node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    /// A threshold of zero, or above the number of children.
    #[error(
        "vote-threshold must be between 1 and the number of children ({children}), not {threshold}"
    )]
    Threshold {
        /// The threshold given.
        threshold: usize,
        /// The children given.
        children: usize,
    },
    /// rewrite-corrupted needs a vote to know what is right.
    #[error("rewrite-corrupted=on cannot be used with read-pattern=fifo")]
    RewriteFifo,
    /// Attaching a child failed.
    #[error(transparent)]
    Graph(#[from] GraphError),
}

/// An open quorum node.
pub struct QuorumNode {
    name: String,
    children: Vec<SlotId>,
    opts: QuorumOptions,
    events: Arc<dyn EventSink>,
}

impl QuorumNode {
    /// A quorum over `children`, each attached in the role it comes with
    /// (`children.0`, `children.1`...; x-blockdev-change keeps the names
    /// of the others when it removes one).
    pub fn open(
        b: &mut NodeBuilder<'_>,
        children: &[(String, NodeId)],
        opts: QuorumOptions,
        events: Arc<dyn EventSink>,
    ) -> Result<Self, QuorumError> {
        if opts.vote_threshold == 0 || opts.vote_threshold > children.len() {
            return Err(QuorumError::Threshold {
                threshold: opts.vote_threshold,
                children: children.len(),
            });
        }
        if opts.rewrite_corrupted && opts.read_pattern == ReadPattern::Fifo {
            return Err(QuorumError::RewriteFifo);
        }
        let slots = children
            .iter()
            .map(|(role, c)| b.attach(role, *c))
            .collect::<Result<_, _>>()?;
        Ok(QuorumNode {
            name: b.name().into(),
            children: slots,
            opts,
            events,
        })
    }

    fn report_bad(
        &self,
        g: &GraphView,
        slot: SlotId,
        op: &str,
        offset: u64,
        len: u64,
        error: Option<&BlockError>,
    ) {
        let node = g.child_id(slot).map_or("?", |id| g.name(id));
        let mut data = json!({
            "type": op,
            "node-name": node,
            "sector": offset / 512,
            "sectors-count": len.div_ceil(512),
        });
        if let Some(e) = error {
            data["error"] = json!(e.to_string());
        }
        self.events.emit("QUORUM_REPORT_BAD", data);
    }

    fn failure(&self, op: IoOp, offset: u64, len: u64) -> BlockError {
        self.events.emit(
            "QUORUM_FAILURE",
            json!({"reference": self.name, "sector": offset / 512, "sectors-count": len.div_ceil(512)}),
        );
        BlockError::errno(op, offset, libc::EIO)
    }

    /// Reads from every child and returns what most of them agree on,
    /// [`VOTE_CHUNK`] bytes at a time, so the buffers a read needs are
    /// bounded however large the request is.
    async fn read_voted(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        let chunk = buf.len().min(VOTE_CHUNK) as usize;
        let mut copies = self
            .children
            .iter()
            .map(|_| AlignedBuf::zeroed(chunk, 4096))
            .collect::<Result<Vec<_>, _>>()?;
        let mut at = 0;
        while at < buf.len() {
            let n = (buf.len() - at).min(VOTE_CHUNK);
            self.vote(g, offset + at, &buf.slice(at, n), &mut copies)
                .await?;
            at += n;
        }
        Ok(())
    }

    /// One chunk of [`QuorumNode::read_voted`], through `copies` (one
    /// buffer per child, each at least `buf.len()` bytes).
    async fn vote(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
        copies: &mut [AlignedBuf],
    ) -> Result<(), BlockError> {
        let len = buf.len();
        let n = len as usize;
        let reads = self
            .children
            .iter()
            .zip(copies.iter_mut())
            .map(|(&slot, copy)| async move {
                let iov = copy.iovecs_mut().slice(0, len);
                g.child(slot)?.read(g, offset, &iov).await
            });
        let results = join_all(reads).await;
        // Group the children that read successfully by identical content.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, r) in results.iter().enumerate() {
            if r.is_err() {
                continue;
            }
            match groups
                .iter_mut()
                .find(|grp| copies[grp[0]].as_slice()[..n] == copies[i].as_slice()[..n])
            {
                Some(grp) => grp.push(i),
                None => groups.push(vec![i]),
            }
        }
        let winner = groups
            .iter()
            .max_by_key(|grp| grp.len())
            .cloned()
            .unwrap_or_default();
        for (i, r) in results.iter().enumerate() {
            if let Err(e) = r {
                self.report_bad(g, self.children[i], "read", offset, len, Some(e));
            } else if !winner.contains(&i) {
                self.report_bad(g, self.children[i], "read", offset, len, None);
            }
        }
        if winner.len() < self.opts.vote_threshold {
            return Err(self.failure(IoOp::Read, offset, len));
        }
        let best = winner[0];
        buf.copy_from_slice(0, &copies[best].as_slice()[..n]);
        if self.opts.rewrite_corrupted {
            let iov = copies[best].iovecs_mut().slice(0, len);
            for (i, r) in results.iter().enumerate() {
                if r.is_ok() && !winner.contains(&i) {
                    if let Err(e) = g.child(self.children[i])?.write(g, offset, &iov).await {
                        self.report_bad(g, self.children[i], "write", offset, len, Some(&e));
                    }
                }
            }
        }
        Ok(())
    }

    async fn read_fifo(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        for &slot in &self.children {
            match g.child(slot)?.read(g, offset, buf).await {
                Ok(()) => return Ok(()),
                Err(e) => self.report_bad(g, slot, "read", offset, buf.len(), Some(&e)),
            }
        }
        Err(self.failure(IoOp::Read, offset, buf.len()))
    }

    /// Runs `op` on every child; succeeds when at least the threshold do.
    async fn on_all<'a, F>(
        &'a self,
        g: &'a GraphView,
        kind: IoOp,
        offset: u64,
        len: u64,
        op: F,
    ) -> Result<(), BlockError>
    where
        F: Fn(&'a dyn BlockDriver) -> IoFuture<'a>,
    {
        let results = join_all(self.children.iter().map(|&slot| g.via(slot, &op))).await;
        let mut ok = 0;
        for (i, r) in results.iter().enumerate() {
            match r {
                Ok(()) => ok += 1,
                Err(e) => self.report_bad(g, self.children[i], op_name(kind), offset, len, Some(e)),
            }
        }
        if ok >= self.opts.vote_threshold {
            Ok(())
        } else {
            Err(self.failure(kind, offset, len))
        }
    }
}

fn op_name(op: IoOp) -> &'static str {
    match op {
        IoOp::Read => "read",
        IoOp::Flush => "flush",
        _ => "write",
    }
}

impl BlockDriver for QuorumNode {
    fn driver_name(&self) -> &'static str {
        "quorum"
    }

    fn size(&self, g: &GraphView) -> Result<u64, BlockError> {
        g.child(self.children[0])?.size(g)
    }

    fn request_alignment(&self, g: &GraphView) -> u32 {
        self.children
            .iter()
            .filter_map(|&s| g.child(s).ok())
            .map(|c| c.request_alignment(g))
            .max()
            .unwrap_or(1)
    }

    fn read<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        match self.opts.read_pattern {
            ReadPattern::Quorum => IoFuture::new(self.read_voted(g, offset, buf)),
            ReadPattern::Fifo => IoFuture::new(self.read_fifo(g, offset, buf)),
        }
    }

    fn write<'a>(&'a self, g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(self.on_all(g, IoOp::Write, offset, buf.len(), move |c| {
            c.write(g, offset, buf)
        }))
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> IoFuture<'a> {
        IoFuture::new(self.on_all(g, IoOp::WriteZeroes, offset, len, move |c| {
            c.write_zeroes(g, offset, len, unmap)
        }))
    }

    fn discard<'a>(&'a self, g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        IoFuture::new(self.on_all(g, IoOp::Discard, offset, len, move |c| {
            c.discard(g, offset, len)
        }))
    }

    fn flush<'a>(&'a self, g: &'a GraphView) -> IoFuture<'a> {
        IoFuture::new(self.on_all(g, IoOp::Flush, 0, 0, move |c| c.flush(g)))
    }
}
