//! Parse first, execute second: a descriptor chain is validated whole —
//! layout, direction, length, alignment and range — before any I/O starts.

use std::ops::Deref;

use smallvec::SmallVec;
use strata_graph::IoVecs;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress};

use crate::virtio::config::{MAX_DISCARD_SECTORS, SEG_MAX, SIZE_MAX};
use crate::virtio::desc::RawDesc;
use crate::virtio::memory::{GuestMemory, MapError, MemHandle, StatusByte};

/// Bytes in a request header: type, reserved, sector.
const HEADER_LEN: u64 = 16;
/// Bytes in one discard / write-zeroes segment: sector, num_sectors, flags.
const SEGMENT_LEN: u64 = 16;
/// Descriptors a chain may have: the header, SEG_MAX data segments and the
/// status. Intake stops collecting beyond this, so a chain costs bounded
/// memory however long the guest makes it.
pub const MAX_DESCS: usize = SEG_MAX as usize + 2;
/// Host segments the data of one request may map to (a descriptor that
/// crosses memory regions maps to several).
const MAX_HOST_SEGMENTS: usize = strata_graph::MAX_IOVECS;

/// What the device currently is, as far as validation cares.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Whether write-class requests are refused.
    pub read_only: bool,
}

/// A validated request. Offsets and lengths are in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// `VIRTIO_BLK_T_OUT`.
    Write {
        /// Byte offset.
        offset: u64,
    },
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The driver allows the space to be released.
        unmap: bool,
    },
}

