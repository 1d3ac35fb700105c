//! `driver=rbd` against a real one-node Ceph cluster (ci/ceph-cluster,
//! started by ci/test, which names its ceph.conf in STRATA_CEPH_CONF):
//! what `rbd import` put in reads back through Strata, what Strata writes
//! `rbd export` and qemu-io's `rbd:` protocol see, discards free space,
//! a snapshot serves read-only, and bad names are refused by name.
//!
//! They need the cluster, so a plain `cargo test` ignores them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;
use strata_tests::pattern::pattern;

const MIB: u64 = 1 << 20;

fn conf() -> PathBuf {
    std::env::var("STRATA_CEPH_CONF")
        .expect("STRATA_CEPH_CONF names the test cluster's ceph.conf (ci/test starts one)")
        .into()
}

/// Runs `rbd -c CONF ARGS`, which must succeed; its stdout.
fn rbd(args: &[&str]) -> String {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf())
        .args(args)
        .output()
        .expect("rbd runs (apt-get install ceph-common)");
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh image of `size` bytes holding `data` at 0, named after `base`
/// and this run: an image a killed client had open keeps its watcher for
/// a while, so names are never reused. Returns the name.
fn image(dir: &Path, base: &str, data: &[u8], size: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("{base}-{}-{nanos}", std::process::id());
    let src = dir.join(format!("{base}.src"));
    let mut bytes = data.to_vec();
    bytes.resize(size as usize, 0);
    std::fs::write(&src, &bytes).unwrap();
    rbd(&["import", src.to_str().unwrap(), &format!("rbd/{name}")]);
    name
}

/// A frontend on `d`'s export that gives up on a request after a minute,
/// so a daemon that died fails the test instead of hanging it.
fn client(d: &Daemon, read_only: bool) -> SyncClient {
    let mut c = SyncClient::connect(d.socket(), read_only).unwrap();
    c.timeout = Some(std::time::Duration::from_secs(60));
    c
}

fn serve(dir: &Path, node: &str, writable: bool) -> (Daemon, strata_tests::qmp::Qmp) {
    let export = format!(
        "id=vda,node-name=disk,writable={}",
        if writable { "on" } else { "off" }
    );
    Daemon::qsd_with_monitor(dir, &[node], &export, &[])
}

