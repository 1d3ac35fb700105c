//! A queue's worker: the executor, the io_uring and the requests in flight
//! of one virtqueue, all owned by that queue's thread.
//!
//! One `handle_event` call is one batch: take every available chain, run
//! the request futures until they wait on I/O, submit the ring once, then
//! put everything that finished on the used ring and notify once.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_graph::{BlockError, GraphView, LocalView, LocalViews};
use strata_runtime::executor::Executor;
use strata_runtime::reactor::Reactor;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;

use crate::device::{DeviceInner, Vring};
use crate::export::{Export, SERIAL_LEN};
use crate::ratelimit::RateLimit;
use crate::virtio::inflight::InFlight;
use crate::virtio::request::{self, GuestMemory, Limits, MemHandle, Request, RequestKind};
use crate::virtio::ring::Rings;

/// What woke the worker.
pub(crate) enum Event {
    /// The guest kicked the queue.
    Kick,
    /// The io_uring posted completions.
    Completions,
    /// A drain ended: look at the virtqueue again.
    Wake,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Handles one event on the worker thread of `queue`.
pub(crate) fn handle(dev: &Arc<DeviceInner>, queue: usize, event: Event, vring: &Vring) {
    WORKER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match Worker::new(dev, queue) {
                Ok(w) => *slot = Some(w),
                Err(e) => {
                    tracing::error!("queue {queue}: cannot set up io_uring: {e}");
                    return;
                }
            }
        }
        let Some(w) = slot.as_mut() else { return };
        w.poll.woke();
        match event {
            Event::Kick => {
                w.take_requests(vring);
            }
            Event::Completions => w.on_completions(),
            Event::Wake => {
                let _ = dev.queues[queue].wake.read();
                w.take_requests(vring);
            }
        }
        w.run(vring);
        w.poll_for_work(vring);
    });
}

/// The adaptive busy-poll windows of one queue, after QEMU's: after work,
/// the thread spins this long for more before it sleeps. A sleep that
/// ended soon (before `max`) grows the window; a long one closes it, so an
/// idle queue costs no CPU.
///
/// There are two windows, because a sleep means different things with and
/// without I/O in flight. With none, the thread waits for the guest, whose
/// next kick usually comes within microseconds of a completion. With some,
/// it waits for the disk too, which may take far longer than `max`: that
/// closes the I/O window (spinning through a disk wait is wasted), but says
/// nothing about how soon the guest answers.
struct PollWindow {
    max: Duration,
    /// Used while nothing is in flight: waiting for the guest.
    guest: Duration,
    /// Used while I/O is in flight.
    io: Duration,
    /// When the thread last went to sleep, and whether I/O was in flight.
    slept_at: Option<(Instant, bool)>,
}

impl PollWindow {
    /// A window starts this small and doubles.
    const START: Duration = Duration::from_micros(4);

    fn new(max_ns: u64) -> Self {
        PollWindow {
            max: Duration::from_nanos(max_ns),
            guest: Duration::ZERO,
            io: Duration::ZERO,
            slept_at: None,
        }
    }

    /// How long to spin, given whether I/O is in flight.
    fn window(&self, io_in_flight: bool) -> Duration {
        if io_in_flight {
            self.io
        } else {
            self.guest
        }
    }

    /// An event woke the thread: adapt the window it slept under to how
    /// long it slept.
    fn woke(&mut self) {
        let Some((at, io_in_flight)) = self.slept_at.take() else {
            return;
        };
        let max = self.max;
        let window = if io_in_flight {
            &mut self.io
        } else {
            &mut self.guest
        };
        if at.elapsed() > max {
            *window = Duration::ZERO;
        } else if *window < max {
            *window = (*window * 2).clamp(Self::START.min(max), max);
        }
    }
}

/// The queue's executor, for request futures. Behind a trait because the
/// future's type (that of `execute`) has no name to store it by.
trait Requests {
    fn spawn(&self, ctx: Rc<QueueCtx>, view: LocalView, req: Request);
    fn run_until_stalled(&self) -> usize;
    fn woken_remotely(&self) -> bool;
}

struct RequestExecutor<F, G> {
    executor: Executor<F>,
    make: G,
}

