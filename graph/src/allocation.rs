//! Where a range's data comes from along a backing chain: which layer
//! holds it and whether it reads as zeroes. This is what `qemu-img map`
//! prints and what an NBD server reports as block status.

use crate::{BlockError, GraphView, IoOp, NodeId};

/// The answer for the first run of bytes of a range that share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Bytes the answer covers, at least 1.
    pub len: u64,
    /// The layer that holds them, 1 for the top node, 2 for its backing
    /// node and so on; `None` when no layer does (they read as zeroes).
    pub depth: Option<u32>,
    /// They read as zeroes.
    pub zero: bool,
}

/// The allocation of the first bytes of `[offset, offset + len)` of the
/// chain below `top`; `len` must be at least 1. Bytes past the end of a
/// backing node shorter than the one above it belong to no layer.
pub async fn allocation(
    g: &GraphView,
    top: NodeId,
    offset: u64,
    len: u64,
) -> Result<Allocation, BlockError> {
    let mut len = len.max(1);
    let mut node = Some(top);
    let mut depth = 1;
    while let Some(id) = node {
        let driver = g
            .node(id)
            .ok_or(BlockError::Unsupported {
                op: IoOp::Read,
                driver: "(a node that went away)",
            })?
            .driver();
        let size = driver.size(g)?;
        if offset >= size {
            break;
        }
        len = len.min(size - offset);
        let st = driver.block_status(g, offset, len).await?;
        let run = st.len.clamp(1, len);
        if st.allocated {
            return Ok(Allocation {
                len: run,
                depth: Some(depth),
                zero: st.zero,
            });
        }
        len = run;
        node = g.backing(id);
        depth += 1;
    }
    Ok(Allocation {
        len,
        depth: None,
        zero: true,
    })
}
