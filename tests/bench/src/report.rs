//! The results as markdown: the matrix with ratios to qsd, Strata's qcow2
//! against its own raw, the idle daemon, and the targets met or missed.

use std::fmt::Write as _;

use crate::idle::Idle;
use crate::load::Outcome;
use crate::migration_cost::{self, Row, Setting};
use crate::sandbox_cost::SandboxCost;
use crate::scaling::{self, Scaling};
use crate::suite::{Cell, Plan, Workload};
use crate::target::Target;
use crate::{nbd_client, nbd_export};

/// Where the generated part of BENCHMARKS.md begins and ends; text outside
/// the markers is kept.
pub const BEGIN: &str = "<!-- strata-bench:begin -->";
/// See [`BEGIN`].
pub const END: &str = "<!-- strata-bench:end -->";

/// The measurements beside the matrix, each skipped when `None`.
#[derive(Default)]
pub struct Extras {
    /// The idle daemons.
    pub idle: Option<IdlePair>,
    /// One queue against two.
    pub scaling: Option<Scaling>,
    /// The sandbox on against off.
    pub sandbox: Option<SandboxCost>,
}

/// Idle figures for both backends.
pub struct IdlePair {
    /// Strata.
    pub strata: Idle,
    /// qemu-storage-daemon.
    pub qsd: Idle,
}

fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = crate::suite::cores();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown version".into())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn find(cells: &[Cell], target: Target, w: Workload) -> Option<&Cell> {
    cells.iter().find(|c| c.target == target && c.workload == w)
}

/// The generated section, markers included.
pub fn markdown(plan: &Plan, cells: &[Cell], extras: &Extras, date: &str) -> String {
    let Extras {
        idle,
        scaling,
        sandbox,
    } = extras;
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(
        s,
        "Run on {date}: {}. Strata `{}` against `{}`. One queue of size 256, 4 KiB \
         random I/O over 1 GiB; daemon on cpu 0, client on cpu 1. Each cell is the median of \
         {} alternating runs per backend of {:.1} s each (after {:.1} s of warm-up), on a \
         freshly started daemon. Ratios are Strata / qsd: above 1 is better for IOPS, below 1 is \
         better for latency and CPU.\n",
        machine(),
        version(&plan.strata),
        version(&plan.qsd),
        plan.runs,
        plan.measure.as_secs_f64(),
        plan.warmup.as_secs_f64(),
    );
    if !cells.is_empty() {
        let _ = writeln!(
            s,
            "| target | workload | Strata IOPS | qsd IOPS | IOPS ratio | mean lat (us) Strata / qsd | \
             p99 (us) Strata / qsd | CPU/req (ns) Strata / qsd | CPU ratio |"
        );
        let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
        for c in cells {
            let (a, b) = (&c.strata, &c.qsd);
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | **{}** | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} / {:.0} | {} |",
                c.target.name(),
                c.workload.label(),
                a.iops,
                b.iops,
                ratio(a.iops, b.iops),
                a.mean_us,
                b.mean_us,
                a.p99_us,
                b.p99_us,
                a.cpu_ns,
                b.cpu_ns,
                ratio(a.cpu_ns, b.cpu_ns),
            );
        }
    }

    let raw_rows: Vec<_> = cells
        .iter()
        .filter(|c| c.target == Target::Qcow2)
        .filter_map(|q| find(cells, Target::RawCached, q.workload).map(|r| (r, q)))
        .collect();
    if !raw_rows.is_empty() {
        let _ = writeln!(
            s,
            "\nStrata's fully allocated qcow2 against the same disk as raw (both in the page cache):\n"
        );
        let _ = writeln!(s, "| workload | raw IOPS | qcow2 IOPS | qcow2 / raw |");
        let _ = writeln!(s, "|---|--:|--:|--:|");
        for (r, q) in raw_rows {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {} |",
                q.workload.label(),
                r.strata.iops,
                q.strata.iops,
                ratio(q.strata.iops, r.strata.iops)
            );
        }
    }

    if let Some(idle) = idle {
        let _ = writeln!(
            s,
            "\nIdle, serving a 1 TiB qcow2 (64 KiB clusters) with a frontend connected:\n"
        );
        let _ = writeln!(s, "| backend | RSS (MiB) | CPU (% of a core) |");
        let _ = writeln!(s, "|---|--:|--:|");
        for (name, i) in [("strata", &idle.strata), ("qsd", &idle.qsd)] {
            let _ = writeln!(
                s,
                "| {name} | {:.1} | {:.2} |",
                i.rss as f64 / (1 << 20) as f64,
                i.cpu * 100.0
            );
        }
    }

    if let Some(sc) = scaling {
        let _ = writeln!(
            s,
            "\nMulti-queue scaling: a zlib-compressed qcow2 ({} KiB clusters, so each 4 KiB read \
             inflates a whole cluster on the queue thread and the daemon, not the client, is the \
             limit), random reads at QD{} per queue; {}. qsd 7.2 serves every queue of an export \
             from one thread.\n",
            scaling::CLUSTER >> 10,
            scaling::DEPTH,
            sc.layout
        );
        let _ = writeln!(
            s,
            "| backend | 1 queue IOPS | 2 queues IOPS | 2 queues / 1 | CPU/req (ns) 1 / 2 queues |"
        );
        let _ = writeln!(s, "|---|--:|--:|--:|--:|");
        for (name, [one, two]) in [("strata", &sc.strata), ("qsd", &sc.qsd)] {
            let _ = writeln!(
                s,
                "| {name} | {:.0} | {:.0} | **{}** | {:.0} / {:.0} |",
                one.iops,
                two.iops,
                ratio(two.iops, one.iops),
                one.cpu_ns,
                two.cpu_ns
            );
        }
    }

    if let Some(sb) = sandbox {
        let _ = writeln!(
            s,
            "\nThe sandbox's cost: Strata with `--sandbox on` (the default: seccomp filters on \
             every thread) and `--sandbox off`, null target, random reads, in the same run.\n"
        );
        let _ = writeln!(s, "| workload | IOPS on | IOPS off | cost |");
        let _ = writeln!(s, "|---|--:|--:|--:|");
        for (w, on, off) in &sb.cells {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | **{:.1}%** |",
                w.label(),
                on.iops,
                off.iops,
                (1.0 - on.iops / off.iops) * 100.0
            );
        }
    }

    let goals = goals(cells, extras);
    if !goals.is_empty() {
        goal_table(&mut s, &goals);
    }
    let _ = writeln!(
        s,
        "\n![IOPS and CPU per request, Strata / qsd](docs/benchmarks.png)"
    );
    let _ = writeln!(s, "{END}");
    s
}

