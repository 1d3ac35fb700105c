//! `blockdev-mirror` under a writing frontend: into a local qcow2 in both
//! copy modes, and into an NBD export of another daemon, which is how a VM
//! whose disk is not on shared storage moves to another host. Whatever the
//! frontend wrote before, during and after the switch is on the target.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;
use strata_tests::qemu::{create, qemu_img, to_raw};
use strata_tests::qmp::Qmp;

const SIZE: u64 = 32 << 20;

/// Writes `len`-byte blocks of a pattern that names the write at offsets
/// that walk the disk, into the disk and into `shadow`, until `stop`. It
/// paces itself, as a guest that leaves a background mirror the bandwidth
/// to converge (one writing flat out needs write-blocking).
fn writer(
    socket: std::path::PathBuf,
    shadow: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut c = SyncClient::connect(&socket, false).unwrap();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let len = [4096usize, 65536, 12288][(i % 3) as usize];
            let at = (i.wrapping_mul(2_654_435_761) % (SIZE / 4096 - 16)) * 4096;
            let data: Vec<u8> = (0..len)
                .map(|k| (i as u8) ^ (k as u8 >> 3) ^ 0x5a)
                .collect();
            c.write(at, &data)
                .unwrap_or_else(|e| panic!("write {i} at {at}: errno {e}"));
            shadow.lock().unwrap()[at as usize..at as usize + len].copy_from_slice(&data);
            i += 1;
            std::thread::sleep(Duration::from_millis(4));
        }
        c.flush().unwrap();
        i
    })
}

/// A daemon serving `source` (raw) as `disk` over vhost-user with a
/// monitor, plus the extra `blockdevs`.
fn source(dir: &Path, img: &Path, blockdevs: &[String]) -> (Daemon, Qmp) {
    let disk = format!(
        "driver=raw,node-name=disk,file.driver=file,file.filename={}",
        img.display()
    );
    let mut all: Vec<&str> = vec![disk.as_str()];
    all.extend(blockdevs.iter().map(String::as_str));
    Daemon::qsd_with_monitor(dir, &all, "id=v0,node-name=disk,writable=on", &[])
}

/// Mirrors `disk` into `target` under writes, completes, writes on, and
/// returns what the disk must now hold.
fn mirror_under_writes(d: &Daemon, qmp: &mut Qmp, img: &Path, target: &str, mode: &str) -> Vec<u8> {
    // A raw image's bytes are the disk's.
    let shadow = Arc::new(Mutex::new(std::fs::read(img).unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(
        d.socket().to_path_buf(),
        Arc::clone(&shadow),
        Arc::clone(&stop),
    );
    std::thread::sleep(Duration::from_millis(300));
    qmp.execute(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "disk", "target": target, "sync": "full",
               "copy-mode": mode, "speed": 64 << 20}),
    )
    .unwrap();
    qmp.wait_event("BLOCK_JOB_READY", "device", "m", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    qmp.execute("block-job-complete", json!({"device": "m"}))
        .unwrap();
    let done = qmp.wait_event(
        "BLOCK_JOB_COMPLETED",
        "device",
        "m",
        Duration::from_secs(60),
    );
    assert!(done.get("error").is_none(), "{done}");
    // The frontend goes on writing, now to the target.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let writes = w.join().expect("no write failed");
    assert!(writes > 50, "only {writes} writes");
    let expected = shadow.lock().unwrap().clone();
    let mut c = SyncClient::connect(d.socket(), true).unwrap();
    for at in (0..SIZE).step_by(4 << 20) {
        let got = c.read(at, 4 << 20).unwrap();
        assert!(
            got == expected[at as usize..(at + (4 << 20)) as usize],
            "the disk differs in the 4 MiB at {at}"
        );
    }
    expected
}

fn seeded_source(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("source.raw");
    create(&img, "raw", &SIZE.to_string());
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 8M",
            "-c",
            "write -P 0x44 20M 1M",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success());
    img
}

