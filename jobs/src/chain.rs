//! Backing chains as jobs see them: walking them, finding images in them,
//! and asking which layers hold a range.

use strata_graph::{BlockError, GraphView, IoOp, NodeId};

/// `top` and the nodes below it through `backing` slots, top first.
pub fn chain(v: &GraphView, top: NodeId) -> Vec<NodeId> {
    let mut out = vec![top];
    while let Some(next) = out.last().and_then(|&n| v.backing(n)) {
        if out.contains(&next) {
            break;
        }
        out.push(next);
    }
    out
}

/// The node of `chain` whose image is the file `name` (as given, or the
/// same file by its canonical path).
pub fn find_file(v: &GraphView, chain: &[NodeId], name: &str) -> Option<NodeId> {
    let canon = |p: &str| std::fs::canonicalize(p).ok();
    let want = canon(name);
    chain.iter().copied().find(|&n| {
        let f = v.filename(n);
        f == name || (want.is_some() && canon(&f) == want)
    })
}

/// Whether the first bytes of `[offset, offset + len)` are held by one of
/// `layers` (top first; reads through the first would find them there),
/// and for how long the answer holds. A layer shorter than the range
/// hides everything below it past its end: that counts as held (zeroes).
pub async fn held_by(
    g: &GraphView,
    layers: &[NodeId],
    offset: u64,
    len: u64,
) -> Result<(bool, u64), BlockError> {
    let mut len = len;
    for &n in layers {
        let node = g.node(n).ok_or(BlockError::Unsupported {
            op: IoOp::Read,
            driver: "(a node that went away)",
        })?;
        let driver = node.driver();
        let size = driver.size(g)?;
        if offset >= size {
            return Ok((true, len));
        }
        len = len.min(size - offset);
        let st = driver.block_status(g, offset, len).await?;
        let run = st.len.clamp(1, len);
        if st.allocated {
            return Ok((true, run));
        }
        len = run;
    }
    Ok((false, len))
}

/// The text and errno of an I/O error, as QEMU words them in job events
/// ("Input/output error").
pub fn describe(e: &BlockError) -> (String, Option<i32>) {
    match e {
        BlockError::Io { source, .. } => {
            let text = source.to_string();
            let text = match text.find(" (os error") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            (text, source.raw_os_error())
        }
        other => (other.to_string(), None),
    }
}