/// client.admin's cephx key, base64.
fn admin_key() -> String {
    let out = Command::new("ceph")
        .arg("-c")
        .arg(conf())
        .args(["auth", "get-key", "client.admin"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn rbd_node(name: &str, extra: &str) -> String {
    format!(
        "driver=rbd,node-name=disk,pool=rbd,image={name},conf={},user=admin{extra}",
        conf().display()
    )
}

#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn an_rbd_image_round_trips_through_strata() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(8 * MIB as usize, 7);
    let rt = image(dir.path(), "rt", &data, 16 * MIB);
    let (d, mut qmp) = serve(dir.path(), &rbd_node(&rt, ",discard=unmap"), true);
    let mut c = client(&d, false);
    assert_eq!(c.capacity, 16 * MIB);
    for at in (0..16 * MIB).step_by(MIB as usize) {
        let got = c.read(at, MIB as usize).unwrap();
        let want = data
            .get(at as usize..(at + MIB) as usize)
            .map_or(vec![0; MIB as usize], <[u8]>::to_vec);
        assert!(
            got == want,
            "bytes at {at} differ from what rbd import wrote"
        );
    }

    // Writes land in the cluster, for rbd export to see.
    let pattern = pattern(64 * 1024, 9);
    c.write(12 * MIB, &pattern).unwrap();
    c.write_zeroes(MIB, 4096, false).unwrap();
    c.flush().unwrap();
    let exported = dir.path().join("rt.out");
    rbd(&["export", &format!("rbd/{rt}"), exported.to_str().unwrap()]);
    let out = std::fs::read(&exported).unwrap();
    assert!(out[12 * MIB as usize..][..pattern.len()] == pattern[..]);
    assert!(out[MIB as usize..][..4096].iter().all(|&b| b == 0));
    assert!(out[..MIB as usize] == data[..MIB as usize]);

    // qemu-io over QEMU's own rbd: protocol reads what Strata wrote, and
    // Strata reads what it writes.
    let spec = format!("rbd:rbd/{rt}:conf={}", conf().display());
    let io = |cmd: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &spec])
            .output()
            .expect("qemu-io (apt-get install qemu-block-extra)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("fail"),
            "qemu-io {cmd}: {text}"
        );
    };
    io(&format!("read -P 0 {} 4096", MIB));
    io(&format!("write -P 0x5a {} 65536", 14 * MIB));
    assert!(c.read(14 * MIB, 65536).unwrap().iter().all(|&b| b == 0x5a));

    // Discarding whole objects (4 MiB) gives their space back.
    let used = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&rbd(&["du", "--format", "json", &format!("rbd/{rt}")])).unwrap();
        v["images"][0]["used_size"].as_u64().unwrap()
    };
    let before = used();
    c.discard(4 * MIB, 4 * MIB).unwrap();
    c.flush().unwrap();
    assert!(used() < before, "rbd du: {} then {}", before, used());
    assert!(c.read(4 * MIB, 4096).unwrap().iter().all(|&b| b == 0));

    // query-named-block-nodes knows the driver and the size.
    let nodes = qmp.execute("query-named-block-nodes", json!({})).unwrap();
    let node = &nodes.as_array().unwrap()[0];
    assert_eq!(node["drv"], "rbd", "{node}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn a_snapshot_serves_read_only_what_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(MIB as usize, 3);
    let snap = image(dir.path(), "snap", &data, 8 * MIB);
    rbd(&["snap", "create", &format!("rbd/{snap}@s1")]);
    // The image moves on after the snapshot.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 1M"])
        .arg(format!("rbd:rbd/{snap}:conf={}", conf().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (d, _q) = serve(dir.path(), &rbd_node(&snap, ",snapshot=s1"), false);
    let mut c = client(&d, true);
    assert!(c.read(0, MIB as usize).unwrap() == data);
    // A write to a snapshot cannot happen: the export is read-only, and
    // the node would refuse it too.
    assert!(c.write(0, &[1; 512]).is_err());
}

#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn bad_pools_images_and_options_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            format!(
                "driver=rbd,node-name=disk,pool=nopool,image=x,conf={}",
                conf().display()
            ),
            "cannot open pool 'nopool'",
        ),
        (
            rbd_node("no-such-image", ""),
            "cannot open RBD image 'rbd/no-such-image'",
        ),
        (
            "driver=rbd,node-name=disk,pool=rbd,image=x,conf=/nonexistent/ceph.conf".to_owned(),
            "cannot read Ceph configuration '/nonexistent/ceph.conf'",
        ),
        (
            rbd_node("x", ",key-secret=s"),
            "key-secret: no secret with id 's'",
        ),
        ("driver=rbd,node-name=disk,pool=rbd".to_owned(), "'image'"),
    ];
    for (node, want) in cases {
        let out = Command::new(strata_tests::daemon::strata_bin())
            .args(["--blockdev", &node])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{node}: {err}");
    }
}

/// A QEMU guest runs verified random writes on two queues of an RBD disk
/// served by Strata, while the cluster's only OSD is frozen (SIGSTOP) for
/// 5 s and thawed: the requests wait and resume, and fio sees no error.
#[test]
#[ignore = "needs the Ceph test cluster and the test guest; ci/test runs it"]
fn a_guest_runs_fio_verify_on_rbd_through_a_frozen_osd() {
    let dir = tempfile::tempdir().unwrap();
    let name = image(dir.path(), "guest", &[], 256 * MIB);
    let node = rbd_node(&name, ",discard=unmap");
    let export = "id=vda,node-name=disk,writable=on,num-queues=2";
    let (d, _q) = Daemon::qsd_with_monitor(dir.path(), &[&node], export, &[]);
    let pid_file = conf().parent().unwrap().join("run/osd.0.pid");
    let osd: i32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap();
    let mut frozen = None;
    let run = strata_tests::guest::boot_watching(
        d.socket(),
        2,
        "fio-long25",
        std::time::Duration::from_secs(300),
        &mut |line| {
            if line.starts_with("STRATA fio-running") && frozen.is_none() {
                std::thread::sleep(std::time::Duration::from_secs(3));
                // SAFETY: signalling a process of the test's own cluster.
                unsafe { libc::kill(osd, libc::SIGSTOP) };
                std::thread::sleep(std::time::Duration::from_secs(5));
                // SAFETY: as above.
                unsafe { libc::kill(osd, libc::SIGCONT) };
                frozen = Some(());
            }
        },
    );
    // Never leave the cluster frozen, whatever happened.
    // SAFETY: as above.
    unsafe { libc::kill(osd, libc::SIGCONT) };
    for l in &run.lines {
        println!("{l}");
    }
    assert!(
        run.done,
        "the guest did not finish:\n{}\n{}",
        run.console,
        d.log_text()
    );
    assert!(frozen.is_some(), "fio never started");
    assert!(
        run.failures().is_empty(),
        "{:?}\n{}",
        run.failures(),
        d.log_text()
    );
    assert_eq!(run.value("STRATA fio", "rc").as_deref(), Some("0"));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// `strata serve` takes an image in Ceph as qemu-img names it.
#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn serve_takes_an_rbd_name_as_qemu_img_spells_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(MIB as usize, 11);
    let served = image(dir.path(), "served", &data, 4 * MIB);
    let name = format!("rbd:rbd/{served}:conf={}:id=admin", conf().display());
    let d = Daemon::serve(
        &[&name, "--num-queues", "2"],
        &dir.path().join("vm.sock"),
        &dir.path().join("log"),
    );
    let mut c = client(&d, false);
    assert_eq!(c.capacity, 4 * MIB);
    assert!(c.read(0, MIB as usize).unwrap() == data);
    c.write(2 * MIB, &[6; 4096]).unwrap();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    let out = Command::new(strata_tests::daemon::strata_bin())
        .args(["serve", &name, "--create", "1G", "--socket"])
        .arg(dir.path().join("x.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rbd create"), "{err}");
}

