//! The idle daemon: memory and CPU of a backend serving a 1 TiB qcow2
//! with a frontend connected and no I/O.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use blkio::{Blkio, ReqFlags};

use crate::backend::Kind;

/// What an idle backend costs.
#[derive(Clone, Copy, Debug)]
pub struct Idle {
    /// Resident set after the frontend connected and read a little.
    pub rss: u64,
    /// CPU used while idle, as a fraction of one core.
    pub cpu: f64,
}

/// Measures `kind` over `window` of idleness.
pub fn measure(kind: Kind, bin: &Path, dir: &Path, window: Duration) -> anyhow::Result<Idle> {
    std::fs::create_dir_all(dir)?;
    let image = dir.join("big.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1T")
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let blockdevs = [
        format!("driver=file,node-name=file,filename={}", image.display()),
        "driver=qcow2,node-name=root,file=file".to_string(),
    ];
    let backend = crate::suite::start_pinned(kind, bin, dir, &blockdevs, None)?;

    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", backend.socket.to_str().context("socket path")?)?;
    b.connect()?;
    let mut started = b.start()?;
    let q = &mut started.queues[0];
    let capacity = b.get_u64("capacity")?;
    let region = b.alloc_mem_region(4096)?;
    b.map_mem_region(&region)?;
    // Touch metadata across the whole disk, as a booting guest would.
    for i in 0..64u64 {
        let offset = (capacity / 64 * i) & !4095;
        q.read(offset, region.addr as *mut u8, 4096, 0, ReqFlags::empty());
        let mut c = [std::mem::MaybeUninit::uninit()];
        q.do_io(&mut c, 1, None, None)?;
    }

    std::thread::sleep(Duration::from_millis(500));
    let before = backend.cpu_ns();
    std::thread::sleep(window);
    let cpu = (backend.cpu_ns() - before) as f64 / window.as_nanos() as f64;
    Ok(Idle {
        rss: backend.rss(),
        cpu,
    })
}
