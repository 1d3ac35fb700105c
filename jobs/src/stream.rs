//! `block-stream`: copies into a node the data its backing chain holds
//! above a base, then makes the base (or nothing) its backing node.
//!
//! Only what the node does not hold is written, through
//! [`fill_unallocated`](strata_graph::BlockDriver::fill_unallocated), so a
//! guest write is never replaced by older data. The backing slots from the
//! node down to the bottom layer are frozen while it runs; the link below
//! the bottom is not, so a job further down the same chain can run at the
//! same time.

use crate::job::{JobBody, JobContext, JobError};
use strata_graph::{AlignedBuf, BlockError, Graph, GraphView, IoOp, NodeId, Perm};

use strata_blockdev::{self as blockdev, OpenContext};
use strata_runtime::reactor::block_on;

use crate::chain::{chain, find_file, held_by};
use crate::copy::{chunked, StepError, CHUNK};
use crate::hold::{backing_slots, check_free, job_user, Hold};
use crate::NodeRef;

/// The arguments of `block-stream`.
#[derive(Clone, Debug, Default)]
pub struct StreamArgs {
    /// The node streamed into.
    pub device: String,
    /// `base-node` or `base`: the layer kept as the new backing node.
    pub base: Option<NodeRef>,
    /// `bottom`: the lowest layer copied (the base is the one below).
    pub bottom: Option<String>,
    /// The backing file name to write into the header.
    pub backing_file: Option<String>,
}

struct Stream {
    graph: Graph,
    ctx: OpenContext,
    device: NodeId,
    /// The layers copied from, top first.
    layers: Vec<NodeId>,
    base: Option<NodeId>,
    backing_file: Option<String>,
    hold: Hold,
}

/// Sets up a stream job `job` (see [`StreamArgs`]).
pub fn stream(
    graph: &Graph,
    job: &str,
    args: StreamArgs,
    ctx: &OpenContext,
) -> Result<Box<dyn JobBody>, String> {
    let mut tx = graph.transaction();
    let v = tx.view();
    let device = v
        .find(&args.device)
        .ok_or_else(|| format!("Cannot find device='{0}' nor node-name='{0}'", args.device))?;
    if v.node(device).is_some_and(|n| n.driver().is_read_only()) {
        return Err(format!("Block node '{}' is read-only", args.device));
    }
    let full = chain(v, device);
    let below = &full[1..];
    let base = match (&args.base, &args.bottom) {
        (Some(_), Some(_)) => {
            return Err("'bottom' cannot be specified together with 'base' or 'base-node'".into())
        }
        (Some(NodeRef::Node(name)), None) => {
            let b = v
                .find(name)
                .ok_or_else(|| format!("Cannot find device='' nor node-name='{name}'"))?;
            if !below.contains(&b) {
                return Err(format!(
                    "Node '{name}' is not a backing image of '{}'",
                    args.device
                ));
            }
            Some(b)
        }
        (Some(NodeRef::File(file)), None) => Some(
            find_file(v, below, file)
                .ok_or_else(|| format!("Can't find '{file}' in the backing chain"))?,
        ),
        (None, Some(bottom)) => {
            let b = v
                .find(bottom)
                .ok_or_else(|| format!("Cannot find device='' nor node-name='{bottom}'"))?;
            if !below.contains(&b) {
                return Err(format!(
                    "Node '{bottom}' is not in a chain starting from '{}'",
                    args.device
                ));
            }
            v.backing(b)
        }
        (None, None) => None,
    };
    if args.backing_file.is_some() && base.is_none() {
        return Err("backing file specified, but streaming the entire chain".into());
    }
    let layers: Vec<NodeId> = below
        .iter()
        .copied()
        .take_while(|&n| Some(n) != base)
        .collect();
    let mut claimed = vec![device];
    claimed.extend(&layers);
    check_free(v, &claimed)?;

    // Freeze the links from the device down to the bottom layer.
    let mut linked = vec![device];
    linked.extend(layers.iter().take(layers.len().saturating_sub(1)));
    let frozen = if layers.is_empty() {
        Vec::new()
    } else {
        backing_slots(v, &linked)
    };
    for &s in &frozen {
        tx.freeze(s, job).map_err(|e| e.to_string())?;
    }
    tx.attach_user_as(
        job_user(
            job,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED,
        ),
        "main node",
        device,
    )
    .map_err(|e| e.to_string())?;
    for &n in &layers {
        tx.attach_user_as(
            job_user(
                job,
                Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            ),
            "intermediate node",
            n,
        )
        .map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())?;
    Ok(Box::new(Stream {
        graph: graph.clone(),
        ctx: ctx.clone(),
        device,
        layers,
        base,
        backing_file: args.backing_file,
        hold: Hold {
            job: job.into(),
            frozen,
        },
    }))
}

