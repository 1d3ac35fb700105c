//! Strata's block drivers and image tools.
//!
//! Every driver implements [`strata_graph::BlockDriver`]. Drivers with
//! children ([`raw::RawNode`]) attach them through the graph's slot table
//! when they open and never hold them directly. Protocol drivers do their
//! I/O on the calling thread's io_uring ([`reactor`]).

#![warn(missing_docs)]

pub mod blkdebug;
pub mod blkverify;
pub mod blockdev;
pub mod cor;
pub mod executor;
pub mod file;
pub mod image;
pub mod jobs;
pub mod null;
pub mod offload;
pub mod options;
pub mod qcow2;
pub mod quorum;
pub mod raw;
pub mod reactor;
pub mod throttle;

#[cfg(test)]
mod tests;
