//! An immutable snapshot of the graph: the arena of nodes and the slot table.

use std::sync::Arc;

use crate::{BlockDriver, BlockError, NodeId, Parent, Slot, SlotId};

/// A node: a name and the driver that implements it.
#[derive(Clone)]
pub struct Node {
    pub(crate) name: Arc<str>,
    pub(crate) driver: Arc<dyn BlockDriver>,
}

impl Node {
    /// The node's unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's driver.
    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }
}

/// A consistent snapshot of every node and every edge. Requests run against
/// the view that was current when they started.
#[derive(Clone, Default)]
pub struct GraphView {
    pub(crate) nodes: Vec<Option<Node>>,
    pub(crate) slots: Vec<Option<Slot>>,
}

impl GraphView {
    /// The node with this id, if it exists.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.index()).and_then(Option::as_ref)
    }

    /// The slot with this id, if it exists.
    pub fn slot(&self, id: SlotId) -> Option<&Slot> {
        self.slots.get(id.index()).and_then(Option::as_ref)
    }

    /// The driver of the node in `slot`: how a driver reaches its child.
    pub fn child(&self, slot: SlotId) -> Result<&dyn BlockDriver, BlockError> {
        self.slot(slot)
            .and_then(|s| self.node(s.child))
            .map(Node::driver)
            .ok_or(BlockError::EmptySlot { slot })
    }

    /// The node named `name`.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes()
            .find(|(_, n)| &*n.name == name)
            .map(|(id, _)| id)
    }

    /// Every node.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((NodeId(i as u32), n.as_ref()?)))
    }

    /// Every slot.
    pub fn slots(&self) -> impl Iterator<Item = (SlotId, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((SlotId(i as u32), s.as_ref()?)))
    }

    /// The slots owned by `parent`, in the order they were attached.
    pub fn children(&self, parent: NodeId) -> impl Iterator<Item = (SlotId, &Slot)> {
        self.slots()
            .filter(move |(_, s)| s.parent == Parent::Node(parent))
    }

    /// The slots that hold `child`.
    pub fn parents(&self, child: NodeId) -> impl Iterator<Item = (SlotId, &Slot)> {
        self.slots().filter(move |(_, s)| s.child == child)
    }
}
