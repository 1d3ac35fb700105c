//! Intake: the one loop that takes chains from the avail ring, starts
//! them, and puts finished ones on the used ring, over either ring access.
//!
//! Each batch publishes what finished, takes the next two chains and runs
//! them until they wait, under the vring lock and the queue's ledger (see
//! [`crate::queue`]); every eight batches both are released, so the
//! frontend's messages and drains get in. Every batch looks at the
//! export's pause flag first. A pass stops when the ring is empty, when a
//! drain pauses the export, or when it has taken its budget: then it asks
//! to be woken again, so a guest that keeps its ring full can hold off
//! neither a drain nor the frontend's messages.

use std::rc::Rc;
use std::sync::atomic::Ordering;

use strata_graph::LocalView;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::{Queue, QueueT};

use super::access::{Generic, LockedVring, Mapped, RingAccess, VringLock};
use super::dispatch::Job;
use super::{Seen, Worker};
use crate::queue::LedgerGuard;
use crate::virtio::memory::MemHandle;
use crate::virtio::request::{self, Limits};
use crate::virtio::ring::{Chain, Rings};

/// Chains started between two publications of what finished. Small, so
/// the guest sees its first completions while later chains are still
/// being parsed and refills the ring while this thread works: a queue that
/// never runs dry never sleeps, and on a virtual machine a wake-up costs
/// more than the rest of a request. (16 here halved IOPS on the null
/// target at QD32; see BENCHMARKS.md.) Publishing is a store and a fence;
/// the event index keeps notifications to one per guest wait.
const BATCH: usize = 2;

/// Chains started between two io_uring submissions (one system call).
const SUBMIT_BATCH: usize = 16;

/// Batches between two releases of the vring lock and the ledger.
const SLICE: usize = 8;

/// Chains one pass takes before it lets the thread's other events in.
const BUDGET: usize = 256;

impl Worker {
    /// Takes and starts available chains, publishing what finishes, until
    /// the ring is empty, the export pauses, or the budget is spent.
    /// Returns how many chains it took.
    pub(super) fn intake<V: VringLock>(&mut self, vring: &V) -> usize {
        let mut taken = 0;
        loop {
            let mem = self.memory();
            // The rings mapped last time, unless the memory map changed;
            // a batch checks, under the lock, that they still describe the
            // queue.
            let rings = match &self.rings {
                Some(r) if r.memory().same(&mem) => Some(Rc::clone(r)),
                _ => self.rings_for(vring.lock().queue(), &mem),
            };
            let (n, remap) = match rings {
                Some(r) => self.intake_with(vring, &Mapped(r)),
                None => self.intake_with(vring, &Generic(mem)),
            };
            taken += n;
            if !remap {
                return taken;
            }
        }
    }

    /// Publishes what finished.
    pub(super) fn publish<V: VringLock>(&mut self, vring: &V) {
        let mem = self.memory();
        let mut guard = vring.lock();
        let rings = self.rings_for(guard.queue(), &mem);
        let state = Rc::clone(&self.ctx);
        let mut ledger = state.state.ledger();
        let notify = match rings {
            Some(r) => self.publish_locked(guard.queue(), &Mapped(r), &mut ledger),
            None => self.publish_locked(guard.queue(), &Generic(mem), &mut ledger),
        };
        drop(ledger);
        if notify {
            if let Err(e) = guard.notify() {
                self.ctx.warn(format_args!("cannot notify the guest: {e}"));
            }
        }
    }

    /// The queue's rings mapped for the fast path, if they can be.
    fn rings_for(&mut self, q: &Queue, mem: &MemHandle) -> Option<Rc<Rings>> {
        if !self.rings.as_ref().is_some_and(|r| r.matches(q, mem)) {
            self.rings = Rings::new(q, mem).map(Rc::new);
        }
        self.rings.clone()
    }

