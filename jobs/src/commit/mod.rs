//! `block-commit`: merges the layers from `top` down to just above `base`
//! into `base`. An intermediate top is the [`intermediate`] job; the
//! active layer (the guest keeps writing it) is the mirror in [`active`].
//! What both share is in [`range`].

mod active;
mod intermediate;
mod range;

use strata_blockdev::OpenContext;
use strata_graph::Graph;

use crate::job::JobBody;
pub(crate) use range::match_sizes;
use range::resolve;
pub use range::CommitArgs;

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
        return active::start(graph, job, range, &args, ctx);
    }
    intermediate::start(graph, job, range, args, ctx)
}
