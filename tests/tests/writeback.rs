//! A real write-back failure: a loop device whose backing file sits on a
//! tmpfs too small for it. Writes land in the page cache; the fdatasync
//! that pushes them out fails with EIO, and the kernel drops the pages, so
//! a second fdatasync would succeed with the data gone. Strata must keep
//! failing every flush, and qcow2 must write no metadata after it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;
use strata_tests::host::{sh, Tmpfs};
use strata_tests::qmp::Qmp;

/// A 64 MiB block device that can hold only 4 MiB. Needs root.
struct FailingDisk {
    mnt: Tmpfs,
    dev: String,
}

impl FailingDisk {
    fn new(dir: &Path) -> FailingDisk {
        let mnt = Tmpfs::mount(dir, "small", "4M");
        let back = mnt.path.join("back");
        std::fs::File::create(&back)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let dev = sh("losetup", &["-f", "--show", back.to_str().unwrap()]);
        FailingDisk { mnt, dev }
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn serve(dir: &Path, format: &str, dev: &str) -> (Daemon, Qmp) {
    Daemon::qsd_with_monitor(
        dir,
        &[
            &format!("driver=host_device,node-name=dev,filename={dev}"),
            &format!("driver={format},node-name=disk,file=dev"),
        ],
        "id=e0,node-name=disk,writable=on",
        &[],
    )
}

/// Writes 16 MiB in 1 MiB pieces from `at`: more than the device can hold.
fn fill(c: &mut SyncClient, at: u64) {
    for i in 0..16u64 {
        c.write(at + (i << 20), &vec![0x5a; 1 << 20]).unwrap();
    }
}

#[test]
fn a_failed_flush_fails_every_flush_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FailingDisk::new(dir.path());
    let (d, mut qmp) = serve(dir.path(), "raw", &disk.dev);
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    fill(&mut c, 0);
    assert_eq!(c.flush(), Err(-libc::EIO), "the write-back fails");
    let ev = qmp.wait_event(
        "BLOCK_WRITEBACK_ERROR",
        "node-name",
        "dev",
        Duration::from_secs(10),
    );
    assert_eq!(ev["errno"], libc::EIO, "{ev}");
    // The kernel has dropped the pages: a retry must not report success.
    for _ in 0..3 {
        assert_eq!(c.flush(), Err(-libc::EIO));
    }
    let nodes = qmp.execute("query-named-block-nodes", json!({})).unwrap();
    let dev = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "dev")
        .unwrap();
    assert_eq!(dev["write-back-error"], "Input/output error (os error 5)");
    assert!(d.log_text().contains("every flush fails from now on"));
}

#[test]
fn qcow2_writes_no_metadata_after_a_failed_flush() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FailingDisk::new(dir.path());
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &disk.dev, "60M"],
    );
    // An L2 table that covers 40 MiB, on the device for good.
    sh("qemu-io", &["-f", "qcow2", "-c", "write 39M 4k", &disk.dev]);
    sh("sync", &[]);
    let (d, mut qmp) = serve(dir.path(), "qcow2", &disk.dev);
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    fill(&mut c, 0);
    assert_eq!(c.flush(), Err(-libc::EIO));
    qmp.wait_event(
        "BLOCK_WRITEBACK_ERROR",
        "node-name",
        "dev",
        Duration::from_secs(10),
    );
    // Room again: from now on, whatever strata writes reaches the device.
    disk.mnt.resize("128M");
    // An allocating write; its L2 entry would point at a cluster whose
    // neighbours' data may be gone, so it must never reach the device.
    let _ = c.write(40 << 20, &[1; 4096]);
    assert_eq!(c.flush(), Err(-libc::EIO));
    drop(c);
    let (_, log) = d.stop();
    sh("blockdev", &["--flushbufs", &disk.dev]);
    let map = sh(
        "qemu-img",
        &["map", "-U", "-f", "qcow2", "--output=json", &disk.dev],
    );
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let start = e["start"].as_u64().unwrap();
                start <= off && off < start + e["length"].as_u64().unwrap()
            })
            .cloned()
            .unwrap()
    };
    assert_eq!(at(39 << 20)["data"], true, "the map is read: {map}");
    assert_eq!(at(8 << 20)["data"], false, "{map}\n{log}");
    assert_eq!(
        at(40 << 20)["data"],
        false,
        "metadata was written after the failed flush:\n{map}\n{log}"
    );
}
