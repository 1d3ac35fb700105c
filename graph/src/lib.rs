//! The block graph behind every Strata export.
//!
//! ```text
//!   export "vda" ──slot 0 "root"──▶ node "disk" (raw)
//!                                     └─slot 1 "file"──▶ node "disk-file" (file)
//! ```
//!
//! Nodes live in an arena and never point at each other. Every edge is a
//! [`Slot`]: a parent, a role (`file`, `backing`, `children.0`, ...) and a
//! child. Slots live in one table, so "the children of a node" and "the child
//! a driver reads from" are the same fact and cannot drift apart. Drivers keep
//! [`SlotId`]s and resolve them through the [`GraphView`] they are handed on
//! every request; swapping a child is one write to the table.
//!
//! A [`GraphView`] is an immutable snapshot. Edits build a new view and
//! publish it atomically; the I/O path reads the current one without locks.
//!
//! This crate knows nothing about virtio or about any image format: drivers
//! implement [`BlockDriver`], and the I/O buffers are plain [`IoVecs`].

#![warn(missing_docs)]

mod allocation;
mod buffer;
mod counter;
mod drain;
mod driver;
mod error;
mod events;
mod filter;
mod graph;
mod ids;
mod iovec;
mod perm;
mod slot;
mod status_cache;
mod transaction;
mod view;

pub use allocation::{allocation, Allocation};
pub use buffer::{AlignedBuf, AllocError};
pub use counter::ShardedCounter;
pub use drain::Quiesce;
pub use driver::{BlockDriver, BlockStatus, CacheStats, IoFuture, NodeStats, Pooled};
pub use error::{BlockError, GraphError, IoOp};
pub use events::{EventSink, NoEvents};
pub use filter::Filter;
pub use graph::{Graph, LocalView, LocalViews};
pub use ids::{valid_id, NodeId, SlotId};
pub use iovec::{IoVecs, MAX_IOVECS};
pub use perm::{default_child_perm, slot_perms, Perm, SlotPerm};
pub use slot::{Parent, Slot, User, UserKind};
pub use status_cache::DataExtentCache;
pub use transaction::{NodeBuilder, Transaction};
pub use view::{GraphView, Node};
