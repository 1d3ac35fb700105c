//! The qcow2 header and its extensions, parsed and checked against
//! everything a hostile image could get wrong.

use strata_graph::{AlignedBuf, BlockDriver, GraphView, SlotId};

use super::error::Qcow2Error;
use super::types::Geometry;

/// The magic number, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Bytes in a v2 header.
pub const V2_LEN: usize = 72;
/// Bytes in a v3 header without the compression type.
pub const V3_LEN: usize = 104;

/// Incompatible feature: the refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is set.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The largest L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The largest virtual size (QEMU's limit: 2^61 bytes... capped at 32 EiB).
pub const MAX_SIZE: u64 = 1 << 61;

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate.
    Zlib,
    /// A zstd frame.
    Zstd,
}

/// A parsed header.
#[derive(Clone, Debug)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Cluster and table shape.
    pub geometry: Geometry,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Where the L1 table is.
    pub l1_table_offset: u64,
    /// Where the refcount table is.
    pub refcount_table_offset: u64,
    /// Clusters of refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table is.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// Bytes of header before the extensions.
    pub header_length: u32,
    /// How clusters are compressed.
    pub compression: Compression,
    /// Where the backing file name is, and how long it is.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// The backing file name.
    pub backing_file: Option<String>,
    /// The backing file's format, from its extension.
    pub backing_format: Option<String>,
    /// True when a bitmaps extension is present.
    pub has_bitmaps: bool,
    /// Names of feature bits, from the feature name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Parses the header cluster `head` (or as much of the file as there
    /// is, if shorter) of a file of `file_size` bytes.
    pub fn parse(head: &[u8], file_size: u64) -> Result<Header, Qcow2Error> {
        if head.len() < V2_LEN {
            return Err(Qcow2Error::Truncated { len: file_size });
        }
        if be32(head, 0) != MAGIC {
            return Err(Qcow2Error::BadMagic);
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version { version });
        }
        let cluster_bits = be32(head, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Qcow2Error::ClusterBits { bits: cluster_bits });
        }
        let cluster_size = 1u64 << cluster_bits;
        if be32(head, 32) != 0 {
            return Err(Qcow2Error::Encrypted);
        }
        let mut h = Header {
            version,
            geometry: Geometry {
                cluster_bits,
                extended: false,
                refcount_order: 4,
            },
            size: be64(head, 24),
            l1_size: be32(head, 36),
            l1_table_offset: be64(head, 40),
            refcount_table_offset: be64(head, 48),
            refcount_table_clusters: be32(head, 56),
            nb_snapshots: be32(head, 60),
            snapshots_offset: be64(head, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            header_length: V2_LEN as u32,
            compression: Compression::Zlib,
            backing_file_offset: be64(head, 8),
            backing_file_size: be32(head, 16),
            backing_file: None,
            backing_format: None,
            has_bitmaps: false,
            feature_names: Vec::new(),
        };
        if version == 3 {
            if head.len() < V3_LEN {
                return Err(Qcow2Error::Truncated { len: file_size });
            }
            h.incompatible = be64(head, 72);
            h.compatible = be64(head, 80);
            h.autoclear = be64(head, 88);
            let order = be32(head, 96);
            if order > 6 {
                return Err(Qcow2Error::RefcountOrder { order, version });
            }
            h.geometry.refcount_order = order;
            h.header_length = be32(head, 100);
            let len = u64::from(h.header_length);
            if len < V3_LEN as u64 || len > cluster_size || len > head.len() as u64 || len % 8 != 0
            {
                return Err(Qcow2Error::HeaderLength {
                    len: h.header_length,
                });
            }
            if len > V3_LEN as u64 {
                h.compression = match head[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    kind => return Err(Qcow2Error::CompressionType { kind }),
                };
            }
        }
        h.parse_extensions(head)?;
        h.check_features()?;
        h.geometry.extended = h.incompatible & INCOMPAT_EXTL2 != 0;
        if h.geometry.extended && cluster_bits < 14 {
            return Err(Qcow2Error::ClusterBits { bits: cluster_bits });
        }
        if (h.incompatible & INCOMPAT_COMPRESSION != 0) != (h.compression != Compression::Zlib) {
            return Err(Qcow2Error::CompressionType {
                kind: head.get(104).copied().unwrap_or(0),
            });
        }
        h.parse_backing_name(head)?;
        h.check_tables(file_size)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, head: &[u8]) -> Result<(), Qcow2Error> {
        let mut at = self.header_length as usize;
        let end = head.len();
        loop {
            if at + 8 > end {
                // No end marker inside the header cluster: treat what is
                // there as all there is, as QEMU does for v2 images.
                return Ok(());
            }
            let kind = be32(head, at);
            let len = be32(head, at + 4);
            let data_at = at + 8;
            let padded = (len as usize).div_ceil(8) * 8;
            if kind == EXT_END {
                return Ok(());
            }
            if data_at + padded > end {
                return Err(Qcow2Error::Extension { kind, len });
            }
            let data = &head[data_at..data_at + len as usize];
            match kind {
                EXT_BACKING_FORMAT => {
                    if len > 16 {
                        return Err(Qcow2Error::Extension { kind, len });
                    }
                    self.backing_format = Some(
                        String::from_utf8_lossy(data)
                            .trim_end_matches('\0')
                            .to_owned(),
                    );
                }
                EXT_FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let name_len = e[2..].iter().position(|&b| b == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&e[2..2 + name_len]).into_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                EXT_BITMAPS => self.has_bitmaps = true,
                _ => {}
            }
            at = data_at + padded;
        }
    }

    fn check_features(&self) -> Result<(), Qcow2Error> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    self.feature_names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && u64::from(*bit) == b)
                        .map_or_else(
                            || format!("Unknown incompatible feature: {:x}", 1u64 << b),
                            |(_, _, n)| n.clone(),
                        )
                })
                .collect();
            return Err(Qcow2Error::UnknownFeature {
                names: names.join(", "),
            });
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::UnsupportedFeature {
                name: "external data file",
            });
        }
        if self.version == 2 && (self.incompatible | self.compatible | self.autoclear) != 0 {
            return Err(Qcow2Error::Version { version: 2 });
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, head: &[u8]) -> Result<(), Qcow2Error> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let (off, len) = (self.backing_file_offset, self.backing_file_size);
        let bad = Qcow2Error::BackingName { offset: off, len };
        if len == 0 || len > 1023 {
            return Err(bad);
        }
        let end = off
            .checked_add(u64::from(len))
            .ok_or(Qcow2Error::BackingName { offset: off, len })?;
        if end > head.len() as u64 || end > self.geometry.cluster_size() {
            return Err(bad);
        }
        let name = &head[off as usize..end as usize];
        self.backing_file = Some(String::from_utf8(name.to_vec()).map_err(|_| bad)?);
        Ok(())
    }

    fn check_tables(&self, file_size: u64) -> Result<(), Qcow2Error> {
        let g = self.geometry;
        let cs = g.cluster_size();
        if self.size > MAX_SIZE {
            return Err(Qcow2Error::SizeTooLarge { size: self.size });
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Qcow2Error::TooLarge {
                what: "L1 table",
                entries: u64::from(self.l1_size),
                max: MAX_L1_BYTES / 8,
            });
        }
        let needed = g.l1_entries_for(self.size);
        if u64::from(self.l1_size) < needed {
            return Err(Qcow2Error::L1TooSmall {
                entries: u64::from(self.l1_size),
                size: self.size,
                needed,
            });
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cs;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::TooLarge {
                what: "refcount table",
                entries: reftable_bytes / 8,
                max: MAX_REFTABLE_BYTES / 8,
            });
        }
        if self.nb_snapshots > 65536 {
            return Err(Qcow2Error::TooLarge {
                what: "snapshot table",
                entries: u64::from(self.nb_snapshots),
                max: 65536,
            });
        }
        let mut regions = vec![("header", 0, cs)];
        if self.l1_size > 0 {
            regions.push(("L1 table", self.l1_table_offset, l1_bytes));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Qcow2Error::TooLarge {
                what: "refcount table (empty)",
                entries: 0,
                max: 0,
            });
        }
        regions.push(("refcount table", self.refcount_table_offset, reftable_bytes));
        if self.nb_snapshots > 0 {
            // Each snapshot header is at least 40 bytes.
            regions.push((
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
            ));
        }
        for &(what, offset, len) in &regions[1..] {
            if offset % cs != 0 {
                return Err(Qcow2Error::Unaligned { what, offset });
            }
            if offset
                .checked_add(len)
                .is_none_or(|end| end > file_size.max(cs))
            {
                return Err(Qcow2Error::PastEnd {
                    what,
                    offset,
                    len,
                    file_size,
                });
            }
        }
        for (i, &(a, ao, al)) in regions.iter().enumerate() {
            for &(b, bo, bl) in &regions[i + 1..] {
                if ao < bo + bl && bo < ao + al {
                    return Err(Qcow2Error::Overlap { a, b });
                }
            }
        }
        Ok(())
    }

    /// True when the refcounts may be stale.
    pub fn is_dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// True when the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }
}

