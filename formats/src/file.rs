//! The `file` protocol driver: a host file or block device, driven through
//! the calling thread's io_uring.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types};
use strata_graph::{
    AlignedBuf, BlockDriver, BlockError, BlockStatus, DataExtentCache, EventSink, GraphView,
    IoFuture, IoOp, IoVecs, NodeStats, Perm, SlotPerm,
};

use strata_runtime::reactor::Reactor;

/// Options of a `file` node, spelled as qemu-storage-daemon spells them.
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// The host file or block device.
    pub filename: PathBuf,
    /// `cache.direct`: bypass the host page cache with O_DIRECT.
    pub direct: bool,
    /// Open without write access.
    pub read_only: bool,
    /// `cache.no-flush`: flushes succeed without reaching the disk.
    pub no_flush: bool,
    /// `discard=unmap`: discards punch holes; otherwise they are ignored.
    pub discard: bool,
    /// `locking=`: whether to take QEMU's image locks.
    pub locking: Locking,
    /// `force-share=on`: share every permission with other processes.
    pub force_share: bool,
}

/// Why a file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// open(2) failed.
    #[error("cannot open '{path}': {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// The filesystem refuses O_DIRECT (tmpfs, for one).
    #[error("'{path}' does not support O_DIRECT; use cache.direct=off (--cache writeback)")]
    NoDirect {
        /// The file.
        path: PathBuf,
    },
    /// Neither a regular file nor a block device.
    #[error("'{path}' is not a regular file or a block device")]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// The image is locked by someone whose use conflicts with ours.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Querying the file failed.
    #[error("cannot query '{path}': {source}")]
    Query {
        /// The file.
        path: PathBuf,
        /// The host's error.
        #[source]
        source: io::Error,
    },
}

/// Largest single zero-fill write when the host cannot zero in place.
const ZERO_CHUNK: usize = 1 << 20;
/// Bytes bounced at a time for O_DIRECT (a multiple of every O_DIRECT
/// alignment).
const BOUNCE_CHUNK: u64 = 1 << 20;

/// An open host file.
pub struct FileNode {
    file: File,
    filename: PathBuf,
    direct: bool,
    read_only: bool,
    no_flush: bool,
    discard: bool,
    size: AtomicU64,
    /// O_DIRECT alignment of buffer addresses and lengths.
    mem_align: usize,
    /// O_DIRECT alignment of file offsets and request lengths.
    offset_align: u32,
    /// The image locks, shared with the node's later reopen generations;
    /// `None` with `locking=off`.
    lock: Option<Arc<ImageLock>>,
    force_share: bool,
    /// The errno of a failed fdatasync through the page cache, or 0. The
    /// kernel may have dropped the dirty pages it could not write, so a
    /// later fdatasync that succeeds proves nothing: every flush fails from
    /// then on (as QEMU since 4.0).
    write_back_error: AtomicI32,
    /// fallocate(ZERO_RANGE) failed as unsupported: zeroes are written as
    /// data from then on.
    zero_range_unsupported: AtomicBool,
    /// The last data extent lseek found.
    status_cache: DataExtentCache,
    events: Option<(Arc<dyn EventSink>, Arc<str>)>,
}

impl FileNode {
    /// Opens `opts.filename`.
    pub fn open(opts: &FileOptions) -> Result<FileNode, FileError> {
        Self::reopen(opts, None)
    }

