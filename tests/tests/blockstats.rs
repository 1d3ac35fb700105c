//! `query-blockstats` counts what the guest sent: a known mix of reads,
//! writes, write-zeroes, discards, flushes and a refused read through a
//! two-queue export, read back per export and per node, with the keys
//! qemu-storage-daemon's answer has.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::{json, Value};
use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn blockdevs(img: &str) -> [String; 2] {
    [
        format!("driver=file,node-name=file,filename={img}"),
        "driver=raw,node-name=disk,file=file".into(),
    ]
}

/// A sparse raw image of `size` bytes in `dir`, by path.
fn image(dir: &std::path::Path, size: u64) -> String {
    let img = dir.join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    img.display().to_string()
}

/// A daemon with a two-queue export `vda` of a 64 MiB raw image, and
/// extra export options; the directory lives as long as it is held.
fn two_queue_export(extra: &str) -> (tempfile::TempDir, Daemon, strata_tests::qmp::Qmp) {
    let dir = tempfile::tempdir().unwrap();
    let [file, raw] = blockdevs(&image(dir.path(), 64 * MIB));
    let (d, qmp) = Daemon::qsd_with_monitor(
        dir.path(),
        &[&file, &raw],
        &format!("id=vda,node-name=disk,writable=on,num-queues=2{extra}"),
        &[],
    );
    (dir, d, qmp)
}

fn keys(stats: &Value) -> BTreeSet<String> {
    stats.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn blockstats_count_each_request_the_guest_sent() {
    let (_dir, d, mut qmp) = two_queue_export("");
    let before = qmp.execute("query-blockstats", json!({})).unwrap();
    assert_eq!(before[0]["stats"]["rd_operations"], 0);
    assert!(
        before[0]["stats"].get("idle_time_ns").is_none(),
        "no idle time before any I/O: {before}"
    );

    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    for i in 0..3 {
        c.write(i * MIB, &[7; 4096]).unwrap();
    }
    for i in 0..5 {
        c.read(i * 8 * KIB, 8192).unwrap();
    }
    c.write_zeroes(8 * MIB, 64 * KIB, true).unwrap();
    c.discard(4 * MIB, 64 * KIB).unwrap();
    c.flush().unwrap();
    c.flush().unwrap();
    // Past the end: refused before it runs.
    assert!(c.read(64 * MIB, 4096).is_err());

    let all = qmp.execute("query-blockstats", json!({})).unwrap();
    let list = all.as_array().unwrap();
    assert_eq!(list.len(), 1, "{all}");
    assert_eq!(list[0]["device"], "vda");
    assert_eq!(list[0]["node-name"], "disk");
    let s = &list[0]["stats"];
    let expect = [
        ("rd_operations", 5),
        ("rd_bytes", 5 * 8192),
        ("wr_operations", 4),
        ("wr_bytes", 3 * 4096 + 64 * KIB),
        ("unmap_operations", 1),
        ("unmap_bytes", 64 * KIB),
        ("flush_operations", 2),
        ("wr_highest_offset", 8 * MIB + 64 * KIB),
        ("failed_rd_operations", 0),
        ("failed_wr_operations", 0),
        ("invalid_rd_operations", 1),
        ("invalid_wr_operations", 0),
    ];
    for (k, v) in expect {
        assert_eq!(s[k], json!(v), "{k} in {s}");
    }
    for k in [
        "rd_total_time_ns",
        "wr_total_time_ns",
        "flush_total_time_ns",
    ] {
        assert!(s[k].as_u64().unwrap() > 0, "{k} in {s}");
    }
    assert!(s["idle_time_ns"].is_u64(), "{s}");

    // Per node: the root carries the export's counts; its file none.
    let nodes = qmp
        .execute("query-blockstats", json!({"query-nodes": true}))
        .unwrap();
    let node = |name: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {nodes}"))["stats"]
            .clone()
    };
    assert_eq!(node("disk")["rd_operations"], 5);
    assert_eq!(node("file")["rd_operations"], 0);

    // The same keys as qsd's answer, for a node that had no I/O.
    if let Some(theirs) = qsd_file_stats() {
        assert_eq!(keys(&node("file")), keys(&theirs));
    }
}

