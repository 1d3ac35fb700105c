//! The NBD server (`--nbd-server`, `nbd-server-start`): a listening socket,
//! the exports it offers by name, and a thread per client connection.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use strata_formats::nbd::wire::Socket;

use super::channel::{Channel, ServerTls};
use super::export::NbdExport;
use super::handshake::{negotiate, HANDSHAKE_TIMEOUT};
use super::registry::Registry;
use super::transmission;
use crate::stop_signal::StopSignal;

/// How long removing an export or stopping the server waits for its
/// connections to finish their requests in flight.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server listens.
pub use strata_blockdev::socket_address::SocketAddress as ServerAddr;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Where it listens.
    pub addr: ServerAddr,
    /// Most clients at once; 0 for no limit.
    pub max_connections: u32,
    /// The `tls-creds` object's id: TLS is then required.
    pub tls_creds: Option<String>,
    /// The `tls-authz` object's id.
    pub tls_authz: Option<String>,
}

/// One client connection, as the server tracks it.
struct Client {
    /// A second handle on the socket, to end the connection from outside.
    socket: OwnedFd,
    /// The id of the export it uses, once negotiated.
    export: Mutex<Option<String>>,
}

impl Client {
    fn close(&self) {
        // SAFETY: shutdown(2) on a descriptor we own; no pointers.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
    }

    fn uses(&self, id: &str) -> bool {
        self.export
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(id)
    }
}

