//! What restarts and live migration cost the data path: Strata against
//! itself at QD32, with neither the inflight region nor a dirty log, with
//! the inflight region (which QEMU sets up whenever the backend offers
//! it), and with both and LOG_ALL on (a migration in progress).
//!
//! libblkio negotiates neither feature, so the frontend is the tests' own
//! (`strata_tests::frontend`), set up as QEMU's vhost-user-blk is, with
//! EVENT_IDX so that it kicks only when the device asks. It keeps 32
//! requests in flight on pre-placed descriptor chains and polls the used
//! ring; the daemon runs with its defaults. Each (target, direction) row
//! has one daemon; every run is a new connection to it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use strata_tests::frontend::{Options, TestFrontend, DATA, NEXT, W};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::Kind;
use crate::load::{self, Outcome, Rng, BLOCK};
use crate::suite::{self, Plan, CLIENT_CPU};
use crate::target::Target;

/// Requests in flight.
pub const DEPTH: u16 = 32;
/// The targets measured.
pub const TARGETS: [Target; 2] = [Target::Null, Target::RawCached];

/// What the frontend sets up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Neither the inflight region nor a dirty log.
    Plain,
    /// The inflight region.
    Inflight,
    /// The inflight region, a dirty log and LOG_ALL.
    Logging,
}

impl Setting {
    /// In measuring order.
    pub const ALL: [Setting; 3] = [Setting::Plain, Setting::Inflight, Setting::Logging];

    /// The name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Plain => "plain",
            Setting::Inflight => "inflight",
            Setting::Logging => "inflight + dirty log",
        }
    }

    fn options(self) -> Options {
        Options {
            queue_size: 256,
            event_idx: true,
            inflight: self != Setting::Plain,
            dirty_log: self == Setting::Logging,
        }
    }
}

/// One (target, direction) row: medians per [`Setting`], in its order.
pub struct Row {
    /// The disk.
    pub target: Target,
    /// Random writes rather than reads.
    pub write: bool,
    /// Medians per setting.
    pub by_setting: [Outcome; 3],
    /// Every run's IOPS per setting, run `r` of each taken in one round.
    pub runs: [Vec<f64>; 3],
}

impl Row {
    /// The IOPS `setting` loses against `base`, in percent: the median
    /// over the rounds of each round's own ratio, so that the machine's
    /// drift from one round to the next cancels out.
    pub fn cost_pct(&self, setting: Setting, base: Setting) -> f64 {
        let (a, b) = (&self.runs[setting as usize], &self.runs[base as usize]);
        let mut costs: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(x, y)| (1.0 - x / y) * 100.0)
            .collect();
        costs.sort_by(f64::total_cmp);
        match costs.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => costs[n / 2],
            n => (costs[n / 2 - 1] + costs[n / 2]) / 2.0,
        }
    }
}

/// Runs per setting at least: the costs measured are a few percent, and
/// on these machines one run differs from the next by several percent.
/// Many short runs beat a few long ones.
pub const MIN_RUNS: usize = 15;
/// Measured time of each run, at most.
pub const MAX_MEASURE: Duration = Duration::from_secs(2);