/// Why a chain was refused. Each variant maps to one virtio status, or to
/// none when the chain has nowhere to put one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptors, or no device-writable last byte.
    #[error("the chain has no device-writable status byte")]
    NoStatus,
    /// The chain's `next` links leave the table or loop.
    #[error("the chain is truncated: a `next` link leaves the table or loops")]
    Truncated,
    /// The status byte's address is not guest memory.
    #[error("the status byte at {addr:#x} is not in guest memory")]
    UnmappedStatus {
        /// Its guest address.
        addr: u64,
    },
    /// Fewer than 16 device-readable bytes.
    #[error("the header needs 16 device-readable bytes, the chain has {len}")]
    HeaderTooShort {
        /// Readable bytes found.
        len: u64,
    },
    /// Virtio requires device-readable descriptors to come first.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A buffer is not guest memory.
    #[error("the buffer at {addr:#x} ({len} bytes) is not in guest memory")]
    UnmappedBuffer {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// More descriptors than SEG_MAX data segments allow.
    #[error("the chain has more than {MAX_DESCS} descriptors (seg_max is {SEG_MAX})")]
    TooManySegments,
    /// A descriptor longer than SIZE_MAX.
    #[error("a {len}-byte descriptor is larger than size_max ({SIZE_MAX} bytes)")]
    SegmentTooLarge {
        /// Its length.
        len: u32,
    },
    /// The data maps to more host segments than one request may have.
    #[error("the data maps to more than {MAX_HOST_SEGMENTS} host memory segments")]
    TooManyHostSegments,
    /// A request that only writes to the guest has device-readable data.
    #[error("{len} device-readable bytes after the header of a request that has none")]
    UnexpectedReadable {
        /// The extra bytes.
        len: u64,
    },
    /// A request that only reads from the guest has device-writable data.
    #[error("{len} device-writable bytes before the status of a request that has none")]
    UnexpectedWritable {
        /// The extra bytes.
        len: u64,
    },
    /// Data length is not a multiple of 512.
    #[error("a data length of {len} bytes is not a multiple of 512")]
    LengthNotSectorMultiple {
        /// The length.
        len: u64,
    },
    /// Offset or length is not a multiple of the logical block size.
    #[error("{len} bytes at sector {sector} are not aligned to the {block_size}-byte block size")]
    Misaligned {
        /// Start sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// The request reaches past the end of the disk.
    #[error("{len} bytes at sector {sector} end past the disk's {capacity} sectors")]
    OutOfRange {
        /// Start sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// A write-class request on a read-only export.
    #[error("the export is read-only")]
    ReadOnly,
    /// A discard or write-zeroes segment of fewer than 16 bytes.
    #[error("a discard/write-zeroes segment needs 16 bytes, the chain has {len}")]
    SegmentTooShort {
        /// Bytes found.
        len: u64,
    },
    /// A discard or write-zeroes of more sectors than the device offers.
    #[error("{sectors} sectors exceed the limit of {max} per discard/write-zeroes")]
    TooManySectors {
        /// Sectors asked for.
        sectors: u32,
        /// The limit.
        max: u32,
    },
    /// A request type the device does not implement.
    #[error("request type {ty} is not supported")]
    UnknownType {
        /// The type.
        ty: u32,
    },
    /// A flag the device does not implement.
    #[error("flags {flags:#x} are not supported for this request type")]
    UnknownFlags {
        /// The flags.
        flags: u32,
    },
    /// More than one discard or write-zeroes segment (max_*_seg is 1).
    #[error("{len} bytes of discard/write-zeroes segments; only one segment is supported")]
    MultipleSegments {
        /// Segment bytes found.
        len: u64,
    },
}

impl RequestError {
    /// The virtio status the guest gets, if the chain can carry one.
    pub fn status(&self) -> Option<u8> {
        use RequestError::*;
        match self {
            NoStatus | Truncated | UnmappedStatus { .. } => None,
            UnknownType { .. } | UnknownFlags { .. } | MultipleSegments { .. } => {
                Some(VIRTIO_BLK_S_UNSUPP as u8)
            }
            _ => Some(VIRTIO_BLK_S_IOERR as u8),
        }
    }
}

/// A validated request, ready to run.
pub struct Request {
    /// The chain's head descriptor index, which completes it.
    pub head: u16,
    /// What to do.
    pub kind: RequestKind,
    /// Data buffers in guest memory; they point into the memory that
    /// `status` keeps mapped, hence private.
    data: IoVecs<'static>,
    /// Where the outcome goes.
    pub status: StatusByte,
}

impl Request {
    /// The data buffers, for as long as the request lives.
    pub fn data(&self) -> &IoVecs<'_> {
        &self.data
    }

    /// The guest memory the device wrote for this request, as guest
    /// physical `(address, length)` ranges: the data of a read or GET_ID,
    /// and the status byte. Taken from the buffers as validated, not from
    /// the descriptors the guest may have rewritten since.
    pub fn written(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let data = matches!(self.kind, RequestKind::Read { .. } | RequestKind::GetId);
        let mem = self.status.memory();
        self.data
            .as_iovecs()
            .iter()
            .filter(move |_| data)
            .filter_map(move |v| Some((mem.gpa_of(v.iov_base as *const u8)?, v.iov_len as u64)))
            .chain(self.status.gpa().map(|g| (g, 1)))
    }
}

/// A chain that failed validation, with what is needed to complete it.
pub struct Rejected {
    /// The chain's head descriptor index.
    pub head: u16,
    /// Where the status goes, when the chain has one.
    pub status: Option<StatusByte>,
    /// Why.
    pub error: RequestError,
    /// The header's request type, when it could be read: for the I/O
    /// statistics' invalid counts.
    pub ty: Option<u32>,
}

impl std::fmt::Debug for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chain {}: {}", self.head, self.error)
    }
}

impl Rejected {
    /// Writes the error's status, if the chain can carry one, and returns
    /// the used length to report.
    pub fn complete(&self) -> u32 {
        match (&self.status, self.error.status()) {
            (Some(s), Some(code)) => {
                s.set(code);
                1
            }
            _ => 0,
        }
    }
}

#[derive(Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u64,
    writable: bool,
}

/// A contiguous run of guest addresses.
#[derive(Clone, Copy)]
struct Range {
    addr: GuestAddress,
    len: u64,
}

/// Validates `chain`, whose buffers lie in `mem`.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &MemHandle,
    limits: &Limits,
) -> Result<Request, Rejected>
where
    M: Deref<Target = GuestMemory>,
{
    let head = chain.head_index();
    parse_descs(
        head,
        chain.map(|d| RawDesc {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
            has_next: d.has_next(),
        }),
        mem,
        limits,
    )
}

