//! The `rbd` protocol driver: a disk that is an RBD image in a Ceph
//! cluster. Requests go through librbd's asynchronous API straight from
//! and into the request's buffers ([`aio`]); Ceph replicates and
//! recovers, Strata only serves. librbd is loaded at run time ([`ffi`]).

mod aio;
pub mod ffi;
pub mod filename;

use std::ffi::{c_int, c_void, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;

use strata_graph::{BlockDriver, BlockError, BlockStatus, GraphView, IoFuture, IoOp, IoVecs};

use aio::Aio;
use ffi::{Image, IoCtx, Lib, Rados};

/// `RBD_FEATURE_FAST_DIFF`: the object map can say cheaply which objects
/// exist, so block status is worth asking for.
const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zeroes that keep the space.
const WRITE_ZEROES_THICK: c_int = 1;
/// How long connecting may take before the open fails (librados waits five
/// minutes by default).
const MOUNT_TIMEOUT_S: &str = "30";

/// Where the image is and how to reach the cluster, as QEMU's `rbd`
/// driver takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RbdOptions {
    /// The pool.
    pub pool: String,
    /// The namespace in the pool, if any.
    pub namespace: Option<String>,
    /// The image's name.
    pub image: String,
    /// A snapshot to serve (read-only).
    pub snapshot: Option<String>,
    /// A ceph.conf; librados's default search otherwise.
    pub conf: Option<PathBuf>,
    /// The client id (`admin` for `client.admin`).
    pub user: Option<String>,
    /// The cephx key itself (from a `secret` object), if given.
    pub key: Option<String>,
    /// `cephx` or `none`.
    pub auth_client_required: Option<String>,
    /// Monitors as `host:port`, overriding the conf's.
    pub servers: Vec<String>,
    /// Other Ceph options (`rbd:` names' `OPTION=VALUE`), set in order.
    pub conf_options: Vec<(String, String)>,
    /// Serve it read-only.
    pub read_only: bool,
    /// Pass discards to the cluster (`discard=unmap`).
    pub discard: bool,
    /// `cache.direct=off`: librbd caches (`rbd_cache`), as QEMU sets it
    /// for that mode; `cache.direct=on` turns the cache off.
    pub cache: bool,
    /// `cache.no-flush=on`: flushes succeed without reaching the cluster.
    pub no_flush: bool,
}

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// librbd is not installed.
    #[error("{0}")]
    NoLibrary(String),
    /// An option holds a NUL byte.
    #[error("rbd option '{0}' must not contain a NUL byte")]
    Nul(&'static str),
    /// A librados or librbd call failed.
    #[error("{what}: {}", std::io::Error::from_raw_os_error(*.errno))]
    Ceph {
        /// What was being done.
        what: String,
        /// The errno it returned.
        errno: i32,
    },
}

/// The cluster, pool and image handles, closed together when the last
/// user (the node, or a job on the offload pool) lets go.
struct Handles {
    lib: &'static Lib,
    cluster: Rados,
    ioctx: IoCtx,
    /// Null once closed at shutdown.
    image: AtomicPtr<c_void>,
}

// SAFETY: librados and librbd handles may be used from any thread.
unsafe impl Send for Handles {}
// SAFETY: as above; librbd serialises what needs it.
unsafe impl Sync for Handles {}

impl Handles {
    /// The open image, or ESHUTDOWN once it was closed.
    fn image(&self) -> Result<Image, c_int> {
        let image = self.image.load(Ordering::Acquire);
        if image.is_null() {
            return Err(libc::ESHUTDOWN);
        }
        Ok(image)
    }

    /// Closes the image (once), which releases its exclusive lock.
    fn close_image(&self) {
        let image = self.image.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !image.is_null() {
            // SAFETY: the image was open, and this is its only close.
            unsafe { (self.lib.rbd_close)(image) };
        }
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        self.close_image();
        // SAFETY: each handle was opened once and is closed once, in the
        // reverse order; null ones were never opened.
        unsafe {
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.lib.rados_shutdown)(self.cluster);
            }
        }
    }
}

