//! The mirror engine that `block-commit` of the active layer and
//! `blockdev-mirror` share. A `mirror_top` filter takes the source's place
//! for all its parents and marks what the guest writes. The job makes an
//! initial copy into the target, then copies what was marked, until
//! nothing is left: it is then `ready`. On `complete`, with the guest's
//! requests held, the last marks are copied and every parent of the
//! filter is pointed at the target, in one transaction.
//!
//! The two jobs differ in what they copy. A commit's target is the base
//! of the source's own chain: only what the layers above it hold is
//! copied, and a range they do not hold already reads the same through
//! the base. A mirror's target stands alone: a marked range is copied
//! whole, and with `sync=full` what no layer holds is zeroed there.

use std::sync::Arc;
use std::time::Duration;

use strata_graph::{
    AlignedBuf, BlockError, Graph, GraphError, GraphView, IoOp, NodeId, Transaction,
};
use strata_runtime::reactor::block_on;

use crate::chain;
use crate::copy::{chunked, StepError};
use crate::dirty::DirtyMap;
use crate::filter::TopFilter;
use crate::hold::Hold;
use crate::job::{JobBody, JobContext, JobError};
use crate::write_blocking::WriteBlocking;

/// What the initial copy and the copies of marked ranges take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copy {
    /// Active commit: what `layers` hold, both times.
    Held,
    /// `sync=full`: what `layers` (the whole chain) hold, zeroes for the
    /// rest; marked ranges whole.
    Full,
    /// `sync=top`: what `layers` (the source alone) hold; marked ranges
    /// whole.
    Top,
    /// `sync=none`: nothing at first; marked ranges whole.
    None,
}

/// How a mirror is set up.
pub(crate) struct Setup {
    /// `commit` or `mirror`.
    pub kind: &'static str,
    /// The node whose parents the filter takes over.
    pub source: NodeId,
    /// Where the data goes.
    pub target: NodeId,
    /// The layers whose allocation decides what is copied.
    pub layers: Vec<NodeId>,
    /// What is copied.
    pub copy: Copy,
    /// The dirty map's granule.
    pub granularity: u64,
    /// The most bytes one copy step moves.
    pub chunk: u64,
    /// Guest writes go to the target before they complete.
    pub write_blocking: bool,
    /// The filter's node name.
    pub filter_node_name: Option<String>,
}

/// A running mirror.
pub(crate) struct Mirror {
    graph: Graph,
    kind: &'static str,
    source: NodeId,
    target: NodeId,
    layers: Vec<NodeId>,
    copy: Copy,
    chunk: u64,
    filter: NodeId,
    dirty: Arc<DirtyMap>,
    blocking: Option<Arc<WriteBlocking>>,
    hold: Hold,
}

impl Mirror {
    /// Puts the filter above the source in `tx` and freezes its slot and
    /// `frozen`; the caller attaches the job's users and commits.
    pub(crate) fn insert(
        tx: &mut Transaction<'_>,
        graph: &Graph,
        job: &str,
        setup: Setup,
        size: u64,
        mut frozen: Vec<strata_graph::SlotId>,
    ) -> Result<Mirror, String> {
        let dirty = Arc::new(DirtyMap::new(size, setup.granularity));
        let blocking = setup
            .write_blocking
            .then(|| Arc::new(WriteBlocking::new(Arc::clone(&dirty))));
        let (source, target) = (setup.source, setup.target);
        let d = Arc::clone(&dirty);
        let b = blocking.clone().map(|wb| (target, wb));
        let filter = tx
            .add_node(
                setup.filter_node_name.as_deref(),
                serde_json::json!({"driver": "mirror_top"}),
                // Deleted by the job itself: it may have no parent at all.
                true,
                move |nb| TopFilter::open(nb, source, Some(d), b).map(|f| Arc::new(f) as _),
            )
            .map_err(|e| e.to_string())?;
        let filter_slot = tx
            .view()
            .child_slot(filter, "backing")
            .expect("the filter has its child");
        tx.replace_node(source, filter, &[filter_slot])
            .map_err(|e| e.to_string())?;
        frozen.push(filter_slot);
        for &s in &frozen {
            tx.freeze(s, job).map_err(|e| e.to_string())?;
        }
        Ok(Mirror {
            graph: graph.clone(),
            kind: setup.kind,
            source,
            target,
            layers: setup.layers,
            copy: setup.copy,
            chunk: setup.chunk,
            filter,
            dirty,
            blocking,
            hold: Hold {
                job: job.into(),
                frozen,
            },
        })
    }

    /// Copies `n` bytes at `off`: the first copy (`initial`) or a marked
    /// range. Returns the bytes moved.
    async fn step(
        &self,
        g: &GraphView,
        off: u64,
        n: u64,
        initial: bool,
        buf: &mut AlignedBuf,
    ) -> Result<u64, StepError> {
        let gone = || {
            (
                BlockError::Unsupported {
                    op: IoOp::Read,
                    driver: "(a node that went away)",
                },
                true,
            )
        };
        let src = g.node(self.source).ok_or_else(gone)?.driver();
        let dst = g.node(self.target).ok_or_else(gone)?.driver();
        let _op = self.blocking.as_ref().map(|wb| wb.begin(off, n));
        let whole = !initial && self.copy != Copy::Held;
        let (mut at, mut moved) = (off, 0);
        while at < off + n {
            let (held, run) = if whole {
                (true, off + n - at)
            } else {
                chain::held_by(g, &self.layers, at, off + n - at)
                    .await
                    .map_err(|e| (e, true))?
            };
            if held {
                let part = buf.iovecs_mut().slice(0, run);
                src.read(g, at, &part).await.map_err(|e| (e, true))?;
                dst.write(g, at, &part).await.map_err(|e| (e, false))?;
                moved += run;
            } else if self.copy == Copy::Full {
                dst.write_zeroes(g, at, run, true)
                    .await
                    .map_err(|e| (e, false))?;
            }
            at += run;
        }
        Ok(moved)
    }

