//! The client's side of the fixed newstyle negotiation, blocking and
//! bounded in time: STARTTLS when the node has TLS credentials, structured
//! replies, the `base:allocation` context, then GO with the block sizes.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use strata_nbd::client::{option_request, OptionReply, ServerError, OPTION_REPLY_LEN};
use strata_nbd::consts::{info, opt, rep, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES};
use strata_nbd::consts::{FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC};

use super::wire::{Server, Socket};

/// The node's TLS: its credentials and the name the server's certificate
/// must carry.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// From the `tls-creds` object.
    pub config: Arc<ClientConfig>,
    /// `tls-hostname`, or the server's host.
    pub hostname: Option<String>,
}

/// What the server said of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Its size in bytes.
    pub size: u64,
    /// Transmission flags (`tflag`).
    pub flags: u16,
    /// Offsets and lengths must be multiples of this.
    pub min_block: u32,
    /// The longest READ or WRITE it takes.
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The id of `base:allocation`, when the server offers it.
    pub allocation: Option<u32>,
}

/// A negotiated connection.
pub struct Negotiated {
    /// The socket.
    pub socket: Socket,
    /// The TLS session on it.
    pub tls: Option<ClientConnection>,
    /// The export.
    pub info: ExportInfo,
}

/// The longest payload assumed when the server names none (the
/// specification's default, 32 MiB).
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

fn fail(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn broke(e: ServerError) -> io::Error {
    fail(e.to_string())
}

/// Connects to `server` and negotiates `export`; every read is bounded by
/// `timeout`.
pub fn negotiate(
    server: &Server,
    export: &str,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> io::Result<Negotiated> {
    let mut socket = Socket::connect(server, timeout)?;
    socket.set_read_timeout(Some(timeout))?;
    let mut hello = [0u8; 18];
    socket.read_exact(&mut hello)?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8 bytes"));
    let ihaveopt = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    if magic != NBDMAGIC || ihaveopt != IHAVEOPT {
        return Err(fail(format!(
            "not a newstyle NBD server (greeting {magic:#018x} {ihaveopt:#018x})"
        )));
    }
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(fail("the server does not speak fixed newstyle NBD"));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    socket.write_all(&cflags.to_be_bytes())?;
    let (info, session) = match tls {
        None => (options(&mut socket, export)?, None),
        Some(tls) => {
            let mut conn = start_tls(&mut socket, server, tls)?;
            let info = options(&mut rustls::Stream::new(&mut conn, &mut socket), export)?;
            (info, Some(conn))
        }
    };
    socket.set_read_timeout(None)?;
    Ok(Negotiated {
        socket,
        tls: session,
        info,
    })
}

fn start_tls(
    socket: &mut Socket,
    server: &Server,
    tls: &ClientTls,
) -> io::Result<ClientConnection> {
    let (reply, msg) = ask(socket, opt::STARTTLS, &[])?;
    if reply != rep::ACK {
        return Err(fail(format!("the server refused STARTTLS: {msg}")));
    }
    let host = match (&tls.hostname, server) {
        (Some(h), _) => h.clone(),
        (None, Server::Tcp { host, .. }) => host.clone(),
        (None, Server::Unix(_)) => {
            return Err(fail("TLS over a unix socket needs tls-hostname"));
        }
    };
    let name = ServerName::try_from(host.clone())
        .map_err(|e| fail(format!("tls-hostname '{host}': {e}")))?;
    let mut conn =
        ClientConnection::new(Arc::clone(&tls.config), name).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(socket)
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
    }
    Ok(conn)
}

/// Sends option `o` and reads its replies up to the final one; returns
/// that reply's type and, for an error, its message. `each` sees every
/// informational reply.
fn ask_with<S: Read + Write>(
    s: &mut S,
    o: u32,
    data: &[u8],
    mut each: impl FnMut(u32, &[u8]) -> io::Result<()>,
) -> io::Result<(u32, String)> {
    let mut out = Vec::new();
    option_request(&mut out, o, data);
    s.write_all(&out)?;
    s.flush()?;
    // Informational replies end with the final one; a server that sends
    // them forever is cut off.
    for _ in 0..4096 {
        let mut h = [0u8; OPTION_REPLY_LEN];
        s.read_exact(&mut h)?;
        let r = OptionReply::parse(&h, o).map_err(broke)?;
        let mut d = vec![0u8; r.len as usize];
        s.read_exact(&mut d)?;
        if r.is_error() {
            return Ok((r.reply, String::from_utf8_lossy(&d).into_owned()));
        }
        if r.reply == rep::ACK {
            return Ok((r.reply, String::new()));
        }
        each(r.reply, &d)?;
    }
    Err(fail(format!("endless replies to option {o}")))
}

fn ask<S: Read + Write>(s: &mut S, o: u32, data: &[u8]) -> io::Result<(u32, String)> {
    ask_with(s, o, data, |r, _| {
        Err(fail(format!("an unexpected reply {r:#x} to option {o}")))
    })
}

fn name_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d
}