/// How a section's runs were made: `setup`, then the runs, then `after`.
fn alternating_runs(plan: &Plan, date: &str, setup: &str, after: &str) -> String {
    format!(
        "Run on {date}: {}. Strata `{}` against `{}`, {setup}. Each cell is the median of {} \
         alternating runs per daemon of {:.1} s (after {:.1} s of warm-up), {after}",
        machine(),
        version(&plan.strata),
        version(&plan.qsd),
        plan.runs,
        plan.measure.as_secs_f64(),
        plan.warmup.as_secs_f64(),
    )
}

/// A row's measured cells: IOPS, their ratio, mean latency and CPU per
/// request, Strata's beside qsd's.
fn beside_qsd(a: &Outcome, b: &Outcome) -> String {
    format!(
        "{:.0} | {:.0} | **{}** | {:.1} / {:.1} | {:.0} / {:.0} | {}",
        a.iops,
        b.iops,
        ratio(a.iops, b.iops),
        a.mean_us,
        b.mean_us,
        a.cpu_ns,
        b.cpu_ns,
        ratio(a.cpu_ns, b.cpu_ns),
    )
}

/// The goals and how the run did, as a table.
fn goal_table(s: &mut String, goals: &[Goal]) {
    let _ = writeln!(s, "\n| target | goal | measured | met |");
    let _ = writeln!(s, "|---|---|--:|---|");
    for g in goals {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} |",
            g.what,
            g.goal,
            g.value,
            if g.met { "yes" } else { "**no**" }
        );
    }
}

