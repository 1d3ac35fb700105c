//! What both kinds of commit share: the arguments, the chain positions
//! they resolve to, the job's users, and the copy.

use strata_graph::{AlignedBuf, BlockError, Graph, IoOp, NodeId, Perm};
use strata_runtime::reactor::block_on;

use crate::chain::{chain, find_file};
use crate::copy::{chunked, copy_held, CHUNK};
use crate::hold::job_user;
use crate::job::{JobContext, JobError};
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
pub(crate) struct Range {
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

pub(super) fn resolve(v: &strata_graph::GraphView, args: &CommitArgs) -> Result<Range, String> {
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
pub(crate) fn match_sizes(graph: &Graph, top: NodeId, base: NodeId) -> Result<u64, JobError> {
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
    let mut buf = AlignedBuf::zeroed(CHUNK as usize, 4096)?;
    chunked(ctx, graph, start, len, CHUNK, |g, off, n| {
        block_on(copy_held(g, top, layers, base, off, n, &mut buf))
            .unwrap_or_else(|e| Err((BlockError::io(IoOp::Read, off, e), true)))
    })
}
