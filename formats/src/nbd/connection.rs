//! One connection to the server, shared by every thread that uses the
//! node. Requests from any thread are queued and pipelined on it by the
//! connection's thread; its reader thread matches replies to them by
//! cookie, in any order, and wakes each waiting future. When the
//! connection drops, the requests in flight go back to the queue and wait
//! while the connection's thread reconnects: up to `reconnect-delay`, after
//! which they, and every request until the server is back, fail with EIO.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use strata_nbd::client::SIMPLE_REPLY_LEN;
use strata_nbd::client::{chunk_range, parse_block_status, parse_error, parse_hole};
use strata_nbd::client::{ChunkHeader, ReplyKind, ServerError, SimpleReply, CHUNK_HEADER_LEN};
use strata_nbd::consts::chunk;
use strata_nbd::{Command, Extent, Request};

use super::handshake::{negotiate, ClientTls, ExportInfo, Negotiated};
use super::wire::{split, Receiver, Sender, Server};

/// How to reach the export.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The server.
    pub server: Server,
    /// The export's name.
    pub export: String,
    /// TLS, when the node has `tls-creds`.
    pub tls: Option<ClientTls>,
    /// How long requests wait for a lost connection to come back.
    pub reconnect_delay: Duration,
    /// How long opening keeps trying to connect.
    pub open_timeout: Duration,
}

/// How long one connection attempt, and each negotiation read, may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause between connection attempts.
const RETRY: Duration = Duration::from_millis(500);

/// A request as the node hands it over.
pub struct Req {
    /// The command.
    pub cmd: Command,
    /// Command flags (`cflag`).
    pub flags: u16,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte count.
    pub len: u32,
    /// A WRITE's data, kept until the reply in case it must be resent.
    pub payload: Option<Arc<Vec<u8>>>,
    /// A READ's buffer, `len` zeroed bytes; what the server sent lands
    /// here.
    pub buf: Vec<u8>,
}

/// What a request got back.
#[derive(Debug, Default)]
pub struct Answer {
    /// A READ's data.
    pub data: Vec<u8>,
    /// BLOCK_STATUS's first `base:allocation` extent.
    pub extent: Option<Extent>,
}

/// Why a request failed.
#[derive(Debug)]
pub enum Failure {
    /// The server answered with an error.
    Server {
        /// The NBD error value.
        error: u32,
        /// Its message, if it sent one.
        message: String,
    },
    /// No connection, within the reconnect delay.
    Down(String),
}

struct Job {
    req: Req,
    done: oneshot::Sender<Result<Answer, Failure>>,
    /// Bytes of a READ the server's chunks covered so far.
    covered: u64,
    extent: Option<Extent>,
    error: Option<(u32, String)>,
}

impl Job {
    fn finish(self) {
        let res = match self.error {
            Some((error, message)) => Err(Failure::Server { error, message }),
            None => Ok(Answer {
                data: self.req.buf,
                extent: self.extent,
            }),
        };
        let _ = self.done.send(res);
    }

