//! Where drivers report what the user should hear about (a quorum vote
//! that found a bad child, say). The daemon turns these into QMP events.

/// Receives events from drivers.
pub trait EventSink: Send + Sync {
    /// Reports event `name` (QMP's spelling) with its `data`.
    fn emit(&self, name: &str, data: serde_json::Value);
}

/// Drops every event: for tools and tests that have no monitor.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _name: &str, _data: serde_json::Value) {}
}