/// One performance goal and how the run did against it.
pub struct Goal {
    /// Which measurement.
    pub what: String,
    /// The bound, in words.
    pub goal: &'static str,
    /// The measured ratio or figure.
    pub value: f64,
    /// Whether the bound holds.
    pub met: bool,
}

/// The goals of the performance issue that this run measured.
pub fn goals(cells: &[Cell], extras: &Extras) -> Vec<Goal> {
    let read = |depth, poll| Workload {
        write: false,
        depth,
        poll,
    };
    let mut out = Vec::new();
    let mut push = |what: String, goal, value: f64, met: bool| {
        out.push(Goal {
            what,
            goal,
            value,
            met,
        })
    };
    if let Some(c) = find(cells, Target::Null, read(32, false)) {
        let r = c.strata.iops / c.qsd.iops;
        push(
            "null randread QD32: IOPS / qsd".into(),
            ">= 1.30",
            r,
            r >= 1.3,
        );
        let r = c.strata.cpu_ns / c.qsd.cpu_ns;
        push(
            "null randread QD32: CPU per request / qsd".into(),
            "<= 0.70",
            r,
            r <= 0.7,
        );
    }
    for t in [Target::RawCached, Target::Qcow2] {
        if let Some(c) = find(cells, t, read(32, false)) {
            let r = c.strata.iops / c.qsd.iops;
            push(
                format!("{} randread QD32: IOPS / qsd", t.name()),
                ">= 1.20",
                r,
                r >= 1.2,
            );
        }
    }
    for t in Target::ALL {
        if let Some(c) = find(cells, t, read(1, false)) {
            let r = c.strata.mean_us / c.qsd.mean_us;
            push(
                format!("{} randread QD1: mean latency / qsd", t.name()),
                "<= 1.00",
                r,
                r <= 1.0,
            );
        }
        if let Some(c) = find(cells, t, read(1, true)) {
            let r = c.strata.mean_us / c.qsd.mean_us;
            push(
                format!("{} randread QD1 poll: mean latency / qsd", t.name()),
                "< 1.00",
                r,
                r < 1.0,
            );
        }
    }
    for w in [read(1, false), read(32, false)] {
        if let (Some(q), Some(r)) = (
            find(cells, Target::Qcow2, w),
            find(cells, Target::RawCached, w),
        ) {
            let x = q.strata.iops / r.strata.iops;
            push(
                format!("Strata qcow2 / Strata raw, {}", w.label()),
                ">= 0.90",
                x,
                x >= 0.9,
            );
        }
    }
    if let Some(i) = &extras.idle {
        let mib = i.strata.rss as f64 / (1 << 20) as f64;
        push(
            "idle RSS, 1 TiB qcow2 (MiB)".into(),
            "< 64",
            mib,
            mib < 64.0,
        );
        let pct = i.strata.cpu * 100.0;
        push("idle CPU (% of a core)".into(), "< 1", pct, pct < 1.0);
    }
    if let Some(sc) = &extras.scaling {
        let r = sc.strata[1].iops / sc.strata[0].iops;
        push(
            "Strata 2 queues / 1 queue, CPU-bound target".into(),
            ">= 1.80",
            r,
            r >= 1.8,
        );
    }
    if let Some(sb) = &extras.sandbox {
        let pct = sb.worst_pct();
        push(
            "sandbox cost, null randread QD32 (% of IOPS)".into(),
            "<= 3",
            pct,
            pct <= 3.0,
        );
    }
    out
}

/// Replaces the part of `doc` between `begin` and `end` (markers
/// included), or appends it, with `section`.
pub fn splice(doc: &str, section: &str, begin: &str, end: &str) -> String {
    match (doc.find(begin), doc.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!(
                "{}{}{}",
                &doc[..b],
                section.trim_end(),
                &doc[e + end.len()..]
            )
        }
        _ => format!("{}\n\n{}", doc.trim_end(), section),
    }
}

/// Where the generated migration-cost part of BENCHMARKS.md begins and
/// ends; `--migration-only` replaces just this part.
pub const MIGRATION_BEGIN: &str = "<!-- strata-bench:migration:begin -->";
/// See [`MIGRATION_BEGIN`].
pub const MIGRATION_END: &str = "<!-- strata-bench:migration:end -->";

