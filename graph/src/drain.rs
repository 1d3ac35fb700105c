//! Drain: before slots are rewritten, the users whose requests could pass
//! through them stop starting requests and wait for the ones in flight.
//! Requests that arrive meanwhile are held by the user (an export leaves
//! them in its virtqueues) and start after the commit, on the new edges.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A user of the graph that can be quiesced: an export, a job.
pub trait Quiesce: Send + Sync {
    /// Stops starting requests and waits until none is in flight. On error
    /// the user must be usable again after [`Quiesce::resume`].
    fn quiesce(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// Starts requests again, the held ones first.
    fn resume(&self);
}

type QuiesceMap = HashMap<Arc<str>, Arc<dyn Quiesce>>;

/// The users that can be quiesced, by name.
#[derive(Clone, Default)]
pub(crate) struct Quiescers {
    map: Arc<Mutex<QuiesceMap>>,
}

impl Quiescers {
    pub(crate) fn insert(&self, name: &str, q: Arc<dyn Quiesce>) {
        self.lock().insert(name.into(), q);
    }

    pub(crate) fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<dyn Quiesce>> {
        self.lock().get(name).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QuiesceMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Users quiesced for one commit; resumed when dropped, commit or not.
pub(crate) struct Drained(pub(crate) Vec<Arc<dyn Quiesce>>);

impl Drop for Drained {
    fn drop(&mut self) {
        for q in self.0.drain(..).rev() {
            q.resume();
        }
    }
}
