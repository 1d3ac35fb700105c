//! An open qcow2 image: the node, how it opens, and its read path.
//!
//! ```text
//!  request ──▶ L2 cache (short lock, atomic entries) ──hit──▶ runs ──▶ file / backing / zeroes
//!                  │miss
//!                  ▼
//!            metadata lock ──▶ load the L2 slice ──▶ runs
//! ```
//!
//! Reads and overwrites of allocated clusters never take the metadata
//! lock once the slice is cached. Allocation takes it only to choose
//! clusters and to link them; the data itself is written without it.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use strata_graph::{
    AlignedBuf, BlockDriver, BlockError, BlockStatus, GraphError, GraphView, IoOp, IoVecs,
    NodeBuilder, NodeId, SlotId,
};

use super::cache::L2Cache;
use super::claim::{Busy, Orphans};
use super::compress::decompress;
use super::entry::{L2Entry, Run};
use super::error::Qcow2Error;
use super::header::{Compression, AUTOCLEAR_BITMAPS, INCOMPAT_DIRTY};
use super::io::FileIo;
use super::meta::Meta;
use super::refcount::Refcounts;
use super::types::Geometry;
use strata_runtime::reactor::block_on;

/// Clusters at least this large inflate on the offload pool.
const OFFLOAD_FROM: usize = 32 << 10;

/// Options of a qcow2 node.
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// Open without writing anything.
    pub read_only: bool,
    /// `l2-cache-size` in bytes; by default enough to map the whole image,
    /// but at most 32 MiB (QEMU's default maximum).
    pub l2_cache_size: Option<u64>,
    /// `refcount-cache-size` in bytes.
    pub refcount_cache_size: Option<u64>,
    /// `discard=unmap`: guest discards deallocate clusters.
    pub discard: bool,
}

/// The default L2 cache's largest size: what an image's cluster size
/// does not choose for the daemon.
const DEFAULT_L2_MAX: u64 = 32 << 20;
/// Default refcount cache.
const DEFAULT_REFCOUNT_CACHE: u64 = 1 << 20;

/// An open qcow2 node.
pub struct Qcow2Node {
    pub(super) file: SlotId,
    pub(super) backing: Option<SlotId>,
    pub(super) read_only: bool,
    pub(super) discard: bool,
    /// The image's state, which a reopen carries over to the new node.
    pub(super) inner: Arc<Image>,
}

/// What an open image knows, shared by a node and the node that replaces
/// it on reopen.
pub struct Image {
    pub(super) g: Geometry,
    pub(super) version: u32,
    pub(super) compression: Compression,
    pub(super) size: AtomicU64,
    pub(super) l2: L2Cache,
    pub(super) meta: futures::lock::Mutex<Meta>,
    /// Guest clusters being allocated (see [`super::claim`]).
    pub(super) busy: Busy,
    /// Host clusters allocated for requests that went away.
    pub(super) orphans: Orphans,
}

impl std::ops::Deref for Qcow2Node {
    type Target = Image;

    fn deref(&self) -> &Image {
        &self.inner
    }
}

/// What a header says about backing, for opening the chain.
#[derive(Clone, Debug)]
pub struct BackingInfo {
    /// The backing file name as the header has it.
    pub file: Option<String>,
    /// Its format, if the header says.
    pub format: Option<String>,
}

impl Qcow2Node {
    /// Reopens `previous` (the node's current driver, if it is a qcow2
    /// node) with new options and children, keeping its caches and
    /// metadata state: nothing is re-read, so nothing can go stale.
    pub fn reopen(
        b: &mut NodeBuilder<'_>,
        previous: Arc<dyn Any + Send + Sync>,
        file: NodeId,
        backing: Option<NodeId>,
        opts: &Qcow2Options,
    ) -> Result<Self, Qcow2Error> {
        let inner = previous.downcast::<Image>().map_err(|_| Qcow2Error::Io {
            what: "reopen",
            source: BlockError::Unsupported {
                op: IoOp::Read,
                driver: "qcow2 (reopen of another driver)",
            },
        })?;
        let node = Qcow2Node {
            file: b.attach("file", file)?,
            backing: backing.map(|n| b.attach("backing", n)).transpose()?,
            read_only: opts.read_only,
            discard: opts.discard,
            inner,
        };
        if !opts.read_only {
            let g = b.view();
            block_on(node.prepare_for_writing(node.io(g))).map_err(|e| Qcow2Error::Io {
                what: "set up I/O",
                source: BlockError::io(IoOp::Read, 0, e),
            })??;
        }
        Ok(node)
    }

