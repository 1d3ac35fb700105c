//! Multi-queue scaling: the same load on one queue and on two, for both
//! backends. The target is one where the daemon's work per request dwarfs
//! the client's (each 4 KiB read of a zlib-compressed qcow2 inflates a
//! whole 16 KiB cluster), so that even on a machine with no more cores
//! than queues, the client is not what limits the daemon. Clusters this
//! small are inflated on the queue thread itself (larger ones go to the
//! offload pool, which spreads even one queue's work over every core).

use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::backend::{Backend, Kind};
use crate::load::{self, Outcome, Rng};
use crate::suite::{self, Plan};

/// Virtual size of the compressed disk: compressing takes a while.
const SIZE: usize = 256 << 20;
/// Cluster size of the compressed disk.
pub const CLUSTER: usize = 16 << 10;
/// Requests in flight per queue.
pub const DEPTH: usize = 32;

/// Medians for one and for two queues, per backend.
pub struct Scaling {
    /// Strata with one queue, then two.
    pub strata: [Outcome; 2],
    /// qemu-storage-daemon with one queue, then two.
    pub qsd: [Outcome; 2],
    /// Where daemon and client ran, in words.
    pub layout: String,
}

/// Where the daemon and the client threads of a `queues`-queue run go: on
/// a machine with room for both, apart; otherwise client thread `i`
/// shares core `i` with the daemon.
fn placement(cores: usize, queues: usize) -> (String, Vec<Option<usize>>) {
    if cores >= 4 {
        ("0,1".into(), (0..queues).map(|i| Some(2 + i)).collect())
    } else {
        (
            format!("0-{}", cores - 1),
            (0..queues).map(|i| Some(i % cores)).collect(),
        )
    }
}

/// Runs one and two queues on both backends, alternating, `plan.runs`
/// times each.
pub fn run(plan: &Plan, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Scaling> {
    let cores = suite::cores();
    let dirs = [Kind::Strata, Kind::Qsd].map(|k| plan.workdir.join("scaling").join(k.name()));
    prepare(&dirs[0], &dirs[1])?;
    let blockdevs = |dir: &Path| {
        vec![
            format!(
                "driver=file,node-name=file,filename={},aio=io_uring",
                dir.join("disk.qcow2").display()
            ),
            "driver=qcow2,node-name=root,file=file".to_string(),
        ]
    };
    let load = plan.load(false, DEPTH, false);
    let mut samples: [[Vec<Outcome>; 2]; 2] = Default::default();
    let configs = [(0, 1), (1, 1), (0, 2), (1, 2)];
    for run in 0..plan.runs {
        for k in 0..configs.len() {
            // Rotate the order, so drift favours no configuration.
            let (b, queues) = configs[(k + run) % configs.len()];
            let kind = [Kind::Strata, Kind::Qsd][b];
            let bin = [&plan.strata, &plan.qsd][b];
            suite::warm(&dirs[b].join("disk.qcow2"))?;
            let (daemon, clients) = placement(cores, queues);
            let backend = Backend::start(
                kind,
                bin,
                &dirs[b],
                &blockdevs(&dirs[b]),
                None,
                &daemon,
                queues,
            )?;
            let o = load::run_queues(&backend.socket, load, &clients, &|| backend.cpu_ns())
                .with_context(|| format!("{} with {queues} queues", kind.name()))?;
            progress(&format!(
                "scaling    {queues} queue(s)           {:<6} run {}: {:>9.0} IOPS  cpu {:>6.0} ns/req",
                kind.name(),
                run + 1,
                o.iops,
                o.cpu_ns
            ));
            samples[b][queues - 1].push(o);
        }
    }
    let medians = |s: &[Vec<Outcome>; 2]| [suite::median(&s[0]), suite::median(&s[1])];
    let (daemon, clients) = placement(cores, 2);
    let clients: Vec<_> = clients.iter().flatten().map(|c| c.to_string()).collect();
    Ok(Scaling {
        strata: medians(&samples[0]),
        qsd: medians(&samples[1]),
        layout: format!(
            "daemon on cpus {daemon}, client queue threads on cpus {}",
            clients.join(", ")
        ),
    })
}

/// Writes compressible data (random letters from a 16-letter alphabet:
/// about half the size once compressed), compresses it into a qcow2 in
/// `dir`, and copies that to `copy_to` for the other backend.
fn prepare(dir: &Path, copy_to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::create_dir_all(copy_to)?;
    let raw = dir.join("data.raw");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&raw)?);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..SIZE / block.len() {
        for b in block.iter_mut() {
            *b = b'a' + (rng.next() >> 60) as u8;
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    drop(f);
    let image = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o"])
        .arg(format!("cluster_size={CLUSTER}"))
        .arg(&raw)
        .arg(&image)
        .output()
        .context("running qemu-img convert")?;
    std::fs::remove_file(&raw)?;
    if !out.status.success() {
        bail!(
            "qemu-img convert -c failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::copy(&image, copy_to.join("disk.qcow2"))?;
    Ok(())
}
