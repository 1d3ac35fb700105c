//! Serving an export on its vhost-user socket: accept a frontend, serve it
//! until it leaves, accept the next (a VM reboot or restart), until stopped.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use vhost::vhost_user::Listener;

use crate::export::Export;
use crate::stop_signal::StopSignal;
use crate::vhost_user::serve_one;

/// How long a stop lets the guest's requests in flight finish and reach
/// it before the connection goes.
const STOP_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks a serving loop to finish: the current frontend is disconnected and
/// its in-flight requests complete.
#[derive(Clone)]
pub(crate) struct StopHandle {
    stop: Arc<StopSignal>,
    /// The connected frontend's socket: shutting it down ends the
    /// connection's request loop.
    conn: Arc<Mutex<Option<UnixStream>>>,
}

impl StopHandle {
    pub(crate) fn new() -> std::io::Result<StopHandle> {
        Ok(StopHandle {
            stop: Arc::new(StopSignal::new()?),
            conn: Arc::default(),
        })
    }

    fn stop(&self) {
        self.stop.request();
        if let Some(conn) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    fn requested(&self) -> bool {
        self.stop.requested()
    }

    pub(crate) fn set_connection(&self, conn: Option<UnixStream>) {
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
    bound: Option<crate::socket::Bound>,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
}

impl RunningExport {
    /// Listens on `on` (a path gets permissions `mode`, replacing a stale
    /// socket file) and serves `export` there from a new thread.
    pub fn start(
        export: Arc<Export>,
        on: &crate::socket::ListenOn,
        mode: u32,
    ) -> anyhow::Result<RunningExport> {
        let (listener, bound) = on.listen(mode)?;
        let listener = Listener::from(listener);
        tracing::info!("export '{}': listening on {on}", export.options().id);
        let stop = StopHandle::new().context("cannot set up the export's stop signal")?;
        let thread = std::thread::Builder::new()
            .name(format!("export-{}", export.options().id))
            .spawn({
                let (export, stop) = (Arc::clone(&export), stop.clone());
                move || serve(listener, &export, &stop)
            })
            .context("cannot start the export's thread")?;
        Ok(RunningExport {
            export,
            bound,
            stop,
            thread: Some(thread),
        })
    }

    /// The export.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
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
        if let Some(b) = &self.bound {
            b.remove();
        }
    }
}

impl Drop for RunningExport {
    fn drop(&mut self) {
        self.halt();
    }
}

fn serve(mut listener: Listener, export: &Arc<Export>, stop: &StopHandle) {
    let id = export.options().id.clone();
    loop {
        match stop.stop.wait_readable(listener.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => break,
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