    /// Opens the image behind node `file`, with node `backing` (if any) as
    /// its backing node.
    pub fn open(
        b: &mut NodeBuilder<'_>,
        file: NodeId,
        backing: Option<NodeId>,
        opts: &Qcow2Options,
    ) -> Result<Self, Qcow2Error> {
        let fslot = b.attach("file", file)?;
        let bslot = backing.map(|n| b.attach("backing", n)).transpose()?;
        let g = b.view();
        block_on(Self::load(g, fslot, bslot, opts)).map_err(|e| Qcow2Error::Io {
            what: "set up I/O",
            source: BlockError::io(IoOp::Read, 0, e),
        })?
    }

    /// Opens the image as [`open`](Self::open) does, but writes nothing
    /// even when writable: a dirty image is repaired by the reopen that
    /// follows, once the caller holds the image's locks (activation).
    pub fn open_unprepared(
        b: &mut NodeBuilder<'_>,
        file: NodeId,
        backing: Option<NodeId>,
        opts: &Qcow2Options,
    ) -> Result<Self, Qcow2Error> {
        let ro = Qcow2Options {
            read_only: true,
            ..opts.clone()
        };
        let mut node = Self::open(b, file, backing, &ro)?;
        node.read_only = opts.read_only;
        Ok(node)
    }

