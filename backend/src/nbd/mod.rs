//! Strata's NBD server, as qemu-storage-daemon offers it: `--nbd-server`
//! or `nbd-server-start` listens, `--export type=nbd` or
//! `block-export-add` offers a node under a name. The wire format is
//! `strata_nbd`'s; this module adds the sockets, the negotiation and the
//! requests run against the graph.

mod buffers;
pub(crate) mod channel;
mod export;
pub(crate) mod handshake;
pub(crate) mod registry;
mod server;
mod transmission;
mod transport;

pub use channel::ServerTls;
pub use export::{NbdExport, NbdExportOptions, MAX_PAYLOAD};
pub use server::{NbdServer, ServerAddr, ServerOptions};
