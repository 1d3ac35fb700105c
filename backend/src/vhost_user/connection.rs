//! One frontend connection, from accept to teardown: the vhost crate
//! parses each message and calls the [`Handler`]; the backend-request
//! channel's message is taken off first (see [`super::channel`]).

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};

use super::channel;
use super::handler::Handler;
use crate::export::Export;
use crate::serve::StopHandle;

/// Accepts one frontend on `listener` and serves it until it leaves or
/// `stop` ends it.
pub(crate) fn serve_one(
    listener: &mut Listener,
    export: &Arc<Export>,
    stop: &StopHandle,
) -> anyhow::Result<()> {
    let Some(stream) = listener
        .accept()
        .map_err(|e| anyhow::anyhow!("cannot accept a frontend: {e}"))?
    else {
        return Ok(());
    };
    serve_stream(stream, export, stop)
}

/// Serves one connected frontend until it leaves or `stop` ends it.
pub(crate) fn serve_stream(
    stream: UnixStream,
    export: &Arc<Export>,
    stop: &StopHandle,
) -> anyhow::Result<()> {
    let id = &export.options().id;
    let peek = stream
        .try_clone()
        .context("cannot clone the frontend's socket")?;
    let handler = Handler::new(Arc::clone(export)).context("cannot set up the device")?;
    let queues = Arc::clone(handler.queues());
    let handler = Arc::new(Mutex::new(handler));
    let mut requests = BackendReqHandler::from_stream(stream, Arc::clone(&handler));
    export.set_queues(Some(Arc::clone(&queues)));
    stop.set_connection(peek.try_clone().ok());
    tracing::info!("export '{id}': frontend connected");
    let res = serve_requests(&peek, &mut requests, &handler, export);
    // The frontend learns at once that the connection is over, while the
    // queues tear down.
    let _ = peek.shutdown(std::net::Shutdown::Both);
    drop(requests);
    stop.set_connection(None);
    export.set_channel(None);
    handler.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    export.set_queues(None);
    match res {
        Ok(()) | Err(ConnEnd::Vhost(VuError::Disconnected | VuError::PartialMessage)) => {
            tracing::info!("export '{id}': frontend disconnected")
        }
        Err(e) => tracing::warn!("export '{id}': frontend connection ended: {e}"),
    }
    tracing::info!(
        "export '{id}': requests completed per queue: {:?}",
        queues.completed()
    );
    match export.flush_blocking() {
        // Flushed when it was inactivated; nothing to do now.
        Ok(()) | Err(strata_graph::BlockError::Inactive { .. }) => {}
        Err(e) => tracing::error!("export '{id}': flush after disconnect failed: {e}"),
    }
    Ok(())
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnEnd {
    #[error("{0}")]
    Vhost(VuError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn serve_requests(
    peek: &UnixStream,
    requests: &mut BackendReqHandler<Mutex<Handler>>,
    handler: &Mutex<Handler>,
    export: &Export,
) -> Result<(), ConnEnd> {
    loop {
        match channel::peek_code(peek)? {
            None => return Ok(()),
            Some(code) if channel::is_set_backend_req_fd(code) => {
                let acked = handler
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .acked_protocol_features();
                let ch = channel::take_channel(
                    peek,
                    acked.contains(VhostUserProtocolFeatures::BACKEND_REQ),
                    acked.contains(VhostUserProtocolFeatures::REPLY_ACK),
                )?;
                export.set_channel(Some(Arc::new(ch)));
            }
            Some(_) => requests.handle_request().map_err(ConnEnd::Vhost)?,
        }
    }
}
