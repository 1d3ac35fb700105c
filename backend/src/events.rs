//! The event bus: drivers, exports and jobs emit QMP events; every
//! monitor session that finished capability negotiation receives them.

use std::cell::RefCell;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
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
    subscribers: Mutex<Vec<SyncSender<Value>>>,
}

/// Events a subscriber may fall behind by.
pub const BACKLOG: usize = 1024;

impl EventBus {
    /// A new subscription.
    /// A new subscription. A subscriber that falls [`BACKLOG`] events
    /// behind (a client that stopped reading) is dropped: its receiver
    /// ends after what it has, rather than the daemon queueing for it
    /// without bound.
    pub fn subscribe(&self) -> Receiver<Value> {
        let (tx, rx) = sync_channel(BACKLOG);
        self.lock().push(tx);
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SyncSender<Value>>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn broadcast(&self, event: Value) {
        tracing::debug!("event: {event}");
        self.lock().retain(|s| match s.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!("a QMP client is {BACKLOG} events behind; disconnecting it");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
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
