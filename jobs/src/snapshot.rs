//! `blockdev-snapshot`: an overlay node, added with no backing node, is put
//! above a live node. In one transaction the overlay gets the node as its
//! backing node and takes the node's place for all its other parents, so
//! the guest's next request goes to the overlay.

use strata_graph::Graph;

use strata_blockdev::{self as blockdev, OpenContext};

/// Puts node `overlay` above node `node`.
pub fn snapshot(graph: &Graph, node: &str, overlay: &str, ctx: &OpenContext) -> Result<(), String> {
    let mut tx = graph.transaction();
    let v = tx.view();
    let find = |name: &str| {
        v.find(name)
            .ok_or_else(|| format!("Cannot find device='{name}' nor node-name='{name}'"))
    };
    let (n, o) = (find(node)?, find(overlay)?);
    if n == o {
        return Err(format!("Node '{node}' cannot be its own overlay"));
    }
    if v.parents(o).next().is_some() {
        return Err(format!("The overlay '{overlay}' is already in use"));
    }
    if v.backing(o).is_some() {
        return Err(format!(
            "The overlay '{overlay}' already has a backing image (add it with \"backing\": null)"
        ));
    }
    let driver = v.node(o).expect("found above").driver().driver_name();
    if driver != "qcow2" {
        return Err(format!(
            "The overlay '{overlay}' does not support backing images (driver '{driver}')"
        ));
    }
    crate::hold::check_free(v, &[n])?;
    if v.reaches(n, o) {
        return Err(format!("Node '{overlay}' is already below '{node}'"));
    }
    blockdev::set_backing(&mut tx, o, Some(n), ctx).map_err(|e| e.to_string())?;
    let own = tx
        .view()
        .child_slot(o, "backing")
        .expect("the overlay has its backing slot now");
    tx.replace_node(n, o, &[own]).map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}
