//! Rebuilding the refcount structures from what the metadata references:
//! `check -r all` offline, and at run time when an image opens dirty (its
//! lazy refcounts may be stale).

use strata_graph::AlignedBuf;

use super::cache::L2Cache;
use super::census::{census, read_table, Census};
use super::entry::L2Entry;
use super::error::Qcow2Error;
use super::header::Header;
use super::io::FileIo;
use super::meta::Meta;
use super::refcount::{set_entry, Refcounts};
use super::types::{COMPRESSED, COPIED, OFFSET_MASK};

/// The reference counts to rebuild from: the census less the refcount
/// table and blocks it counted, which the rebuild replaces.
pub(super) fn without_refcount_structures(h: &Header, c: &Census) -> Vec<u32> {
    let cs = h.geometry.cluster_size();
    let mut counts = c.counts.clone();
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
    for &e in &c.table {
        let off = e & OFFSET_MASK;
        if off != 0 && off % cs == 0 {
            drop_ref(off, cs);
        }
    }
    counts
}

/// Writes fresh refcount structures for `counts` just past the last
/// cluster the census found referenced, old refcount structures included
/// (what lies beyond is referenced by nothing, so free, however large a
/// sparse file is), fixes COPIED flags, and points the header at the new
/// table.
pub(super) async fn rebuild(
    io: FileIo<'_>,
    h: &Header,
    counts: &[u32],
    l1: &[u64],
    active: &[(u64, Vec<L2Entry>)],
) -> Result<(u64, u64), Qcow2Error> {
    let g = h.geometry;
    let cs = g.cluster_size();
    let per_block = g.refblock_entries();
    let end = counts.len() as u64;
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
    let mut table = AlignedBuf::zeroed((table_clusters * cs) as usize, 4096)?;
    for b in 0..blocks {
        let mut block = AlignedBuf::zeroed(cs as usize, 4096)?;
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
            let mut buf = AlignedBuf::zeroed(cs as usize, 4096)?;
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
        let mut buf = AlignedBuf::zeroed(bytes, 4096)?;
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
    io: FileIo<'_>,
    meta: &mut Meta,
    l2: &L2Cache,
) -> Result<(), Qcow2Error> {
    let h = meta.header.clone();
    let c = census(io, &h).await?;
    let counts = without_refcount_structures(&h, &c);
    rebuild(io, &h, &counts, &c.l1, &c.active).await?;
    let (head, _) = super::header::read(io.g, io.slot).await?;
    let g = h.geometry;
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
    l2.set_l1(&meta.l1);
    tracing::info!(
        "qcow2: refcounts rebuilt ({} leaks, {} corruptions found)",
        c.report.leaks,
        c.report.corruptions
    );
    Ok(())
}
