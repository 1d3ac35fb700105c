//! The shared, editable graph: edits build a new [`GraphView`] and publish it.

use std::rc::Rc;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Cache};

use crate::{BlockDriver, GraphError, GraphView, Node, NodeId, Parent, Slot, SlotId};

/// The block graph of one daemon. Cloning gives another handle on the same
/// graph.
#[derive(Clone)]
pub struct Graph {
    views: Arc<ArcSwap<GraphView>>,
    /// Serialises edits; readers never take it.
    edit: Arc<Mutex<()>>,
}

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Graph {
            views: Arc::new(ArcSwap::from_pointee(GraphView::default())),
            edit: Arc::new(Mutex::new(())),
        }
    }

    /// The current view.
    pub fn view(&self) -> Arc<GraphView> {
        self.views.load_full()
    }

    /// A per-thread handle that hands out the current view cheaply.
    pub fn local_views(&self) -> LocalViews {
        let mut cache = Cache::new(Arc::clone(&self.views));
        let current = Rc::new(Arc::clone(cache.load()));
        LocalViews { cache, current }
    }

    /// Applies `f` to a copy of the current view and publishes the result,
    /// or publishes nothing if `f` fails: every edit is all or nothing.
    fn edit<R>(
        &self,
        f: impl FnOnce(&mut GraphView) -> Result<R, GraphError>,
    ) -> Result<R, GraphError> {
        let _guard = self.edit.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = GraphView::clone(&self.views.load());
        let out = f(&mut next)?;
        self.views.store(Arc::new(next));
        Ok(out)
    }

    /// Adds a node named `name`. `open` attaches the node's children through
    /// the [`NodeBuilder`] and returns the driver. If `open` fails, the graph
    /// is left as it was.
    pub fn add_node<E>(
        &self,
        name: &str,
        open: impl FnOnce(&mut NodeBuilder<'_>) -> Result<Arc<dyn BlockDriver>, E>,
    ) -> Result<NodeId, GraphError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        check_name(name)?;
        self.edit(|next| {
            if next.find(name).is_some() {
                return Err(GraphError::DuplicateName { name: name.into() });
            }
            let id = NodeId(next.nodes.len() as u32);
            // Reserve the id so slots attached during `open` name a real parent.
            next.nodes.push(None);
            let mut b = NodeBuilder { next, id };
            let driver = open(&mut b).map_err(|e| GraphError::Open {
                name: name.into(),
                source: e.into(),
            })?;
            b.next.nodes[id.index()] = Some(Node {
                name: name.into(),
                driver,
            });
            Ok(id)
        })
    }

    /// Gives export `export` a slot holding `child`, its root node.
    pub fn attach_export(&self, export: &str, child: NodeId) -> Result<SlotId, GraphError> {
        self.edit(|next| push_slot(next, Parent::Export(export.into()), "root", child))
    }
}

fn push_slot(
    next: &mut GraphView,
    parent: Parent,
    role: &str,
    child: NodeId,
) -> Result<SlotId, GraphError> {
    if next.node(child).is_none() {
        return Err(GraphError::NoSuchNode { id: child });
    }
    let id = SlotId(next.slots.len() as u32);
    next.slots.push(Some(Slot {
        parent,
        role: role.into(),
        child,
    }));
    Ok(id)
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` or `_`.
fn check_name(name: &str) -> Result<(), GraphError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok && name.len() <= 127 {
        Ok(())
    } else {
        Err(GraphError::InvalidName { name: name.into() })
    }
}

/// Lets a driver's open function attach children to the node being added.
pub struct NodeBuilder<'a> {
    next: &'a mut GraphView,
    id: NodeId,
}

impl NodeBuilder<'_> {
    /// The id the new node will have.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Attaches `child` in a new slot with `role` and returns the slot.
    pub fn attach(&mut self, role: &str, child: NodeId) -> Result<SlotId, GraphError> {
        push_slot(self.next, Parent::Node(self.id), role, child)
    }

    /// The view the node will be published in, including the slots attached
    /// so far. Drivers use it to query their children while opening.
    pub fn view(&self) -> &GraphView {
        self.next
    }
}

/// A view as a thread hands it to its requests. The outer `Rc` is the
/// point: cloning it touches no cache line another thread writes.
#[allow(clippy::redundant_allocation)]
pub type LocalView = Rc<Arc<GraphView>>;

/// A thread's handle on the current view. Checking for a newer view costs
/// one atomic load; handing the view to a request costs a non-atomic
/// increment, so queue threads never share a contended counter.
pub struct LocalViews {
    cache: Cache<Arc<ArcSwap<GraphView>>, Arc<GraphView>>,
    current: LocalView,
}

impl LocalViews {
    /// The current view.
    pub fn current(&mut self) -> LocalView {
        let latest = self.cache.load();
        if !Arc::ptr_eq(latest, &self.current) {
            self.current = Rc::new(Arc::clone(latest));
        }
        Rc::clone(&self.current)
    }
}

#[cfg(test)]
mod tests;