/// A node on an RBD image.
pub struct RbdNode {
    h: Arc<Handles>,
    size: AtomicU64,
    read_only: bool,
    discard: bool,
    no_flush: bool,
    fast_diff: bool,
}

fn cstr(what: &'static str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what))
}

fn check(what: impl FnOnce() -> String, r: c_int) -> Result<(), RbdError> {
    if r < 0 {
        return Err(RbdError::Ceph {
            what: what(),
            errno: -r,
        });
    }
    Ok(())
}

impl RbdNode {
    /// Connects to the cluster and opens the image. Blocks for as long as
    /// the monitors take to answer (at most 30 s).
    pub fn open(o: &RbdOptions) -> Result<RbdNode, RbdError> {
        let lib = ffi::lib().map_err(RbdError::NoLibrary)?;
        let mut h = Handles {
            lib,
            cluster: std::ptr::null_mut(),
            ioctx: std::ptr::null_mut(),
            image: AtomicPtr::new(std::ptr::null_mut()),
        };
        let user = o.user.as_deref().map(|u| cstr("user", u)).transpose()?;
        // SAFETY: `h.cluster` is written by the call; a null id means
        // librados's default (admin).
        let r = unsafe {
            (lib.rados_create)(
                &mut h.cluster,
                user.as_ref().map_or(std::ptr::null(), |u| u.as_ptr()),
            )
        };
        check(|| "cannot set up a Ceph client".into(), r)?;
        let set = |key: &str, value: &str| -> Result<(), RbdError> {
            let (k, v) = (cstr("conf", key)?, cstr("conf", value)?);
            // SAFETY: the strings live across the call.
            let r = unsafe { (lib.rados_conf_set)(h.cluster, k.as_ptr(), v.as_ptr()) };
            check(|| format!("cannot set Ceph option {key}={value}"), r)
        };
        match &o.conf {
            Some(path) => {
                // librados says ENOENT for any file it cannot open; the
                // sandbox's EACCES is the one worth seeing.
                if let Err(e) = std::fs::File::open(path) {
                    return Err(RbdError::Ceph {
                        what: format!("cannot read Ceph configuration '{}'", path.display()),
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                    });
                }
                let p = cstr("conf", &path.to_string_lossy())?;
                // SAFETY: the string lives across the call.
                let r = unsafe { (lib.rados_conf_read_file)(h.cluster, p.as_ptr()) };
                check(
                    || format!("cannot read Ceph configuration '{}'", path.display()),
                    r,
                )?;
            }
            None => {
                // SAFETY: null reads librados's default locations.
                let r = unsafe { (lib.rados_conf_read_file)(h.cluster, std::ptr::null()) };
                // No file at the default places is fine when the options
                // say where the monitors are.
                if r < 0 && o.servers.is_empty() {
                    check(|| "cannot read Ceph configuration (give conf=)".into(), r)?;
                }
            }
        }
        if !o.servers.is_empty() {
            set("mon_host", &o.servers.join(","))?;
        }
        if let Some(k) = &o.key {
            set("key", k)?;
        }
        if let Some(a) = &o.auth_client_required {
            set("auth_client_required", a)?;
        }
        set("client_mount_timeout", MOUNT_TIMEOUT_S)?;
        // After the conf file, as QEMU does: the cache mode decides, but
        // an `rbd:` name's own rbd_cache= still wins.
        set("rbd_cache", if o.cache { "true" } else { "false" })?;
        // librbd would hand each request to its own work queue thread
        // before starting it; the queue thread can start it itself, one
        // thread switch fewer (BENCHMARKS.md, "The RBD node").
        set("rbd_non_blocking_aio", "false")?;
        for (k, v) in &o.conf_options {
            set(k, v)?;
        }
        // SAFETY: a configured cluster handle.
        let r = unsafe { (lib.rados_connect)(h.cluster) };
        check(|| "cannot connect to the Ceph cluster".into(), r)?;
        let pool = cstr("pool", &o.pool)?;
        // SAFETY: `h.ioctx` is written by the call.
        let r = unsafe { (lib.rados_ioctx_create)(h.cluster, pool.as_ptr(), &mut h.ioctx) };
        check(|| format!("cannot open pool '{}'", o.pool), r)?;
        if let Some(ns) = &o.namespace {
            let ns = cstr("namespace", ns)?;
            // SAFETY: the string is copied by librados.
            unsafe { (lib.rados_ioctx_set_namespace)(h.ioctx, ns.as_ptr()) };
        }
        let name = cstr("image", &o.image)?;
        let snap = o
            .snapshot
            .as_deref()
            .map(|s| cstr("snapshot", s))
            .transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let read_only = o.read_only || o.snapshot.is_some();
        let open = if read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        // SAFETY: `h.image` is written by the call; the strings live
        // across it.
        let r = unsafe { open(h.ioctx, name.as_ptr(), h.image.get_mut(), snap_ptr) };
        check(
            || match &o.snapshot {
                Some(s) => format!("cannot open RBD image '{}/{}@{s}'", o.pool, o.image),
                None => format!("cannot open RBD image '{}/{}'", o.pool, o.image),
            },
            r,
        )?;
        let mut size = 0;
        // SAFETY: an open image.
        let r = unsafe { (lib.rbd_get_size)(*h.image.get_mut(), &mut size) };
        check(|| "cannot read the RBD image's size".into(), r)?;
        let mut features = 0;
        // SAFETY: an open image.
        let r = unsafe { (lib.rbd_get_features)(*h.image.get_mut(), &mut features) };
        check(|| "cannot read the RBD image's features".into(), r)?;
        Ok(RbdNode {
            h: Arc::new(h),
            size: AtomicU64::new(size),
            read_only,
            discard: o.discard,
            no_flush: o.no_flush,
            fast_diff: features & FEATURE_FAST_DIFF != 0,
        })
    }

