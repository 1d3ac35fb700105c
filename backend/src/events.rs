//! The event bus: drivers, exports and jobs emit QMP events; every
//! monitor session that finished capability negotiation receives them.

use std::cell::RefCell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use strata_graph::EventSink;

thread_local! {
    /// Events this thread emits while a QMP command runs: sent after the
    /// command's reply, as QEMU does.
    static DEFERRED: RefCell<Option<Vec<Value>>> = const { RefCell::new(None) };
}

/// Fans events out to subscribers.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Sender<Value>>>,
}

impl EventBus {
    /// A new subscription.
    pub fn subscribe(&self) -> Receiver<Value> {
        let (tx, rx) = channel();
        self.lock().push(tx);
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<Value>>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn broadcast(&self, event: Value) {
        tracing::debug!("event: {event}");
        self.lock().retain(|s| s.send(event.clone()).is_ok());
    }

    /// Runs `f` holding back the events this thread emits; returns them.
    pub fn hold<R>(&self, f: impl FnOnce() -> R) -> (R, Vec<Value>) {
        DEFERRED.with(|d| *d.borrow_mut() = Some(Vec::new()));
        let r = f();
        let held = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
        (r, held)
    }

    /// Sends events held back by [`EventBus::hold`].
    pub fn release(&self, held: Vec<Value>) {
        for e in held {
            self.broadcast(e);
        }
    }
}

impl EventSink for EventBus {
    fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let event = json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        let held = DEFERRED.with(|d| match d.borrow_mut().as_mut() {
            Some(list) => {
                list.push(event.clone());
                true
            }
            None => false,
        });
        if !held {
            self.broadcast(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_reach_every_subscriber_and_can_be_held() {
        let bus = EventBus::default();
        let a = bus.subscribe();
        let b = bus.subscribe();
        bus.emit("X", json!({"n": 1}));
        assert_eq!(a.recv().unwrap()["event"], "X");
        assert_eq!(b.recv().unwrap()["data"]["n"], 1);
        let ((), held) = bus.hold(|| bus.emit("Y", json!({})));
        assert!(a.try_recv().is_err(), "held back");
        bus.release(held);
        assert_eq!(a.recv().unwrap()["event"], "Y");
        drop(b);
        bus.emit("Z", json!({}));
        assert_eq!(a.recv().unwrap()["event"], "Z");
    }
}
