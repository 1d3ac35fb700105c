//! Helpers for Strata's workspace-level tests: run the real `strata`
//! binary, drive it with a frontend, boot a guest against it.

pub mod client;
pub mod daemon;
pub mod frontend;
pub mod guest;
pub mod host;
pub mod memory_diff;
pub mod nbd_client;
pub mod pattern;
pub mod pki;
pub mod qemu;
pub mod qmp;
