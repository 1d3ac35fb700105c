//! Reporting a sandbox violation: the filters trap, this handler writes
//! which system call and thread to stderr (the log), then the process dies
//! of SIGSYS as if the filter had killed it.

use std::os::raw::{c_int, c_void};

use super::names::NAMES;

thread_local! {
    /// The thread's name if it is a queue thread, whose filter forbids
    /// prctl (set once, read in the handler without allocating).
    pub static QUEUE_THREAD: std::cell::Cell<Option<[u8; 16]>> = const { std::cell::Cell::new(None) };
}

/// Installs the handler.
pub fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the fields set below make it
    // a SA_SIGINFO handler that runs only async-signal-safe code.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installing a handler for SIGSYS, which nothing else uses.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Appends `s` to `buf` at `*at`, as far as it fits.
fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    let n = s.len().min(buf.len() - *at);
    buf[*at..*at + n].copy_from_slice(&s[..n]);
    *at += n;
}

fn put_num(buf: &mut [u8], at: &mut usize, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(buf, at, &digits[i..]);
}

extern "C" fn handler(_sig: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SIGSYS's siginfo: si_call_addr at 16, si_syscall (int) at 24.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe { *(info as *const u8).add(24).cast::<c_int>() };
    let comm = match QUEUE_THREAD.try_with(|q| q.get()).ok().flatten() {
        Some(name) => name,
        None => {
            let mut comm = [0u8; 16];
            // SAFETY: PR_GET_NAME writes at most 16 bytes into `comm`.
            unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
            comm
        }
    };
    let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(16);
    let mut buf = [0u8; 256];
    let mut at = 0;
    put(
        &mut buf,
        &mut at,
        b"strata: sandbox violation: system call ",
    );
    let name = NAMES.get(nr as usize).copied().unwrap_or("");
    put(
        &mut buf,
        &mut at,
        if name.is_empty() {
            b"?"
        } else {
            name.as_bytes()
        },
    );
    put(&mut buf, &mut at, b" (");
    put_num(&mut buf, &mut at, nr as u64);
    put(&mut buf, &mut at, b") on thread '");
    put(&mut buf, &mut at, &comm[..comm_len]);
    put(
        &mut buf,
        &mut at,
        b"' is not allowed; the daemon stops with SIGSYS (--sandbox off lifts the filters)\n",
    );
    // SAFETY: write, signal, sigprocmask and raise are async-signal-safe.
    // SIGSYS is blocked while this handler runs (and may be in the
    // thread's own mask): unblocked, its default action ends the process.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), at);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGSYS);
    }
}
