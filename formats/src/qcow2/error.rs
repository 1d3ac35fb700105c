//! Why a qcow2 image could not be opened or used.

use strata_graph::{BlockError, IoOp};

/// A qcow2 problem: a malformed, hostile or unsupported image, or a
/// metadata I/O failure.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Metadata could not be read or written.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The file is shorter than a qcow2 header.
    #[error("image is truncated: {len} bytes, too short for a qcow2 header")]
    Truncated {
        /// The file's size.
        len: u64,
    },
    /// Not a qcow2 file.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// Only versions 2 and 3 exist.
    #[error("unsupported qcow2 version {version}")]
    Version {
        /// The version found.
        version: u32,
    },
    /// Cluster sizes are 512 B to 2 MiB.
    #[error("cluster_bits {bits} is invalid: cluster sizes are 512 B (9) to 2 MiB (21)")]
    ClusterBits {
        /// The cluster_bits found.
        bits: u32,
    },
    /// Encryption is not supported.
    #[error("encrypted qcow2 images are not supported")]
    Encrypted,
    /// Incompatible features Strata does not know.
    #[error("Unsupported qcow2 feature(s): {names}")]
    UnknownFeature {
        /// Their names (from the image's feature table) or bit numbers.
        names: String,
    },
    /// A known feature Strata does not implement.
    #[error("qcow2 feature '{name}' is not supported")]
    UnsupportedFeature {
        /// The feature.
        name: &'static str,
    },
    /// Refcounts are 1 to 64 bits; v2 images always use 16.
    #[error("refcount_order {order} is invalid for a version {version} image")]
    RefcountOrder {
        /// The order found.
        order: u32,
        /// The image version.
        version: u32,
    },
    /// A v3 header length out of range.
    #[error(
        "header_length {len} is invalid (at least 104, at most the cluster size, a multiple of 8)"
    )]
    HeaderLength {
        /// The length found.
        len: u32,
    },
    /// A structure that must start on a cluster boundary does not.
    #[error("{what} offset {offset:#x} is not aligned to a cluster")]
    Unaligned {
        /// The structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
    },
    /// A structure reaches past the end of the file.
    #[error(
        "{what} ({len} bytes at {offset:#x}) lies past the end of the file ({file_size} bytes)"
    )]
    PastEnd {
        /// The structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's size.
        file_size: u64,
    },
    /// Counting the references of the image's metadata would take more
    /// memory than the census may use.
    #[error("counting the references of this image's metadata needs more than {max_mib} MiB ({what}); refusing rather than running out of memory")]
    CensusTooLarge {
        /// What grew past the limit.
        what: &'static str,
        /// The limit.
        max_mib: u64,
    },
    /// A table larger than any real image has.
    #[error("{what} has {entries} entries, more than the limit of {max}")]
    TooLarge {
        /// The table.
        what: &'static str,
        /// Its entries.
        entries: u64,
        /// The limit.
        max: u64,
    },
    /// The L1 table cannot map the whole disk.
    #[error("L1 table has {entries} entries, too few for a {size}-byte disk ({needed} needed)")]
    L1TooSmall {
        /// Its entries.
        entries: u64,
        /// The virtual size.
        size: u64,
        /// Entries needed.
        needed: u64,
    },
    /// Two metadata structures overlap.
    #[error("{a} and {b} overlap")]
    Overlap {
        /// One structure.
        a: &'static str,
        /// The other.
        b: &'static str,
    },
    /// The backing file name is too long or out of place.
    #[error("backing file name ({len} bytes at {offset:#x}) is invalid")]
    BackingName {
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A header extension runs past the header cluster.
    #[error("header extension {kind:#x} ({len} bytes) runs past the header cluster")]
    Extension {
        /// Its type.
        kind: u32,
        /// Its length.
        len: u32,
    },
    /// An unknown compression type.
    #[error("unknown compression type {kind}")]
    CompressionType {
        /// The type byte.
        kind: u8,
    },
    /// The image carries the corrupt bit.
    #[error("image is marked corrupt; repair it with `strata check -r all` (or qemu-img check -r all) first")]
    Corrupt,
    /// The virtual size is beyond what qcow2 can address.
    #[error("virtual size {size} is too large")]
    SizeTooLarge {
        /// The size.
        size: u64,
    },
    /// An entry points somewhere it cannot: unaligned, past the end, or
    /// into other metadata.
    #[error("invalid {what} entry {entry:#x} (for guest offset {guest:#x})")]
    BadEntry {
        /// The table.
        what: &'static str,
        /// The entry.
        entry: u64,
        /// The guest offset being mapped.
        guest: u64,
    },
    /// A compressed cluster that does not decompress.
    #[error("compressed cluster at {offset:#x} does not decompress: {reason}")]
    Decompress {
        /// Its host offset.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// The header cannot take the change asked for.
    #[error("cannot update the header: {reason}")]
    HeaderUpdate {
        /// Why.
        reason: String,
    },
    /// The image has internal snapshots, which writes would have to keep.
    #[error("images with {count} internal snapshots can only be opened read-only")]
    Snapshots {
        /// How many.
        count: u32,
    },
}

impl Qcow2Error {
    /// As an I/O error of request `op` at `offset`.
    pub fn to_block(self, op: IoOp, offset: u64) -> BlockError {
        match self {
            Qcow2Error::Io { source, .. } => source,
            e => BlockError::io(
                op,
                offset,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            ),
        }
    }
}
