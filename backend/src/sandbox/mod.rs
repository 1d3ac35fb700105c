//! The sandbox (`--sandbox on`, the default): no new privileges, and
//! seccomp-bpf allow-lists of system calls, one for the daemon as a whole
//! and a narrower one for the threads that serve guest requests. See
//! [`filters`] for the lists. A system call outside them kills the process
//! with SIGSYS, after the log names it.
//!
//! Then, once the command line's images are open, [`landlock`] keeps the
//! daemon to the directories it works in.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Context as _};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

pub mod filters;
pub mod landlock;
mod names;
mod sigsys;

static ON: AtomicBool = AtomicBool::new(false);
/// Test hook: a queue thread makes one forbidden system call, so that the
/// test suite can see a violation end the daemon.
static TEST_VIOLATION: AtomicBool = AtomicBool::new(false);

/// Enters the sandbox for the whole process. Call on the main thread
/// before any other thread is started: threads inherit the filter.
pub fn enter() -> anyhow::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot set no_new_privs");
    }
    sigsys::install().context("cannot install the SIGSYS reporter")?;
    apply(&filters::daemon()).context("cannot apply the daemon's seccomp filter")?;
    TEST_VIOLATION.store(
        std::env::var_os("STRATA_TEST_SANDBOX_VIOLATION").is_some(),
        Ordering::Relaxed,
    );
    ON.store(true, Ordering::Relaxed);
    tracing::info!("sandbox on: seccomp filters applied (--sandbox off to disable)");
    Ok(())
}

/// Once the command line's images are open and before any other thread
/// starts: confines the process to `reach` with Landlock, then starts the
/// offload pool, so that its threads are confined too. Does nothing with
/// the sandbox off.
pub fn confine(mut reach: landlock::Reach) -> anyhow::Result<()> {
    if !ON.load(Ordering::Relaxed) {
        return Ok(());
    }
    for paths in [&mut reach.dirs, &mut reach.files] {
        paths.sort();
        paths.dedup();
    }
    let reach = &reach;
    let how = landlock::confine(reach)?;
    tracing::info!(
        "sandbox: Landlock {how}: files only under {}",
        reach
            .dirs
            .iter()
            .chain(&reach.files)
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    strata_runtime::offload::start_pool();
    Ok(())
}

/// Narrows the calling queue thread's filter to [`filters::queue`], once
/// per thread. Does nothing with the sandbox off.
pub fn enter_queue_thread() {
    narrow(&[]);
}

/// Narrows an NBD connection's thread as a queue thread's, but for
/// [`filters::NBD_CONNECTION`]: it takes what its socket already holds
/// with one plain receive.
pub fn enter_nbd_connection_thread() {
    narrow(filters::NBD_CONNECTION);
}

/// Applies [`filters::queue`] and `extra` to the calling thread, once.
fn narrow(extra: &[i64]) {
    thread_local! {
        static DONE: Cell<bool> = const { Cell::new(false) };
    }
    if !ON.load(Ordering::Relaxed) || DONE.with(|d| d.replace(true)) {
        return;
    }
    let mut comm = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `comm`; the queue
    // filter that forbids prctl is not applied yet.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    sigsys::QUEUE_THREAD.with(|q| q.set(Some(comm)));
    let queue = filters::queue();
    let refused: Vec<i64> = filters::QUEUE_REFUSED.iter().map(|&(n, _)| n).collect();
    // The refusals first: the allow-list forbids adding filters.
    let res = refuse(filters::QUEUE_REFUSED)
        .and_then(|()| apply(&[queue, refused, extra.to_vec()].concat()));
    if let Err(e) = res {
        // The daemon-wide filter still holds.
        tracing::error!("cannot narrow a queue thread's seccomp filter: {e:#}");
        return;
    }
    if TEST_VIOLATION.load(Ordering::Relaxed) {
        // SAFETY: socket(2) takes no pointers; the filter traps it.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
}

/// Adds a filter that allows `syscalls` and traps the rest.
fn apply(syscalls: &[i64]) -> anyhow::Result<()> {
    // Development aid: log what the lists miss instead of stopping.
    let miss = if std::env::var_os("STRATA_SANDBOX_LOG_ONLY").is_some() {
        SeccompAction::Log
    } else {
        SeccompAction::Trap
    };
    install(syscalls, miss, SeccompAction::Allow)
}

/// Adds a filter that fails each of `calls` with its errno. The kernel
/// takes the strictest verdict of the stacked filters, so these must be
/// allowed below, where they would otherwise trap.
fn refuse(calls: &[(i64, i32)]) -> anyhow::Result<()> {
    for &(n, errno) in calls {
        install(
            &[n],
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
        )?;
    }
    Ok(())
}

fn install(syscalls: &[i64], miss: SeccompAction, hit: SeccompAction) -> anyhow::Result<()> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls.iter().map(|&n| (n, Vec::new())).collect();
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| anyhow!("seccomp: {e:?}"))?;
    let filter = SeccompFilter::new(rules, miss, hit, arch).map_err(|e| anyhow!("seccomp: {e}"))?;
    let prog: BpfProgram = filter.try_into().map_err(|e| anyhow!("seccomp: {e:?}"))?;
    seccompiler::apply_filter(&prog).map_err(|e| anyhow!("seccomp: {e}"))
}
