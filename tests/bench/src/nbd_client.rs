//! Strata's `nbd` node beside qemu-storage-daemon's: each daemon serves a
//! vhost-user export of an `nbd` node on the same qemu-nbd (a raw file in
//! the page cache, qemu-nbd on the client's core), and the harness's
//! libblkio load reads it at QD1 and QD32. The daemons alternate, as in
//! the main matrix.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::load::{self, Outcome};
use crate::suite::{self, Plan, CLIENT_CPU};

/// Requests in flight, per row.
pub const DEPTHS: [usize; 2] = [1, 32];

/// Medians of one depth for both daemons.
pub struct Row {
    /// Requests in flight.
    pub depth: usize,
    /// Strata's medians.
    pub strata: Outcome,
    /// qemu-storage-daemon's medians.
    pub qsd: Outcome,
}

/// qemu-nbd, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(img: &Path, sock: &Path) -> anyhow::Result<Server> {
    let _ = std::fs::remove_file(sock);
    let child = Command::new("taskset")
        .args([
            "-c",
            &CLIENT_CPU.to_string(),
            "qemu-nbd",
            "-f",
            "raw",
            "-x",
            "disk",
        ])
        .args([
            "--persistent",
            "--shared=4",
            "--cache=writeback",
            "--aio=threads",
        ])
        .arg("-k")
        .arg(sock)
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-nbd")?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if Instant::now() > deadline {
            bail!("qemu-nbd did not listen on {}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// Every depth, `plan.runs` runs per daemon, alternating; each run on a
/// fresh qemu-nbd and a fresh daemon.
pub fn run(plan: &Plan, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Vec<Row>> {
    load::pin_self(CLIENT_CPU)?;
    let dir = plan.workdir.join("nbd-client");
    std::fs::create_dir_all(&dir)?;
    // qemu-nbd takes only an absolute socket path.
    let dir = std::fs::canonicalize(&dir)?;
    let img = dir.join("disk.raw");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw", "-o", "preallocation=full"])
        .arg(&img)
        .arg("1G")
        .output()?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let sock = dir.join("qemu-nbd.sock");
    let node = format!(
        "driver=nbd,node-name=root,server.type=unix,server.path={},export=disk",
        sock.display()
    );
    let mut rows = Vec::new();
    for depth in DEPTHS {
        let label = format!("nbd-client randread 4k QD{depth:<3}");
        let (strata, qsd) = suite::alternating(plan, &label, progress, |_, kind, bin| {
            suite::warm(&img)?;
            let _server = qemu_nbd(&img, &sock)?;
            let b = suite::start_pinned(kind, bin, &dir, std::slice::from_ref(&node), None)?;
            load::run(&b.socket, plan.load(false, depth, false), &|| b.cpu_ns())
                .with_context(|| format!("{} nbd node QD{depth}", kind.name()))
        })?;
        rows.push(Row { depth, strata, qsd });
    }
    Ok(rows)
}