impl<F, G> Requests for RequestExecutor<F, G>
where
    F: std::future::Future<Output = ()>,
    G: Fn(Rc<QueueCtx>, LocalView, Request) -> F,
{
    fn spawn(&self, ctx: Rc<QueueCtx>, view: LocalView, req: Request) {
        self.executor.spawn((self.make)(ctx, view, req));
    }

    fn run_until_stalled(&self) -> usize {
        self.executor.run_until_stalled()
    }

    fn woken_remotely(&self) -> bool {
        self.executor.woken_remotely()
    }
}

/// Chains started between two publications of what finished. Small, so
/// the guest sees its first completions while later chains are still
/// being parsed and refills the ring while this thread works: a queue that
/// never runs dry never sleeps, and on a virtual machine a wake-up costs
/// more than the rest of a request. (16 here halved IOPS on the null
/// target at QD32; see BENCHMARKS.md.) Publishing is a store and a fence;
/// the event index keeps notifications to one per guest wait.
const PUBLISH_BATCH: u16 = 2;

/// Chains started between two io_uring submissions (one system call).
const SUBMIT_BATCH: usize = 16;

/// A vring's state, as the worker holds it while it works on the queue.
type VringState =
    vhost_user_backend::VringState<vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>>;

/// State the request futures share with their worker.
struct QueueCtx {
    dev: Arc<DeviceInner>,
    queue: usize,
    /// Finished chains waiting for the used ring: (head, used length).
    done: RefCell<Vec<(u16, u32)>>,
    inflight: RefCell<InFlight>,
    errors: RefCell<RateLimit>,
}

impl QueueCtx {
    fn export(&self) -> &Export {
        &self.dev.export
    }

    fn finish(&self, head: u16, used: u32) {
        self.inflight.borrow_mut().finish(head);
        self.done.borrow_mut().push((head, used));
    }

    fn warn(&self, what: std::fmt::Arguments<'_>) {
        if let Some(dropped) = self.errors.borrow_mut().check() {
            let q = self.queue;
            if dropped > 0 {
                tracing::warn!("queue {q}: {what} ({dropped} similar messages suppressed)");
            } else {
                tracing::warn!("queue {q}: {what}");
            }
        }
    }
}

struct Worker {
    ctx: Rc<QueueCtx>,
    reactor: Rc<Reactor>,
    executor: Box<dyn Requests>,
    views: LocalViews,
    mem: Option<MemHandle>,
    /// Reused buffer for publishing completions.
    publishing: Vec<(u16, u32)>,
    poll: PollWindow,
    /// The rings, mapped for the fast path.
    rings: Option<Rc<Rings>>,
}

impl Worker {
    fn new(dev: &Arc<DeviceInner>, queue: usize) -> std::io::Result<Worker> {
        let reactor = Reactor::current()?;
        reactor.register_eventfd(dev.queues[queue].ring_event.as_raw_fd())?;
        // Requests woken from other threads (a lock another queue held)
        // poke this worker through its wake eventfd.
        let poke = Arc::clone(dev);
        let executor = Box::new(RequestExecutor {
            executor: Executor::new(move || {
                let _ = poke.queues[queue].wake.write(1);
            }),
            make: execute,
        });
        Ok(Worker {
            ctx: Rc::new(QueueCtx {
                dev: Arc::clone(dev),
                queue,
                done: RefCell::new(Vec::new()),
                inflight: RefCell::new(InFlight::default()),
                errors: RefCell::new(RateLimit::new(10, Duration::from_secs(5))),
            }),
            reactor,
            executor,
            views: dev.export.graph().local_views(),
            mem: None,
            publishing: Vec::new(),
            poll: PollWindow::new(dev.export.options().poll_max_ns),
            rings: None,
        })
    }

    /// A handle on the current guest memory, reusing the last one if the
    /// map has not changed.
    fn memory(&mut self) -> MemHandle {
        let current = self.ctx.dev.mem.memory().into_inner();
        match &self.mem {
            Some(m) if m.is(&current) => m.clone(),
            _ => self.mem.insert(MemHandle::new(current)).clone(),
        }
    }

    /// Starts the available chains; returns how many it took.
    fn take_requests(&mut self, vring: &Vring) -> usize {
        // A drain sets `paused` and then waits for `busy` to clear: with
        // both SeqCst, either we see the pause or the drain sees us busy.
        let ctx = Rc::clone(&self.ctx);
        let shared = &ctx.dev.queues[ctx.queue];
        shared.busy.store(true, Ordering::SeqCst);
        let taken = if ctx.export().paused() {
            0
        } else {
            self.take_available(vring)
        };
        shared.busy.store(false, Ordering::SeqCst);
        taken
    }

