//! The QEMU Monitor Protocol on a unix socket: a greeting, capability
//! negotiation, then `execute` requests answered by `return` or `error`
//! (with the request's `id`), and events.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::{json, Map, Value};

use crate::daemon::Daemon;
use crate::qmp::commands;
use crate::qmp::error::QmpError;

/// Serializes command execution across all monitor sessions.
static COMMAND_LOCK: Mutex<()> = Mutex::new(());

/// Listens for QMP clients on `path` (replacing a stale socket), serving
/// each from its own thread.
pub fn start_monitor(daemon: Arc<Daemon>, path: &Path, pretty: bool) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot replace '{}'", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on '{}'", path.display()))?;
    tracing::info!("QMP monitor listening on {}", path.display());
    std::thread::Builder::new()
        .name("qmp-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let session = match Session::new(Arc::clone(&daemon), stream, pretty) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::error!("cannot set up a QMP session: {e}");
                                continue;
                            }
                        };
                        let spawned = std::thread::Builder::new()
                            .name("qmp-session".into())
                            .spawn(move || session.run());
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
}

impl Session {
    fn new(daemon: Arc<Daemon>, stream: UnixStream, pretty: bool) -> std::io::Result<Session> {
        Ok(Session {
            daemon,
            writer: Arc::new(Mutex::new(stream.try_clone()?)),
            reader: stream,
            pretty,
            negotiated: false,
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
        for msg in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
            let reply = match msg {
                Ok(v) => self.handle(v),
                Err(e) if e.is_eof() => break,
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
        let daemon = Arc::clone(&self.daemon);
        let (res, held) = daemon.events().hold(|| {
            let _guard = COMMAND_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            commands::execute(&daemon, &name, args)
        });
        match res {
            Ok(v) => {
                let mut r = json!({"return": v});
                if let Some(id) = id {
                    r["id"] = id;
                }
                (r, held)
            }
            Err(e) => {
                tracing::info!("QMP {name}: {e}");
                (error_reply(e, id), held)
            }
        }
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
