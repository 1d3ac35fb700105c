//! `block-commit` of an intermediate image: merges the layers from `top`
//! down to just above `base` into `base`, then points the image above
//! `top` at `base`. A `commit_top` filter sits above `top` while it runs,
//! so `base` may be written though it is a backing node. Committing the
//! active layer is the mirror job in [`crate::mirror`].

use crate::job::{JobBody, JobContext, JobError};
use strata_graph::{AlignedBuf, BlockError, Graph, IoOp, NodeId, Perm};

use strata_blockdev::{self as blockdev, OpenContext};
use strata_runtime::reactor::block_on;

use crate::chain::{chain, find_file};
use crate::copy::{chunked, copy_held, CHUNK};
use crate::filter::TopFilter;
use crate::hold::{backing_slots, check_free, job_user, Hold};
use crate::NodeRef;

/// The arguments of `block-commit`.
#[derive(Clone, Debug, Default)]
pub struct CommitArgs {
    /// The node whose chain holds `top` and `base` (usually the active
    /// layer).
    pub device: String,
    /// `top-node` or `top`; the device itself when absent.
    pub top: Option<NodeRef>,
    /// `base-node` or `base`; the bottom of the chain when absent.
    pub base: Option<NodeRef>,
    /// The backing file name to write into the header of the image above
    /// `top`.
    pub backing_file: Option<String>,
    /// `filter-node-name`: the name of the job's filter node.
    pub filter_node_name: Option<String>,
}

/// The chain positions a commit works on.
pub(super) struct Range {
    /// The chain from the device down, top first.
    pub chain: Vec<NodeId>,
    /// Index of `top` in `chain`.
    pub top: usize,
    /// Index of `base` in `chain`.
    pub base: usize,
}

impl Range {
    /// The layers merged: `top` down to just above `base`.
    pub fn layers(&self) -> Vec<NodeId> {
        self.chain[self.top..self.base].to_vec()
    }
}

fn resolve(v: &strata_graph::GraphView, args: &CommitArgs) -> Result<Range, String> {
    let device = v
        .find(&args.device)
        .ok_or_else(|| format!("Cannot find device='{0}' nor node-name='{0}'", args.device))?;
    let chain = chain(v, device);
    let find = |r: &NodeRef, what: &str| -> Result<usize, String> {
        let id = match r {
            NodeRef::Node(n) => v
                .find(n)
                .ok_or_else(|| format!("Cannot find device='' nor node-name='{n}'"))?,
            NodeRef::File(f) => find_file(v, &chain, f)
                .ok_or_else(|| format!("{what} '{f}' not found in the backing chain"))?,
        };
        chain.iter().position(|&n| n == id).ok_or_else(|| {
            format!(
                "{what} '{}' is not in the backing chain of '{}'",
                v.name(id),
                args.device
            )
        })
    };
    let top = args.top.as_ref().map_or(Ok(0), |t| find(t, "Top image"))?;
    let base = match &args.base {
        Some(b) => find(b, "Base image")?,
        None => chain.len() - 1,
    };
    if base == top {
        return Err(format!(
            "Top image '{}' and base image are the same: nothing to commit",
            v.name(chain[top])
        ));
    }
    if base < top {
        return Err(format!(
            "Base image '{}' is above top image '{}' in the backing chain",
            v.name(chain[base]),
            v.name(chain[top])
        ));
    }
    if v.node(chain[base])
        .is_some_and(|n| n.driver().is_read_only())
    {
        return Err(format!("Block node '{}' is read-only", v.name(chain[base])));
    }
    Ok(Range { chain, top, base })
}

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

/// Sets up a commit job `job`: an active commit (a mirror) when `top` is
/// the device, else an intermediate one.
pub fn commit(
    graph: &Graph,
    job: &str,
    args: CommitArgs,
    ctx: &OpenContext,
) -> Result<Box<dyn JobBody>, String> {
    let range = resolve(&graph.view(), &args)?;
    if range.top == 0 {
        if args.backing_file.is_some() {
            return Err("'backing-file' specified, but 'top' is the active layer".into());
        }
        return crate::mirror::active_commit(graph, job, range, &args, ctx);
    }
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
            |b| TopFilter::open(b, top, None).map(|f| std::sync::Arc::new(f) as _),
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

/// The job's users: it reads the merged layers and writes the base.
pub(super) fn attach_users(
    tx: &mut strata_graph::Transaction<'_>,
    job: &str,
    layers: &[NodeId],
    base: NodeId,
) -> Result<(), String> {
    for (i, &n) in layers.iter().enumerate() {
        tx.attach_user_as(
            job_user(job, Perm::CONSISTENT_READ, Perm::all()),
            if i == 0 { "top" } else { "intermediate node" },
            n,
        )
        .map_err(|e| e.to_string())?;
    }
    tx.attach_user_as(
        job_user(
            job,
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        ),
        "base",
        base,
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Grows `base` to `top`'s size if it is smaller (QEMU does the same), and
/// returns the size to copy.
pub(super) fn match_sizes(graph: &Graph, top: NodeId, base: NodeId) -> Result<u64, JobError> {
    let v = graph.view();
    let fail = |e: &dyn std::fmt::Display| JobError::Failed(e.to_string());
    let size_of = |n: NodeId| -> Result<u64, JobError> {
        v.node(n)
            .ok_or_else(|| JobError::Failed("a node went away".into()))?
            .driver()
            .size(&v)
            .map_err(|e| fail(&e))
    };
    let (top_size, base_size) = (size_of(top)?, size_of(base)?);
    if base_size < top_size {
        let b = v.node(base).expect("sized above").driver();
        block_on(b.resize(&v, top_size))
            .map_err(|e| fail(&e))?
            .map_err(|e| fail(&format!("cannot grow the base to the top's size: {e}")))?;
    }
    Ok(top_size)
}

/// Copies what `layers` hold in `[0, size)` from `top` into `base`.
pub(super) fn copy_all(
    ctx: &JobContext,
    graph: &Graph,
    top: NodeId,
    layers: &[NodeId],
    base: NodeId,
    start: u64,
    len: u64,
) -> Result<(), JobError> {
    let mut buf = AlignedBuf::zeroed(CHUNK as usize, 4096);
    chunked(ctx, graph, start, len, |g, off, n| {
        block_on(copy_held(g, top, layers, base, off, n, &mut buf))
            .unwrap_or_else(|e| Err((BlockError::io(IoOp::Read, off, e), true)))
    })
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
