//! A per-thread executor for request futures.
//!
//! Tasks are polled only on the thread that owns the executor. A wake
//! from that thread (an io_uring completion reaped there) just queues the
//! task; a wake from another thread (a lock released by another queue's
//! request) also calls `notify`, which pokes the owner's event loop.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

use slab::Slab;

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The executor owned by this thread (0: none).
    static OWNED: Cell<usize> = const { Cell::new(0) };
}

struct ReadyQueue {
    executor: usize,
    ids: Mutex<Vec<usize>>,
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
        self.ready
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.task);
        if OWNED.get() != self.ready.executor {
            (self.ready.notify)();
        }
    }
}

struct Task {
    /// Taken out while the task is being polled.
    fut: Option<Pin<Box<dyn Future<Output = ()>>>>,
    waker: Waker,
}

/// An executor owned by the thread that creates it.
pub struct Executor {
    tasks: RefCell<Slab<Task>>,
    ready: Arc<ReadyQueue>,
    polling: RefCell<Vec<usize>>,
}

impl Executor {
    /// An executor for this thread; `notify` is called when a task is woken
    /// from another thread.
    pub fn new(notify: impl Fn() + Send + Sync + 'static) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        OWNED.set(id);
        Executor {
            tasks: RefCell::new(Slab::new()),
            ready: Arc::new(ReadyQueue {
                executor: id,
                ids: Mutex::new(Vec::new()),
                notify: Box::new(notify),
            }),
            polling: RefCell::new(Vec::new()),
        }
    }

    /// Adds a task; it first runs at the next [`Executor::run_until_stalled`].
    pub fn spawn(&self, fut: impl Future<Output = ()> + 'static) {
        let mut tasks = self.tasks.borrow_mut();
        let entry = tasks.vacant_entry();
        let task = entry.key();
        let waker = Waker::from(Arc::new(TaskWaker {
            task,
            ready: Arc::clone(&self.ready),
        }));
        entry.insert(Task {
            fut: Some(Box::pin(fut)),
            waker,
        });
        self.ready
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// Polls woken tasks until none is ready. Returns how many polls ran.
    pub fn run_until_stalled(&self) -> usize {
        let mut polls = 0;
        loop {
            let mut batch = self.polling.take();
            std::mem::swap(
                &mut *self.ready.ids.lock().unwrap_or_else(|e| e.into_inner()),
                &mut batch,
            );
            if batch.is_empty() {
                *self.polling.borrow_mut() = batch;
                return polls;
            }
            for &id in &batch {
                // Take the future out so it can spawn or wake others freely.
                let taken = self
                    .tasks
                    .borrow_mut()
                    .get_mut(id)
                    .and_then(|t| Some((t.fut.take()?, t.waker.clone())));
                let Some((mut fut, waker)) = taken else {
                    continue; // finished already: a stale wake
                };
                polls += 1;
                let done = fut
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_ready();
                let mut tasks = self.tasks.borrow_mut();
                if done {
                    tasks.remove(id);
                } else {
                    tasks[id].fut = Some(fut);
                }
            }
            batch.clear();
            *self.polling.borrow_mut() = batch;
        }
    }

    /// Tasks not finished yet.
    pub fn len(&self) -> usize {
        self.tasks.borrow().len()
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
}
