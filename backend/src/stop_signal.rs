//! A stop request that wakes a thread sleeping on a listening socket, so
//! the accept loops of an idle daemon sleep until a client or a stop
//! comes, instead of waking on a timer to look.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Set once; from then on every wait returns at once.
pub struct StopSignal {
    requested: AtomicBool,
    /// Readable once requested: it is never drained.
    fd: EventFd,
}

impl StopSignal {
    /// A signal not yet requested.
    pub fn new() -> std::io::Result<StopSignal> {
        Ok(StopSignal {
            requested: AtomicBool::new(false),
            fd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the waiting thread to stop.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.fd.write(1);
    }

    /// True once [`request`](Self::request) ran.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Sleeps until `listener` has a connection to accept (true) or a
    /// stop is requested (false).
    pub fn wait_readable(&self, listener: RawFd) -> anyhow::Result<bool> {
        let mut pfds = [
            libc::pollfd {
                fd: listener,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if self.requested() {
                return Ok(false);
            }
            // SAFETY: two valid pollfds, for the duration of the call.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("poll on the listening socket failed");
            }
            if self.requested() {
                return Ok(false);
            }
            if pfds[0].revents != 0 {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_request_wakes_the_waiter_and_a_client_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        let s = Arc::new(StopSignal::new().unwrap());
        let fd = l.as_raw_fd();
        let _c = std::os::unix::net::UnixStream::connect(dir.path().join("s")).unwrap();
        assert!(s.wait_readable(fd).unwrap(), "a pending client");
        let _ = l.accept().unwrap();
        let t = std::thread::spawn({
            let s = Arc::clone(&s);
            move || s.wait_readable(fd).unwrap()
        });
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        s.request();
        assert!(!t.join().unwrap(), "woken by the request");
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(!s.wait_readable(fd).unwrap(), "stays requested");
    }
}