/// A seeded source served with an empty qcow2 target node `tgt`: the
/// source image, the target image, the daemon and its monitor.
fn with_local_target(dir: &Path) -> (PathBuf, PathBuf, Daemon, Qmp) {
    let img = seeded_source(dir);
    let target = dir.join("target.qcow2");
    create(&target, "qcow2", &SIZE.to_string());
    let (d, qmp) = source(
        dir,
        &img,
        &[format!(
            "driver=qcow2,node-name=tgt,file.driver=file,file.filename={}",
            target.display()
        )],
    );
    (img, target, d, qmp)
}

#[test]
fn a_mirror_under_writes_ends_with_everything_on_the_target() {
    for mode in ["background", "write-blocking"] {
        let dir = tempfile::tempdir().unwrap();
        let (img, target, d, mut qmp) = with_local_target(dir.path());
        let expected = mirror_under_writes(&d, &mut qmp, &img, "tgt", mode);
        let (status, log) = d.stop();
        assert!(status.success(), "{log}");
        assert!(to_raw(&target) == expected, "{mode}: the target differs");
        let (code, out, e) = qemu_img(&["check", target.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{e}");
    }
}

#[test]
fn storage_migration_mirrors_a_live_disk_to_another_daemon_over_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();

    // The destination host: an empty disk, exported over NBD as libvirt
    // sets it up before a migration.
    let dest = dst_dir.join("disk.qcow2");
    create(&dest, "qcow2", &SIZE.to_string());
    let port = strata_tests::nbd_client::free_port();
    let dst = Daemon::qsd(
        &[
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
                dest.display()
            ),
            "--nbd-server",
            &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            "--export",
            "type=nbd,id=incoming,node-name=disk,writable=on",
        ],
        &dst_dir.join("nbd.sock"),
        &dst_dir.join("log"),
    );

    // The source host: the live disk, a node on the destination's export,
    // and the mirror between them.
    let img = seeded_source(&src_dir);
    let (d, mut qmp) = source(&src_dir, &img, &[]);
    qmp.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "export": "disk",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
    )
    .unwrap();
    // As libvirt does.
    let expected = mirror_under_writes(&d, &mut qmp, &img, "remote", "write-blocking");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let (status, log) = dst.stop();
    assert!(status.success(), "{log}");
    assert!(to_raw(&dest) == expected, "the destination differs");
    let (code, out, e) = qemu_img(&["check", dest.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{e}");
}

#[test]
fn cancelling_a_ready_mirror_leaves_a_copy_of_the_disk_at_that_moment() {
    let dir = tempfile::tempdir().unwrap();
    let (img, target, d, mut qmp) = with_local_target(dir.path());
    let shadow = Arc::new(Mutex::new(std::fs::read(&img).unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(
        d.socket().to_path_buf(),
        Arc::clone(&shadow),
        Arc::clone(&stop),
    );
    qmp.execute(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "disk", "target": "tgt", "sync": "full",
               "speed": 64 << 20}),
    )
    .unwrap();
    qmp.wait_event("BLOCK_JOB_READY", "device", "m", Duration::from_secs(60));
    // Writes marked but not yet copied are copied by the cancel itself.
    stop.store(true, Ordering::Relaxed);
    w.join().expect("no write failed");
    qmp.execute("block-job-cancel", json!({"device": "m"}))
        .unwrap();
    qmp.wait_event(
        "BLOCK_JOB_COMPLETED",
        "device",
        "m",
        Duration::from_secs(60),
    );
    let exports = qmp.execute("query-block-exports", json!({})).unwrap();
    assert_eq!(exports[0]["node-name"], "disk", "{exports}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let expected = shadow.lock().unwrap().clone();
    assert!(
        std::fs::read(&img).unwrap() == expected,
        "the source differs"
    );
    assert!(to_raw(&target) == expected, "the target is not a copy");
}
