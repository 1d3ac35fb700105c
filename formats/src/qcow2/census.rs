//! Counting the references to every host cluster from the image's own
//! metadata (header, tables, L2 entries, snapshots): what `check` compares
//! the refcounts with, and what `repair` rebuilds them from.

use strata_graph::AlignedBuf;

use super::entry::L2Entry;
use super::error::Qcow2Error;
use super::header::Header;
use super::io::FileIo;
use super::report::CheckReport;
use super::types::{Geometry, COMPRESSED, COPIED, OFFSET_MASK};

/// What the metadata says about every host cluster.
pub(super) struct Census {
    /// References to each host cluster, by cluster index.
    pub counts: Vec<u32>,
    /// Problems found, and the image's statistics.
    pub report: CheckReport,
    /// The refcount table, as stored.
    pub table: Vec<u64>,
    /// The active L1 table.
    pub l1: Vec<u64>,
    /// The active L2 tables: (L1 index, entries).
    pub active: Vec<(u64, Vec<L2Entry>)>,
    /// Clusters in the file.
    pub file_clusters: u64,
}

/// Memory the census may use: its counts, and the active L2 tables it
/// keeps for fixing COPIED flags. Enough for an 8 TiB image of 64 KiB
/// clusters fully allocated; an image whose metadata asks for more (a
/// hostile one, pointing far into a sparse file) is refused.
pub const CENSUS_MAX_BYTES: u64 = 512 << 20;

/// References to host clusters, counted from the metadata. The counts
/// reach only as far as the highest cluster referenced, not the file's
/// size: a sparse file many times larger than its data costs nothing.
struct Refs {
    g: Geometry,
    counts: Vec<u32>,
    file_clusters: u64,
    /// Bytes of active L2 entries kept.
    kept: u64,
}

impl Refs {
    fn add(
        &mut self,
        r: &mut CheckReport,
        offset: u64,
        len: u64,
        what: &str,
    ) -> Result<(), Qcow2Error> {
        if len == 0 {
            return Ok(());
        }
        let cs = self.g.cluster_size();
        let (first, last) = (offset / cs, (offset + len - 1) / cs);
        for c in first..=last {
            if c >= self.file_clusters {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR {what} at offset {:#x} is past the end of the image",
                    c * cs
                ));
                return Ok(());
            }
            if c as usize >= self.counts.len() {
                self.grow(c + 1)?;
            }
            let n = &mut self.counts[c as usize];
            *n = n.saturating_add(1);
        }
        Ok(())
    }

    fn grow(&mut self, len: u64) -> Result<(), Qcow2Error> {
        // Doubling, so a walk that references clusters in order does not
        // reallocate each time; never past the file or the budget.
        let want = len
            .max(self.counts.len() as u64 * 2)
            .min(self.file_clusters);
        self.charge("reference counts", want * 4 + self.kept)?;
        self.counts
            .try_reserve_exact(want as usize - self.counts.len())
            .map_err(|_| self.too_large("reference counts"))?;
        self.counts.resize(want as usize, 0);
        Ok(())
    }

    fn keep(&mut self, bytes: u64) -> Result<(), Qcow2Error> {
        self.kept += bytes;
        self.charge("active L2 tables", self.counts.len() as u64 * 4 + self.kept)
    }

    fn charge(&self, what: &'static str, total: u64) -> Result<(), Qcow2Error> {
        if total > CENSUS_MAX_BYTES {
            return Err(self.too_large(what));
        }
        Ok(())
    }

    fn too_large(&self, what: &'static str) -> Qcow2Error {
        Qcow2Error::CensusTooLarge {
            what,
            max_mib: CENSUS_MAX_BYTES >> 20,
        }
    }
}

