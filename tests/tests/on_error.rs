//! `on-error`, against a real full volume: a qcow2 image on a tmpfs too
//! small for what the client writes. With the default policy the writes
//! that do not fit wait; the operator grows the tmpfs and resumes the
//! export, and every write completes. Needs root (mount).

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use strata_tests::client::SyncClient;
use strata_tests::daemon::{strata_bin, Daemon};
use strata_tests::host::Tmpfs;
use strata_tests::qmp::Qmp;

const MIB: u64 = 1 << 20;

/// Serves `img` (qcow2) through the qsd command line, with `export_opts`
/// added to the export.
fn serve(dir: &Path, img: &Path, export_opts: &str) -> (Daemon, Qmp) {
    Daemon::qsd_with_monitor(
        dir,
        &[
            &format!("driver=file,node-name=file,filename={}", img.display()),
            "driver=qcow2,node-name=disk,file=file",
        ],
        &format!("id=e0,node-name=disk,writable=on{export_opts}"),
        &[],
    )
}

/// A 64 MiB qcow2 image on a tmpfs that holds `size`.
fn small_volume(dir: &Path, size: &str) -> (Tmpfs, std::path::PathBuf) {
    let fs = Tmpfs::mount(dir, "vol", size);
    let img = fs.path.join("disk.qcow2");
    strata_tests::qemu::create(&img, "qcow2", "64M");
    (fs, img)
}

fn pattern(i: u64) -> Vec<u8> {
    vec![0x40 + i as u8; MIB as usize]
}

fn export_status(qmp: &mut Qmp) -> (String, u64) {
    let e = qmp.execute("query-block-exports", json!({})).unwrap();
    (
        e[0]["io-status"].as_str().unwrap().to_owned(),
        e[0]["held-requests"].as_u64().unwrap(),
    )
}

#[test]
fn writes_to_a_full_volume_wait_until_it_grows_and_the_export_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (fs, img) = small_volume(dir.path(), "8M");
    let (d, qmp) = serve(dir.path(), &img, "");
    fill_grow_resume(d, qmp, &fs, &img, "e0");
}

#[test]
fn strata_serve_with_a_monitor_holds_too() {
    let dir = tempfile::tempdir().unwrap();
    let (fs, img) = small_volume(dir.path(), "8M");
    let qmp_sock = dir.path().join("qmp.sock");
    let d = Daemon::serve(
        &[
            img.to_str().unwrap(),
            "--format",
            "qcow2",
            "--qmp",
            qmp_sock.to_str().unwrap(),
        ],
        &dir.path().join("vhost.sock"),
        &dir.path().join("log"),
    );
    let qmp = Qmp::connect(&qmp_sock);
    fill_grow_resume(d, qmp, &fs, &img, "vhost-user-blk0");
}

/// Writes 16 MiB to a disk whose volume holds less: the writes that do not
/// fit are held; a reopen still drains; growing the volume and resuming
/// export `id` completes them all, and the image is clean.
fn fill_grow_resume(d: Daemon, mut qmp: Qmp, fs: &Tmpfs, img: &Path, id: &str) {
    let sock = d.socket().to_owned();
    let writer = std::thread::spawn(move || {
        let mut c = SyncClient::connect(&sock, false).unwrap();
        for i in 0..16 {
            c.write(i * MIB, &pattern(i))
                .unwrap_or_else(|e| panic!("write {i} failed with {e}"));
        }
        c.flush().unwrap();
        for i in 0..16 {
            assert!(
                c.read(i * MIB, MIB as usize).unwrap() == pattern(i),
                "MiB {i}"
            );
        }
    });
    let ev = qmp.wait_event("BLOCK_IO_ERROR", "id", id, Duration::from_secs(30));
    assert_eq!(ev["operation"], "write", "{ev}");
    assert_eq!(ev["action"], "stop", "{ev}");
    assert_eq!(ev["nospace"], true, "{ev}");
    assert_eq!(ev["errno"], libc::ENOSPC, "{ev}");
    let (status, held) = export_status(&mut qmp);
    assert_eq!(status, "nospace");
    assert!(held >= 1, "{held} requests held");

    // A held request is not in flight: a graph edit still drains.
    let node = ev["node-name"].as_str().unwrap();
    let nodes = qmp.execute("query-named-block-nodes", json!({})).unwrap();
    let file = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n["children"][0]["node-name"].as_str())
        .unwrap_or_else(|| panic!("{node}'s file child in {nodes}"))
        .to_owned();
    qmp.execute(
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": node, "file": file}]}),
    )
    .expect("a reopen while a request is held");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!writer.is_finished(), "the held write has not completed");

    fs.resize("128M");
    qmp.execute("block-export-resume", json!({"id": id}))
        .unwrap();
    writer
        .join()
        .expect("every write succeeded after the resume, and reads back");
    assert_eq!(export_status(&mut qmp), ("ok".to_owned(), 0));
    let (_, log) = d.stop();
    assert!(log.contains("held until the export is resumed"), "{log}");
    let (code, out) = strata_tests::qemu::check(img);
    assert_eq!(code, 0, "qemu-img check:\n{out}");
}

#[test]
fn on_error_report_fails_the_write_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (_fs, img) = small_volume(dir.path(), "4M");
    let (d, mut qmp) = serve(dir.path(), &img, ",on-error=report");
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    let failed = (0..16).find_map(|i| c.write(i * MIB, &pattern(i)).err());
    assert_eq!(failed, Some(-libc::EIO), "a write failed at once");
    let ev = qmp.wait_event("BLOCK_IO_ERROR", "id", "e0", Duration::from_secs(10));
    assert_eq!(
        (&ev["action"], &ev["nospace"]),
        (&json!("report"), &json!(true))
    );
    assert_eq!(export_status(&mut qmp), ("ok".to_owned(), 0));
}

#[test]
fn bad_on_error_values_and_unknown_exports_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    strata_tests::qemu::create(&img, "qcow2", "1M");
    let out = std::process::Command::new(strata_bin())
        .args(["--blockdev", &format!("driver=file,node-name=f,filename={}", img.display())])
        .args(["--blockdev", "driver=qcow2,node-name=disk,file=f"])
        .args([
            "--export",
            "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path=x.sock,on-error=ignore",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("on-error") && err.contains("report, enospc, stop"),
        "{err}"
    );
    let (_d, mut qmp) = serve(dir.path(), &img, "");
    let e = qmp
        .execute("block-export-resume", json!({"id": "nope"}))
        .unwrap_err();
    assert_eq!(e["desc"], "Export 'nope' is not found", "{e}");
}
