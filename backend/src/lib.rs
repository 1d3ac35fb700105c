//! The Strata daemon: a vhost-user-blk device in front of a block graph.

pub mod cli;
pub mod device;
pub mod export;
pub mod open;
mod ratelimit;
pub mod serve;
pub mod virtio;
mod worker;
