//! The QEMU Monitor Protocol on a unix socket: a greeting, capability
//! negotiation, then `execute` requests answered by `return` or `error`
//! (with the request's `id`), and events.

use crate::socket::ListenOn;
use std::cell::Cell;
use std::io::{BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::{json, Map, Value};

use crate::daemon::Daemon;
use crate::qmp::commands;
use crate::qmp::error::QmpError;
use crate::qmp::scm_reader::ScmReader;
use strata_blockdev::options::Options;

/// Serializes command execution across all monitor sessions.
static COMMAND_LOCK: Mutex<()> = Mutex::new(());

/// Largest QMP message accepted; more ends the session. The biggest real
/// commands (a blockdev-add of a long chain) are a few KiB.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Most monitor sessions at once, over every monitor socket.
pub const MAX_SESSIONS: usize = 16;

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// Counts a session while it lives.
struct SessionSlot;

impl SessionSlot {
    fn take() -> Option<SessionSlot> {
        SESSIONS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SESSIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| SessionSlot)
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        SESSIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The session's input, counting what one message has taken: past
/// [`MAX_MESSAGE`] it fails, and the parser with it.
struct Bounded {
    inner: BufReader<ScmReader>,
    used: Rc<Cell<usize>>,
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = MAX_MESSAGE.saturating_sub(self.used.get());
        if left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a QMP message may be at most {MAX_MESSAGE} bytes"),
            ));
        }
        let n = buf.len().min(left);
        let n = self.inner.read(&mut buf[..n])?;
        self.used.set(self.used.get() + n);
        Ok(n)
    }
}

/// Listens for QMP clients on `on` (a path replaces a stale socket),
/// serving each from its own thread.
pub fn start_monitor(daemon: Arc<Daemon>, on: &ListenOn, pretty: bool) -> anyhow::Result<()> {
    // The monitor lives as long as the process: its socket file stays.
    let (listener, _) = on.listen(daemon.socket_mode())?;
    tracing::info!("QMP monitor listening on {on}");
    std::thread::Builder::new()
        .name("qmp-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(mut stream) => {
                        let Some(slot) = SessionSlot::take() else {
                            tracing::warn!("refusing a QMP connection: {MAX_SESSIONS} are open");
                            let e = QmpError::generic(format!(
                                "Too many QMP connections (at most {MAX_SESSIONS})"
                            ));
                            let _ = writeln!(stream, "{}\r", error_reply(e, None));
                            continue;
                        };
                        let session = match Session::new(Arc::clone(&daemon), stream, pretty) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::error!("cannot set up a QMP session: {e}");
                                continue;
                            }
                        };
                        let spawned = std::thread::Builder::new()
                            .name("qmp-session".into())
                            .spawn(move || {
                                session.run();
                                drop(slot);
                            });
                        if let Err(e) = spawned {
                            tracing::error!("cannot start a QMP session: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("QMP accept failed: {e}"),
                }
            }
        })
        .context("cannot start the QMP thread")?;
    Ok(())
}

struct Session {
    daemon: Arc<Daemon>,
    reader: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    pretty: bool,
    negotiated: bool,
    /// Descriptors the client sent that no `getfd` claimed yet.
    fds: Arc<Mutex<Vec<OwnedFd>>>,
}

impl Session {
    fn new(daemon: Arc<Daemon>, stream: UnixStream, pretty: bool) -> std::io::Result<Session> {
        Ok(Session {
            daemon,
            writer: Arc::new(Mutex::new(stream.try_clone()?)),
            reader: stream,
            pretty,
            negotiated: false,
            fds: Arc::default(),
        })
    }

