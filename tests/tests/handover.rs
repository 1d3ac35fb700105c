//! Handing a disk between two daemons on one image, as a live migration
//! does on shared storage: the destination opens it inactive (no locks,
//! no I/O), the source is inactivated (flushes, lets go of its locks),
//! the destination is activated (rereads the image, takes the locks) and
//! sees everything the source wrote, including clusters it allocated
//! after the destination opened the image.

use std::path::Path;

use serde_json::json;
use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;
use strata_tests::host::sh;
use strata_tests::qmp::Qmp;

const MIB: u64 = 1 << 20;

fn daemon(dir: &Path, img: &Path, active: &str) -> (Daemon, Qmp) {
    std::fs::create_dir_all(dir).unwrap();
    Daemon::qsd_with_monitor(
        dir,
        &[
            &format!(
                "driver=file,node-name=file,filename={}{active}",
                img.display()
            ),
            &format!("driver=qcow2,node-name=disk,file=file{active}"),
        ],
        "id=e0,node-name=disk,writable=on",
        &[],
    )
}

fn active(qmp: &mut Qmp, node: &str) -> bool {
    let nodes = qmp.execute("query-named-block-nodes", json!({})).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap()["active"]
        .as_bool()
        .unwrap()
}

#[test]
fn a_disk_is_handed_from_one_daemon_to_another_on_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    strata_tests::qemu::create(&img, "qcow2", "64M");
    let (src, mut src_qmp) = daemon(&dir.path().join("src"), &img, "");
    let mut a = SyncClient::connect(src.socket(), false).unwrap();
    a.write(0, &vec![0x11; MIB as usize]).unwrap();

    // The destination opens the image the source is writing: no lock
    // conflict, and no I/O.
    let (dst, mut dst_qmp) = daemon(&dir.path().join("dst"), &img, ",active=off");
    assert!(!active(&mut dst_qmp, "disk") && !active(&mut dst_qmp, "file"));
    let mut b = SyncClient::connect(dst.socket(), false).unwrap();
    assert!(b.read(0, 4096).is_err(), "an inactive node takes no I/O");

    // The source allocates more after the destination read the image.
    a.write(32 * MIB, &vec![0x22; MIB as usize]).unwrap();

    // Activating while the source still holds the image fails, and the
    // destination stays inactive.
    let e = dst_qmp
        .execute("blockdev-set-active", json!({"active": true}))
        .unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("lock"), "{e}");
    assert!(!active(&mut dst_qmp, "disk") && !active(&mut dst_qmp, "file"));

    // The hand-over.
    src_qmp
        .execute("blockdev-set-active", json!({"active": false}))
        .unwrap();
    assert!(!active(&mut src_qmp, "disk"));
    assert!(a.read(0, 4096).is_err(), "the source takes no I/O now");
    dst_qmp
        .execute(
            "blockdev-set-active",
            json!({"node-name": "disk", "active": true}),
        )
        .unwrap();
    assert!(active(&mut dst_qmp, "disk") && active(&mut dst_qmp, "file"));
    assert_eq!(b.read(0, 4096).unwrap(), vec![0x11; 4096]);
    assert_eq!(
        b.read(32 * MIB, 4096).unwrap(),
        vec![0x22; 4096],
        "the destination reread the image: it sees the source's late allocation"
    );
    b.write(48 * MIB, &vec![0x33; MIB as usize]).unwrap();
    b.flush().unwrap();

    // The source cannot take the image back while the destination has it.
    let e = src_qmp
        .execute("blockdev-set-active", json!({"active": true}))
        .unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("lock"), "{e}");
    drop((a, b));
    let (st, log) = src.stop();
    assert!(st.success(), "{log}");
    let (st, log) = dst.stop();
    assert!(st.success(), "{log}");
    let (code, out) = strata_tests::qemu::check(&img);
    assert_eq!(code, 0, "{out}");
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0x22 32M 1M",
            "-c",
            "read -P 0x33 48M 1M",
            img.to_str().unwrap(),
        ],
    );
}

#[test]
fn blockdev_set_active_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    strata_tests::qemu::create(&img, "qcow2", "16M");
    let (d, mut qmp) = daemon(dir.path(), &img, "");
    let e = qmp
        .execute(
            "blockdev-set-active",
            json!({"node-name": "nope", "active": false}),
        )
        .unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("nope"), "{e}");
    let e = qmp
        .execute("blockdev-set-active", json!({"node-name": "disk"}))
        .unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("active"), "{e}");
    // Setting the state a node has is no change.
    qmp.execute("blockdev-set-active", json!({"active": true}))
        .unwrap();
    // blockdev-reopen cannot change it behind blockdev-set-active's back.
    let e = qmp
        .execute(
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "node-name": "disk", "file": "file", "active": false}]}),
        )
        .unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("active"), "{e}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
}
