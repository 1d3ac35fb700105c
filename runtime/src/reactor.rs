//! One io_uring per thread, and the futures that wait on it.
//!
//! A queue thread owns its ring: requests push submission entries as they
//! run, the thread submits them in one `io_uring_enter` per batch, and the
//! ring's eventfd (registered in the thread's epoll) says when to reap.
//! Threads without an event loop use [`block_on`], which does both itself.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

/// Submission entries per ring. Completions get four times as many slots,
/// since a full virtqueue can have more requests in flight than this.
const RING_ENTRIES: u32 = 256;

/// `user_data` of cancellations, which nobody waits for.
const CANCEL_TAG: u64 = u64::MAX;

enum OpState {
    Waiting(Option<Waker>),
    Done(i32),
}

/// A thread's io_uring and the operations in flight on it.
pub struct Reactor {
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<OpState>>,
    /// Entries pushed to the submission queue but not yet submitted.
    queued: Cell<u32>,
    /// Operations the kernel has not completed yet.
    waiting: Cell<usize>,
    /// Reused by `reap`, so reaping allocates nothing.
    wakers: RefCell<Vec<Waker>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

impl Reactor {
    fn new() -> io::Result<Rc<Reactor>> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .build(RING_ENTRIES)?;
        Ok(Rc::new(Reactor {
            ring: RefCell::new(ring),
            ops: RefCell::new(Slab::with_capacity(RING_ENTRIES as usize)),
            queued: Cell::new(0),
            waiting: Cell::new(0),
            wakers: RefCell::new(Vec::new()),
        }))
    }

    /// This thread's reactor, set up on first use. Fails while the thread
    /// is exiting (its locals are being destroyed).
    pub fn current() -> io::Result<Rc<Reactor>> {
        CURRENT
            .try_with(|cur| {
                let mut cur = cur.borrow_mut();
                if let Some(r) = &*cur {
                    return Ok(Rc::clone(r));
                }
                let r = Reactor::new()?;
                *cur = Some(Rc::clone(&r));
                Ok(r)
            })
            .unwrap_or_else(|_| Err(io::Error::other("the thread is exiting")))
    }

    /// Makes the ring signal `fd` whenever it posts a completion.
    pub fn register_eventfd(&self, fd: RawFd) -> io::Result<()> {
        self.ring.borrow().submitter().register_eventfd(fd)
    }

    /// Queues `entry`; the returned future resolves to the kernel's result
    /// (a byte count, or a negative errno).
    ///
    /// # Safety
    ///
    /// Every buffer and iovec array `entry` points at must stay valid until
    /// the returned [`Op`] has resolved or been dropped (dropping waits for
    /// the kernel to let go).
    pub unsafe fn push(self: &Rc<Self>, entry: squeue::Entry) -> Op {
        let key = self.ops.borrow_mut().insert(OpState::Waiting(None));
        self.waiting.set(self.waiting.get() + 1);
        self.push_entry(entry.user_data(key as u64));
        Op {
            reactor: Rc::clone(self),
            key,
            done: false,
        }
    }

    fn push_entry(&self, entry: squeue::Entry) {
        loop {
            // SAFETY: the caller of `push` keeps the entry's memory valid
            // until the operation completes; cancellations carry none.
            let pushed = unsafe { self.ring.borrow_mut().submission().push(&entry) };
            if pushed.is_ok() {
                self.queued.set(self.queued.get() + 1);
                return;
            }
            // The submission queue is full: hand it to the kernel and retry.
            if let Err(e) = self.submit() {
                tracing::warn!("io_uring submit failed while the queue was full: {e}");
                self.reap();
            }
        }
    }

