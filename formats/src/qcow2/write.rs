//! The write paths: overwrites in place, allocating writes with
//! copy-on-write, zeroing and discarding, and growing the image.
//!
//! An allocating write takes the metadata lock twice: once to pick (and
//! refcount) a host cluster, once to point the L2 entry at it. The data
//! and the copy-on-write fill are written in between, without the lock, so
//! allocating writes to different clusters run in parallel. A guest
//! cluster being allocated is claimed ([`super::claim`]); other writes to
//! it wait. Claims and fresh clusters are guards, so a write dropped at any
//! await point leaves the cluster writable and leaks nothing.

use std::sync::atomic::Ordering;

use strata_graph::{AlignedBuf, BlockError, GraphView, IoOp, IoVecs};

use super::claim::Fresh;
use super::entry::L2Entry;
use super::error::Qcow2Error;
use super::node::Qcow2Node;
use super::types::{COPIED, SUBCLUSTERS, ZERO};

/// What a zeroing request may do with the space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zeroing {
    /// Write-zeroes that may release the space.
    Unmap,
    /// Write-zeroes that keeps the space allocated.
    Keep,
    /// Discard: the content is the driver's to choose; partial clusters
    /// are left alone.
    Discard,
}

/// What an allocating write decided under the lock.
struct Plan<'a> {
    /// The host cluster the data goes to.
    host: u64,
    /// When `host` was allocated for this write: the guard that gives it
    /// back unless the new entry is linked.
    fresh: Option<Fresh<'a>>,
    /// The cluster's bytes to write: [from, to).
    from: u64,
    to: u64,
    /// The entry to link once the data is written.
    entry: L2Entry,
}

fn mask(first: u64, last: u64) -> u64 {
    ((1u64 << (last - first + 1)) - 1) << first
}

impl Qcow2Node {
    /// The host offset to write `len` bytes at `at` of the cluster in
    /// place, when the entry allows it without any metadata change.
    fn in_place(&self, e: &L2Entry, at: u64, len: u64) -> Option<u64> {
        if e.compressed() || !e.copied() || e.host() == 0 {
            return None;
        }
        if !self.g.extended {
            return (e.word & ZERO == 0).then_some(e.host() + at);
        }
        let sc = self.g.subcluster_size();
        let m = mask(at / sc, (at + len - 1) / sc);
        (e.bitmap & m == m).then_some(e.host() + at)
    }