/// qemu-storage-daemon's stats of node `file` over an image of its own,
/// untouched by I/O; None without qsd.
fn qsd_file_stats() -> Option<Value> {
    let dir = tempfile::tempdir().unwrap();
    let qmp_sock = dir.path().join("qmp.sock");
    let [file, raw] = blockdevs(&image(dir.path(), 64 * MIB));
    let mut child = Command::new("qemu-storage-daemon")
        .args(["--blockdev", &file, "--blockdev", &raw])
        .arg("--chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            qmp_sock.display()
        ))
        .args(["--monitor", "chardev=m0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !qmp_sock.exists() {
        assert!(std::time::Instant::now() < deadline, "qsd did not listen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut q = strata_tests::qmp::Qmp::connect(&qmp_sock);
    let all = q
        .execute("query-blockstats", json!({"query-nodes": true}))
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    all.as_array()?
        .iter()
        .find(|n| n["node-name"] == "file")
        .map(|n| n["stats"].clone())
}

/// An NBD export counts the same way, per connection, and keeps the
/// counts of connections that ended.
#[test]
fn an_nbd_export_counts_its_clients_requests() {
    use strata_nbd::Command as Cmd;
    use strata_tests::nbd_client::RawClient;
    let dir = tempfile::tempdir().unwrap();
    let [file, raw] = blockdevs(&image(dir.path(), 64 * MIB));
    let (sock, qmp_sock) = (dir.path().join("nbd.sock"), dir.path().join("qmp.sock"));
    let server = format!("addr.type=unix,addr.path={}", sock.display());
    let chardev = format!(
        "socket,id=m0,path={},server=on,wait=off",
        qmp_sock.display()
    );
    let d = Daemon::qsd(
        &[
            "--blockdev",
            &file,
            "--blockdev",
            &raw,
            "--nbd-server",
            &server,
            "--export",
            "type=nbd,id=n0,node-name=disk,name=vm,writable=on",
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=m0",
        ],
        &sock,
        &dir.path().join("log"),
    );
    let mut qmp = strata_tests::qmp::Qmp::connect(&qmp_sock);
    let (mut c, _) = RawClient::go(&sock, "vm", &[]);
    // A structured read may come in several chunks; these are small
    // enough for one.
    let ok = |c: &mut RawClient| RawClient::error_of(&c.reply()) == 0;
    c.send(Cmd::Write, 0, 1, 0, 4096, &[3; 4096]);
    assert!(ok(&mut c));
    for i in 0..2 {
        c.send(Cmd::Read, 0, 2 + i, 0, 4096, &[]);
        assert!(ok(&mut c));
    }
    c.send(Cmd::Flush, 0, 4, 0, 0, &[]);
    assert!(ok(&mut c));
    c.send(Cmd::Trim, 0, 5, MIB, 64 * KIB as u32, &[]);
    assert!(ok(&mut c));
    c.send(Cmd::WriteZeroes, 0, 6, 2 * MIB, 64 * KIB as u32, &[]);
    assert!(ok(&mut c));
    c.send(Cmd::Read, 0, 7, 64 * MIB, 4096, &[]);
    assert!(!ok(&mut c), "a read past the end is refused");

    let check = |qmp: &mut strata_tests::qmp::Qmp| {
        let all = qmp.execute("query-blockstats", json!({})).unwrap();
        let e = all
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["device"] == "n0")
            .unwrap_or_else(|| panic!("no n0 in {all}"))
            .clone();
        let s = &e["stats"];
        for (k, v) in [
            ("rd_operations", 2),
            ("rd_bytes", 8192),
            ("wr_operations", 2),
            ("wr_bytes", 4096 + 64 * KIB),
            ("flush_operations", 1),
            ("unmap_operations", 1),
            ("unmap_bytes", 64 * KIB),
            ("invalid_rd_operations", 1),
            ("wr_highest_offset", 2 * MIB + 64 * KIB),
        ] {
            assert_eq!(s[k], json!(v), "{k} in {s}");
        }
    };
    check(&mut qmp);
    drop(c);
    // The connection's thread folds its counts in as it ends.
    std::thread::sleep(std::time::Duration::from_millis(300));
    check(&mut qmp);
    drop(d);
}

/// `block-latency-histogram-set` counts each finished request into the
/// bins from then on, per kind, in QEMU's shape; bad boundaries and
/// unknown exports are refused by name, and an empty call removes all.
#[test]
fn latency_histograms_bin_every_request_after_they_are_set() {
    let (_dir, d, mut qmp) = two_queue_export("");
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    c.read(0, 4096).unwrap();
    // One boundary no request reaches, one every request does: each
    // request lands in the middle bin.
    let set = json!({"id": "vda", "boundaries": [1, 3_600_000_000_000u64],
                     "boundaries-flush": [1, 2, 3_600_000_000_000u64]});
    qmp.execute("block-latency-histogram-set", set).unwrap();
    for i in 0..3 {
        c.read(i * 4096, 4096).unwrap();
    }
    c.write(0, &[1; 512]).unwrap();
    c.flush().unwrap();
    let stats = |qmp: &mut strata_tests::qmp::Qmp| {
        qmp.execute("query-blockstats", json!({})).unwrap()[0]["stats"].clone()
    };
    let s = stats(&mut qmp);
    assert_eq!(
        s["rd_latency_histogram"],
        json!({"boundaries": [1, 3_600_000_000_000u64], "bins": [0, 3, 0]}),
        "the read before the set is not binned: {s}"
    );
    assert_eq!(s["wr_latency_histogram"]["bins"], json!([0, 1, 0]));
    let flush_bins = s["flush_latency_histogram"]["bins"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(flush_bins.len(), 4);
    assert_eq!(
        flush_bins.iter().map(|b| b.as_u64().unwrap()).sum::<u64>(),
        1
    );

    // Only reads: writes keep counting over what they had.
    qmp.execute(
        "block-latency-histogram-set",
        json!({"id": "vda", "boundaries-read": [5]}),
    )
    .unwrap();
    c.write(4096, &[1; 512]).unwrap();
    let s = stats(&mut qmp);
    assert_eq!(s["rd_latency_histogram"]["bins"], json!([0, 0]));
    assert_eq!(s["wr_latency_histogram"]["bins"], json!([0, 2, 0]));

    for (args, want) in [
        (
            json!({"id": "vda", "boundaries-write": [10, 10]}),
            "Parameter 'boundaries-write': boundaries must be greater than zero and strictly \
             ascending (boundary 1 is 10)",
        ),
        (
            json!({"id": "vda", "boundaries": [0]}),
            "Parameter 'boundaries': boundaries must be greater than zero and strictly \
             ascending (boundary 0 is 0)",
        ),
        (
            json!({"id": "vda", "boundaries": "10"}),
            "Invalid parameter type for 'boundaries', expected: array",
        ),
        (json!({"id": "vda", "boundaries": [-1]}), "boundaries[0]"),
        (json!({"id": "nope"}), "Device 'nope' not found"),
    ] {
        let e = qmp
            .execute("block-latency-histogram-set", args.clone())
            .unwrap_err();
        let desc = e["desc"].as_str().unwrap();
        assert!(desc.contains(want), "{args}: {e}");
    }
    // The refusals changed nothing.
    assert_eq!(
        stats(&mut qmp)["wr_latency_histogram"]["bins"],
        json!([0, 2, 0])
    );

    qmp.execute("block-latency-histogram-set", json!({"id": "vda"}))
        .unwrap();
    let s = stats(&mut qmp);
    for k in [
        "rd_latency_histogram",
        "wr_latency_histogram",
        "flush_latency_histogram",
    ] {
        assert!(s.get(k).is_none(), "{k} still in {s}");
    }
}

/// `stats-intervals` on the export gives `timed_stats`, one entry per
/// interval in QEMU's `BlockDeviceTimedStats` shape, over what ran
/// recently; bad intervals are refused by name.
#[test]
fn timed_stats_cover_each_interval_the_export_was_given() {
    let (_dir, d, mut qmp) = two_queue_export(",stats-intervals.0=60,stats-intervals.1=3600");
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    for i in 0..4 {
        c.read(i * 4096, 4096).unwrap();
    }
    c.write(0, &[2; 4096]).unwrap();
    let all = qmp.execute("query-blockstats", json!({})).unwrap();
    let timed = all[0]["stats"]["timed_stats"].as_array().unwrap().clone();
    assert_eq!(timed.len(), 2, "{all}");
    let want: BTreeSet<String> = [
        "interval_length",
        "min_rd_latency_ns",
        "max_rd_latency_ns",
        "avg_rd_latency_ns",
        "min_wr_latency_ns",
        "max_wr_latency_ns",
        "avg_wr_latency_ns",
        "min_flush_latency_ns",
        "max_flush_latency_ns",
        "avg_flush_latency_ns",
        "avg_rd_queue_depth",
        "avg_wr_queue_depth",
    ]
    .map(String::from)
    .into();
    for (t, len) in timed.iter().zip([60, 3600]) {
        assert_eq!(keys(t), want);
        assert_eq!(t["interval_length"], len);
        let n = |k: &str| t[k].as_u64().unwrap();
        assert!(n("min_rd_latency_ns") > 0, "{t}");
        assert!(n("min_rd_latency_ns") <= n("avg_rd_latency_ns"), "{t}");
        assert!(n("avg_rd_latency_ns") <= n("max_rd_latency_ns"), "{t}");
        assert_eq!(
            n("min_wr_latency_ns"),
            n("max_wr_latency_ns"),
            "one write: {t}"
        );
        assert_eq!(n("max_flush_latency_ns"), 0, "no flush: {t}");
        // The reads took a sliver of the seconds the window covers.
        let depth = t["avg_rd_queue_depth"].as_f64().unwrap();
        assert!(depth > 0.0 && depth < 1.0, "{t}");
    }
    // Per node, the exported node carries the same windows.
    let nodes = qmp
        .execute("query-blockstats", json!({"query-nodes": true}))
        .unwrap();
    let disk = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk")
        .unwrap();
    assert_eq!(disk["stats"]["timed_stats"].as_array().unwrap().len(), 2);

    for (bad, want) in [
        (json!([0]), "stats-intervals.0 is 0"),
        (
            json!([60, 1u64 << 40]),
            "stats-intervals.1 is 1099511627776",
        ),
        (
            json!([1, 2, 3, 4, 5, 6, 7, 8, 9]),
            "at most 8 stats-intervals",
        ),
        (
            json!("60"),
            "Invalid parameter type for 'stats-intervals', expected: array",
        ),
    ] {
        let e = qmp
            .execute(
                "block-export-add",
                json!({"type": "nbd", "id": "n", "node-name": "disk", "stats-intervals": bad}),
            )
            .unwrap_err();
        assert!(e["desc"].as_str().unwrap().contains(want), "{bad}: {e}");
    }
}
