//! systemd's readiness protocol: `READY=1` once every export listens and
//! `STOPPING=1` at shutdown, as datagrams to `$NOTIFY_SOCKET`, so that a
//! `Type=notify` unit starts what depends on the disk only when it is
//! served.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The supervisor's notification socket, if it gave one.
pub struct Notifier(Option<UnixDatagram>);

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
    /// namespace). Runs before the sandbox, which confines paths.
    pub fn from_env() -> Notifier {
        let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier(None);
        };
        let connect = || -> std::io::Result<UnixDatagram> {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
            let addr = match bytes.strip_prefix(b"@") {
                Some(name) => SocketAddr::from_abstract_name(name)?,
                None => SocketAddr::from_pathname(&target)?,
            };
            let sock = UnixDatagram::unbound()?;
            sock.connect_addr(&addr)?;
            Ok(sock)
        };
        match connect() {
            Ok(s) => Notifier(Some(s)),
            Err(e) => {
                tracing::warn!(
                    "NOTIFY_SOCKET={}: cannot connect, so readiness is not reported: {e}",
                    target.to_string_lossy()
                );
                Notifier(None)
            }
        }
    }

    /// Sends `state` (`READY=1`, `STOPPING=1`, ...); a failure is logged,
    /// since serving matters more than reporting.
    pub fn notify(&self, state: &str) {
        if let Some(s) = &self.0 {
            if let Err(e) = s.send(state.as_bytes()) {
                tracing::warn!("cannot notify the supervisor of {state}: {e}");
            }
        }
    }
}
