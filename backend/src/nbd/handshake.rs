//! The fixed newstyle negotiation, on the connection's thread with
//! blocking I/O: options until the client picks an export (GO or
//! EXPORT_NAME), aborts or breaks the protocol. It is bounded in time and
//! in the memory a client can make it use.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_nbd::consts::{info, rep, tflag, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES};
use strata_nbd::consts::{FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC};
use strata_nbd::{option_reply, parse_option, ClientOption, OptionError, OptionHeader};

use super::channel::{ServerTls, Upgrade};
use super::export::{NbdExport, MAX_PAYLOAD};
use super::registry::Registry;

/// How long a client has to finish the negotiation (QEMU's
/// `handshake-max-seconds`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most options one negotiation may send.
const MAX_OPTIONS: usize = 1024;
/// The id of `base:allocation` when selected.
pub const CONTEXT_ALLOCATION: u32 = 1;
/// The id of `qemu:allocation-depth` when selected.
pub const CONTEXT_DEPTH: u32 = 2;

/// The metadata contexts a client selected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Contexts {
    /// `base:allocation`.
    pub allocation: bool,
    /// `qemu:allocation-depth`.
    pub depth: bool,
}

impl Contexts {
    /// True when at least one is selected.
    pub fn any(self) -> bool {
        self.allocation || self.depth
    }
}

/// What the negotiation settled.
pub struct Negotiated {
    /// The export chosen.
    pub export: Arc<NbdExport>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The metadata contexts selected for that export.
    pub contexts: Contexts,
}

/// Runs the negotiation on `s`; with `tls`, nothing but STARTTLS is
/// answered until the channel is encrypted. `Ok(None)` when the client
/// aborted or left; an error names how it broke the protocol.
pub fn negotiate<S: Upgrade>(
    s: &mut S,
    exports: &Registry,
    tls: Option<&ServerTls>,
) -> io::Result<Option<Negotiated>> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut hello = Vec::with_capacity(18);
    hello.extend(NBDMAGIC.to_be_bytes());
    hello.extend(IHAVEOPT.to_be_bytes());
    hello.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return Err(protocol(format!("unknown client flags {flags:#x}")));
    }
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut selected: Option<(String, Contexts)> = None;
    for _ in 0..MAX_OPTIONS {
        if Instant::now() > deadline {
            return Err(protocol(format!(
                "the negotiation took longer than {HANDSHAKE_TIMEOUT:?}"
            )));
        }
        let mut h = [0u8; strata_nbd::OPTION_HEADER_LEN];
        s.read_exact(&mut h)?;
        let header = OptionHeader::parse(&h).map_err(|e| protocol(e.to_string()))?;
        let mut data = vec![0u8; header.len as usize];
        s.read_exact(&mut data)?;
        let o = header.option;
        let mut out = Vec::new();
        let parsed = match parse_option(o, &data) {
            Ok(p) => {
                tracing::debug!("NBD negotiation: {p:?}");
                p
            }
            Err(OptionError::Invalid(msg)) => {
                option_reply(&mut out, o, rep::ERR_INVALID, msg.as_bytes());
                s.write_all(&out)?;
                continue;
            }
            Err(OptionError::Fatal(msg)) => return Err(protocol(msg)),
        };
        if tls.is_some() && !s.is_tls() {
            match parsed {
                ClientOption::Abort | ClientOption::StartTls => {}
                ClientOption::ExportName(name) => {
                    return Err(protocol(format!(
                        "EXPORT_NAME '{name}' before STARTTLS: this server requires TLS"
                    )))
                }
                _ => {
                    let msg = b"this server requires TLS: send STARTTLS first";
                    option_reply(&mut out, o, rep::ERR_TLS_REQD, msg);
                    s.write_all(&out)?;
                    continue;
                }
            }
        }
        match parsed {
            ClientOption::Abort => {
                option_reply(&mut out, o, rep::ACK, &[]);
                // The client may already be gone.
                let _ = s.write_all(&out);
                return Ok(None);
            }
            ClientOption::ExportName(name) => {
                // No way to refuse but closing.
                let export = exports
                    .find(&name)
                    .ok_or_else(|| protocol(format!("EXPORT_NAME '{name}': no such export")))?;
                let (size, flags) = describe(&export, structured)?;
                out.extend(size.to_be_bytes());
                out.extend(flags.to_be_bytes());
                if !no_zeroes {
                    out.extend([0u8; 124]);
                }
                s.write_all(&out)?;
                let contexts = contexts_for(&selected, &name);
                return Ok(Some(Negotiated {
                    export,
                    structured,
                    contexts,
                }));
            }
            ClientOption::List => {
                for e in exports.list() {
                    let name = e.options().name.as_bytes();
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend(name);
                    d.extend(e.options().description.as_deref().unwrap_or("").as_bytes());
                    option_reply(&mut out, o, rep::SERVER, &d);
                }
                option_reply(&mut out, o, rep::ACK, &[]);
            }
            ClientOption::StartTls => match tls {
                None => {
                    let msg = b"TLS is not enabled on this server (no tls-creds)";
                    option_reply(&mut out, o, rep::ERR_POLICY, msg);
                }
                Some(_) if s.is_tls() => {
                    let msg = b"TLS is already on";
                    option_reply(&mut out, o, rep::ERR_INVALID, msg);
                }
                Some(tls) => {
                    option_reply(&mut out, o, rep::ACK, &[]);
                    s.write_all(&out)?;
                    s.start_tls(tls)?;
                    continue;
                }
            },
            ClientOption::StructuredReply => {
                structured = true;
                option_reply(&mut out, o, rep::ACK, &[]);
            }
            ClientOption::Info { go, name, requests } => match exports.find(&name) {
                None => {
                    let msg = format!("export '{name}' not present");
                    option_reply(&mut out, o, rep::ERR_UNKNOWN, msg.as_bytes());
                }
                Some(export) => {
                    info_replies(&mut out, o, &export, structured, &requests)?;
                    option_reply(&mut out, o, rep::ACK, &[]);
                    if go {
                        s.write_all(&out)?;
                        let contexts = contexts_for(&selected, &name);
                        return Ok(Some(Negotiated {
                            export,
                            structured,
                            contexts,
                        }));
                    }
                }
            },
            ClientOption::MetaContext {
                set,
                export,
                queries,
            } => {
                if !structured {
                    let msg = b"metadata contexts need structured replies first";
                    option_reply(&mut out, o, rep::ERR_INVALID, msg);
                } else if let Some(e) = exports.find(&export) {
                    let found = match_contexts(&e, set, &queries);
                    for (id, name) in found.names() {
                        let mut d = (if set { id } else { 0 }).to_be_bytes().to_vec();
                        d.extend(name.as_bytes());
                        option_reply(&mut out, o, rep::META_CONTEXT, &d);
                    }
                    option_reply(&mut out, o, rep::ACK, &[]);
                    if set {
                        selected = Some((export, found));
                    }
                } else {
                    let msg = format!("export '{export}' not present");
                    option_reply(&mut out, o, rep::ERR_UNKNOWN, msg.as_bytes());
                }
            }
            ClientOption::Unknown(n) => {
                let msg = format!("option {n} is not supported");
                option_reply(&mut out, o, rep::ERR_UNSUP, msg.as_bytes());
            }
        }
        s.write_all(&out)?;
    }
    Err(protocol(format!("more than {MAX_OPTIONS} options")))
}

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The contexts selected for `name`: a SET_META_CONTEXT for another export
/// selects nothing for this one.
fn contexts_for(selected: &Option<(String, Contexts)>, name: &str) -> Contexts {
    match selected {
        Some((n, c)) if n == name => *c,
        _ => Contexts::default(),
    }
}

