//! block_resize on an exported node: the image grows (qemu-img is the
//! oracle), the daemon sends the frontend a config-change message on its
//! backend-request channel (the vhost crate's frontend handler is the
//! peer), the config space shows the new capacity, and the new tail takes
//! writes. Bad sizes and names are refused with errors that say why.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use strata_tests::daemon::{strata_bin, Daemon};
use strata_tests::frontend::{TestFrontend, DATA, W};
use strata_tests::host::sh;
use strata_tests::qmp::Qmp;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const BUF: u64 = DATA + 0x1000;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;

fn capacity(fe: &mut TestFrontend) -> u64 {
    u64::from_le_bytes(fe.config()[..8].try_into().unwrap())
}

fn serve(dir: &Path, fmt: &str) -> (Daemon, Qmp, std::path::PathBuf) {
    let img = dir.join(format!("disk.{fmt}"));
    strata_tests::qemu::create(&img, fmt, "16M");
    let (d, qmp) = Daemon::qsd_with_monitor(
        dir,
        &[
            &format!("driver=file,node-name=file,filename={}", img.display()),
            &format!("driver={fmt},node-name=disk,file=file"),
        ],
        "id=e0,node-name=disk,writable=on",
        &[],
    );
    (d, qmp, img)
}

fn virtual_size(img: &Path) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U", img.to_str().unwrap()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn grows_under_a_connected_frontend(fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (d, mut qmp, img) = serve(dir.path(), fmt);
    let (mut fe, changes) = TestFrontend::connect_with_channel(d.socket(), 1);
    assert_eq!(capacity(&mut fe), 16 * MIB / 512);
    // The old end refuses a write past it.
    let last = 32 * MIB / 512 - 8;
    assert_ne!(
        fe.request(VIRTIO_BLK_T_OUT, last, Some((BUF, 4096, 0))).0,
        S_OK
    );
    if fmt == "raw" {
        // As a `strata serve --qmp` user would.
        let qmp_sock = dir.path().join("qmp.sock");
        let out = sh(
            strata_bin().to_str().unwrap(),
            &[
                "job",
                "--qmp",
                qmp_sock.to_str().unwrap(),
                "resize",
                "disk",
                "+16M",
            ],
        );
        assert_eq!(out, format!("'disk' is now {} bytes", 32 * MIB));
    } else {
        qmp.execute(
            "block_resize",
            json!({"node-name": "disk", "size": 32 * MIB}),
        )
        .unwrap();
    }
    assert_eq!(
        changes.wait_past(0, Duration::from_secs(5)),
        Some(1),
        "one config-change message"
    );
    assert_eq!(capacity(&mut fe), 32 * MIB / 512);
    fe.mem()
        .write_slice(&[0x5c; 4096], GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        fe.request(VIRTIO_BLK_T_OUT, last, Some((BUF, 4096, 0))),
        (S_OK, 1)
    );
    fe.mem().write_slice(&[0; 4096], GuestAddress(BUF)).unwrap();
    assert_eq!(
        fe.request(VIRTIO_BLK_T_IN, last, Some((BUF, 4096, W))),
        (S_OK, 4097)
    );
    assert_eq!(fe.byte(BUF), 0x5c);
    // Growing to the size it has is no change, and sends nothing.
    qmp.execute(
        "block_resize",
        json!({"node-name": "disk", "size": 32 * MIB}),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(changes.count(), 1);
    drop(fe);
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert_eq!(virtual_size(&img), 32 * MIB);
    if fmt == "qcow2" {
        sh("qemu-img", &["check", "-q", img.to_str().unwrap()]);
    }
    sh(
        "qemu-io",
        &[
            "-f",
            fmt,
            "-c",
            &format!("read -P 0x5c {} 4096", last * 512),
            img.to_str().unwrap(),
        ],
    );
}

#[test]
fn block_resize_grows_a_qcow2_disk_and_tells_the_frontend() {
    grows_under_a_connected_frontend("qcow2");
}

#[test]
fn block_resize_grows_a_raw_disk_and_tells_the_frontend() {
    grows_under_a_connected_frontend("raw");
}

#[test]
fn bad_resizes_are_refused_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let (d, mut qmp, img) = serve(dir.path(), "qcow2");
    let mut err = |args: serde_json::Value| -> String {
        let e = qmp.execute("block_resize", args).unwrap_err();
        e["desc"].as_str().unwrap().to_owned()
    };
    let e = err(json!({"node-name": "disk", "size": 8 * MIB}));
    assert!(
        e.contains("shrinking 'disk'") && e.contains("only growing"),
        "{e}"
    );
    let e = err(json!({"node-name": "disk", "size": 16 * MIB + 100}));
    assert!(e.contains("multiple of 512"), "{e}");
    let e = err(json!({"node-name": "disk", "size": -1}));
    assert!(e.contains("'size'"), "{e}");
    let e = err(json!({"node-name": "nope", "size": 32 * MIB}));
    assert!(e.contains("nope"), "{e}");
    let e = err(json!({"size": 32 * MIB}));
    assert!(e.contains("node-name"), "{e}");
    let e = err(json!({"node-name": "disk"}));
    assert!(e.contains("size"), "{e}");
    let (st, log) = d.stop();
    assert!(st.success(), "{log}");
    assert_eq!(virtual_size(&img), 16 * MIB, "nothing changed");
}