    fn copy_range(
        &self,
        ctx: &JobContext,
        off: u64,
        len: u64,
        initial: bool,
    ) -> Result<(), JobError> {
        let mut buf = AlignedBuf::zeroed(self.chunk as usize, 4096)?;
        chunked(ctx, &self.graph, off, len, self.chunk, |g, at, n| {
            block_on(self.step(g, at, n, initial, &mut buf))
                .unwrap_or_else(|e| Err((BlockError::io(IoOp::Read, at, e), true)))
        })
    }

    /// Copies every marked range.
    fn copy_dirty(&self, ctx: Option<&JobContext>) -> Result<(), JobError> {
        loop {
            let runs = self.dirty.take(8 * self.chunk);
            if runs.is_empty() {
                return Ok(());
            }
            for (off, len) in runs {
                match ctx {
                    Some(ctx) => {
                        ctx.add_len(len);
                        self.copy_range(ctx, off, len, false)?;
                    }
                    None => self.copy_now(off, len)?,
                }
            }
        }
    }

    /// The final copy, with the guest held: no pause points, no limits.
    fn copy_now(&self, off: u64, len: u64) -> Result<(), JobError> {
        let v = self.graph.view();
        let fail = |e: &dyn std::fmt::Display| JobError::Failed(e.to_string());
        let mut buf = AlignedBuf::zeroed(self.chunk as usize, 4096)?;
        let mut at = off;
        while at < off + len {
            let n = self.chunk.min(off + len - at);
            block_on(self.step(&v, at, n, false, &mut buf))
                .map_err(|e| fail(&e))?
                .map_err(|(e, _)| fail(&e))?;
            at += n;
        }
        Ok(())
    }

    /// Points the filter's parents at `to` and lets the job's nodes go.
    fn switch(&self, graph: &Graph, to: NodeId, final_copy: bool) -> Result<(), String> {
        let mut tx = graph.transaction();
        self.hold.release_in(&mut tx).map_err(|e| e.to_string())?;
        let filter_slot = tx.view().child_slot(self.filter, "backing");
        let except: Vec<_> = filter_slot.into_iter().collect();
        tx.replace_node(self.filter, to, &except)
            .map_err(|e| e.to_string())?;
        tx.delete_node(self.filter).map_err(|e| e.to_string())?;
        let target = self.target;
        let kind = self.kind;
        tx.commit_drained(|| {
            if !final_copy {
                return Ok(());
            }
            let io = |e: &dyn std::fmt::Display| GraphError::Drain {
                user: format!("the {kind}'s final copy"),
                source: e.to_string().into(),
            };
            self.copy_dirty(None).map_err(|e| io(&format!("{e:?}")))?;
            let v = graph.view();
            let t = v.node(target).ok_or_else(|| io(&"the target went away"))?;
            block_on(t.driver().flush(&v))
                .map_err(|e| io(&e))?
                .map_err(|e| io(&e))
        })
        .map_err(|e| e.to_string())
    }

    /// The size the copy covers: the source's, which a commit's base grows
    /// to and a mirror's target was checked to have.
    fn size(&self) -> Result<u64, JobError> {
        crate::commit::match_sizes(&self.graph, self.source, self.target)
    }
}

impl JobBody for Mirror {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn has_ready(&self) -> bool {
        true
    }

    fn run(&mut self, ctx: &JobContext) -> Result<(), JobError> {
        let size = self.size()?;
        if self.copy == Copy::None {
            ctx.set_len(0);
        } else {
            ctx.set_len(size);
            self.copy_range(ctx, 0, size, true)?;
        }
        loop {
            self.copy_dirty(Some(ctx))?;
            if self.dirty.dirty_bytes() > 0 {
                continue;
            }
            ctx.ready();
            if ctx.should_complete() || ctx.is_cancelled() {
                return Ok(());
            }
            ctx.idle(Duration::from_millis(20));
            ctx.pause_point()?;
        }
    }

    fn prepare(&mut self, graph: &Graph, ctx: &JobContext) -> Result<(), String> {
        if ctx.is_cancelled() {
            // Cancelled once ready: the target gets a copy of the disk as
            // it is now (as QEMU's does), and the disk stays where it is.
            return self.switch(graph, self.source, true);
        }
        self.switch(graph, self.target, true)
    }

    fn abort(&mut self, graph: &Graph) {
        if let Err(e) = self.switch(graph, self.source, false) {
            tracing::error!("{} job: cannot take its filter out: {e}", self.kind);
        }
    }

    fn clean(&mut self, graph: &Graph) {
        self.hold.release(graph);
    }
}
