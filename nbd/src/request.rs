//! Transmission requests: the 28-byte header a client sends for every
//! command, and the checks every request must pass before it touches the
//! export.

use crate::consts::{cflag, cmd, err, REQUEST_MAGIC};

/// Bytes in a request header (compact headers; extended headers are not
/// negotiated).
pub const REQUEST_LEN: usize = 28;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes.
    Read,
    /// Write the `len` bytes that follow the header.
    Write,
    /// Soft disconnect.
    Disconnect,
    /// Make completed writes durable.
    Flush,
    /// Discard.
    Trim,
    /// Prefetch.
    Cache,
    /// Write zeroes.
    WriteZeroes,
    /// Report allocation.
    BlockStatus,
    /// A command this server does not know.
    Unknown(u16),
}

impl Command {
    fn from_wire(ty: u16) -> Command {
        match ty {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::DISC => Command::Disconnect,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::CACHE => Command::Cache,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            cmd::BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The command's number on the wire.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => cmd::READ,
            Command::Write => cmd::WRITE,
            Command::Disconnect => cmd::DISC,
            Command::Flush => cmd::FLUSH,
            Command::Trim => cmd::TRIM,
            Command::Cache => cmd::CACHE,
            Command::WriteZeroes => cmd::WRITE_ZEROES,
            Command::BlockStatus => cmd::BLOCK_STATUS,
            Command::Unknown(n) => n,
        }
    }

    /// True for commands that change the export.
    pub fn writes(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }

    /// The request flags that mean something for this command.
    fn allowed_flags(self) -> u16 {
        match self {
            Command::Read => cflag::DF,
            Command::Write | Command::Trim => cflag::FUA,
            Command::WriteZeroes => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
            Command::BlockStatus => cflag::REQ_ONE,
            _ => 0,
        }
    }
}

/// One request header, as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cflag`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's tag, echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte count.
    pub len: u32,
}

/// A header that cannot be a request: the connection cannot be trusted to
/// be in step any more, and is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x} (expected {REQUEST_MAGIC:#010x})")]
pub struct RequestError(pub u32);

/// Why a well-formed request is refused: the error value for the reply and
/// a message for the log and for a structured error chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The NBD error value (`err`).
    pub error: u32,
    /// What was wrong.
    pub message: String,
}

/// What a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The export's size in bytes.
    pub size: u64,
    /// The longest READ or WRITE accepted.
    pub max_payload: u32,
    /// Offsets and lengths of data commands must be multiples of this.
    pub alignment: u32,
    /// Write-class commands are refused.
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// At least one metadata context was selected.
    pub has_contexts: bool,
}