    /// Hands every queued entry to the kernel.
    pub fn submit(&self) -> io::Result<()> {
        while self.queued.get() > 0 {
            match self.ring.borrow().submit() {
                Ok(n) => self.queued.set(self.queued.get().saturating_sub(n as u32)),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue overflowed: make room, then retry.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    if self.reap() == 0 {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Collects posted completions and wakes their futures. Returns how many
    /// operations completed.
    pub fn reap(&self) -> usize {
        let mut wakers = self.wakers.take();
        let mut n = 0;
        {
            let mut ring = self.ring.borrow_mut();
            let mut ops = self.ops.borrow_mut();
            for cqe in ring.completion() {
                if cqe.user_data() == CANCEL_TAG {
                    continue;
                }
                let Some(state) = ops.get_mut(cqe.user_data() as usize) else {
                    continue;
                };
                if let OpState::Waiting(w) = std::mem::replace(state, OpState::Done(cqe.result())) {
                    wakers.extend(w);
                    n += 1;
                }
            }
        }
        self.waiting.set(self.waiting.get() - n);
        // Wake outside the borrows: a waker may run code that pushes more.
        wakers.drain(..).for_each(Waker::wake);
        *self.wakers.borrow_mut() = wakers;
        n
    }

    /// Operations submitted or queued and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.waiting.get()
    }

    /// Submits, then sleeps in the kernel until at least one completion,
    /// with one system call for both.
    pub fn wait(&self) -> io::Result<()> {
        loop {
            match self.ring.borrow().submit_and_wait(1) {
                // The kernel waits only once it took every entry.
                Ok(n) => {
                    let left = self.queued.get().saturating_sub(n as u32);
                    self.queued.set(left);
                    if left == 0 {
                        return Ok(());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue overflowed: what it holds is the
                // completion waited for.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    if self.reap() == 0 {
                        return Err(e);
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits, then sleeps in the kernel until a completion or until
    /// `timeout` passes.
    pub fn wait_for(&self, timeout: Duration) -> io::Result<()> {
        self.submit()?;
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            match self.ring.borrow().submitter().submit_with_args(1, &args) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => return Ok(()),
                r => return r.map(drop),
            }
        }
    }

    /// Blocks until nothing is in flight. For thread teardown: guest memory
    /// must not be unmapped while the kernel may still write into it.
    pub fn wait_idle(&self) {
        while self.in_flight() > 0 {
            if let Err(e) = self.wait() {
                tracing::error!("io_uring wait failed while draining: {e}");
                thread::sleep(Duration::from_millis(1));
            }
            self.reap();
        }
    }
}

/// The future of one io_uring operation.
pub struct Op {
    reactor: Rc<Reactor>,
    key: usize,
    done: bool,
}

impl Future for Op {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let key = self.key;
        let mut ops = self.reactor.ops.borrow_mut();
        match &mut ops[key] {
            OpState::Done(res) => {
                let res = *res;
                ops.remove(key);
                drop(ops);
                self.done = true;
                Poll::Ready(res)
            }
            OpState::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The kernel may still be using the buffers our owner is about to
        // free: cancel the operation and wait until it has let go.
        let r = &self.reactor;
        if matches!(r.ops.borrow()[self.key], OpState::Waiting(_)) {
            r.push_entry(
                opcode::AsyncCancel::new(self.key as u64)
                    .build()
                    .user_data(CANCEL_TAG),
            );
            while matches!(r.ops.borrow()[self.key], OpState::Waiting(_)) {
                if let Err(e) = r.wait() {
                    tracing::error!("io_uring wait failed while cancelling: {e}");
                    thread::sleep(Duration::from_millis(1));
                }
                r.reap();
            }
        }
        r.ops.borrow_mut().remove(self.key);
    }
}

/// Waits for `d`, on this thread's ring.
pub async fn sleep(d: Duration) -> io::Result<()> {
    let reactor = Reactor::current()?;
    let ts = Box::new(types::Timespec::from(d));
    // SAFETY: the timespec is boxed and outlives the op, which is awaited
    // (or dropped, which waits for the kernel) before `ts` is freed.
    let res = unsafe { reactor.push(opcode::Timeout::new(&*ts).build()) }.await;
    match res {
        // Expiry is reported as ETIME.
        0 => Ok(()),
        e if -e == libc::ETIME => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` to completion on this thread, driving this thread's ring.
/// For threads without an event loop: start-up, shutdown, tools and tests.
pub fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
    let reactor = Reactor::current()?;
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Ok(out);
        }
        if reactor.in_flight() > 0 {
            reactor.wait()?;
            reactor.reap();
        } else {
            // Waiting on something other than this ring.
            thread::park_timeout(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nop_completes_through_block_on() {
        let r = Reactor::current().unwrap();
        // SAFETY: a nop references no memory.
        let op = unsafe { r.push(opcode::Nop::new().build()) };
        assert_eq!(block_on(op).unwrap(), 0);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn more_operations_than_ring_entries() {
        let r = Reactor::current().unwrap();
        let ops: Vec<Op> = (0..RING_ENTRIES * 3)
            // SAFETY: a nop references no memory.
            .map(|_| unsafe { r.push(opcode::Nop::new().build()) })
            .collect();
        let results = block_on(futures::future::join_all(ops)).unwrap();
        assert!(results.iter().all(|&res| res == 0));
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn sleep_waits_about_as_long_as_asked() {
        let start = std::time::Instant::now();
        block_on(sleep(Duration::from_millis(30))).unwrap().unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(30) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[test]
    fn wait_for_returns_after_its_timeout_with_nothing_to_wait_for() {
        let r = Reactor::current().unwrap();
        let start = std::time::Instant::now();
        r.wait_for(Duration::from_millis(20)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(15));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn dropping_an_operation_in_flight_waits_for_the_kernel() {
        let r = Reactor::current().unwrap();
        let ts = io_uring::types::Timespec::new().sec(30);
        // SAFETY: `ts` outlives the op, which is dropped (and so finished)
        // before the end of this function.
        let op = unsafe { r.push(opcode::Timeout::new(&ts).build()) };
        r.submit().unwrap();
        let start = std::time::Instant::now();
        drop(op);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cancelled, not waited out"
        );
        assert_eq!(r.in_flight(), 0);
    }
}
