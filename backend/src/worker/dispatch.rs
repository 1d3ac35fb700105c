//! Block semantics: what a validated request does to the export's node, and
//! the executor its future runs on.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use strata_graph::{BlockError, GraphView, IoOp, LocalView};
use strata_runtime::executor::Executor;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

use crate::export::{Export, SERIAL_LEN};
use crate::io_stats::{Op, QueueStats};
use crate::queue::QueueState;
use crate::ratelimit::RateLimit;
use crate::vhost_user::Marker;
use crate::virtio::request::{Request, RequestKind};

/// A finished chain, waiting for the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    /// The chain's head.
    pub head: u16,
    /// Bytes written into the chain, status byte included.
    pub len: u32,
    /// The ring generation it was taken in.
    pub generation: u64,
}

/// What the request futures of one queue share with their worker.
pub(crate) struct QueueCtx {
    pub export: Arc<Export>,
    pub state: Arc<QueueState>,
    pub queue: usize,
    /// Finished chains waiting for the used ring.
    pub done: RefCell<Vec<Completion>>,
    /// Requests held on error, waiting for the export to be resumed.
    pub held: RefCell<Vec<Job>>,
    /// Requests held since the worker last told the ledger: they no
    /// longer hold off a drain.
    pub parked: Cell<usize>,
    errors: RefCell<RateLimit>,
    /// BLOCK_IO_ERROR events for failures that are reported, not held.
    reported: RefCell<RateLimit>,
    /// This thread's way into the dirty log.
    log: RefCell<Marker>,
    /// This queue's I/O counters.
    pub stats: Arc<QueueStats>,
}

impl QueueCtx {
    pub fn new(export: Arc<Export>, state: Arc<QueueState>, queue: usize) -> Self {
        QueueCtx {
            log: RefCell::new(state.log().marker()),
            stats: export.queue_stats(queue),
            export,
            state,
            queue,
            done: RefCell::new(Vec::new()),
            held: RefCell::new(Vec::new()),
            parked: Cell::new(0),
            errors: RefCell::new(RateLimit::new(10, std::time::Duration::from_secs(5))),
            reported: RefCell::new(RateLimit::new(10, std::time::Duration::from_secs(1))),
        }
    }

    /// Marks guest memory the device wrote in the dirty log, while
    /// logging is on; see [`Marker::mark`].
    #[inline]
    pub fn mark<I: IntoIterator<Item = (u64, u64)>>(&self, ranges: impl FnOnce() -> I) {
        self.log.borrow_mut().mark(ranges);
    }

    /// Records a finished chain.
    pub fn finish(&self, head: u16, len: u32, generation: u64) {
        self.done.borrow_mut().push(Completion {
            head,
            len,
            generation,
        });
    }

    /// Hands a failure to the export's `on-error` policy: true when the
    /// request is to be held. Reported failures become events too, as
    /// many as the rate limit lets through.
    fn hold_or_report(&self, req: &Request, e: &BlockError) -> bool {
        let op = match req.kind {
            RequestKind::Read { .. } | RequestKind::GetId => IoOp::Read,
            RequestKind::Flush => IoOp::Flush,
            _ => IoOp::Write,
        };
        let export = &self.export;
        let hold = export.error_hold();
        let report = || self.reported.borrow_mut().check().is_some();
        let held = hold.failed(&export.options().id, &export.node_name(), op, e, report);
        if held {
            self.warn(format_args!(
                "{:?} failed: {e}; held until the export is resumed",
                req.kind
            ));
        }
        held
    }