    /// One pass through one ring access: how many chains it took, and
    /// whether it stopped because the memory map changed or the rings
    /// moved.
    fn intake_with<V: VringLock, A: RingAccess>(&mut self, vring: &V, access: &A) -> (usize, bool) {
        let limits = self.ctx.export.limits();
        let view = self.views.current();
        let ctx = Rc::clone(&self.ctx);
        let mut taken = 0;
        let mut unsubmitted = 0;
        loop {
            let mut guard = vring.lock();
            let enabled = guard.enabled();
            let mut ledger = ctx.state.ledger();
            let mut end = None;
            for _ in 0..SLICE {
                if self.publish_locked(guard.queue(), access, &mut ledger) {
                    if let Err(e) = guard.notify() {
                        ctx.warn(format_args!("cannot notify the guest: {e}"));
                    }
                }
                let q = guard.queue();
                let generation = self.check_ring(q, &mut ledger);
                if !access.fits(q) {
                    self.rings = None;
                    end = Some(true);
                    break;
                }
                if ctx.export.paused() || !q.ready() || !enabled {
                    end = Some(false);
                    break;
                }
                if std::mem::take(&mut self.recover) {
                    self.resubmit(q, access.memory(), generation, &view, &limits, &mut ledger);
                }
                let resumes = ctx.export.error_hold().resumes();
                if resumes != self.resumes_seen {
                    self.resumes_seen = resumes;
                    self.retry_held(generation, &view, &mut ledger);
                }
                let n = match access.pending(q) {
                    Err(e) => {
                        ctx.warn(format_args!("bad avail ring: {e}"));
                        end = Some(false);
                        break;
                    }
                    Ok(0) => {
                        let more = access.rearm(q);
                        // Rearming wrote avail_event, in the used ring.
                        log_used_ring(&ctx, q);
                        if more {
                            continue;
                        }
                        end = Some(false);
                        break;
                    }
                    // Read after the avail index: a chain the driver made
                    // available after the frontend changed the map (and
                    // waited for our ack) must be read through the new one.
                    Ok(_) if self.map_changed() => {
                        end = Some(true);
                        break;
                    }
                    Ok(n) => n,
                };
                let mut started = 0;
                for _ in 0..usize::from(n).min(BATCH) {
                    let Some((head, parsed)) = access.take(q, &limits) else {
                        break;
                    };
                    // GUEST-INPUT: a head already in flight must not be
                    // completed twice.
                    if self.heads.start(head, generation) {
                        if let Some(t) = &mut self.tracked {
                            t.region.start(head, t.counter);
                            t.counter = t.counter.wrapping_add(1);
                        }
                        self.launch(head, parsed, generation, &view);
                        started += 1;
                    } else {
                        ctx.warn(format_args!("chain {head} is already in flight; ignored"));
                    }
                }
                ledger.taken(started);
                self.seen = Some(Seen::of(q));
                taken += started;
                unsubmitted += started;
                if unsubmitted >= SUBMIT_BATCH {
                    self.run_stalled();
                    unsubmitted = 0;
                } else if let Ok(io) = &self.io {
                    io.executor.run_until_stalled();
                }
                if started == 0 {
                    // The ring claimed entries but yielded no chain: broken.
                    end = Some(false);
                    break;
                }
                if taken >= BUDGET {
                    // Come back after the thread's other events.
                    let _ = ctx.state.wake.write(1);
                    end = Some(false);
                    break;
                }
            }
            drop((ledger, guard));
            if let Some(remap) = end {
                return (taken, remap);
            }
        }
    }

    /// Runs a parsed request, or completes a rejected one.
    fn launch(
        &mut self,
        head: u16,
        parsed: Result<crate::virtio::request::Request, crate::virtio::request::Rejected>,
        generation: u64,
        view: &LocalView,
    ) {
        match parsed {
            Ok(req) => match &self.io {
                Ok(io) => io.executor.spawn(
                    Rc::clone(&self.ctx),
                    Rc::clone(view),
                    Job { req, generation },
                ),
                Err((e, _)) => {
                    self.ctx.warn(format_args!(
                        "{:?} failed: the queue has no I/O ({e})",
                        req.kind
                    ));
                    req.status.set(VIRTIO_BLK_S_IOERR as u8);
                    self.ctx.mark(|| req.status.gpa().map(|g| (g, 1)));
                    self.ctx.finish(head, 1, generation);
                }
            },
            Err(rej) => {
                self.ctx.warn(format_args!("{rej:?}"));
                if let Some(op) = rej.ty.and_then(super::dispatch::invalid_op) {
                    self.ctx.stats.invalid(op);
                }
                let used = rej.complete();
                if let Some(s) = &rej.status {
                    self.ctx.mark(|| s.gpa().map(|g| (g, 1)));
                }
                self.ctx.finish(head, used, generation);
            }
        }
    }

    /// Starts again the requests held on error, with the graph as it is
    /// now (the operator may have rewired it to make room). Those of an
    /// older generation are dropped: their chains' memory may hold
    /// something else by now.
    fn retry_held(&mut self, generation: u64, view: &LocalView, ledger: &mut LedgerGuard<'_>) {
        ledger.park(self.ctx.parked.replace(0));
        let held = std::mem::take(&mut *self.ctx.held.borrow_mut());
        let Ok(io) = &self.io else {
            // Held requests only come from a running executor.
            *self.ctx.held.borrow_mut() = held;
            return;
        };
        let total = held.len();
        let mut retried = 0;
        for job in held {
            if job.generation == generation {
                io.executor
                    .spawn(Rc::clone(&self.ctx), Rc::clone(view), job);
                retried += 1;
            } else {
                self.heads.finish(job.req.head, job.generation);
            }
        }
        ledger.retried(retried);
        self.ctx.export.error_hold().released(total);
        if total > 0 {
            tracing::info!(
                "queue {}: retrying {retried} requests held on error ({} dropped: the ring was \
                 set up again since)",
                self.ctx.queue,
                total - retried
            );
        }
    }

