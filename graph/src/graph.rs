//! The shared, editable graph: edits build a new [`GraphView`] and publish it.

use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Cache};

use crate::drain::Quiescers;
use crate::{
    BlockDriver, GraphError, GraphView, NodeBuilder, NodeId, Quiesce, SlotId, Transaction, User,
};

/// The block graph of one daemon. Cloning gives another handle on the same
/// graph.
#[derive(Clone)]
pub struct Graph {
    pub(crate) views: Arc<ArcSwap<GraphView>>,
    /// Serialises edits; readers never take it.
    edit: Arc<Mutex<()>>,
    pub(crate) quiescers: Quiescers,
    pub(crate) next_auto_name: Arc<AtomicU64>,
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
            quiescers: Quiescers::default(),
            next_auto_name: Arc::new(AtomicU64::new(0)),
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

    /// Starts an edit. Edits are serialised: this waits for any other.
    pub fn transaction(&self) -> Transaction<'_> {
        Transaction::new(self, self.edit.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Adds one node owned by the monitor, in a transaction of its own.
    pub fn add_node<E>(
        &self,
        name: &str,
        open: impl FnOnce(&mut NodeBuilder<'_>) -> Result<Arc<dyn BlockDriver>, E>,
    ) -> Result<NodeId, GraphError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut tx = self.transaction();
        let id = tx.add_node(Some(name), serde_json::Value::Null, true, open)?;
        tx.commit()?;
        Ok(id)
    }

    /// Gives `user` a slot holding `child`, in a transaction of its own.
    pub fn attach_user(&self, user: User, child: NodeId) -> Result<SlotId, GraphError> {
        let mut tx = self.transaction();
        let slot = tx.attach_user(user, child)?;
        tx.commit()?;
        Ok(slot)
    }

    /// Registers how to quiesce the user named `name` (see [`Quiesce`]).
    pub fn register_quiesce(&self, name: &str, q: Arc<dyn Quiesce>) {
        self.quiescers.insert(name, q);
    }

    /// Forgets the quiesce handler of `name`.
    pub fn unregister_quiesce(&self, name: &str) {
        self.quiescers.remove(name);
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
