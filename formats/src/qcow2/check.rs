//! Consistency checks and repairs, as `qemu-img check` does them: count
//! the references to every host cluster, compare with the refcounts, and
//! check the COPIED flags. Repair rebuilds the refcount structures at the
//! end of the file and points the header at them.

use strata_graph::{AlignedBuf, GraphView, SlotId};

use super::entry::L2Entry;
use super::error::Qcow2Error;
use super::header::Header;
use super::io::FileIo;
use super::meta::Meta;
use super::node::Qcow2Node;
use super::refcount::{set_entry, Refcounts};
use super::types::{Geometry, COMPRESSED, COPIED, OFFSET_MASK};

/// What to repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Nothing: only report.
    None,
    /// Leaked clusters only.
    Leaks,
    /// Everything the refcounts can fix.
    All,
}

/// What a check found (and fixed), in `qemu-img check`'s terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts lower than the references, or bad entries.
    pub corruptions: u64,
    /// Refcounts higher than the references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that stopped part of the check.
    pub check_errors: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with data in this image.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem.
    pub messages: Vec<String>,
}

/// References to host clusters, counted from the metadata.
struct Refs {
    g: Geometry,
    counts: Vec<u32>,
}

impl Refs {
    fn add(&mut self, r: &mut CheckReport, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let cs = self.g.cluster_size();
        let (first, last) = (offset / cs, (offset + len - 1) / cs);
        for c in first..=last {
            match self.counts.get_mut(c as usize) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR {what} at offset {:#x} is past the end of the image",
                        c * cs
                    ));
                    return;
                }
            }
        }
    }
}

async fn read_table(
    io: FileIo<'_>,
    what: &'static str,
    offset: u64,
    entries: u64,
) -> Result<Vec<u64>, Qcow2Error> {
    let mut buf = AlignedBuf::zeroed((entries * 8).max(8) as usize, 4096);
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
        refs.add(r, table, cs, "L2 table");
        if (table / cs) as usize >= refs.counts.len() {
            continue;
        }
        let mut buf = AlignedBuf::zeroed(cs as usize, 4096);
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
                refs.add(r, host, len, "compressed cluster");
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
            refs.add(r, host, cs, "data cluster");
        }
        if active {
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

/// Checks (and repairs as asked) the image behind `slot`: a node's `file`
/// slot, or a user's slot holding the file node.
pub async fn check_slot(
    g: &GraphView,
    slot: SlotId,
    repair: Repair,
) -> Result<CheckReport, Qcow2Error> {
    let (h, _) = Qcow2Node::read_header(g, slot).await?;
    check(FileIo { g, slot }, &h, repair).await
}

/// Counts references, compares them with the refcounts, and repairs as
/// asked. The header must be current.
pub(super) async fn check(
    io: FileIo<'_>,
    h: &Header,
    repair: Repair,
) -> Result<CheckReport, Qcow2Error> {
    let g = h.geometry;
    let cs = g.cluster_size();
    let file_clusters = io.size()?.div_ceil(cs);
    let mut r = CheckReport {
        total_clusters: h.size.div_ceil(cs),
        ..Default::default()
    };
    let mut refs = Refs {
        g,
        counts: vec![0; file_clusters.max(1) as usize],
    };
    refs.add(&mut r, 0, cs, "header");
    refs.add(
        &mut r,
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        "L1 table",
    );
    refs.add(
        &mut r,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        "refcount table",
    );
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
        refs.add(&mut r, off, cs, "refcount block");
    }
    let (snaps, snap_bytes) = snapshots(io, h).await?;
    refs.add(&mut r, h.snapshots_offset, snap_bytes, "snapshot table");
    let mut scratch = Vec::new();
    for (off, n) in snaps {
        refs.add(&mut r, off, n * 8, "snapshot L1 table");
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

    // Compare with the stored refcounts.
    let mut stored = Refcounts::new(
        g,
        table.clone(),
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters),
        4 << 20,
    );
    let covered = table.len() as u64 * g.refblock_entries();
    let upto = (refs.counts.len() as u64).max(covered.min(file_clusters));
    let mut leaked = Vec::new();
    let mut bad = false;
    for c in 0..upto {
        let want = u64::from(refs.counts.get(c as usize).copied().unwrap_or(0));
        let have = stored.get(io, c).await?;
        if have < want {
            r.corruptions += 1;
            bad = true;
            r.messages.push(format!(
                "ERROR cluster {c} refcount={have} reference={want}"
            ));
        } else if have > want {
            r.leaks += 1;
            leaked.push((c, want));
            r.messages.push(format!(
                "Leaked cluster {c} refcount={have} reference={want}"
            ));
        }
    }
    // COPIED flags must say exactly "refcount is 1".
    let refcount_of = |c: u64| u64::from(refs.counts.get(c as usize).copied().unwrap_or(0));
    let mut copied_errors = 0;
    for (i, &e) in l1.iter().enumerate() {
        let table = e & OFFSET_MASK;
        if table != 0 && table % cs == 0 && (refcount_of(table / cs) == 1) != (e & COPIED != 0) {
            copied_errors += 1;
            r.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x}"
            ));
        }
    }
    for (_, entries) in &active {
        for e in entries {
            if e.word & COMPRESSED == 0
                && e.host() != 0
                && e.host() % cs == 0
                && (refcount_of(e.host() / cs) == 1) != e.copied()
            {
                copied_errors += 1;
                r.messages.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={:x}",
                    e.word
                ));
            }
        }
    }
    r.corruptions += copied_errors;
    r.image_end_offset = refs
        .counts
        .iter()
        .rposition(|&n| n > 0)
        .map_or(0, |c| (c as u64 + 1) * cs);

    match repair {
        Repair::None => {}
        Repair::Leaks => {
            for (c, want) in leaked {
                stored.set_existing(io, c, want).await?;
            }
            stored.write_blocks(io).await?;
            io.flush().await?;
            r.leaks_fixed = r.leaks;
        }
        Repair::All => {
            if bad || copied_errors > 0 || r.leaks > 0 {
                // The old refcount structures are replaced, so they are no
                // longer references.
                let mut counts = refs.counts.clone();
                let mut drop_ref = |off: u64, len: u64| {
                    for c in off / cs..(off + len).div_ceil(cs) {
                        if let Some(n) = counts.get_mut(c as usize) {
                            *n = n.saturating_sub(1);
                        }
                    }
                };
                drop_ref(
                    h.refcount_table_offset,
                    u64::from(h.refcount_table_clusters) * cs,
                );
                for &e in &table {
                    let off = e & OFFSET_MASK;
                    if off != 0 && off % cs == 0 {
                        drop_ref(off, cs);
                    }
                }
                rebuild(io, h, &counts, &l1, &active).await?;
                r.leaks_fixed = r.leaks;
                r.corruptions_fixed = r.corruptions;
            }
        }
    }
    Ok(r)
}

