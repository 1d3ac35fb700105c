//! `block-commit` of an intermediate image: merges the layers from `top`
//! down to just above `base` into `base`, then points the image above
//! `top` at `base`. A `commit_top` filter sits above `top` while it runs,
//! so `base` may be written though it is a backing node.

use strata_blockdev::{self as blockdev, OpenContext};
use strata_graph::{Graph, NodeId, Perm};
use strata_runtime::reactor::block_on;

use super::range::{attach_users, copy_all, match_sizes, CommitArgs, Range};
use crate::filter::TopFilter;
use crate::hold::{backing_slots, check_free, job_user, Hold};
use crate::job::{JobBody, JobContext, JobError};

struct Commit {
    graph: Graph,
    ctx: OpenContext,
    /// The image whose backing slot is rewritten.
    overlay: NodeId,
    top: NodeId,
    layers: Vec<NodeId>,
    base: NodeId,
    filter: NodeId,
    backing_file: Option<String>,
    hold: Hold,
}

/// Sets up a commit of `range`, whose top is below the device.
pub(super) fn start(
    graph: &Graph,
    job: &str,
    range: Range,
    args: CommitArgs,
    ctx: &OpenContext,
) -> Result<Box<dyn JobBody>, String> {
    let mut tx = graph.transaction();
    let v = tx.view();
    let overlay = range.chain[range.top - 1];
    let top = range.chain[range.top];
    let base = range.chain[range.base];
    let layers = range.layers();
    let mut claimed = vec![overlay];
    claimed.extend(&layers);
    claimed.push(base);
    check_free(v, &claimed)?;
    let overlay_slot = v
        .child_slot(overlay, "backing")
        .ok_or("the image above top has no backing slot")?;

    let filter = tx
        .add_node(
            args.filter_node_name.as_deref(),
            serde_json::json!({"driver": "commit_top"}),
            // Deleted by the job itself when it ends.
            true,
            |b| TopFilter::open(b, top, None, None).map(|f| std::sync::Arc::new(f) as _),
        )
        .map_err(|e| e.to_string())?;
    tx.set_child(overlay_slot, filter)
        .map_err(|e| e.to_string())?;
    let mut frozen = vec![overlay_slot];
    frozen.extend(tx.view().child_slot(filter, "backing"));
    frozen.extend(backing_slots(tx.view(), &layers));
    for &s in &frozen {
        tx.freeze(s, job).map_err(|e| e.to_string())?;
    }
    attach_users(&mut tx, job, &layers, base)?;
    // The overlay's link is the job's to rewrite: no other job may use it.
    tx.attach_user_as(
        job_user(job, Perm::empty(), Perm::all()),
        "overlay of top",
        overlay,
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    Ok(Box::new(Commit {
        graph: graph.clone(),
        ctx: ctx.clone(),
        overlay,
        top,
        layers,
        base,
        filter,
        backing_file: args.backing_file,
        hold: Hold {
            job: job.into(),
            frozen,
        },
    }))
}

impl JobBody for Commit {
    fn kind(&self) -> &'static str {
        "commit"
    }

    fn run(&mut self, ctx: &JobContext) -> Result<(), JobError> {
        let size = match_sizes(&self.graph, self.top, self.base)?;
        ctx.set_len(size);
        copy_all(ctx, &self.graph, self.top, &self.layers, self.base, 0, size)
    }

    fn prepare(&mut self, graph: &Graph, _ctx: &JobContext) -> Result<(), String> {
        let v = graph.view();
        let base = v.node(self.base).ok_or("the base went away")?;
        let name = self
            .backing_file
            .clone()
            .unwrap_or_else(|| v.filename(self.base));
        let format = base.driver().driver_name();
        block_on(
            v.node(self.base)
                .ok_or("the base went away")?
                .driver()
                .flush(&v),
        )
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("Could not flush the base: {e}"))?;
        let overlay = v
            .node(self.overlay)
            .ok_or("the overlay went away")?
            .driver();
        block_on(overlay.change_backing_file(&v, Some(&name), Some(format)))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("Could not update the backing file in the image header: {e}"))?;
        drop(v);
        let mut tx = graph.transaction();
        self.hold.release_in(&mut tx).map_err(|e| e.to_string())?;
        blockdev::set_backing(&mut tx, self.overlay, Some(self.base), &self.ctx)
            .map_err(|e| e.to_string())?;
        // The merged layers go with their last user.
        tx.delete_node(self.filter).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())
    }

    fn abort(&mut self, graph: &Graph) {
        let mut tx = graph.transaction();
        let res = self.hold.release_in(&mut tx).and_then(|()| {
            let slot = tx
                .view()
                .child_slot(self.overlay, "backing")
                .filter(|&s| tx.view().child_id(s) == Some(self.filter));
            if let Some(s) = slot {
                tx.set_child(s, self.top)?;
            }
            tx.delete_node(self.filter)
        });
        if let Err(e) = res.and_then(|()| tx.commit()) {
            tracing::error!("commit job: cannot take its filter out: {e}");
        }
    }

    fn clean(&mut self, graph: &Graph) {
        self.hold.release(graph);
    }
}