    /// Opens `opts.filename` as the next generation of a node that holds
    /// `previous` (its [`reopen_state`](BlockDriver::reopen_state)): the
    /// locks carry over, and what this open needs is only tested, since
    /// the reopen's commit takes it.
    pub fn reopen(
        opts: &FileOptions,
        previous: Option<Arc<ImageLock>>,
    ) -> Result<FileNode, FileError> {
        let path = &opts.filename;
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EINVAL) if opts.direct => FileError::NoDirect { path: path.clone() },
                _ => FileError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let query = |source| FileError::Query {
            path: path.clone(),
            source,
        };
        let kind = file.metadata().map_err(query)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(FileError::NotAFile { path: path.clone() });
        }
        let lock = Self::lock(&file, opts, previous)?;
        // Works for block devices too, where metadata().len() is 0.
        let size = (&file).seek(SeekFrom::End(0)).map_err(query)?;
        let (mem_align, offset_align) = if opts.direct {
            dio_alignment(path).map_err(query)?
        } else {
            (1, 1)
        };
        Ok(FileNode {
            file,
            filename: path.clone(),
            direct: opts.direct,
            read_only: opts.read_only,
            no_flush: opts.no_flush,
            discard: opts.discard,
            size: AtomicU64::new(size),
            mem_align: mem_align as usize,
            offset_align,
            lock,
            force_share: opts.force_share,
            write_back_error: AtomicI32::new(0),
            zero_range_unsupported: AtomicBool::new(false),
            status_cache: DataExtentCache::default(),
            events: None,
        })
    }

    /// Reports a lost write-back to `events` as node `name`.
    pub fn reporting_to(mut self, events: Arc<dyn EventSink>, name: &str) -> FileNode {
        self.events = Some((events, name.into()));
        self
    }

    /// Remembers that write-back failed with `errno`, and says so once.
    fn write_back_failed(&self, errno: i32) {
        if self
            .write_back_error
            .compare_exchange(0, errno, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let reason = io::Error::from_raw_os_error(errno).to_string();
        tracing::error!(
            "fdatasync of '{}' failed ({reason}): data written since the last flush may be lost, \
             and every flush fails from now on",
            self.filename.display()
        );
        if let Some((events, name)) = &self.events {
            events.emit(
                "BLOCK_WRITEBACK_ERROR",
                serde_json::json!({
                    "node-name": &**name,
                    "filename": self.filename,
                    "errno": errno,
                    "reason": reason,
                }),
            );
        }
    }

    /// The locks this open needs before anything reads or writes the
    /// image: consistent reads, and writes if writable.
    fn lock(
        file: &File,
        opts: &FileOptions,
        previous: Option<Arc<ImageLock>>,
    ) -> Result<Option<Arc<ImageLock>>, FileError> {
        if opts.locking == Locking::Off {
            return Ok(None);
        }
        let mut need = Perm::CONSISTENT_READ;
        if !opts.read_only {
            need |= Perm::WRITE;
        }
        let want = LockSet {
            need,
            unshared: Perm::empty(),
        };
        if let Some(lock) = previous.filter(|l| l.is_on(file)) {
            lock.check(want)?;
            return Ok(Some(lock));
        }
        match ImageLock::acquire(file, &opts.filename, want) {
            Ok(lock) => Ok(Some(lock)),
            Err(LockError::Os { path, source })
                if opts.locking == Locking::Auto
                    && matches!(
                        source.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP)
                    ) =>
            {
                tracing::warn!(
                    "'{}' cannot be locked ({source}); opening it unlocked (locking=auto)",
                    path.display()
                );
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One readv or writev, resubmitted until complete. A read past the end
    /// of the file reads zeroes.
    async fn rw(&self, op: IoOp, offset: u64, buf: &IoVecs<'_>) -> Result<(), BlockError> {
        let reactor = Reactor::current().map_err(|e| BlockError::io(op, offset, e))?;
        let fd = types::Fd(self.file.as_raw_fd());
        let mut done = 0u64;
        while done < buf.len() {
            let rest;
            let iov = if done == 0 {
                buf
            } else {
                rest = buf.slice(done, buf.len() - done);
                &rest
            };
            let (ptr, cnt) = (iov.as_iovecs().as_ptr(), iov.as_iovecs().len() as u32);
            let entry = match op {
                IoOp::Read => opcode::Readv::new(fd, ptr, cnt)
                    .offset(offset + done)
                    .build(),
                _ => opcode::Writev::new(fd, ptr, cnt)
                    .offset(offset + done)
                    .build(),
            };
            // SAFETY: `iov`, its iovec array and the memory it describes are
            // borrowed by this future, which awaits the op before letting go
            // of them (and dropping the op waits for the kernel).
            let res = unsafe { reactor.push(entry) }.await;
            match res {
                n if n > 0 => done += n as u64,
                0 if op == IoOp::Read => {
                    buf.zero_range(done, buf.len() - done);
                    break;
                }
                0 => return Err(BlockError::errno(op, offset + done, libc::ENOSPC)),
                e if -e == libc::EINTR || -e == libc::EAGAIN => continue,
                e => return Err(BlockError::errno(op, offset + done, -e)),
            }
        }
        Ok(())
    }

    /// Reads or writes through an aligned bounce buffer, [`BOUNCE_CHUNK`]
    /// bytes at a time: O_DIRECT refuses guest buffers that are not
    /// aligned in memory, and a bounce as large as the request would let a
    /// guest choose how much memory the daemon uses.
    async fn rw_bounced(&self, op: IoOp, offset: u64, buf: &IoVecs<'_>) -> Result<(), BlockError> {
        let chunk = buf.len().min(BOUNCE_CHUNK);
        let mut bounce = AlignedBuf::zeroed(chunk as usize, self.mem_align.max(4096))?;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(BOUNCE_CHUNK);
            let part = &mut bounce.as_mut_slice()[..n as usize];
            if op == IoOp::Write {
                buf.copy_to_slice(done, part);
            }
            self.rw(op, offset + done, &IoVecs::from_slice(part))
                .await?;
            if op == IoOp::Read {
                buf.copy_from_slice(done, part);
            }
            done += n;
        }
        Ok(())
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> i32 {
        let Ok(reactor) = Reactor::current() else {
            return -libc::ENOMEM;
        };
        let entry = opcode::Fallocate::new(types::Fd(self.file.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: fallocate references no memory.
        unsafe { reactor.push(entry) }.await
    }

    /// Writes zeroes from a buffer, for hosts that cannot zero in place.
    async fn write_zero_buffer(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let mut zeroes =
            AlignedBuf::zeroed(ZERO_CHUNK.min(len as usize), self.mem_align.max(4096))?;
        let iov = zeroes.iovecs_mut();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64);
            self.rw(IoOp::WriteZeroes, offset + done, &iov.slice(0, n))
                .await?;
            done += n;
        }
        Ok(())
    }

    /// Starts a read or write, bouncing buffers O_DIRECT cannot take.
    fn data_io<'a>(&'a self, op: IoOp, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        if let Err(e) = self.check(op, offset, buf.len()) {
            return IoFuture::ready(Err(e));
        }
        IoFuture::new(async move {
            if self.direct && !buf.is_aligned(self.mem_align) {
                self.rw_bounced(op, offset, buf).await?;
            } else {
                self.rw(op, offset, buf).await?;
            }
            if op == IoOp::Write {
                self.extended_to(offset + buf.len());
            }
            Ok(())
        })
    }

    /// Reads must lie inside the file; writes may extend it, as a format
    /// driver allocating at the end of its image does.
    fn check(&self, op: IoOp, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only && op != IoOp::Read {
            return Err(BlockError::ReadOnly { op });
        }
        if op == IoOp::Read {
            return BlockError::check_range(op, offset, len, self.size.load(Ordering::Relaxed));
        }
        BlockError::check_range(op, offset, len, u64::MAX)
    }

    /// Records that a write reached `end`.
    fn extended_to(&self, end: u64) {
        self.size.fetch_max(end, Ordering::Relaxed);
    }
}

impl BlockDriver for FileNode {
    fn driver_name(&self) -> &'static str {
        "file"
    }

    fn stats(&self, _g: &GraphView) -> NodeStats {
        use std::os::unix::fs::MetadataExt;
        NodeStats {
            allocated_bytes: self.file.metadata().ok().map(|m| m.blocks() * 512),
            caches: Vec::new(),
        }
    }

    fn size(&self, _g: &GraphView) -> Result<u64, BlockError> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn write_back_error(&self) -> Option<i32> {
        match self.write_back_error.load(Ordering::Relaxed) {
            0 => None,
            e => Some(e),
        }
    }

    fn prepare_perm(&self, perm: SlotPerm) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match &self.lock {
            Some(l) => Ok(l.prepare(LockSet::from_perm(perm, self.force_share))?),
            None => Ok(()),
        }
    }

    fn commit_perm(&self) {
        if let Some(l) = &self.lock {
            l.commit();
        }
    }

    fn abort_perm(&self) {
        if let Some(l) = &self.lock {
            l.abort();
        }
    }

    fn reopen_state(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        self.lock
            .clone()
            .map(|l| l as Arc<dyn std::any::Any + Send + Sync>)
    }

    fn request_alignment(&self, _g: &GraphView) -> u32 {
        self.offset_align
    }

    fn read<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        self.data_io(IoOp::Read, offset, buf)
    }

    fn write<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        self.data_io(IoOp::Write, offset, buf)
    }

    fn zeroes_fast(&self, _g: &GraphView, _offset: u64, _len: u64) -> bool {
        !self.read_only && !self.zero_range_unsupported.load(Ordering::Relaxed)
    }

    fn write_zeroes<'a>(
        &'a self,
        _g: &'a GraphView,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> IoFuture<'a> {
        if let Err(e) = self.check(IoOp::WriteZeroes, offset, len) {
            return IoFuture::ready(Err(e));
        }
        IoFuture::new(async move {
            // Zeroing may leave a hole (or an unwritten extent, which
            // SEEK_DATA skips) where the cache says data. Forgetting once it
            // is done is enough: the generation keeps out what a query saw
            // before, and nobody waits on the zeroing until then.
            let r = self.zero(offset, len, may_unmap).await;
            self.status_cache.forget();
            r
        })
    }

    fn discard<'a>(&'a self, _g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        if let Err(e) = self.check(IoOp::Discard, offset, len) {
            return IoFuture::ready(Err(e));
        }
        if !self.discard {
            return IoFuture::ready(Ok(()));
        }
        IoFuture::new(async move {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let r = self.fallocate(mode, offset, len).await;
            self.status_cache.forget();
            match r {
                0 => Ok(()),
                // Discard is a hint: a host that cannot punch holes ignores it.
                e if -e == libc::EOPNOTSUPP => Ok(()),
                e => Err(BlockError::errno(IoOp::Discard, offset, -e)),
            }
        })
    }

    fn block_status<'a>(
        &'a self,
        _g: &'a GraphView,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        IoFuture::ready(Ok(self.seek_status(offset, len)))
    }

    fn resize<'a>(&'a self, _g: &'a GraphView, size: u64) -> IoFuture<'a> {
        if self.read_only {
            return IoFuture::ready(Err(BlockError::ReadOnly { op: IoOp::Resize }));
        }
        let res = self
            .file
            .set_len(size)
            .map_err(|e| BlockError::io(IoOp::Resize, size, e));
        if res.is_ok() {
            self.size.store(size, Ordering::Relaxed);
        }
        IoFuture::ready(res)
    }

    fn flush<'a>(&'a self, _g: &'a GraphView) -> IoFuture<'a> {
        if self.read_only || self.no_flush {
            return IoFuture::ready(Ok(()));
        }
        if self.write_back_error.load(Ordering::Relaxed) != 0 {
            return IoFuture::ready(Err(BlockError::errno(IoOp::Flush, 0, libc::EIO)));
        }
        IoFuture::new(async move {
            let reactor = Reactor::current().map_err(|e| BlockError::io(IoOp::Flush, 0, e))?;
            let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            // SAFETY: fsync references no memory.
            match unsafe { reactor.push(entry) }.await {
                0 => Ok(()),
                e => {
                    // With O_DIRECT nothing waits in the page cache, so a
                    // retry means what it says.
                    if !self.direct {
                        self.write_back_failed(-e);
                    }
                    Err(BlockError::errno(IoOp::Flush, 0, -e))
                }
            }
        })
    }
}

