//! `driver=nbd`'s options, as QEMU spells them: `server.*` (unix or inet),
//! `export`, `tls-creds`, `tls-hostname`, `reconnect-delay` and
//! `open-timeout`.

use std::net::ToSocketAddrs;
use std::time::Duration;

use strata_formats::nbd::connection::ConnectOptions;
use strata_formats::nbd::handshake::ClientTls;
use strata_formats::nbd::wire::Server;

use super::{BlockdevError, OpenContext};
use crate::options::{Options, OptionsError};
use crate::socket_address::{take_socket_address, SocketAddress};

fn invalid(msg: String) -> BlockdevError {
    BlockdevError::Options(OptionsError::Invalid(msg))
}

/// Parses the options of an `nbd` node.
pub(super) fn options(o: &mut Options, ctx: &OpenContext) -> Result<ConnectOptions, BlockdevError> {
    let server =
        match take_socket_address(o, "server")? {
            SocketAddress::Unix(path) => Server::Unix(path),
            SocketAddress::Inet { host, port } => {
                // Resolved now, while the name service is reachable: a
                // sandboxed daemon may not read /etc/hosts later.
                let addrs: Vec<_> = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| invalid(format!("server.host '{host}': {e}")))?
                    .collect();
                Server::Tcp { host, port, addrs }
            }
            // A connected socket would be lost with the first reconnect.
            SocketAddress::Fd(_) => return Err(invalid(
                "server.type 'fd' is not supported for driver=nbd: give unix or inet, which the \
                 driver can reconnect to"
                    .into(),
            )),
        };
    let export = o.take_str("export")?.unwrap_or_default();
    let hostname = o.take_str("tls-hostname")?;
    let tls = match o.take_str("tls-creds")? {
        Some(id) => {
            let config = ctx
                .tls
                .creds(&id)
                .and_then(|c| c.client())
                .map_err(invalid)?;
            Some(ClientTls { config, hostname })
        }
        None if hostname.is_some() => {
            return Err(invalid(
                "'tls-hostname' is only valid with 'tls-creds'".into(),
            ))
        }
        None => None,
    };
    if let Some(b) = o.take_str("x-dirty-bitmap")? {
        return Err(BlockdevError::NotSupported(format!("x-dirty-bitmap '{b}'")));
    }
    let secs = |v: Option<u64>, key: &str| -> Result<Duration, BlockdevError> {
        match v.unwrap_or(0) {
            s if s <= u64::from(u32::MAX) => Ok(Duration::from_secs(s)),
            s => Err(invalid(format!("{key} {s} is too large"))),
        }
    };
    let reconnect_delay = secs(o.take_u64("reconnect-delay")?, "reconnect-delay")?;
    let open_timeout = secs(o.take_u64("open-timeout")?, "open-timeout")?;
    Ok(ConnectOptions {
        server,
        export,
        tls,
        reconnect_delay,
        open_timeout,
    })
}
