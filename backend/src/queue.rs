//! What other threads see of one virtqueue: the eventfds that wake its
//! worker, and the ledger that drains, stops and resets wait on.
//!
//! The rules, in one place:
//! - The worker takes chains and publishes completions only while it holds
//!   its queue's ledger lock, and it reads the export's `paused` flag under
//!   that lock before each batch.
//! - A drain sets `paused` (SeqCst), then waits on each ledger until
//!   nothing is `running`. Taking the lock orders the drain after any batch
//!   in progress, and every later batch after the store, so a batch either
//!   counted its requests before the drain looked or saw `paused`.
//! - Every request carries the generation it was taken in. A stop that
//!   gives up, a device reset and a teardown bump the generation under the
//!   lock: a publication either finished before the bump, or sees it and
//!   drops its stale completions. Nothing taken before a bump reaches the
//!   used ring after it, so a ring the frontend re-initialises never sees
//!   a late completion.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vhost_user::{DirtyLog, QueueRegion};

/// One queue's shared state.
pub struct QueueState {
    /// Signalled by the queue's io_uring on completions.
    pub(crate) ring_event: EventFd,
    /// Makes the worker look at its virtqueue again: a drain ended, a pass
    /// used its budget, or a request was woken from another thread.
    pub(crate) wake: EventFd,
    /// Tells the worker to tear down (the frontend is gone).
    pub(crate) exit: EventFd,
    ledger: Mutex<Ledger>,
    changed: Condvar,
    /// The queue's part of the frontend's inflight region, if it gave one.
    inflight: Mutex<Option<QueueRegion>>,
    /// The connection's dirty log, shared by its queues.
    log: Arc<DirtyLog>,
}

/// Counts kept under the ledger lock.
#[derive(Debug, Default)]
pub struct Ledger {
    generation: u64,
    /// Requests started and not yet retired, of any generation: what a
    /// drain waits for.
    running: usize,
    /// Requests of this generation not yet on the used ring: what a stop
    /// waits for.
    owed: usize,
    /// Threads waiting on `changed`.
    waiters: usize,
    /// Requests completed since the frontend connected.
    completed: u64,
    /// The worker has torn down.
    gone: bool,
}

/// Why a wait gave up.
#[derive(Debug, thiserror::Error)]
#[error("queue {queue}: {what} after {timeout:?}")]
pub struct QueueTimeout {
    /// The queue.
    pub queue: usize,
    /// What was still going on.
    pub what: &'static str,
    /// How long it waited.
    pub timeout: Duration,
}

impl QueueState {
    /// A queue with fresh eventfds and a dirty log of its own.
    pub fn new() -> io::Result<QueueState> {
        Self::with_log(Arc::default())
    }

    /// A queue with fresh eventfds, logging into `log`.
    pub fn with_log(log: Arc<DirtyLog>) -> io::Result<QueueState> {
        Ok(QueueState {
            ring_event: EventFd::new(EFD_NONBLOCK)?,
            wake: EventFd::new(EFD_NONBLOCK)?,
            exit: EventFd::new(EFD_NONBLOCK)?,
            ledger: Mutex::new(Ledger::default()),
            changed: Condvar::new(),
            inflight: Mutex::new(None),
            log,
        })
    }

    /// The dirty log its writes to guest memory are marked in.
    pub fn log(&self) -> &Arc<DirtyLog> {
        &self.log
    }

    /// Records the queue's part of the inflight region (SET_INFLIGHT_FD).
    pub fn set_inflight(&self, region: Option<QueueRegion>) {
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = region;
    }

