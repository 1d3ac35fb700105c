//! The serving loop: accept a frontend, serve it until it leaves, accept
//! the next (a VM reboot or restart); stop cleanly when asked.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::BlkDevice;
use crate::export::Export;

/// Asks a running [`serve`] to finish: the current frontend is
/// disconnected, in-flight requests complete, the export is flushed.
#[derive(Clone, Default)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
}

impl StopHandle {
    /// Requests the stop. Safe from any thread, any number of times.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(conn) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            conn.shutdown();
        }
    }

    fn requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn set_connection(&self, conn: Option<ShutdownHandle>) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
        // A stop that raced with the connection must still end it.
        if self.requested() {
            self.stop();
        }
    }
}

/// Serves `export` on the vhost-user socket `path` until `stop` is used.
pub fn serve(export: Arc<Export>, path: &Path, stop: &StopHandle) -> anyhow::Result<()> {
    let mut listener = Listener::new(path, true)
        .with_context(|| format!("cannot listen on '{}'", path.display()))?;
    tracing::info!("listening on {}", path.display());
    while !stop.requested() {
        if !readable(listener.as_raw_fd())? {
            continue;
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let dev =
            BlkDevice::new(Arc::clone(&export), mem.clone()).context("cannot set up the device")?;
        let mut daemon = VhostUserDaemon::new("strata-vhost-user".into(), dev.clone(), mem)
            .map_err(|e| anyhow::anyhow!("cannot start the device's workers: {e}"))?;
        dev.register_listeners(&daemon.get_epoll_handlers())
            .context("cannot register the io_uring eventfds")?;
        if let Err(e) = daemon.start(&mut listener) {
            tracing::warn!("frontend connection failed: {e}");
            continue;
        }
        stop.set_connection(daemon.shutdown_handle());
        tracing::info!("frontend connected");
        let res = daemon.wait();
        stop.set_connection(None);
        // Joins the workers, which first let their in-flight I/O finish.
        drop(daemon);
        match res {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!("frontend connection ended: {e}"),
        }
        tracing::info!(
            "requests completed per queue: {:?}",
            dev.completed_per_queue()
        );
        if let Err(e) = export.flush_blocking() {
            tracing::error!("flush after disconnect failed: {e}");
        }
    }
    export.flush_blocking().context("final flush failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Waits up to 200 ms for a connection, so a stop request is noticed.
fn readable(fd: i32) -> anyhow::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 200) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e).context("poll on the listening socket failed");
    }
    Ok(n > 0)
}
