//! Strata's block jobs: the job framework (QEMU's job states, pause,
//! cancel, rate limits, error policies and events) and the jobs that run
//! on it: `block-stream`, `block-commit` (intermediate and active),
//! `blockdev-mirror` and `blockdev-snapshot`'s graph change.
//!
//! Each job's setup runs on the monitor thread inside one graph
//! transaction: it checks its range is free, freezes the backing slots it
//! works on and holds its nodes through job users. The copying runs on the
//! job's own thread ([`job`]), and the job ends by rewriting one slot.

#![warn(missing_docs)]

mod blockdev_mirror;
mod chain;
mod commit;
mod copy;
mod dirty;
mod filter;
mod hold;
pub mod job;
mod mirror;
mod snapshot;
mod stream;
mod write_blocking;

pub use blockdev_mirror::{mirror, MirrorArgs, Sync};
pub use commit::{commit, CommitArgs};
pub use dirty::DirtyMap;
pub use snapshot::snapshot;
pub use stream::{stream, StreamArgs};

/// A node named on a command: by node name, or by its image's file name.
#[derive(Clone, Debug)]
pub enum NodeRef {
    /// `base-node`, `top-node`, `bottom`.
    Node(String),
    /// `base`, `top`: a file name in the chain.
    File(String),
}
