//! `strata-bench`: Strata beside qemu-storage-daemon, driven by libblkio
//! with no guest, every figure a ratio measured in the same run.

mod backend;
mod chart;
mod density;
mod idle;
mod load;
mod migration_cost;
mod nbd_client;
mod nbd_export;
mod nbd_floor;
mod rbd;
mod report;
mod sandbox_cost;
mod scaling;
mod suite;
mod target;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;

use crate::backend::Kind;
use crate::suite::{Plan, Workload};
use crate::target::Target;

/// Benchmarks Strata against qemu-storage-daemon with identical settings
/// and writes the table to BENCHMARKS.md with a chart.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The strata binary.
    #[arg(long, default_value = "target/release/strata")]
    strata: PathBuf,
    /// The qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// Targets, comma-separated: null, raw, raw-direct, qcow2, overlay.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "null,raw,raw-direct,qcow2,overlay"
    )]
    targets: Vec<String>,
    /// Only random reads.
    #[arg(long)]
    reads_only: bool,
    /// Runs per backend per cell (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Unmeasured seconds at the start of each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Where images are created (not tmpfs: one target uses O_DIRECT).
    #[arg(long, default_value = "target/bench")]
    workdir: PathBuf,
    /// The markdown file whose generated section is replaced.
    #[arg(long, default_value = "BENCHMARKS.md")]
    markdown: PathBuf,
    /// The chart.
    #[arg(long, default_value = "docs/benchmarks.png")]
    chart: PathBuf,
    /// Skip the idle-daemon memory and CPU measurement.
    #[arg(long)]
    no_idle: bool,
    /// Skip the multi-queue scaling measurement.
    #[arg(long)]
    no_scaling: bool,
    /// Skip the sandbox's cost (Strata with --sandbox on against off).
    #[arg(long)]
    no_sandbox: bool,
    /// Skip the cost of the inflight region and of dirty logging (Strata
    /// against itself).
    #[arg(long)]
    no_migration: bool,
    /// Only the cost of the inflight region and of dirty logging: replaces
    /// just that part of BENCHMARKS.md.
    #[arg(long)]
    migration_only: bool,
    /// Skip the density and start-up measurement (100 daemons of each).
    #[arg(long)]
    no_density: bool,
    /// Only the density and start-up measurement: replaces just that
    /// part of BENCHMARKS.md.
    #[arg(long)]
    density_only: bool,
    /// Skip the NBD export and the NBD client node against qsd's.
    #[arg(long)]
    no_nbd: bool,
    /// Only the NBD export against qsd's: replaces just that part of
    /// BENCHMARKS.md.
    #[arg(long)]
    nbd_only: bool,
    /// Skip the RBD node against qsd's (it starts a one-node Ceph cluster).
    #[arg(long)]
    no_rbd: bool,
    /// Only the RBD node against qsd's: replaces just that part of
    /// BENCHMARKS.md.
    #[arg(long)]
    rbd_only: bool,
    /// Serve the no-work NBD server at this socket until killed (the
    /// NBD rows start it so).
    #[arg(long, value_name = "SOCKET", hide = true)]
    nbd_floor: Option<PathBuf>,
    /// Drive an already running backend at this vhost-user socket with one
    /// load (--depth, --write, --poll, --secs) and print what it did; for
    /// profiling.
    #[arg(long, value_name = "SOCKET")]
    client: Option<PathBuf>,
    /// Queue depth of --client.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// Random writes instead of reads, for --client.
    #[arg(long)]
    write: bool,
    /// A polled queue, for --client.
    #[arg(long)]
    poll: bool,
    /// Queues driven by --client, a thread each (unpinned when more than
    /// one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    queues: u16,
    /// A few seconds that prove the harness works (null, QD32 reads, one
    /// short run); says nothing about speed. Output goes under --workdir.
    #[arg(long)]
    smoke: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(socket) = &args.nbd_floor {
        return nbd_floor::serve(socket, 1 << 30);
    }
    if let Some(socket) = &args.client {
        if args.queues == 1 {
            load::pin_self(suite::CLIENT_CPU)?;
        }
        let load = load::Load {
            write: args.write,
            depth: args.depth,
            poll: args.poll,
            warmup: secs("--warmup", args.warmup)?,
            measure: secs("--secs", args.secs)?,
        };
        let cpus = vec![None; args.queues.into()];
        let o = load::run_queues(socket, load, &cpus, &|| 0)?;
        println!(
            "{:.0} IOPS, mean {:.1} us, p99 {:.1} us",
            o.iops, o.mean_us, o.p99_us
        );
        return Ok(());
    }
    let mut plan = Plan {
        strata: args.strata.clone(),
        qsd: args.qsd.clone(),
        targets: args
            .targets
            .iter()
            .map(|t| Target::parse(t))
            .collect::<anyhow::Result<_>>()?,
        workloads: Workload::all()
            .into_iter()
            .filter(|w| !(args.reads_only && w.write))
            .collect(),
        runs: args.runs,
        warmup: secs("--warmup", args.warmup)?,
        measure: secs("--secs", args.secs)?,
        workdir: args.workdir.clone(),
    };
    if plan.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (mut markdown, mut chart_path) = (args.markdown.clone(), args.chart.clone());
    let mut idle_window = Duration::from_secs(5);
    if args.smoke {
        plan.targets = vec![Target::Null];
        plan.workloads = vec![Workload {
            write: false,
            depth: 32,
            poll: false,
        }];
        plan.runs = 1;
        plan.warmup = Duration::from_millis(300);
        plan.measure = Duration::from_secs(1);
        idle_window = Duration::from_secs(1);
        markdown = plan.workdir.join("BENCHMARKS.md");
        chart_path = plan.workdir.join("benchmarks.png");
    }
    for bin in [&plan.strata, &plan.qsd] {
        which(bin)?;
    }
    std::fs::create_dir_all(&plan.workdir)
        .with_context(|| format!("creating {}", plan.workdir.display()))?;

    let only = args.migration_only || args.nbd_only || args.density_only || args.rbd_only;
    let cells = if only {
        Vec::new()
    } else {
        suite::run(&plan, &mut |line| eprintln!("{line}"))?
    };
    let mut extras = report::Extras::default();
    if !(args.no_idle || only) {
        let dir = |k: Kind| plan.workdir.join("idle").join(k.name());
        extras.idle = Some(report::IdlePair {
            strata: idle::measure(Kind::Strata, &plan.strata, &dir(Kind::Strata), idle_window)?,
            qsd: idle::measure(Kind::Qsd, &plan.qsd, &dir(Kind::Qsd), idle_window)?,
        });
    }
    if !(args.no_scaling || args.smoke || only) {
        extras.scaling = Some(scaling::run(&plan, &mut |line| eprintln!("{line}"))?);
    }
    if !(args.no_sandbox || args.smoke || only) {
        extras.sandbox = Some(sandbox_cost::run(&plan, &mut |line| eprintln!("{line}"))?);
    }
    let migration =
        if args.no_migration || args.smoke || args.nbd_only || args.density_only || args.rbd_only {
            None
        } else {
            Some(migration_cost::run(&plan, &mut |line| eprintln!("{line}"))?)
        };
    let nbd =
        if args.no_nbd || args.smoke || args.migration_only || args.density_only || args.rbd_only {
            None
        } else if !nbd_export::available() {
            eprintln!("skipping the NBD rows: this fio has no nbd engine");
            None
        } else {
            Some(nbd_export::run(&plan, &mut |line| eprintln!("{line}"))?)
        };
    let nbd_client =
        if args.no_nbd || args.smoke || args.migration_only || args.density_only || args.rbd_only {
            None
        } else {
            Some(nbd_client::run(&plan, &mut |line| eprintln!("{line}"))?)
        };
    let rbd = if args.no_rbd || args.smoke || (only && !args.rbd_only) {
        None
    } else if !rbd::available() {
        eprintln!("skipping the RBD rows: no Ceph daemons or no qemu-block-extra here");
        None
    } else {
        Some(rbd::run(&plan, &mut |line| eprintln!("{line}"))?)
    };
    let density_window = Duration::from_secs(60);
    let density = if args.no_density || args.smoke || (only && !args.density_only) {
        None
    } else {
        let dir = plan.workdir.join("density");
        let mut p = |line: &str| eprintln!("{line}");
        let strata = density::measure(Kind::Strata, &plan.strata, &dir, density_window, &mut p)?;
        let qsd = density::measure(Kind::Qsd, &plan.qsd, &dir, density_window, &mut p)?;
        Some((strata, qsd))
    };

    let date = date();
    let mut doc = std::fs::read_to_string(&markdown).unwrap_or_else(|_| "# Benchmarks\n".into());
    if let Some(rows) = &migration {
        let section = report::migration_markdown(&plan, rows, &date);
        println!("{section}");
        doc = report::splice(
            &doc,
            &section,
            report::MIGRATION_BEGIN,
            report::MIGRATION_END,
        );
    }
    if let Some((strata, qsd)) = &density {
        let section = report::density_markdown(&plan, strata, qsd, density_window, &date);
        println!("{section}");
        doc = report::splice(&doc, &section, report::DENSITY_BEGIN, report::DENSITY_END);
    }
    if let Some(rows) = &nbd {
        let section = report::nbd_markdown(&plan, rows, &date);
        println!("{section}");
        doc = report::splice(&doc, &section, report::NBD_BEGIN, report::NBD_END);
    }
    if let Some(rows) = &nbd_client {
        let section = report::nbd_client_markdown(&plan, rows, &date);
        println!("{section}");
        doc = report::splice(
            &doc,
            &section,
            report::NBD_CLIENT_BEGIN,
            report::NBD_CLIENT_END,
        );
    }
    if let Some(rows) = &rbd {
        let section = report::rbd_markdown(&plan, rows, &date);
        println!("{section}");
        doc = report::splice(&doc, &section, report::RBD_BEGIN, report::RBD_END);
    }
    if only {
        std::fs::write(&markdown, doc)
            .with_context(|| format!("writing {}", markdown.display()))?;
        eprintln!("wrote {}", markdown.display());
        return Ok(());
    }
    let section = report::markdown(&plan, &cells, &extras, &date);
    println!("{section}");
    doc = report::splice(&doc, &section, report::BEGIN, report::END);
    std::fs::write(&markdown, doc).with_context(|| format!("writing {}", markdown.display()))?;
    if let Some(dir) = chart_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    chart::draw(&cells, &chart_path)?;
    eprintln!("wrote {} and {}", markdown.display(), chart_path.display());

    if args.smoke {
        for c in &cells {
            if !(c.strata.iops > 0.0 && c.qsd.iops > 0.0) {
                bail!("smoke run measured no I/O on {}", c.target.name());
            }
        }
    }
    Ok(())
}

fn secs(flag: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{flag} {v}: not a number of seconds"))
}

/// Fails with a clear message when `bin` cannot be run.
fn which(bin: &std::path::Path) -> anyhow::Result<()> {
    match std::process::Command::new(bin).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "{} --version failed: {}",
            bin.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => bail!("cannot run {}: {e}", bin.display()),
    }
}

/// Today's date, UTC, as YYYY-MM-DD.
fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown date".into(), |s| s.trim().to_string())
}
