//! The backend-request channel: the socket the frontend hands over with
//! SET_BACKEND_REQ_FD, on which Strata tells it that the config space
//! changed (a resize).
//!
//! The vhost crate parses SET_BACKEND_REQ_FD itself, and the channel it
//! makes of the socket cannot send CONFIG_CHANGE_MSG. So the connection
//! loop peeks at each message header, and takes this one message off the
//! socket before the vhost crate sees it.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use vhost::vhost_user::message::{BackendReq, FrontendReq};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The size of a vhost-user message header.
const HEADER: usize = 12;
/// Header flags: protocol version 1, a reply, a request for one.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// A message header (the vhost crate keeps its own private).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    request: u32,
    flags: u32,
    size: u32,
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; HEADER]) -> Header {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// The ack of a request: a u64 payload, zero for success.
    fn reply_to(request: u32) -> Header {
        Header {
            request,
            flags: VERSION_1 | REPLY,
            size: 8,
        }
    }
}

/// How long a config-change message waits for the frontend's ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A frontend's backend-request channel.
pub struct Channel {
    sock: Mutex<UnixStream>,
    /// REPLY_ACK was negotiated: the frontend acks each message.
    reply_ack: bool,
}

impl Channel {
    /// Tells the frontend that the config space changed, and waits for
    /// its ack when REPLY_ACK was negotiated.
    pub fn config_changed(&self) -> io::Result<()> {
        let code = u32::from(BackendReq::CONFIG_CHANGE_MSG);
        let hdr = Header {
            request: code,
            flags: VERSION_1 | if self.reply_ack { NEED_REPLY } else { 0 },
            size: 0,
        };
        let mut sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        sock.write_all(&hdr.to_bytes())?;
        if !self.reply_ack {
            return Ok(());
        }
        sock.set_read_timeout(Some(ACK_TIMEOUT))?;
        let (mut h, mut v) = ([0u8; HEADER], [0u8; 8]);
        sock.read_exact(&mut h)
            .and_then(|()| sock.read_exact(&mut v))
            .map_err(|e| io::Error::new(e.kind(), format!("no ack for the config change: {e}")))?;
        let reply = Header::from_bytes(&h);
        if reply.request != code || reply.flags & REPLY == 0 || reply.size != 8 {
            return Err(io::Error::other(format!(
                "the frontend answered the config change with {reply:?}"
            )));
        }
        let value = u64::from_le_bytes(v);
        if value != 0 {
            return Err(io::Error::other(format!(
                "the frontend failed the config change ({value})"
            )));
        }
        Ok(())
    }
}

/// The code of the next message on `sock`, without taking it off the
/// socket; `None` at end of stream.
pub(crate) fn peek_code(sock: &UnixStream) -> io::Result<Option<u32>> {
    let mut hdr = [0u8; HEADER];
    loop {
        // SAFETY: `hdr` is valid for HEADER bytes for the whole call.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                hdr.as_mut_ptr().cast(),
                HEADER,
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        match n {
            0 => return Ok(None),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // A partial header: the vhost crate reports it.
            n if (n as usize) < HEADER => return Ok(Some(u32::MAX)),
            _ => return Ok(Some(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]))),
        }
    }
}

/// The code of SET_BACKEND_REQ_FD.
pub(crate) fn is_set_backend_req_fd(code: u32) -> bool {
    code == u32::from(FrontendReq::SET_BACKEND_REQ_FD)
}

/// Takes SET_BACKEND_REQ_FD off `sock` and answers it. `negotiated` says
/// whether the BACKEND_REQ protocol feature was acked, `reply_ack`
/// whether REPLY_ACK was. An error ends the connection, as the vhost
/// crate's own errors do.
pub(crate) fn take_channel(
    sock: &UnixStream,
    negotiated: bool,
    reply_ack: bool,
) -> io::Result<Channel> {
    let mut hdr_buf = [0u8; HEADER];
    let mut fds = [0; 4];
    let mut iov = [libc::iovec {
        iov_base: hdr_buf.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `hdr_buf`, which outlives the call.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }?;
    // SAFETY: recv_with_fds made these descriptors ours.
    let files: Vec<OwnedFd> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n != HEADER {
        return Err(bad("a short SET_BACKEND_REQ_FD header"));
    }
    let hdr = Header::from_bytes(&hdr_buf);
    // The payload is a u64 that carries nothing; it is bounded all the
    // same, as a peer may claim anything.
    let size = hdr.size as usize;
    if size > 64 {
        return Err(bad(&format!("SET_BACKEND_REQ_FD with a {size}-byte body")));
    }
    let mut body = [0u8; 64];
    (&*sock).read_exact(&mut body[..size])?;
    let res = check(negotiated, files);
    if reply_ack && hdr.flags & NEED_REPLY != 0 {
        let reply = Header::reply_to(hdr.request).to_bytes();
        let ack = u64::from(res.is_err()).to_le_bytes();
        (&*sock).write_all(&[&reply[..], &ack[..]].concat())?;
    }
    let stream = res?;
    Ok(Channel {
        sock: Mutex::new(stream),
        reply_ack,
    })
}

fn check(negotiated: bool, files: Vec<OwnedFd>) -> io::Result<UnixStream> {
    if !negotiated {
        return Err(bad(
            "SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature",
        ));
    }
    let [fd]: [OwnedFd; 1] = files
        .try_into()
        .map_err(|f: Vec<_>| bad(&format!("SET_BACKEND_REQ_FD with {} fds", f.len())))?;
    let domain = sockopt(&fd, libc::SO_DOMAIN)?;
    let kind = sockopt(&fd, libc::SO_TYPE)?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(bad(
            "SET_BACKEND_REQ_FD with a descriptor that is not a unix stream socket",
        ));
    }
    Ok(UnixStream::from(fd))
}