/// Validates the chain at `head` made of `chain`'s descriptors, whose
/// buffers lie in `mem`.
pub fn parse_descs(
    head: u16,
    chain: impl Iterator<Item = RawDesc>,
    mem: &MemHandle,
    limits: &Limits,
) -> Result<Request, Rejected> {
    let reject = |status, error| Rejected {
        head,
        status,
        error,
        ty: None,
    };
    // GUEST-INPUT: the chain's shape. Collect at most MAX_DESCS; past
    // that, only the last descriptor (where the status byte is) is kept.
    let mut descs: SmallVec<[Desc; 8]> = SmallVec::new();
    let mut last = None;
    let mut too_many = false;
    let mut too_large = None;
    for d in chain {
        last = Some(d);
        if d.len > SIZE_MAX {
            too_large.get_or_insert(d.len);
        }
        if descs.len() == MAX_DESCS {
            too_many = true;
            continue;
        }
        descs.push(Desc {
            addr: GuestAddress(d.addr),
            len: u64::from(d.len),
            writable: d.writable,
        });
    }
    let status_desc = match last {
        Some(d) if d.has_next => return Err(reject(None, RequestError::Truncated)),
        Some(d) if d.writable && d.len > 0 => d,
        _ => return Err(reject(None, RequestError::NoStatus)),
    };
    let status_addr = status_desc
        .addr
        .wrapping_add(u64::from(status_desc.len) - 1);
    let Some(status) = StatusByte::at(mem, status_addr) else {
        return Err(reject(
            None,
            RequestError::UnmappedStatus { addr: status_addr },
        ));
    };
    if too_many {
        return Err(reject(Some(status), RequestError::TooManySegments));
    }
    if let Some(len) = too_large {
        return Err(reject(Some(status), RequestError::SegmentTooLarge { len }));
    }
    match build(&descs, mem, limits) {
        Ok((kind, data)) => Ok(Request {
            head,
            kind,
            data,
            status,
        }),
        Err(error) => Err(Rejected {
            // Read again only to count the refusal; nothing is decided on it.
            ty: descs
                .first()
                .filter(|d| !d.writable)
                .and_then(|d| read_header(mem, d))
                .map(|(ty, _)| ty),
            ..reject(Some(status), error)
        }),
    }
}

fn build(
    descs: &[Desc],
    mem: &MemHandle,
    limits: &Limits,
) -> Result<(RequestKind, IoVecs<'static>), RequestError> {
    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return Err(RequestError::ReadableAfterWritable);
    }
    let (readable, writable) = descs.split_at(first_writable);
    let readable_len: u64 = readable.iter().map(|d| d.len).sum();
    let writable_len: u64 = writable.iter().map(|d| d.len).sum();
    if readable_len < HEADER_LEN {
        return Err(RequestError::HeaderTooShort { len: readable_len });
    }
    let (ty, sector) = match read_header(mem, &readable[0]) {
        Some(h) => h,
        None => {
            // GUEST-INPUT: a header split across descriptors, copied once.
            let mut header = [0u8; HEADER_LEN as usize];
            gather(mem, readable, 0, &mut header)?;
            (
                u32::from_le_bytes(header[0..4].try_into().unwrap()),
                u64::from_le_bytes(header[8..16].try_into().unwrap()),
            )
        }
    };

    // The data: device-readable bytes after the header, device-writable
    // bytes before the status byte.
    let out_data = || ranges(readable, HEADER_LEN, readable_len - HEADER_LEN);
    let in_data = || ranges(writable, 0, writable_len - 1);
    let no_out = || match readable_len - HEADER_LEN {
        0 => Ok(()),
        len => Err(RequestError::UnexpectedReadable { len }),
    };
    let no_in = || match writable_len - 1 {
        0 => Ok(()),
        len => Err(RequestError::UnexpectedWritable { len }),
    };

    match ty {
        VIRTIO_BLK_T_IN => {
            no_out()?;
            let data = map(mem, in_data())?;
            let offset = check_rw(limits, sector, data.len())?;
            Ok((RequestKind::Read { offset }, data))
        }
        VIRTIO_BLK_T_OUT => {
            no_in()?;
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let data = map(mem, out_data())?;
            let offset = check_rw(limits, sector, data.len())?;
            Ok((RequestKind::Write { offset }, data))
        }
        VIRTIO_BLK_T_FLUSH => Ok((RequestKind::Flush, IoVecs::new())),
        VIRTIO_BLK_T_GET_ID => {
            no_out()?;
            Ok((RequestKind::GetId, map(mem, in_data())?))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            no_in()?;
            let seg_len = readable_len - HEADER_LEN;
            if seg_len > SEGMENT_LEN {
                return Err(RequestError::MultipleSegments { len: seg_len });
            }
            if seg_len < SEGMENT_LEN {
                return Err(RequestError::SegmentTooShort { len: seg_len });
            }
            // GUEST-INPUT: the segment decides the range; it is copied
            // once, and only the copy is used.
            let mut seg = [0u8; SEGMENT_LEN as usize];
            gather(mem, readable, HEADER_LEN, &mut seg)?;
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            let zeroes = ty == VIRTIO_BLK_T_WRITE_ZEROES;
            let allowed = if zeroes {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            // virtio 1.2, 5.2.6.2: "the device MUST set the status byte to
            // VIRTIO_BLK_S_UNSUPP for discard and write zeroes commands if
            // the unmap flag is set" (for discard) or unknown flags appear.
            if flags & !allowed != 0 {
                return Err(RequestError::UnknownFlags { flags });
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::TooManySectors {
                    sectors,
                    max: MAX_DISCARD_SECTORS,
                });
            }
            let len = u64::from(sectors) * 512;
            let offset = check_rw(limits, sector, len)?;
            let kind = if zeroes {
                RequestKind::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            } else {
                RequestKind::Discard { offset, len }
            };
            Ok((kind, IoVecs::new()))
        }
        ty => Err(RequestError::UnknownType { ty }),
    }
}