    pub(super) async fn write_impl(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly { op: IoOp::Write });
        }
        BlockError::check_range(
            IoOp::Write,
            offset,
            buf.len(),
            self.size.load(Ordering::Relaxed),
        )?;
        let cs = self.g.cluster_size();
        let mut done = 0;
        while done < buf.len() {
            let guest = offset + done;
            let at = self.g.in_cluster(guest);
            let n = (buf.len() - done).min(cs - at);
            self.write_cluster(g, guest / cs, at, &buf.slice(done, n))
                .await
                .map_err(|e| e.to_block(IoOp::Write, guest))?;
            done += n;
        }
        Ok(())
    }

    /// [`BlockDriver::fill_unallocated`]: writes only into the parts of
    /// clusters that the image does not map (no data, no zero flag),
    /// deciding under the same lock and busy marks as allocating writes.
    pub(super) async fn fill_impl(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly { op: IoOp::Write });
        }
        BlockError::check_range(
            IoOp::Write,
            offset,
            buf.len(),
            self.size.load(Ordering::Relaxed),
        )?;
        let cs = self.g.cluster_size();
        let mut done = 0;
        while done < buf.len() {
            let guest = offset + done;
            let at = self.g.in_cluster(guest);
            let n = (buf.len() - done).min(cs - at);
            let part = buf.slice(done, n);
            let mut pending = vec![(at, 0, n)];
            while let Some((at, from, n)) = pending.pop() {
                let split = self
                    .write_cluster_as(g, guest / cs, at, &part.slice(from, n), true)
                    .await
                    .map_err(|e| e.to_block(IoOp::Write, guest))?;
                // Partly mapped (extended L2): fill the unmapped runs.
                pending.extend(split.into_iter().map(|(a, len)| (a, from + (a - at), len)));
            }
            done += n;
        }
        Ok(())
    }

    async fn write_cluster(
        &self,
        g: &GraphView,
        ci: u64,
        at: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), Qcow2Error> {
        self.write_cluster_as(g, ci, at, buf, false)
            .await
            .map(|_| ())
    }

    /// Writes `buf` at `at` in guest cluster `ci`. With `only_unmapped`,
    /// writes nothing where the image maps data or zeroes; when only part
    /// of the range is unmapped, writes nothing and returns the unmapped
    /// runs (cluster-relative offset, length) for the caller to fill.
    async fn write_cluster_as(
        &self,
        g: &GraphView,
        ci: u64,
        at: u64,
        buf: &IoVecs<'_>,
        only_unmapped: bool,
    ) -> Result<Vec<(u64, u64)>, Qcow2Error> {
        let len = buf.len();
        let io = self.io(g);
        let file_write = |host: u64| async move {
            g.child(self.file)
                .map_err(|source| Qcow2Error::Io {
                    what: "write data",
                    source,
                })?
                .write(g, host, buf)
                .await
                .map_err(|source| Qcow2Error::Io {
                    what: "write data",
                    source,
                })
        };
        // Lock-free overwrite of an allocated cluster.
        if let Some(e) = self
            .l2
            .lookup(&self.g, ci / self.g.l2_entries(), ci % self.g.l2_entries())
            .filter(|_| !only_unmapped)
        {
            self.check_entry(&e, ci)?;
            if let Some(host) = self.in_place(&e, at, len) {
                return file_write(host).await.map(|()| Vec::new());
            }
        }
        loop {
            let mut meta = self.lock_meta(io).await?;
            let claim = match self.busy.claim(ci) {
                Ok(claim) => claim,
                Err(released) => {
                    drop(meta);
                    let _ = released.await;
                    continue;
                }
            };
            let e = meta.entry(io, &self.l2, &self.g, ci).await?;
            self.check_entry(&e, ci)?;
            if only_unmapped {
                let mut unmapped = Vec::new();
                let mut pos = at;
                for (run, n) in e.runs(&self.g, at, len) {
                    if run == super::entry::Run::Unallocated {
                        unmapped.push((pos, n));
                    }
                    pos += n;
                }
                let whole = unmapped.len() == 1 && unmapped[0] == (at, len);
                if !whole {
                    return Ok(unmapped);
                }
            } else if let Some(host) = self.in_place(&e, at, len) {
                drop((meta, claim));
                return file_write(host).await.map(|()| Vec::new());
            }
            let plan = self.plan(&mut meta, io, &e, at, len).await?;
            drop(meta);

            self.fill_and_write(g, ci, &e, &plan, at, buf).await?;

            let mut meta = self.lock_meta(io).await?;
            meta.set_entry(io, &self.l2, &self.orphans, &self.g, ci, plan.entry)
                .await?;
            // Linked: no await between the link and these.
            if let Some(fresh) = plan.fresh {
                fresh.keep();
            }
            if plan.host != e.host() {
                meta.release(&self.g, &e);
            }
            drop(claim);
            return Ok(Vec::new());
        }
    }

    /// Chooses the host cluster and the new entry for an allocating write.
    async fn plan(
        &self,
        meta: &mut super::meta::Meta,
        io: super::io::FileIo<'_>,
        e: &L2Entry,
        at: u64,
        len: u64,
    ) -> Result<Plan<'_>, Qcow2Error> {
        let cs = self.g.cluster_size();
        // A cluster we may keep using: ours alone and not compressed.
        let reusable = !e.compressed() && e.copied() && e.host() != 0;
        let (host, fresh) = if reusable {
            (e.host(), None)
        } else {
            let host = meta.refs.alloc(io, 1).await?;
            (host, Some(self.orphans.guard(host / cs)))
        };
        if !self.g.extended {
            return Ok(Plan {
                host,
                fresh,
                from: 0,
                to: cs,
                entry: L2Entry {
                    word: host | COPIED,
                    bitmap: 0,
                },
            });
        }
        let sc = self.g.subcluster_size();
        let (first, last) = (at / sc, (at + len - 1) / sc);
        let all = mask(0, SUBCLUSTERS - 1);
        let (from, to, alloc) = if e.compressed() || (!reusable && e.host() != 0) {
            // A new home for the whole cluster: copy everything allocated.
            let keep = if e.compressed() { all } else { e.bitmap & all };
            (0, cs, keep | mask(first, last))
        } else {
            (
                first * sc,
                (last + 1) * sc,
                (e.bitmap & all) | mask(first, last),
            )
        };
        let zero = (e.bitmap >> SUBCLUSTERS) & !alloc & all;
        Ok(Plan {
            host,
            fresh,
            from,
            to,
            entry: L2Entry {
                word: host | COPIED,
                bitmap: alloc | (zero << SUBCLUSTERS),
            },
        })
    }

    /// Writes the guest data and, around it, the cluster's old content for
    /// the rest of [from, to). When the host cluster is the one the entry
    /// already has (extended L2), subclusters that are already allocated
    /// get only the guest's bytes: another request may be writing the rest
    /// of them in place.
    async fn fill_and_write(
        &self,
        g: &GraphView,
        ci: u64,
        old: &L2Entry,
        plan: &Plan<'_>,
        at: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), Qcow2Error> {
        let end = at + buf.len();
        if self.g.extended && plan.fresh.is_none() {
            let sc = self.g.subcluster_size();
            for i in at / sc..=(end - 1) / sc {
                let (s0, s1) = (i * sc, (i + 1) * sc);
                let (a, b) = (at.max(s0), end.min(s1));
                let part = buf.slice(a - at, b - a);
                if old.bitmap & (1 << i) != 0 {
                    self.write_piece(g, plan.host + a, a, b, a, b, ci, old, &part)
                        .await?;
                } else {
                    self.write_piece(g, plan.host + s0, s0, s1, a, b, ci, old, &part)
                        .await?;
                }
            }
            return Ok(());
        }
        self.write_piece(
            g,
            plan.host + plan.from,
            plan.from,
            plan.to,
            at,
            end,
            ci,
            old,
            buf,
        )
        .await
    }

    /// Writes cluster bytes [from, to) at `host`: the guest's bytes for
    /// [at, end) and the old content around them.
    #[allow(clippy::too_many_arguments)]
    async fn write_piece(
        &self,
        g: &GraphView,
        host: u64,
        from: u64,
        to: u64,
        at: u64,
        end: u64,
        ci: u64,
        old: &L2Entry,
        buf: &IoVecs<'_>,
    ) -> Result<(), Qcow2Error> {
        let file = g.child(self.file).map_err(|source| Qcow2Error::Io {
            what: "write data",
            source,
        })?;
        if at == from && end == to {
            return file
                .write(g, host, buf)
                .await
                .map_err(|source| Qcow2Error::Io {
                    what: "write data",
                    source,
                });
        }
        let mut data = AlignedBuf::zeroed((to - from) as usize, 4096)?;
        {
            let iov = data.iovecs_mut();
            if at > from {
                self.old_content(g, ci, old, from, &iov.slice(0, at - from))
                    .await?;
            }
            if end < to {
                self.old_content(g, ci, old, end, &iov.slice(end - from, to - end))
                    .await?;
            }
        }
        buf.copy_to_slice(
            0,
            &mut data.as_mut_slice()[(at - from) as usize..(end - from) as usize],
        );
        self.io(g)
            .write("write data", host, data.as_mut_slice())
            .await
    }

    /// The bytes [at, at + len) of guest cluster `ci` as entry `e` has them.
    async fn old_content(
        &self,
        g: &GraphView,
        ci: u64,
        e: &L2Entry,
        at: u64,
        out: &IoVecs<'_>,
    ) -> Result<(), Qcow2Error> {
        self.read_mapped(g, ci, e, at, out)
            .await
            .map_err(|source| Qcow2Error::Io {
                what: "read for copy-on-write",
                source,
            })
    }

    pub(super) async fn zero_impl(
        &self,
        g: &GraphView,
        offset: u64,
        len: u64,
        how: Zeroing,
    ) -> Result<(), BlockError> {
        let op = if how == Zeroing::Discard {
            IoOp::Discard
        } else {
            IoOp::WriteZeroes
        };
        if self.read_only {
            return Err(BlockError::ReadOnly { op });
        }
        BlockError::check_range(op, offset, len, self.size.load(Ordering::Relaxed))?;
        let cs = self.g.cluster_size();
        let sc = self.g.subcluster_size();
        let mut done = 0;
        while done < len {
            let guest = offset + done;
            let at = self.g.in_cluster(guest);
            let n = (len - done).min(cs - at);
            let ci = guest / cs;
            let whole = at == 0 && n == cs;
            let whole_subclusters = self.g.extended && at % sc == 0 && n % sc == 0;
            if whole || whole_subclusters {
                self.zero_cluster(g, ci, at, n, how)
                    .await
                    .map_err(|e| e.to_block(op, guest))?;
            } else if how != Zeroing::Discard {
                let mut zeroes = AlignedBuf::zeroed(n as usize, 4096)?;
                let iov = zeroes.iovecs_mut();
                self.write_impl(g, guest, &iov).await?;
            }
            done += n;
        }
        Ok(())
    }

    /// Zeroes (or discards) whole clusters or whole subclusters [at, at+n)
    /// of guest cluster `ci` in metadata alone.
    async fn zero_cluster(
        &self,
        g: &GraphView,
        ci: u64,
        at: u64,
        n: u64,
        how: Zeroing,
    ) -> Result<(), Qcow2Error> {
        let io = self.io(g);
        loop {
            let mut meta = self.lock_meta(io).await?;
            // Wait out an allocating write; the metadata lock keeps others
            // off the cluster while this changes its entry.
            if let Err(released) = self.busy.free(ci) {
                drop(meta);
                let _ = released.await;
                continue;
            }
            let e = meta.entry(io, &self.l2, &self.g, ci).await?;
            self.check_entry(&e, ci)?;
            let backing = self.backing.is_some();
            let new = if self.g.extended {
                let sc = self.g.subcluster_size();
                let m = mask(at / sc, (at + n - 1) / sc);
                let all = mask(0, SUBCLUSTERS - 1);
                if e.compressed() {
                    // Subcluster zeroing of a compressed cluster needs its
                    // data elsewhere first: write real zeroes instead.
                    drop(meta);
                    if how == Zeroing::Discard {
                        return Ok(());
                    }
                    let mut z = AlignedBuf::zeroed(n as usize, 4096)?;
                    let iov = z.iovecs_mut();
                    return self.write_cluster(g, ci, at, &iov).await;
                }
                let discard_to_unallocated = how == Zeroing::Discard && !backing;
                let (alloc, zero) = (e.bitmap & all & !m, (e.bitmap >> SUBCLUSTERS) & all);
                let zero = if discard_to_unallocated {
                    zero & !m
                } else {
                    zero | m
                };
                let mut word = e.word;
                if alloc == 0 && how != Zeroing::Keep && e.host() != 0 {
                    word = 0;
                }
                L2Entry {
                    word,
                    bitmap: alloc | (zero << SUBCLUSTERS),
                }
            } else if self.version >= 3 {
                let keep = how == Zeroing::Keep && e.copied() && !e.compressed() && e.host() != 0;
                if keep {
                    L2Entry {
                        word: e.host() | COPIED | ZERO,
                        bitmap: 0,
                    }
                } else if how == Zeroing::Discard && !backing {
                    L2Entry::default()
                } else {
                    L2Entry {
                        word: ZERO,
                        bitmap: 0,
                    }
                }
            } else if !backing && how != Zeroing::Keep {
                // v2 has no zero flag; without a backing file, unallocated
                // reads as zero.
                L2Entry::default()
            } else if how == Zeroing::Discard {
                // v2 with a backing file cannot represent zeroes: a discard
                // may be ignored.
                return Ok(());
            } else {
                drop(meta);
                let mut z = AlignedBuf::zeroed(n as usize, 4096)?;
                let iov = z.iovecs_mut();
                return self.write_cluster(g, ci, at, &iov).await;
            };
            if new == e {
                return Ok(());
            }
            if e.host() != 0 && new.host() == 0 || e.compressed() {
                meta.release(&self.g, &e);
            }
            if e == L2Entry::default() && new == L2Entry::default() {
                return Ok(());
            }
            return meta
                .set_entry(io, &self.l2, &self.orphans, &self.g, ci, new)
                .await;
        }
    }

    /// Grows the virtual size (shrinking is refused).
    pub(super) async fn resize_impl(&self, g: &GraphView, size: u64) -> Result<(), Qcow2Error> {
        let io = self.io(g);
        let mut meta = self.meta.lock().await;
        let old = self.size.load(Ordering::Relaxed);
        if size < old {
            return Err(Qcow2Error::Io {
                what: "shrink the image",
                source: BlockError::Unsupported {
                    op: IoOp::Resize,
                    driver: "qcow2 (shrinking)",
                },
            });
        }
        if self.read_only {
            return Err(Qcow2Error::Io {
                what: "resize",
                source: BlockError::ReadOnly { op: IoOp::Resize },
            });
        }
        let needed = self.g.l1_entries_for(size);
        if needed > super::header::MAX_L1_BYTES / 8 {
            return Err(Qcow2Error::TooLarge {
                what: "L1 table",
                entries: needed,
                max: super::header::MAX_L1_BYTES / 8,
            });
        }
        // Everything written so far goes to disk first, with the old L1.
        meta.write_back(io, &self.l2, &self.g).await?;
        if needed as usize > meta.l1.len() {
            let cs = self.g.cluster_size();
            let clusters = (needed * 8).div_ceil(cs);
            let new_off = meta.refs.alloc(io, clusters).await?;
            let mut table = AlignedBuf::zeroed((clusters * cs) as usize, 4096)?;
            for (chunk, e) in table.as_mut_slice().chunks_exact_mut(8).zip(&meta.l1) {
                chunk.copy_from_slice(&e.to_be_bytes());
            }
            io.write("write the L1 table", new_off, table.as_mut_slice())
                .await?;
            // The refcounts of the new table, then the table, then the
            // header that points at it.
            meta.write_back(io, &self.l2, &self.g).await?;
            let old_l1 = (meta.l1_offset, (meta.l1.len() as u64 * 8).div_ceil(cs));
            meta.set_header_u64(40, new_off);
            meta.set_header_u32(36, needed as u32);
            meta.set_header_u64(24, size);
            meta.write_header(io).await?;
            io.flush().await?;
            meta.l1.resize(needed as usize, 0);
            meta.l1_offset = new_off;
            meta.header.l1_size = needed as u32;
            meta.header.l1_table_offset = new_off;
            self.l2.set_l1(&meta.l1);
            if old_l1.0 != 0 && old_l1.1 > 0 {
                meta.refs.free_now(io, old_l1.0 / cs, old_l1.1).await?;
            }
        } else {
            meta.set_header_u64(24, size);
            meta.write_header(io).await?;
            io.flush().await?;
        }
        meta.header.size = size;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }
}
