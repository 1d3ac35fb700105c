//! A connection's socket during transmission. What the socket can take or
//! already holds goes with one plain non-blocking system call; only a
//! socket that must be waited for goes through the thread's io_uring, so
//! one thread serves many requests at once without blocking. After
//! STARTTLS, the bytes on the socket are the TLS session's records.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;

use io_uring::{opcode, types};
use rustls::ServerConnection;
use strata_formats::nbd::wire::open_records;
use strata_runtime::reactor::Reactor;

/// Bytes read from the socket at once: many request headers (and small
/// payloads) arrive in one receive.
const READ_AHEAD: usize = 64 << 10;

/// Receives that go straight to the ring after a plain one found the
/// socket empty. A client that waits for each reply before it sends again
/// (QD1) leaves the socket empty every time; one that keeps many requests
/// in flight rarely does, and pays for a guess that missed with at most
/// this many receives through the ring, each of which finishes at once
/// when bytes are there.
const SKIP_AFTER_MISS: u8 = 7;

/// The socket and the thread's ring.
pub struct Transport {
    fd: OwnedFd,
    reactor: Rc<Reactor>,
    /// Bytes received and not yet consumed: `buf[start..end]`. Under TLS,
    /// records not yet handed to the session.
    buf: RefCell<ReadAhead>,
    /// The TLS session. Reads and writes borrow it only between awaits.
    tls: Option<RefCell<ServerConnection>>,
    /// Records to send, reused from one write to the next.
    sealed: RefCell<Vec<u8>>,
    /// A send waits for room in the socket's buffer.
    send_waiting: Cell<bool>,
    /// Receives left to send straight to the ring ([`SKIP_AFTER_MISS`]).
    skip_plain_recv: Cell<u8>,
}

struct ReadAhead {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Transport {
    /// Wraps a connected socket, with its TLS session if STARTTLS made
    /// one; the socket is closed when the transport drops.
    pub fn new(fd: OwnedFd, tls: Option<ServerConnection>) -> io::Result<Transport> {
        Ok(Transport {
            fd,
            reactor: Reactor::current()?,
            buf: RefCell::new(ReadAhead {
                data: vec![0; READ_AHEAD],
                start: 0,
                end: 0,
            }),
            tls: tls.map(RefCell::new),
            sealed: RefCell::default(),
            send_waiting: Cell::new(false),
            skip_plain_recv: Cell::new(0),
        })
    }

    /// Fills `buf` with the session's plaintext, as
    /// [`Transport::read_exact`].
    async fn read_exact_tls(
        &self,
        tls: &RefCell<ServerConnection>,
        buf: &mut [u8],
    ) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            match tls.borrow_mut().reader().read(&mut buf[done..]) {
                // close_notify.
                Ok(0) => return closed(done),
                Ok(n) => {
                    done += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let mut data = {
                let mut ra = self.buf.borrow_mut();
                if ra.start < ra.end {
                    let (from, to) = (ra.start, ra.end);
                    ra.start += open_records(&mut tls.borrow_mut(), &ra.data[from..to])?;
                    continue;
                }
                std::mem::take(&mut ra.data)
            };
            let res = self.recv(&mut data, 0).await;
            let mut ra = self.buf.borrow_mut();
            ra.data = data;
            ra.start = 0;
            ra.end = *res.as_ref().unwrap_or(&0);
            if res? == 0 {
                return closed(done);
            }
        }
        Ok(true)
    }

    /// Seals `bufs` into records and sends them, as
    /// [`Transport::write_all`].
    async fn write_all_tls(
        &self,
        tls: &RefCell<ServerConnection>,
        bufs: &[&[u8]],
    ) -> io::Result<()> {
        let mut parts: Vec<&[u8]> = bufs.to_vec();
        let mut first = 0;
        loop {
            // The session takes what its send buffer holds, then the
            // records go out before it takes more.
            let mut sealed = std::mem::take(&mut *self.sealed.borrow_mut());
            {
                let mut tls = tls.borrow_mut();
                while first < parts.len() {
                    let slices: Vec<IoSlice<'_>> =
                        parts[first..].iter().map(|b| IoSlice::new(b)).collect();
                    let n = tls.writer().write_vectored(&slices)?;
                    if n == 0 {
                        break;
                    }
                    first += advance(&mut parts[first..], n);
                }
                while tls.wants_write() {
                    tls.write_tls(&mut sealed)?;
                }
            }
            let res = self.send_all(&[&sealed]).await;
            sealed.clear();
            *self.sealed.borrow_mut() = sealed;
            res?;
            if first >= parts.len() {
                return Ok(());
            }
        }
    }

    /// True when bytes already received wait to be read, so a read may not
    /// need a system call.
    pub fn buffered(&self) -> bool {
        let ra = self.buf.borrow();
        ra.end > ra.start
    }

    /// True while a send waits for the peer to make room by reading.
    pub fn send_waiting(&self) -> bool {
        self.send_waiting.get()
    }