/// Checks a data range and returns its byte offset.
fn check_rw(limits: &Limits, sector: u64, len: u64) -> Result<u64, RequestError> {
    if len % 512 != 0 {
        return Err(RequestError::LengthNotSectorMultiple { len });
    }
    let out_of_range = RequestError::OutOfRange {
        sector,
        len,
        capacity: limits.capacity,
    };
    let Some(offset) = sector.checked_mul(512) else {
        return Err(out_of_range);
    };
    let bs = u64::from(limits.block_size);
    if offset % bs != 0 || len % bs != 0 {
        return Err(RequestError::Misaligned {
            sector,
            len,
            block_size: limits.block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= limits.capacity * 512 => Ok(offset),
        _ => Err(out_of_range),
    }
}

/// The guest ranges covering `len` bytes from `skip` into `descs`.
fn ranges(descs: &[Desc], mut skip: u64, mut len: u64) -> impl Iterator<Item = Range> + '_ {
    descs.iter().filter_map(move |d| {
        if skip >= d.len {
            skip -= d.len;
            return None;
        }
        let take = (d.len - skip).min(len);
        if take == 0 {
            return None;
        }
        let r = Range {
            addr: GuestAddress(d.addr.0.wrapping_add(skip)),
            len: take,
        };
        len -= take;
        skip = 0;
        Some(r)
    })
}

/// The request type and sector of a header that lies whole in `d`, read
/// with one volatile load; `None` sends the caller the general way.
fn read_header(mem: &MemHandle, d: &Desc) -> Option<(u32, u64)> {
    if d.len < HEADER_LEN {
        return None;
    }
    // GUEST-INPUT: the header decides the request; it is read once, here.
    let h = mem.read_bytes::<{ HEADER_LEN as usize }>(d.addr.0)?;
    Some((
        u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")),
        u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
    ))
}

/// Copies `out.len()` bytes starting `skip` bytes into `descs`.
fn gather(mem: &MemHandle, descs: &[Desc], skip: u64, out: &mut [u8]) -> Result<(), RequestError> {
    let mut at = 0;
    for r in ranges(descs, skip, out.len() as u64) {
        let n = r.len as usize;
        mem.read_slice(&mut out[at..at + n], r.addr)
            .map_err(|_| RequestError::UnmappedBuffer {
                addr: r.addr.0,
                len: r.len,
            })?;
        at += n;
    }
    Ok(())
}

/// Maps guest ranges to host memory.
fn map(
    mem: &MemHandle,
    ranges: impl Iterator<Item = Range>,
) -> Result<IoVecs<'static>, RequestError> {
    let mut iov = IoVecs::new();
    for r in ranges {
        let unmapped = RequestError::UnmappedBuffer {
            addr: r.addr.0,
            len: r.len,
        };
        let len = usize::try_from(r.len).map_err(|_| unmapped.clone())?;
        mem.map_into(&mut iov, r.addr.0, len, MAX_HOST_SEGMENTS)
            .map_err(|e| match e {
                MapError::Unmapped => unmapped,
                MapError::TooManySegments => RequestError::TooManyHostSegments,
            })?;
    }
    Ok(iov)
}

#[cfg(test)]
mod tests;
