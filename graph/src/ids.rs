//! Identifiers for nodes and slots. Both index arenas and are never reused,
//! so a stale id can only miss, never alias a newer object.

use std::fmt;

/// A node in the graph's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) u32);

/// One edge of the graph: an entry in the slot table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub(crate) u32);

impl NodeId {
    /// The node's position in the arena (stable for the node's life).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl SlotId {
    /// The slot's position in the table (stable for the slot's life).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node#{}", self.0)
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot#{}", self.0)
    }
}

/// QEMU's rule for node names and job ids: a letter, then letters, digits,
/// `-`, `.` or `_`, at most 127 characters.
pub fn valid_id(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && name.len() <= 127
}