    /// Runs one asynchronous request and maps its result.
    async fn call(
        &self,
        op: IoOp,
        offset: u64,
        submit: impl FnOnce(Image, ffi::Completion) -> c_int,
    ) -> Result<isize, BlockError> {
        let image = self
            .h
            .image()
            .map_err(|e| BlockError::errno(op, offset, e))?;
        let aio = Aio::start(self.h.lib, |c| submit(image, c))
            .map_err(|e| BlockError::errno(op, offset, e))?;
        match aio.await {
            r if r < 0 => Err(BlockError::errno(op, offset, (-r) as i32)),
            r => Ok(r),
        }
    }

    fn writable(&self, op: IoOp) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly { op });
        }
        Ok(())
    }
}

/// What `rbd_diff_iterate2` found first in a range: where the first
/// extent that exists starts, and how long it is.
struct FirstExtent(Option<(u64, u64)>);

extern "C" fn first_extent(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `FirstExtent` the caller passed, alive for the
    // synchronous walk.
    let first = unsafe { &mut *arg.cast::<FirstExtent>() };
    if exists != 0 {
        first.0 = Some((offset, len as u64));
        // Enough: stop the walk.
        return -libc::ECANCELED;
    }
    0
}

impl BlockDriver for RbdNode {
    fn driver_name(&self) -> &'static str {
        "rbd"
    }

    fn close(&self) {
        self.h.close_image();
    }

    fn size(&self, _g: &GraphView) -> Result<u64, BlockError> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(async move {
            let iov = buf.as_iovecs();
            let n = self
                .call(IoOp::Read, offset, |image, c| {
                    // SAFETY: the buffers outlive the request: `Aio` waits
                    // for librbd before it lets them go.
                    unsafe {
                        (self.h.lib.rbd_aio_readv)(
                            image,
                            iov.as_ptr(),
                            iov.len() as c_int,
                            offset,
                            c,
                        )
                    }
                })
                .await?;
            // librbd reads zeroes past what was written; a short count
            // would be a truncated image.
            if (n as u64) < buf.len() {
                buf.zero_range(n as u64, buf.len() - n as u64);
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.writable(IoOp::Write)?;
            let iov = buf.as_iovecs();
            self.call(IoOp::Write, offset, |image, c| {
                // SAFETY: as for reads.
                unsafe {
                    (self.h.lib.rbd_aio_writev)(image, iov.as_ptr(), iov.len() as c_int, offset, c)
                }
            })
            .await
            .map(drop)
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _g: &'a GraphView,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.writable(IoOp::WriteZeroes)?;
            let flags = if may_unmap && self.discard {
                0
            } else {
                WRITE_ZEROES_THICK
            };
            self.call(IoOp::WriteZeroes, offset, |image, c| {
                // SAFETY: an open image and a fresh completion.
                unsafe {
                    (self.h.lib.rbd_aio_write_zeroes)(image, offset, len as usize, c, flags, 0)
                }
            })
            .await
            .map(drop)
        })
    }

    fn discard<'a>(&'a self, _g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.writable(IoOp::Discard)?;
            if !self.discard {
                return Ok(());
            }
            self.call(IoOp::Discard, offset, |image, c| {
                // SAFETY: an open image and a fresh completion.
                unsafe { (self.h.lib.rbd_aio_discard)(image, offset, len, c) }
            })
            .await
            .map(drop)
        })
    }

    fn flush<'a>(&'a self, _g: &'a GraphView) -> IoFuture<'a> {
        IoFuture::new(async move {
            if self.read_only || self.no_flush {
                return Ok(());
            }
            self.call(IoOp::Flush, 0, |image, c| {
                // SAFETY: an open image and a fresh completion.
                unsafe { (self.h.lib.rbd_aio_flush)(image, c) }
            })
            .await
            .map(drop)
        })
    }

    fn block_status<'a>(
        &'a self,
        _g: &'a GraphView,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        let data = BlockStatus {
            len,
            allocated: true,
            zero: false,
            offset: None,
        };
        // Without the object map, asking means listing objects: slower
        // than reading. QEMU does not ask then either.
        if !self.fast_diff || len == 0 {
            return IoFuture::ready(Ok(data));
        }
        let h = Arc::clone(&self.h);
        IoFuture::new(async move {
            // rbd_diff_iterate2 blocks: it runs on the offload pool.
            let walk = strata_runtime::offload::run(move || {
                let mut first = FirstExtent(None);
                let image = match h.image() {
                    Ok(image) => image,
                    Err(e) => return (-e, None),
                };
                // SAFETY: an open image (kept open by `h`), and `first`
                // lives across the synchronous walk.
                let r = unsafe {
                    (h.lib.rbd_diff_iterate2)(
                        image,
                        std::ptr::null(),
                        offset,
                        len,
                        1,
                        1,
                        first_extent,
                        (&mut first as *mut FirstExtent).cast(),
                    )
                };
                (r, first.0)
            })
            .await;
            let Some((r, first)) = walk else {
                return Ok(data);
            };
            if r < 0 && r != -libc::ECANCELED {
                return Err(BlockError::errno(IoOp::Read, offset, -r));
            }
            Ok(match first {
                // Whole objects are reported: clip to the range asked.
                Some((at, n)) if at <= offset => BlockStatus {
                    len: (at + n).saturating_sub(offset).clamp(1, len),
                    ..data
                },
                Some((at, _)) => BlockStatus {
                    len: at - offset,
                    allocated: false,
                    zero: true,
                    offset: None,
                },
                None => BlockStatus {
                    len,
                    allocated: false,
                    zero: true,
                    offset: None,
                },
            })
        })
    }

    fn resize<'a>(&'a self, _g: &'a GraphView, size: u64) -> IoFuture<'a> {
        let h = Arc::clone(&self.h);
        IoFuture::new(async move {
            self.writable(IoOp::Write)?;
            let r = strata_runtime::offload::run(move || {
                let image = match h.image() {
                    Ok(image) => image,
                    Err(e) => return -e,
                };
                // SAFETY: an open image, kept open by `h`.
                unsafe { (h.lib.rbd_resize)(image, size) }
            })
            .await
            .unwrap_or(-libc::EIO);
            if r < 0 {
                return Err(BlockError::errno(IoOp::Write, size, -r));
            }
            self.size.store(size, Ordering::Relaxed);
            Ok(())
        })
    }
}
