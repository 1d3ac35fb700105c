//! Landlock: once the command line's images are open, the daemon reaches
//! only the directories it works in. A ruleset binds the thread that
//! applies it and the threads it starts later (the kernel syncs it to
//! running threads only from ABI 8), so it is applied on the main thread
//! before any other thread starts: after the images are open, before the
//! exports, monitors and the offload pool.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

/// The newest ABI whose rights we ask for; older kernels get what they
/// have (the crate's best-effort mode).
const ABI: ABI = ABI::V5;

/// Where the daemon may go once confined.
#[derive(Debug, Default)]
pub struct Reach {
    /// Directories with everything beneath them: those of the images, the
    /// sockets and the pid file, and those the operator allows.
    pub dirs: Vec<PathBuf>,
    /// Files alone: images that are devices (a device's directory is
    /// /dev, too much to open up).
    pub files: Vec<PathBuf>,
}

impl Reach {
    /// Adds an image: its directory, or the device node alone.
    pub fn image(&mut self, path: &Path) {
        use std::os::unix::fs::FileTypeExt;
        let device = std::fs::metadata(path)
            .is_ok_and(|m| m.file_type().is_block_device() || m.file_type().is_char_device());
        if device {
            self.files.push(path.to_owned());
        } else {
            self.dir_of(path);
        }
    }

    /// Adds the directory `path` is in.
    pub fn dir_of(&mut self, path: &Path) {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        self.dirs.push(dir);
    }
}

/// Confines the calling thread, and every thread it starts from now on,
/// to `reach` (and reading /proc and /sys). Returns whether the kernel
/// enforces it fully, partly or not at all, in words.
pub fn confine(reach: &Reach) -> anyhow::Result<&'static str> {
    let all = AccessFs::from_all(ABI);
    let file = AccessFs::from_file(ABI);
    let read = AccessFs::from_read(ABI);
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .context("landlock")?
        .create()
        .context("landlock")?;
    for (paths, access) in [(&reach.dirs, all), (&reach.files, file)] {
        for p in paths {
            let fd = PathFd::new(p).with_context(|| format!("landlock: {}", p.display()))?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .with_context(|| format!("landlock: {}", p.display()))?;
        }
    }
    for p in ["/proc", "/sys"] {
        if let Ok(fd) = PathFd::new(p) {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, read))
                .context("landlock")?;
        }
    }
    let status = ruleset.restrict_self().context("landlock")?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partly enforced (an older kernel)",
        RulesetStatus::NotEnforced => "not enforced (the kernel has no Landlock)",
    })
}
