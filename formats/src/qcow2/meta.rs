//! The metadata behind the image's lock: the authoritative L1 table, the
//! refcounts and clusters waiting to be freed. L2 slices are loaded,
//! changed and evicted only from here.
//!
//! Every change here is safe to abandon at any await point (a request
//! future may be dropped): what is marked clean was written, what is taken
//! off a list was done, and the rare multi-step change that cannot be
//! ordered so (growing the refcount table) marks itself interrupted for the
//! next lock holder to repair.

use std::sync::Arc;

use strata_graph::AlignedBuf;

use super::cache::{L2Cache, L2Slice};
use super::claim::Orphans;
use super::entry::L2Entry;
use super::error::Qcow2Error;
use super::header::Header;
use super::io::FileIo;
use super::refcount::Refcounts;
use super::types::{Geometry, COMPRESSED, COPIED, OFFSET_MASK};

/// State that only the holder of the metadata lock touches.
pub struct Meta {
    /// The header as last read or written.
    pub header: Header,
    /// The first bytes of the file (min(cluster, 4 KiB)), for rewriting
    /// header fields in place.
    pub head_block: AlignedBuf,
    /// The L1 table.
    pub l1: Vec<u64>,
    /// Where the L1 table is.
    pub l1_offset: u64,
    /// The L1 table differs from the disk.
    pub l1_dirty: bool,
    /// Refcounts.
    pub refs: Refcounts,
    /// Host clusters to decrement once the L2 change that dropped them is
    /// on disk.
    pub pending_free: Vec<u64>,
}

impl Meta {
    /// The L2 slice and index that map guest cluster `ci`, loading the
    /// slice if needed; `None` when the L1 entry is empty.
    pub async fn slice(
        &mut self,
        io: FileIo<'_>,
        l2: &L2Cache,
        g: &Geometry,
        ci: u64,
    ) -> Result<Option<(Arc<L2Slice>, usize)>, Qcow2Error> {
        let l1i = ci / g.l2_entries();
        let l2i = ci % g.l2_entries();
        let l1e = self.l1.get(l1i as usize).copied().unwrap_or(0);
        let table = l1e & OFFSET_MASK;
        if table == 0 {
            return Ok(None);
        }
        if table % g.cluster_size() != 0 || l1e & !(OFFSET_MASK | COPIED) != 0 {
            return Err(Qcow2Error::BadEntry {
                what: "L1",
                entry: l1e,
                guest: ci * g.cluster_size(),
            });
        }
        let at = l2.locate(g, table, l1i, l2i);
        if let Some(s) = l2.get(&at) {
            return Ok(Some((s, at.index)));
        }
        let file_size = io.size()?;
        if table == 0 || at.offset + l2.slice_bytes() > file_size {
            return Err(Qcow2Error::BadEntry {
                what: "L1",
                entry: l1e,
                guest: ci * g.cluster_size(),
            });
        }
        l2.missed();
        let mut buf = AlignedBuf::zeroed(l2.slice_bytes() as usize, 4096)?;
        io.read("read an L2 table", at.offset, buf.as_mut_slice())
            .await?;
        self.sanitize(g, ci, buf.as_mut_slice(), file_size);
        let slice = Arc::new(L2Slice::from_bytes(at.offset, buf.as_slice()));
        if let Err(back) = l2.insert(&at, Arc::clone(&slice)) {
            // Every slot of its set is dirty: write them out (with the
            // ordering a flush has) and try again.
            self.write_back(io, l2, g).await?;
            if l2.insert(&at, back).is_err() {
                unreachable!("a flushed cache has clean slices to evict");
            }
        }
        Ok(Some((slice, at.index)))
    }