/// A golden image in Ceph under a local qcow2 overlay: `block-stream`
/// pulls the RBD image's data into the overlay while a frontend writes to
/// the disk, and the overlay then stands alone with both.
#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn block_stream_pulls_an_rbd_backing_into_a_local_overlay_under_io() {
    let dir = tempfile::tempdir().unwrap();
    let golden = pattern(8 * MIB as usize, 21);
    let golden_name = image(dir.path(), "golden", &golden, 32 * MIB);
    let overlay = dir.path().join("overlay.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&overlay)
        .arg("32M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let base = format!(
        "driver=rbd,node-name=base,pool=rbd,image={golden_name},conf={},read-only=on",
        conf().display()
    );
    let file = format!("driver=file,node-name=of,filename={}", overlay.display());
    let (d, mut qmp) = Daemon::qsd_with_monitor(
        dir.path(),
        &[
            &base,
            &file,
            "driver=qcow2,node-name=top,file=of,backing=base",
        ],
        "id=vda,node-name=top,writable=on",
        &[],
    );
    let mut c = client(&d, false);
    assert!(c.read(MIB, 4096).unwrap()[..] == golden[MIB as usize..][..4096]);

    qmp.execute(
        "block-stream",
        json!({"job-id": "s", "device": "top", "speed": 8 * MIB}),
    )
    .unwrap();
    // The frontend writes while the job copies.
    let mine = pattern(MIB as usize, 22);
    for i in 0..4 {
        c.write(
            20 * MIB + i * 256 * 1024,
            &mine[(i * 256 * 1024) as usize..][..256 * 1024],
        )
        .unwrap();
    }
    c.write(2 * MIB, &[9; 4096]).unwrap();
    let done = qmp.wait_event(
        "BLOCK_JOB_COMPLETED",
        "device",
        "s",
        std::time::Duration::from_secs(120),
    );
    assert!(done.get("error").is_none(), "{done}");
    let nodes = qmp.execute("query-named-block-nodes", json!({})).unwrap();
    let top = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "top")
        .unwrap();
    assert!(
        top.get("backing_file")
            .is_none_or(|b| b.is_null() || b == ""),
        "top still has a backing file: {top}"
    );
    c.flush().unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // The overlay alone holds the golden data, and what was written.
    let raw = dir.path().join("flat.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&overlay)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flat = std::fs::read(&raw).unwrap();
    let mut want = golden.clone();
    want[2 * MIB as usize..][..4096].fill(9);
    assert!(
        flat[..8 * MIB as usize] == want[..],
        "the golden data did not all arrive"
    );
    assert!(flat[20 * MIB as usize..][..MIB as usize] == mine[..]);
    let info = Command::new("qemu-img")
        .arg("info")
        .arg(&overlay)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(!info.contains("backing file"), "{info}");
}

