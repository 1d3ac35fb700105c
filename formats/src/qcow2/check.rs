//! Consistency checks and repairs, as `qemu-img check` does them: count
//! the references to every host cluster, compare with the refcounts, and
//! check the COPIED flags. Repairing everything rebuilds the refcount
//! structures ([`super::repair`]).

use strata_graph::{GraphView, SlotId};

use super::census::census;
use super::error::Qcow2Error;
use super::header::Header;
use super::io::FileIo;
use super::refcount::Refcounts;
use super::repair::{rebuild, without_refcount_structures};
pub use super::report::CheckReport;
use super::types::{COMPRESSED, COPIED, OFFSET_MASK};

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

/// Checks (and repairs as asked) the image behind `slot`: a node's `file`
/// slot, or a user's slot holding the file node.
pub async fn check_slot(
    g: &GraphView,
    slot: SlotId,
    repair: Repair,
) -> Result<CheckReport, Qcow2Error> {
    let (h, _) = super::header::read(g, slot).await?;
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
    let c = census(io, h).await?;
    let (counts, table, l1, active) = (&c.counts, &c.table, &c.l1, &c.active);
    let mut r = c.report.clone();
    // Compare with the stored refcounts.
    let mut stored = Refcounts::new(
        g,
        table.clone(),
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters),
        4 << 20,
    );
    let covered = table.len() as u64 * g.refblock_entries();
    let upto = (counts.len() as u64).max(covered.min(c.file_clusters));
    let mut leaked = Vec::new();
    let mut bad = false;
    for c in 0..upto {
        let want = u64::from(counts.get(c as usize).copied().unwrap_or(0));
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
    let refcount_of = |c: u64| u64::from(counts.get(c as usize).copied().unwrap_or(0));
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
    for (_, entries) in active {
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
    r.image_end_offset = c
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
                let counts = without_refcount_structures(h, &c);
                rebuild(io, h, &counts, l1, active).await?;
                r.leaks_fixed = r.leaks;
                r.corruptions_fixed = r.corruptions;
            }
        }
    }
    Ok(r)
}
