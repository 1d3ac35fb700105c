//! `--pidfile`: written under a lock held for the daemon's life, so a
//! second daemon given the same pid file is refused instead of
//! overwriting it (as qemu-storage-daemon does).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// A locked pid file, removed when dropped.
pub struct PidFile {
    _file: File,
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl PidFile {
    /// Locks `path` and writes this process's pid into it.
    pub fn create(path: &Path) -> anyhow::Result<PidFile> {
        let ctx = || format!("cannot write the pid file '{}'", path.display());
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .with_context(ctx)?;
            // SAFETY: flock on a descriptor we own has no memory effects.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                bail!(
                    "cannot lock the pid file '{}': another daemon (pid {}) holds it",
                    path.display(),
                    holder.trim()
                );
            }
            // The holder may have removed the file between our open and
            // our lock: then we locked an orphan, and start over.
            let ours = file.metadata().with_context(ctx)?;
            let id = (ours.dev(), ours.ino());
            if crate::socket::identity(path) != Some(id) {
                continue;
            }
            file.set_len(0).with_context(ctx)?;
            writeln!(file, "{}", std::process::id()).with_context(ctx)?;
            return Ok(PidFile {
                _file: file,
                path: path.into(),
                id: Some(id),
            });
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        crate::socket::remove_if_ours(&self.path, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_is_refused_and_the_first_pid_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.pid");
        let first = PidFile::create(&p).unwrap();
        let e = PidFile::create(&p).err().unwrap().to_string();
        assert!(e.contains("another daemon"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        assert_eq!(
            std::fs::read_to_string(&p).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(first);
        assert!(!p.exists());
        PidFile::create(&p).unwrap();
    }
}