/// With `key-secret` and `server`, no ceph.conf and no keyring are needed:
/// the key comes from a `secret` object. A wrong key is refused by the
/// cluster, and the error says so.
#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn a_key_secret_and_a_monitor_address_are_all_it_takes() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(MIB as usize, 5);
    let keyed = image(dir.path(), "keyed", &data, 4 * MIB);
    let key = admin_key();
    let node = format!(
        "driver=rbd,node-name=disk,pool=rbd,image={keyed},key-secret=k,\
         server.0.host=127.0.0.1,server.0.port=3300"
    );
    let node = node.as_str();
    let secret = format!("secret,id=k,data={},format=base64", key.trim());
    let (d, _q) = Daemon::qsd_with_monitor(
        dir.path(),
        &[node],
        "id=vda,node-name=disk",
        &["--object", &secret],
    );
    let mut c = client(&d, true);
    assert!(c.read(0, MIB as usize).unwrap() == data);
    drop(c);
    drop(d);

    // A well-formed key the cluster does not know.
    let out = Command::new("ceph-authtool")
        .arg("--gen-print-key")
        .output()
        .unwrap();
    let unknown = String::from_utf8(out.stdout).unwrap();
    let wrong = format!("secret,id=k,data={},format=base64", unknown.trim());
    let out = Command::new(strata_tests::daemon::strata_bin())
        .args(["--object", &wrong, "--blockdev", node])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot connect to the Ceph cluster"),
        "{err}"
    );
}

/// A daemon that stops lets go of the image's exclusive lock: the next
/// writer (a restarted daemon, qemu-io) gets in at once, not after the
/// cluster's 30 s wait for a dead owner.
#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn a_stopped_daemon_lets_the_next_writer_in_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let name = image(dir.path(), "handover", &[], 4 * MIB);
    let (d, _q) = serve(dir.path(), &rbd_node(&name, ""), true);
    let mut c = client(&d, false);
    // Writing takes the lock.
    c.write(0, &[4; 4096]).unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    let start = std::time::Instant::now();
    let out = Command::new("timeout")
        .args(["20", "qemu-io", "-f", "raw", "-c", "write -P 5 4096 4096"])
        .arg(format!("rbd:rbd/{name}:conf={}", conf().display()))
        .output()
        .unwrap();
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < std::time::Duration::from_secs(10),
        "the next writer waited {took:?} for the lock"
    );
}

/// `block_resize` grows the image in the cluster, and the frontend sees
/// the new size.
#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn block_resize_grows_the_image_in_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let name = image(dir.path(), "grow", &[], 8 * MIB);
    let (d, mut qmp) = serve(dir.path(), &rbd_node(&name, ""), true);
    qmp.execute(
        "block_resize",
        json!({"node-name": "disk", "size": 24 * MIB}),
    )
    .unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&rbd(&["info", "--format", "json", &format!("rbd/{name}")])).unwrap();
    assert_eq!(info["size"], 24 * MIB, "{info}");
    let mut c = client(&d, false);
    assert_eq!(c.capacity, 24 * MIB);
    c.write(20 * MIB, &[3; 4096]).unwrap();
    assert!(c.read(20 * MIB, 4096).unwrap().iter().all(|&b| b == 3));
}