    /// Fills `buf`. `Ok(false)` when the peer closed the connection before
    /// the first byte; a close in the middle is an error. Small reads are
    /// served from what one receive brought in; large ones go straight
    /// into `buf`. Only one read may run at a time.
    pub async fn read_exact(&self, buf: &mut [u8]) -> io::Result<bool> {
        if let Some(tls) = &self.tls {
            return self.read_exact_tls(tls, buf).await;
        }
        let mut done = 0;
        while done < buf.len() {
            {
                let mut ra = self.buf.borrow_mut();
                let n = (ra.end - ra.start).min(buf.len() - done);
                if n > 0 {
                    let from = ra.start;
                    buf[done..done + n].copy_from_slice(&ra.data[from..from + n]);
                    ra.start += n;
                    done += n;
                    continue;
                }
            }
            let direct = buf.len() - done >= READ_AHEAD / 2;
            let got = if direct {
                self.recv(&mut buf[done..], libc::MSG_WAITALL).await?
            } else {
                // The borrow of the read-ahead buffer is not held across
                // the await: it is moved out and back.
                let mut data = std::mem::take(&mut self.buf.borrow_mut().data);
                let res = self.recv(&mut data, 0).await;
                let mut ra = self.buf.borrow_mut();
                ra.data = data;
                ra.start = 0;
                ra.end = *res.as_ref().unwrap_or(&0);
                res?
            };
            if got == 0 {
                return closed(done);
            }
            if direct {
                done += got;
            }
        }
        Ok(true)
    }

    /// One receive into `buf`: the bytes received, 0 at end of file.
    async fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
        // Bytes already there come with one plain system call; only a
        // socket with nothing to read waits on the ring.
        match self.skip_plain_recv.get() {
            0 => {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe {
                    libc::recv(
                        self.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 || (n == 0 && !buf.is_empty()) {
                    return Ok(n as usize);
                }
                self.skip_plain_recv.set(SKIP_AFTER_MISS);
            }
            n => self.skip_plain_recv.set(n - 1),
        }
        loop {
            let entry = opcode::Recv::new(
                types::Fd(self.fd.as_raw_fd()),
                buf.as_mut_ptr(),
                buf.len().min(u32::MAX as usize) as u32,
            )
            .flags(flags)
            .build();
            // SAFETY: `buf` is borrowed for the whole await; dropping the
            // op waits for the kernel to let go of it.
            let n = unsafe { self.reactor.push(entry) }.await;
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::from_raw_os_error(-n);
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Writes every byte of `bufs`, in order. Only one write may run at a
    /// time.
    pub async fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        match &self.tls {
            Some(tls) => self.write_all_tls(tls, bufs).await,
            None => self.send_all(bufs).await,
        }
    }

    /// Sends every byte of `bufs` on the socket, in order.
    async fn send_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut first = 0;
        let mut direct = true;
        while first < iov.len() {
            let mut msg: libc::msghdr = empty_msghdr();
            msg.msg_iov = iov[first..].as_mut_ptr();
            msg.msg_iovlen = (iov.len() - first).min(libc::UIO_MAXIOV as usize);
            if direct {
                // Room in the socket's buffer takes one plain system call.
                // SAFETY: `msg` and the iovecs point at live buffers.
                let n = unsafe {
                    libc::sendmsg(
                        self.fd.as_raw_fd(),
                        &msg,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                direct = false;
                if n > 0 {
                    advance_iov(&mut iov, &mut first, n as usize);
                    continue;
                }
            }
            let entry = opcode::SendMsg::new(types::Fd(self.fd.as_raw_fd()), &msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build();
            self.send_waiting.set(true);
            // SAFETY: `msg`, the iovecs and the buffers they point at are
            // borrowed for the whole await; dropping the op waits for the
            // kernel to let go of them.
            let n = unsafe { self.reactor.push(entry) }.await;
            self.send_waiting.set(false);
            if n < 0 {
                let e = io::Error::from_raw_os_error(-n);
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            advance_iov(&mut iov, &mut first, n as usize);
        }
        Ok(())
    }

    /// Ends the connection both ways: pending reads return end of file.
    /// Through the ring, which the thread's seccomp filter allows.
    pub async fn shutdown(&self) {
        let entry = opcode::Shutdown::new(types::Fd(self.fd.as_raw_fd()), libc::SHUT_RDWR).build();
        // SAFETY: shutdown references no memory.
        let _ = unsafe { self.reactor.push(entry) }.await;
    }
}

/// The end of the stream `done` bytes into a message: clean only at a
/// message's start.
fn closed(done: usize) -> io::Result<bool> {
    if done == 0 {
        return Ok(false);
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the peer closed the connection {done} bytes into a message"),
    ))
}

/// Drops the first `n` bytes of `parts`; the number of parts used up.
fn advance(parts: &mut [&[u8]], mut n: usize) -> usize {
    let mut used = 0;
    for p in parts.iter_mut() {
        if n >= p.len() {
            n -= p.len();
            used += 1;
        } else {
            *p = &p[n..];
            break;
        }
    }
    used
}

/// Drops the first `n` bytes sent from `iov[*first..]`.
fn advance_iov(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iov.len() {
        let v = &mut iov[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            *first += 1;
        } else {
            // SAFETY: `n` is less than the segment's length, so the new
            // base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
}

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all zeroes is an empty message.
    unsafe { std::mem::zeroed() }
}