    /// Host clusters that hold metadata: header, L1 and refcount tables,
    /// refcount blocks and L2 tables.
    fn metadata_clusters(&self, g: &Geometry) -> std::collections::HashSet<u64> {
        let cs = g.cluster_size();
        let mut set = std::collections::HashSet::new();
        set.insert(0);
        let l1_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        set.extend((0..l1_clusters).map(|i| self.l1_offset / cs + i));
        set.extend((0..self.refs.table_clusters).map(|i| self.refs.table_offset / cs + i));
        set.extend(
            self.refs
                .table
                .iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| o / cs),
        );
        set.extend(
            self.l1
                .iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| o / cs),
        );
        set
    }

    /// Replaces entries of a freshly loaded slice of the L2 table for
    /// guest cluster `ci` that point past the end of the file or into
    /// metadata with an always-invalid marker, so using them fails with an
    /// error while the rest of the slice works. Entries written by this
    /// driver never do that; only a damaged or hostile image has them.
    fn sanitize(&self, g: &Geometry, ci: u64, bytes: &mut [u8], file_size: u64) {
        const MARKER: u64 = 2; // reserved bit 1
        let cs = g.cluster_size();
        let step = g.l2_entry_bytes() as usize;
        let mut meta_clusters = None;
        let first = ci - ci % (bytes.len() / step) as u64;
        for (k, e) in bytes.chunks_exact_mut(step).enumerate() {
            let word = u64::from_be_bytes(e[..8].try_into().expect("8 bytes"));
            let entry = L2Entry { word, bitmap: 0 };
            let host = if entry.compressed() {
                entry.compressed_span(g).0
            } else {
                entry.host()
            };
            if host == 0 {
                continue;
            }
            let why = if host >= file_size {
                "past the end of the file"
            } else if !entry.compressed()
                && meta_clusters
                    .get_or_insert_with(|| self.metadata_clusters(g))
                    .contains(&(host / cs))
            {
                "into metadata"
            } else {
                continue;
            };
            tracing::error!(
                "qcow2: the L2 entry {word:#x} for guest offset {:#x} points {why}; the image is corrupt",
                (first + k as u64) * cs
            );
            e[..8].copy_from_slice(&MARKER.to_be_bytes());
        }
    }

    /// The L2 entry of guest cluster `ci`.
    pub async fn entry(
        &mut self,
        io: FileIo<'_>,
        l2: &L2Cache,
        g: &Geometry,
        ci: u64,
    ) -> Result<L2Entry, Qcow2Error> {
        Ok(match self.slice(io, l2, g, ci).await? {
            Some((s, i)) => s.entry(g, i),
            None => L2Entry::default(),
        })
    }

    /// Sets the L2 entry of guest cluster `ci`, first giving it an L2
    /// table if it has none.
    pub async fn set_entry(
        &mut self,
        io: FileIo<'_>,
        l2: &L2Cache,
        orphans: &Orphans,
        g: &Geometry,
        ci: u64,
        e: L2Entry,
    ) -> Result<(), Qcow2Error> {
        let l1i = (ci / g.l2_entries()) as usize;
        if l1i >= self.l1.len() {
            return Err(Qcow2Error::BadEntry {
                what: "L1 index",
                entry: l1i as u64,
                guest: ci * g.cluster_size(),
            });
        }
        if self.l1[l1i] & OFFSET_MASK == 0 {
            // A new L2 table must be zeroes on disk before L1 points at it.
            let table = self.refs.alloc(io, 1).await?;
            let fresh = orphans.guard(table / g.cluster_size());
            let mut zero = AlignedBuf::zeroed(g.cluster_size() as usize, 4096)?;
            io.write("write a new L2 table", table, zero.as_mut_slice())
                .await?;
            self.l1[l1i] = table | COPIED;
            fresh.keep();
            self.l1_dirty = true;
            l2.set_l1(&self.l1);
        } else if self.l1[l1i] & COPIED == 0 {
            // Shared with an internal snapshot: opening writable refused this.
            return Err(Qcow2Error::BadEntry {
                what: "L1 (shared L2 table)",
                entry: self.l1[l1i],
                guest: ci * g.cluster_size(),
            });
        }
        let (slice, i) = self
            .slice(io, l2, g, ci)
            .await?
            .expect("the table exists now");
        slice.set(g, i, e);
        Ok(())
    }

    /// Queues the host clusters `e` holds to be freed once the change that
    /// dropped them is on disk.
    pub fn release(&mut self, g: &Geometry, e: &L2Entry) {
        if e.word & COMPRESSED != 0 {
            let (host, len) = e.compressed_span(g);
            let first = host / g.cluster_size();
            let last = (host + len - 1) / g.cluster_size();
            self.pending_free.extend(first..=last);
        } else if e.host() != 0 {
            self.pending_free.push(e.host() / g.cluster_size());
        }
    }

    /// Writes all metadata in crash-safe order: data, then refcounts, then
    /// L2 and L1, each step durable before the next; then applies the frees
    /// the written L2 changes allow.
    pub async fn write_back(
        &mut self,
        io: FileIo<'_>,
        l2: &L2Cache,
        g: &Geometry,
    ) -> Result<(), Qcow2Error> {
        let dirty = l2.dirty();
        let refs_dirty = self.refs.table_dirty || self.refs.moved_from.is_some();
        if dirty.is_empty() && !self.l1_dirty && self.pending_free.is_empty() && !refs_dirty {
            self.refs.write_blocks(io).await?;
            return io.flush().await;
        }
        // 1. Data that new L2 entries will point at. Once a flush of the
        //    file has failed, every later one fails too (the file driver
        //    makes it stick), so no L2 entry is ever written that could
        //    point at data the kernel dropped.
        io.flush().await?;
        // 2. Refcounts (blocks, then the table, then the header if the
        //    table moved).
        self.refs.write_blocks(io).await?;
        self.refs.write_table(io).await?;
        if let Some((old, clusters)) = self.refs.moved_from {
            io.flush().await?;
            self.set_header_u64(48, self.refs.table_offset);
            self.set_header_u32(56, self.refs.table_clusters as u32);
            self.write_header(io).await?;
            io.flush().await?;
            self.refs.moved_from = None;
            self.pending_free
                .extend(old / g.cluster_size()..old / g.cluster_size() + clusters);
        }
        io.flush().await?;
        // 3. L2 tables and L1.
        let mut buf = AlignedBuf::zeroed(l2.slice_bytes() as usize, 4096)?;
        for s in dirty {
            s.to_bytes(buf.as_mut_slice());
            io.write("write an L2 table", s.offset, buf.as_mut_slice())
                .await?;
            s.mark_clean();
        }
        self.write_l1(io).await?;
        io.flush().await?;
        // 4. Nothing on disk refers to the released clusters any more:
        //    free them, durably, so a clean close leaks nothing. Each comes
        //    off the list only once it is freed.
        if !self.pending_free.is_empty() {
            while let Some(&c) = self.pending_free.last() {
                self.refs.adjust(io, c, -1).await?;
                self.pending_free.pop();
            }
            self.refs.write_blocks(io).await?;
            io.flush().await?;
        }
        Ok(())
    }

    /// Writes the L2 tables and the L1 table (after the data they point
    /// at), but not the refcounts: for a repair that rebuilds those.
    pub async fn write_tables(&mut self, io: FileIo<'_>, l2: &L2Cache) -> Result<(), Qcow2Error> {
        io.flush().await?;
        let mut buf = AlignedBuf::zeroed(l2.slice_bytes() as usize, 4096)?;
        for s in l2.dirty() {
            s.to_bytes(buf.as_mut_slice());
            io.write("write an L2 table", s.offset, buf.as_mut_slice())
                .await?;
            s.mark_clean();
        }
        self.write_l1(io).await?;
        io.flush().await
    }

    async fn write_l1(&mut self, io: FileIo<'_>) -> Result<(), Qcow2Error> {
        if !self.l1_dirty {
            return Ok(());
        }
        let bytes = (self.l1.len() * 8).div_ceil(512) * 512;
        let mut l1 = AlignedBuf::zeroed(bytes.max(512), 4096)?;
        for (chunk, e) in l1.as_mut_slice().chunks_exact_mut(8).zip(&self.l1) {
            chunk.copy_from_slice(&e.to_be_bytes());
        }
        io.write(
            "write the L1 table",
            self.l1_offset,
            &mut l1.as_mut_slice()[..bytes],
        )
        .await?;
        self.l1_dirty = false;
        Ok(())
    }

    /// Sets a big-endian u64 header field.
    pub fn set_header_u64(&mut self, at: usize, v: u64) {
        self.head_block.as_mut_slice()[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets a big-endian u32 header field.
    pub fn set_header_u32(&mut self, at: usize, v: u32) {
        self.head_block.as_mut_slice()[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// Writes the header block back.
    pub async fn write_header(&mut self, io: FileIo<'_>) -> Result<(), Qcow2Error> {
        io.write("write the header", 0, self.head_block.as_mut_slice())
            .await
    }
}
