//! Setting up a serving daemon as a process: its umask and where its log
//! goes.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::cli::ProcessArgs;

const JOURNALD: &str = "/run/systemd/journal/socket";

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logging to stderr, for the image tools and start-up errors.
pub fn log_to_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Sets umask 077, so nothing the daemon creates (sockets, images, the
/// pid file) is ever readable by others unless asked for, and sends the
/// log where `args` says: `--log-file`, or for a daemon that detaches
/// from its terminal, journald. Returns the log file, which a detaching
/// daemon puts on its stdout and stderr once it is up.
pub fn setup(args: &ProcessArgs, daemonize: bool) -> anyhow::Result<Option<File>> {
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    if let Some(path) = &args.log_file {
        let file = open_log(path)?;
        if !daemonize {
            redirect_stdio(&file);
        }
        // Straight to the file: until a detaching daemon is up, its stderr
        // is still the terminal, kept for start-up errors.
        let writer = std::sync::Mutex::new(file.try_clone().context("--log-file")?);
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(writer)
            .with_ansi(false)
            .try_init()
            .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
        return Ok(Some(file));
    }
    if daemonize && Path::new(JOURNALD).exists() {
        let journald = tracing_journald::layer().context("cannot connect to journald")?;
        tracing_subscriber::registry()
            .with(filter())
            .with(journald)
            .try_init()
            .context("cannot set up logging")?;
        return Ok(None);
    }
    log_to_stderr();
    if daemonize {
        tracing::warn!(
            "--daemonize without --log-file and without journald: once up, the daemon's log \
             is discarded, as qemu-storage-daemon's is. Pass --log-file to keep it."
        );
    }
    Ok(None)
}

fn open_log(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("--log-file: cannot open '{}'", path.display()))
}

/// Puts `file` on the process's stdout and stderr: the log, and anything a
/// panic prints, go there.
pub fn redirect_stdio(file: &File) {
    for fd in [1, 2] {
        // SAFETY: dup2 onto our own standard descriptors.
        unsafe { libc::dup2(file.as_raw_fd(), fd) };
    }
}

/// Hands the heap that start-up used and freed (option parsing, the
/// seccomp filters' compilation, the images' probing) back to the kernel,
/// so each of hundreds of idle daemons keeps only what it still holds.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of glibc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}
