//! Listening sockets the parent hands the daemon, as qsd takes them:
//! `addr.type=fd,addr.str=N` names a descriptor the daemon was started
//! with, and `addr.str=NAME` one that systemd's socket activation passed
//! under that name (`LISTEN_FDS`, `LISTEN_FDNAMES`).
//!
//! A QMP client may also send one over the monitor and name it (`getfd`).
//! Only descriptors open when the process started, or sent so, can be
//! named, so an option can never take over one the daemon opened itself.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// The first descriptor socket activation passes.
const LISTEN_FDS_START: RawFd = 3;

#[derive(Default)]
struct Handed {
    by_number: BTreeMap<RawFd, OwnedFd>,
    by_name: BTreeMap<String, RawFd>,
}

static HANDED: Mutex<Option<Handed>> = Mutex::new(None);

/// Why `addr.str` names no socket the daemon can listen on.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// Neither a descriptor the process started with nor a name.
    #[error("addr.str '{0}' is neither a descriptor this process was started with nor a socket-activation name (LISTEN_FDNAMES), or it is already in use")]
    Unknown(String),
    /// Not a socket, not listening, or of the wrong family.
    #[error("fd {fd} ('{name}') {why}")]
    Unfit {
        /// The descriptor.
        fd: RawFd,
        /// What `addr.str` said.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Takes ownership of the descriptors above stderr that the process
/// started with, and of the names socket activation gave them. Runs first
/// in `main`, before anything opens a file.
pub fn adopt() {
    let mut handed = Handed::default();
    let numbers: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect(),
        Err(_) => Vec::new(),
    };
    // The directory's own descriptor was in the list; it is closed now.
    for fd in numbers {
        // SAFETY: F_GETFD on a number has no memory effects.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            continue;
        }
        // SAFETY: fd is open, and nothing in this process owns it: it was
        // inherited, and nothing else has run yet.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // The daemon runs no programs; none should inherit these.
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        handed.by_number.insert(fd, owned);
    }
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<RawFd>().ok());
    if let (true, Some(count)) = (ours, count) {
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let mut names = names.split(':');
        for fd in LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count) {
            let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown");
            if handed.by_number.contains_key(&fd) {
                handed.by_name.entry(name.to_owned()).or_insert(fd);
            }
        }
    }
    *HANDED.lock().unwrap_or_else(|e| e.into_inner()) = Some(handed);
}

/// Takes the listening socket `s` names (a number or a name), which must
/// be a unix socket when `unix`. Each can be taken once.
pub fn take_listener(s: &str, unix: bool) -> Result<OwnedFd, FdError> {
    let mut guard = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    let handed = guard.get_or_insert_with(Handed::default);
    let fd = match s.parse::<RawFd>() {
        Ok(n) => n,
        Err(_) => *handed
            .by_name
            .get(s)
            .ok_or_else(|| FdError::Unknown(s.into()))?,
    };
    let owned = handed
        .by_number
        .remove(&fd)
        .ok_or_else(|| FdError::Unknown(s.into()))?;
    match unfit(&owned, unix) {
        None => {
            handed.by_name.retain(|_, n| *n != fd);
            Ok(owned)
        }
        Some(why) => {
            handed.by_number.insert(fd, owned);
            Err(FdError::Unfit {
                fd,
                name: s.into(),
                why,
            })
        }
    }
}

/// Names `fd`, a descriptor a QMP client sent (`getfd`); one that had the
/// name before is closed.
pub fn add_named(name: &str, fd: OwnedFd) {
    let mut guard = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    let handed = guard.get_or_insert_with(Handed::default);
    if let Some(old) = handed.by_name.remove(name) {
        handed.by_number.remove(&old);
    }
    handed.by_name.insert(name.into(), fd.as_raw_fd());
    handed.by_number.insert(fd.as_raw_fd(), fd);
}

/// Closes the descriptor named `name` (`closefd`); false when none is.
pub fn close_named(name: &str) -> bool {
    let mut guard = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    let handed = guard.get_or_insert_with(Handed::default);
    match handed.by_name.remove(name) {
        Some(fd) => {
            handed.by_number.remove(&fd);
            true
        }
        None => false,
    }
}

/// True when `fd` is a unix socket.
pub fn is_unix(fd: &OwnedFd) -> bool {
    sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
}

fn sockopt(fd: &OwnedFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// What makes `fd` unfit to accept connections on, if anything.
fn unfit(fd: &OwnedFd, unix: bool) -> Option<&'static str> {
    let raw = fd.as_raw_fd();
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes into `st`, a stat-sized buffer.
    if unsafe { libc::fstat(raw, st.as_mut_ptr()) } != 0 {
        return Some("cannot be examined");
    }
    // SAFETY: fstat succeeded, so `st` is initialised.
    if unsafe { st.assume_init() }.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Some("is not a socket");
    }
    let opt = |name| sockopt(fd, name);
    if opt(libc::SO_TYPE) != Some(libc::SOCK_STREAM) {
        return Some("is not a stream socket");
    }
    if opt(libc::SO_ACCEPTCONN) != Some(1) {
        return Some("is a socket that does not listen (give a listening socket)");
    }
    if unix && opt(libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
        return Some("is not a unix socket, which vhost-user needs");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// Hands `fd` over as if the process had started with it.
    fn hand(fd: OwnedFd, name: Option<&str>) -> RawFd {
        let n = fd.as_raw_fd();
        let mut g = HANDED.lock().unwrap();
        let h = g.get_or_insert_with(Handed::default);
        h.by_number.insert(n, fd);
        if let Some(name) = name {
            h.by_name.insert(name.into(), n);
        }
        n
    }

    #[test]
    fn a_listening_unix_socket_is_taken_once_by_number_or_name() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("a")).unwrap();
        let n = hand(l.into(), None);
        assert!(take_listener(&n.to_string(), true).is_ok());
        assert!(matches!(
            take_listener(&n.to_string(), true),
            Err(FdError::Unknown(_))
        ));
        let l = UnixListener::bind(dir.path().join("b")).unwrap();
        hand(l.into(), Some("vm1-disk0"));
        assert!(take_listener("vm1-disk0", true).is_ok());
        assert!(take_listener("vm1-disk0", true).is_err());
    }

    #[test]
    fn what_is_not_a_listening_unix_socket_is_named_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let n = hand(file.into(), None);
        let e = take_listener(&n.to_string(), true).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        let (a, _b) = UnixStream::pair().unwrap();
        let n = hand(a.into(), None);
        let e = take_listener(&n.to_string(), true).unwrap_err().to_string();
        assert!(e.contains("does not listen"), "{e}");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let n = hand(tcp.into(), Some("tcp"));
        let e = take_listener("tcp", true).unwrap_err().to_string();
        assert!(e.contains("not a unix socket"), "{e}");
        // Kept: the NBD server may listen on TCP.
        assert!(take_listener(&n.to_string(), false).is_ok());
        let e = take_listener("no-such-name", true).unwrap_err().to_string();
        assert!(e.contains("'no-such-name'"), "{e}");
    }
}
