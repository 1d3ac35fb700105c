//! A small QMP client for `strata job`: one connection, commands in turn,
//! events queued as they arrive between replies.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};

/// A negotiated QMP session.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    next_id: u64,
    /// A line read in part before a timeout.
    partial: String,
    /// How long a command may wait for its reply; forever if `None`.
    reply_timeout: Option<Duration>,
}

/// A command the daemon refused: its class and description.
#[derive(Debug, thiserror::Error)]
#[error("{desc}")]
pub struct CommandError {
    /// QMP's error class.
    pub class: String,
    /// What was wrong.
    pub desc: String,
}

impl QmpClient {
    /// Connects to the monitor at `path` and leaves capabilities
    /// negotiation.
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to the QMP monitor at {}", path.display()))?;
        let mut c = QmpClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: VecDeque::new(),
            next_id: 0,
            partial: String::new(),
            reply_timeout: None,
        };
        let greeting = c
            .read(None)?
            .ok_or_else(|| anyhow!("the monitor closed at once"))?;
        if greeting.get("QMP").is_none() {
            bail!(
                "{} is not a QMP monitor (greeting: {greeting})",
                path.display()
            );
        }
        c.execute("qmp_capabilities", json!({}))?
            .map_err(|e| anyhow!("qmp_capabilities: {e}"))?;
        Ok(c)
    }

    /// Reads one message, waiting at most `timeout` (forever if `None`).
    fn read(&mut self, timeout: Option<Duration>) -> anyhow::Result<Option<Value>> {
        self.reader.get_ref().set_read_timeout(timeout)?;
        // Bytes read before a timeout stay in `partial` (read_line keeps
        // what it read on error) and the line is finished next time.
        match self.reader.read_line(&mut self.partial) {
            Ok(0) => bail!("the monitor closed the connection"),
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                Ok(Some(
                    serde_json::from_str(&line)
                        .with_context(|| format!("bad QMP message: {line}"))?,
                ))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes commands fail when their reply takes longer than `t`: for
    /// watching many daemons, where one stuck must not stop the rest.
    pub fn set_reply_timeout(&mut self, t: Duration) {
        self.reply_timeout = Some(t);
    }

    /// Runs `name` with `args`: Ok(Ok(return)) or Ok(Err(refusal)).
    pub fn execute(
        &mut self,
        name: &str,
        args: Value,
    ) -> anyhow::Result<Result<Value, CommandError>> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"execute": name, "arguments": args, "id": id});
        writeln!(self.writer, "{msg}")?;
        loop {
            let Some(m) = self.read(self.reply_timeout)? else {
                bail!(
                    "no reply to {name} within {:?}",
                    self.reply_timeout.unwrap_or_default()
                );
            };
            if m.get("event").is_some() {
                self.events.push_back(m);
                continue;
            }
            if m.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(Ok(r.clone()));
            }
            let e = m.get("error").cloned().unwrap_or(Value::Null);
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Ok(Err(CommandError {
                class: s("class"),
                desc: s("desc"),
            }));
        }
    }

    /// Runs `name`, turning a refusal into an error.
    pub fn run(&mut self, name: &str, args: Value) -> anyhow::Result<Value> {
        self.execute(name, args)?
            .map_err(|e| anyhow!("{name}: {e}"))
    }

    /// The next event, waiting at most `timeout`.
    pub fn event(&mut self, timeout: Duration) -> anyhow::Result<Option<Value>> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        match self.read(Some(timeout.max(Duration::from_millis(1))))? {
            Some(m) if m.get("event").is_some() => Ok(Some(m)),
            _ => Ok(None),
        }
    }
}