    /// The queue's part of the inflight region, if any.
    pub(crate) fn inflight(&self) -> Option<QueueRegion> {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The ledger, locked: the worker holds it while it takes or publishes.
    pub(crate) fn ledger(&self) -> LedgerGuard<'_> {
        LedgerGuard {
            state: self,
            l: self.ledger.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Requests completed since the frontend connected.
    pub fn completed(&self) -> u64 {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .completed
    }

    /// Waits until `done` holds of the ledger, or `timeout` passes.
    fn wait_for(
        &self,
        queue: usize,
        what: &'static str,
        timeout: Duration,
        done: impl Fn(&Ledger) -> bool,
    ) -> Result<(), QueueTimeout> {
        let deadline = Instant::now() + timeout;
        let mut l = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        l.waiters += 1;
        let res = loop {
            if done(&l) {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(QueueTimeout {
                    queue,
                    what,
                    timeout,
                });
            }
            l = self
                .changed
                .wait_timeout(l, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        l.waiters -= 1;
        res
    }

    /// Waits until no request is running (a drain; the caller has set
    /// `paused`).
    pub fn wait_idle(&self, queue: usize, timeout: Duration) -> Result<(), QueueTimeout> {
        self.wait_for(queue, "requests still running", timeout, |l| {
            l.running == 0 || l.gone
        })
    }

    /// Waits until every request of this generation is on the used ring
    /// (GET_VRING_BASE: the ring is stopped).
    pub fn wait_published(&self, queue: usize, timeout: Duration) -> Result<(), QueueTimeout> {
        self.wait_for(queue, "requests still in flight", timeout, |l| {
            l.owed == 0 || l.gone
        })
    }

    /// Starts a new generation: nothing taken before reaches the used ring
    /// from now on.
    pub fn bump_generation(&self) {
        let mut l = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        l.generation += 1;
        l.owed = 0;
        if l.waiters > 0 {
            self.changed.notify_all();
        }
    }
}

/// The queues of one connection's device.
pub struct Queues {
    queues: Vec<Arc<QueueState>>,
    log: Arc<DirtyLog>,
}

impl Queues {
    /// `n` queues with fresh eventfds, sharing one dirty log.
    pub fn new(n: usize) -> io::Result<Queues> {
        let log = Arc::new(DirtyLog::default());
        let queues = (0..n)
            .map(|_| QueueState::with_log(Arc::clone(&log)).map(Arc::new))
            .collect::<io::Result<_>>()?;
        Ok(Queues { queues, log })
    }

    /// Queue `i`.
    pub fn get(&self, i: usize) -> Option<&Arc<QueueState>> {
        self.queues.get(i)
    }

    /// The queues, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<QueueState>> {
        self.queues.iter()
    }

    /// The dirty log the queues share.
    pub fn log(&self) -> &DirtyLog {
        &self.log
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// True for a device without queues.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Waits until no queue has a request running (the caller has paused
    /// the export).
    pub fn wait_idle(&self, timeout: Duration) -> Result<(), QueueTimeout> {
        let deadline = Instant::now() + timeout;
        for (i, q) in self.queues.iter().enumerate() {
            q.wait_idle(i, deadline.saturating_duration_since(Instant::now()))?;
        }
        Ok(())
    }

    /// Makes every worker look at its virtqueue again.
    pub fn wake_all(&self) {
        for q in &self.queues {
            if let Err(e) = q.wake.write(1) {
                tracing::error!("cannot wake a queue worker: {e}");
            }
        }
    }

    /// Tells every worker to tear down and waits until they have.
    pub fn exit_all(&self, timeout: Duration) -> Result<(), QueueTimeout> {
        let deadline = Instant::now() + timeout;
        let mut res = Ok(());
        for q in &self.queues {
            q.bump_generation();
            if let Err(e) = q.exit.write(1) {
                tracing::error!("cannot signal a queue worker to exit: {e}");
            }
        }
        for (i, q) in self.queues.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = q.wait_for(i, "the worker has not torn down", left, |l| l.gone) {
                res = Err(e);
            }
        }
        res
    }

    /// Requests completed per queue since the frontend connected.
    pub fn completed(&self) -> Vec<u64> {
        self.queues.iter().map(|q| q.completed()).collect()
    }
}

/// The locked ledger.
pub(crate) struct LedgerGuard<'a> {
    state: &'a QueueState,
    l: MutexGuard<'a, Ledger>,
}

impl LedgerGuard<'_> {
    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.l.generation
    }

    /// Starts a new generation (the worker saw the ring change under it).
    pub fn bump(&mut self) {
        self.l.generation += 1;
        self.l.owed = 0;
        self.notify();
    }

    /// Counts `n` requests taken in the current generation.
    pub fn taken(&mut self, n: usize) {
        self.l.running += n;
        self.l.owed += n;
    }

    /// `n` requests were held on error: still owed to the guest, but not
    /// running, so a drain need not wait for them.
    pub fn park(&mut self, n: usize) {
        if n > 0 {
            self.l.running = self.l.running.saturating_sub(n);
            if self.l.running == 0 {
                self.notify();
            }
        }
    }

    /// `n` held requests run again.
    pub fn retried(&mut self, n: usize) {
        self.l.running += n;
    }

    /// Retires a finished request of generation `generation`; true when it
    /// may go on the used ring.
    pub fn retire(&mut self, generation: u64) -> bool {
        self.l.running = self.l.running.saturating_sub(1);
        let current = generation == self.l.generation;
        if current {
            self.l.owed = self.l.owed.saturating_sub(1);
            self.l.completed += 1;
        }
        if self.l.running == 0 || self.l.owed == 0 {
            self.notify();
        }
        current
    }

    /// The worker tore down: nothing runs any more.
    pub fn gone(&mut self) {
        self.l.running = 0;
        self.l.owed = 0;
        self.l.gone = true;
        self.notify();
    }

    fn notify(&self) {
        if self.l.waiters > 0 {
            self.state.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_makes_older_requests_unpublishable_but_still_running() {
        let q = QueueState::new().unwrap();
        let old = {
            let mut l = q.ledger();
            l.taken(2);
            l.generation()
        };
        q.bump_generation();
        q.wait_published(0, Duration::ZERO)
            .expect("nothing of the new generation is owed");
        assert!(
            q.wait_idle(0, Duration::ZERO).is_err(),
            "the old requests still run"
        );
        let mut l = q.ledger();
        assert!(!l.retire(old), "a stale completion is not published");
        assert!(!l.retire(old));
        drop(l);
        q.wait_idle(0, Duration::ZERO).unwrap();
    }

    #[test]
    fn a_waiter_wakes_when_the_last_request_retires() {
        let q = Arc::new(QueueState::new().unwrap());
        let g = {
            let mut l = q.ledger();
            l.taken(1);
            l.generation()
        };
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.wait_published(0, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(q.ledger().retire(g));
        t.join().unwrap().unwrap();
        assert_eq!(q.completed(), 1);
    }
}
