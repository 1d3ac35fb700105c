//! Strata's blockdev layer: qemu-storage-daemon's `--blockdev` and QMP
//! `blockdev-add` options, parsed ([`options`]) and assembled into graph
//! nodes ([`open`]); `blockdev-reopen`, backing-link rewrites and quorum
//! children changes; and the options of the objects nodes refer to
//! ([`throttle`]).
//!
//! ```text
//!  --blockdev driver=qcow2,file.driver=file,file.filename=a.qcow2
//!     └─▶ Options (keyval or JSON) ─▶ open::add ─▶ Transaction: file node,
//!                                                   qcow2 node, "file" slot
//! ```

#![warn(missing_docs)]

mod blkdebug;
pub mod open;
pub mod options;
pub mod secret;
pub mod socket_address;
pub mod throttle;
pub mod tls;

pub use open::{add, change_quorum, reopen, set_active, set_backing, BlockdevError, OpenContext};
pub use options::{parse_size, ChildOption, Options, OptionsError};