enum Listener {
    Unix(UnixListener, Option<crate::socket::Bound>),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> i32 {
        match self {
            Listener::Unix(l, ..) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// A running NBD server.
pub struct NbdServer {
    opts: ServerOptions,
    exports: Arc<Registry>,
    clients: Arc<Mutex<Vec<Arc<Client>>>>,
    stop: Arc<StopSignal>,
    thread: Mutex<Option<JoinHandle<()>>>,
    unix: Option<crate::socket::Bound>,
}

impl NbdServer {
    /// Listens as `opts` says (unix sockets get permissions `mode`) and
    /// accepts clients from a new thread; with `tls`, only over TLS.
    pub fn start(
        opts: ServerOptions,
        tls: Option<ServerTls>,
        mode: u32,
    ) -> anyhow::Result<NbdServer> {
        let listener = match &opts.addr {
            ServerAddr::Unix(path) => {
                let (l, bound) = crate::socket::ListenOn::Path(path.clone()).listen(mode)?;
                Listener::Unix(l, bound)
            }
            ServerAddr::Inet { host, port } => Listener::Tcp(
                TcpListener::bind((host.as_str(), *port))
                    .with_context(|| format!("cannot listen on {host}:{port}"))?,
            ),
            ServerAddr::Fd(s) => {
                let fd = crate::handed_fds::take_listener(s, false)?;
                if crate::handed_fds::is_unix(&fd) {
                    Listener::Unix(fd.into(), None)
                } else {
                    Listener::Tcp(fd.into())
                }
            }
        };
        let unix = match &listener {
            Listener::Unix(_, bound) => bound.clone(),
            Listener::Tcp(_) => None,
        };
        tracing::info!("NBD server listening on {}", opts.addr);
        let exports = Arc::new(Registry::default());
        let clients = Arc::new(Mutex::new(Vec::new()));
        let stop =
            Arc::new(StopSignal::new().context("cannot set up the NBD server's stop signal")?);
        let thread = std::thread::Builder::new()
            .name("nbd-server".into())
            .spawn({
                let (exports, clients, stop) = (
                    Arc::clone(&exports),
                    Arc::clone(&clients),
                    Arc::clone(&stop),
                );
                let max = opts.max_connections;
                move || accept_loop(listener, &exports, tls.map(Arc::new), &clients, &stop, max)
            })
            .context("cannot start the NBD server's thread")?;
        Ok(NbdServer {
            opts,
            exports,
            clients,
            stop,
            thread: Mutex::new(Some(thread)),
            unix,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> &ServerAddr {
        &self.opts.addr
    }

    /// Offers `export` under its name.
    pub fn add(&self, export: Arc<NbdExport>) -> Result<(), String> {
        self.exports.insert(export)
    }

    /// Stops offering the export with block-export id `id`. Its clients
    /// make this fail unless `hard`, which disconnects them (after their
    /// requests in flight).
    pub fn remove(&self, id: &str, hard: bool) -> Result<(), String> {
        let users: Vec<Arc<Client>> = self
            .clients()
            .iter()
            .filter(|c| c.uses(id))
            .cloned()
            .collect();
        if !users.is_empty() && !hard {
            return Err(format!(
                "export '{id}' still in use by {} NBD client(s) (use mode=hard to disconnect them)",
                users.len()
            ));
        }
        self.exports.remove_id(id);
        users.iter().for_each(|c| c.close());
        self.wait_gone(|c| c.uses(id));
        Ok(())
    }

    /// Stops listening and disconnects every client.
    pub fn stop(&self) {
        self.stop.request();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the NBD server's thread panicked");
            }
        }
        self.clients().iter().for_each(|c| c.close());
        self.wait_gone(|_| true);
        if let Some(b) = &self.unix {
            b.remove();
        }
        tracing::info!("NBD server on {} stopped", self.opts.addr);
    }

    /// The exports offered.
    pub fn exports(&self) -> Vec<Arc<NbdExport>> {
        self.exports.list()
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Client>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_gone(&self, which: impl Fn(&Client) -> bool) {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while self.clients().iter().any(|c| which(c)) {
            if Instant::now() > deadline {
                tracing::warn!("NBD clients still connected after {CLOSE_TIMEOUT:?}");
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if !self.stop.requested() {
            self.stop();
        }
    }
}

fn accept_loop(
    listener: Listener,
    exports: &Arc<Registry>,
    tls: Option<Arc<ServerTls>>,
    clients: &Arc<Mutex<Vec<Arc<Client>>>>,
    stop: &StopSignal,
    max: u32,
) {
    loop {
        match stop.wait_readable(listener.fd()) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::error!("NBD server: {e:#}");
                return;
            }
        }
        let accepted = match &listener {
            Listener::Unix(l, ..) => l.accept().map(|(s, _)| Socket::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are whole messages; waiting to merge them only
                // adds latency.
                let _ = s.set_nodelay(true);
                Socket::Tcp(s)
            }),
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("NBD server: accept failed: {e}");
                continue;
            }
        };
        let mut list = clients.lock().unwrap_or_else(|e| e.into_inner());
        if max > 0 && list.len() >= max as usize {
            tracing::warn!(
                "NBD server: refusing a client: {max} connections already (max-connections)"
            );
            continue;
        }
        let client = match stream.try_clone().map(OwnedFd::from) {
            Ok(socket) => Arc::new(Client {
                socket,
                export: Mutex::new(None),
            }),
            Err(e) => {
                tracing::warn!("NBD server: {e}");
                continue;
            }
        };
        list.push(Arc::clone(&client));
        drop(list);
        let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn({
            let (exports, clients) = (Arc::clone(exports), Arc::clone(clients));
            let client = Arc::clone(&client);
            let tls = tls.clone();
            move || {
                if let Err(e) = serve_client(stream, &exports, tls.as_deref(), &client) {
                    tracing::warn!("NBD client: {e}");
                }
                clients
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|c| !Arc::ptr_eq(c, &client));
            }
        });
        if let Err(e) = spawned {
            tracing::error!("NBD server: cannot start a connection thread: {e}");
            clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|c| !Arc::ptr_eq(c, &client));
        }
    }
}

/// Negotiates with one client, then serves it.
fn serve_client(
    stream: Socket,
    exports: &Registry,
    tls: Option<&ServerTls>,
    client: &Client,
) -> io::Result<()> {
    let mut channel = Channel::new(stream);
    channel.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let Some(n) = negotiate(&mut channel, exports, tls)? else {
        return Ok(());
    };
    channel.set_read_timeout(None)?;
    *client.export.lock().unwrap_or_else(|e| e.into_inner()) = Some(n.export.options().id.clone());
    tracing::info!("NBD export '{}': a client connected", n.export.options().id);
    let (stream, session) = channel.into_parts();
    // From here on the client's bytes drive this thread.
    transmission::serve(
        OwnedFd::from(stream),
        session,
        n,
        crate::sandbox::enter_nbd_connection_thread,
    )
}
