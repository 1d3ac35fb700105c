//! The benchmark matrix: every (target, workload) cell run on both
//! backends in alternation, with medians taken over the runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::backend::{Backend, Kind};
use crate::load::{self, Load, Outcome};
use crate::target::Target;

/// The core the daemon runs on; the client takes the other.
pub const DAEMON_CPU: usize = 0;
/// The core the client runs on.
pub const CLIENT_CPU: usize = 1;
/// `poll-max-ns` given to both backends in poll mode (QEMU's default).
pub const POLL_MAX_NS: u64 = 32768;

/// One workload: direction, depth and completion mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Random writes rather than reads.
    pub write: bool,
    /// Queue depth.
    pub depth: usize,
    /// Poll mode on both sides.
    pub poll: bool,
}

impl Workload {
    /// A short label such as `randread QD32 poll`.
    pub fn label(self) -> String {
        format!(
            "{} QD{}{}",
            if self.write { "randwrite" } else { "randread" },
            self.depth,
            if self.poll { " poll" } else { "" }
        )
    }

    /// QD1, 32 and 128 in interrupt mode and QD32 polled, reads then
    /// writes; reads also at QD1 polled, for the latency goal.
    pub fn all() -> Vec<Workload> {
        let mut out = Vec::new();
        for write in [false, true] {
            for (depth, poll) in [(1, false), (32, false), (128, false), (1, true), (32, true)] {
                if !(write && depth == 1 && poll) {
                    out.push(Workload { write, depth, poll });
                }
            }
        }
        out
    }
}

/// How the suite runs.
#[derive(Clone)]
pub struct Plan {
    /// The strata binary.
    pub strata: PathBuf,
    /// The qemu-storage-daemon binary.
    pub qsd: PathBuf,
    /// Targets to run.
    pub targets: Vec<Target>,
    /// Workloads to run on each target.
    pub workloads: Vec<Workload>,
    /// Runs per backend per cell; the median is reported.
    pub runs: usize,
    /// Unmeasured time at the start of each run.
    pub warmup: Duration,
    /// Measured time of each run.
    pub measure: Duration,
    /// Where images go (must not be tmpfs, for O_DIRECT).
    pub workdir: PathBuf,
}

impl Plan {
    /// One run's load: 4 KiB requests kept `depth` deep, timed as the plan
    /// says.
    pub fn load(&self, write: bool, depth: usize, poll: bool) -> Load {
        Load {
            write,
            depth,
            poll,
            warmup: self.warmup,
            measure: self.measure,
        }
    }
}

/// A one-queue export of `blockdevs` (the last is exported) on
/// [`DAEMON_CPU`], with `iothread`'s poll-max-ns when given.
pub fn start_pinned(
    kind: Kind,
    bin: &Path,
    dir: &Path,
    blockdevs: &[String],
    iothread: Option<u64>,
) -> anyhow::Result<Backend> {
    Backend::start(
        kind,
        bin,
        dir,
        blockdevs,
        iothread,
        &DAEMON_CPU.to_string(),
        1,
    )
}

/// The medians of one cell for both backends.
#[derive(Clone, Debug)]
pub struct Cell {
    /// The disk.
    pub target: Target,
    /// The load.
    pub workload: Workload,
    /// Strata's medians.
    pub strata: Outcome,
    /// qemu-storage-daemon's medians.
    pub qsd: Outcome,
}

