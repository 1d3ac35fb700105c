//! The parts of librados and librbd (Ceph's C API) the `rbd` driver uses,
//! loaded at run time: a Strata built without Ceph's headers or libraries
//! still builds and serves files, and `driver=rbd` on a host without
//! librbd1 says which package to install.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// A cluster handle (`rados_t`).
pub type Rados = *mut c_void;
/// A pool's I/O context (`rados_ioctx_t`).
pub type IoCtx = *mut c_void;
/// An open image (`rbd_image_t`).
pub type Image = *mut c_void;
/// An asynchronous request (`rbd_completion_t`).
pub type Completion = *mut c_void;
/// `rbd_callback_t`: called on one of librbd's threads when a request ends.
pub type Callback = extern "C" fn(Completion, *mut c_void);
/// `rbd_diff_iterate2`'s callback: offset, length, whether the range
/// exists, and the caller's argument; non-zero stops the walk.
pub type DiffCallback = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// The functions, resolved from librados.so.2 and librbd.so.1.
#[allow(missing_docs)]
pub struct Lib {
    pub rados_create: unsafe extern "C" fn(*mut Rados, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(Rados) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(Rados),
    pub rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut IoCtx) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(IoCtx),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(IoCtx, *const c_char),
    pub rbd_open: unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(Image, u64) -> c_int,
    pub rbd_get_features: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut Completion) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize,
    pub rbd_aio_wait_for_complete: unsafe extern "C" fn(Completion) -> c_int,
    pub rbd_aio_release: unsafe extern "C" fn(Completion),
    pub rbd_aio_readv:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int,
    pub rbd_diff_iterate2: unsafe extern "C" fn(
        Image,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        DiffCallback,
        *mut c_void,
    ) -> c_int,
    /// Keeps the libraries loaded for as long as the pointers above live.
    _libs: [libloading::Library; 2],
}

// SAFETY: the table holds function pointers into libraries that stay
// loaded for the process's life; librados and librbd are thread-safe.
unsafe impl Send for Lib {}
// SAFETY: as above.
unsafe impl Sync for Lib {}

/// librbd's functions, loaded on first use; the error names the package
/// that provides them.
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Loads one of Ceph's client libraries.
fn open(name: &str) -> Result<libloading::Library, String> {
    // SAFETY: loading Ceph's client libraries runs their initialisers,
    // which only set up library state.
    unsafe { libloading::Library::new(name) }.map_err(|e| {
        format!(
            "cannot load {name} ({e}): driver=rbd needs Ceph's client libraries \
             (apt-get install librbd1)"
        )
    })
}

fn load() -> Result<Lib, String> {
    let rados = open("librados.so.2")?;
    let rbd = open("librbd.so.1")?;
    macro_rules! sym {
        ($lib:expr, $name:ident) => {
            // SAFETY: the declared type is the one in librados.h / librbd.h.
            *unsafe { $lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                .map_err(|e| format!("{}: {e}", stringify!($name)))?
        };
    }
    Ok(Lib {
        rados_create: sym!(rados, rados_create),
        rados_conf_read_file: sym!(rados, rados_conf_read_file),
        rados_conf_set: sym!(rados, rados_conf_set),
        rados_connect: sym!(rados, rados_connect),
        rados_shutdown: sym!(rados, rados_shutdown),
        rados_ioctx_create: sym!(rados, rados_ioctx_create),
        rados_ioctx_destroy: sym!(rados, rados_ioctx_destroy),
        rados_ioctx_set_namespace: sym!(rados, rados_ioctx_set_namespace),
        rbd_open: sym!(rbd, rbd_open),
        rbd_open_read_only: sym!(rbd, rbd_open_read_only),
        rbd_close: sym!(rbd, rbd_close),
        rbd_get_size: sym!(rbd, rbd_get_size),
        rbd_resize: sym!(rbd, rbd_resize),
        rbd_get_features: sym!(rbd, rbd_get_features),
        rbd_aio_create_completion: sym!(rbd, rbd_aio_create_completion),
        rbd_aio_get_return_value: sym!(rbd, rbd_aio_get_return_value),
        rbd_aio_wait_for_complete: sym!(rbd, rbd_aio_wait_for_complete),
        rbd_aio_release: sym!(rbd, rbd_aio_release),
        rbd_aio_readv: sym!(rbd, rbd_aio_readv),
        rbd_aio_writev: sym!(rbd, rbd_aio_writev),
        rbd_aio_discard: sym!(rbd, rbd_aio_discard),
        rbd_aio_write_zeroes: sym!(rbd, rbd_aio_write_zeroes),
        rbd_aio_flush: sym!(rbd, rbd_aio_flush),
        rbd_diff_iterate2: sym!(rbd, rbd_diff_iterate2),
        _libs: [rados, rbd],
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_library_names_the_package_to_install() {
        let e = super::open("librbd-that-is-not-here.so.1").err().unwrap();
        assert!(e.contains("librbd-that-is-not-here.so.1"), "{e}");
        assert!(e.contains("apt-get install librbd1"), "{e}");
    }
}