impl Request {
    /// Parses a header. Only the magic is checked here; see
    /// [`check`](Self::check) for the rest.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, RequestError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(RequestError(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
            command: Command::from_wire(u16::from_be_bytes(b[6..8].try_into().expect("2 bytes"))),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }

    /// The header's bytes, as a client sends it.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.len
        } else {
            0
        }
    }

    /// Checks the request against the export and what was negotiated.
    /// A WRITE whose payload is too long to read is refused here too; the
    /// caller must then not try to read it (it closes the connection).
    pub fn check(&self, l: &Limits) -> Result<(), Rejection> {
        let reject = |error, message: String| Err(Rejection { error, message });
        let c = self.command;
        if let Command::Unknown(n) = c {
            return reject(err::EINVAL, format!("unknown command {n}"));
        }
        let stray = self.flags & !c.allowed_flags();
        if stray != 0 {
            return reject(
                err::EINVAL,
                format!("flags {stray:#x} are not valid for {c:?}"),
            );
        }
        if self.flags & cflag::DF != 0 && !l.structured {
            return reject(err::EINVAL, "DF without structured replies".into());
        }
        if matches!(c, Command::Disconnect | Command::Flush) {
            return Ok(());
        }
        if c == Command::BlockStatus && !l.has_contexts {
            return reject(
                err::EINVAL,
                "BLOCK_STATUS without a metadata context".into(),
            );
        }
        if matches!(c, Command::Read | Command::Write) && self.len > l.max_payload {
            return reject(
                err::EOVERFLOW,
                format!("{c:?} of {} bytes (at most {})", self.len, l.max_payload),
            );
        }
        if self.len == 0 {
            return reject(err::EINVAL, format!("{c:?} of zero bytes"));
        }
        if self.offset > l.size || u64::from(self.len) > l.size - self.offset {
            let error = if matches!(c, Command::Write | Command::WriteZeroes) {
                err::ENOSPC
            } else {
                err::EINVAL
            };
            return reject(
                error,
                format!(
                    "{c:?} of {} bytes at {} is past the end of the export ({} bytes)",
                    self.len, self.offset, l.size
                ),
            );
        }
        let align = u64::from(l.alignment.max(1));
        if c != Command::BlockStatus
            && (self.offset % align != 0 || u64::from(self.len) % align != 0)
        {
            return reject(
                err::EINVAL,
                format!(
                    "{c:?} of {} bytes at {} is not aligned to {align} bytes",
                    self.len, self.offset
                ),
            );
        }
        if c.writes() && l.read_only {
            return reject(err::EPERM, format!("{c:?} on a read-only export"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        max_payload: 1 << 16,
        alignment: 512,
        read_only: false,
        structured: true,
        has_contexts: true,
    };

    fn req(command: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            len,
        }
    }

    fn error_of(r: Request, l: &Limits) -> Option<u32> {
        r.check(l).err().map(|e| e.error)
    }

    #[test]
    fn a_header_round_trips() {
        let r = req(Command::WriteZeroes, cflag::FUA | cflag::NO_HOLE, 4096, 512);
        assert_eq!(Request::parse(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert!(Request::parse(&bad).is_err());
    }

    #[test]
    fn requests_are_refused_with_the_error_the_spec_names() {
        let l = &LIMITS;
        assert_eq!(error_of(req(Command::Read, 0, 0, 4096), l), None);
        assert_eq!(
            error_of(req(Command::Unknown(99), 0, 0, 1), l),
            Some(err::EINVAL)
        );
        assert_eq!(
            error_of(req(Command::Read, cflag::FUA, 0, 512), l),
            Some(err::EINVAL)
        );
        assert_eq!(
            error_of(req(Command::Read, 0, 0, 1 << 17), l),
            Some(err::EOVERFLOW)
        );
        assert_eq!(
            error_of(req(Command::Read, 0, 1 << 20, 512), l),
            Some(err::EINVAL)
        );
        assert_eq!(
            error_of(req(Command::Write, 0, 1 << 20, 512), l),
            Some(err::ENOSPC)
        );
        assert_eq!(
            error_of(req(Command::Write, 0, u64::MAX, 512), l),
            Some(err::ENOSPC)
        );
        assert_eq!(
            error_of(req(Command::Write, 0, 100, 512), l),
            Some(err::EINVAL)
        );
        assert_eq!(error_of(req(Command::Trim, 0, 0, 0), l), Some(err::EINVAL));
        assert_eq!(error_of(req(Command::Flush, 0, 0, 0), l), None);
        // Block status needs no alignment, but a context.
        assert_eq!(error_of(req(Command::BlockStatus, 0, 1, 3), l), None);
        let none = Limits {
            has_contexts: false,
            ..LIMITS
        };
        assert_eq!(
            error_of(req(Command::BlockStatus, 0, 0, 512), &none),
            Some(err::EINVAL)
        );
        let ro = Limits {
            read_only: true,
            ..LIMITS
        };
        assert_eq!(
            error_of(req(Command::Write, 0, 0, 512), &ro),
            Some(err::EPERM)
        );
        assert_eq!(error_of(req(Command::Read, 0, 0, 512), &ro), None);
        let simple = Limits {
            structured: false,
            ..LIMITS
        };
        assert_eq!(
            error_of(req(Command::Read, cflag::DF, 0, 512), &simple),
            Some(err::EINVAL)
        );
    }

    proptest! {
        #[test]
        fn any_accepted_data_request_lies_inside_the_export(
            bytes in proptest::array::uniform28(any::<u8>()),
        ) {
            let mut bytes = bytes;
            bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let r = Request::parse(&bytes).unwrap();
            if r.check(&LIMITS).is_ok() && !matches!(r.command, Command::Flush | Command::Disconnect) {
                prop_assert!(r.offset + u64::from(r.len) <= LIMITS.size);
                prop_assert!(r.len > 0);
            }
        }
    }
}
