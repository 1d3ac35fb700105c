//! A small blocking QMP client for Rust tests that need to drive the
//! monitor while they do I/O. (The QMP behaviour itself is tested with the
//! real `qemu.qmp` library, in tests/qmp.)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A negotiated QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying until the socket exists) and negotiates.
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        };
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        q.execute("qmp_capabilities", json!({}))
            .expect("negotiation");
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read from QMP");
        assert!(!line.is_empty(), "QMP connection closed");
        serde_json::from_str(&line).expect("QMP sends JSON")
    }

    /// Runs a command: `Ok(return)` or `Err(error)`.
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value, Value> {
        let msg = json!({"execute": name, "arguments": args});
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .expect("write to QMP");
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
            self.events.push(v);
        }
    }
}
