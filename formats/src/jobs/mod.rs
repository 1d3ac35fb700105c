//! The block jobs: `block-stream`, `block-commit` (intermediate and
//! active) and `blockdev-snapshot`'s graph change. Each job's setup runs on
//! the monitor thread inside one graph transaction: it checks its range is
//! free, freezes the backing slots it works on and holds its nodes through
//! job users. The copying runs on the job's own thread
//! ([`strata_graph::job`]), and the job ends by rewriting one slot.

mod chain;
mod commit;
mod dirty;
mod filter;
mod mirror;
mod snapshot;
mod stream;

use strata_graph::job::{ErrorAction, JobContext, JobError};
use strata_graph::{
    AlignedBuf, BlockError, Graph, GraphError, GraphView, NodeId, Perm, SlotId, SlotPerm,
    Transaction, User, UserKind,
};

pub use commit::{commit, CommitArgs};
pub use dirty::DirtyMap;
pub use snapshot::snapshot;
pub use stream::{stream, StreamArgs};

/// The size of one copy step, as QEMU's stream and commit use.
const CHUNK: u64 = 512 << 10;

/// A node named on a command: by node name, or by its image's file name.
#[derive(Clone, Debug)]
pub enum NodeRef {
    /// `base-node`, `top-node`, `bottom`.
    Node(String),
    /// `base`, `top`: a file name in the chain.
    File(String),
}

/// What a job holds while it runs: the slots it froze and its users.
struct Hold {
    job: String,
    frozen: Vec<SlotId>,
}

impl Hold {
    /// Lets go of everything, in `tx`.
    fn release_in(&self, tx: &mut Transaction<'_>) -> Result<(), GraphError> {
        for &s in &self.frozen {
            tx.unfreeze(s);
        }
        tx.detach_user(&self.job)
    }

    /// Lets go of everything now (clean-up after the job's last change).
    fn release(&self, graph: &Graph) {
        let mut tx = graph.transaction();
        let res = self.release_in(&mut tx).and_then(|()| tx.commit());
        if let Err(e) = res {
            tracing::error!("job '{}': cannot release its nodes: {e}", self.job);
        }
    }
}

/// A user slot of job `job` on a node: what it needs and lets others do.
fn job_user(job: &str, need: Perm, share: Perm) -> User {
    User {
        kind: UserKind::Job,
        name: job.into(),
        perm: SlotPerm { need, share },
    }
}

/// Refuses nodes another job already works on.
fn check_free(v: &GraphView, nodes: &[NodeId]) -> Result<(), String> {
    for &n in nodes {
        if let Some(u) = v.job_using(n) {
            return Err(GraphError::InJob {
                node: v.name(n).into(),
                job: u.name.to_string(),
            }
            .to_string());
        }
    }
    Ok(())
}

/// The `backing` slot of each of `nodes`.
fn backing_slots(v: &GraphView, nodes: &[NodeId]) -> Vec<SlotId> {
    nodes
        .iter()
        .filter_map(|&n| v.child_slot(n, "backing"))
        .collect()
}

/// A failed step: the error, and whether it was a read.
type StepError = (BlockError, bool);

/// Runs `step` over `[start, start + len)` in chunks of [`CHUNK`], with a
/// pause point before each, progress and the speed limit after, and the
/// job's `on-error` policy on failures. `step` gets a fresh view and
/// returns how many bytes it copied. Errors that were ignored fail the job
/// at the end, as QEMU does.
fn chunked(
    ctx: &JobContext,
    graph: &Graph,
    start: u64,
    len: u64,
    mut step: impl FnMut(&GraphView, u64, u64) -> Result<u64, StepError>,
) -> Result<(), JobError> {
    let end = start + len;
    let mut off = start;
    let mut ignored = None;
    while off < end {
        ctx.pause_point()?;
        let v = graph.view();
        let n = CHUNK.min(end - off);
        match step(&v, off, n) {
            Ok(copied) => {
                ctx.progress(n);
                off += n;
                ctx.rate_limit(copied)?;
            }
            Err((e, read)) => {
                let (text, errno) = chain::describe(&e);
                tracing::warn!("job '{}': {e}", ctx.job().id());
                if ctx.io_error(&text, read, errno)? == ErrorAction::Ignore {
                    ignored = Some(text);
                    ctx.progress(n);
                    off += n;
                }
            }
        }
    }
    match ignored {
        Some(text) => Err(JobError::Failed(text)),
        None => Ok(()),
    }
}

/// Copies the parts of `[off, off + n)` that `layers` hold from `from` to
/// `to` (both read and written whole, through the graph).
async fn copy_held(
    g: &GraphView,
    from: NodeId,
    layers: &[NodeId],
    to: NodeId,
    off: u64,
    n: u64,
    buf: &mut AlignedBuf,
) -> Result<u64, StepError> {
    let node = |id: NodeId| {
        g.node(id).map(|n| n.driver()).ok_or((
            BlockError::Unsupported {
                op: strata_graph::IoOp::Read,
                driver: "(a node that went away)",
            },
            true,
        ))
    };
    let (src, dst) = (node(from)?, node(to)?);
    let mut at = off;
    let mut copied = 0;
    while at < off + n {
        let (held, run) = chain::held_by(g, layers, at, off + n - at)
            .await
            .map_err(|e| (e, true))?;
        if held {
            let iov = buf.iovecs_mut();
            let part = iov.slice(0, run);
            src.read(g, at, &part).await.map_err(|e| (e, true))?;
            dst.write(g, at, &part).await.map_err(|e| (e, false))?;
            copied += run;
        }
        at += run;
    }
    Ok(copied)
}