    fn run(mut self) {
        let greeting = json!({"QMP": {
            "version": {
                "qemu": {"major": 7, "minor": 2, "micro": 0},
                "package": format!("strata {}", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": [],
        }});
        if send(&self.writer, &greeting, self.pretty).is_err() {
            return;
        }
        let reader = self.reader.try_clone();
        let Ok(reader) = reader else { return };
        let used = Rc::new(Cell::new(0));
        let reader = Bounded {
            inner: BufReader::new(ScmReader::new(reader, Arc::clone(&self.fds))),
            used: Rc::clone(&used),
        };
        for msg in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
            used.set(0);
            let reply = match msg {
                Ok(v) => self.handle(v),
                Err(e) if e.is_eof() => break,
                Err(e) if e.is_io() => {
                    let err = error_reply(QmpError::generic(format!("{e}")), None);
                    let _ = send(&self.writer, &err, self.pretty);
                    break;
                }
                Err(e) => {
                    // The stream cannot be resynchronised: report and end.
                    let err =
                        error_reply(QmpError::generic(format!("JSON parse error, {e}")), None);
                    let _ = send(&self.writer, &err, self.pretty);
                    break;
                }
            };
            let (reply, held) = reply;
            if send(&self.writer, &reply, self.pretty).is_err() {
                break;
            }
            self.daemon.events().release(held);
        }
        let _ = self.reader.shutdown(std::net::Shutdown::Both);
    }

    /// Answers one message; returns the reply and the events it caused.
    fn handle(&mut self, msg: Value) -> (Value, Vec<Value>) {
        let Value::Object(mut msg) = msg else {
            return (
                error_reply(QmpError::generic("QMP input must be a JSON object"), None),
                Vec::new(),
            );
        };
        let id = msg.remove("id");
        let parsed = parse_request(msg);
        let (name, args) = match parsed {
            Ok(p) => p,
            Err(e) => return (error_reply(e, id), Vec::new()),
        };
        if name == "qmp_capabilities" {
            return (self.negotiate(args, id), Vec::new());
        }
        if !self.negotiated {
            let e = QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return (error_reply(e, id), Vec::new());
        }
        if name == "getfd" || name == "closefd" {
            let res = self.fd_command(&name, args);
            return (reply(res, id), Vec::new());
        }
        let daemon = Arc::clone(&self.daemon);
        let (res, held) = daemon.events().hold(|| {
            let _guard = COMMAND_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            commands::execute(&daemon, &name, args)
        });
        if let Err(e) = &res {
            tracing::info!("QMP {name}: {e}");
        }
        (reply(res, id), held)
    }

    /// `getfd` names the descriptor the client sent last; `closefd`
    /// closes a named one.
    fn fd_command(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Options::from_json(Value::Object(args))?;
        let fdname = a.take_str("fdname")?;
        let fdname = a.required("fdname", fdname)?;
        a.finish()?;
        if fdname.is_empty() || fdname.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic(format!(
                "Parameter 'fdname' '{fdname}': a name may not be empty or start with a digit"
            )));
        }
        if name == "closefd" {
            if !crate::handed_fds::close_named(&fdname) {
                return Err(QmpError::generic(format!(
                    "File descriptor named '{fdname}' not found"
                )));
            }
            return Ok(json!({}));
        }
        let fd = self
            .fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        crate::handed_fds::add_named(&fdname, fd);
        Ok(json!({}))
    }

    fn negotiate(&mut self, args: Map<String, Value>, id: Option<Value>) -> Value {
        if self.negotiated {
            let e = QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            );
            return error_reply(e, id);
        }
        match args.get("enable") {
            Some(Value::Array(caps)) if !caps.is_empty() => {
                let e = QmpError::generic(format!(
                    "Capability '{}' not available",
                    caps[0].as_str().unwrap_or("?")
                ));
                return error_reply(e, id);
            }
            Some(Value::Array(_)) | None => {}
            Some(_) => {
                return error_reply(
                    QmpError::generic("Invalid parameter type for 'enable', expected: array"),
                    id,
                )
            }
        }
        self.negotiated = true;
        self.forward_events();
        let mut r = json!({"return": {}});
        if let Some(id) = id {
            r["id"] = id;
        }
        r
    }

    /// Sends the bus's events to this client until it goes away.
    fn forward_events(&self) {
        let rx = self.daemon.events().subscribe();
        let writer = Arc::clone(&self.writer);
        let pretty = self.pretty;
        let spawned = std::thread::Builder::new()
            .name("qmp-events".into())
            .spawn(move || {
                while let Ok(ev) = rx.recv() {
                    if send(&writer, &ev, pretty).is_err() {
                        break;
                    }
                }
                // Dropped from the bus (too far behind): a client that
                // misses events must know it did.
                let w = writer.lock().unwrap_or_else(|e| e.into_inner());
                let _ = w.shutdown(std::net::Shutdown::Both);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start QMP event forwarding: {e}");
        }
    }
}

/// Checks a request's shape: `execute`, optional `arguments` and `id`.
fn parse_request(mut msg: Map<String, Value>) -> Result<(String, Map<String, Value>), QmpError> {
    let name = match msg.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'execute' must be a string",
            ))
        }
        None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
    };
    let args = match msg.remove("arguments") {
        Some(Value::Object(a)) => a,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'arguments' must be an object",
            ))
        }
        None => Map::new(),
    };
    if let Some(k) = msg.keys().next() {
        return Err(QmpError::generic(format!(
            "QMP input member '{k}' is unexpected"
        )));
    }
    Ok((name, args))
}

fn reply(res: Result<Value, QmpError>, id: Option<Value>) -> Value {
    match res {
        Ok(v) => {
            let mut r = json!({"return": v});
            if let Some(id) = id {
                r["id"] = id;
            }
            r
        }
        Err(e) => error_reply(e, id),
    }
}

fn error_reply(e: QmpError, id: Option<Value>) -> Value {
    let mut r = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

fn send(writer: &Mutex<UnixStream>, msg: &Value, pretty: bool) -> std::io::Result<()> {
    let mut text = if pretty {
        serde_json::to_string_pretty(msg)
    } else {
        serde_json::to_string(msg)
    }
    .map_err(std::io::Error::other)?;
    text.push_str("\r\n");
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    w.write_all(text.as_bytes())
}
