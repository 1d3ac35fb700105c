//! One entry of the slot table: an edge from a parent to a child node.

use std::fmt;
use std::sync::Arc;

use crate::{NodeId, SlotPerm};

/// What kind of user owns a root slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserKind {
    /// A block export (a vhost-user-blk device).
    Export,
    /// A block job.
    Job,
}

/// Something outside the graph that uses a node: an export or a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Its kind.
    pub kind: UserKind,
    /// Its id (export id, job id).
    pub name: Arc<str>,
    /// What it needs from the node and lets others do.
    pub perm: SlotPerm,
}

/// Who owns a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// A node: the slot is one of its children (`file`, `backing`, ...).
    Node(NodeId),
    /// A user: the slot holds the node it uses.
    User(User),
}

/// An edge. The table of slots is the only place edges exist.
#[derive(Clone, Debug)]
pub struct Slot {
    pub(crate) parent: Parent,
    pub(crate) role: Arc<str>,
    pub(crate) child: NodeId,
    /// The job that froze the slot, if any: frozen slots keep their child.
    pub(crate) frozen_by: Option<Arc<str>>,
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

    /// The job that froze the slot, if it is frozen.
    pub fn frozen_by(&self) -> Option<&str> {
        self.frozen_by.as_deref()
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            UserKind::Export => write!(f, "export '{}'", self.name),
            UserKind::Job => write!(f, "job '{}'", self.name),
        }
    }
}

impl fmt::Display for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parent::Node(id) => write!(f, "{id}"),
            Parent::User(u) => write!(f, "{u}"),
        }
    }
}
