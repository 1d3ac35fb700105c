//! What the query commands report about the graph.

use serde_json::{json, Value};
use strata_graph::{slot_perms, GraphView, NodeId, Parent, Perm, UserKind};

fn read_only(v: &GraphView, id: NodeId) -> bool {
    let Some(node) = v.node(id) else { return false };
    node.driver().is_read_only()
        || node
            .options()
            .get("read-only")
            .is_some_and(|r| r == true || r == "on")
        || v.child_slot(id, "file")
            .and_then(|s| v.child_id(s))
            .is_some_and(|c| read_only(v, c))
}

/// query-named-block-nodes: one BlockDeviceInfo per node, with its
/// children and their slot names.
pub fn named_block_nodes(v: &GraphView) -> Value {
    let list: Vec<Value> = v
        .nodes()
        .map(|(id, node)| {
            let driver = node.driver();
            let size = driver.size(v).unwrap_or(0);
            let opts = node.options();
            let direct = opts
                .pointer("/cache/direct")
                .is_some_and(|d| d == true || d == "on");
            let children: Vec<Value> = v
                .children(id)
                .map(|(_, s)| json!({"child": s.role(), "node-name": v.name(s.child())}))
                .collect();
            let file = v.filename(id);
            let mut info = json!({
                "node-name": node.name(),
                "drv": driver.driver_name(),
                "file": file,
                "ro": read_only(v, id),
                "encrypted": false,
                "detect_zeroes": "off",
                "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                "backing_file_depth": 0,
                "write_threshold": 0,
                "active": node.is_active(),
                "cache": {"writeback": true, "direct": direct, "no-flush": false},
                "image": {
                    "filename": file,
                    "format": driver.driver_name(),
                    "virtual-size": size,
                },
                "children": children,
            });
            if let Some(e) = driver.write_back_error() {
                info["write-back-error"] = std::io::Error::from_raw_os_error(e).to_string().into();
            }
            info
        })
        .collect();
    Value::Array(list)
}

/// x-debug-query-block-graph: nodes (block drivers and their users) and
/// edges with slot names and permissions.
pub fn block_graph(v: &GraphView) -> Value {
    let perms = slot_perms(v);
    let user_base = v
        .nodes()
        .map(|(id, _)| node_num(id))
        .max()
        .map_or(0, |m| m + 1);
    let mut nodes: Vec<Value> = v
        .nodes()
        .map(|(id, n)| json!({"id": node_num(id), "type": "block-driver", "name": n.name()}))
        .collect();
    let mut edges = Vec::new();
    // A job holds several nodes, through one slot each: one user node.
    let mut users: Vec<(UserKind, &str)> = Vec::new();
    for (sid, s) in v.slots() {
        let parent = match s.parent() {
            Parent::Node(p) => node_num(*p),
            Parent::User(u) => {
                let key = (u.kind, &*u.name);
                let i = users.iter().position(|k| *k == key).unwrap_or_else(|| {
                    users.push(key);
                    let ty = match u.kind {
                        UserKind::Export => "block-export",
                        UserKind::Job => "block-job",
                    };
                    let id = user_base + users.len() as u64 - 1;
                    nodes.push(json!({"id": id, "type": ty, "name": &*u.name}));
                    users.len() - 1
                });
                user_base + i as u64
            }
        };
        let p = perms.get(sid.index()).copied().flatten();
        let names = |p: Option<Perm>| p.unwrap_or(Perm::empty()).names();
        edges.push(json!({
            "parent": parent,
            "child": node_num(s.child()),
            "name": s.role(),
            "perm": names(p.map(|p| p.need)),
            "shared-perm": names(p.map(|p| p.share)),
        }));
    }
    json!({"nodes": nodes, "edges": edges})
}

fn node_num(id: NodeId) -> u64 {
    id.index() as u64
}
