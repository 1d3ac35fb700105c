//! Options of the fixed newstyle negotiation: the 16-byte header a client
//! sends for each, and its data, parsed into what the server must answer.

use crate::consts::{opt, IHAVEOPT};

/// Bytes in an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// The longest option data read. Names and queries are at most 4096 bytes
/// each by the specification; anything longer is not read at all.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The longest string the specification allows.
const MAX_STRING: usize = 4096;
/// Most queries accepted in one LIST or SET_META_CONTEXT.
const MAX_QUERIES: u32 = 64;
/// Most information requests accepted in one INFO or GO.
const MAX_INFO_REQUESTS: u16 = 64;

/// An option header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`opt`).
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Parses a header; a wrong magic means the client is not speaking
    /// NBD, and the connection is closed.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, OptionError> {
        let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(OptionError::Fatal(format!(
                "bad option magic {magic:#018x} (expected {IHAVEOPT:#018x})"
            )));
        }
        let h = OptionHeader {
            option: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
            len: u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
        };
        if h.len > MAX_OPTION_LEN {
            return Err(OptionError::Fatal(format!(
                "option {} carries {} bytes (at most {MAX_OPTION_LEN})",
                h.option, h.len
            )));
        }
        Ok(h)
    }

    /// The header's bytes, as a client sends it.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// An option with its data understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// Start transmission on this export; no error can be sent.
    ExportName(String),
    /// End the negotiation.
    Abort,
    /// List exports.
    List,
    /// Upgrade to TLS.
    StartTls,
    /// Describe an export (`go` false) or describe it and start
    /// transmission (`go` true).
    Info {
        /// True for GO.
        go: bool,
        /// The export's name.
        name: String,
        /// The information types asked for.
        requests: Vec<u16>,
    },
    /// Use structured replies.
    StructuredReply,
    /// List (`set` false) or select (`set` true) metadata contexts.
    MetaContext {
        /// True for SET_META_CONTEXT.
        set: bool,
        /// The export they are for.
        export: String,
        /// The queries.
        queries: Vec<String>,
    },
    /// An option this server does not know.
    Unknown(u32),
}

/// What is wrong with an option.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The data does not match the option: answered with ERR_INVALID, and
    /// the negotiation goes on.
    #[error("{0}")]
    Invalid(String),
    /// The client is not following the protocol: the connection is closed.
    #[error("{0}")]
    Fatal(String),
}

/// Reads the data of option `header.option`, all of it in `data`.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    let mut r = Reader { data, name: option };
    let parsed = match option {
        opt::EXPORT_NAME => {
            return Ok(ClientOption::ExportName(r.string(data.len())?));
        }
        opt::ABORT => ClientOption::Abort,
        opt::LIST => ClientOption::List,
        opt::STARTTLS => ClientOption::StartTls,
        opt::STRUCTURED_REPLY => ClientOption::StructuredReply,
        opt::INFO | opt::GO => {
            let n = r.u32()? as usize;
            let name = r.string(n)?;
            let count = r.u16()?;
            if count > MAX_INFO_REQUESTS {
                return Err(r.invalid(format!("{count} information requests")));
            }
            let requests = (0..count).map(|_| r.u16()).collect::<Result<_, _>>()?;
            ClientOption::Info {
                go: option == opt::GO,
                name,
                requests,
            }
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let n = r.u32()? as usize;
            let export = r.string(n)?;
            let count = r.u32()?;
            if count > MAX_QUERIES {
                return Err(r.invalid(format!("{count} queries")));
            }
            let mut queries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let n = r.u32()? as usize;
                queries.push(r.string(n)?);
            }
            ClientOption::MetaContext {
                set: option == opt::SET_META_CONTEXT,
                export,
                queries,
            }
        }
        other => return Ok(ClientOption::Unknown(other)),
    };
    if !r.data.is_empty() {
        return Err(r.invalid(format!("{} bytes too many", r.data.len())));
    }
    Ok(parsed)
}

struct Reader<'a> {
    data: &'a [u8],
    name: u32,
}

impl<'a> Reader<'a> {
    fn invalid(&self, what: String) -> OptionError {
        OptionError::Invalid(format!("option {}: {what}", self.name))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if n > self.data.len() {
            return Err(self.invalid(format!("needs {n} more bytes, has {}", self.data.len())));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, OptionError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn string(&mut self, n: usize) -> Result<String, OptionError> {
        if n > MAX_STRING {
            return Err(self.invalid(format!("a string of {n} bytes (at most {MAX_STRING})")));
        }
        let b = self.take(n)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| self.invalid("a string that is not UTF-8".into()))?;
        if s.contains('\0') {
            return Err(self.invalid("a string with a NUL".into()));
        }
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be32(n: usize) -> [u8; 4] {
        (n as u32).to_be_bytes()
    }

    #[test]
    fn go_carries_the_name_and_the_information_asked_for() {
        let mut d = be32(4).to_vec();
        d.extend(b"disk");
        d.extend(2u16.to_be_bytes());
        d.extend(3u16.to_be_bytes());
        d.extend(1u16.to_be_bytes());
        assert_eq!(
            parse_option(opt::GO, &d),
            Ok(ClientOption::Info {
                go: true,
                name: "disk".into(),
                requests: vec![3, 1]
            })
        );
        // One byte short, one too many.
        assert!(matches!(
            parse_option(opt::GO, &d[..d.len() - 1]),
            Err(OptionError::Invalid(_))
        ));
        d.push(0);
        assert!(matches!(
            parse_option(opt::GO, &d),
            Err(OptionError::Invalid(_))
        ));
    }

    #[test]
    fn meta_context_queries_are_read_one_by_one() {
        let mut d = be32(0).to_vec();
        d.extend(be32(2));
        for q in ["base:allocation", "qemu:allocation-depth"] {
            d.extend(be32(q.len()));
            d.extend(q.as_bytes());
        }
        assert_eq!(
            parse_option(opt::SET_META_CONTEXT, &d),
            Ok(ClientOption::MetaContext {
                set: true,
                export: String::new(),
                queries: vec!["base:allocation".into(), "qemu:allocation-depth".into()]
            })
        );
    }

    #[test]
    fn hostile_lengths_are_refused_before_anything_is_allocated() {
        let mut d = be32(0).to_vec();
        d.extend(be32(u32::MAX as usize));
        assert!(matches!(
            parse_option(opt::LIST_META_CONTEXT, &d),
            Err(OptionError::Invalid(_))
        ));
        let d = be32(usize::MAX >> 33).to_vec();
        assert!(matches!(
            parse_option(opt::INFO, &d),
            Err(OptionError::Invalid(_))
        ));
        assert!(matches!(
            parse_option(opt::LIST, b"x"),
            Err(OptionError::Invalid(_))
        ));
        assert!(matches!(
            parse_option(opt::EXPORT_NAME, b"\xff"),
            Err(OptionError::Invalid(_))
        ));
        let h = OptionHeader {
            option: opt::GO,
            len: MAX_OPTION_LEN + 1,
        }
        .encode();
        assert!(matches!(
            OptionHeader::parse(&h),
            Err(OptionError::Fatal(_))
        ));
        let mut h = OptionHeader {
            option: opt::GO,
            len: 0,
        }
        .encode();
        h[0] = 0;
        assert!(matches!(
            OptionHeader::parse(&h),
            Err(OptionError::Fatal(_))
        ));
    }

    #[test]
    fn unknown_options_are_reported_not_refused() {
        assert_eq!(
            parse_option(999, b"whatever"),
            Ok(ClientOption::Unknown(999))
        );
    }
}
