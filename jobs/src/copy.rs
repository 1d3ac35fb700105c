//! Copying a range in chunks, with the job's pause points, progress,
//! speed limit and error policy.

use strata_graph::{AlignedBuf, BlockError, Graph, GraphView, NodeId};

use crate::chain;
use crate::job::{ErrorAction, JobContext, JobError};

/// The size of one copy step, as QEMU's stream and commit use.
pub(crate) const CHUNK: u64 = 512 << 10;

/// A failed step: the error, and whether it was a read.
pub(crate) type StepError = (BlockError, bool);

/// Runs `step` over `[start, start + len)` in chunks of `chunk` bytes, with a
/// pause point before each, progress and the speed limit after, and the
/// job's `on-error` policy on failures. `step` gets a fresh view and
/// returns how many bytes it copied. Errors that were ignored fail the job
/// at the end, as QEMU does.
pub(crate) fn chunked(
    ctx: &JobContext,
    graph: &Graph,
    start: u64,
    len: u64,
    chunk: u64,
    mut step: impl FnMut(&GraphView, u64, u64) -> Result<u64, StepError>,
) -> Result<(), JobError> {
    let end = start + len;
    let mut off = start;
    let mut ignored = None;
    while off < end {
        ctx.pause_point()?;
        let v = graph.view();
        let n = chunk.min(end - off);
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
pub(crate) async fn copy_held(
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