/// Runs the whole matrix, reporting each run to `progress`.
pub fn run(plan: &Plan, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Vec<Cell>> {
    load::pin_self(CLIENT_CPU)?;
    let mut cells = Vec::new();
    for &target in &plan.targets {
        let dirs =
            [Kind::Strata, Kind::Qsd].map(|k| plan.workdir.join(target.name()).join(k.name()));
        let blockdevs = dirs
            .iter()
            .map(|d| target.prepare(d))
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("preparing target {}", target.name()))?;
        for &workload in &plan.workloads {
            let mut samples: [Vec<Outcome>; 2] = Default::default();
            for run in 0..plan.runs {
                // Alternate which backend goes first, so drift in the
                // machine's state does not favour one of them.
                let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    let kind = [Kind::Strata, Kind::Qsd][i];
                    let bin = if kind == Kind::Strata {
                        &plan.strata
                    } else {
                        &plan.qsd
                    };
                    let o = one(plan, target, workload, kind, bin, &dirs[i], &blockdevs[i])
                        .with_context(|| {
                            format!("{} on {} {}", kind.name(), target.name(), workload.label())
                        })?;
                    progress(&format!(
                        "{:<10} {:<20} {:<6} run {}: {:>9.0} IOPS  mean {:>7.1} us  p99 {:>7.1} us  cpu {:>6.0} ns/req",
                        target.name(),
                        workload.label(),
                        kind.name(),
                        run + 1,
                        o.iops,
                        o.mean_us,
                        o.p99_us,
                        o.cpu_ns
                    ));
                    samples[i].push(o);
                }
            }
            cells.push(Cell {
                target,
                workload,
                strata: median(&samples[0]),
                qsd: median(&samples[1]),
            });
        }
    }
    Ok(cells)
}

/// One run of one backend on one cell, on a freshly started daemon.
pub fn one(
    plan: &Plan,
    target: Target,
    workload: Workload,
    kind: Kind,
    bin: &Path,
    dir: &Path,
    blockdevs: &[String],
) -> anyhow::Result<Outcome> {
    let backend = start(target, workload.poll, kind, bin, dir, blockdevs)?;
    let load = plan.load(workload.write, workload.depth, workload.poll);
    load::run(&backend.socket, load, &|| backend.cpu_ns())
}

/// Resets and warms `target`'s images in `dir`, then starts a one-queue
/// daemon on them, pinned to [`DAEMON_CPU`] (in an iothread when `poll`).
pub fn start(
    target: Target,
    poll: bool,
    kind: Kind,
    bin: &Path,
    dir: &Path,
    blockdevs: &[String],
) -> anyhow::Result<Backend> {
    if target.needs_reset() {
        target.reset(dir)?;
    }
    for f in target.files(dir) {
        warm(&f)?;
    }
    start_pinned(kind, bin, dir, blockdevs, poll.then_some(POLL_MAX_NS))
}

/// The machine's cores (not those this thread may run on: the harness
/// pins itself).
pub fn cores() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count()
        .max(1)
}

/// Writes `path`'s dirty pages back, so the flusher does not compete with
/// the run, then reads it once so its pages are cached.
pub fn warm(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path)?;
    f.sync_all()?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// Runs `one(i, kind, bin, run)` `plan.runs` times for Strata (`i` 0)
/// and qsd (`i` 1), alternating which goes first, logs each run as
/// `label` says, and returns both medians.
pub fn alternating(
    plan: &Plan,
    label: &str,
    progress: &mut dyn FnMut(&str),
    mut one: impl FnMut(usize, Kind, &Path) -> anyhow::Result<Outcome>,
) -> anyhow::Result<(Outcome, Outcome)> {
    let kinds = [Kind::Strata, Kind::Qsd];
    let mut samples: [Vec<Outcome>; 2] = Default::default();
    for run in 0..plan.runs {
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let bin = if kinds[i] == Kind::Qsd {
                &plan.qsd
            } else {
                &plan.strata
            };
            let o = one(i, kinds[i], bin)?;
            progress(&format!(
                "{label} {:<6} run {}: {:>9.0} IOPS  mean {:>7.1} us  cpu {:>6.0} ns/req",
                kinds[i].name(),
                run + 1,
                o.iops,
                o.mean_us,
                o.cpu_ns
            ));
            samples[i].push(o);
        }
    }
    Ok((median(&samples[0]), median(&samples[1])))
}

/// Each field's median over the runs.
pub fn median(runs: &[Outcome]) -> Outcome {
    let m = |f: fn(&Outcome) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    Outcome {
        iops: m(|o| o.iops),
        mean_us: m(|o| o.mean_us),
        p99_us: m(|o| o.p99_us),
        cpu_ns: m(|o| o.cpu_ns),
    }
}