/// Every row, `plan.runs` (at least [`MIN_RUNS`]) runs per setting,
/// settings rotated per run.
pub fn run(plan: &Plan, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Vec<Row>> {
    load::pin_self(CLIENT_CPU)?;
    let runs = plan.runs.max(MIN_RUNS);
    let plan = &Plan {
        measure: plan.measure.min(MAX_MEASURE),
        warmup: plan.warmup.min(MAX_MEASURE / 4),
        targets: Vec::new(),
        workloads: Vec::new(),
        ..plan.clone()
    };
    let mut rows = Vec::new();
    for target in TARGETS {
        let dir = plan.workdir.join("migration").join(target.name());
        let blockdevs = target.prepare(&dir)?;
        for write in [false, true] {
            // One daemon per row, a connection per run: what differs from
            // one daemon to the next (where its memory landed) would
            // swamp the few percent measured.
            let backend =
                suite::start(target, false, Kind::Strata, &plan.strata, &dir, &blockdevs)?;
            let mut samples: [Vec<Outcome>; 3] = Default::default();
            for run in 0..runs {
                for k in 0..Setting::ALL.len() {
                    let setting = Setting::ALL[(run + k) % Setting::ALL.len()];
                    let o = drive(plan, &backend.socket, setting, write, &|| backend.cpu_ns())
                        .with_context(|| format!("{} on {}", setting.name(), target.name()))?;
                    progress(&format!(
                        "migration  {:<10} {:<9} {:<21} run {}: {:>9.0} IOPS  cpu {:>6.0} ns/req",
                        target.name(),
                        if write { "randwrite" } else { "randread" },
                        setting.name(),
                        run + 1,
                        o.iops,
                        o.cpu_ns
                    ));
                    samples[setting as usize].push(o);
                }
            }
            rows.push(Row {
                target,
                write,
                runs: [0, 1, 2].map(|i| samples[i].iter().map(|o| o.iops).collect()),
                by_setting: samples.map(|s| suite::median(&s)),
            });
        }
    }
    Ok(rows)
}

/// One run: 4 KiB random requests at [`DEPTH`] for the plan's warm-up
/// and measured window. Latency is not sampled (at a fixed depth it is
/// depth / IOPS).
fn drive(
    plan: &Plan,
    socket: &std::path::Path,
    setting: Setting,
    write: bool,
    cpu_ns: &dyn Fn() -> u64,
) -> anyhow::Result<Outcome> {
    let mut fe = TestFrontend::connect_opts(socket, 1, setting.options());
    let capacity = u64::from_le_bytes(fe.config()[..8].try_into()?) * 512;
    let blocks = capacity / BLOCK as u64;
    if blocks == 0 {
        bail!("the disk is smaller than one block");
    }
    // Slot i: header and status in one page, the data in the next, the
    // chain at descriptors 3i..3i+2.
    let slot_at = |i: u16| DATA + u64::from(i) * 2 * BLOCK as u64;
    let (ty, data_flags) = if write {
        (VIRTIO_BLK_T_OUT, 0)
    } else {
        (VIRTIO_BLK_T_IN, W)
    };
    for i in 0..DEPTH {
        let (hdr, buf) = (slot_at(i), slot_at(i) + BLOCK as u64);
        fe.place(
            0,
            3 * i,
            &[
                (hdr, 16, NEXT, 3 * i + 1),
                (buf, BLOCK as u32, data_flags | NEXT, 3 * i + 2),
                (hdr + 16, 1, W, 0),
            ],
        );
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut submit = |fe: &mut TestFrontend, i: u16| {
        fe.header(slot_at(i), ty, (rng.next() % blocks) * (BLOCK as u64 / 512));
        fe.offer_head_quietly(0, 3 * i);
    };
    let mut avail = 0u16;
    for i in 0..DEPTH {
        submit(&mut fe, i);
    }
    avail = avail.wrapping_add(DEPTH);
    fe.kick(0);

    let start = Instant::now();
    let (from, end) = (start + plan.warmup, start + plan.warmup + plan.measure);
    let (mut done, mut cpu_start, mut measuring) = (0u64, 0, false);
    loop {
        let old = avail;
        while let Some((head, _)) = fe.poll_used(0) {
            let i = u16::try_from(head / 3).context("a head we never offered")?;
            let status: u8 = fe.mem().read_obj(GuestAddress(slot_at(i) + 16))?;
            if status != VIRTIO_BLK_S_OK as u8 {
                bail!("a request failed with status {status}");
            }
            done += u64::from(measuring);
            submit(&mut fe, i);
            avail = avail.wrapping_add(1);
        }
        if avail != old && fe.needs_kick(0, old, avail) {
            fe.kick(0);
        }
        let now = Instant::now();
        if !measuring && now >= from {
            (measuring, cpu_start) = (true, cpu_ns());
        }
        if now >= end {
            break;
        }
    }
    let cpu = cpu_ns() - cpu_start;
    if setting == Setting::Logging {
        let (_, _, used) = fe.ring_addrs(0);
        let marked = fe.dirty_pages().context("the dirty log")?;
        if !marked.contains(&(used / 4096)) {
            bail!("logging was on, but the daemon marked no used ring page");
        }
    }
    Ok(Outcome {
        iops: done as f64 / plan.measure.as_secs_f64(),
        mean_us: f64::from(DEPTH) * 1e6 / (done as f64 / plan.measure.as_secs_f64()),
        p99_us: 0.0,
        cpu_ns: cpu as f64 / done.max(1) as f64,
    })
}