/// Writes fresh refcount structures for `counts` at the end of the file,
/// fixes COPIED flags, and points the header at the new table.
async fn rebuild(
    io: FileIo<'_>,
    h: &Header,
    counts: &[u32],
    l1: &[u64],
    active: &[(u64, Vec<L2Entry>)],
) -> Result<(u64, u64), Qcow2Error> {
    let g = h.geometry;
    let cs = g.cluster_size();
    let per_block = g.refblock_entries();
    let end = io.size()?.div_ceil(cs).max(counts.len() as u64);
    // New blocks and table go at `end`; find sizes that cover themselves.
    let (mut blocks, mut table_clusters) = (1u64, 1u64);
    loop {
        let total = end + blocks + table_clusters;
        let nb = total.div_ceil(per_block);
        let tc = (nb * 8).div_ceil(cs);
        if nb <= blocks && tc <= table_clusters {
            break;
        }
        blocks = nb.max(blocks);
        table_clusters = tc.max(table_clusters);
    }
    let table_off = (end + blocks) * cs;
    let mut table = AlignedBuf::zeroed((table_clusters * cs) as usize, 4096);
    for b in 0..blocks {
        let mut block = AlignedBuf::zeroed(cs as usize, 4096);
        for i in 0..per_block {
            let c = b * per_block + i;
            let n = if c < counts.len() as u64 {
                u64::from(counts[c as usize])
            } else {
                u64::from(c >= end && c < end + blocks + table_clusters)
            };
            if n > 0 {
                set_entry(
                    block.as_mut_slice(),
                    g.refcount_order,
                    i as usize,
                    n.min(g.max_refcount()),
                );
            }
        }
        let off = (end + b) * cs;
        io.write("write a refcount block", off, block.as_mut_slice())
            .await?;
        table.as_mut_slice()[(b * 8) as usize..(b * 8 + 8) as usize]
            .copy_from_slice(&off.to_be_bytes());
    }
    io.write("write the refcount table", table_off, table.as_mut_slice())
        .await?;
    // COPIED flags, from the true counts.
    let count = |off: u64| u64::from(counts.get((off / cs) as usize).copied().unwrap_or(0));
    for (i, entries) in active {
        let l1e = l1[*i as usize];
        let table = l1e & OFFSET_MASK;
        let mut changed = false;
        let mut fixed: Vec<L2Entry> = entries.clone();
        for e in fixed.iter_mut() {
            if e.word & COMPRESSED == 0 && e.host() != 0 {
                let want = if count(e.host()) == 1 {
                    e.word | COPIED
                } else {
                    e.word & !COPIED
                };
                if want != e.word {
                    e.word = want;
                    changed = true;
                }
            }
        }
        if changed {
            let mut buf = AlignedBuf::zeroed(cs as usize, 4096);
            for (k, e) in fixed.iter().enumerate() {
                if g.extended {
                    buf.as_mut_slice()[k * 16..k * 16 + 8].copy_from_slice(&e.word.to_be_bytes());
                    buf.as_mut_slice()[k * 16 + 8..k * 16 + 16]
                        .copy_from_slice(&e.bitmap.to_be_bytes());
                } else {
                    buf.as_mut_slice()[k * 8..k * 8 + 8].copy_from_slice(&e.word.to_be_bytes());
                }
            }
            io.write("write an L2 table", table, buf.as_mut_slice())
                .await?;
        }
    }
    let mut l1_changed = false;
    let mut new_l1 = l1.to_vec();
    for e in new_l1.iter_mut() {
        let table = *e & OFFSET_MASK;
        if table != 0 {
            let want = if count(table) == 1 {
                *e | COPIED
            } else {
                *e & !COPIED
            };
            l1_changed |= want != *e;
            *e = want;
        }
    }
    if l1_changed {
        let bytes = (new_l1.len() * 8).div_ceil(512) * 512;
        let mut buf = AlignedBuf::zeroed(bytes, 4096);
        for (chunk, e) in buf.as_mut_slice().chunks_exact_mut(8).zip(&new_l1) {
            chunk.copy_from_slice(&e.to_be_bytes());
        }
        io.write("write the L1 table", h.l1_table_offset, buf.as_mut_slice())
            .await?;
    }
    io.flush().await?;
    let mut head = [0u8; 512];
    io.read("read the header", 0, &mut head).await?;
    head[48..56].copy_from_slice(&table_off.to_be_bytes());
    head[56..60].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    io.write("write the header", 0, &mut head).await?;
    io.flush().await?;
    Ok((table_off, table_clusters))
}