/// A librbd error reaches the frontend as an I/O error, and the daemon
/// goes on serving: blocklisting the daemon's Ceph client makes every
/// request of its node fail, while a node added afterwards (a new client)
/// serves another image.
#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn a_librbd_error_reaches_the_frontend_and_the_daemon_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let name = image(dir.path(), "fenced", &[6; 4096], 4 * MIB);
    let (d, mut qmp) = serve(dir.path(), &rbd_node(&name, ""), true);
    let mut c = client(&d, false);
    c.write(4096, &[7; 4096]).unwrap();

    let status: serde_json::Value = serde_json::from_str(&rbd(&[
        "status",
        "--format",
        "json",
        &format!("rbd/{name}"),
    ]))
    .unwrap();
    let addr = status["watchers"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no watcher in {status}"))
        .to_owned();
    let ceph = |args: &[&str]| {
        let out = Command::new("ceph")
            .arg("-c")
            .arg(conf())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ceph {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ceph(&["osd", "blocklist", "add", &addr]);

    // The OSD map that fences the client reaches it within moments; until
    // then a request may still go through.
    let start = std::time::Instant::now();
    let err = loop {
        match c.write(0, &[8; 4096]) {
            Err(e) => break e,
            Ok(()) if start.elapsed() < std::time::Duration::from_secs(30) => {
                std::thread::sleep(std::time::Duration::from_millis(200))
            }
            Ok(()) => panic!("writes still succeed 30 s after the blocklist"),
        }
    };
    assert_eq!(err, -libc::EIO, "a failed write is an I/O error");
    assert_eq!(c.read(0, 4096).unwrap_err(), -libc::EIO);

    // The daemon is still there: it answers its monitor, and a new node on
    // another image serves through a second export. The sandbox keeps the
    // daemon out of the cluster's directory, so that node names its
    // monitor and key rather than a ceph.conf, as README says.
    let other = image(dir.path(), "after", &[9; 4096], 4 * MIB);
    let e = qmp
        .execute(
            "blockdev-add",
            json!({"driver": "rbd", "node-name": "other", "pool": "rbd", "image": other,
                   "conf": conf(), "user": "admin"}),
        )
        .unwrap_err();
    let desc = e["desc"].as_str().unwrap();
    assert!(
        desc.contains(conf().to_str().unwrap()) && desc.contains("Permission denied"),
        "{e}"
    );
    qmp.execute(
        "object-add",
        json!({"qom-type": "secret", "id": "k", "data": admin_key(), "format": "base64"}),
    )
    .unwrap();
    qmp.execute(
        "blockdev-add",
        json!({"driver": "rbd", "node-name": "other", "pool": "rbd", "image": other,
               "key-secret": "k", "server": [{"host": "127.0.0.1", "port": "3300"}]}),
    )
    .unwrap();
    let sock2 = dir.path().join("vhost2.sock");
    qmp.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "vdb", "node-name": "other", "writable": true,
               "addr": {"type": "unix", "path": sock2}}),
    )
    .unwrap();
    let mut c2 = SyncClient::connect(&sock2, false).unwrap();
    c2.timeout = Some(std::time::Duration::from_secs(60));
    assert!(c2.read(0, 4096).unwrap().iter().all(|&b| b == 9));
    c2.write(0, &[10; 4096]).unwrap();
    assert!(c2.read(0, 4096).unwrap().iter().all(|&b| b == 10));
    qmp.execute("query-block-exports", json!({})).unwrap();

    ceph(&["osd", "blocklist", "rm", &addr]);
    drop((c, c2));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The cache mode reaches librbd as QEMU sets it: `cache.direct=on` turns
/// `rbd_cache` off, and `cache.no-flush=on` keeps flushes from the
/// cluster. librbd's own admin socket is the witness.
#[test]
#[ignore = "needs the Ceph test cluster; ci/test runs it"]
fn the_cache_mode_sets_librbds_cache_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let name = image(dir.path(), "cache", &[], 4 * MIB);
    let asok = dir.path().join("client.asok");
    let text = std::fs::read_to_string(conf()).unwrap();
    let local = dir.path().join("ceph.conf");
    std::fs::write(
        &local,
        text.lines()
            .filter(|l| !l.starts_with("admin socket"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .replacen(
                "[global]\n",
                &format!("[global]\nadmin socket = {}\n", asok.display()),
                1,
            ),
    )
    .unwrap();
    let ask = |cmd: &[&str]| -> serde_json::Value {
        let out = Command::new("ceph")
            .arg("--admin-daemon")
            .arg(&asok)
            .args(cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let flushes = || -> u64 {
        let dump = ask(&["perf", "dump"]);
        let (_, image) = dump
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.starts_with("librbd-"))
            .unwrap_or_else(|| panic!("no librbd counters in {dump}"));
        image["flush"].as_u64().unwrap()
    };
    for (cache, want_cache, flush_reaches) in [
        ("cache.direct=on,cache.no-flush=on", "false", false),
        ("cache.direct=off", "true", true),
    ] {
        let node = format!(
            "driver=rbd,node-name=disk,pool=rbd,image={name},conf={},user=admin,{cache}",
            local.display()
        );
        let (d, _q) = serve(dir.path(), &node, true);
        assert_eq!(
            ask(&["config", "get", "rbd_cache"])["rbd_cache"],
            want_cache
        );
        let mut c = client(&d, false);
        c.write(0, &[1; 4096]).unwrap();
        let before = flushes();
        c.flush().unwrap();
        assert_eq!(flushes() > before, flush_reaches, "{cache}");
        drop(c);
        let (status, log) = d.stop();
        assert!(status.success(), "{log}");
    }
}

/// A bad `rbd:` name on `strata serve` is refused with its reason said
/// once.
#[test]
#[ignore = "needs librbd (ci/test installs Ceph for the cluster tests)"]
fn serve_names_a_missing_ceph_conf_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(strata_tests::daemon::strata_bin())
        .args(["serve", "rbd:rbd/x:conf=/nonexistent/ceph.conf", "--socket"])
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        err.matches("cannot read Ceph configuration '/nonexistent/ceph.conf'")
            .count(),
        1,
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");
}
