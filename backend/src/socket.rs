//! The unix sockets a daemon listens on (vhost-user and QMP): created with
//! owner-only permissions unless the operator says otherwise, and never in
//! place of a file that is not a socket or of a server that still answers.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Who may connect when the operator does not say: the daemon's user.
pub const DEFAULT_MODE: u32 = 0o600;

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something other than a socket is in the way; it is left alone.
    #[error("'{0}' exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// A live server answers there.
    #[error("'{0}' is in use: a server is listening on it")]
    InUse(PathBuf),
    /// The host refused.
    #[error("cannot listen on '{path}': {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The host's error.
        #[source]
        source: io::Error,
    },
}

/// Listens on `path` with permissions `mode`, replacing a stale socket
/// left by a daemon that is gone.
///
/// The daemon runs under umask 077, so the socket is born owner-only and
/// `mode` only ever widens it.
pub fn listen(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    let io = |source| SocketError::Io {
        path: path.into(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.into()));
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.into()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// Where a unix listener comes from: a path the daemon binds, or a
/// listening socket the parent handed it (`addr.type=fd`, `fd=`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenOn {
    /// Bound here.
    Path(PathBuf),
    /// Handed in: a descriptor number or a socket-activation name.
    Fd(String),
}

/// A socket file the daemon bound, to remove when it stops listening if
/// it is still the daemon's.
#[derive(Clone, Debug)]
pub struct Bound {
    /// The socket file.
    pub path: PathBuf,
    id: Option<(u64, u64)>,
}

impl Bound {
    /// Removes the socket file unless another daemon replaced it.
    pub fn remove(&self) {
        remove_if_ours(&self.path, self.id);
    }
}

impl ListenOn {
    /// The path to bind, if the daemon binds one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ListenOn::Path(p) => Some(p),
            ListenOn::Fd(_) => None,
        }
    }

    /// Listens, with permissions `mode` on a bound path.
    pub fn listen(&self, mode: u32) -> anyhow::Result<(UnixListener, Option<Bound>)> {
        match self {
            ListenOn::Path(path) => {
                let l = listen(path, mode)?;
                let id = identity(path);
                Ok((
                    l,
                    Some(Bound {
                        path: path.clone(),
                        id,
                    }),
                ))
            }
            ListenOn::Fd(s) => Ok((crate::handed_fds::take_listener(s, true)?.into(), None)),
        }
    }
}

impl std::fmt::Display for ListenOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenOn::Path(p) => write!(f, "{}", p.display()),
            ListenOn::Fd(s) => write!(f, "fd '{s}'"),
        }
    }
}

/// What identifies the socket file at `path` (device and inode), so that
/// a daemon removes only its own.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes the socket at `path` if it is still the one `id` names.
pub fn remove_if_ours(path: &Path, id: Option<(u64, u64)>) {
    if id.is_some() && identity(path) == id {
        // After --run-with, the directory may not be ours to write.
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_the_way_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.sock");
        std::fs::write(&p, b"precious").unwrap();
        let e = listen(&p, DEFAULT_MODE).unwrap_err();
        assert!(e.to_string().contains("exists and is not a socket"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    }

    #[test]
    fn a_live_server_is_refused_and_a_stale_socket_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.sock");
        let live = listen(&p, DEFAULT_MODE).unwrap();
        let e = listen(&p, DEFAULT_MODE).unwrap_err();
        assert!(e.to_string().contains("is in use"), "{e}");
        drop(live);
        listen(&p, 0o660).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }
}
