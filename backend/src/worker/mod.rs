//! A queue's worker: the executor, the io_uring and the requests in flight
//! of one virtqueue, all owned by that queue's thread.
//!
//! ```text
//!  event ─▶ handle ─▶ intake (take a batch ─▶ start ─▶ run ─▶ publish) ─▶ run ─▶ poll
//!  exit  ─▶ teardown: let requests finish briefly, cancel the rest, drop
//!           everything while the thread's locals are still alive
//! ```
//!
//! The worker lives in a thread-local so that vhost-user-backend's epoll
//! loop can hand it events, but it never dies with the thread: the device
//! sends an exit event first, and teardown happens inside `handle` while
//! the executor's and the reactor's thread-locals still exist.

mod access;
mod dispatch;
mod intake;
mod poll;

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_graph::LocalViews;
use strata_runtime::reactor::Reactor;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

pub(crate) use access::{LockedVring, VringLock};
use dispatch::{QueueCtx, Requests};
use poll::PollWindow;

use crate::export::Export;
use crate::queue::QueueState;
use crate::virtio::inflight::InFlight;
use crate::virtio::memory::MemHandle;
use crate::virtio::ring::Rings;

/// What woke the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The guest kicked the queue.
    Kick,
    /// The io_uring posted completions.
    Completions,
    /// Look at the virtqueue again (a drain ended, a pass used its budget,
    /// a request was woken from another thread).
    Wake,
    /// The frontend is gone: tear down.
    Exit,
}

/// What a queue's worker is handed: its queue, and what it serves.
pub(crate) struct QueueRef<'a> {
    pub export: &'a Arc<Export>,
    pub state: &'a Arc<QueueState>,
    pub mem: &'a GuestMemoryAtomic<GuestMemoryMmap<()>>,
    /// Bumped after every change of `mem`: a cheap look for a change.
    pub map_version: &'a Arc<AtomicU64>,
    pub queue: usize,
}

/// How long a worker that is told to exit lets its requests finish before
/// it cancels them.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a worker whose I/O could not be set up tries again.
const SETUP_RETRY: Duration = Duration::from_secs(1);

enum Slot {
    Empty,
    Running(Box<Worker>),
    /// Torn down: events that arrive before the thread ends are ignored.
    Gone,
}

thread_local! {
    static WORKER: RefCell<Slot> = const { RefCell::new(Slot::Empty) };
}

/// How a worker sets up its I/O.
pub(crate) type Setup = fn(&QueueRef<'_>) -> io::Result<Io>;

/// Handles one event on the worker thread of `q`.
pub(crate) fn handle<V: VringLock>(q: QueueRef<'_>, event: Event, vring: &V) {
    handle_with(q, event, vring, setup_io);
}

/// [`handle`], with the worker's I/O set up by `setup` when it starts.
pub(crate) fn handle_with<V: VringLock>(q: QueueRef<'_>, event: Event, vring: &V, setup: Setup) {
    let cell = WORKER.with(|cell| {
        let mut slot = cell.borrow_mut();
        match (&*slot, event) {
            (Slot::Gone, _) => None,
            (Slot::Empty, Event::Exit) => {
                *slot = Slot::Gone;
                q.state.ledger().gone();
                None
            }
            (Slot::Running(_), Event::Exit) => match std::mem::replace(&mut *slot, Slot::Gone) {
                Slot::Running(w) => Some(Err(w)),
                _ => unreachable!("matched above"),
            },
            (Slot::Empty, _) => {
                *slot = Slot::Running(Box::new(Worker::new(&q, setup)));
                Some(Ok(()))
            }
            (Slot::Running(_), _) => Some(Ok(())),
        }
    });
    match cell {
        None => {}
        // Outside the borrow: teardown runs request code.
        Some(Err(worker)) => worker.teardown(),
        Some(Ok(())) => WORKER.with(|cell| {
            if let Slot::Running(w) = &mut *cell.borrow_mut() {
                w.on_event(event, vring);
            }
        }),
    }
}

/// A worker's means of doing I/O.
pub(crate) struct Io {
    reactor: Rc<Reactor>,
    executor: Box<dyn Requests>,
}

/// Sets up the thread's io_uring and executor for queue `q`.
pub(crate) fn setup_io(q: &QueueRef<'_>) -> io::Result<Io> {
    let reactor = Reactor::current()?;
    reactor.register_eventfd(q.state.ring_event.as_raw_fd())?;
    // Requests woken from other threads (a lock another queue held) poke
    // this worker through its wake eventfd.
    let state = Arc::clone(q.state);
    let executor = dispatch::executor(move || {
        let _ = state.wake.write(1);
    });
    Ok(Io { reactor, executor })
}

pub(crate) struct Worker {
    ctx: Rc<QueueCtx>,
    /// The thread's I/O, or why it could not be set up and when that was
    /// last tried. Without it, requests fail with IOERR.
    io: Result<Io, (io::Error, Instant)>,
    setup: Setup,
    mem_map: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    map_version: Arc<AtomicU64>,
    views: LocalViews,
    mem: Option<MemHandle>,
    /// The `map_version` `mem` was taken at.
    mem_version: u64,
    /// The rings, mapped for the fast path.
    rings: Option<Rc<Rings>>,
    /// Heads in flight in the current generation.
    heads: InFlight,
    /// What the ring looked like when this worker last took from it: a
    /// frontend that moved or rewound it (SET_VRING_ADDR, SET_VRING_BASE)
    /// starts a new generation.
    seen: Option<Seen>,
    /// Reused buffer for publishing completions.
    publishing: Vec<dispatch::Completion>,
    poll: PollWindow,
    /// The export's resume count when this worker last retried what it
    /// held.
    resumes_seen: u64,
    /// The queue's part of the frontend's inflight region, while it gave
    /// one: every head taken is marked in it before it starts.
    tracked: Option<Tracked>,
    /// The ring was (re)set up: before taking from it, recover what the
    /// inflight region says is still in flight.
    recover: bool,
}

/// A queue's inflight region, and the counter of the next head taken.
pub(crate) struct Tracked {
    region: crate::vhost_user::QueueRegion,
    counter: u64,
}

/// The ring as the worker last left it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
}