fn refused(what: &str, reply: u32, msg: &str) -> io::Error {
    let why = match reply {
        rep::ERR_TLS_REQD => "the server requires TLS (give the node tls-creds)".to_string(),
        rep::ERR_UNKNOWN => format!("no such export on the server ({msg})"),
        _ => format!("the server refused it ({reply:#x}: {msg})"),
    };
    fail(format!("{what}: {why}"))
}

fn options<S: Read + Write>(s: &mut S, export: &str) -> io::Result<ExportInfo> {
    if export.len() > 4096 {
        return Err(fail("export names are at most 4096 bytes"));
    }
    let (reply, msg) = ask(s, opt::STRUCTURED_REPLY, &[])?;
    let structured = match reply {
        rep::ACK => true,
        rep::ERR_UNSUP => false,
        _ => return Err(refused("structured replies", reply, &msg)),
    };
    let mut allocation = None;
    if structured {
        let mut d = name_data(export);
        d.extend(1u32.to_be_bytes());
        d.extend(name_data("base:allocation"));
        let (reply, msg) = ask_with(s, opt::SET_META_CONTEXT, &d, |r, d| {
            if r == rep::META_CONTEXT && d.len() >= 4 && &d[4..] == b"base:allocation" {
                allocation = Some(u32::from_be_bytes(d[..4].try_into().expect("4 bytes")));
            }
            Ok(())
        })?;
        if reply != rep::ACK && reply != rep::ERR_UNSUP {
            return Err(refused(&format!("export '{export}'"), reply, &msg));
        }
    }
    let mut d = name_data(export);
    d.extend(1u16.to_be_bytes());
    d.extend(info::BLOCK_SIZE.to_be_bytes());
    let mut info = ExportInfo {
        size: u64::MAX,
        flags: 0,
        min_block: 1,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured,
        allocation,
    };
    let (reply, msg) = ask_with(s, opt::GO, &d, |r, d| {
        if r != rep::INFO || d.len() < 2 {
            return Ok(());
        }
        let be32 = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4 bytes"));
        match u16::from_be_bytes([d[0], d[1]]) {
            info::EXPORT if d.len() == 12 => {
                info.size = u64::from_be_bytes(d[2..10].try_into().expect("8 bytes"));
                info.flags = u16::from_be_bytes([d[10], d[11]]);
            }
            info::BLOCK_SIZE if d.len() == 14 => {
                let (min, max) = (be32(2), be32(10));
                if !min.is_power_of_two() || min > 64 << 10 || max < min {
                    return Err(fail(format!("block sizes min {min}, max {max}")));
                }
                info.min_block = min;
                info.max_payload = max.min(DEFAULT_MAX_PAYLOAD) / min * min;
            }
            _ => {}
        }
        Ok(())
    })?;
    if reply != rep::ACK {
        return Err(refused(&format!("export '{export}'"), reply, &msg));
    }
    if info.size == u64::MAX {
        return Err(fail("the server did not send the export's size"));
    }
    if info.size > i64::MAX as u64 {
        return Err(fail(format!("an export of {} bytes", info.size)));
    }
    Ok(info)
}
