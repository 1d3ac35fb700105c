//! QMP's `SocketAddress`, as `--nbd-server addr.*` and `driver=nbd`'s
//! `server.*` spell it: a unix socket path, or a TCP host and port.

use std::path::PathBuf;

use crate::options::{Options, OptionsError};

/// Where to listen or connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAddress {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP address.
    Inet {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A socket the parent handed in: a descriptor number or a name.
    Fd(String),
}

impl std::fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            SocketAddress::Inet { host, port } => write!(f, "{host}:{port}"),
            SocketAddress::Fd(s) => write!(f, "fd '{s}'"),
        }
    }
}

/// Takes the address in group `key`. QMP's legacy form (`{"type": "unix",
/// "data": {...}}`) is taken too; options that change nothing here
/// (`tight`, `numeric`, `keep-alive`, ...) are accepted.
pub fn take_socket_address(o: &mut Options, key: &str) -> Result<SocketAddress, OptionsError> {
    let addr = o.take_group(key)?;
    let mut addr = o.required(key, addr)?;
    let kind = addr.take_enum("type", &["unix", "inet", "fd"])?;
    let kind = addr.required("type", kind)?;
    if let Some(data) = addr.take_group("data")? {
        addr = data;
    }
    let parsed = if kind == "fd" {
        let s = addr.take_str("str")?;
        SocketAddress::Fd(addr.required("str", s)?)
    } else if kind == "unix" {
        let path = addr.take_str("path")?;
        let path = addr.required("path", path)?;
        if addr.take_bool("abstract")? == Some(true) {
            return Err(OptionsError::Invalid(
                "abstract unix sockets are not supported".into(),
            ));
        }
        addr.take_bool("tight")?;
        SocketAddress::Unix(path.into())
    } else {
        let host = addr.take_str("host")?;
        let host = addr.required("host", host)?;
        let port = addr.take_str("port")?;
        let port = addr.required("port", port)?;
        let port = port.parse::<u16>().map_err(|_| {
            OptionsError::Invalid(format!("{key}.port '{port}': not a port number"))
        })?;
        for flag in ["numeric", "ipv4", "ipv6", "keep-alive", "mptcp"] {
            addr.take_bool(flag)?;
        }
        addr.take_str("to")?;
        SocketAddress::Inet { host, port }
    };
    addr.finish()?;
    Ok(parsed)
}