/// The migration-cost section, markers included.
pub fn migration_markdown(plan: &Plan, migration: &[Row], date: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{MIGRATION_BEGIN}");
    let _ = writeln!(
        s,
        "Run on {date}: {}, Strata `{}`.",
        machine(),
        version(&plan.strata)
    );
    let rows = migration;
    let _ = writeln!(
        s,
        "\nWhat restarts and live migration cost: Strata against itself, QD{} random I/O, \
         through the tests' own vhost-user frontend (libblkio negotiates neither feature) \
         with EVENT_IDX, polling its used ring. *plain*: no inflight region; *inflight*: the \
         INFLIGHT_SHMFD region QEMU always sets up when offered; *dirty log*: also \
         SET_LOG_BASE and LOG_ALL, as during a migration. Median of {} runs of {:.1} s per \
         setting, each a new connection to one daemon per row, the settings rotated; a cost is \
         the median over the rounds of each round's own ratio.\n",
        migration_cost::DEPTH,
        plan.runs.max(migration_cost::MIN_RUNS),
        plan.measure.min(migration_cost::MAX_MEASURE).as_secs_f64()
    );
    let _ = writeln!(
        s,
        "| target | workload | plain IOPS | inflight IOPS | dirty log IOPS | inflight cost | \
         logging cost | CPU/req (ns) plain / inflight / log |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|");
    for r in rows {
        let [p, i, l] = &r.by_setting;
        let _ = writeln!(
            s,
            "| {} | {} QD{} | {:.0} | {:.0} | {:.0} | **{:.1}%** | **{:.1}%** | {:.0} / {:.0} / {:.0} |",
            r.target.name(),
            if r.write { "randwrite" } else { "randread" },
            migration_cost::DEPTH,
            p.iops,
            i.iops,
            l.iops,
            r.cost_pct(Setting::Inflight, Setting::Plain),
            r.cost_pct(Setting::Logging, Setting::Inflight),
            p.cpu_ns,
            i.cpu_ns,
            l.cpu_ns
        );
    }

    let mut goals = Vec::new();
    let mut push = |what: String, goal, value: f64, met: bool| {
        goals.push(Goal {
            what,
            goal,
            value,
            met,
        })
    };
    for r in rows {
        let what = |cost| {
            format!(
                "{cost}, {} {} QD{} (% of IOPS)",
                r.target.name(),
                if r.write { "randwrite" } else { "randread" },
                migration_cost::DEPTH
            )
        };
        let pct = r.cost_pct(Setting::Inflight, Setting::Plain);
        push(what("inflight region cost"), "< 3", pct, pct < 3.0);
        let pct = r.cost_pct(Setting::Logging, Setting::Inflight);
        push(what("dirty logging cost"), "< 10", pct, pct < 10.0);
    }
    goal_table(&mut s, &goals);
    let _ = writeln!(s, "{MIGRATION_END}");
    s
}

/// Where the generated NBD part of BENCHMARKS.md begins and ends;
/// `--nbd-only` replaces just this part.
pub const NBD_BEGIN: &str = "<!-- strata-bench:nbd:begin -->";
/// See [`NBD_BEGIN`].
pub const NBD_END: &str = "<!-- strata-bench:nbd:end -->";

/// The NBD export section, markers included.
pub fn nbd_markdown(plan: &Plan, rows: &[nbd_export::Row], date: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{NBD_BEGIN}");
    let _ = writeln!(
        s,
        "{}\n",
        alternating_runs(
            plan,
            date,
            "each serving one NBD export on a unix socket; fio's `nbd` engine (libnbd) on \
             cpu 1, the daemon on cpu 0",
            "on a freshly started daemon."
        )
    );
    let _ = writeln!(
        s,
        "| target | workload | Strata IOPS | qsd IOPS | IOPS ratio | mean lat (us) Strata / qsd | \
         CPU/req (ns) Strata / qsd | CPU ratio | no-work server IOPS (/ qsd) |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    let mut goals = Vec::new();
    for r in rows {
        let (a, b) = (&r.strata, &r.qsd);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} ({:.2}) |",
            r.target.name(),
            r.job.label(),
            beside_qsd(a, b),
            r.floor.iops,
            r.floor.iops / b.iops
        );
        let what = format!("NBD {} {}", r.target.name(), r.job.label());
        let x = a.iops / b.iops;
        goals.push(Goal {
            what: format!("{what}: IOPS / qsd"),
            goal: ">= 1.20",
            value: x,
            met: x >= 1.2,
        });
        let x = a.cpu_ns / b.cpu_ns;
        goals.push(Goal {
            what: format!("{what}: CPU per request / qsd"),
            goal: "<= 1.00",
            value: x,
            met: x <= 1.0,
        });
    }
    goal_table(&mut s, &goals);
    let _ = writeln!(s, "{NBD_END}");
    s
}