    /// Logs a warning, rate-limited: a guest controls how often these
    /// happen.
    pub fn warn(&self, what: std::fmt::Arguments<'_>) {
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

/// A request to run: what it is, and the generation it was taken in.
pub(crate) struct Job {
    pub req: Request,
    pub generation: u64,
}

/// The queue's executor, for request futures. Behind a trait because the
/// future's type (that of `execute`) has no name to store it by.
pub(crate) trait Requests {
    fn spawn(&self, ctx: Rc<QueueCtx>, view: LocalView, job: Job);
    fn run_until_stalled(&self) -> usize;
    fn woken_remotely(&self) -> bool;
    fn is_empty(&self) -> bool;
}

struct RequestExecutor<F, G> {
    executor: Executor<F>,
    make: G,
}

impl<F, G> Requests for RequestExecutor<F, G>
where
    F: std::future::Future<Output = ()>,
    G: Fn(Rc<QueueCtx>, LocalView, Job) -> F,
{
    fn spawn(&self, ctx: Rc<QueueCtx>, view: LocalView, job: Job) {
        self.executor.spawn((self.make)(ctx, view, job));
    }

    fn run_until_stalled(&self) -> usize {
        self.executor.run_until_stalled()
    }

    fn woken_remotely(&self) -> bool {
        self.executor.woken_remotely()
    }

    fn is_empty(&self) -> bool {
        self.executor.is_empty()
    }
}

/// An executor for this thread's requests; `notify` pokes the thread when
/// a request is woken from another thread.
pub(crate) fn executor(notify: impl Fn() + Send + Sync + 'static) -> Box<dyn Requests> {
    Box::new(RequestExecutor {
        executor: Executor::new(notify),
        make: execute,
    })
}

/// How a request ended, with the used length: the bytes written into the
/// chain, status byte included.
enum Reply {
    Done(u32),
    Failed(BlockError, u32),
    Unsupported,
}

/// Runs one request to completion and records it as finished, or holds
/// it if it failed and the export's `on-error` says so.
async fn execute(ctx: Rc<QueueCtx>, view: LocalView, job: Job) {
    let start = Instant::now();
    let accounted = accounted(&job.req);
    let _in_flight = accounted.map(|_| ctx.stats.begin());
    let reply = dispatch(&ctx.export, &view, &job.req).await;
    if let Reply::Failed(e, _) = &reply {
        if !e.is_unsupported() && ctx.hold_or_report(&job.req, e) {
            ctx.held.borrow_mut().push(job);
            ctx.parked.set(ctx.parked.get() + 1);
            return;
        }
    }
    let Job { req, generation } = job;
    if let Some((op, bytes, write_end)) = accounted {
        let ok = matches!(reply, Reply::Done(_));
        ctx.stats
            .done(op, bytes, start, ok, write_end.filter(|_| ok));
    }
    let (status, used) = match reply {
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
    ctx.mark(|| req.written());
    ctx.finish(req.head, used, generation);
}

/// How QEMU's virtio-blk accounts `req`: its kind, its bytes, and for a
/// write the end of the range. GET_ID is not accounted.
fn accounted(req: &Request) -> Option<(Op, u64, Option<u64>)> {
    let n = req.data().len();
    match req.kind {
        RequestKind::Read { .. } => Some((Op::Read, n, None)),
        RequestKind::Write { offset } => Some((Op::Write, n, Some(offset + n))),
        RequestKind::WriteZeroes { offset, len, .. } => Some((Op::Write, len, Some(offset + len))),
        RequestKind::Discard { len, .. } => Some((Op::Unmap, len, None)),
        RequestKind::Flush => Some((Op::Flush, 0, None)),
        RequestKind::GetId => None,
    }
}

/// The [`Op`] a refused request of header type `ty` counts as invalid.
pub(crate) fn invalid_op(ty: u32) -> Option<Op> {
    use virtio_bindings::virtio_blk::*;
    match ty {
        VIRTIO_BLK_T_IN => Some(Op::Read),
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_WRITE_ZEROES => Some(Op::Write),
        VIRTIO_BLK_T_FLUSH => Some(Op::Flush),
        VIRTIO_BLK_T_DISCARD => Some(Op::Unmap),
        _ => None,
    }
}

/// Runs a request against the export's root node.
async fn dispatch(export: &Export, g: &GraphView, req: &Request) -> Reply {
    let data = req.data();
    let node = match g.child(export.root()) {
        Ok(n) => n,
        Err(e) => return Reply::Failed(e, 1),
    };
    // The parser bounds a request to SEG_MAX * SIZE_MAX bytes, far below
    // 4 GiB, so the used length cannot wrap.
    let data_len = u32::try_from(data.len()).unwrap_or(u32::MAX - 1);
    let (res, used) = match req.kind {
        RequestKind::Read { offset } => (node.read(g, offset, data).await, data_len + 1),
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