    fn fail(self, why: &str) {
        let _ = self.done.send(Err(Failure::Down(why.to_string())));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Requests wait until then.
    Reconnecting(Instant),
    /// Requests fail until the server is back.
    Down,
}

struct State {
    queue: VecDeque<Job>,
    link: Link,
    closing: bool,
    reader_gone: bool,
    info: ExportInfo,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    opts: ConnectOptions,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type InFlight = Arc<Mutex<HashMap<u64, Job>>>;

fn lock_map(m: &Mutex<HashMap<u64, Job>>) -> MutexGuard<'_, HashMap<u64, Job>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection and its thread.
pub struct Connection {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Connection {
    /// Connects and negotiates, trying again until `open_timeout` has
    /// passed; then serves requests from a thread of its own.
    pub fn open(opts: ConnectOptions) -> io::Result<(Connection, ExportInfo)> {
        let deadline = Instant::now() + opts.open_timeout;
        let n = loop {
            match negotiate(
                &opts.server,
                &opts.export,
                opts.tls.as_ref(),
                ATTEMPT_TIMEOUT,
            ) {
                Ok(n) => break n,
                Err(e) if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("NBD server {}: {e}", opts.server),
                    ))
                }
                Err(_) => std::thread::sleep(RETRY),
            }
        };
        let info = n.info;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                link: Link::Up,
                closing: false,
                reader_gone: false,
                info,
            }),
            wake: Condvar::new(),
            opts,
        });
        let thread = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(&shared, n)
            })?;
        Ok((
            Connection {
                shared,
                thread: Some(thread),
            },
            info,
        ))
    }

    /// Queues `req`; the receiver gets its answer.
    pub fn submit(&self, req: Req) -> oneshot::Receiver<Result<Answer, Failure>> {
        let (done, rx) = oneshot::channel();
        let job = Job {
            req,
            done,
            covered: 0,
            extent: None,
            error: None,
        };
        let mut st = self.shared.lock();
        if st.link == Link::Down || st.closing {
            drop(st);
            job.fail("the NBD server is not reachable");
        } else {
            st.queue.push_back(job);
            self.shared.wake.notify_all();
        }
        rx
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a connection ended.
enum End {
    Closing,
    Lost(String),
}

/// The connection's thread: sends what is queued, and reconnects.
fn run(shared: &Arc<Shared>, first: Negotiated) {
    let server = &shared.opts.server;
    let mut next = Some(first);
    let mut cookie = 0u64;
    loop {
        let n = match next.take() {
            Some(n) => n,
            None => match reconnect(shared) {
                Some(n) => n,
                None => break,
            },
        };
        let info = n.info;
        let (mut tx, rx) = match split(n.socket, n.tls) {
            Ok(halves) => halves,
            Err(e) => {
                tracing::warn!("NBD server {server}: cannot use the socket: {e}");
                lost(shared);
                continue;
            }
        };
        let in_flight: InFlight = Arc::default();
        let reader = std::thread::Builder::new()
            .name("nbd-client-rx".into())
            .spawn({
                let (shared, in_flight) = (Arc::clone(shared), Arc::clone(&in_flight));
                move || {
                    let res = read_replies(rx, &in_flight, info);
                    let mut st = shared.lock();
                    if !st.closing {
                        if let Err(e) = res {
                            tracing::warn!("NBD server {}: {e}", shared.opts.server);
                        }
                    }
                    st.reader_gone = true;
                    shared.wake.notify_all();
                }
            });
        let end = match reader {
            Ok(_) => send_queued(shared, &mut tx, &in_flight, &mut cookie),
            Err(e) => {
                shared.lock().reader_gone = true;
                End::Lost(format!("cannot start a reader thread: {e}"))
            }
        };
        if let End::Closing = end {
            let disc = Request {
                flags: 0,
                command: Command::Disconnect,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            let _ = tx.send(&[&disc.encode()]);
        }
        tx.shutdown();
        // The reader sees the shutdown and ends.
        let mut st = shared.lock();
        while !st.reader_gone {
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.reader_gone = false;
        // What was in flight is sent again, first and in its order.
        let mut back: Vec<(u64, Job)> = lock_map(&in_flight).drain().collect();
        back.sort_by_key(|(c, _)| *c);
        for (_, mut job) in back.into_iter().rev() {
            (job.covered, job.extent, job.error) = (0, None, None);
            st.queue.push_front(job);
        }
        match end {
            End::Closing => {
                for job in st.queue.drain(..) {
                    job.fail("the node was closed");
                }
                break;
            }
            End::Lost(why) => {
                drop(st);
                tracing::warn!("NBD server {server}: connection lost: {why}");
                lost(shared);
            }
        }
    }
}

/// Marks the link lost: requests wait for the reconnect delay.
fn lost(shared: &Shared) {
    let mut st = shared.lock();
    if st.link == Link::Up {
        st.link = Link::Reconnecting(Instant::now() + shared.opts.reconnect_delay);
    }
}

/// Sends queued requests until the connection or the node ends.
fn send_queued(shared: &Shared, tx: &mut Sender, in_flight: &InFlight, cookie: &mut u64) -> End {
    let mut batch: VecDeque<Job> = VecDeque::new();
    loop {
        {
            let mut st = shared.lock();
            loop {
                if st.closing {
                    return End::Closing;
                }
                if st.reader_gone {
                    return End::Lost("the reader stopped".into());
                }
                if !st.queue.is_empty() {
                    break;
                }
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let n = st.queue.len().min(64);
            batch.extend(st.queue.drain(..n));
        }
        // Every request of the batch goes in the table, then out in one
        // send; if it fails, the table's requests are sent again.
        let mut headers = Vec::with_capacity(batch.len());
        let mut payloads = Vec::new();
        {
            let mut table = lock_map(in_flight);
            for job in batch.drain(..) {
                *cookie += 1;
                headers.push(
                    Request {
                        flags: job.req.flags,
                        command: job.req.cmd,
                        cookie: *cookie,
                        offset: job.req.offset,
                        len: job.req.len,
                    }
                    .encode(),
                );
                payloads.push(job.req.payload.clone());
                table.insert(*cookie, job);
            }
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(headers.len() * 2);
        for (h, p) in headers.iter().zip(&payloads) {
            parts.push(h);
            if let Some(p) = p {
                parts.push(p);
            }
        }
        if let Err(e) = tx.send(&parts) {
            return End::Lost(format!("cannot send: {e}"));
        }
    }
}

/// Tries to connect again until it works or the node closes; past the
/// reconnect delay, fails what waits and what comes.
fn reconnect(shared: &Shared) -> Option<Negotiated> {
    let opts = &shared.opts;
    let mut logged = false;
    loop {
        if shared.lock().closing {
            return None;
        }
        match negotiate(
            &opts.server,
            &opts.export,
            opts.tls.as_ref(),
            ATTEMPT_TIMEOUT,
        ) {
            Ok(n) => {
                let mut st = shared.lock();
                if n.info.size != st.info.size {
                    // Another disk, or this one resized behind our back:
                    // serving it would mix two images.
                    if !logged {
                        tracing::error!(
                            "NBD server {}: the export is now {} bytes, not {}; not resuming",
                            opts.server,
                            n.info.size,
                            st.info.size
                        );
                        logged = true;
                    }
                } else {
                    st.link = Link::Up;
                    st.info = n.info;
                    tracing::info!("NBD server {}: reconnected", opts.server);
                    return Some(n);
                }
            }
            Err(e) if !logged => {
                tracing::warn!("NBD server {}: cannot reconnect yet: {e}", opts.server);
                logged = true;
            }
            Err(_) => {}
        }
        let mut st = shared.lock();
        let now = Instant::now();
        if let Link::Reconnecting(deadline) = st.link {
            if now >= deadline {
                st.link = Link::Down;
                tracing::error!(
                    "NBD server {}: not back within reconnect-delay ({:?}); requests fail until it is",
                    opts.server,
                    opts.reconnect_delay
                );
                for job in st.queue.drain(..) {
                    job.fail("the NBD server did not come back within reconnect-delay");
                }
            }
        }
        let pause = match st.link {
            Link::Reconnecting(deadline) => RETRY.min(deadline.saturating_duration_since(now)),
            _ => RETRY,
        };
        let _ = shared
            .wake
            .wait_timeout(st, pause.max(Duration::from_millis(10)))
            .unwrap_or_else(|e| e.into_inner());
    }
}

fn broke(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, ServerError(msg).to_string())
}

fn read_full(rx: &mut Receiver, buf: &mut [u8]) -> io::Result<()> {
    rx.read_exact(buf)
}

/// Reads replies until the connection ends or the server breaks the
/// protocol.
fn read_replies(mut rx: Receiver, in_flight: &InFlight, info: ExportInfo) -> io::Result<()> {
    loop {
        let mut magic = [0u8; 4];
        read_full(&mut rx, &mut magic)?;
        let kind = ReplyKind::of(magic).map_err(|e| broke(e.0))?;
        match kind {
            ReplyKind::Simple => {
                let mut h = [0u8; SIMPLE_REPLY_LEN - 4];
                read_full(&mut rx, &mut h)?;
                let r = SimpleReply::parse(&h);
                let mut job = take(in_flight, r.cookie)?;
                if r.error != 0 {
                    job.error = Some((r.error, String::new()));
                } else if job.req.cmd == Command::Read {
                    if info.structured {
                        in_flight_put(in_flight, r.cookie, job);
                        return Err(broke(
                            "a simple reply to a READ after structured replies were agreed".into(),
                        ));
                    }
                    if let Err(e) = read_full(&mut rx, &mut job.req.buf) {
                        in_flight_put(in_flight, r.cookie, job);
                        return Err(e);
                    }
                }
                job.finish();
            }
            ReplyKind::Structured => {
                let mut h = [0u8; CHUNK_HEADER_LEN - 4];
                read_full(&mut rx, &mut h)?;
                let h = ChunkHeader::parse(&h);
                let mut job = take(in_flight, h.cookie)?;
                let read_len = if job.req.cmd == Command::Read {
                    job.req.len
                } else {
                    0
                };
                if let Err(e) = h.check(read_len) {
                    in_flight_put(in_flight, h.cookie, job);
                    return Err(broke(e.0));
                }
                if let Err(e) = chunk(&mut rx, &h, &mut job, info) {
                    in_flight_put(in_flight, h.cookie, job);
                    return Err(e);
                }
                if !h.done() {
                    in_flight_put(in_flight, h.cookie, job);
                } else if job.error.is_none()
                    && job.req.cmd == Command::Read
                    && job.covered != u64::from(job.req.len)
                {
                    let msg = format!(
                        "a READ of {} bytes answered for {} of them",
                        job.req.len, job.covered
                    );
                    in_flight_put(in_flight, h.cookie, job);
                    return Err(broke(msg));
                } else {
                    job.finish();
                }
            }
        }
    }
}

/// Takes the request a reply is for out of the table while its reply is
/// read, so the sender is never held up by the socket.
fn take(in_flight: &InFlight, cookie: u64) -> io::Result<Job> {
    lock_map(in_flight)
        .remove(&cookie)
        .ok_or_else(|| broke(format!("a reply for cookie {cookie}, which no request has")))
}

fn in_flight_put(in_flight: &InFlight, cookie: u64, job: Job) {
    lock_map(in_flight).insert(cookie, job);
}

/// Reads one chunk's payload into its request.
fn chunk(rx: &mut Receiver, h: &ChunkHeader, job: &mut Job, info: ExportInfo) -> io::Result<()> {
    let (offset, len) = (job.req.offset, job.req.len);
    match h.ty {
        chunk::NONE => {}
        chunk::OFFSET_DATA => {
            let mut off = [0u8; 8];
            read_full(rx, &mut off)?;
            let n = u64::from(h.len - 8);
            let start =
                chunk_range(u64::from_be_bytes(off), n, offset, len).map_err(|e| broke(e.0))?;
            read_full(rx, &mut job.req.buf[start..start + n as usize])?;
            job.covered += n;
        }
        chunk::OFFSET_HOLE => {
            let mut b = [0u8; 12];
            read_full(rx, &mut b)?;
            let (at, n) = parse_hole(&b);
            let start = chunk_range(at, u64::from(n), offset, len).map_err(|e| broke(e.0))?;
            job.req.buf[start..start + n as usize].fill(0);
            job.covered += u64::from(n);
        }
        ty => {
            let mut b = vec![0u8; h.len as usize];
            read_full(rx, &mut b)?;
            if ty == chunk::BLOCK_STATUS {
                let (id, extents) = parse_block_status(&b);
                if Some(id) == info.allocation && job.req.cmd == Command::BlockStatus {
                    let first = extents[0];
                    if first.len == 0 {
                        return Err(broke("a block status extent of 0 bytes".into()));
                    }
                    job.extent.get_or_insert(first);
                }
            } else {
                let (error, message) = parse_error(&b).map_err(|e| broke(e.0))?;
                // A server may send an error of 0, which is no error.
                job.error
                    .get_or_insert((if error == 0 { 5 } else { error }, message));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    use strata_nbd::consts::{info, opt, rep, tflag, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES};
    use strata_nbd::consts::{IHAVEOPT, NBDMAGIC};
    use strata_nbd::{option_reply, simple_reply, structured_header, REQUEST_LEN};

    use super::*;

    /// What a server answers to a cookie.
    type Reply = fn(u64) -> Vec<u8>;

    /// A server that negotiates as QEMU's does, then answers the first
    /// request with what `reply` makes of its cookie, and goes away.
    fn hostile(path: &std::path::Path, reply: Reply) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            drop(l);
            let mut hello = NBDMAGIC.to_be_bytes().to_vec();
            hello.extend(IHAVEOPT.to_be_bytes());
            hello.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            s.write_all(&hello).unwrap();
            let mut flags = [0u8; 4];
            s.read_exact(&mut flags).unwrap();
            loop {
                let mut h = [0u8; 16];
                s.read_exact(&mut h).unwrap();
                let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let mut d = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
                s.read_exact(&mut d).unwrap();
                let mut out = Vec::new();
                if o == opt::SET_META_CONTEXT {
                    let mut c = 1u32.to_be_bytes().to_vec();
                    c.extend(b"base:allocation");
                    option_reply(&mut out, o, rep::META_CONTEXT, &c);
                }
                if o == opt::GO {
                    let mut e = info::EXPORT.to_be_bytes().to_vec();
                    e.extend((1u64 << 20).to_be_bytes());
                    e.extend((tflag::HAS_FLAGS | tflag::SEND_FLUSH).to_be_bytes());
                    option_reply(&mut out, o, rep::INFO, &e);
                }
                option_reply(&mut out, o, rep::ACK, &[]);
                s.write_all(&out).unwrap();
                if o == opt::GO {
                    break;
                }
            }
            let mut r = [0u8; REQUEST_LEN];
            s.read_exact(&mut r).unwrap();
            let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
            let _ = s.write_all(&reply(cookie));
            std::thread::sleep(Duration::from_millis(200));
        })
    }

    /// A connection to the server at `path` that does not reconnect.
    fn open(path: std::path::PathBuf) -> (Connection, ExportInfo) {
        Connection::open(ConnectOptions {
            server: Server::Unix(path),
            export: "x".into(),
            tls: None,
            reconnect_delay: Duration::ZERO,
            open_timeout: Duration::ZERO,
        })
        .unwrap()
    }

    fn read_4k(conn: &Connection) -> Result<Answer, Failure> {
        let rx = conn.submit(Req {
            cmd: Command::Read,
            flags: 0,
            offset: 4096,
            len: 4096,
            payload: None,
            buf: vec![0; 4096],
        });
        futures::executor::block_on(rx).expect("an answer")
    }

    #[test]
    fn a_server_that_breaks_the_protocol_fails_the_request_and_nothing_else() {
        let replies: [(&str, Reply); 6] = [
            ("bad magic", |_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]),
            ("unknown cookie", |c| {
                let mut v = Vec::new();
                simple_reply(&mut v, 0, c + 1);
                v
            }),
            ("data past the request", |c| {
                let mut v = Vec::new();
                structured_header(&mut v, chunk::FLAG_DONE, chunk::OFFSET_DATA, c, 8 + 4096);
                v.extend(8192u64.to_be_bytes());
                v.extend([1u8; 4096]);
                v
            }),
            ("a chunk of 4 GiB", |c| {
                let mut v = Vec::new();
                structured_header(
                    &mut v,
                    chunk::FLAG_DONE,
                    chunk::BLOCK_STATUS,
                    c,
                    u32::MAX - 3,
                );
                v
            }),
            ("a READ half answered", |c| {
                let mut v = Vec::new();
                structured_header(&mut v, chunk::FLAG_DONE, chunk::OFFSET_HOLE, c, 12);
                v.extend(4096u64.to_be_bytes());
                v.extend(2048u32.to_be_bytes());
                v
            }),
            ("an error message longer than its chunk", |c| {
                let mut v = Vec::new();
                structured_header(&mut v, chunk::FLAG_DONE, chunk::ERROR, c, 8);
                v.extend(5u32.to_be_bytes());
                v.extend(900u16.to_be_bytes());
                v.extend(b"ab");
                v
            }),
        ];
        for (what, reply) in replies {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("nbd.sock");
            let server = hostile(&path, reply);
            let (conn, info) = open(path);
            assert_eq!(info.size, 1 << 20);
            assert!(info.structured && info.allocation == Some(1));
            match read_4k(&conn) {
                Err(Failure::Down(_)) => {}
                other => panic!("{what}: {other:?}"),
            }
            server.join().unwrap();
            drop(conn);
        }
    }

    #[test]
    fn an_error_reply_reaches_the_request_with_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let server = hostile(&path, |c| {
            let mut v = Vec::new();
            strata_nbd::error_chunk(&mut v, c, 28, "the disk is full");
            v
        });
        let (conn, _) = open(path);
        match read_4k(&conn) {
            Err(Failure::Server { error: 28, message }) => assert_eq!(message, "the disk is full"),
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
    }
}
