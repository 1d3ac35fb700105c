//! `--metrics ADDR:PORT`: the daemon's counters in the Prometheus text
//! exposition format (OpenMetrics), built on each scrape from the same
//! per-queue counters `query-blockstats` reads.

mod http;
mod process;

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::daemon::Daemon;
use crate::io_stats::latency::BOUNDS_NS;
use crate::io_stats::Op;

pub use http::{parse_addr, serve};

/// The kinds of request, as the `op` label names them.
const OPS: [(Op, &str); 4] = [
    (Op::Read, "read"),
    (Op::Write, "write"),
    (Op::Flush, "flush"),
    (Op::Unmap, "discard"),
];

type Labels = Vec<(&'static str, String)>;

/// Reads the daemon on each scrape.
struct Scrape(Arc<Daemon>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

/// Writes one metric family: its descriptor, then a sample per label set.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut m = enc.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A histogram from the fixed buckets, as prometheus-client encodes one.
#[derive(Debug)]
struct Latency {
    count: u64,
    sum_ns: u64,
    buckets: [u64; BOUNDS_NS.len() + 1],
}

impl prometheus_client::metrics::TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let bounds = BOUNDS_NS
            .iter()
            .map(|&ns| ns as f64 / 1e9)
            .chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(self.buckets).collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum_ns as f64 / 1e9,
            self.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let d = &self.0;
        let exports = d.export_samples();
        let queues = || {
            exports.iter().flat_map(|e| {
                e.queues.iter().enumerate().map(move |(q, t)| {
                    let labels: Labels = vec![
                        ("export", e.id.clone()),
                        ("type", e.kind.to_owned()),
                        ("node", e.node.clone()),
                        ("queue", q.to_string()),
                    ];
                    (labels, t)
                })
            })
        };
        let per_op = |field: usize| {
            queues().flat_map(move |(labels, t)| {
                OPS.iter().map(move |&(op, name)| {
                    let mut l = labels.clone();
                    l.push(("op", name.to_owned()));
                    (l, ConstCounter::new(t.ops[op as usize][field]))
                })
            })
        };
        family(
            &mut enc,
            "strata_export_requests",
            "Requests that completed successfully.",
            None,
            per_op(0),
        )?;
        family(
            &mut enc,
            "strata_export_transferred",
            "Bytes read, written, zeroed or discarded by successful requests.",
            Some(&Unit::Bytes),
            per_op(1),
        )?;
        family(
            &mut enc,
            "strata_export_failed_requests",
            "Requests that ran and failed.",
            None,
            per_op(3),
        )?;
        family(
            &mut enc,
            "strata_export_invalid_requests",
            "Requests refused before they ran (out of range, misaligned, read-only).",
            None,
            per_op(4),
        )?;
        family(
            &mut enc,
            "strata_export_in_flight",
            "Requests running now.",
            None,
            queues().map(|(l, t)| (l, ConstGauge::new(t.in_flight as i64))),
        )?;
        family(
            &mut enc,
            "strata_export_latency",
            "Time from a request's start to its end, for successful requests.",
            Some(&Unit::Seconds),
            queues().flat_map(|(labels, t)| {
                OPS.iter().map(move |&(op, name)| {
                    let mut l = labels.clone();
                    l.push(("op", name.to_owned()));
                    let i = op as usize;
                    let h = Latency {
                        count: t.ops[i][0],
                        sum_ns: t.ops[i][2],
                        buckets: t.latency[i],
                    };
                    (l, h)
                })
            }),
        )?;

        let nodes = d.node_samples();
        let node = |n: &crate::daemon::NodeSample| -> Labels {
            vec![("node", n.name.clone()), ("driver", n.driver.to_owned())]
        };
        family(
            &mut enc,
            "strata_node_size",
            "The node's virtual size.",
            Some(&Unit::Bytes),
            nodes
                .iter()
                .filter_map(|n| Some((node(n), ConstGauge::new(n.size? as i64)))),
        )?;
        family(
            &mut enc,
            "strata_node_allocated",
            "Host bytes the node's storage takes (QEMU's actual size).",
            Some(&Unit::Bytes),
            nodes
                .iter()
                .filter_map(|n| Some((node(n), ConstGauge::new(n.stats.allocated_bytes? as i64)))),
        )?;
        family(
            &mut enc,
            "strata_node_allocated_ratio",
            "Host bytes the node's storage takes over its virtual size.",
            None,
            nodes.iter().filter_map(|n| {
                let (a, s) = (n.stats.allocated_bytes?, n.size.filter(|&s| s > 0)?);
                Some((node(n), ConstGauge::new(a as f64 / s as f64)))
            }),
        )?;
        let caches = || {
            nodes.iter().flat_map(|n| {
                n.stats.caches.iter().map(move |c| {
                    let mut l = node(n);
                    l.push(("cache", c.name.to_owned()));
                    (l, c)
                })
            })
        };
        family(
            &mut enc,
            "strata_node_cache_hits",
            "Metadata lookups the cache answered.",
            None,
            caches().map(|(l, c)| (l, ConstCounter::new(c.hits))),
        )?;
        family(
            &mut enc,
            "strata_node_cache_misses",
            "Metadata lookups that read the image.",
            None,
            caches().map(|(l, c)| (l, ConstCounter::new(c.misses))),
        )?;

        let jobs: Vec<serde_json::Value> = d.jobs().list().iter().map(|j| j.job_info()).collect();
        let job = |j: &serde_json::Value, key: &str| -> (Labels, ConstGauge) {
            let labels = vec![
                ("job", j["id"].as_str().unwrap_or_default().to_owned()),
                ("type", j["type"].as_str().unwrap_or_default().to_owned()),
                (
                    "status",
                    j["status"].as_str().unwrap_or_default().to_owned(),
                ),
            ];
            (labels, ConstGauge::new(j[key].as_u64().unwrap_or(0) as i64))
        };
        family(
            &mut enc,
            "strata_job_progress_current",
            "Work a job has done, in its own units (bytes for block jobs).",
            None,
            jobs.iter().map(|j| job(j, "current-progress")),
        )?;
        family(
            &mut enc,
            "strata_job_progress_total",
            "Work a job expects to do in all.",
            None,
            jobs.iter().map(|j| job(j, "total-progress")),
        )?;

        let p = process::Sample::now();
        let none = Labels::new;
        family(
            &mut enc,
            "strata_process_resident_memory",
            "Resident set size.",
            Some(&Unit::Bytes),
            p.rss_bytes.map(|v| (none(), ConstGauge::new(v as i64))),
        )?;
        family(
            &mut enc,
            "strata_process_threads",
            "Threads of the daemon.",
            None,
            p.threads.map(|v| (none(), ConstGauge::new(v as i64))),
        )?;
        family(
            &mut enc,
            "strata_process_uptime",
            "Time since the daemon started.",
            Some(&Unit::Seconds),
            p.uptime_s.map(|v| (none(), ConstGauge::new(v))),
        )?;
        Ok(())
    }
}

/// The exposition text for `daemon`, as of now.
pub fn render(daemon: &Arc<Daemon>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(Arc::clone(daemon))));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}