    /// The queue's rings mapped for the fast path, if they can be.
    fn rings(&mut self, queue: &virtio_queue::Queue, mem: &MemHandle) -> Option<Rc<Rings>> {
        if !self.rings.as_ref().is_some_and(|r| r.matches(queue, mem)) {
            self.rings = Rings::new(queue, mem).map(Rc::new);
        }
        self.rings.clone()
    }

    fn take_available(&mut self, vring: &Vring) -> usize {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return 0;
        }
        let mem = self.memory();
        let limits = self.ctx.export().limits();
        let view = self.views.current();
        if let Some(rings) = self.rings(state.get_queue(), &mem) {
            return self.take_mapped(&mut state, &rings, &mem, &limits, &view);
        }
        let mut unsubmitted = 0;
        let mut total = 0;
        loop {
            if let Err(e) = state.disable_notification() {
                self.ctx
                    .warn(format_args!("cannot disable notifications: {e}"));
            }
            let mut taken = 0;
            loop {
                let mut started = 0;
                match state.get_queue_mut().iter(&*mem) {
                    Ok(chains) => {
                        for chain in chains.take(PUBLISH_BATCH.into()) {
                            started += 1;
                            self.start(chain, &mem, &limits, &view);
                        }
                    }
                    Err(e) => self.ctx.warn(format_args!("bad avail ring: {e}")),
                }
                if started == 0 {
                    break;
                }
                taken += started;
                self.advance(started, &mut unsubmitted);
                self.publish_to(&mut state);
            }
            total += taken;
            // Re-enabling can reveal chains that raced in; a ring that keeps
            // claiming more while yielding none is broken, so stop there.
            match state.enable_notification() {
                Ok(true) if taken > 0 => continue,
                Ok(_) => break,
                Err(e) => {
                    self.ctx
                        .warn(format_args!("cannot enable notifications: {e}"));
                    break;
                }
            }
        }
        total
    }

    /// The fast path of `take_available`, through the mapped rings.
    /// Returns how many chains it took.
    fn take_mapped(
        &mut self,
        state: &mut VringState,
        rings: &Rings,
        mem: &MemHandle,
        limits: &Limits,
        view: &LocalView,
    ) -> usize {
        let mut unsubmitted = 0;
        let mut taken = 0;
        loop {
            let mut next = state.get_queue().next_avail();
            let avail = rings.avail_idx();
            let pending = avail.wrapping_sub(next);
            if pending > rings.size() {
                self.ctx.warn(format_args!(
                    "bad avail ring: index {avail} is {pending} entries ahead of {next}"
                ));
                return taken;
            }
            if pending == 0 {
                // Ask for a kick, and look once more for what raced in.
                if rings.rearm(next) {
                    continue;
                }
                return taken;
            }
            let n = pending.min(PUBLISH_BATCH);
            for _ in 0..n {
                let head = rings.avail_head(next);
                next = next.wrapping_add(1);
                if self.begin(head) {
                    let parsed = request::parse_descs(head, rings.chain(head), mem, limits);
                    self.launch(parsed, view);
                }
            }
            state.get_queue_mut().set_next_avail(next);
            taken += usize::from(n);
            self.advance(n.into(), &mut unsubmitted);
            self.publish_mapped(state, rings);
        }
    }

    /// Runs the futures of `started` new chains until they wait, and submits
    /// io_uring once `SUBMIT_BATCH` chains have gathered. I/O queued but not
    /// yet submitted is submitted by the caller's `run` once the ring is
    /// empty.
    fn advance(&mut self, started: usize, unsubmitted: &mut usize) {
        *unsubmitted += started;
        if *unsubmitted >= SUBMIT_BATCH {
            self.run_stalled();
            *unsubmitted = 0;
        } else {
            self.executor.run_until_stalled();
        }
    }

    /// Puts finished chains on the mapped used ring, publishes the index
    /// once, and notifies the guest if it asked.
    fn publish_mapped(&mut self, state: &mut VringState, rings: &Rings) {
        std::mem::swap(&mut *self.ctx.done.borrow_mut(), &mut self.publishing);
        if self.publishing.is_empty() {
            return;
        }
        let old = state.get_queue().next_used();
        let mut next = old;
        for &(head, len) in &self.publishing {
            if head >= rings.size() {
                self.ctx
                    .warn(format_args!("cannot complete chain {head}: out of range"));
                continue;
            }
            rings.put_used(next, head, len);
            next = next.wrapping_add(1);
        }
        state.get_queue_mut().set_next_used(next);
        if rings.publish_used(old, next) {
            if let Err(e) = state.signal_used_queue() {
                self.ctx.warn(format_args!("cannot notify the guest: {e}"));
            }
        }
        self.finished_published();
    }

    /// Counts a chain as in flight; false when its head already is.
    fn begin(&mut self, head: u16) -> bool {
        if !self.ctx.inflight.borrow_mut().start(head) {
            // Completing it would complete the first one too: drop it.
            self.ctx
                .warn(format_args!("chain {head} is already in flight; ignored"));
            return false;
        }
        self.ctx.dev.queues[self.ctx.queue]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    fn start(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &MemHandle,
        limits: &Limits,
        view: &LocalView,
    ) {
        let head = chain.head_index();
        if self.begin(head) {
            let parsed = request::parse(chain, mem, limits);
            self.launch(parsed, view);
        }
    }

    /// Runs a parsed request, or completes a rejected one.
    fn launch(&mut self, parsed: Result<Request, request::Rejected>, view: &LocalView) {
        match parsed {
            Ok(req) => {
                self.executor
                    .spawn(Rc::clone(&self.ctx), Rc::clone(view), req);
            }
            Err(rej) => {
                self.ctx.warn(format_args!("{rej:?}"));
                let used = rej.complete();
                self.ctx.finish(rej.head, used);
            }
        }
    }

    /// Spins for new requests and completions for the poll window after
    /// the last work, handling what turns up, then lets the thread sleep.
    fn poll_for_work(&mut self, vring: &Vring) {
        let mut last_work = Instant::now();
        // Offloaded jobs are I/O as far as polling is concerned: their
        // completion, not the guest, is what the thread waits for.
        let busy = |r: &Reactor| r.in_flight() > 0 || strata_runtime::offload::pending() > 0;
        if !self.poll.window(busy(&self.reactor)).is_zero() {
            let mem = self.memory();
            loop {
                if self.ctx.export().paused() {
                    break;
                }
                let avail = {
                    let state = vring.get_mut();
                    let q = state.get_queue();
                    q.ready()
                        && state.is_enabled()
                        && match self.rings.as_ref().filter(|r| r.matches(q, &mem)) {
                            Some(r) => r.avail_idx() != q.next_avail(),
                            None => q
                                .avail_idx(&*mem, Ordering::Acquire)
                                .is_ok_and(|i| i.0 != q.next_avail()),
                        }
                };
                // Only progress counts as work: an avail index that moved
                // but yields no chain (a corrupt ring) must not keep the
                // thread spinning.
                let taken = if avail { self.take_requests(vring) } else { 0 };
                let reaped = self.reactor.reap();
                if taken > 0 || reaped > 0 || self.executor.woken_remotely() {
                    self.run(vring);
                    last_work = Instant::now();
                    continue;
                }
                if last_work.elapsed() >= self.poll.window(busy(&self.reactor)) {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        self.poll.slept_at = Some((last_work, busy(&self.reactor)));
    }

    fn on_completions(&mut self) {
        // Reset the eventfd; a racing completion re-signals it.
        let _ = self.ctx.dev.queues[self.ctx.queue].ring_event.read();
        self.reactor.reap();
    }

    /// Runs requests until all wait on I/O, submits their I/O, and repeats
    /// while the kernel completes some inline.
    fn run_stalled(&mut self) {
        loop {
            self.executor.run_until_stalled();
            if let Err(e) = self.reactor.submit() {
                self.ctx.warn(format_args!("io_uring submit failed: {e}"));
            }
            if self.reactor.reap() == 0 {
                break;
            }
        }
    }

    /// Runs what can run, then publishes.
    fn run(&mut self, vring: &Vring) {
        self.run_stalled();
        if !self.ctx.done.borrow().is_empty() {
            self.publish_to(&mut vring.get_mut());
        }
    }

    /// Puts finished chains on the used ring and notifies the guest once.
    fn publish_to(&mut self, state: &mut VringState) {
        std::mem::swap(&mut *self.ctx.done.borrow_mut(), &mut self.publishing);
        if self.publishing.is_empty() {
            return;
        }
        {
            for &(head, len) in &self.publishing {
                if let Err(e) = state.add_used(head, len) {
                    self.ctx
                        .warn(format_args!("cannot complete chain {head}: {e}"));
                }
            }
            let notify = state.needs_notification().unwrap_or(true);
            if notify {
                if let Err(e) = state.signal_used_queue() {
                    self.ctx.warn(format_args!("cannot notify the guest: {e}"));
                }
            }
        }
        self.finished_published();
    }

    /// Accounts for the chains just published.
    fn finished_published(&mut self) {
        let n = self.publishing.len();
        let q = &self.ctx.dev.queues[self.ctx.queue];
        q.completed.fetch_add(n as u64, Ordering::Relaxed);
        // Release: GET_VRING_BASE reads the ring after seeing zero.
        q.in_flight.fetch_sub(n, Ordering::Release);
        self.publishing.clear();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The frontend is gone, but the kernel may still write into guest
        // memory for requests in flight: let it finish before unmapping.
        self.reactor.wait_idle();
        let left = self.ctx.inflight.borrow().oldest_first();
        if !left.is_empty() {
            tracing::warn!(
                "queue {}: {} requests were in flight at disconnect (heads {:?})",
                self.ctx.queue,
                left.len(),
                left
            );
        }
    }
}

/// How a request ended, with the used length: the bytes written into the
/// chain, status byte included.
enum Reply {
    Done(u32),
    Failed(BlockError, u32),
    Unsupported,
}

/// Runs one request to completion and records it as finished.
async fn execute(ctx: Rc<QueueCtx>, view: LocalView, req: Request) {
    let (status, used) = match dispatch(ctx.export(), &view, &req).await {
        Reply::Done(used) => (VIRTIO_BLK_S_OK, used),
        Reply::Failed(e, used) => {
            ctx.warn(format_args!("{:?} failed: {e}", req.kind));
            let status = if e.is_unsupported() {
                VIRTIO_BLK_S_UNSUPP
            } else {
                VIRTIO_BLK_S_IOERR
            };
            (status, used)
        }
        Reply::Unsupported => (VIRTIO_BLK_S_UNSUPP, 1),
    };
    req.status.set(status as u8);
    ctx.finish(req.head, used);
}

/// Runs a request against the export's root node.
async fn dispatch(export: &Export, g: &GraphView, req: &Request) -> Reply {
    let data = req.data();
    let node = match g.child(export.root()) {
        Ok(n) => n,
        Err(e) => return Reply::Failed(e, 1),
    };
    let (res, used) = match req.kind {
        RequestKind::Read { offset } => (node.read(g, offset, data).await, data.len() as u32 + 1),
        RequestKind::Write { offset } => (node.write(g, offset, data).await, 1),
        RequestKind::Flush => (node.flush(g).await, 1),
        RequestKind::GetId => {
            let Some(serial) = export.serial() else {
                return Reply::Unsupported;
            };
            let n = (data.len() as usize).min(SERIAL_LEN);
            data.copy_from_slice(0, &serial[..n]);
            (Ok(()), n as u32 + 1)
        }
        RequestKind::Discard { offset, len } => (node.discard(g, offset, len).await, 1),
        RequestKind::WriteZeroes { offset, len, unmap } => {
            (node.write_zeroes(g, offset, len, unmap).await, 1)
        }
    };
    // Write-through: a write completes only once it is durable.
    let is_write = matches!(
        req.kind,
        RequestKind::Write { .. } | RequestKind::WriteZeroes { .. }
    );
    let res = match res {
        Ok(()) if is_write && !export.writeback() => node.flush(g).await,
        res => res,
    };
    match res {
        Ok(()) => Reply::Done(used),
        Err(e) => Reply::Failed(e, used),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_below_its_starting_size_still_adapts() {
        let mut p = PollWindow::new(1000);
        p.slept_at = Some((Instant::now(), false));
        p.woke();
        assert!(p.window(false) <= Duration::from_nanos(1000));
    }

    #[test]
    fn a_long_wait_for_io_leaves_the_guest_window_open() {
        let mut p = PollWindow::new(32_768);
        for _ in 0..4 {
            p.slept_at = Some((Instant::now(), false));
            p.woke();
        }
        let open = p.window(false);
        assert!(!open.is_zero());
        p.slept_at = Some((Instant::now() - Duration::from_millis(1), true));
        p.woke();
        assert_eq!(p.window(true), Duration::ZERO);
        assert_eq!(p.window(false), open);
        // The guest going quiet closes its window.
        p.slept_at = Some((Instant::now() - Duration::from_millis(1), false));
        p.woke();
        assert_eq!(p.window(false), Duration::ZERO);
    }
}