/// Where the generated NBD client part of BENCHMARKS.md begins and ends;
/// `--nbd-only` replaces it too.
pub const NBD_CLIENT_BEGIN: &str = "<!-- strata-bench:nbd-client:begin -->";
/// See [`NBD_CLIENT_BEGIN`].
pub const NBD_CLIENT_END: &str = "<!-- strata-bench:nbd-client:end -->";

/// The NBD client node section, markers included.
pub fn nbd_client_markdown(plan: &Plan, rows: &[nbd_client::Row], date: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{NBD_CLIENT_BEGIN}");
    let _ = writeln!(
        s,
        "{}\n",
        alternating_runs(
            plan,
            date,
            "each serving a one-queue vhost-user export of an `nbd` node on qemu-nbd (a raw \
             file in the page cache, on cpu 1 with the libblkio load), the daemon on cpu 0",
            "on a freshly started daemon and qemu-nbd. CPU per request is the daemon's alone."
        )
    );
    let _ = writeln!(
        s,
        "| workload | Strata IOPS | qsd IOPS | IOPS ratio | mean lat (us) Strata / qsd | \
         CPU/req (ns) Strata / qsd | CPU ratio |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|");
    let mut goals = Vec::new();
    for r in rows {
        let (a, b) = (&r.strata, &r.qsd);
        let _ = writeln!(s, "| randread 4k QD{} | {} |", r.depth, beside_qsd(a, b));
        if r.depth == 32 {
            let x = a.iops / b.iops;
            goals.push(Goal {
                what: "nbd node randread 4k QD32: IOPS / qsd".into(),
                goal: ">= 1.00",
                value: x,
                met: x >= 1.0,
            });
        }
    }
    goal_table(&mut s, &goals);
    let _ = writeln!(s, "{NBD_CLIENT_END}");
    s
}

/// Where the generated RBD part of BENCHMARKS.md begins and ends;
/// `--rbd-only` replaces just this part.
pub const RBD_BEGIN: &str = "<!-- strata-bench:rbd:begin -->";
/// See [`RBD_BEGIN`].
pub const RBD_END: &str = "<!-- strata-bench:rbd:end -->";