impl Worker {
    fn new(q: &QueueRef<'_>, setup: Setup) -> Worker {
        let io = setup(q).map_err(|e| {
            tracing::error!(
                "queue {}: cannot set up its I/O ({e}); its requests fail until it can",
                q.queue
            );
            (e, Instant::now())
        });
        Worker {
            ctx: Rc::new(QueueCtx::new(
                Arc::clone(q.export),
                Arc::clone(q.state),
                q.queue,
            )),
            io,
            setup,
            mem_map: q.mem.clone(),
            map_version: Arc::clone(q.map_version),
            views: q.export.graph().local_views(),
            mem: None,
            mem_version: 0,
            rings: None,
            heads: InFlight::default(),
            seen: None,
            publishing: Vec::new(),
            poll: PollWindow::new(q.export.options().poll_max_ns),
            resumes_seen: q.export.error_hold().resumes(),
            tracked: None,
            recover: true,
        }
    }

    fn on_event<V: VringLock>(&mut self, event: Event, vring: &V) {
        self.poll.woke();
        let state = Arc::clone(&self.ctx.state);
        match event {
            Event::Completions => {
                // Reset the eventfd; a racing completion re-signals it.
                let _ = state.ring_event.read();
                if let Ok(io) = &self.io {
                    io.reactor.reap();
                }
            }
            Event::Wake => {
                let _ = state.wake.read();
                self.intake(vring);
            }
            Event::Kick => {
                self.retry_setup();
                self.intake(vring);
            }
            Event::Exit => unreachable!("handled by teardown"),
        }
        self.run(vring);
        self.poll_for_work(vring);
    }

    /// Tries again to set up I/O that failed, at most every SETUP_RETRY.
    fn retry_setup(&mut self) {
        let Err((_, at)) = &self.io else { return };
        if at.elapsed() < SETUP_RETRY {
            return;
        }
        let q = QueueRef {
            export: &self.ctx.export,
            state: &self.ctx.state,
            mem: &self.mem_map,
            map_version: &self.map_version,
            queue: self.ctx.queue,
        };
        let io = (self.setup)(&q);
        self.io = match io {
            Ok(io) => {
                tracing::info!("queue {}: its I/O is set up now", self.ctx.queue);
                Ok(io)
            }
            Err(e) => Err((e, Instant::now())),
        };
    }

    /// A handle on the current guest memory, reusing the last one if the
    /// map has not changed.
    fn memory(&mut self) -> MemHandle {
        let version = self.map_version.load(Ordering::Acquire);
        if let Some(m) = self.mem.as_ref().filter(|_| version == self.mem_version) {
            return m.clone();
        }
        // The version is read before the map: a change after this bumps it
        // again, and the next look takes the map again.
        let current = self.mem_map.memory();
        self.mem_version = version;
        match &self.mem {
            Some(m) if m.is_current(&current) => m.clone(),
            _ => self
                .mem
                .insert(MemHandle::new(current.into_inner()))
                .clone(),
        }
    }

    /// True when the frontend changed the memory map since the last
    /// [`Worker::memory`].
    fn map_changed(&self) -> bool {
        self.map_version.load(Ordering::Acquire) != self.mem_version
    }

