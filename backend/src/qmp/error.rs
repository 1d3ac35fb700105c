//! QMP errors: a class (QEMU's ErrorClass) and a description that names
//! what was wrong.

use std::fmt;

use strata_blockdev::options::OptionsError;
use strata_blockdev::BlockdevError;
use strata_graph::GraphError;

use crate::export::ExportError;

/// A failed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// `GenericError`, `CommandNotFound` or `DeviceNotFound`.
    pub class: &'static str,
    /// What went wrong.
    pub desc: String,
}

impl QmpError {
    /// A GenericError.
    pub fn generic(desc: impl fmt::Display) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.to_string(),
        }
    }

    /// A CommandNotFound.
    pub fn command_not_found(desc: impl fmt::Display) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: desc.to_string(),
        }
    }

    /// A DeviceNotFound.
    pub fn device_not_found(desc: impl fmt::Display) -> Self {
        QmpError {
            class: "DeviceNotFound",
            desc: desc.to_string(),
        }
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

impl From<OptionsError> for QmpError {
    fn from(e: OptionsError) -> Self {
        QmpError::generic(e)
    }
}

impl From<GraphError> for QmpError {
    fn from(e: GraphError) -> Self {
        QmpError::generic(e)
    }
}

impl From<BlockdevError> for QmpError {
    fn from(e: BlockdevError) -> Self {
        match e {
            BlockdevError::NoSuchNode(_) => QmpError::device_not_found(e),
            e => QmpError::generic(e),
        }
    }
}

impl From<ExportError> for QmpError {
    fn from(e: ExportError) -> Self {
        QmpError::generic(e)
    }
}
