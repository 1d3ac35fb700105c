//! An immutable snapshot of the graph: the arena of nodes and the slot table.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::{BlockDriver, BlockError, IoFuture, NodeId, Parent, Slot, SlotId};

/// A node: its name, its driver and the options it was opened with.
#[derive(Clone)]
pub struct Node {
    pub(crate) name: Arc<str>,
    pub(crate) driver: Arc<dyn BlockDriver>,
    pub(crate) options: Arc<serde_json::Value>,
    pub(crate) monitor_owned: bool,
    /// False while another process owns the image: the node takes no
    /// I/O and asks no permissions (so its files hold no locks).
    pub(crate) active: bool,
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

    /// The node's driver, shared.
    pub fn driver_arc(&self) -> &Arc<dyn BlockDriver> {
        &self.driver
    }

    /// The options the node was opened (or last reopened) with.
    pub fn options(&self) -> &serde_json::Value {
        &self.options
    }

    /// False while the node is inactive (see [`Transaction::set_active`](crate::Transaction::set_active)).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// True for nodes added on their own (by blockdev-add); false for
    /// children created inline, which go away with their last parent.
    pub fn monitor_owned(&self) -> bool {
        self.monitor_owned
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
        let s = self.slot(slot).ok_or(BlockError::EmptySlot { slot })?;
        let node = self.node(s.child).ok_or(BlockError::EmptySlot { slot })?;
        // Users (exports, jobs) get nothing from an inactive node; its
        // drivers still read their images (a format node opening reads
        // its header), read-only.
        if !node.active && matches!(s.parent, Parent::User(_)) {
            return Err(BlockError::Inactive {
                node: node.name.clone(),
            });
        }
        Ok(node.driver())
    }

    /// Starts `f` on the driver in `slot`: how filters pass requests down.
    pub fn via<'a, T>(
        &'a self,
        slot: SlotId,
        f: impl FnOnce(&'a dyn BlockDriver) -> IoFuture<'a, T>,
    ) -> IoFuture<'a, T> {
        match self.child(slot) {
            Ok(c) => f(c),
            Err(e) => IoFuture::ready(Err(e)),
        }
    }

    /// The id of the node in `slot`.
    pub fn child_id(&self, slot: SlotId) -> Option<NodeId> {
        self.slot(slot).map(|s| s.child)
    }

    /// The node named `name`.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes()
            .find(|(_, n)| &*n.name == name)
            .map(|(id, _)| id)
    }

    /// The name of node `id`, or "?" if it does not exist.
    pub fn name(&self, id: NodeId) -> &str {
        self.node(id).map_or("?", Node::name)
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

    /// The slot of `parent` with `role`.
    pub fn child_slot(&self, parent: NodeId, role: &str) -> Option<SlotId> {
        self.children(parent)
            .find(|(_, s)| s.role() == role)
            .map(|(id, _)| id)
    }

    /// The slots that hold `child`.
    pub fn parents(&self, child: NodeId) -> impl Iterator<Item = (SlotId, &Slot)> {
        self.slots().filter(move |(_, s)| s.child == child)
    }

    /// The node below `id` in its backing chain (its `backing` child).
    pub fn backing(&self, id: NodeId) -> Option<NodeId> {
        self.child_slot(id, "backing")
            .and_then(|s| self.child_id(s))
    }

    /// The host file behind a node: its own `filename` option, or its
    /// `file` child's; a node with neither describes itself as `json:`.
    pub fn filename(&self, id: NodeId) -> String {
        let Some(node) = self.node(id) else {
            return String::new();
        };
        if let Some(f) = node.options().get("filename").and_then(|f| f.as_str()) {
            return f.to_owned();
        }
        match self.child_slot(id, "file").and_then(|s| self.child_id(s)) {
            Some(child) => self.filename(child),
            None => format!("json:{}", node.options()),
        }
    }

    /// The job that holds `id` in its range, if any.
    pub fn job_using(&self, id: NodeId) -> Option<&crate::User> {
        self.parents(id).find_map(|(_, s)| match &s.parent {
            Parent::User(u) if u.kind == crate::UserKind::Job => Some(u),
            _ => None,
        })
    }

    /// The slot owned by the user named `name`.
    pub fn user_slot(&self, name: &str) -> Option<SlotId> {
        self.slots()
            .find(|(_, s)| matches!(&s.parent, Parent::User(u) if &*u.name == name))
            .map(|(id, _)| id)
    }

    /// True when `to` is `from` or lies below it.
    pub fn reaches(&self, from: NodeId, to: NodeId) -> bool {
        let mut seen = vec![false; self.nodes.len()];
        let mut todo = vec![from];
        while let Some(n) = todo.pop() {
            if n == to {
                return true;
            }
            if std::mem::replace(&mut seen[n.index()], true) {
                continue;
            }
            todo.extend(self.children(n).map(|(_, s)| s.child));
        }
        false
    }

    /// Every node in an order where parents come before their children, or
    /// `None` if the slots form a cycle.
    pub fn parents_first(&self) -> Option<Vec<NodeId>> {
        let mut pending = vec![0usize; self.nodes.len()];
        for (_, s) in self.slots() {
            if matches!(s.parent, Parent::Node(_)) {
                pending[s.child.index()] += 1;
            }
        }
        let mut ready: VecDeque<NodeId> = self
            .nodes()
            .filter(|(id, _)| pending[id.index()] == 0)
            .map(|(id, _)| id)
            .collect();
        let mut order = Vec::new();
        while let Some(n) = ready.pop_front() {
            order.push(n);
            for (_, s) in self.children(n) {
                pending[s.child.index()] -= 1;
                if pending[s.child.index()] == 0 {
                    ready.push_back(s.child);
                }
            }
        }
        (order.len() == self.nodes().count()).then_some(order)
    }
}