/// Reads the header of the image behind `file` in `g`, with the first
/// cluster (up to 64 KiB) of the file.
pub async fn read(g: &GraphView, file: SlotId) -> Result<(Header, AlignedBuf), Qcow2Error> {
    let driver = g.child(file).map_err(|source| Qcow2Error::Io {
        what: "read the header",
        source,
    })?;
    read_from(g, driver).await
}

/// Reads the header of the image in `file`.
pub async fn read_from(
    g: &GraphView,
    file: &dyn BlockDriver,
) -> Result<(Header, AlignedBuf), Qcow2Error> {
    let err = |source| Qcow2Error::Io {
        what: "read the header",
        source,
    };
    let size = file.size(g).map_err(err)?;
    if size < 72 {
        return Err(Qcow2Error::Truncated { len: size });
    }
    let mut head = AlignedBuf::zeroed(size.min(65536) as usize, 4096)?;
    file.read(g, 0, &head.iovecs_mut()).await.map_err(err)?;
    let bits = u32::from_be_bytes(head.as_slice()[20..24].try_into().expect("4 bytes"));
    if (9..=21).contains(&bits) && (1u64 << bits) > head.len() as u64 && size > head.len() as u64 {
        head = AlignedBuf::zeroed(size.min(1 << bits) as usize, 4096)?;
        file.read(g, 0, &head.iovecs_mut()).await.map_err(err)?;
    }
    let header = Header::parse(head.as_slice(), size)?;
    Ok((header, head))
}

#[cfg(test)]
mod tests;
