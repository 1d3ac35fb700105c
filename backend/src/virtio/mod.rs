//! The virtio-blk device model: what the device offers, and how a guest's
//! descriptor chain becomes a request.

pub mod config;
pub mod inflight;
pub mod request;
pub mod ring;