/// Rebuilds the refcounts of an open image (a dirty image being opened)
/// and reloads them.
pub(super) async fn rebuild_refcounts(
    node: &Qcow2Node,
    io: FileIo<'_>,
    meta: &mut Meta,
) -> Result<(), Qcow2Error> {
    let h = meta.header.clone();
    let report = check(io, &h, Repair::All).await?;
    let (head, _) = Qcow2Node::read_header(io.g, io.slot).await?;
    let g = node.geometry();
    let cs = g.cluster_size();
    let table = read_table(
        io,
        "read the refcount table",
        head.refcount_table_offset,
        u64::from(head.refcount_table_clusters) * cs / 8,
    )
    .await?;
    meta.refs = Refcounts::new(
        g,
        table,
        head.refcount_table_offset,
        u64::from(head.refcount_table_clusters),
        1 << 20,
    );
    meta.header.refcount_table_offset = head.refcount_table_offset;
    meta.header.refcount_table_clusters = head.refcount_table_clusters;
    meta.set_header_u64(48, head.refcount_table_offset);
    meta.set_header_u32(56, head.refcount_table_clusters);
    // The L1 table may have had its COPIED flags fixed.
    meta.l1 = read_table(
        io,
        "read the L1 table",
        h.l1_table_offset,
        u64::from(h.l1_size),
    )
    .await?;
    node.l2.set_l1(&meta.l1);
    tracing::info!(
        "qcow2: refcounts rebuilt ({} leaks, {} corruptions fixed)",
        report.leaks_fixed,
        report.corruptions_fixed
    );
    Ok(())
}
