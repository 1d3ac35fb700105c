//! Active commit: `block-commit` whose top is the active layer, which the
//! guest keeps writing. A `mirror_top` filter takes the top's place for
//! all its parents and marks what the guest writes. The job copies what
//! the layers hold into the base, then copies what was marked, until
//! nothing is left: it is then `ready`. On `complete`, with the guest's
//! requests held, the last marks are copied and every parent of the
//! filter is pointed at the base, in one transaction.

use std::sync::Arc;
use std::time::Duration;

use strata_blockdev::OpenContext;
use strata_graph::{AlignedBuf, Graph, GraphError, NodeId};
use strata_runtime::reactor::block_on;

use super::range::{attach_users, copy_all, match_sizes, CommitArgs, Range};
use crate::copy::CHUNK;
use crate::dirty::DirtyMap;
use crate::filter::TopFilter;
use crate::hold::{backing_slots, check_free, Hold};
use crate::job::{JobBody, JobContext, JobError};

/// The granule of the dirty map: small enough that a 4 KiB guest write
/// costs little to copy again, large enough to keep the map small.
const GRANULE: u64 = 64 << 10;

struct Mirror {
    graph: Graph,
    top: NodeId,
    layers: Vec<NodeId>,
    base: NodeId,
    filter: NodeId,
    dirty: Arc<DirtyMap>,
    hold: Hold,
}

/// Sets up an active commit of `range` (whose top is the device).
pub(super) fn start(
    graph: &Graph,
    job: &str,
    range: Range,
    args: &CommitArgs,
    _ctx: &OpenContext,
) -> Result<Box<dyn JobBody>, String> {
    let mut tx = graph.transaction();
    let v = tx.view();
    let top = range.chain[range.top];
    let base = range.chain[range.base];
    let layers = range.layers();
    let mut claimed = layers.clone();
    claimed.push(base);
    check_free(v, &claimed)?;
    let size = v
        .node(top)
        .ok_or("the top went away")?
        .driver()
        .size(v)
        .map_err(|e| e.to_string())?;
    let dirty = Arc::new(DirtyMap::new(size, GRANULE));

    let d = dirty.clone();
    let filter = tx
        .add_node(
            args.filter_node_name.as_deref(),
            serde_json::json!({"driver": "mirror_top"}),
            // Deleted by the job itself: it may have no parent at all.
            true,
            move |b| TopFilter::open(b, top, Some(d)).map(|f| Arc::new(f) as _),
        )
        .map_err(|e| e.to_string())?;
    let filter_slot = tx
        .view()
        .child_slot(filter, "backing")
        .expect("the filter has its child");
    tx.replace_node(top, filter, &[filter_slot])
        .map_err(|e| e.to_string())?;
    let mut frozen = vec![filter_slot];
    frozen.extend(backing_slots(tx.view(), &layers));
    for &s in &frozen {
        tx.freeze(s, job).map_err(|e| e.to_string())?;
    }
    attach_users(&mut tx, job, &layers, base)?;
    tx.commit().map_err(|e| e.to_string())?;
    Ok(Box::new(Mirror {
        graph: graph.clone(),
        top,
        layers,
        base,
        filter,
        dirty,
        hold: Hold {
            job: job.into(),
            frozen,
        },
    }))
}

impl Mirror {
    /// Copies every marked range from the top into the base.
    fn copy_dirty(&self, ctx: Option<&JobContext>) -> Result<(), JobError> {
        loop {
            let runs = self.dirty.take(8 * CHUNK);
            if runs.is_empty() {
                return Ok(());
            }
            for (off, len) in runs {
                match ctx {
                    Some(ctx) => {
                        ctx.add_len(len);
                        copy_all(
                            ctx,
                            &self.graph,
                            self.top,
                            &self.layers,
                            self.base,
                            off,
                            len,
                        )?;
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
        let mut buf = AlignedBuf::zeroed(CHUNK as usize, 4096)?;
        let mut at = off;
        while at < off + len {
            let n = CHUNK.min(off + len - at);
            block_on(crate::copy::copy_held(
                &v,
                self.top,
                &self.layers,
                self.base,
                at,
                n,
                &mut buf,
            ))
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
        let base = self.base;
        tx.commit_drained(|| {
            if !final_copy {
                return Ok(());
            }
            let io = |e: &dyn std::fmt::Display| GraphError::Drain {
                user: "the commit's final copy".into(),
                source: e.to_string().into(),
            };
            self.copy_dirty(None).map_err(|e| io(&format!("{e:?}")))?;
            let v = graph.view();
            let b = v.node(base).ok_or_else(|| io(&"the base went away"))?;
            block_on(b.driver().flush(&v))
                .map_err(|e| io(&e))?
                .map_err(|e| io(&e))
        })
        .map_err(|e| e.to_string())
    }
}

impl JobBody for Mirror {
    fn kind(&self) -> &'static str {
        "commit"
    }

    fn has_ready(&self) -> bool {
        true
    }

    fn run(&mut self, ctx: &JobContext) -> Result<(), JobError> {
        let size = match_sizes(&self.graph, self.top, self.base)?;
        ctx.set_len(size);
        copy_all(ctx, &self.graph, self.top, &self.layers, self.base, 0, size)?;
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
            // Cancelled once ready: finish without switching.
            return self.switch(graph, self.top, false);
        }
        self.switch(graph, self.base, true)
    }

    fn abort(&mut self, graph: &Graph) {
        if let Err(e) = self.switch(graph, self.top, false) {
            tracing::error!("commit job: cannot take its filter out: {e}");
        }
    }

    fn clean(&mut self, graph: &Graph) {
        self.hold.release(graph);
    }
}
