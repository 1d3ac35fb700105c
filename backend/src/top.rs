//! `strata top`: a live view, like `iostat -x 1`, of the exports of one
//! daemon or of every daemon whose QMP socket matches a pattern. Each
//! round asks every daemon for `query-blockstats` and shows what changed
//! since the last round.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::cli::TopArgs;
use crate::qmp::client::QmpClient;

/// How long one daemon may take to answer before the round goes on
/// without it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The counters of one export that rates are made of.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    rd_ops: u64,
    wr_ops: u64,
    fl_ops: u64,
    rd_bytes: u64,
    wr_bytes: u64,
    rd_ns: u64,
    wr_ns: u64,
    fl_ns: u64,
    failed: u64,
}

impl Counts {
    /// Reads a `BlockDeviceStats` object.
    pub fn of(stats: &Value) -> Counts {
        let n = |k: &str| stats.get(k).and_then(Value::as_u64).unwrap_or(0);
        Counts {
            rd_ops: n("rd_operations"),
            wr_ops: n("wr_operations"),
            fl_ops: n("flush_operations"),
            rd_bytes: n("rd_bytes"),
            wr_bytes: n("wr_bytes"),
            rd_ns: n("rd_total_time_ns"),
            wr_ns: n("wr_total_time_ns"),
            fl_ns: n("flush_total_time_ns"),
            failed: ["rd", "wr", "flush", "unmap"]
                .iter()
                .map(|k| n(&format!("failed_{k}_operations")))
                .sum(),
        }
    }
}

/// One export's rates between two rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Reads per second.
    pub r_s: f64,
    /// Writes per second.
    pub w_s: f64,
    /// Flushes per second.
    pub f_s: f64,
    /// MB (10^6 bytes) read per second.
    pub rmb_s: f64,
    /// MB written per second.
    pub wmb_s: f64,
    /// Mean read latency, ms.
    pub r_await: f64,
    /// Mean write latency, ms.
    pub w_await: f64,
    /// Mean requests in flight (Little's law: time spent in requests over
    /// time passed).
    pub aqu_sz: f64,
    /// Failed requests per second.
    pub err_s: f64,
}

/// Rates from `a` to `b` over `secs`. A counter that went backwards (the
/// daemon restarted, the export was re-added) counts from zero.
pub fn rates(a: &Counts, b: &Counts, secs: f64) -> Rates {
    let d = |x: u64, y: u64| if y >= x { (y - x) as f64 } else { y as f64 };
    let secs = secs.max(1e-9);
    let await_ms = |ns: f64, ops: f64| if ops > 0.0 { ns / ops / 1e6 } else { 0.0 };
    let (rd, wr, fl) = (
        d(a.rd_ops, b.rd_ops),
        d(a.wr_ops, b.wr_ops),
        d(a.fl_ops, b.fl_ops),
    );
    let (rns, wns, fns) = (
        d(a.rd_ns, b.rd_ns),
        d(a.wr_ns, b.wr_ns),
        d(a.fl_ns, b.fl_ns),
    );
    Rates {
        r_s: rd / secs,
        w_s: wr / secs,
        f_s: fl / secs,
        rmb_s: d(a.rd_bytes, b.rd_bytes) / secs / 1e6,
        wmb_s: d(a.wr_bytes, b.wr_bytes) / secs / 1e6,
        r_await: await_ms(rns, rd),
        w_await: await_ms(wns, wr),
        aqu_sz: (rns + wns + fns) / (secs * 1e9),
        err_s: d(a.failed, b.failed) / secs,
    }
}

/// One daemon being watched.
struct Watched {
    path: PathBuf,
    client: Option<QmpClient>,
    /// Per export id: its node and counters at the last round.
    last: BTreeMap<String, (String, Counts)>,
    at: Instant,
}

/// What one round found for one daemon: its exports' rates, or why it
/// could not be asked.
enum Report {
    Exports(Vec<(String, String, Rates)>),
    Unreachable(String),
}

impl Watched {
    fn new(path: PathBuf) -> Watched {
        Watched {
            path,
            client: None,
            last: BTreeMap::new(),
            at: Instant::now(),
        }
    }

    fn sample(&mut self) -> anyhow::Result<BTreeMap<String, (String, Counts)>> {
        if self.client.is_none() {
            let mut c = QmpClient::connect(&self.path)?;
            c.set_reply_timeout(REPLY_TIMEOUT);
            self.client = Some(c);
        }
        let c = self.client.as_mut().expect("connected above");
        let stats = match c.run("query-blockstats", json!({})) {
            Ok(v) => v,
            Err(e) => {
                self.client = None;
                return Err(e);
            }
        };
        let Some(list) = stats.as_array() else {
            bail!("query-blockstats did not return a list: {stats}");
        };
        Ok(list
            .iter()
            .filter_map(|e| {
                let id = e.get("device")?.as_str()?.to_owned();
                let node = e.get("node-name").and_then(Value::as_str).unwrap_or("");
                Some((id, (node.to_owned(), Counts::of(e.get("stats")?))))
            })
            .collect())
    }

