//! Transmission: a connection's requests read, run against the graph and
//! answered concurrently on its thread, with replies sent as they finish
//! (out of order). A reader task takes requests while fewer than
//! [`MAX_IN_FLIGHT`] wait for their replies, so a client that stops
//! reading its replies stops being read, and what it can make the server
//! hold is bounded.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use strata_graph::{allocation, BlockDriver, BlockError, GraphView, IoOp};
use strata_nbd::consts::{cflag, chunk, err, STATE_HOLE, STATE_ZERO};
use strata_nbd::{
    block_status_chunk, data_chunk, error_chunk, hole_chunk, simple_reply, Command, Extent, Limits,
    Request, REQUEST_LEN,
};
use strata_runtime::executor::Executor;
use strata_runtime::reactor::{sleep, Reactor};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::buffers::{Buf, Pool};
use super::export::{NbdExport, MAX_PAYLOAD};
use super::handshake::{Contexts, Negotiated, CONTEXT_ALLOCATION, CONTEXT_DEPTH};
use super::transport::Transport;
use crate::io_stats::{Op, QueueStats};

/// Requests accepted and not yet answered, per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Data bytes those requests may hold (write payloads, read buffers),
/// per connection; one request alone may exceed it.
const MAX_BYTES: u64 = 64 << 20;
/// Most extents per metadata context in one block status reply.
const MAX_EXTENTS: usize = 256;
/// Most separate data and hole runs a sparse read is split into; the rest
/// of the range is sent as data.
const MAX_READ_RUNS: usize = 64;

type Task = Pin<Box<dyn Future<Output = ()>>>;

/// One piece of a reply on the wire.
enum Part {
    Bytes(Vec<u8>),
    Data(Rc<Buf>, usize, usize),
}

impl Part {
    fn bytes(&self) -> &[u8] {
        match self {
            Part::Bytes(b) => b,
            Part::Data(buf, from, len) => &buf.as_slice()[*from..*from + *len],
        }
    }
}

struct Conn {
    t: Transport,
    export: Arc<NbdExport>,
    structured: bool,
    contexts: Contexts,
    buffers: Rc<Pool>,
    /// Replies to send, with the data bytes their requests held.
    replies: RefCell<VecDeque<(Vec<Part>, u64)>>,
    writer: RefCell<Option<Waker>>,
    reader: RefCell<Option<Waker>>,
    /// Requests accepted whose reply is not sent yet.
    in_flight: Cell<usize>,
    /// The data bytes they hold.
    bytes: Cell<u64>,
    reading: Cell<bool>,
    writing: Cell<bool>,
    /// The socket failed or the client broke the protocol: nothing more
    /// is sent.
    broken: Cell<bool>,
    /// This connection's I/O counters, part of the export's.
    stats: Arc<QueueStats>,
}

impl Conn {
    fn push_reply(&self, parts: Vec<Part>, bytes: u64) {
        self.replies.borrow_mut().push_back((parts, bytes));
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Serves the negotiated connection on `fd` until the client disconnects
/// or breaks the protocol, on this thread's reactor. `confine` runs once
/// the thread holds everything it needs, before the first request.
pub fn serve(
    fd: OwnedFd,
    tls: Option<rustls::ServerConnection>,
    n: Negotiated,
    confine: impl FnOnce(),
) -> io::Result<()> {
    let reactor = Reactor::current()?;
    let wake = EventFd::new(EFD_NONBLOCK)?;
    let notify = wake.try_clone()?;
    let exec: Rc<Executor<Task>> = Rc::new(Executor::new(move || {
        let _ = notify.write(1);
    }));
    let t = Transport::new(fd, tls)?;
    let stats = n.export.connection_stats();
    // However the connection ends, its counts stay in the export's.
    let _counted = Counted(Arc::clone(&n.export), Arc::clone(&stats));
    let conn = Rc::new(Conn {
        t,
        export: n.export,
        structured: n.structured,
        contexts: n.contexts,
        buffers: Rc::default(),
        replies: RefCell::new(VecDeque::new()),
        writer: RefCell::new(None),
        reader: RefCell::new(None),
        in_flight: Cell::new(0),
        bytes: Cell::new(0),
        reading: Cell::new(true),
        writing: Cell::new(true),
        broken: Cell::new(false),
        stats,
    });
    confine();
    exec.spawn(Box::pin(remote_wakes(wake)));
    exec.spawn(Box::pin(reader(Rc::clone(&conn), Rc::downgrade(&exec))));
    exec.spawn(Box::pin(writer(Rc::clone(&conn))));
    while conn.reading.get() || conn.writing.get() {
        exec.run_until_stalled();
        if !(conn.reading.get() || conn.writing.get()) {
            break;
        }
        reactor.wait()?;
        reactor.reap();
    }
    // Dropping the executor cancels the wake-up read, waiting for the
    // kernel to let go of its buffer.
    drop(exec);
    Ok(())
}

/// Folds a connection's counters into its export's when it ends.
struct Counted(Arc<NbdExport>, Arc<QueueStats>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connection_ended(&self.1);
    }
}

/// Keeps a read posted on the eventfd other threads write to wake a task
/// of this one, so the thread's sleep in the ring ends.
async fn remote_wakes(wake: EventFd) {
    let Ok(reactor) = Reactor::current() else {
        return;
    };
    let mut buf = [0u8; 8];
    loop {
        let entry = opcode::Read::new(types::Fd(wake.as_raw_fd()), buf.as_mut_ptr(), 8).build();
        // SAFETY: `buf` lives across the await; dropping the op waits for
        // the kernel to let go of it.
        let res = unsafe { reactor.push(entry) }.await;
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            tracing::error!(
                "NBD connection: cannot wait for wake-ups: {}",
                io::Error::from_raw_os_error(-res)
            );
            return;
        }
    }
}

