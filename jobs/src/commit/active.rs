//! Active commit: `block-commit` whose top is the active layer, which the
//! guest keeps writing: the [mirror](crate::mirror) engine, copying what
//! the layers above the base hold into the base.

use strata_blockdev::OpenContext;
use strata_graph::Graph;

use super::range::{attach_users, CommitArgs, Range};
use crate::copy::CHUNK;
use crate::hold::{backing_slots, check_free};
use crate::job::JobBody;
use crate::mirror::{Copy, Mirror, Setup};

/// The granule of the dirty map: small enough that a 4 KiB guest write
/// costs little to copy again, large enough to keep the map small.
const GRANULE: u64 = 64 << 10;

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
    let frozen = backing_slots(v, &layers);
    let setup = Setup {
        kind: "commit",
        source: top,
        target: base,
        layers: layers.clone(),
        copy: Copy::Held,
        granularity: GRANULE,
        chunk: CHUNK,
        write_blocking: false,
        filter_node_name: args.filter_node_name.clone(),
    };
    let mirror = Mirror::insert(&mut tx, graph, job, setup, size, frozen)?;
    attach_users(&mut tx, job, &layers, base)?;
    tx.commit().map_err(|e| e.to_string())?;
    Ok(Box::new(mirror))
}
