//! L2 entries: what backs each cluster, or with extended L2 entries, each
//! subcluster.

use smallvec::{smallvec, SmallVec};

use super::error::Qcow2Error;
use super::types::{Geometry, COMPRESSED, COPIED, OFFSET_MASK, SUBCLUSTERS, ZERO};

/// Reserved bits of a standard (non-compressed) L2 entry: 1-8 and 56-61.
const RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// One L2 entry: the standard 64 bits, and the subcluster bitmap of an
/// extended entry (0 otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Entry {
    /// The standard entry.
    pub word: u64,
    /// Extended L2: allocation bits 0-31, zero bits 32-63.
    pub bitmap: u64,
}

/// The runs of one cluster, inline: most have one or two.
pub type Runs = SmallVec<[(Run, u64); 4]>;

/// Where a run of guest bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// Not in this image: read the backing node (or zeroes).
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// At this byte offset in the image file.
    Data(u64),
    /// In a compressed cluster: its host byte offset and compressed length.
    Compressed {
        /// Host byte offset of the compressed data.
        host: u64,
        /// Bytes of compressed data (an upper bound: whole sectors).
        len: u64,
    },
}

impl L2Entry {
    /// The host cluster offset of a standard entry (0 if none).
    pub fn host(&self) -> u64 {
        self.word & OFFSET_MASK
    }

    /// True when the entry says the cluster's refcount is 1.
    pub fn copied(&self) -> bool {
        self.word & COPIED != 0
    }

    /// True for a compressed cluster.
    pub fn compressed(&self) -> bool {
        self.word & COMPRESSED != 0
    }

    /// The compressed data's host offset and length.
    pub fn compressed_span(&self, g: &Geometry) -> (u64, u64) {
        let bits = g.compressed_offset_bits();
        let host = self.word & ((1 << bits) - 1);
        let sectors = (self.word & !COMPRESSED & !COPIED) >> bits;
        let len = (sectors + 1) * 512 - (host & 511);
        (host, len)
    }

    /// Checks the entry for bits that cannot be set.
    pub fn validate(&self, g: &Geometry, version: u32, guest: u64) -> Result<(), Qcow2Error> {
        let bad = || Qcow2Error::BadEntry {
            what: "L2",
            entry: self.word,
            guest,
        };
        if self.compressed() {
            if self.copied() || (g.extended && self.bitmap != 0) {
                return Err(bad());
            }
            return Ok(());
        }
        let reserved = if g.extended || version == 2 {
            RESERVED | ZERO
        } else {
            RESERVED
        };
        if self.word & reserved != 0 {
            return Err(bad());
        }
        if g.extended {
            let (alloc, zero) = (self.bitmap & 0xffff_ffff, self.bitmap >> 32);
            if alloc & zero != 0 || (alloc != 0 && self.host() == 0) {
                return Err(bad());
            }
        }
        Ok(())
    }

    /// What backs `len` bytes at `at` within the cluster, as runs: inline
    /// (no allocation per request) unless extended L2 subclusters split
    /// the range into more than four.
    pub fn runs(&self, g: &Geometry, at: u64, len: u64) -> Runs {
        if self.compressed() {
            let (host, clen) = self.compressed_span(g);
            return smallvec![(Run::Compressed { host, len: clen }, len)];
        }
        if !g.extended {
            let run = if self.word & ZERO != 0 {
                Run::Zero
            } else if self.host() == 0 {
                Run::Unallocated
            } else {
                Run::Data(self.host() + at)
            };
            return smallvec![(run, len)];
        }
        let sc = g.subcluster_size();
        let mut out = Runs::new();
        let mut pos = at;
        while pos < at + len {
            let i = pos / sc;
            let n = ((i + 1) * sc).min(at + len) - pos;
            let run = self.subcluster(i, pos);
            match out.last_mut() {
                Some((Run::Data(h), l)) if matches!(run, Run::Data(x) if x == *h + *l) => *l += n,
                Some((last, l)) if *last == run && !matches!(run, Run::Data(_)) => *l += n,
                _ => out.push((run, n)),
            }
            pos += n;
        }
        out
    }

    /// What backs subcluster `i` (extended entries), for byte `pos` of the
    /// cluster.
    pub fn subcluster(&self, i: u64, pos: u64) -> Run {
        if self.bitmap & (1 << i) != 0 {
            Run::Data(self.host() + pos)
        } else if self.bitmap & (1 << (i + SUBCLUSTERS)) != 0 {
            Run::Zero
        } else {
            Run::Unallocated
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        extended: false,
        refcount_order: 4,
    };
    const X: Geometry = Geometry {
        cluster_bits: 16,
        extended: true,
        refcount_order: 4,
    };

    #[test]
    fn standard_entries() {
        let data = L2Entry {
            word: COPIED | 0x50000,
            bitmap: 0,
        };
        assert_eq!(data.runs(&G, 512, 1024)[..], [(Run::Data(0x50200), 1024)]);
        assert!(data.copied());
        let zero = L2Entry {
            word: ZERO,
            bitmap: 0,
        };
        assert_eq!(zero.runs(&G, 0, 4096)[..], [(Run::Zero, 4096)]);
        let prealloc = L2Entry {
            word: COPIED | 0x70000 | ZERO,
            bitmap: 0,
        };
        assert_eq!(prealloc.runs(&G, 0, 4096)[..], [(Run::Zero, 4096)]);
        assert_eq!(
            L2Entry::default().runs(&G, 0, 10)[..],
            [(Run::Unallocated, 10)]
        );
        assert!(
            L2Entry {
                word: 0x50001 | 2,
                bitmap: 0
            }
            .validate(&G, 3, 0)
            .is_err(),
            "reserved bit 1"
        );
        assert!(
            L2Entry {
                word: ZERO,
                bitmap: 0
            }
            .validate(&G, 2, 0)
            .is_err(),
            "no zero flag in v2"
        );
    }

    #[test]
    fn compressed_descriptor() {
        // 64k clusters: offset in bits 0-53, extra sectors from bit 54.
        let e = L2Entry {
            word: COMPRESSED | (3 << 54) | 0x12345,
            bitmap: 0,
        };
        assert_eq!(e.compressed_span(&G), (0x12345, 4 * 512 - 0x145));
        assert!(e.validate(&G, 3, 0).is_ok());
        assert!(L2Entry {
            word: e.word | COPIED,
            bitmap: 0
        }
        .validate(&G, 3, 0)
        .is_err());
    }

    #[test]
    fn subclusters_merge_into_runs() {
        // Subclusters are 2 KiB: 0-1 allocated, 2 zero, 3.. unallocated.
        let e = L2Entry {
            word: COPIED | 0x80000,
            bitmap: 0b11 | (0b100 << 32),
        };
        assert_eq!(
            e.runs(&X, 1024, 8192)[..],
            [
                (Run::Data(0x80400), 3072),
                (Run::Zero, 2048),
                (Run::Unallocated, 3072)
            ]
        );
        assert!(e.validate(&X, 3, 0).is_ok());
        let both = L2Entry {
            word: COPIED | 0x80000,
            bitmap: 1 | (1 << 32),
        };
        assert!(
            both.validate(&X, 3, 0).is_err(),
            "allocated and zero at once"
        );
        let no_host = L2Entry { word: 0, bitmap: 1 };
        assert!(
            no_host.validate(&X, 3, 0).is_err(),
            "allocated without a host cluster"
        );
    }
}
