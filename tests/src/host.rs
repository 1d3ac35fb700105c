//! The host's own tools, for tests that need a real full disk: commands
//! that must succeed, and a small tmpfs that can be grown. Needs root.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `cmd args`, which must succeed; returns its trimmed stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A tmpfs of a given size, mounted under a test's directory and
/// unmounted when dropped.
pub struct Tmpfs {
    /// Where it is mounted.
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: "4M") at `dir/name`.
    pub fn mount(dir: &Path, name: &str, size: &str) -> Tmpfs {
        let path = dir.join(name);
        std::fs::create_dir(&path).unwrap();
        let opts = format!("size={size}");
        sh(
            "mount",
            &["-t", "tmpfs", "-o", &opts, "tmpfs", path.to_str().unwrap()],
        );
        Tmpfs { path }
    }

    /// Grows (or shrinks) it to `size`, in place.
    pub fn resize(&self, size: &str) {
        let opts = format!("remount,size={size}");
        sh("mount", &["-o", &opts, self.path.to_str().unwrap()]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