    /// Puts finished chains of the current generation on the used ring
    /// and drops stale ones. True when the driver should be notified.
    fn publish_locked<A: RingAccess>(
        &mut self,
        q: &mut Queue,
        access: &A,
        ledger: &mut LedgerGuard<'_>,
    ) -> bool {
        ledger.park(self.ctx.parked.replace(0));
        std::mem::swap(&mut *self.ctx.done.borrow_mut(), &mut self.publishing);
        if self.publishing.is_empty() {
            return false;
        }
        let old = q.next_used();
        // What is kept is what went on the used ring.
        self.publishing.retain(|c| {
            self.heads.finish(c.head, c.generation);
            if !ledger.retire(c.generation) {
                // Still marked in the inflight region: a new process
                // resubmits it, as it was never completed.
                return false;
            }
            // Linked into the region's batch first: the slow path
            // publishes each element as it puts it.
            let undo = self.tracked.as_ref().map(|t| t.region.put(c.head));
            match access.put_used(q, c.head, c.len) {
                Ok(()) => true,
                Err(e) => {
                    if let (Some(t), Some(last)) = (&self.tracked, undo) {
                        t.region.unput(last);
                    }
                    self.ctx
                        .warn(format_args!("cannot complete chain {}: {e}", c.head));
                    false
                }
            }
        });
        let put = !self.publishing.is_empty();
        let notify = put && access.publish(q, old);
        if put {
            log_used_ring(&self.ctx, q);
        }
        // Cleared only once the used index covers them: a crash in
        // between leaves the batch for the next process to clear.
        if let (true, Some(t)) = (put, &self.tracked) {
            t.region
                .published(self.publishing.iter().map(|c| c.head), q.next_used());
        }
        self.publishing.clear();
        notify
    }

    /// Before the first chain of a ring the frontend set up: recovers the
    /// queue's inflight region. What it still marks was taken and never
    /// completed (by this process or one before it); those heads start
    /// again, oldest first, and the avail ring is taken from past them.
    fn resubmit(
        &mut self,
        q: &mut Queue,
        mem: &MemHandle,
        generation: u64,
        view: &LocalView,
        limits: &Limits,
        ledger: &mut LedgerGuard<'_>,
    ) {
        let Some(region) = self.ctx.state.inflight() else {
            self.tracked = None;
            return;
        };
        let used = match q.used_idx(&**mem, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                self.ctx.warn(format_args!(
                    "cannot read the used index ({e}); requests are not tracked"
                ));
                self.tracked = None;
                return;
            }
        };
        let rec = region.recover(q.size(), used);
        let n = rec.resubmit.len();
        // A region just initialised knows nothing: the frontend's base
        // stands (a migration's destination starts this way).
        if rec.tracked {
            q.set_next_avail(used.wrapping_add(n as u16));
        }
        if n > 0 {
            tracing::info!(
                "queue {}: resubmitting {n} requests left in flight (heads {:?})",
                self.ctx.queue,
                rec.resubmit
            );
        }
        let mut started = 0;
        for head in rec.resubmit {
            if !self.heads.start(head, generation) {
                continue;
            }
            let chain = Chain::in_guest(mem, q.desc_table(), q.size(), head);
            let parsed = request::parse_descs(head, chain, mem, limits);
            self.launch(head, parsed, generation, view);
            started += 1;
        }
        ledger.taken(started);
        self.seen = Some(Seen::of(q));
        self.tracked = Some(super::Tracked {
            region,
            counter: rec.next_counter,
        });
    }

    /// The generation to take chains in: a new one when the frontend moved
    /// or rewound the ring since this worker last took from it.
    fn check_ring(&mut self, q: &Queue, ledger: &mut LedgerGuard<'_>) -> u64 {
        if self.seen.is_some_and(|s| s != Seen::of(q)) {
            // A guest driver that (re)initialises its device does this
            // with nothing in flight; only then is it worth a warning.
            let left = self.heads.len();
            if left > 0 {
                tracing::warn!(
                    "queue {}: the frontend moved or rewound the ring with {left} requests \
                     in flight; they will not complete",
                    self.ctx.queue
                );
            } else {
                tracing::debug!(
                    "queue {}: the frontend set the ring up again",
                    self.ctx.queue
                );
            }
            ledger.bump();
            self.seen = None;
        }
        ledger.generation()
    }
}

/// Marks the used ring in the dirty log, after the device wrote to it.
fn log_used_ring(ctx: &super::dispatch::QueueCtx, q: &Queue) {
    ctx.mark(|| [(q.used_ring(), 6 + 8 * u64::from(q.size()))]);
}

impl Seen {
    fn of(q: &Queue) -> Seen {
        Seen {
            size: q.size(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            next_avail: q.next_avail(),
        }
    }
}
