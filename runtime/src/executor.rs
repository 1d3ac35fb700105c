//! A per-thread executor for request futures, all of one type.
//!
//! Tasks are polled only on the thread that owns the executor. A wake
//! from that thread (an io_uring completion reaped there) queues the task
//! in a thread-local list, with no lock; a wake from another thread (a
//! lock released by another queue's request) goes through a mutex and
//! calls `notify`, which pokes the owner's event loop.
//!
//! Slots are reused: a finished task leaves its boxed storage and its
//! waker behind for the next one, so steady state allocates nothing. A
//! stale wake of a reused slot polls its new task once for nothing, which
//! futures allow.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The executor owned by this thread (0: none).
    static OWNED: Cell<usize> = const { Cell::new(0) };
    /// Tasks of that executor woken on this thread.
    static LOCAL_READY: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

struct ReadyQueue {
    executor: usize,
    /// Tasks woken from other threads.
    remote: Mutex<Vec<usize>>,
    /// Set after a push to `remote`, so the owner takes the lock only when
    /// there is something behind it.
    woken: AtomicBool,
    notify: Box<dyn Fn() + Send + Sync>,
}

struct TaskWaker {
    task: usize,
    ready: Arc<ReadyQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if OWNED.get() == self.ready.executor {
            // While the thread exits its ready list may already be gone; so
            // is the executor then, and the wake has nothing left to do.
            let _ = LOCAL_READY.try_with(|r| r.borrow_mut().push(self.task));
        } else {
            self.ready
                .remote
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.task);
            // One notification per batch: while the flag is still up, the
            // owner has yet to take the list, and the wake that raised it
            // already notified. A burst of completions from another
            // thread then costs one eventfd write, not one each.
            if !self.ready.woken.swap(true, Ordering::AcqRel) {
                (self.ready.notify)();
            }
        }
    }
}

struct Slot<F> {
    /// The task, or `None` while the slot is free (or being polled).
    fut: Pin<Box<Option<F>>>,
    waker: Waker,
    busy: bool,
}

/// An executor of futures of type `F`, owned by the thread that creates it.
pub struct Executor<F> {
    slots: RefCell<Vec<Slot<F>>>,
    free: RefCell<Vec<usize>>,
    ready: Arc<ReadyQueue>,
    polling: RefCell<Vec<usize>>,
    live: Cell<usize>,
    /// An empty box that stands in a slot while its task is polled.
    spare: RefCell<Option<Pin<Box<Option<F>>>>>,
}

impl<F: Future<Output = ()>> Executor<F> {
    /// An executor for this thread; `notify` is called when a task is woken
    /// from another thread.
    pub fn new(notify: impl Fn() + Send + Sync + 'static) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        OWNED.set(id);
        let _ = LOCAL_READY.try_with(|r| r.borrow_mut().clear());
        Executor {
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            ready: Arc::new(ReadyQueue {
                executor: id,
                remote: Mutex::new(Vec::new()),
                woken: AtomicBool::new(false),
                notify: Box::new(notify),
            }),
            polling: RefCell::new(Vec::new()),
            live: Cell::new(0),
            spare: RefCell::new(None),
        }
    }

    /// Adds a task; it first runs at the next [`Executor::run_until_stalled`].
    pub fn spawn(&self, fut: F) {
        let mut slots = self.slots.borrow_mut();
        let id = match self.free.borrow_mut().pop() {
            Some(id) => {
                slots[id].fut.as_mut().set(Some(fut));
                slots[id].busy = true;
                id
            }
            None => {
                let id = slots.len();
                let waker = Waker::from(Arc::new(TaskWaker {
                    task: id,
                    ready: Arc::clone(&self.ready),
                }));
                slots.push(Slot {
                    fut: Box::pin(Some(fut)),
                    waker,
                    busy: true,
                });
                id
            }
        };
        self.live.set(self.live.get() + 1);
        let _ = LOCAL_READY.try_with(|r| r.borrow_mut().push(id));
    }

    /// True when a task was woken from another thread and has not been
    /// polled since: a cheap check for a thread that busy-polls.
    pub fn woken_remotely(&self) -> bool {
        self.ready.woken.load(Ordering::Relaxed)
    }

