//! Strata's NBD export beside qemu-storage-daemon's, driven by fio's `nbd`
//! engine (libnbd) over a unix socket: 4 KiB random reads at QD1 and QD32
//! and 1 MiB sequential reads, on null and raw, the two daemons
//! alternating as in the main matrix.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::backend::{Backend, Kind};
use crate::load::Outcome;
use crate::suite::{self, Plan, CLIENT_CPU, DAEMON_CPU};
use crate::target::Target;

/// One fio job: block size, depth, random or sequential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Job {
    /// Block size in bytes.
    pub bs: u32,
    /// Requests in flight.
    pub depth: u32,
    /// Random rather than sequential.
    pub random: bool,
}

impl Job {
    /// The jobs measured.
    pub const ALL: [Job; 3] = [
        Job {
            bs: 4096,
            depth: 1,
            random: true,
        },
        Job {
            bs: 4096,
            depth: 32,
            random: true,
        },
        Job {
            bs: 1 << 20,
            depth: 4,
            random: false,
        },
    ];

    /// A label such as `randread 4k QD32`.
    pub fn label(self) -> String {
        let size = if self.bs >= 1 << 20 {
            format!("{}M", self.bs >> 20)
        } else {
            format!("{}k", self.bs >> 10)
        };
        let rw = if self.random { "randread" } else { "read" };
        format!("{rw} {size} QD{}", self.depth)
    }
}

/// The targets measured.
pub const TARGETS: [Target; 2] = [Target::Null, Target::RawCached];

/// Medians of one (target, job) cell for both daemons.
pub struct Row {
    /// The disk.
    pub target: Target,
    /// The load.
    pub job: Job,
    /// Strata's medians.
    pub strata: Outcome,
    /// qemu-storage-daemon's medians.
    pub qsd: Outcome,
    /// The no-work server's medians for the same job: the most the client
    /// reaches.
    pub floor: Outcome,
}

/// Every cell, `plan.runs` runs per daemon, alternating.
pub fn run(plan: &Plan, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Vec<Row>> {
    let kinds = [Kind::Strata, Kind::Qsd];
    let mut rows: Vec<Row> = Vec::new();
    for target in TARGETS {
        let dirs = kinds.map(|k| plan.workdir.join("nbd").join(target.name()).join(k.name()));
        let blockdevs = dirs
            .iter()
            .map(|d| target.prepare(d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for job in Job::ALL {
            let label = format!("nbd        {:<10} {:<20}", target.name(), job.label());
            let (strata, qsd) = suite::alternating(plan, &label, progress, |i, kind, bin| {
                for f in target.files(&dirs[i]) {
                    suite::warm(&f)?;
                }
                let b = Backend::start_nbd(
                    kind,
                    bin,
                    &dirs[i],
                    &blockdevs[i],
                    &DAEMON_CPU.to_string(),
                )?;
                fio(&b, job, plan.warmup, plan.measure).with_context(|| {
                    format!("{} NBD on {} {}", kind.name(), target.name(), job.label())
                })
            })?;
            // The no-work server serves zeroes whatever the target, so it
            // is measured once per job.
            let floor = match rows.iter().find(|r| r.job == job) {
                Some(r) => r.floor,
                None => no_work(plan, &dirs[0], job, progress)?,
            };
            rows.push(Row {
                target,
                job,
                strata,
                qsd,
                floor,
            });
        }
    }
    Ok(rows)
}

/// The median of `plan.runs` runs of `job` against the no-work server.
fn no_work(
    plan: &Plan,
    dir: &std::path::Path,
    job: Job,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Outcome> {
    let mut runs = Vec::new();
    for run in 0..plan.runs {
        let b = Backend::start_nbd_floor(dir, &DAEMON_CPU.to_string())?;
        let o = fio(&b, job, plan.warmup, plan.measure)
            .with_context(|| format!("the no-work NBD server on {}", job.label()))?;
        progress(&format!(
            "nbd        no-work    {:<20} run {}: {:>9.0} IOPS  mean {:>7.1} us",
            job.label(),
            run + 1,
            o.iops,
            o.mean_us
        ));
        runs.push(o);
    }
    Ok(suite::median(&runs))
}

/// One fio run against the backend's export: `warmup` unmeasured, then
/// `measure`. The daemon's CPU is taken over the measured part.
fn fio(b: &Backend, job: Job, warmup: Duration, measure: Duration) -> anyhow::Result<Outcome> {
    let uri = format!("nbd+unix:///disk?socket={}", b.socket.display());
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &CLIENT_CPU.to_string(), "fio", "--output-format=json"])
        .arg("--name=nbd")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!(
            "--rw={}",
            if job.random { "randread" } else { "read" }
        ))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.depth))
        .arg("--size=1g")
        .arg("--time_based")
        .arg(format!("--ramp_time={}ms", warmup.as_millis()))
        .arg(format!("--runtime={}ms", measure.as_millis()));
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running fio (its nbd engine needs libnbd)")?;
    std::thread::sleep(warmup);
    let cpu_start = b.cpu_ns();
    let out = child.wait_with_output()?;
    let cpu = b.cpu_ns() - cpu_start;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON.
    let json: Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .with_context(|| format!("fio's output: {text}"))?;
    let read = &json["jobs"][0]["read"];
    let iops = read["iops"].as_f64().context("fio's read iops")?;
    let ios = read["total_ios"].as_f64().unwrap_or(0.0);
    Ok(Outcome {
        iops,
        mean_us: read["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1e3,
        p99_us: read["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e3,
        cpu_ns: cpu as f64 / ios.max(1.0),
    })
}

/// True when fio here has the `nbd` engine.
pub fn available() -> bool {
    Command::new("fio")
        .arg("--enghelp")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("nbd"))
        .unwrap_or(false)
}
