//! What the sandbox costs: Strata with `--sandbox on` (the default) and
//! `--sandbox off` on the null target at QD32, alternating, so that the
//! seccomp filters' price per system call shows as a ratio measured in
//! one run.

use anyhow::Context as _;

use crate::backend::Kind;
use crate::load::Outcome;
use crate::suite::{self, Plan, Workload};
use crate::target::Target;

/// Medians with the sandbox on and off, per workload.
pub struct SandboxCost {
    /// (workload, sandbox on, sandbox off).
    pub cells: Vec<(Workload, Outcome, Outcome)>,
}

impl SandboxCost {
    /// The largest IOPS cost of the sandbox over the workloads, in percent.
    pub fn worst_pct(&self) -> f64 {
        self.cells
            .iter()
            .map(|(_, on, off)| (1.0 - on.iops / off.iops) * 100.0)
            .fold(f64::MIN, f64::max)
    }
}

/// Runs null random reads at QD32, interrupt and polled, `plan.runs`
/// times per setting.
pub fn run(plan: &Plan, progress: &mut dyn FnMut(&str)) -> anyhow::Result<SandboxCost> {
    let kinds = [Kind::Strata, Kind::StrataSandboxOff];
    let dirs = kinds.map(|k| plan.workdir.join("sandbox").join(k.name()));
    let blockdevs = dirs
        .iter()
        .map(|d| Target::Null.prepare(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cells = Vec::new();
    for poll in [false, true] {
        let w = Workload {
            write: false,
            depth: 32,
            poll,
        };
        let mut samples: [Vec<Outcome>; 2] = Default::default();
        for run in 0..plan.runs {
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let o = suite::one(
                    plan,
                    Target::Null,
                    w,
                    kinds[i],
                    &plan.strata,
                    &dirs[i],
                    &blockdevs[i],
                )
                .with_context(|| format!("{} on null {}", kinds[i].name(), w.label()))?;
                progress(&format!(
                    "sandbox    {:<20} {:<16} run {}: {:>9.0} IOPS",
                    w.label(),
                    kinds[i].name(),
                    run + 1,
                    o.iops
                ));
                samples[i].push(o);
            }
        }
        cells.push((w, suite::median(&samples[0]), suite::median(&samples[1])));
    }
    Ok(SandboxCost { cells })
}