    /// Polls woken tasks until none is ready. Returns how many polls ran.
    pub fn run_until_stalled(&self) -> usize {
        let mut polls = 0;
        loop {
            let mut batch = self.polling.take();
            let _ = LOCAL_READY.try_with(|r| std::mem::swap(&mut *r.borrow_mut(), &mut batch));
            // The flag is set after the push, so seeing it means the lock
            // holds that task (or a later round will find it).
            if self.ready.woken.swap(false, Ordering::AcqRel) {
                batch.append(&mut self.ready.remote.lock().unwrap_or_else(|e| e.into_inner()));
            }
            if batch.is_empty() {
                *self.polling.borrow_mut() = batch;
                return polls;
            }
            for &id in &batch {
                // Take the task out so it can spawn or wake others freely.
                let taken = {
                    let mut slots = self.slots.borrow_mut();
                    match slots.get_mut(id) {
                        Some(s) if s.busy => {
                            s.busy = false;
                            let empty = self.spare.take().unwrap_or_else(|| Box::pin(None));
                            Some((std::mem::replace(&mut s.fut, empty), s.waker.clone()))
                        }
                        _ => None, // finished, or a duplicate wake in this batch
                    }
                };
                let Some((mut fut, waker)) = taken else {
                    continue;
                };
                polls += 1;
                let done = match fut.as_mut().as_pin_mut() {
                    Some(f) => f.poll(&mut Context::from_waker(&waker)).is_ready(),
                    None => true,
                };
                if done {
                    fut.as_mut().set(None);
                }
                let mut slots = self.slots.borrow_mut();
                let s = &mut slots[id];
                *self.spare.borrow_mut() = Some(std::mem::replace(&mut s.fut, fut));
                if done {
                    self.live.set(self.live.get() - 1);
                    self.free.borrow_mut().push(id);
                } else {
                    s.busy = true;
                }
            }
            batch.clear();
            *self.polling.borrow_mut() = batch;
        }
    }

    /// Tasks not finished yet.
    pub fn len(&self) -> usize {
        self.live.get()
    }

    /// True when no task is left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn runs_tasks_and_requeues_woken_ones() {
        let ex = Executor::new(|| {});
        let hits = Rc::new(Cell::new(0));
        for _ in 0..3 {
            let hits = hits.clone();
            ex.spawn(async move { hits.set(hits.get() + 1) });
        }
        assert_eq!(ex.run_until_stalled(), 3);
        assert_eq!(hits.get(), 3);
        assert!(ex.is_empty());
    }

    #[test]
    fn a_wake_from_another_thread_notifies() {
        let notified = Arc::new(AtomicBool::new(false));
        let n = notified.clone();
        let ex = Executor::new(move || n.store(true, Ordering::SeqCst));
        let (tx, rx) = futures::channel::oneshot::channel::<u32>();
        let got = Rc::new(Cell::new(0));
        let g = got.clone();
        ex.spawn(async move { g.set(rx.await.unwrap()) });
        ex.run_until_stalled();
        assert_eq!(got.get(), 0, "waiting");
        std::thread::spawn(move || tx.send(7).unwrap())
            .join()
            .unwrap();
        assert!(notified.load(Ordering::SeqCst), "the owner was poked");
        ex.run_until_stalled();
        assert_eq!(got.get(), 7);
        assert!(ex.is_empty());
    }

    #[test]
    fn a_wake_on_the_owner_thread_does_not_notify() {
        let notified = Arc::new(AtomicBool::new(false));
        let n = notified.clone();
        let ex = Executor::new(move || n.store(true, Ordering::SeqCst));
        let (tx, rx) = futures::channel::oneshot::channel::<u32>();
        ex.spawn(async move {
            rx.await.unwrap();
        });
        ex.run_until_stalled();
        tx.send(1).unwrap();
        assert!(!notified.load(Ordering::SeqCst));
        ex.run_until_stalled();
        assert!(ex.is_empty());
    }

    #[test]
    fn a_burst_of_remote_wakes_notifies_once_until_the_owner_runs() {
        let notified = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = notified.clone();
        let ex = Executor::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
        });
        let got = Rc::new(Cell::new(0));
        let mut senders = Vec::new();
        for _ in 0..5 {
            let (tx, rx) = futures::channel::oneshot::channel::<u32>();
            let g = got.clone();
            ex.spawn(async move {
                let v = rx.await.unwrap();
                g.set(g.get() + v);
            });
            senders.push(tx);
        }
        ex.run_until_stalled();
        let last = senders.pop().unwrap();
        std::thread::spawn(move || senders.into_iter().for_each(|tx| tx.send(1).unwrap()))
            .join()
            .unwrap();
        assert_eq!(notified.load(Ordering::SeqCst), 1, "one poke for the burst");
        ex.run_until_stalled();
        assert_eq!(got.get(), 4);
        // Once the owner took the list, the next wake pokes again.
        std::thread::spawn(move || last.send(1).unwrap())
            .join()
            .unwrap();
        assert_eq!(notified.load(Ordering::SeqCst), 2);
        ex.run_until_stalled();
        assert_eq!(got.get(), 5);
        assert!(ex.is_empty());
    }
}
