//! `--metrics`, scraped with curl: a vhost-user export's counts per
//! queue agree with `query-blockstats`, and a bad address is refused by
//! name before the daemon starts.

use std::process::Command;

use serde_json::json;
use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;

/// The value of the sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_scrape_counts_each_queue_as_query_blockstats_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let file = format!("driver=file,node-name=file,filename={}", img.display());
    let (d, mut qmp) = Daemon::qsd_with_monitor(
        dir.path(),
        &[&file, "driver=raw,node-name=disk,file=file"],
        "id=vda,node-name=disk,writable=on,num-queues=2",
        &["--metrics", "127.0.0.1:0"],
    );
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    for i in 0..3 {
        c.read(i * 4096, 4096).unwrap();
    }
    c.write(0, &[5; 8192]).unwrap();
    c.flush().unwrap();
    assert!(c.read(16 << 20, 512).is_err());

    let log = d.log_text();
    let addr = log
        .split("metrics on http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_owned();
    let out = Command::new("curl")
        .args([
            "-sSf",
            "--max-time",
            "10",
            &format!("http://{addr}/metrics"),
        ])
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");

    let q = |name: &str, queue: u32, op: &str| {
        sample(
            &text,
            &format!(
                "{name}{{export=\"vda\",type=\"vhost-user-blk\",node=\"disk\",queue=\"{queue}\",op=\"{op}\"}}"
            ),
        )
    };
    // blkio's client uses the first queue.
    assert_eq!(q("strata_export_requests_total", 0, "read"), 3.0);
    assert_eq!(q("strata_export_requests_total", 1, "read"), 0.0);
    assert_eq!(q("strata_export_requests_total", 0, "write"), 1.0);
    assert_eq!(q("strata_export_requests_total", 0, "flush"), 1.0);
    assert_eq!(
        q("strata_export_transferred_bytes_total", 0, "write"),
        8192.0
    );
    assert_eq!(q("strata_export_invalid_requests_total", 0, "read"), 1.0);
    assert_eq!(q("strata_export_latency_seconds_count", 0, "read"), 3.0);

    let s = &qmp.execute("query-blockstats", json!({})).unwrap()[0]["stats"];
    let sum_ns = q("strata_export_latency_seconds_sum", 0, "read")
        + q("strata_export_latency_seconds_sum", 1, "read");
    let qmp_ns = s["rd_total_time_ns"].as_u64().unwrap() as f64;
    assert!(
        (sum_ns * 1e9 - qmp_ns).abs() < 1e3,
        "{sum_ns} s vs {qmp_ns} ns"
    );
    assert_eq!(s["rd_operations"], 3);

    assert!(sample(&text, "strata_process_threads ") >= 3.0);
}

#[test]
fn a_bad_metrics_address_is_refused_by_name() {
    let out = Command::new(strata_tests::daemon::strata_bin())
        .args([
            "serve",
            "--socket",
            "/nonexistent/x.sock",
            "--metrics",
            "9100",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--metrics") && err.contains("'9100' is not HOST:PORT"),
        "{err}"
    );
}
