//! One entry of the slot table: an edge from a parent to a child node.

use std::fmt;
use std::sync::Arc;

use crate::NodeId;

/// Who owns a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// A node: the slot is one of its children (`file`, `backing`, ...).
    Node(NodeId),
    /// An export, named by its id: the slot holds the node it serves.
    Export(Arc<str>),
}

/// An edge. The table of slots is the only place edges exist.
#[derive(Clone, Debug)]
pub struct Slot {
    pub(crate) parent: Parent,
    pub(crate) role: Arc<str>,
    pub(crate) child: NodeId,
}

impl Slot {
    /// The slot's owner.
    pub fn parent(&self) -> &Parent {
        &self.parent
    }

    /// The role the child plays for its parent (`file`, `backing`, `root`).
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The node in the slot.
    pub fn child(&self) -> NodeId {
        self.child
    }
}

impl fmt::Display for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parent::Node(id) => write!(f, "{id}"),
            Parent::Export(id) => write!(f, "export '{id}'"),
        }
    }
}
