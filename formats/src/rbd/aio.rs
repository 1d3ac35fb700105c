//! One librbd asynchronous request as a future. librbd calls back on one
//! of its own threads; the callback sends the result down a oneshot
//! channel, whose waker wakes the queue thread's task. No thread blocks
//! per request.

use std::ffi::{c_int, c_void};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::channel::oneshot;
use strata_runtime::offload::Waiting;

use super::ffi::{Completion, Lib};

/// A request librbd is running. Dropped early, it waits for librbd to end
/// the request: librbd may still be using the buffers it was given.
pub struct Aio {
    lib: &'static Lib,
    comp: Completion,
    rx: oneshot::Receiver<isize>,
    _waiting: Waiting,
}

// SAFETY: the completion is used from the owning task and freed once; the
// callback on librbd's thread only reads it.
unsafe impl Send for Aio {}

extern "C" fn done(comp: Completion, arg: *mut c_void) {
    // SAFETY: `arg` is the sender `start` leaked for this completion, and
    // librbd calls back exactly once per completion it ran.
    let tx = unsafe { Box::from_raw(arg.cast::<oneshot::Sender<isize>>()) };
    let Ok(lib) = super::ffi::lib() else { return };
    // SAFETY: the completion is alive until `Aio` releases it, after this
    // callback has returned (rbd_aio_wait_for_complete waits for it).
    let r = unsafe { (lib.rbd_aio_get_return_value)(comp) };
    let _ = tx.send(r);
}

impl Aio {
    /// Creates a completion and hands it to `submit`, which starts the
    /// request. A negative return from `submit` is the request's errno.
    pub fn start(lib: &'static Lib, submit: impl FnOnce(Completion) -> c_int) -> Result<Aio, i32> {
        let (tx, rx) = oneshot::channel();
        let arg = Box::into_raw(Box::new(tx)).cast::<c_void>();
        let mut comp: Completion = std::ptr::null_mut();
        // SAFETY: `comp` is written by the call; `done` takes `arg` back.
        let r = unsafe { (lib.rbd_aio_create_completion)(arg, done, &mut comp) };
        if r < 0 {
            // SAFETY: librbd did not take `arg`.
            drop(unsafe { Box::from_raw(arg.cast::<oneshot::Sender<isize>>()) });
            return Err(-r);
        }
        let r = submit(comp);
        if r < 0 {
            // SAFETY: a request refused at once is never called back, so
            // the sender and the completion are still ours to free.
            unsafe {
                drop(Box::from_raw(arg.cast::<oneshot::Sender<isize>>()));
                (lib.rbd_aio_release)(comp);
            }
            return Err(-r);
        }
        Ok(Aio {
            lib,
            comp,
            rx,
            _waiting: Waiting::new(),
        })
    }
}

impl Future for Aio {
    /// librbd's return value: bytes for a read, 0, or a negative errno.
    type Output = isize;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<isize> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(-(libc::EIO as isize)))
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        // SAFETY: the completion is ours; waiting returns at once when the
        // request ended, and only after its callback returned.
        unsafe {
            (self.lib.rbd_aio_wait_for_complete)(self.comp);
            (self.lib.rbd_aio_release)(self.comp);
        }
    }
}
