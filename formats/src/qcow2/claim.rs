//! Claims a running request holds on the image: a guest cluster it is
//! allocating, and host clusters it allocated but has not linked yet. Each
//! is a guard released by `Drop`, so a request future dropped at any await
//! point (a frontend that left, a request cancelled at teardown) leaves
//! neither a cluster that waits forever nor a leaked host cluster.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use futures::channel::oneshot;

/// Guest clusters with an allocating write in flight, and who waits for
/// them. A plain mutex, never held across an await: `Drop` must be able to
/// take it.
#[derive(Default)]
pub struct Busy(Mutex<HashMap<u64, Vec<oneshot::Sender<()>>>>);

impl Busy {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Vec<oneshot::Sender<()>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims guest cluster `ci`; when another request holds it, returns
    /// what fires once that claim ends (then try again).
    pub fn claim(&self, ci: u64) -> Result<BusyClaim<'_>, oneshot::Receiver<()>> {
        self.free(ci)?;
        self.lock().insert(ci, Vec::new());
        Ok(BusyClaim { busy: self, ci })
    }

    /// Ok when no request claims guest cluster `ci`; else what fires once
    /// the claim ends.
    pub fn free(&self, ci: u64) -> Result<(), oneshot::Receiver<()>> {
        match self.lock().get_mut(&ci) {
            Some(waiters) => {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Err(rx)
            }
            None => Ok(()),
        }
    }
}

/// A claim on one guest cluster; other writes to it wait until it drops.
pub struct BusyClaim<'a> {
    busy: &'a Busy,
    ci: u64,
}

impl Drop for BusyClaim<'_> {
    fn drop(&mut self) {
        // Waking a waiter only makes it look again.
        for w in self.busy.lock().remove(&self.ci).unwrap_or_default() {
            let _ = w.send(());
        }
    }
}

/// Host clusters that were allocated (refcount 1) for a request that went
/// away before anything referred to them. The next holder of the metadata
/// lock frees them.
#[derive(Default)]
pub struct Orphans(Mutex<Vec<u64>>);

impl Orphans {
    fn lock(&self) -> MutexGuard<'_, Vec<u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next orphan, if any, left in the list until it is freed.
    pub fn peek(&self) -> Option<u64> {
        self.lock().last().copied()
    }

    /// Removes an orphan that has been freed.
    pub fn freed(&self, cluster: u64) {
        let mut l = self.lock();
        if let Some(i) = l.iter().rposition(|&c| c == cluster) {
            l.swap_remove(i);
        }
    }

    /// Puts a freshly allocated host cluster under a guard that orphans it
    /// unless it is kept.
    pub fn guard(&self, cluster: u64) -> Fresh<'_> {
        Fresh {
            orphans: self,
            cluster: Some(cluster),
        }
    }
}

/// A host cluster allocated for a request and not yet referred to by any
/// metadata.
pub struct Fresh<'a> {
    orphans: &'a Orphans,
    cluster: Option<u64>,
}

impl Fresh<'_> {
    /// Something on the image refers to the cluster now: it is no longer
    /// the request's to give back.
    pub fn keep(mut self) {
        self.cluster = None;
    }
}

impl Drop for Fresh<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.cluster.take() {
            self.orphans.lock().push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_claim_releases_its_cluster_and_wakes_waiters() {
        let busy = Busy::default();
        let claim = busy.claim(7).unwrap();
        let mut waiter = busy.claim(7).err().expect("cluster 7 is claimed");
        assert!(waiter.try_recv().unwrap().is_none());
        drop(claim);
        assert!(waiter.try_recv().unwrap().is_some(), "the waiter was woken");
        assert!(busy.claim(7).is_ok(), "cluster 7 is free again");
    }

    #[test]
    fn a_fresh_cluster_not_kept_is_orphaned() {
        let orphans = Orphans::default();
        orphans.guard(5).keep();
        assert_eq!(orphans.peek(), None);
        drop(orphans.guard(9));
        assert_eq!(orphans.peek(), Some(9));
        orphans.freed(9);
        assert_eq!(orphans.peek(), None);
    }
}
