//! Strata's `rbd` node beside qemu-storage-daemon's (qemu-block-extra) on
//! one one-node Ceph cluster (ci/ceph-cluster): each daemon serves a
//! one-queue vhost-user export of the same filled RBD image, and the
//! harness's libblkio load does 4 KiB random reads and writes at QD1 and
//! QD32. `rbd bench` on the same image shows what the cluster gives a
//! client with no daemon in between.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::load::{self, Outcome};
use crate::suite::{self, Plan, CLIENT_CPU};

/// Requests in flight, per row.
pub const DEPTHS: [usize; 2] = [1, 32];
/// The image: small enough to fill quickly on the OSD's 4 GiB file.
const IMAGE_MIB: u64 = 256;

/// Medians of one workload for both daemons, and `rbd bench`'s IOPS.
pub struct Row {
    /// Writes rather than reads.
    pub write: bool,
    /// Requests in flight.
    pub depth: usize,
    /// Strata's medians.
    pub strata: Outcome,
    /// qemu-storage-daemon's medians.
    pub qsd: Outcome,
    /// `rbd bench` with as many threads as the depth.
    pub direct_iops: f64,
}

/// Whether this machine can run the RBD rows: Ceph's daemons and qsd's rbd
/// driver (qemu-block-extra).
pub fn available() -> bool {
    let has = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    has("ceph-mon")
        && has("ceph-osd")
        && has("rbd")
        && Path::new("/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so").exists()
}

/// The cluster, stopped when dropped.
struct Cluster {
    script: PathBuf,
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> anyhow::Result<Cluster> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ci/ceph-cluster");
        let out = Command::new(&script).arg("start").arg(dir).output()?;
        if !out.status.success() {
            bail!("ci/ceph-cluster: {}", String::from_utf8_lossy(&out.stderr));
        }
        let conf = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .into();
        Ok(Cluster {
            script,
            dir: dir.to_owned(),
            conf,
        })
    }

    fn rbd(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

/// `rbd bench`'s ops/sec for 4 KiB random I/O with `threads` in flight.
fn rbd_bench(c: &Cluster, write: bool, threads: usize, secs: u64) -> anyhow::Result<f64> {
    // rbd bench stops at a byte total: enough for the window at a
    // generous rate, and it reports the rate it reached.
    let total = (4096 * 20_000 * secs).to_string();
    let out = c.rbd(&[
        "bench",
        "--io-type",
        if write { "write" } else { "read" },
        "--io-size",
        "4096",
        "--io-threads",
        &threads.to_string(),
        "--io-total",
        &total,
        "--io-pattern",
        "rand",
        "rbd/bench",
    ])?;
    // "elapsed: 5   ops: 20000   ops/sec: 3950.12   bytes/sec: ..."
    out.lines()
        .find(|l| l.contains("ops/sec:"))
        .and_then(|l| {
            l.split("ops/sec:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no ops/sec in rbd bench's output: {out}"))
}

/// Every workload, `plan.runs` runs per daemon, alternating; each run on a
/// freshly started daemon.
pub fn run(plan: &Plan, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Vec<Row>> {
    load::pin_self(CLIENT_CPU)?;
    let dir = plan.workdir.join("rbd");
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    progress("rbd: starting a one-node Ceph cluster");
    let cluster = Cluster::start(&dir.join("cluster"))?;
    cluster.rbd(&["create", "--size", &format!("{IMAGE_MIB}M"), "rbd/bench"])?;
    // Every object written, so reads reach the OSD rather than being
    // answered as holes from the object map.
    cluster.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4M",
        "--io-pattern",
        "seq",
        "--io-total",
        &format!("{IMAGE_MIB}M"),
        "rbd/bench",
    ])?;
    let node = format!(
        "driver=rbd,node-name=root,pool=rbd,image=bench,conf={}",
        cluster.conf.display()
    );
    let mut rows = Vec::new();
    for write in [false, true] {
        for depth in DEPTHS {
            let label = format!(
                "rbd rand{} 4k QD{depth:<3}",
                if write { "write" } else { "read" }
            );
            let (strata, qsd) = suite::alternating(plan, &label, progress, |_, kind, bin| {
                let b = suite::start_pinned(kind, bin, &dir, std::slice::from_ref(&node), None)?;
                // librbd writes through until it sees the first flush.
                // A guest flushes soon after boot; so does Strata when a
                // frontend leaves (the harness's own probe, for one), so
                // without this the two daemons would be measured in
                // different cache modes.
                load::write_and_flush(&b.socket)?;
                let out = load::run(&b.socket, plan.load(write, depth, false), &|| b.cpu_ns())
                    .with_context(|| format!("{} rbd node {label}", kind.name()));
                // A killed daemon would keep the image's lock from the
                // next one until the cluster gave up on it.
                b.stop();
                out
            })?;
            let direct_iops = rbd_bench(&cluster, write, depth, plan.measure.as_secs().max(1))?;
            progress(&format!("{label} rbd bench: {direct_iops:>9.0} IOPS"));
            rows.push(Row {
                write,
                depth,
                strata,
                qsd,
                direct_iops,
            });
        }
    }
    Ok(rows)
}
