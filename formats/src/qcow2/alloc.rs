//! Cluster allocation: finding free clusters, and growing the refcount
//! structures (new refcount blocks, a bigger refcount table) so every
//! allocated cluster has a refcount.

use std::future::Future;
use std::pin::Pin;

use super::error::Qcow2Error;
use super::header::MAX_REFTABLE_BYTES;
use super::io::FileIo;
use super::refcount::Refcounts;

type Boxed<'a, T> = Pin<Box<dyn Future<Output = Result<T, Qcow2Error>> + 'a>>;

impl Refcounts {
    /// Makes sure `cluster` has a refcount block, placing a new block at
    /// the start of the range it covers (which, having no block, is free).
    fn ensure_block<'a>(&'a mut self, io: FileIo<'a>, cluster: u64) -> Boxed<'a, ()> {
        Box::pin(async move {
            if self.has_block(cluster) {
                return Ok(());
            }
            let per_block = self.g.refblock_entries();
            let bi = cluster / per_block;
            if bi as usize >= self.table.len() {
                self.grow_table(io, bi + 1).await?;
                if self.has_block(cluster) {
                    return Ok(());
                }
            }
            let place = bi * per_block;
            let offset = place * self.g.cluster_size();
            self.add_empty(offset)?;
            self.table[bi as usize] = offset;
            self.table_dirty = true;
            // The block describes itself.
            self.set_existing(io, place, 1).await
        })
    }

    /// Grows the table to at least `entries` entries and moves it to newly
    /// allocated clusters; the header is pointed at it when it is written.
    fn grow_table<'a>(&'a mut self, io: FileIo<'a>, entries: u64) -> Boxed<'a, ()> {
        Box::pin(async move {
            let per_cluster = self.g.cluster_size() / 8;
            let want = entries
                .max(self.table.len() as u64 * 2)
                .div_ceil(per_cluster)
                * per_cluster;
            let clusters = want / per_cluster;
            if clusters * self.g.cluster_size() > MAX_REFTABLE_BYTES {
                return Err(Qcow2Error::TooLarge {
                    what: "refcount table",
                    entries: want,
                    max: MAX_REFTABLE_BYTES / 8,
                });
            }
            let old = (self.table_offset, self.table_clusters);
            // Blocks made for the new table's clusters go in its new
            // entries, so the table is longer from here on; until the move
            // is recorded below, an abandoned future leaves it half done.
            self.interrupted = true;
            self.table.resize(want as usize, 0);
            let offset = self.alloc(io, clusters).await?;
            match self.moved_from {
                // An earlier move never reached the header: its clusters
                // are referenced by nothing on disk and can go now.
                Some(_) => {
                    self.free_now(io, old.0 / self.g.cluster_size(), old.1)
                        .await?
                }
                None => self.moved_from = Some(old),
            }
            self.table_offset = offset;
            self.table_clusters = clusters;
            self.table_dirty = true;
            self.interrupted = false;
            Ok(())
        })
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the
    /// byte offset of the first.
    pub fn alloc<'a>(&'a mut self, io: FileIo<'a>, n: u64) -> Boxed<'a, u64> {
        Box::pin(async move {
            let hint = self.free_hint;
            let mut start = hint;
            // Free clusters passed over because the run was too short.
            let mut skipped_free: Option<u64> = None;
            'search: loop {
                for i in 0..n {
                    // Making a block may take a cluster of the candidate run.
                    self.ensure_block(io, start + i).await?;
                }
                for i in 0..n {
                    if self.get(io, start + i).await? != 0 {
                        if i > 0 {
                            skipped_free.get_or_insert(start);
                        }
                        start += i + 1;
                        continue 'search;
                    }
                }
                break;
            }
            for i in 0..n {
                self.set_existing(io, start + i, 1).await?;
            }
            // Everything from the hint up to the run is in use, but for
            // runs skipped as too short (and clusters freed meanwhile, which
            // lowered the hint).
            if self.free_hint >= hint {
                self.free_hint = skipped_free.unwrap_or(start + n);
            }
            Ok(start * self.g.cluster_size())
        })
    }

    /// Changes the refcount of `cluster` by `delta` (1 or -1), making its
    /// block if needed. Refcounts never wrap or go negative.
    pub async fn adjust(
        &mut self,
        io: FileIo<'_>,
        cluster: u64,
        delta: i64,
    ) -> Result<(), Qcow2Error> {
        self.ensure_block(io, cluster).await?;
        let v = self.get(io, cluster).await?;
        let new = if delta < 0 {
            match v.checked_sub(delta.unsigned_abs()) {
                Some(n) => n,
                None => {
                    tracing::error!(
                        "qcow2: refcount of cluster {cluster} would drop below zero; left at 0"
                    );
                    0
                }
            }
        } else {
            v.checked_add(delta as u64)
                .filter(|&n| n <= self.g.max_refcount())
                .ok_or(Qcow2Error::BadEntry {
                    what: "refcount",
                    entry: v,
                    guest: cluster,
                })?
        };
        self.set_existing(io, cluster, new).await
    }

    /// Frees clusters nothing on disk refers to (never written, or an
    /// abandoned table).
    pub async fn free_now(&mut self, io: FileIo<'_>, first: u64, n: u64) -> Result<(), Qcow2Error> {
        for c in first..first + n {
            self.adjust(io, c, -1).await?;
        }
        Ok(())
    }
}
