//! The disks benchmarked: each prepares its images and spells its graph as
//! `--blockdev` options that Strata and qemu-storage-daemon both accept.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// Virtual size of every file-backed disk.
pub const DISK_SIZE: &str = "1G";

/// A benchmark target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// null-co that does not zero its reads: the pure cost of the path.
    Null,
    /// A raw file read and written through the page cache.
    RawCached,
    /// A raw file with O_DIRECT, on the root filesystem (not tmpfs).
    RawDirect,
    /// A fully allocated qcow2 with 64 KiB clusters, page cache.
    Qcow2,
    /// An empty qcow2 overlay over a full raw base: reads fall through.
    Overlay,
}

impl Target {
    /// Every target, in table order.
    pub const ALL: [Target; 5] = [
        Target::Null,
        Target::RawCached,
        Target::RawDirect,
        Target::Qcow2,
        Target::Overlay,
    ];

    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Target::Null => "null",
            Target::RawCached => "raw",
            Target::RawDirect => "raw-direct",
            Target::Qcow2 => "qcow2",
            Target::Overlay => "overlay",
        }
    }

    /// Parses a name given by [`Target::name`].
    pub fn parse(s: &str) -> anyhow::Result<Target> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .with_context(|| {
                let names: Vec<_> = Target::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "unknown target '{s}' (expected one of {})",
                    names.join(", ")
                )
            })
    }

    /// Creates this target's images in `dir` (a private copy per backend,
    /// since both daemons lock what they open) and returns the blockdevs;
    /// the exported node is always named `root`.
    pub fn prepare(self, dir: &Path) -> anyhow::Result<Vec<String>> {
        std::fs::create_dir_all(dir)?;
        let file = |name: &str, direct: bool| {
            format!(
                "driver=file,node-name=file,filename={},cache.direct={},aio=io_uring",
                dir.join(name).display(),
                if direct { "on" } else { "off" }
            )
        };
        Ok(match self {
            Target::Null => {
                vec![format!(
                    "driver=null-co,node-name=root,size={},read-zeroes=off",
                    1u64 << 30
                )]
            }
            Target::RawCached | Target::RawDirect => {
                qemu_img(
                    &["create", "-q", "-f", "raw", "-o", "preallocation=full"],
                    dir,
                    "disk.raw",
                )?;
                vec![
                    file("disk.raw", self == Target::RawDirect),
                    "driver=raw,node-name=root,file=file".into(),
                ]
            }
            Target::Qcow2 => {
                qemu_img(
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        "cluster_size=65536,preallocation=full",
                    ],
                    dir,
                    "disk.qcow2",
                )?;
                vec![
                    file("disk.qcow2", false),
                    "driver=qcow2,node-name=root,file=file".into(),
                ]
            }
            Target::Overlay => {
                qemu_img(
                    &["create", "-q", "-f", "raw", "-o", "preallocation=full"],
                    dir,
                    "base.raw",
                )?;
                self.reset(dir)?;
                vec![
                    file("base.raw", false).replace("node-name=file", "node-name=base-file"),
                    "driver=raw,node-name=base,file=base-file".into(),
                    file("overlay.qcow2", false),
                    "driver=qcow2,node-name=root,file=file,backing=base".into(),
                ]
            }
        })
    }

    /// Puts the images back to their starting state before a run, where
    /// an earlier run's writes would change what is measured (the
    /// overlay's allocations). The daemon must not have them open.
    pub fn reset(self, dir: &Path) -> anyhow::Result<()> {
        if self == Target::Overlay {
            qemu_img(
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=65536",
                    "-b",
                    "base.raw",
                    "-F",
                    "raw",
                ],
                dir,
                "overlay.qcow2",
            )?;
        }
        Ok(())
    }

    /// Whether writes change the layout later runs see.
    pub fn needs_reset(self) -> bool {
        self == Target::Overlay
    }

    /// Files whose pages should be cached before a page-cache run.
    pub fn files(self, dir: &Path) -> Vec<PathBuf> {
        let names: &[&str] = match self {
            Target::Null | Target::RawDirect => &[],
            Target::RawCached => &["disk.raw"],
            Target::Qcow2 => &["disk.qcow2"],
            Target::Overlay => &["base.raw", "overlay.qcow2"],
        };
        names.iter().map(|n| dir.join(n)).collect()
    }
}

/// Runs `qemu-img ARGS NAME DISK_SIZE` in `dir`.
fn qemu_img(args: &[&str], dir: &Path, name: &str) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(name)
        .arg(DISK_SIZE)
        .current_dir(dir)
        .output()
        .context("running qemu-img (is qemu-utils installed?)")?;
    if !out.status.success() {
        bail!(
            "qemu-img {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Preallocation leaves a gigabyte of dirty pages: write them back now
    // rather than during the first runs.
    std::fs::File::open(dir.join(name))
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {name}"))
}
