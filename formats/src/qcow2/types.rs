//! Address arithmetic of a qcow2 image: cluster and subcluster geometry,
//! and the guest/host offset types that keep the two spaces apart.

use std::fmt;

/// A byte offset in the guest's view of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Bits of an L1 or standard L2 entry that hold a cluster offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry flag: the cluster's refcount is exactly 1.
pub const COPIED: u64 = 1 << 63;
/// L2 entry flag: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (v3, standard entries only): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;

/// The shape of an image: sizes of clusters, tables and refcounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (subclusters).
    pub extended: bool,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    /// Subcluster size in bytes (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Refcount entries in one refcount block (one cluster).
    pub fn refblock_entries(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    /// The largest refcount a cluster can have.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1 << self.refcount_bits()) - 1
        }
    }

    /// The L1 index that maps `guest`.
    pub fn l1_index(&self, guest: GuestOffset) -> u64 {
        guest.0 / self.l2_coverage()
    }

    /// The L2 index (within its table) that maps `guest`.
    pub fn l2_index(&self, guest: GuestOffset) -> u64 {
        (guest.0 / self.cluster_size()) % self.l2_entries()
    }

    /// `guest`'s offset within its cluster.
    pub fn in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Bits of a compressed cluster descriptor that hold the host offset.
    pub fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_common_layouts() {
        let g = Geometry {
            cluster_bits: 16,
            extended: false,
            refcount_order: 4,
        };
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(g.refblock_entries(), 32768);
        assert_eq!(g.max_refcount(), 65535);
        assert_eq!(g.l1_index(GuestOffset(512 << 20)), 1);
        assert_eq!(g.l2_index(GuestOffset(65536 * 3 + 5)), 3);
        assert_eq!(g.compressed_offset_bits(), 54);
        let x = Geometry {
            cluster_bits: 16,
            extended: true,
            refcount_order: 0,
        };
        assert_eq!(x.l2_entries(), 4096);
        assert_eq!(x.subcluster_size(), 2048);
        assert_eq!(x.refblock_entries(), 524288);
        assert_eq!(x.max_refcount(), 1);
        let big = Geometry {
            cluster_bits: 21,
            extended: false,
            refcount_order: 6,
        };
        assert_eq!(big.max_refcount(), u64::MAX);
        assert_eq!(big.compressed_offset_bits(), 49);
    }
}