impl Contexts {
    fn names(self) -> impl Iterator<Item = (u32, &'static str)> {
        [
            (self.allocation, CONTEXT_ALLOCATION, "base:allocation"),
            (self.depth, CONTEXT_DEPTH, "qemu:allocation-depth"),
        ]
        .into_iter()
        .filter(|c| c.0)
        .map(|c| (c.1, c.2))
    }
}

/// The contexts `queries` name. A namespace alone (`base:`) lists its
/// contexts but selects none; no query lists everything.
fn match_contexts(e: &NbdExport, set: bool, queries: &[String]) -> Contexts {
    let depth_on = e.options().allocation_depth;
    if queries.is_empty() {
        return Contexts {
            allocation: !set,
            depth: !set && depth_on,
        };
    }
    let mut c = Contexts::default();
    for q in queries {
        match q.as_str() {
            "base:allocation" => c.allocation = true,
            "base:" if !set => c.allocation = true,
            "qemu:allocation-depth" => c.depth |= depth_on,
            "qemu:" if !set => c.depth |= depth_on,
            _ => {}
        }
    }
    c
}

/// The export's size and transmission flags.
fn describe(e: &NbdExport, structured: bool) -> io::Result<(u64, u16)> {
    let v = e.graph().view();
    let size = e
        .size(&v)
        .map_err(|err| io::Error::other(format!("cannot size the export: {err}")))?;
    let mut flags = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_CACHE;
    if e.options().writable {
        flags |=
            tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    } else {
        // Nothing changes the disk under a reader but this daemon, which
        // every connection sees alike.
        flags |= tflag::READ_ONLY | tflag::CAN_MULTI_CONN;
    }
    if structured {
        flags |= tflag::SEND_DF;
    }
    Ok((size, flags))
}

/// The INFO replies for INFO and GO: the export's size and flags and its
/// block sizes always, its name and description when asked.
fn info_replies(
    out: &mut Vec<u8>,
    o: u32,
    e: &NbdExport,
    structured: bool,
    requests: &[u16],
) -> io::Result<()> {
    let (size, flags) = describe(e, structured)?;
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend(size.to_be_bytes());
    d.extend(flags.to_be_bytes());
    option_reply(out, o, rep::INFO, &d);
    let min = e.alignment(&e.graph().view());
    let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend(min.to_be_bytes());
    d.extend(min.max(4096).to_be_bytes());
    d.extend(MAX_PAYLOAD.to_be_bytes());
    option_reply(out, o, rep::INFO, &d);
    if requests.contains(&info::NAME) {
        let mut d = info::NAME.to_be_bytes().to_vec();
        d.extend(e.options().name.as_bytes());
        option_reply(out, o, rep::INFO, &d);
    }
    if let (true, Some(desc)) = (
        requests.contains(&info::DESCRIPTION),
        &e.options().description,
    ) {
        let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
        d.extend(desc.as_bytes());
        option_reply(out, o, rep::INFO, &d);
    }
    Ok(())
}
