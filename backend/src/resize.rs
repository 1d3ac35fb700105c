//! block_resize: grows a node while it is in use, as QEMU's command does.
//! The resize holds the node with a user of its own that needs RESIZE, so
//! the graph's permission check refuses it where a parent does not share
//! that (a job's base, another process's lock); exports share it, as
//! QEMU's guest devices do.

use std::sync::atomic::{AtomicU64, Ordering};

use strata_graph::{Graph, NodeId, Perm, SlotPerm, User, UserKind};
use strata_runtime::reactor::block_on;

use crate::qmp::error::QmpError;

/// Grows `node` to `size` bytes. Shrinking is refused: what lies past
/// the new end would be gone for a guest that still uses it.
pub fn grow(graph: &Graph, node: NodeId, size: u64) -> Result<(), QmpError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let v = graph.view();
    let n = v
        .node(node)
        .ok_or_else(|| QmpError::generic("the node went away"))?;
    let name = n.name().to_owned();
    if size % 512 != 0 {
        return Err(QmpError::generic(format!(
            "block_resize: {size} is not a multiple of 512 bytes"
        )));
    }
    let old = n
        .driver()
        .size(&v)
        .map_err(|e| QmpError::generic(format!("cannot read the size of '{name}': {e}")))?;
    if size < old {
        return Err(QmpError::generic(format!(
            "block_resize: shrinking '{name}' from {old} to {size} bytes would drop \
             data the guest may use; only growing is supported"
        )));
    }
    if size == old {
        return Ok(());
    }
    let user = format!("block_resize-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mut tx = graph.transaction();
    tx.attach_user(
        User {
            kind: UserKind::Job,
            name: user.as_str().into(),
            perm: SlotPerm {
                need: Perm::RESIZE,
                share: Perm::all(),
            },
        },
        node,
    )?;
    tx.commit()?;
    let v = graph.view();
    let res = match v.node(node) {
        Some(n) => block_on(n.driver().resize(&v, size))
            .map_err(|e| QmpError::generic(format!("cannot resize '{name}': {e}")))
            .and_then(|r| r.map_err(|e| QmpError::generic(format!("cannot resize '{name}': {e}")))),
        None => Err(QmpError::generic("the node went away")),
    };
    let mut tx = graph.transaction();
    let detached = tx.detach_user(&user).and_then(|()| tx.commit());
    if let Err(e) = detached {
        tracing::error!("block_resize: cannot let go of '{name}': {e}");
    }
    res
}