    async fn load(
        g: &GraphView,
        file: SlotId,
        backing: Option<SlotId>,
        opts: &Qcow2Options,
    ) -> Result<Self, Qcow2Error> {
        let (header, head) = super::header::read(g, file).await?;
        if !opts.read_only {
            if header.is_corrupt() {
                return Err(Qcow2Error::Corrupt);
            }
            if header.nb_snapshots > 0 {
                return Err(Qcow2Error::Snapshots {
                    count: header.nb_snapshots,
                });
            }
        }
        let io = FileIo { g, slot: file };
        let geo = header.geometry;
        let cs = geo.cluster_size();
        let mut raw = AlignedBuf::zeroed((u64::from(header.l1_size) * 8).max(8) as usize, 4096)?;
        if header.l1_size > 0 {
            io.read(
                "read the L1 table",
                header.l1_table_offset,
                raw.as_mut_slice(),
            )
            .await?;
        }
        let l1: Vec<u64> = raw.as_slice()[..header.l1_size as usize * 8]
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut rt = AlignedBuf::zeroed(
            (u64::from(header.refcount_table_clusters) * cs) as usize,
            4096,
        )?;
        io.read(
            "read the refcount table",
            header.refcount_table_offset,
            rt.as_mut_slice(),
        )
        .await?;
        let table: Vec<u64> = rt
            .as_slice()
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();

        let slice_bytes = cs.min(4096);
        let l2_bytes = opts.l2_cache_size.unwrap_or_else(|| {
            (header.size.div_ceil(cs) * geo.l2_entry_bytes()).min(DEFAULT_L2_MAX)
        });
        // Headroom over the mapped size: a cache full of dirty slices must
        // be written back before it can take another.
        let l2 = L2Cache::new(
            l1.clone(),
            slice_bytes,
            (l2_bytes / slice_bytes + 64) as usize,
        );
        let refs = Refcounts::new(
            geo,
            table,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters),
            opts.refcount_cache_size.unwrap_or(DEFAULT_REFCOUNT_CACHE),
        );
        let node = Qcow2Node {
            file,
            backing,
            read_only: opts.read_only,
            discard: opts.discard,
            inner: Arc::new(Image {
                g: geo,
                version: header.version,
                compression: header.compression,
                size: AtomicU64::new(header.size),
                l2,
                meta: futures::lock::Mutex::new(Meta {
                    l1_offset: header.l1_table_offset,
                    header,
                    head_block: head_block(&head, cs)?,
                    l1,
                    l1_dirty: false,
                    refs,
                    pending_free: Vec::new(),
                }),
                busy: Busy::default(),
                orphans: Orphans::default(),
            }),
        };
        if !opts.read_only {
            node.prepare_for_writing(io).await?;
        }
        Ok(node)
    }

    /// Repairs a dirty image and drops bitmaps we would not keep up to date.
    async fn prepare_for_writing(&self, io: FileIo<'_>) -> Result<(), Qcow2Error> {
        let mut meta = self.meta.lock().await;
        let mut changed = false;
        if meta.header.is_dirty() {
            tracing::warn!("qcow2: image was not closed cleanly; rebuilding refcounts");
            super::repair::rebuild_refcounts(io, &mut meta, &self.l2).await?;
            meta.header.incompatible &= !INCOMPAT_DIRTY;
            changed = true;
        }
        if meta.header.has_bitmaps && meta.header.autoclear & AUTOCLEAR_BITMAPS != 0 {
            // Writes without updating the bitmaps make them stale: say so,
            // as the autoclear bit requires.
            meta.header.autoclear &= !AUTOCLEAR_BITMAPS;
            changed = true;
        }
        if changed {
            let (inc, auto) = (meta.header.incompatible, meta.header.autoclear);
            meta.set_header_u64(72, inc);
            meta.set_header_u64(88, auto);
            meta.write_header(io).await?;
            io.flush().await?;
        }
        Ok(())
    }

    /// Takes the metadata lock for a change: first frees the host clusters
    /// cancelled requests left allocated, and repairs the refcounts if a
    /// cancelled request stopped in the middle of changing their tables.
    pub(super) async fn lock_meta(
        &self,
        io: FileIo<'_>,
    ) -> Result<futures::lock::MutexGuard<'_, Meta>, Qcow2Error> {
        let mut meta = self.meta.lock().await;
        if meta.refs.interrupted {
            tracing::warn!(
                "qcow2: a cancelled request left the refcount tables half changed; rebuilding them"
            );
            meta.write_tables(io, &self.l2).await?;
            super::repair::rebuild_refcounts(io, &mut meta, &self.l2).await?;
        }
        while let Some(c) = self.orphans.peek() {
            meta.refs.adjust(io, c, -1).await?;
            // No await between the decrement and this: a cancellation
            // cannot free the cluster twice.
            self.orphans.freed(c);
        }
        Ok(meta)
    }

    pub(super) fn io<'a>(&self, g: &'a GraphView) -> FileIo<'a> {
        FileIo { g, slot: self.file }
    }

    /// The entry for guest cluster `ci`: from the cache without locking if
    /// it is there, else loaded under the metadata lock.
    pub(super) async fn lookup(&self, g: &GraphView, ci: u64) -> Result<L2Entry, Qcow2Error> {
        let e = match self
            .l2
            .lookup(&self.g, ci / self.g.l2_entries(), ci % self.g.l2_entries())
        {
            Some(e) => e,
            None => {
                let mut meta = self.meta.lock().await;
                meta.entry(self.io(g), &self.l2, &self.g, ci).await?
            }
        };
        self.check_entry(&e, ci)?;
        Ok(e)
    }

    pub(super) fn check_entry(&self, e: &L2Entry, ci: u64) -> Result<(), Qcow2Error> {
        let guest = ci * self.g.cluster_size();
        e.validate(&self.g, self.version, guest)?;
        if !e.compressed() && e.host() % self.g.cluster_size() != 0 {
            return Err(Qcow2Error::BadEntry {
                what: "L2",
                entry: e.word,
                guest,
            });
        }
        Ok(())
    }

    /// Reads guest bytes the image does not have: from the backing node,
    /// with zeroes past its end, or all zeroes without one.
    pub(super) async fn read_backing(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        let Some(slot) = self.backing else {
            buf.zero();
            return Ok(());
        };
        let backing = g.child(slot)?;
        let size = backing.size(g)?;
        let n = size.saturating_sub(offset).min(buf.len());
        if n > 0 {
            backing.read(g, offset, &buf.slice(0, n)).await?;
        }
        if n < buf.len() {
            buf.zero_range(n, buf.len() - n);
        }
        Ok(())
    }

    /// The whole decompressed cluster behind a compressed entry.
    pub(super) async fn inflate(
        &self,
        g: &GraphView,
        host: u64,
        len: u64,
    ) -> Result<AlignedBuf, Qcow2Error> {
        let io = self.io(g);
        let avail = io.size()?.saturating_sub(host).min(len);
        let mut data = AlignedBuf::zeroed(avail.max(1) as usize, 4096)?;
        if avail > 0 {
            io.read(
                "read a compressed cluster",
                host,
                &mut data.as_mut_slice()[..avail as usize],
            )
            .await?;
        }
        let (kind, cluster) = (self.compression, self.g.cluster_size() as usize);
        let inflate = move || {
            let mut out = AlignedBuf::zeroed(cluster, 4096)?;
            decompress(
                kind,
                host,
                &data.as_slice()[..avail as usize],
                out.as_mut_slice(),
            )
            .map(|()| out)
        };
        // Inflating a large cluster takes long enough (hundreds of
        // microseconds for 64 KiB) to be worth a hand-over: the queue thread
        // serves other requests meanwhile, and clusters inflate in parallel.
        if cluster < OFFLOAD_FROM {
            return inflate();
        }
        strata_runtime::offload::run(inflate)
            .await
            .unwrap_or_else(|| {
                Err(Qcow2Error::Decompress {
                    offset: host,
                    reason: "the decompressor panicked".into(),
                })
            })
    }

    /// Fills `buf` with `len` bytes at `at` within guest cluster `ci`, as
    /// entry `e` maps them.
    pub(super) async fn read_mapped(
        &self,
        g: &GraphView,
        ci: u64,
        e: &L2Entry,
        at: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        let op_err = |e: Qcow2Error| e.to_block(IoOp::Read, ci * self.g.cluster_size() + at);
        let mut pos = 0;
        for (run, n) in e.runs(&self.g, at, buf.len()) {
            let part = buf.slice(pos, n);
            match run {
                Run::Data(host) => g.child(self.file)?.read(g, host, &part).await?,
                Run::Zero => part.zero(),
                Run::Unallocated => {
                    self.read_backing(g, ci * self.g.cluster_size() + at + pos, &part)
                        .await?
                }
                Run::Compressed { host, len } => {
                    let data = self.inflate(g, host, len).await.map_err(op_err)?;
                    let from = (at + pos) as usize;
                    part.copy_from_slice(0, &data.as_slice()[from..from + n as usize]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    pub(super) async fn read_impl(
        &self,
        g: &GraphView,
        offset: u64,
        buf: &IoVecs<'_>,
    ) -> Result<(), BlockError> {
        BlockError::check_range(
            IoOp::Read,
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
            let ci = guest / cs;
            let e = self
                .lookup(g, ci)
                .await
                .map_err(|e| e.to_block(IoOp::Read, guest))?;
            self.read_mapped(g, ci, &e, at, &buf.slice(done, n)).await?;
            done += n;
        }
        Ok(())
    }

    pub(super) async fn status_impl(
        &self,
        g: &GraphView,
        offset: u64,
        len: u64,
    ) -> Result<BlockStatus, BlockError> {
        let size = self.size.load(Ordering::Relaxed);
        BlockError::check_range(IoOp::Read, offset, len, size)?;
        let cs = self.g.cluster_size();
        let mut first: Option<BlockStatus> = None;
        let mut done = 0;
        while done < len {
            let guest = offset + done;
            let at = self.g.in_cluster(guest);
            let n = (len - done).min(cs - at);
            let ci = guest / cs;
            let e = self
                .lookup(g, ci)
                .await
                .map_err(|e| e.to_block(IoOp::Read, guest))?;
            for (run, rl) in e.runs(&self.g, at, n) {
                let st = BlockStatus {
                    len: rl,
                    allocated: run != Run::Unallocated,
                    zero: run == Run::Zero,
                    offset: match run {
                        Run::Data(h) => Some(h),
                        _ => None,
                    },
                };
                match &mut first {
                    None => first = Some(st),
                    Some(f) => {
                        let contiguous = match (f.offset, st.offset) {
                            (Some(a), Some(b)) => a + f.len == b,
                            (None, None) => true,
                            _ => false,
                        };
                        if f.allocated == st.allocated && f.zero == st.zero && contiguous {
                            f.len += rl;
                        } else {
                            return Ok(*f);
                        }
                    }
                }
            }
            done += n;
        }
        Ok(first.unwrap_or(BlockStatus {
            len,
            allocated: false,
            zero: false,
            offset: None,
        }))
    }

    /// The backing file name and format the header of the image in `file`
    /// names.
    pub async fn backing_info(
        g: &GraphView,
        file: &dyn BlockDriver,
    ) -> Result<BackingInfo, Qcow2Error> {
        let (h, _) = super::header::read_from(g, file).await?;
        Ok(BackingInfo {
            file: h.backing_file,
            format: h.backing_format,
        })
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.g
    }
}

fn head_block(head: &AlignedBuf, cs: u64) -> Result<AlignedBuf, Qcow2Error> {
    let n = (cs.min(4096) as usize).min(head.len());
    let mut b = AlignedBuf::zeroed(n, 4096)?;
    b.as_mut_slice().copy_from_slice(&head.as_slice()[..n]);
    Ok(b)
}

impl From<strata_graph::AllocError> for Qcow2Error {
    fn from(e: strata_graph::AllocError) -> Self {
        Qcow2Error::Io {
            what: "allocate a buffer",
            source: e.into(),
        }
    }
}

impl From<GraphError> for Qcow2Error {
    fn from(e: GraphError) -> Self {
        Qcow2Error::Io {
            what: "attach a child",
            source: BlockError::io(IoOp::Read, 0, std::io::Error::other(e)),
        }
    }
}
