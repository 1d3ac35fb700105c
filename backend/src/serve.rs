//! Serving an export on its vhost-user socket: accept a frontend, serve it
//! until it leaves, accept the next (a VM reboot or restart), until stopped.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::BlkDevice;
use crate::export::Export;

/// How long a stop lets the guest's requests in flight finish and reach
/// it before the connection goes.
const STOP_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the workers of a connection that ended get to tear down.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks a serving loop to finish: the current frontend is disconnected and
/// its in-flight requests complete.
#[derive(Clone, Default)]
pub(crate) struct StopHandle {
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
}

impl StopHandle {
    fn stop(&self) {
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

/// An export being served by its own thread.
pub struct RunningExport {
    export: Arc<Export>,
    path: PathBuf,
    socket_id: Option<(u64, u64)>,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
}

impl RunningExport {
    /// Listens on `path` with permissions `mode` (replacing a stale socket
    /// file) and serves `export` there from a new thread.
    pub fn start(export: Arc<Export>, path: &Path, mode: u32) -> anyhow::Result<RunningExport> {
        let listener = Listener::from(crate::socket::listen(path, mode)?);
        let socket_id = crate::socket::identity(path);
        tracing::info!(
            "export '{}': listening on {}",
            export.options().id,
            path.display()
        );
        let stop = StopHandle::default();
        let thread = std::thread::Builder::new()
            .name(format!("export-{}", export.options().id))
            .spawn({
                let (export, stop) = (Arc::clone(&export), stop.clone());
                move || serve(listener, &export, &stop)
            })
            .context("cannot start the export's thread")?;
        Ok(RunningExport {
            export,
            path: path.into(),
            socket_id,
            stop,
            thread: Some(thread),
        })
    }

    /// The export.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets the requests in flight finish and reach the guest, then
    /// disconnects any frontend and stops listening.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if self.thread.is_none() {
            return;
        }
        self.export.pause_for_stop(STOP_DRAIN_TIMEOUT);
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(
                    "export '{}': serving thread panicked",
                    self.export.options().id
                );
            }
        }
        crate::socket::remove_if_ours(&self.path, self.socket_id);
    }
}

impl Drop for RunningExport {
    fn drop(&mut self) {
        self.halt();
    }
}

fn serve(mut listener: Listener, export: &Arc<Export>, stop: &StopHandle) {
    let id = export.options().id.clone();
    while !stop.requested() {
        match readable(listener.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!("export '{id}': {e:#}");
                return;
            }
        }
        if let Err(e) = serve_one(&mut listener, export, stop) {
            tracing::warn!("export '{id}': {e:#}");
        }
    }
    tracing::info!("export '{id}': stopped");
}

/// Serves one frontend connection until it ends.
pub(crate) fn serve_one(
    listener: &mut Listener,
    export: &Arc<Export>,
    stop: &StopHandle,
) -> anyhow::Result<()> {
    let id = &export.options().id;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let dev =
        BlkDevice::new(Arc::clone(export), mem.clone()).context("cannot set up the device")?;
    let daemon = VhostUserDaemon::new(format!("strata-{id}"), dev.clone(), mem)
        .map_err(|e| anyhow::anyhow!("cannot start the device's workers: {e}"))?;
    let mut workers = Workers {
        daemon: Some(daemon),
        queues: Arc::clone(dev.queues()),
        id: id.clone(),
    };
    let daemon = workers.daemon.as_mut().expect("set above");
    dev.register_listeners(&daemon.get_epoll_handlers())
        .context("cannot register the device's eventfds")?;
    daemon
        .start(listener)
        .map_err(|e| anyhow::anyhow!("frontend connection failed: {e}"))?;
    export.set_queues(Some(Arc::clone(dev.queues())));
    stop.set_connection(daemon.shutdown_handle());
    tracing::info!("export '{id}': frontend connected");
    let res = daemon.wait();
    stop.set_connection(None);
    drop(workers);
    export.set_queues(None);
    match res {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => tracing::info!("export '{id}': frontend disconnected"),
        Err(e) => tracing::warn!("export '{id}': frontend connection ended: {e}"),
    }
    tracing::info!(
        "export '{id}': requests completed per queue: {:?}",
        dev.queues().completed()
    );
    if let Err(e) = export.flush_blocking() {
        tracing::error!("export '{id}': flush after disconnect failed: {e}");
    }
    Ok(())
}

/// A connection's worker threads. However serving the connection ends,
/// each worker tears down on its own thread (nothing more reaches the
/// rings, and the kernel lets go of guest memory before it is unmapped),
/// its epoll loop ends, and the threads are joined.
struct Workers {
    daemon: Option<VhostUserDaemon<BlkDevice>>,
    queues: Arc<crate::queue::Queues>,
    id: String,
}

impl Drop for Workers {
    fn drop(&mut self) {
        match self.queues.exit_all(TEARDOWN_TIMEOUT) {
            Ok(()) => drop(self.daemon.take()),
            Err(e) => {
                // Joining a worker that never tore down would hang this
                // thread, and with it the export: leave it behind instead.
                tracing::error!("export '{}': {e}; leaving its threads behind", self.id);
                std::mem::forget(self.daemon.take());
            }
        }
    }
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
