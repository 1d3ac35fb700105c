//! A connection's socket during transmission, read and written through the
//! thread's io_uring so that one thread serves many requests at once.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;

use io_uring::{opcode, types};
use strata_runtime::reactor::Reactor;

/// Bytes read from the socket at once: many request headers (and small
/// payloads) arrive in one receive.
const READ_AHEAD: usize = 64 << 10;

/// The socket and the thread's ring.
pub struct Transport {
    fd: OwnedFd,
    reactor: Rc<Reactor>,
    /// Bytes received and not yet consumed: `buf[start..end]`.
    buf: std::cell::RefCell<ReadAhead>,
}

struct ReadAhead {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Transport {
    /// Wraps a connected socket; it is closed when the transport drops.
    pub fn new(fd: OwnedFd) -> io::Result<Transport> {
        Ok(Transport {
            fd,
            reactor: Reactor::current()?,
            buf: std::cell::RefCell::new(ReadAhead {
                data: vec![0; READ_AHEAD],
                start: 0,
                end: 0,
            }),
        })
    }

    /// Fills `buf`. `Ok(false)` when the peer closed the connection before
    /// the first byte; a close in the middle is an error. Small reads are
    /// served from what one receive brought in; large ones go straight
    /// into `buf`. Only one read may run at a time.
    pub async fn read_exact(&self, buf: &mut [u8]) -> io::Result<bool> {
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
                if done == 0 {
                    return Ok(false);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the peer closed the connection {done} bytes into a message"),
                ));
            }
            if direct {
                done += got;
            }
        }
        Ok(true)
    }

    /// One receive into `buf`: the bytes received, 0 at end of file.
    async fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
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

    /// Writes every byte of `bufs`, in order.
    pub async fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut first = 0;
        while first < iov.len() {
            let mut msg: libc::msghdr = empty_msghdr();
            msg.msg_iov = iov[first..].as_mut_ptr();
            msg.msg_iovlen = (iov.len() - first).min(libc::UIO_MAXIOV as usize);
            let entry = opcode::SendMsg::new(types::Fd(self.fd.as_raw_fd()), &msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build();
            // SAFETY: `msg`, the iovecs and the buffers they point at are
            // borrowed for the whole await; dropping the op waits for the
            // kernel to let go of them.
            let n = unsafe { self.reactor.push(entry) }.await;
            if n < 0 {
                let e = io::Error::from_raw_os_error(-n);
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut n = n as usize;
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `n` is less than the segment's length, so the
                    // new base stays inside the same buffer.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
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

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all zeroes is an empty message.
    unsafe { std::mem::zeroed() }
}
