//! One split-ring descriptor, decoded from the 16 bytes the guest wrote.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// Bytes in a descriptor: addr (8), len (4), flags (2), next (2).
pub const DESC_LEN: usize = 16;

/// One descriptor of a chain, as intake uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// The device writes it.
    pub writable: bool,
    /// Another descriptor follows in the chain.
    pub has_next: bool,
}

/// A descriptor table entry, decoded from one snapshot of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableEntry {
    /// Guest address of the buffer (or of an indirect table).
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// The next descriptor's index, if `NEXT` is set.
    pub next: u16,
}

impl TableEntry {
    /// Decodes a little-endian descriptor.
    pub fn from_bytes(b: [u8; DESC_LEN]) -> TableEntry {
        let (addr, rest) = b.split_at(8);
        TableEntry {
            addr: u64::from_le_bytes(addr.try_into().expect("8 bytes")),
            len: u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")),
            flags: u16::from_le_bytes([rest[4], rest[5]]),
            next: u16::from_le_bytes([rest[6], rest[7]]),
        }
    }

    /// Decodes a descriptor read as two words (already in host order):
    /// `addr`, then `len | flags << 32 | next << 48`.
    pub fn from_words(addr: u64, rest: u64) -> TableEntry {
        TableEntry {
            addr,
            len: rest as u32,
            flags: (rest >> 32) as u16,
            next: (rest >> 48) as u16,
        }
    }

    /// The descriptor points at an indirect table.
    pub fn indirect(&self) -> bool {
        u32::from(self.flags) & VRING_DESC_F_INDIRECT != 0
    }

    /// Another descriptor follows.
    pub fn has_next(&self) -> bool {
        u32::from(self.flags) & VRING_DESC_F_NEXT != 0
    }

    /// As a chain element.
    pub fn raw(&self) -> RawDesc {
        RawDesc {
            addr: self.addr,
            len: self.len,
            writable: u32::from(self.flags) & VRING_DESC_F_WRITE != 0,
            has_next: self.has_next(),
        }
    }
}
