//! Errors of the I/O path ([`BlockError`]) and of graph edits ([`GraphError`]).

use std::fmt;
use std::io;

use crate::{NodeId, SlotId};

/// The kind of request a [`BlockError`] happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush to stable storage.
    Flush,
    /// A discard (unmap).
    Discard,
    /// A write of zeroes.
    WriteZeroes,
    /// A change of size.
    Resize,
    /// A change of the backing file named in the image's metadata.
    ChangeBackingFile,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
            IoOp::WriteZeroes => "write-zeroes",
            IoOp::Resize => "resize",
            IoOp::ChangeBackingFile => "backing file change",
        })
    }
}

/// A failed request on the I/O path.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The host rejected the operation.
    #[error("{op} at byte {offset} failed: {source}")]
    Io {
        /// What was attempted.
        op: IoOp,
        /// Where, in the failing node's address space.
        offset: u64,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// The request reaches past the end of the node.
    #[error("{op} of {len} bytes at byte {offset} ends past the end of the node ({size} bytes)")]
    OutOfRange {
        /// What was attempted.
        op: IoOp,
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the node.
        size: u64,
    },
    /// A write-class request reached a node opened read-only.
    #[error("{op} refused: the node is read-only")]
    ReadOnly {
        /// What was attempted.
        op: IoOp,
    },
    /// The driver cannot do this kind of request.
    #[error("{op} is not supported by the {driver} driver")]
    Unsupported {
        /// What was attempted.
        op: IoOp,
        /// The driver's name.
        driver: &'static str,
    },
    /// A driver resolved a slot that holds no child.
    #[error("{slot} holds no child")]
    EmptySlot {
        /// The slot.
        slot: SlotId,
    },
    /// A buffer the request needs could not be allocated.
    #[error(transparent)]
    NoMemory(#[from] crate::AllocError),
    /// The node is inactive: another process owns its image (a live
    /// migration hands it over) until it is activated.
    #[error("node '{node}' is inactive (blockdev-set-active activates it)")]
    Inactive {
        /// The node's name.
        node: std::sync::Arc<str>,
    },
}

impl BlockError {
    /// Wraps a host error.
    pub fn io(op: IoOp, offset: u64, source: io::Error) -> Self {
        BlockError::Io { op, offset, source }
    }

    /// Wraps a negative errno, as io_uring reports it.
    pub fn errno(op: IoOp, offset: u64, errno: i32) -> Self {
        BlockError::Io {
            op,
            offset,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// Checks that `len` bytes at `offset` fit in a node of `size` bytes.
    pub fn check_range(op: IoOp, offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                op,
                offset,
                len,
                size,
            }),
        }
    }

    /// True when the request type itself is unsupported, as opposed to failing.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, BlockError::Unsupported { .. })
    }
}

/// A refused or failed edit of the graph.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// Two nodes cannot share a name.
    #[error("node name '{name}' is already in use")]
    DuplicateName {
        /// The name asked for.
        name: String,
    },
    /// The name is empty or uses characters QEMU does not allow.
    #[error(
        "node name '{name}' is invalid: use letters, digits, '-', '.' and '_', starting with a letter"
    )]
    InvalidName {
        /// The name asked for.
        name: String,
    },
    /// No node has this id (it was never created, or was deleted).
    #[error("{id} does not exist")]
    NoSuchNode {
        /// The id.
        id: NodeId,
    },
    /// No node has this name.
    #[error("no node named '{name}'")]
    UnknownNode {
        /// The name asked for.
        name: String,
    },
    /// The node is in use, so it cannot be deleted.
    #[error("Node '{node}' is busy: it is used by {user}")]
    Busy {
        /// The node.
        node: String,
        /// Who uses it: "'top' as 'backing'", "export 'vda'".
        user: String,
    },
    /// The node is part of a running job's range.
    #[error("Node '{node}' is busy: block device is in use by block job '{job}'")]
    InJob {
        /// The node.
        node: String,
        /// The job's id.
        job: String,
    },
    /// A frozen slot cannot change.
    #[error("Cannot change frozen '{role}' link of {parent}: it is frozen by job '{job}'")]
    Frozen {
        /// The slot's role.
        role: String,
        /// The slot's owner.
        parent: String,
        /// The job that froze it.
        job: String,
    },
    /// The edit would make a node its own descendant.
    #[error("Making '{child}' the '{role}' child of '{parent}' would create a cycle")]
    Cycle {
        /// The parent.
        parent: String,
        /// The would-be child.
        child: String,
        /// The slot's role.
        role: String,
    },
    /// Two users of a node want what the other does not allow.
    #[error("Conflicts with use by {other}, which does not allow '{perm}' on '{node}' (needed by {user})")]
    PermissionConflict {
        /// The node.
        node: String,
        /// The refused permissions.
        perm: String,
        /// The user that needs them.
        user: String,
        /// The user that does not share them.
        other: String,
    },
    /// A user needs to write to a node opened read-only.
    #[error("Block node '{node}' is read-only, but {user} needs to write to it")]
    ReadOnlyNode {
        /// The node.
        node: String,
        /// The writer.
        user: String,
    },
    /// The slot does not exist.
    #[error("{slot} does not exist")]
    NoSuchSlot {
        /// The slot.
        slot: SlotId,
    },
    /// A user name is taken.
    #[error("{user} already uses a node")]
    DuplicateUser {
        /// The user.
        user: String,
    },
    /// A user could not be quiesced before the edit.
    #[error("cannot drain {user}: {source}")]
    Drain {
        /// The user.
        user: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The node could not take the permissions its parents need outside
    /// the process (an image lock someone else holds).
    #[error("node '{node}': {source}")]
    Perm {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The driver refused to open the node.
    #[error("cannot open node '{name}': {source}")]
    Open {
        /// The node being opened.
        name: String,
        /// Why the driver refused.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