/// The RBD section, markers included.
pub fn rbd_markdown(plan: &Plan, rows: &[crate::rbd::Row], date: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{RBD_BEGIN}");
    let _ = writeln!(
        s,
        "{}\n",
        alternating_runs(
            plan,
            date,
            "each serving a one-queue vhost-user export of an `rbd` node (qsd's from \
             qemu-block-extra) on the same filled 256 MiB image in a one-node Ceph 16.2 cluster \
             on this machine (one BlueStore OSD on a file, ci/ceph-cluster), the daemon on cpu 0 \
             and the libblkio load on cpu 1; the cluster's daemons float",
            "on a freshly started daemon. CPU per request is the daemon's alone (librbd's \
             threads included). `rbd bench` is librbd with no daemon in between, with as many \
             threads as the depth."
        )
    );
    let _ = writeln!(
        s,
        "| workload | Strata IOPS | qsd IOPS | IOPS ratio | mean lat (us) Strata / qsd | \
         CPU/req (ns) Strata / qsd | CPU ratio | rbd bench IOPS | Strata / rbd bench |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mut goals = Vec::new();
    for r in rows {
        let (a, b) = (&r.strata, &r.qsd);
        let what = if r.write { "randwrite" } else { "randread" };
        let _ = writeln!(
            s,
            "| {what} 4k QD{} | {} | {:.0} | {:.2} |",
            r.depth,
            beside_qsd(a, b),
            r.direct_iops,
            a.iops / r.direct_iops
        );
        if r.depth == 32 {
            let x = a.iops / b.iops;
            goals.push(Goal {
                what: format!("rbd {what} 4k QD32: IOPS / qsd"),
                goal: ">= 1.00",
                value: x,
                met: x >= 1.0,
            });
        }
        let c = a.cpu_ns / b.cpu_ns;
        goals.push(Goal {
            what: format!("rbd {what} 4k QD{}: CPU per request / qsd", r.depth),
            goal: "<= 0.80",
            value: c,
            met: c <= 0.8,
        });
    }
    goal_table(&mut s, &goals);
    let _ = writeln!(s, "{RBD_END}");
    s
}

/// Where the generated density part of BENCHMARKS.md begins and ends;
/// `--density-only` replaces just this part.
pub const DENSITY_BEGIN: &str = "<!-- strata-bench:density:begin -->";
/// See [`DENSITY_BEGIN`].
pub const DENSITY_END: &str = "<!-- strata-bench:density:end -->";

/// The density and start-up section, markers included.
pub fn density_markdown(
    plan: &Plan,
    strata: &crate::density::Density,
    qsd: &crate::density::Density,
    window: std::time::Duration,
    date: &str,
) -> String {
    use crate::density::{CONNECTED, DAEMONS, STARTS};
    let mut s = String::new();
    let _ = writeln!(s, "{DENSITY_BEGIN}");
    let _ = writeln!(
        s,
        "Run on {date}: {}. Strata `{}` against `{}`. {DAEMONS} daemons of each, one after the \
         other, each serving its own sparse 10 GiB qcow2 over vhost-user with a QMP monitor, \
         {CONNECTED} of them with a libblkio frontend connected and idle; CPU over {:.0} s after \
         5 s of quiet. Start-up is the median of {STARTS} starts of one such daemon.\n",
        machine(),
        version(&plan.strata),
        version(&plan.qsd),
        window.as_secs_f64()
    );
    let _ = writeln!(s, "| per daemon | Strata | qsd | ratio |");
    let _ = writeln!(s, "|---|--:|--:|--:|");
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let rows: [(&str, f64, f64, usize); 5] = [
        ("PSS (MiB)", mib(strata.pss), mib(qsd.pss), 1),
        ("threads", strata.threads, qsd.threads, 1),
        (
            "idle CPU of all daemons (% of one core)",
            strata.idle_cpu * 100.0,
            qsd.idle_cpu * 100.0,
            2,
        ),
        (
            "exec to listening socket (ms)",
            ms(strata.to_socket),
            ms(qsd.to_socket),
            1,
        ),
        (
            "exec to ready (ms): READY=1 / qsd's --daemonize",
            ms(strata.to_ready),
            ms(qsd.to_ready),
            1,
        ),
    ];
    for (what, a, b, digits) in rows {
        let ratio = if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "-".into()
        };
        let _ = writeln!(s, "| {what} | {a:.digits$} | {b:.digits$} | {ratio} |");
    }
    let _ = writeln!(s);
    let goals = vec![
        Goal {
            what: "PSS per idle daemon / qsd".into(),
            goal: "<= 0.50",
            value: strata.pss / qsd.pss,
            met: strata.pss <= 0.5 * qsd.pss,
        },
        Goal {
            what: "start-up (exec to listening) / qsd".into(),
            goal: "<= 0.50",
            value: ms(strata.to_socket) / ms(qsd.to_socket),
            met: strata.to_socket.as_secs_f64() <= 0.5 * qsd.to_socket.as_secs_f64(),
        },
        Goal {
            what: format!("idle CPU of {DAEMONS} daemons (% of one core)"),
            goal: "< 1",
            value: strata.idle_cpu * 100.0,
            met: strata.idle_cpu < 0.01,
        },
    ];
    goal_table(&mut s, &goals);
    let _ = writeln!(s, "{DENSITY_END}");
    s
}
