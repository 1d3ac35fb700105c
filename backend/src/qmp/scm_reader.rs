//! A QMP session's input with the descriptors that come with it: QEMU's
//! `getfd` names a socket the client sent alongside the command
//! (`SCM_RIGHTS`), as libvirt hands listening sockets to a running daemon.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// Descriptors taken with one receive; the kernel closes any beyond.
const MAX_FDS: usize = 16;

/// Reads the stream and keeps the descriptors that arrive with it.
pub struct ScmReader {
    stream: UnixStream,
    /// Received, not yet claimed by a command.
    pub fds: Arc<Mutex<Vec<OwnedFd>>>,
}

impl ScmReader {
    /// Reads `stream`; received descriptors go to `fds`.
    pub fn new(stream: UnixStream, fds: Arc<Mutex<Vec<OwnedFd>>>) -> ScmReader {
        ScmReader { stream, fds }
    }
}

impl Read for ScmReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<i32>()) as u32) };
        // u64 keeps the control buffer aligned for cmsghdr.
        let mut control = vec![0u64; (space as usize).div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the fields set below point
        // at live buffers of the stated lengths.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * 8;
        let n = loop {
            // SAFETY: `msg` describes `buf` and `control`, both live.
            let n =
                unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the CMSG_* walk stays within `msg_controllen`, which the
        // kernel set; SCM_RIGHTS payloads are arrays of new descriptors
        // that this process now owns.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<i32>();
                    let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<i32>() {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        // A client that floods descriptors without commands to claim
        // them keeps only the latest few.
        let excess = fds.len().saturating_sub(MAX_FDS);
        fds.drain(..excess);
        Ok(n)
    }
}
