//! The qcow2 format driver: versions 2 and 3, 512 B to 2 MiB clusters,
//! 1- to 64-bit refcounts, zero and compressed (zlib, zstd) clusters,
//! extended L2 entries, and a `backing` child.
//!
//! The backing image is a node in the `backing` slot; the driver never
//! opens it itself.

mod alloc;
mod backing_file;
mod cache;
mod census;
pub mod check;
mod claim;
mod compress;
pub mod create;
mod driver;
mod entry;
pub mod error;
pub mod header;
mod io;
mod meta;
mod node;
mod refcount;
mod repair;
mod report;
pub mod types;
mod write;

#[cfg(any(test, fuzzing))]
pub mod fuzz;

#[cfg(test)]
mod tests;

pub use compress::{compress, decompress};
pub use error::Qcow2Error;
pub use node::{BackingInfo, Qcow2Node, Qcow2Options};