impl FileNode {
    /// Zeroes `len` bytes at `offset`: a hole where unmapping is allowed,
    /// else zero-range, else zeroes written as data.
    async fn zero(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        // A hole reads as zeroes; zero-range keeps the blocks allocated.
        // The guest's permission to unmap counts only where the node
        // lets discards through (discard=unmap), as in QEMU.
        if may_unmap
            && self.discard
            && self
                .fallocate(libc::FALLOC_FL_PUNCH_HOLE | KEEP, offset, len)
                .await
                == 0
        {
            return Ok(());
        }
        match self
            .fallocate(libc::FALLOC_FL_ZERO_RANGE | KEEP, offset, len)
            .await
        {
            0 => Ok(()),
            e if -e == libc::EOPNOTSUPP || -e == libc::EINVAL => {
                self.zero_range_unsupported.store(true, Ordering::Relaxed);
                self.write_zero_buffer(offset, len).await
            }
            e => Err(BlockError::errno(IoOp::WriteZeroes, offset, -e)),
        }
    }

    /// Data or hole at `offset`, from SEEK_DATA/SEEK_HOLE: a hole reads as
    /// zeroes. Filesystems without them report everything as data.
    fn seek_status(&self, offset: u64, len: u64) -> BlockStatus {
        let fd = self.file.as_raw_fd();
        let data = |whence| {
            // SAFETY: lseek on our own descriptor has no memory effects.
            let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
            (r >= 0).then_some(r as u64)
        };
        let all_data = BlockStatus {
            len,
            allocated: true,
            zero: false,
            offset: Some(offset),
        };
        if let Some(n) = self.status_cache.lookup(offset, len) {
            return BlockStatus { len: n, ..all_data };
        }
        let generation = self.status_cache.generation();
        match data(libc::SEEK_DATA) {
            Some(d) if d == offset => {
                let hole = data(libc::SEEK_HOLE).unwrap_or(offset + len);
                self.status_cache.fill(generation, offset..hole);
                BlockStatus {
                    len: (hole - offset).clamp(1, len),
                    ..all_data
                }
            }
            Some(d) => BlockStatus {
                len: (d - offset).clamp(1, len),
                zero: true,
                ..all_data
            },
            // ENXIO: no data after offset, so all hole to the end.
            None if offset < self.size.load(Ordering::Relaxed) => BlockStatus {
                zero: true,
                ..all_data
            },
            None => all_data,
        }
    }
}

/// O_DIRECT's (memory, offset) alignment for `path`, from statx. Kernels or
/// filesystems that do not report it get the conservative 4096.
fn dio_alignment(path: &Path) -> io::Result<(u32, u32)> {
    let mut cpath = path.as_os_str().as_bytes().to_vec();
    cpath.push(0);
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `cpath` is NUL-terminated and `stx` is a writable statx buffer.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            cpath.as_ptr().cast(),
            0,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statx succeeded and filled the buffer (it was zeroed anyway).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return Ok((4096, 4096));
    }
    Ok((stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align))
}

mod lock;
pub use lock::{ImageLock, LockError, LockSet, Locking};

#[cfg(test)]
mod tests;
