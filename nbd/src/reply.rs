//! What the server sends: option replies during negotiation, and simple
//! replies or structured reply chunks during transmission. Each encoder
//! appends one message to `out`; data payloads are sent after it, from
//! where they are, without a copy.

use crate::consts::{chunk, REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// One extent of a block status reply: a length and the context's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes it covers.
    pub len: u32,
    /// The metadata context's flags for them.
    pub flags: u32,
}

/// An option reply: `reply` (`rep`) to `option`, carrying `data`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend(REPLY_MAGIC.to_be_bytes());
    out.extend(option.to_be_bytes());
    out.extend(reply.to_be_bytes());
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(data);
}

/// A simple reply; for a successful READ, the data follows it.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend(SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend(error.to_be_bytes());
    out.extend(cookie.to_be_bytes());
}

/// A structured chunk header for `len` bytes of payload.
pub fn structured_header(out: &mut Vec<u8>, flags: u16, ty: u16, cookie: u64, len: u32) {
    out.extend(STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend(flags.to_be_bytes());
    out.extend(ty.to_be_bytes());
    out.extend(cookie.to_be_bytes());
    out.extend(len.to_be_bytes());
}

/// The header of an OFFSET_DATA chunk for `len` bytes at `offset`; the
/// data follows it.
pub fn data_chunk(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, len: u32) {
    structured_header(out, flags, chunk::OFFSET_DATA, cookie, len + 8);
    out.extend(offset.to_be_bytes());
}

/// An OFFSET_HOLE chunk: `len` bytes at `offset` read as zeroes.
pub fn hole_chunk(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, len: u32) {
    structured_header(out, flags, chunk::OFFSET_HOLE, cookie, 12);
    out.extend(offset.to_be_bytes());
    out.extend(len.to_be_bytes());
}

/// An ERROR chunk with `error` and a message for humans, always the last
/// chunk of its reply.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    // The message is for display; cut it rather than send a huge one.
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    structured_header(
        out,
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend(error.to_be_bytes());
    out.extend((msg.len() as u16).to_be_bytes());
    out.extend(msg);
}

/// A BLOCK_STATUS chunk: `extents` of the context with id `context`.
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    context: u32,
    extents: &[Extent],
) {
    structured_header(
        out,
        flags,
        chunk::BLOCK_STATUS,
        cookie,
        4 + 8 * extents.len() as u32,
    );
    out.extend(context.to_be_bytes());
    for e in extents {
        out.extend(e.len.to_be_bytes());
        out.extend(e.flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_have_the_layout_of_the_specification() {
        let mut out = Vec::new();
        hole_chunk(&mut out, chunk::FLAG_DONE, 0x1122, 4096, 512);
        assert_eq!(out.len(), 20 + 12);
        assert_eq!(&out[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &1u16.to_be_bytes(), "DONE");
        assert_eq!(&out[6..8], &chunk::OFFSET_HOLE.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes(), "payload length");

        let mut out = Vec::new();
        error_chunk(&mut out, 1, 22, &"é".repeat(3000));
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 20 + len);
        let msg_len = u16::from_be_bytes(out[24..26].try_into().unwrap()) as usize;
        assert!(msg_len <= 4096 && std::str::from_utf8(&out[26..]).is_ok());

        let mut out = Vec::new();
        let e = [
            Extent { len: 512, flags: 3 },
            Extent {
                len: 1024,
                flags: 0,
            },
        ];
        block_status_chunk(&mut out, 0, 9, 1, &e);
        assert_eq!(out.len(), 20 + 4 + 16);
    }
}