impl Stream {
    /// Copies the part of `[off, off + n)` that the device lacks and the
    /// layers hold.
    async fn step(
        &self,
        g: &GraphView,
        off: u64,
        n: u64,
        buf: &mut AlignedBuf,
    ) -> Result<u64, StepError> {
        let dev = g
            .node(self.device)
            .map(|n| n.driver())
            .ok_or_else(|| (gone(), true))?;
        let mut at = off;
        let mut copied = 0;
        while at < off + n {
            let own = dev
                .block_status(g, at, off + n - at)
                .await
                .map_err(|e| (e, true))?;
            let run = own.len.clamp(1, off + n - at);
            if own.allocated {
                at += run;
                continue;
            }
            let (held, run) = held_by(g, &self.layers, at, run)
                .await
                .map_err(|e| (e, true))?;
            if held {
                let iov = buf.iovecs_mut();
                let part = iov.slice(0, run);
                dev.read(g, at, &part).await.map_err(|e| (e, true))?;
                dev.fill_unallocated(g, at, &part)
                    .await
                    .map_err(|e| (e, false))?;
                copied += run;
            }
            at += run;
        }
        Ok(copied)
    }
}

fn gone() -> BlockError {
    BlockError::Unsupported {
        op: IoOp::Read,
        driver: "(a node that went away)",
    }
}

impl JobBody for Stream {
    fn kind(&self) -> &'static str {
        "stream"
    }

    fn run(&mut self, ctx: &JobContext) -> Result<(), JobError> {
        let v = self.graph.view();
        let size = v
            .node(self.device)
            .ok_or_else(|| JobError::Failed("the device went away".into()))?
            .driver()
            .size(&v)
            .map_err(|e| JobError::Failed(e.to_string()))?;
        drop(v);
        ctx.set_len(size);
        if self.layers.is_empty() {
            ctx.progress(size);
            return Ok(());
        }
        let mut buf = AlignedBuf::zeroed(CHUNK as usize, 4096)?;
        let graph = self.graph.clone();
        chunked(ctx, &graph, 0, size, crate::copy::CHUNK, |g, off, n| {
            block_on(self.step(g, off, n, &mut buf))
                .unwrap_or_else(|e| Err((BlockError::io(IoOp::Read, off, e), true)))
        })
    }

    fn prepare(&mut self, graph: &Graph, _ctx: &JobContext) -> Result<(), String> {
        if self.layers.is_empty() {
            return Ok(());
        }
        let v = graph.view();
        let dev = v.node(self.device).ok_or("the device went away")?.driver();
        let name = self
            .base
            .map(|b| self.backing_file.clone().unwrap_or_else(|| v.filename(b)));
        let format = self
            .base
            .and_then(|b| v.node(b))
            .map(|n| n.driver().driver_name());
        block_on(dev.change_backing_file(&v, name.as_deref(), format))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("Could not update the backing file in the image header: {e}"))?;
        drop(v);
        let mut tx = graph.transaction();
        self.hold.release_in(&mut tx).map_err(|e| e.to_string())?;
        blockdev::set_backing(&mut tx, self.device, self.base, &self.ctx)
            .map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())
    }

    fn abort(&mut self, _graph: &Graph) {}

    fn clean(&mut self, graph: &Graph) {
        self.hold.release(graph);
    }
}
