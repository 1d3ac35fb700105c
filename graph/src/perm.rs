//! Permissions, after QEMU's model: every edge says what its parent needs
//! from the child and what it lets other parents of the child do. A graph
//! is consistent when, for every node, each parent's needs are shared by
//! every other parent, and nothing writes to a read-only node.

use std::fmt;

use crate::{GraphError, GraphView, NodeId, Parent, SlotId};

bitflags::bitflags! {
    /// What a parent may do with a child.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Perm: u8 {
        /// Reads return what was written (no one changes data underneath).
        const CONSISTENT_READ = 1 << 0;
        /// Writes that change the data.
        const WRITE = 1 << 1;
        /// Writes that leave the data as it reads (copy-on-read, stream).
        const WRITE_UNCHANGED = 1 << 2;
        /// Changing the size.
        const RESIZE = 1 << 3;
    }
}

impl Perm {
    /// QEMU's names, in QEMU's order.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Perm::CONSISTENT_READ, "consistent-read"),
            (Perm::WRITE, "write"),
            (Perm::WRITE_UNCHANGED, "write-unchanged"),
            (Perm::RESIZE, "resize"),
        ]
        .into_iter()
        .filter(|(p, _)| self.contains(*p))
        .map(|(_, n)| n)
        .collect()
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(", "))
    }
}

/// The permissions of one edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotPerm {
    /// What the parent needs.
    pub need: Perm,
    /// What the parent lets other parents do.
    pub share: Perm,
}

impl SlotPerm {
    /// Reading only, sharing everything: a node nobody uses asks for this.
    pub const UNUSED: SlotPerm = SlotPerm {
        need: Perm::empty(),
        share: Perm::all(),
    };

    /// A user that reads, and writes too when `writable`. A writer lets
    /// others read, and resize (a guest device follows the new size, as
    /// QEMU's resizable devices share it), but not write underneath it; a
    /// reader minds nothing (as qemu-storage-daemon's read-only exports).
    pub fn user(writable: bool) -> SlotPerm {
        if writable {
            SlotPerm {
                need: Perm::CONSISTENT_READ | Perm::WRITE,
                share: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE,
            }
        } else {
            SlotPerm {
                need: Perm::CONSISTENT_READ,
                share: Perm::all(),
            }
        }
    }
}

/// What a node asks of a child in `role`, given what its own parents ask of
/// it. A `backing` child is read only, and shares writes only when the
/// node's parents do; any other child passes its parents' needs through.
pub fn default_child_perm(role: &str, parents: SlotPerm) -> SlotPerm {
    if role == "backing" {
        let mut share = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        if parents.share.contains(Perm::WRITE) {
            share |= Perm::WRITE | Perm::RESIZE;
        }
        return SlotPerm {
            need: parents.need & Perm::CONSISTENT_READ,
            share,
        };
    }
    parents
}

/// The permissions every slot ends up with in `v`, computed from the users
/// down (see [`GraphView::parents_first`]). Indexed by slot id; `None` for
/// ids of removed slots.
pub fn slot_perms(v: &GraphView) -> Vec<Option<SlotPerm>> {
    slot_perms_in(v, &v.parents_first().unwrap_or_default())
}

fn slot_perms_in(v: &GraphView, order: &[NodeId]) -> Vec<Option<SlotPerm>> {
    let mut perms: Vec<Option<SlotPerm>> = vec![None; v.slots.len()];
    let active = |n: NodeId| v.node(n).is_some_and(|n| n.is_active());
    for (sid, s) in v.slots() {
        if let Parent::User(u) = s.parent() {
            // A user of an inactive node can do nothing with it.
            perms[sid.index()] = Some(if active(s.child()) {
                u.perm
            } else {
                SlotPerm::UNUSED
            });
        }
    }
    for &n in order {
        let Some(node) = v.node(n) else { continue };
        let used = combined(v, n, &perms);
        for (sid, s) in v.children(n) {
            perms[sid.index()] = Some(if node.is_active() {
                node.driver().child_perm(s.role(), used)
            } else {
                SlotPerm::UNUSED
            });
        }
    }
    perms
}

/// What the parents of each node of `v` need together and share in
/// common, for [`BlockDriver::prepare_perm`](crate::BlockDriver::prepare_perm).
pub(crate) fn node_perms(v: &GraphView, order: &[NodeId]) -> Vec<(NodeId, SlotPerm)> {
    let perms = slot_perms_in(v, order);
    v.nodes()
        .map(|(n, _)| (n, combined(v, n, &perms)))
        .collect()
}

/// What the parents of `n` need together and share in common: nothing,
/// for an inactive node.
fn combined(v: &GraphView, n: NodeId, perms: &[Option<SlotPerm>]) -> SlotPerm {
    if v.node(n).is_some_and(|n| !n.is_active()) {
        return SlotPerm::UNUSED;
    }
    v.parents(n).fold(SlotPerm::UNUSED, |acc, (sid, _)| {
        let p = perms[sid.index()].unwrap_or(SlotPerm::UNUSED);
        SlotPerm {
            need: acc.need | p.need,
            share: acc.share & p.share,
        }
    })
}

/// Checks that no two parents of a node conflict and that nothing needs to
/// write to a read-only node.
pub(crate) fn check(v: &GraphView, order: &[NodeId]) -> Result<(), GraphError> {
    let perms = slot_perms_in(v, order);
    for (n, node) in v.nodes() {
        let parents: Vec<(SlotId, SlotPerm)> = v
            .parents(n)
            .map(|(sid, _)| (sid, perms[sid.index()].unwrap_or(SlotPerm::UNUSED)))
            .collect();
        // Newest edges first: a conflict is blamed on the newcomer.
        for &(a, pa) in parents.iter().rev() {
            if node.driver().is_read_only()
                && pa.need.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED)
            {
                return Err(GraphError::ReadOnlyNode {
                    node: node.name().into(),
                    user: describe(v, a),
                });
            }
            for &(b, pb) in &parents {
                let mut denied = pa.need & !pb.share;
                // Exports of one node are this daemon's own frontends:
                // every write goes through the node, so each sees the
                // others' (as one export's queues do). To anything else
                // the node still shares only what they all share.
                if is_export(v, a) && is_export(v, b) {
                    denied -= Perm::WRITE;
                }
                if a != b && !denied.is_empty() {
                    return Err(GraphError::PermissionConflict {
                        node: node.name().into(),
                        perm: denied.to_string(),
                        user: describe(v, a),
                        other: describe(v, b),
                    });
                }
            }
        }
    }
    Ok(())
}

fn is_export(v: &GraphView, slot: SlotId) -> bool {
    matches!(
        v.slot(slot).map(|s| s.parent()),
        Some(Parent::User(u)) if u.kind == crate::UserKind::Export
    )
}

/// "'top' as 'backing'", "export 'vda'".
pub(crate) fn describe(v: &GraphView, slot: SlotId) -> String {
    match v.slot(slot).map(|s| (s.parent(), s.role())) {
        Some((Parent::Node(p), role)) => {
            let name = v.node(*p).map_or("?", |n| n.name());
            format!("'{name}' as '{role}'")
        }
        Some((Parent::User(u), _)) => u.to_string(),
        None => slot.to_string(),
    }
}
