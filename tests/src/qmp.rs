//! A blocking QMP client for Rust tests that drive the monitor while they
//! do I/O: Strata's own client, with test conveniences. (The QMP
//! behaviour itself is tested with the real `qemu.qmp` library, in
//! tests/qmp.)

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_backend::qmp::client::QmpClient;

/// A negotiated QMP connection.
pub struct Qmp {
    client: QmpClient,
}

impl Qmp {
    /// Connects (retrying until the socket exists) and negotiates.
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match QmpClient::connect(path) {
                Ok(client) => return Qmp { client },
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e:#}", path.display()),
            }
        }
    }

    /// Runs a command: `Ok(return)` or `Err(error)` as QMP sends them.
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value, Value> {
        match self.client.execute(name, args) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(json!({"class": e.class, "desc": e.desc})),
            Err(e) => panic!("QMP connection failed during {name}: {e:#}"),
        }
    }

    /// Waits up to `timeout` for event `name` whose data has `key` equal
    /// to `value`, and returns its data.
    pub fn wait_event(&mut self, name: &str, key: &str, value: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {name} with {key}={value} in time");
            let ev = self
                .client
                .event(left.min(Duration::from_millis(200)))
                .expect("QMP connection");
            if let Some(ev) = ev {
                if ev["event"] == name && ev["data"][key] == value {
                    return ev["data"].clone();
                }
            }
        }
    }
}