fn sockopt(fd: &impl AsFd, opt: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the call, and `len` is v's size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "SET_BACKEND_REQ_FD with a descriptor that is not a socket: {}",
                io::Error::last_os_error()
            ),
        ));
    }
    Ok(v)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(reply_ack: bool) -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let ch = Channel {
            sock: Mutex::new(a),
            reply_ack,
        };
        (ch, b)
    }

    fn read_header(sock: &mut UnixStream) -> Header {
        let mut buf = [0u8; HEADER];
        sock.read_exact(&mut buf).unwrap();
        Header::from_bytes(&buf)
    }

    fn ack(peer: &mut UnixStream, value: u64) {
        let code = u32::from(BackendReq::CONFIG_CHANGE_MSG);
        peer.write_all(&Header::reply_to(code).to_bytes()).unwrap();
        peer.write_all(&value.to_le_bytes()).unwrap();
    }

    #[test]
    fn a_config_change_waits_for_the_ack() {
        let (ch, mut peer) = pair(true);
        let frontend = std::thread::spawn(move || {
            let hdr = read_header(&mut peer);
            assert_eq!(
                hdr,
                Header {
                    request: 2,
                    flags: VERSION_1 | NEED_REPLY,
                    size: 0
                }
            );
            ack(&mut peer, 0);
            peer
        });
        ch.config_changed().unwrap();
        frontend.join().unwrap();
    }

    #[test]
    fn a_refused_config_change_is_an_error() {
        let (ch, mut peer) = pair(true);
        let frontend = std::thread::spawn(move || {
            let _ = read_header(&mut peer);
            ack(&mut peer, 1);
            peer
        });
        let e = ch.config_changed().unwrap_err();
        assert!(e.to_string().contains("failed the config change"), "{e}");
        frontend.join().unwrap();
    }

    #[test]
    fn without_reply_ack_nothing_is_awaited() {
        let (ch, mut peer) = pair(false);
        ch.config_changed().unwrap();
        assert_eq!(read_header(&mut peer).flags, VERSION_1);
    }

    #[test]
    fn the_channel_is_taken_with_its_socket_and_acked() {
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        let (chan_ours, mut chan_theirs) = UnixStream::pair().unwrap();
        let hdr = Header {
            request: u32::from(FrontendReq::SET_BACKEND_REQ_FD),
            flags: VERSION_1 | NEED_REPLY,
            size: 8,
        };
        let msg = [&hdr.to_bytes()[..], &0u64.to_le_bytes()[..]].concat();
        frontend
            .send_with_fd(&msg[..], chan_ours.as_raw_fd())
            .unwrap();
        drop(chan_ours);
        assert!(is_set_backend_req_fd(peek_code(&ours).unwrap().unwrap()));
        let ch = take_channel(&ours, true, true).unwrap();
        let mut reply = [0u8; HEADER + 8];
        frontend.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..HEADER], &Header::reply_to(hdr.request).to_bytes());
        assert_eq!(&reply[HEADER..], &0u64.to_le_bytes());
        let backend = std::thread::spawn(move || ch.config_changed());
        assert_eq!(read_header(&mut chan_theirs).request, 2);
        ack(&mut chan_theirs, 0);
        backend.join().unwrap().unwrap();
    }

    #[test]
    fn a_channel_without_the_feature_is_refused_and_nacked() {
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        let (chan, _keep) = UnixStream::pair().unwrap();
        let hdr = Header {
            request: u32::from(FrontendReq::SET_BACKEND_REQ_FD),
            flags: VERSION_1 | NEED_REPLY,
            size: 8,
        };
        let msg = [&hdr.to_bytes()[..], &0u64.to_le_bytes()[..]].concat();
        frontend.send_with_fd(&msg[..], chan.as_raw_fd()).unwrap();
        let e = take_channel(&ours, false, true).err().expect("refused");
        assert!(e.to_string().contains("BACKEND_REQ"), "{e}");
        let mut reply = [0u8; HEADER + 8];
        frontend.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[HEADER..], &1u64.to_le_bytes());
    }
}