    /// Samples the daemon; rates against the previous sample (none the
    /// first time an export is seen).
    fn round(&mut self) -> Report {
        let now = Instant::now();
        match self.sample() {
            Ok(cur) => {
                let secs = now.duration_since(self.at).as_secs_f64();
                let rows = cur
                    .iter()
                    .filter_map(|(id, (node, c))| {
                        let (_, before) = self.last.get(id)?;
                        Some((id.clone(), node.clone(), rates(before, c, secs)))
                    })
                    .collect();
                self.last = cur;
                self.at = now;
                Report::Exports(rows)
            }
            Err(e) => {
                self.last.clear();
                Report::Unreachable(format!("{e:#}"))
            }
        }
    }
}

/// The daemons' names in the table: their sockets' file names without
/// the extension, or whole paths when those would be ambiguous.
fn names<'a>(paths: impl Iterator<Item = &'a PathBuf> + Clone) -> Vec<String> {
    let stem = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().into_owned());
    let stems: Vec<Option<String>> = paths.clone().map(stem).collect();
    let mut unique: Vec<&String> = stems.iter().flatten().collect();
    unique.sort();
    unique.dedup();
    if unique.len() == stems.len() {
        stems.into_iter().flatten().collect()
    } else {
        paths.map(|p| p.display().to_string()).collect()
    }
}

/// The sockets to watch now.
fn sockets(args: &TopArgs) -> anyhow::Result<Vec<PathBuf>> {
    let mut v = args.qmp.clone();
    if let Some(pattern) = &args.glob {
        let paths = glob::glob(pattern).with_context(|| format!("--glob '{pattern}'"))?;
        v.extend(paths.filter_map(Result::ok));
    }
    v.sort();
    v.dedup();
    Ok(v)
}

fn header(out: &mut String, multi: bool) {
    let name = if multi { "daemon/export" } else { "export" };
    out.push_str(&format!(
        "{name:<24} {:<12} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}\n",
        "node", "r/s", "w/s", "rMB/s", "wMB/s", "r_await", "w_await", "f/s", "aqu-sz", "err/s"
    ));
}

fn row(out: &mut String, name: &str, node: &str, r: &Rates) {
    out.push_str(&format!(
        "{name:<24} {node:<12} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>8.3} {:>8.3} {:>8.1} {:>7.2} {:>7.1}\n",
        r.r_s, r.w_s, r.rmb_s, r.wmb_s, r.r_await, r.w_await, r.f_s, r.aqu_sz, r.err_s
    ));
}

/// Runs `strata top` until interrupted or `--count` reports.
pub fn run(args: TopArgs) -> anyhow::Result<()> {
    if args.qmp.is_empty() && args.glob.is_none() {
        bail!("give the daemons to watch: --qmp PATH (repeatable) or --glob PATTERN");
    }
    let multi = args.glob.is_some() || args.qmp.len() > 1;
    let tty = std::io::stdout().is_terminal();
    let mut watched: BTreeMap<PathBuf, Watched> = BTreeMap::new();
    let interval = Duration::from_secs_f64(args.interval);
    let mut reports = 0;
    let mut first = true;
    loop {
        let paths = sockets(&args)?;
        watched.retain(|p, _| paths.contains(p));
        for p in &paths {
            watched
                .entry(p.clone())
                .or_insert_with(|| Watched::new(p.clone()));
        }
        let mut out = String::new();
        header(&mut out, multi);
        let names = names(watched.keys());
        for (w, daemon) in watched.values_mut().zip(names) {
            match w.round() {
                Report::Exports(rows) => {
                    for (id, node, r) in rows {
                        let name = if multi { format!("{daemon}/{id}") } else { id };
                        row(&mut out, &name, &node, &r);
                    }
                }
                Report::Unreachable(why) => {
                    out.push_str(&format!("{daemon:<24} unreachable: {why}\n"));
                }
            }
        }
        if paths.is_empty() {
            out.push_str("(no daemon matches)\n");
        }
        // The first round only takes the baseline, as iostat's first
        // report would be totals since boot.
        if !first {
            let mut stdout = std::io::stdout().lock();
            if tty {
                write!(stdout, "\x1b[H\x1b[2J")?;
            }
            write!(stdout, "{out}")?;
            if !tty {
                writeln!(stdout)?;
            }
            stdout.flush()?;
            reports += 1;
            if args.count.is_some_and(|n| reports >= n) {
                return Ok(());
            }
        }
        first = false;
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_the_counters_and_survive_a_restart() {
        let a = Counts::of(&json!({"rd_operations": 100, "rd_bytes": 409600,
            "rd_total_time_ns": 1_000_000, "wr_operations": 10, "wr_total_time_ns": 3_000_000,
            "failed_wr_operations": 1}));
        let b = Counts::of(&json!({"rd_operations": 300, "rd_bytes": 1228800,
            "rd_total_time_ns": 3_000_000, "wr_operations": 20, "wr_total_time_ns": 8_000_000,
            "failed_wr_operations": 3}));
        let r = rates(&a, &b, 2.0);
        assert_eq!(r.r_s, 100.0);
        assert_eq!(r.w_s, 5.0);
        assert!((r.rmb_s - 0.4096).abs() < 1e-9);
        assert_eq!(r.r_await, 0.01);
        assert_eq!(r.w_await, 0.5);
        assert!((r.aqu_sz - 0.0035).abs() < 1e-12);
        assert_eq!(r.err_s, 1.0);
        // Counters back at a lower value: a new daemon, counted from zero.
        assert_eq!(rates(&b, &a, 1.0).r_s, 100.0);
    }
}
