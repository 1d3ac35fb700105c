//! What a client reads from the server: option replies during the
//! negotiation, reply headers and structured chunk payloads during
//! transmission. The server is a network peer like any other: every length
//! it sends is checked before anything is read or allocated for it.

use crate::consts::{chunk, REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use crate::reply::Extent;

/// Bytes in an option reply header.
pub const OPTION_REPLY_LEN: usize = 20;
/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes in a structured chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// The longest option reply data read. INFO and META_CONTEXT replies
/// carry a string of at most 4096 bytes.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The longest error message or block status chunk read.
pub const MAX_CHUNK_METADATA: u32 = 1 << 20;

/// A server's answer that breaks the protocol: the connection cannot be
/// trusted to be in step any more.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the NBD server broke the protocol: {0}")]
pub struct ServerError(pub String);

fn bad(msg: impl Into<String>) -> ServerError {
    ServerError(msg.into())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// An option request as a client sends it: header and data.
pub fn option_request(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend(
        crate::OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode(),
    );
    out.extend(data);
}

/// An option reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub option: u32,
    /// What it says (`rep`).
    pub reply: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptionReply {
    /// Parses the header of the reply to `expected`.
    pub fn parse(b: &[u8; OPTION_REPLY_LEN], expected: u32) -> Result<Self, ServerError> {
        let magic = be64(b);
        if magic != REPLY_MAGIC {
            return Err(bad(format!("bad option reply magic {magic:#018x}")));
        }
        let r = OptionReply {
            option: be32(&b[8..]),
            reply: be32(&b[12..]),
            len: be32(&b[16..]),
        };
        if r.option != expected {
            return Err(bad(format!(
                "a reply to option {} while option {expected} was asked",
                r.option
            )));
        }
        if r.len > MAX_OPTION_REPLY {
            return Err(bad(format!(
                "an option reply of {} bytes (at most {MAX_OPTION_REPLY})",
                r.len
            )));
        }
        Ok(r)
    }

    /// True for the error replies, whose data is a message.
    pub fn is_error(&self) -> bool {
        self.reply & (1 << 31) != 0
    }
}

/// The start of a reply: which of the two kinds follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply: 12 more header bytes.
    Simple,
    /// A structured chunk: 16 more header bytes.
    Structured,
}

impl ReplyKind {
    /// The kind a reply's first four bytes announce.
    pub fn of(magic: [u8; 4]) -> Result<ReplyKind, ServerError> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
            m => Err(bad(format!("bad reply magic {m:#010x}"))),
        }
    }
}

/// A simple reply header, after its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// The NBD error value; 0 for success.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Parses the 12 bytes after the magic.
    pub fn parse(b: &[u8; SIMPLE_REPLY_LEN - 4]) -> SimpleReply {
        SimpleReply {
            error: be32(b),
            cookie: be64(&b[4..]),
        }
    }
}

/// A structured chunk header, after its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Chunk flags (`FLAG_DONE`).
    pub flags: u16,
    /// The chunk type.
    pub ty: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Bytes of payload.
    pub len: u32,
}

impl ChunkHeader {
    /// Parses the 16 bytes after the magic.
    pub fn parse(b: &[u8; CHUNK_HEADER_LEN - 4]) -> ChunkHeader {
        ChunkHeader {
            flags: be16(b),
            ty: be16(&b[2..]),
            cookie: be64(&b[4..]),
            len: be32(&b[12..]),
        }
    }

    /// The last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & chunk::FLAG_DONE != 0
    }

    /// True for error chunks.
    pub fn is_error(&self) -> bool {
        self.ty & (1 << 15) != 0
    }

    /// Checks the payload length against the chunk type and the request
    /// it answers (`read_len` bytes for a READ, else 0), so that nothing
    /// is read or allocated for a length the server made up.
    pub fn check(&self, read_len: u32) -> Result<(), ServerError> {
        let ok = match self.ty {
            chunk::NONE => self.len == 0 && self.done(),
            chunk::OFFSET_DATA => self.len > 8 && self.len - 8 <= read_len,
            chunk::OFFSET_HOLE => self.len == 12,
            chunk::BLOCK_STATUS => self.len >= 12 && (self.len - 4) % 8 == 0,
            _ if self.is_error() => self.len >= 6,
            _ => false,
        };
        if !ok || self.len > MAX_CHUNK_METADATA.max(read_len.saturating_add(8)) {
            return Err(bad(format!(
                "a chunk of type {:#06x} with {} bytes of payload",
                self.ty, self.len
            )));
        }
        Ok(())
    }
}