async fn reader(c: Rc<Conn>, exec: std::rc::Weak<Executor<Task>>) {
    if let Err(e) = read_requests(&c, &exec).await {
        tracing::warn!(
            "NBD export '{}': closing a connection: {e}",
            c.export.options().id
        );
        c.broken.set(true);
        c.t.shutdown().await;
    }
    c.reading.set(false);
    c.wake_writer();
}

async fn read_requests(c: &Rc<Conn>, exec: &std::rc::Weak<Executor<Task>>) -> io::Result<()> {
    let mut header = [0u8; REQUEST_LEN];
    loop {
        // With nothing received ahead, the requests just started run and
        // their replies go out before the receive, which would find the
        // socket empty while the client waits for them. The writer wakes
        // us once it took the replies. A client that reads no reply before
        // it sent all it has keeps being read while the writer waits.
        let mut yielded = false;
        poll_fn(|cx| {
            let room = c.in_flight.get() < MAX_IN_FLIGHT;
            let queued = !c.replies.borrow().is_empty();
            let go = c.t.buffered() || c.t.send_waiting() || (yielded && !queued);
            if room && go {
                Poll::Ready(())
            } else if room && !yielded {
                yielded = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                *c.reader.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if c.broken.get() || !c.t.read_exact(&mut header).await? {
            return Ok(());
        }
        let req = Request::parse(&header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if req.command == Command::Disconnect {
            return Ok(());
        }
        let v = c.export.graph().view();
        let limits = Limits {
            size: c.export.size(&v).unwrap_or(0),
            max_payload: MAX_PAYLOAD,
            alignment: c.export.alignment(&v),
            read_only: !c.export.options().writable,
            structured: c.structured,
            has_contexts: c.contexts.any(),
        };
        let checked = req.check(&limits);
        if let (Err(_), Some((op, ..))) = (&checked, accounted(&req)) {
            c.stats.invalid(op);
        }
        // What the request will hold: its payload, or its read buffer.
        let bytes = match (req.command, &checked) {
            (Command::Write, _) => u64::from(req.len),
            (Command::Read, Ok(())) => u64::from(req.len),
            (Command::Cache, Ok(())) => u64::from(req.len).min(1 << 20),
            _ => 0,
        };
        poll_fn(|cx| {
            if c.in_flight.get() == 0 || c.bytes.get() + bytes <= MAX_BYTES {
                Poll::Ready(())
            } else {
                *c.reader.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        c.bytes.set(c.bytes.get() + bytes);
        let mut payload = None;
        if req.command == Command::Write {
            if req.len > MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a WRITE of {} bytes (at most {MAX_PAYLOAD})", req.len),
                ));
            }
            match c.buffers.get(req.len as usize) {
                Ok(mut buf) => {
                    if !c.t.read_exact(buf.as_mut_slice()).await? {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    payload = Some(buf);
                }
                Err(e) => {
                    skip(&c.t, req.len).await?;
                    c.in_flight.set(c.in_flight.get() + 1);
                    c.push_reply(error_reply(c, &req, err::ENOMEM, &e.to_string()), bytes);
                    continue;
                }
            }
        }
        c.in_flight.set(c.in_flight.get() + 1);
        if let Err(rej) = checked {
            tracing::debug!(
                "NBD export '{}': refused: {}",
                c.export.options().id,
                rej.message
            );
            c.push_reply(error_reply(c, &req, rej.error, &rej.message), bytes);
            continue;
        }
        let Some(exec) = exec.upgrade() else {
            return Ok(());
        };
        exec.spawn(Box::pin(run(Rc::clone(c), req, payload, bytes)));
    }
}

/// Reads and drops `len` bytes of a payload that cannot be used.
async fn skip(t: &Transport, len: u32) -> io::Result<()> {
    let mut scratch = vec![0u8; 64 << 10];
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(scratch.len());
        if !t.read_exact(&mut scratch[..n]).await? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n;
    }
    Ok(())
}

/// Most replies sent with one system call.
const SEND_BATCH: usize = 64;

async fn writer(c: Rc<Conn>) {
    let mut batch: Vec<(Vec<Part>, u64)> = Vec::new();
    loop {
        let more = poll_fn(|cx| {
            let mut q = c.replies.borrow_mut();
            if !q.is_empty() {
                let n = q.len().min(SEND_BATCH);
                batch.extend(q.drain(..n));
                // Sent in this poll unless the socket is full, and then the
                // reader must not wait for it.
                if let Some(w) = c.reader.borrow_mut().take() {
                    w.wake();
                }
                return Poll::Ready(true);
            }
            if !c.reading.get() && c.in_flight.get() == 0 {
                return Poll::Ready(false);
            }
            *c.writer.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if !more {
            break;
        }
        if !c.broken.get() {
            let slices: Vec<&[u8]> = batch
                .iter()
                .flat_map(|(parts, _)| parts)
                .map(Part::bytes)
                .collect();
            if let Err(e) = c.t.write_all(&slices).await {
                tracing::warn!(
                    "NBD export '{}': cannot send a reply, closing the connection: {e}",
                    c.export.options().id
                );
                c.broken.set(true);
                c.t.shutdown().await;
            }
        }
        c.in_flight.set(c.in_flight.get() - batch.len());
        let freed: u64 = batch.iter().map(|(_, b)| b).sum();
        c.bytes.set(c.bytes.get() - freed);
        batch.clear();
        if let Some(w) = c.reader.borrow_mut().take() {
            w.wake();
        }
    }
    c.writing.set(false);
}

/// Runs one checked request and queues its reply.
async fn run(c: Rc<Conn>, req: Request, payload: Option<Buf>, bytes: u64) {
    while !c.export.begin() {
        // A graph edit holds the export; it ends within its drain timeout.
        let _ = sleep(Duration::from_millis(1)).await;
    }
    let v = c.export.graph().view();
    let start = Instant::now();
    let accounted = accounted(&req);
    let _in_flight = accounted.map(|_| c.stats.begin());
    let reply = match v.child(c.export.root()) {
        Ok(node) => execute(&c, &v, node, &req, payload).await,
        Err(e) => Err(e),
    };
    c.export.end();
    if let Some((op, bytes, write_end)) = accounted {
        let ok = reply.is_ok();
        c.stats.done(op, bytes, start, ok, write_end.filter(|_| ok));
    }
    let parts = match reply {
        Ok(parts) => parts,
        Err(e) => {
            let (code, msg) = (errno_of(&e), e.to_string());
            tracing::debug!("NBD export '{}': {msg}", c.export.options().id);
            error_reply(&c, &req, code, &msg)
        }
    };
    c.push_reply(parts, bytes);
}

/// How `req` counts in the statistics, as a vhost-user request of the
/// same kind would: its kind, its bytes, and for a write the end of the
/// range. CACHE and BLOCK_STATUS are not counted.
fn accounted(req: &Request) -> Option<(Op, u64, Option<u64>)> {
    let (off, len) = (req.offset, u64::from(req.len));
    match req.command {
        Command::Read => Some((Op::Read, len, None)),
        Command::Write | Command::WriteZeroes => Some((Op::Write, len, Some(off + len))),
        Command::Trim => Some((Op::Unmap, len, None)),
        Command::Flush => Some((Op::Flush, 0, None)),
        _ => None,
    }
}

async fn execute(
    c: &Conn,
    v: &GraphView,
    node: &dyn BlockDriver,
    req: &Request,
    payload: Option<Buf>,
) -> Result<Vec<Part>, BlockError> {
    let fua = req.flags & cflag::FUA != 0;
    match req.command {
        Command::Read => read(c, v, node, req).await,
        Command::Write => {
            let mut buf = payload.expect("a WRITE carries its payload");
            node.write(v, req.offset, &buf.iovecs()).await?;
            if fua {
                node.flush(v).await?;
            }
            Ok(ok_reply(req))
        }
        Command::Flush => {
            node.flush(v).await?;
            Ok(ok_reply(req))
        }
        Command::Trim => {
            node.discard(v, req.offset, req.len.into()).await?;
            if fua {
                node.flush(v).await?;
            }
            Ok(ok_reply(req))
        }
        Command::WriteZeroes => {
            let (offset, len) = (req.offset, u64::from(req.len));
            if req.flags & cflag::FAST_ZERO != 0 && !node.zeroes_fast(v, offset, len) {
                // The client would rather write zeroes itself than wait
                // for us to.
                return Err(BlockError::errno(IoOp::WriteZeroes, offset, libc::ENOTSUP));
            }
            let may_unmap = req.flags & cflag::NO_HOLE == 0;
            node.write_zeroes(v, req.offset, req.len.into(), may_unmap)
                .await?;
            if fua {
                node.flush(v).await?;
            }
            Ok(ok_reply(req))
        }
        Command::Cache => {
            // Reading is the prefetch; a MiB at a time bounds the buffer.
            let mut buf = c.buffers.get((1 << 20).min(req.len as usize))?;
            let mut off = 0u64;
            while off < u64::from(req.len) {
                let n = (u64::from(req.len) - off).min(buf.as_slice().len() as u64);
                let iov = buf.iovecs();
                let iov = iov.slice(0, n);
                node.read(v, req.offset + off, &iov).await?;
                drop(iov);
                off += n;
            }
            Ok(ok_reply(req))
        }
        Command::BlockStatus => block_status(c, v, req).await,
        Command::Disconnect | Command::Unknown(_) => unreachable!("refused by check"),
    }
}

/// A READ: with structured replies, zero runs go as holes and the rest is
/// read into one buffer and sent from it; else one simple reply.
async fn read(
    c: &Conn,
    v: &GraphView,
    node: &dyn BlockDriver,
    req: &Request,
) -> Result<Vec<Part>, BlockError> {
    let len = req.len as usize;
    let mut buf = c.buffers.get(len)?;
    if !c.structured {
        node.read(v, req.offset, &buf.iovecs()).await?;
        let mut head = Vec::with_capacity(16);
        simple_reply(&mut head, 0, req.cookie);
        return Ok(vec![Part::Bytes(head), Part::Data(Rc::new(buf), 0, len)]);
    }
    // (offset in the request, length, zero)
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    if req.flags & cflag::DF == 0 {
        let top = v.child_id(c.export.root());
        let mut pos = 0usize;
        while pos < len && runs.len() < MAX_READ_RUNS {
            let a = match top {
                Some(top) => {
                    allocation(v, top, req.offset + pos as u64, (len - pos) as u64).await?
                }
                None => break,
            };
            let n = (a.len as usize).min(len - pos);
            match runs.last_mut() {
                Some(last) if last.2 == a.zero => last.1 += n,
                _ => runs.push((pos, n, a.zero)),
            }
            pos += n;
        }
        if pos < len {
            runs.push((pos, len - pos, false));
        }
    }
    if runs.is_empty() || runs.iter().any(|r| !r.2) {
        // Read everything once; holes inside it are simply not sent.
        if runs.iter().all(|r| !r.2) {
            node.read(v, req.offset, &buf.iovecs()).await?;
        } else {
            let iov = buf.iovecs();
            for &(from, n, zero) in &runs {
                if !zero {
                    node.read(
                        v,
                        req.offset + from as u64,
                        &iov.slice(from as u64, n as u64),
                    )
                    .await?;
                }
            }
        }
    }
    if runs.is_empty() {
        runs.push((0, len, false));
    }
    let buf = Rc::new(buf);
    let mut parts = Vec::with_capacity(runs.len() * 2);
    let last = runs.len() - 1;
    for (i, &(from, n, zero)) in runs.iter().enumerate() {
        let flags = if i == last { chunk::FLAG_DONE } else { 0 };
        let at = req.offset + from as u64;
        let mut head = Vec::with_capacity(32);
        if zero {
            hole_chunk(&mut head, flags, req.cookie, at, n as u32);
            parts.push(Part::Bytes(head));
        } else {
            data_chunk(&mut head, flags, req.cookie, at, n as u32);
            parts.push(Part::Bytes(head));
            parts.push(Part::Data(Rc::clone(&buf), from, n));
        }
    }
    Ok(parts)
}

/// BLOCK_STATUS: the extents of each selected context, from one walk of
/// the backing chain.
async fn block_status(c: &Conn, v: &GraphView, req: &Request) -> Result<Vec<Part>, BlockError> {
    let top = v.child_id(c.export.root()).ok_or(BlockError::EmptySlot {
        slot: c.export.root(),
    })?;
    let max = if req.flags & cflag::REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let (mut base, mut depth): (Vec<Extent>, Vec<Extent>) = (Vec::new(), Vec::new());
    let end = req.offset + u64::from(req.len);
    let mut pos = req.offset;
    while pos < end {
        let a = allocation(v, top, pos, end - pos).await?;
        let n = a.len.min(end - pos) as u32;
        let flags = if a.zero { STATE_HOLE | STATE_ZERO } else { 0 };
        let full = push_extent(&mut base, n, flags, max)
            | push_extent(&mut depth, n, a.depth.unwrap_or(0), max);
        pos += u64::from(n);
        if full {
            break;
        }
    }
    let mut out = Vec::new();
    let chosen: Vec<(u32, &[Extent])> = [
        (c.contexts.allocation, CONTEXT_ALLOCATION, &base[..]),
        (c.contexts.depth, CONTEXT_DEPTH, &depth[..]),
    ]
    .into_iter()
    .filter(|x| x.0)
    .map(|x| (x.1, x.2))
    .collect();
    for (i, (id, extents)) in chosen.iter().enumerate() {
        let flags = if i + 1 == chosen.len() {
            chunk::FLAG_DONE
        } else {
            0
        };
        block_status_chunk(&mut out, flags, req.cookie, *id, extents);
    }
    Ok(vec![Part::Bytes(out)])
}

/// Appends an extent, merged with the last when the flags agree. True
/// once `max` extents are full (the reply may then cover less).
fn push_extent(v: &mut Vec<Extent>, len: u32, flags: u32, max: usize) -> bool {
    if let Some(last) = v.last_mut() {
        if last.flags == flags && last.len.checked_add(len).is_some() {
            last.len += len;
            return false;
        }
    }
    if v.len() >= max {
        return true;
    }
    v.push(Extent { len, flags });
    false
}

fn ok_reply(req: &Request) -> Vec<Part> {
    let mut b = Vec::with_capacity(16);
    simple_reply(&mut b, 0, req.cookie);
    vec![Part::Bytes(b)]
}

/// An error reply: a structured error chunk when negotiated (READ must
/// use one), a simple reply otherwise.
fn error_reply(c: &Conn, req: &Request, code: u32, msg: &str) -> Vec<Part> {
    let mut b = Vec::new();
    if c.structured {
        error_chunk(&mut b, req.cookie, code, msg);
    } else {
        simple_reply(&mut b, code, req.cookie);
    }
    vec![Part::Bytes(b)]
}

/// The NBD error for a failed request.
fn errno_of(e: &BlockError) -> u32 {
    match e {
        BlockError::ReadOnly { .. } => err::EPERM,
        BlockError::OutOfRange { .. } => err::EINVAL,
        BlockError::Unsupported { .. } => err::ENOTSUP,
        BlockError::NoMemory(_) => err::ENOMEM,
        BlockError::Io { source, .. } => match source.raw_os_error() {
            Some(libc::ENOSPC) => err::ENOSPC,
            Some(libc::EDQUOT) => err::ENOSPC,
            Some(libc::ENOTSUP) => err::ENOTSUP,
            _ => err::EIO,
        },
        _ => err::EIO,
    }
}
