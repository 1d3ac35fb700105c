//! The exports an NBD server offers, by the names clients ask for.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::export::NbdExport;

/// The exports a server offers, by NBD name.
#[derive(Default)]
pub struct Registry(Mutex<BTreeMap<String, Arc<NbdExport>>>);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<NbdExport>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The export named `name`.
    pub fn find(&self, name: &str) -> Option<Arc<NbdExport>> {
        self.lock().get(name).cloned()
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<Arc<NbdExport>> {
        self.lock().values().cloned().collect()
    }

    /// Stops offering the export with block-export id `id`.
    pub fn remove_id(&self, id: &str) {
        self.lock().retain(|_, e| e.options().id != id);
    }

    /// Offers `export` under its name, unless one has it already.
    pub fn insert(&self, export: Arc<NbdExport>) -> Result<(), String> {
        let mut map = self.lock();
        let name = export.options().name.clone();
        if map.contains_key(&name) {
            return Err(format!("NBD export '{name}' already exists"));
        }
        map.insert(name, export);
        Ok(())
    }
}
