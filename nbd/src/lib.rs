//! The NBD protocol's wire format (the NetworkBlockDevice project's
//! `doc/proto.md`), as far as Strata speaks it: fixed newstyle
//! negotiation, the options QEMU and libnbd send, requests, and simple and
//! structured replies with 32-bit lengths.
//!
//! Everything here is pure: parsers take bytes the peer sent and return a
//! typed value or an error that names what was wrong; encoders append to a
//! buffer. Sockets, TLS and the block graph live with the server and the
//! client that use this crate.

#![warn(missing_docs)]

pub mod client;
pub mod consts;
mod option;
mod reply;
mod request;

pub use option::{
    parse_option, ClientOption, OptionError, OptionHeader, MAX_OPTION_LEN, OPTION_HEADER_LEN,
};
pub use reply::{
    block_status_chunk, data_chunk, error_chunk, hole_chunk, option_reply, simple_reply,
    structured_header, Extent,
};
pub use request::{Command, Limits, Rejection, Request, RequestError, REQUEST_LEN};
