//! The virtio-blk device model: what the device offers, guest memory and
//! the split ring as the device reads them, and how a descriptor chain
//! becomes a request.

pub mod config;
pub mod desc;
pub mod inflight;
pub mod memory;
pub mod request;
pub mod ring;
