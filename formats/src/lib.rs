//! Strata's block drivers, and what each format knows about its images
//! (probing, creation, checking).
//!
//! Every driver implements [`strata_graph::BlockDriver`]. Drivers with
//! children ([`raw::RawNode`]) attach them through the graph's slot table
//! when they open and never hold them directly. Protocol drivers do their
//! I/O on the calling thread's io_uring ([`strata_runtime::reactor`]).
//! Turning command-line or QMP options into nodes is `strata-blockdev`'s
//! work, not this crate's.

#![warn(missing_docs)]

pub mod blkdebug;
pub mod blkverify;
pub mod cor;
pub mod file;
pub mod image;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod quorum;
pub mod raw;
pub mod rbd;
pub mod throttle;

#[cfg(test)]
mod tests;