pub(super) async fn read_table(
    io: FileIo<'_>,
    what: &'static str,
    offset: u64,
    entries: u64,
) -> Result<Vec<u64>, Qcow2Error> {
    let mut buf = AlignedBuf::zeroed((entries * 8).max(8) as usize, 4096)?;
    if entries > 0 {
        io.read(
            what,
            offset,
            &mut buf.as_mut_slice()[..(entries * 8) as usize],
        )
        .await?;
    }
    Ok(buf.as_slice()[..(entries * 8) as usize]
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Walks one L1 table (active or a snapshot's), counting references.
#[allow(clippy::too_many_arguments)]
async fn walk_l1(
    io: FileIo<'_>,
    h: &Header,
    refs: &mut Refs,
    r: &mut CheckReport,
    l1: &[u64],
    active: bool,
    l2_entries_out: &mut Vec<(u64, Vec<L2Entry>)>,
) -> Result<(), Qcow2Error> {
    let g = h.geometry;
    let cs = g.cluster_size();
    let mut next_contiguous = 0u64;
    for (i, &e) in l1.iter().enumerate() {
        let table = e & OFFSET_MASK;
        if table == 0 {
            continue;
        }
        if table % cs != 0 || e & !(OFFSET_MASK | COPIED) != 0 {
            r.corruptions += 1;
            r.messages
                .push(format!("ERROR invalid L1 entry {i}: {e:#x}"));
            continue;
        }
        refs.add(r, table, cs, "L2 table")?;
        if table / cs >= refs.file_clusters {
            continue;
        }
        let mut buf = AlignedBuf::zeroed(cs as usize, 4096)?;
        io.read("read an L2 table", table, buf.as_mut_slice())
            .await?;
        let words: Vec<u64> = buf
            .as_slice()
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let entries: Vec<L2Entry> = if g.extended {
            words
                .chunks_exact(2)
                .map(|w| L2Entry {
                    word: w[0],
                    bitmap: w[1],
                })
                .collect()
        } else {
            words
                .iter()
                .map(|&w| L2Entry { word: w, bitmap: 0 })
                .collect()
        };
        for (j, l2) in entries.iter().enumerate() {
            let guest = (i as u64 * g.l2_entries() + j as u64) * cs;
            if l2.validate(&g, h.version, guest).is_err() {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR invalid L2 entry for guest offset {guest:#x}: {:#x}",
                    l2.word
                ));
                continue;
            }
            if l2.word & COMPRESSED != 0 {
                let (host, len) = l2.compressed_span(&g);
                refs.add(r, host, len, "compressed cluster")?;
                if active {
                    r.allocated_clusters += 1;
                    r.compressed_clusters += 1;
                    r.fragmented_clusters += 1;
                }
                continue;
            }
            let host = l2.host();
            if host == 0 {
                continue;
            }
            if host % cs != 0 {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR cluster offset {host:#x} for guest offset {guest:#x} is not aligned"
                ));
                continue;
            }
            if active {
                r.allocated_clusters += 1;
                if next_contiguous != 0 && host != next_contiguous {
                    r.fragmented_clusters += 1;
                }
                next_contiguous = host + cs;
            }
            refs.add(r, host, cs, "data cluster")?;
        }
        if active {
            refs.keep(entries.len() as u64 * std::mem::size_of::<L2Entry>() as u64)?;
            l2_entries_out.push((i as u64, entries));
        }
    }
    Ok(())
}

/// Snapshot table entries: (L1 offset, L1 entries), and the table's bytes.
async fn snapshots(io: FileIo<'_>, h: &Header) -> Result<(Vec<(u64, u64)>, u64), Qcow2Error> {
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let avail = io.size()?.saturating_sub(h.snapshots_offset).min(64 << 20);
    let mut buf = vec![0u8; avail as usize];
    io.read("read the snapshot table", h.snapshots_offset, &mut buf)
        .await?;
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..h.nb_snapshots {
        if at + 40 > buf.len() {
            return Err(Qcow2Error::PastEnd {
                what: "snapshot table",
                offset: h.snapshots_offset,
                len: at as u64 + 40,
                file_size: io.size()?,
            });
        }
        let b = &buf[at..];
        let l1_off = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        let l1_size = u64::from(u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")));
        let id_len = usize::from(u16::from_be_bytes([b[12], b[13]]));
        let name_len = usize::from(u16::from_be_bytes([b[14], b[15]]));
        let extra = u32::from_be_bytes(b[36..40].try_into().expect("4 bytes")) as usize;
        out.push((l1_off, l1_size));
        at += (40 + extra + id_len + name_len).div_ceil(8) * 8;
    }
    Ok((out, at as u64))
}

/// Counts the references to every host cluster of the image with header
/// `h` (which must be current).
pub(super) async fn census(io: FileIo<'_>, h: &Header) -> Result<Census, Qcow2Error> {
    let g = h.geometry;
    let cs = g.cluster_size();
    let file_clusters = io.size()?.div_ceil(cs);
    let mut r = CheckReport {
        total_clusters: h.size.div_ceil(cs),
        ..Default::default()
    };
    let mut refs = Refs {
        g,
        counts: Vec::new(),
        file_clusters: file_clusters.max(1),
        kept: 0,
    };
    refs.add(&mut r, 0, cs, "header")?;
    refs.add(
        &mut r,
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        "L1 table",
    )?;
    refs.add(
        &mut r,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        "refcount table",
    )?;
    let table = read_table(
        io,
        "read the refcount table",
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs / 8,
    )
    .await?;
    for (i, &e) in table.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 || e & !OFFSET_MASK != 0 {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            continue;
        }
        refs.add(&mut r, off, cs, "refcount block")?;
    }
    let (snaps, snap_bytes) = snapshots(io, h).await?;
    refs.add(&mut r, h.snapshots_offset, snap_bytes, "snapshot table")?;
    let mut scratch = Vec::new();
    for (off, n) in snaps {
        refs.add(&mut r, off, n * 8, "snapshot L1 table")?;
        let l1 = read_table(io, "read a snapshot L1 table", off, n).await?;
        walk_l1(io, h, &mut refs, &mut r, &l1, false, &mut scratch).await?;
    }
    let l1 = read_table(
        io,
        "read the L1 table",
        h.l1_table_offset,
        u64::from(h.l1_size),
    )
    .await?;
    let mut active = Vec::new();
    walk_l1(io, h, &mut refs, &mut r, &l1, true, &mut active).await?;
    // Up to the last cluster referenced: growth overshoots.
    let used = refs
        .counts
        .iter()
        .rposition(|&n| n > 0)
        .map_or(0, |c| c + 1);
    refs.counts.truncate(used);
    Ok(Census {
        counts: refs.counts,
        report: r,
        table,
        l1,
        active,
        file_clusters,
    })
}