    /// Runs requests until all wait on I/O, submits their I/O, and repeats
    /// while the kernel completes some inline.
    fn run_stalled(&self) {
        let Ok(io) = &self.io else { return };
        loop {
            io.executor.run_until_stalled();
            if let Err(e) = io.reactor.submit() {
                self.ctx.warn(format_args!("io_uring submit failed: {e}"));
            }
            if io.reactor.reap() == 0 {
                break;
            }
        }
    }

    /// Runs what can run, then publishes.
    fn run<V: VringLock>(&mut self, vring: &V) {
        self.run_stalled();
        if !self.ctx.done.borrow().is_empty() || self.ctx.parked.get() > 0 {
            self.publish(vring);
        }
    }

    /// True while I/O (or offloaded work) is in flight.
    fn busy(&self) -> bool {
        match &self.io {
            Ok(io) => io.reactor.in_flight() > 0 || strata_runtime::offload::pending() > 0,
            Err(_) => false,
        }
    }

    /// Spins for new requests and completions for the poll window after
    /// the last work, handling what turns up, then lets the thread sleep.
    fn poll_for_work<V: VringLock>(&mut self, vring: &V) {
        let mut last_work = Instant::now();
        if !self.poll.window(self.busy()).is_zero() && self.io.is_ok() {
            loop {
                if self.ctx.export.paused() {
                    break;
                }
                // Only progress counts as work: an avail index that moved
                // but yields no chain (a corrupt ring) must not keep the
                // thread spinning.
                let taken = if self.avail(vring) {
                    self.intake(vring)
                } else {
                    0
                };
                let Ok(io) = &self.io else { break };
                let reaped = io.reactor.reap();
                if taken > 0 || reaped > 0 || io.executor.woken_remotely() {
                    self.run(vring);
                    last_work = Instant::now();
                    continue;
                }
                if last_work.elapsed() >= self.poll.window(self.busy()) {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        self.poll.slept_at = Some((last_work, self.busy()));
    }

    /// Cheaply: did the driver make entries available? Through the mapped
    /// rings this takes no lock: it compares the avail index with where
    /// this worker last left the ring (a frontend that moved it only costs
    /// one look that finds nothing).
    fn avail<V: VringLock>(&mut self, vring: &V) -> bool {
        let mem = self.memory();
        if let (Some(r), Some(seen)) = (&self.rings, self.seen) {
            if r.memory().same(&mem) {
                return r.avail_idx() != seen.next_avail;
            }
        }
        let mut guard = vring.lock();
        let enabled = guard.enabled();
        let q = guard.queue();
        q.ready()
            && enabled
            && match self.rings.as_ref().filter(|r| r.matches(q, &mem)) {
                Some(r) => r.avail_idx() != q.next_avail(),
                None => q
                    .avail_idx(&*mem, Ordering::Acquire)
                    .is_ok_and(|i| i.0 != q.next_avail()),
            }
    }

    /// Tears the worker down on its own thread: requests get a little
    /// while to finish (nothing is published: the device bumped the
    /// generation), the rest are cancelled, and everything is dropped while
    /// the thread's locals are alive.
    fn teardown(mut self) {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        loop {
            self.run_stalled();
            let Ok(io) = &self.io else { break };
            let left = deadline.saturating_duration_since(Instant::now());
            if io.executor.is_empty() || left.is_zero() {
                break;
            }
            if let Err(e) = io.reactor.wait_for(left.min(Duration::from_millis(50))) {
                tracing::warn!("queue {}: io_uring wait failed: {e}", self.ctx.queue);
                std::thread::sleep(Duration::from_millis(1));
            }
            io.reactor.reap();
        }
        let left = self.heads.oldest_first();
        if !left.is_empty() {
            tracing::warn!(
                "queue {}: the frontend left with {} requests in flight (heads {:?}); \
                 none of them will complete",
                self.ctx.queue,
                left.len(),
                left
            );
        }
        // Dropping the executor cancels what is still running; each
        // cancelled io_uring operation waits for the kernel to let go of
        // its buffers, so guest memory can be unmapped after this.
        if let Ok(Io { reactor, executor }) = std::mem::replace(
            &mut self.io,
            Err((io::Error::other("torn down"), Instant::now())),
        ) {
            drop(executor);
            reactor.wait_idle();
        }
        self.ctx.done.borrow_mut().clear();
        let held = self.ctx.held.borrow_mut().drain(..).count();
        self.ctx.export.error_hold().released(held);
        self.ctx.state.ledger().gone();
    }
}

#[cfg(test)]
mod tests;