/// Checks that `len` bytes at `offset`, from a data or hole chunk, lie in
/// the request's range; returns where they start within it.
pub fn chunk_range(
    offset: u64,
    len: u64,
    req_offset: u64,
    req_len: u32,
) -> Result<usize, ServerError> {
    let end = offset.checked_add(len);
    match end {
        Some(end) if offset >= req_offset && end <= req_offset + u64::from(req_len) => {
            Ok((offset - req_offset) as usize)
        }
        _ => Err(bad(format!(
            "a chunk for {len} bytes at {offset} in a request for {req_len} bytes at {req_offset}"
        ))),
    }
}

/// An OFFSET_HOLE payload: (offset, length).
pub fn parse_hole(b: &[u8; 12]) -> (u64, u32) {
    (be64(b), be32(&b[8..]))
}

/// An error chunk's payload: the error value and its message.
pub fn parse_error(b: &[u8]) -> Result<(u32, String), ServerError> {
    let error = be32(b);
    let len = be16(&b[4..]) as usize;
    let msg = b
        .get(6..6 + len)
        .ok_or_else(|| bad("an error chunk whose message is longer than the chunk"))?;
    Ok((error, String::from_utf8_lossy(msg).into_owned()))
}

/// A BLOCK_STATUS payload: the context id and its extents.
pub fn parse_block_status(b: &[u8]) -> (u32, Vec<Extent>) {
    let extents = b[4..]
        .chunks_exact(8)
        .map(|e| Extent {
            len: be32(e),
            flags: be32(&e[4..]),
        })
        .collect();
    (be32(b), extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_lengths_the_server_made_up_are_refused() {
        let h = |ty, len, flags| ChunkHeader {
            flags,
            ty,
            cookie: 1,
            len,
        };
        assert!(h(chunk::OFFSET_DATA, 8 + 4096, 0).check(4096).is_ok());
        assert!(h(chunk::OFFSET_DATA, 8 + 4097, 0).check(4096).is_err());
        assert!(h(chunk::OFFSET_DATA, 8, 0).check(4096).is_err());
        assert!(h(chunk::OFFSET_HOLE, 13, 0).check(4096).is_err());
        assert!(h(chunk::BLOCK_STATUS, 12, 0).check(0).is_ok());
        assert!(h(chunk::BLOCK_STATUS, 16, 0).check(0).is_err());
        assert!(h(chunk::BLOCK_STATUS, u32::MAX - 3, 0).check(0).is_err());
        assert!(h(chunk::ERROR, 5, 1).check(0).is_err());
        assert!(h(chunk::NONE, 0, 1).check(0).is_ok());
        assert!(h(77, 0, 1).check(0).is_err());
    }

    #[test]
    fn chunks_outside_their_request_are_refused() {
        assert_eq!(chunk_range(4096, 512, 4096, 1024), Ok(0));
        assert_eq!(chunk_range(4608, 512, 4096, 1024), Ok(512));
        assert!(chunk_range(4608, 1024, 4096, 1024).is_err());
        assert!(chunk_range(0, 512, 4096, 1024).is_err());
        assert!(chunk_range(u64::MAX, 2, 0, 1024).is_err());
    }

    #[test]
    fn an_error_message_longer_than_its_chunk_is_refused() {
        let mut b = 5u32.to_be_bytes().to_vec();
        b.extend(10u16.to_be_bytes());
        b.extend(b"short");
        assert!(parse_error(&b).is_err());
        b.truncate(6);
        b.extend(b"exactly 10");
        b[5] = 10;
        assert_eq!(parse_error(&b), Ok((5, "exactly 10".into())));
    }
}
