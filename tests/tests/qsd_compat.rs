//! A script written for qemu-storage-daemon runs unchanged with strata in
//! its place: the same arguments (dotted and JSON --blockdev, a
//! vhost-user-blk --export, a QMP monitor, --pidfile, --daemonize) give the
//! same exports, the same QMP answers and the same data, for both.

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use serde_json::{json, Value};
use strata_tests::daemon::strata_bin;
use strata_tests::qmp::Qmp;

/// What one daemon showed the script.
#[derive(Debug, PartialEq)]
struct Seen {
    exports: Value,
    nodes: Vec<(String, String)>,
    data_ok: bool,
    second_export: Value,
    deleted_event: Value,
}

fn qsd_script(binary: &Path, dir: &Path) -> Seen {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (sock, qmp_sock, pidfile) = (
        dir.join("vhost.sock"),
        dir.join("qmp.sock"),
        dir.join("daemon.pid"),
    );
    let out = Command::new(binary)
        .args(["--blockdev", &format!("driver=file,node-name=file0,filename={}", img.display())])
        .args(["--blockdev", r#"{"driver": "raw", "node-name": "disk", "file": "file0"}"#])
        .args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=export,addr.type=unix,addr.path={},node-name=disk,writable=on,num-queues=2",
                sock.display()
            ),
        ])
        .args(["--chardev", &format!("socket,id=m0,path={},server=on,wait=off", qmp_sock.display())])
        .args(["--monitor", "chardev=m0"])
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--daemonize")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the daemon runs");

    let mut qmp = Qmp::connect(&qmp_sock);
    let exports = qmp.execute("query-block-exports", json!({})).unwrap();
    let mut nodes: Vec<(String, String)> = qmp
        .execute("query-named-block-nodes", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node-name"].as_str().unwrap().to_owned(),
                n["drv"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    nodes.sort();

    // Data through the export.
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    let mut started = b.start().unwrap();
    let q = &mut started.queues[0];
    let region = b.alloc_mem_region(1 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    // SAFETY: the region is mapped for `b`'s life and no request uses it now.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, 1 << 20) };
    for (i, x) in buf[..65536].iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    let mut comps: Vec<MaybeUninit<Completion>> = vec![MaybeUninit::uninit()];
    let mut one = |q: &mut blkio::Blkioq| {
        q.do_io(&mut comps, 1, None, None).unwrap();
        // SAFETY: do_io completed one request.
        unsafe { comps[0].assume_init_ref() }.ret
    };
    q.write(
        1 << 20,
        region.addr as *const u8,
        65536,
        0,
        ReqFlags::empty(),
    );
    assert_eq!(one(q), 0);
    q.read(
        1 << 20,
        (region.addr + 65536) as *mut u8,
        65536,
        0,
        ReqFlags::empty(),
    );
    assert_eq!(one(q), 0);
    let data_ok = buf[..65536] == buf[65536..131072];
    drop(started);
    drop(b);

    // More graph and exports over QMP.
    qmp.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "nul", "size": 1 << 20}),
    )
    .unwrap();
    let second = dir.join("second.sock");
    qmp.execute(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e2", "node-name": "nul",
               "addr": {"type": "unix", "path": second.to_str().unwrap()}}),
    )
    .unwrap();
    let second_export = qmp.execute("query-block-exports", json!({})).unwrap();
    qmp.execute("block-export-del", json!({"id": "e2"}))
        .unwrap();
    let deleted_event = qmp.wait_event("BLOCK_EXPORT_DELETED", "id", "e2", Duration::from_secs(10));
    let _ = qmp.execute("quit", json!({}));
    let deadline = Instant::now() + Duration::from_secs(20);
    // SAFETY: as above.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(Instant::now() < deadline, "the daemon did not quit");
        std::thread::sleep(Duration::from_millis(20));
    }
    Seen {
        exports,
        nodes,
        data_ok,
        second_export,
        deleted_event,
    }
}

fn sorted(v: Value) -> Value {
    let mut list = v.as_array().unwrap().clone();
    list.sort_by_key(|e| e["id"].as_str().unwrap_or("").to_owned());
    Value::Array(list)
}

#[test]
fn a_qsd_script_runs_unchanged_with_strata() {
    let qsd_dir = tempfile::tempdir().unwrap();
    let strata_dir = tempfile::tempdir().unwrap();
    let qsd = qsd_script(Path::new("qemu-storage-daemon"), qsd_dir.path());
    let strata = qsd_script(strata_bin(), strata_dir.path());
    assert_eq!(
        qsd.exports,
        json!([{"type": "vhost-user-blk", "id": "export", "node-name": "disk", "shutting-down": false}])
    );
    assert!(
        qsd.data_ok && strata.data_ok,
        "data reads back through both"
    );
    // Strata adds the export's on-error state; the rest is qsd's.
    let without_extras = |v: &Value| {
        let mut v = v.clone();
        for e in v.as_array_mut().unwrap() {
            let e = e.as_object_mut().unwrap();
            assert_eq!(e.remove("io-status"), Some(json!("ok")), "{e:?}");
            assert_eq!(e.remove("held-requests"), Some(json!(0)), "{e:?}");
        }
        v
    };
    assert_eq!(without_extras(&strata.exports), qsd.exports);
    assert_eq!(strata.nodes, qsd.nodes);
    assert_eq!(
        sorted(without_extras(&strata.second_export)),
        sorted(qsd.second_export)
    );
    assert_eq!(strata.deleted_event, qsd.deleted_event);
    assert!(
        !strata_dir.path().join("daemon.pid").exists(),
        "strata removes its pid file"
    );
}

#[test]
fn both_name_a_bad_option() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    for binary in [Path::new("qemu-storage-daemon"), strata_bin()] {
        let out = Command::new(binary)
            .args([
                "--blockdev",
                &format!("driver=file,node-name=f,filename={},bogus=1", img.display()),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}", binary.display());
        assert!(
            err.contains("Parameter 'bogus' is unexpected"),
            "{}: {err}",
            binary.display()
        );
    }
}

/// Beyond qsd: a daemonized strata logs to --log-file (qsd's go to
/// /dev/null), its pid file is locked, and its sockets are the owner's.
#[test]
fn a_daemon_logs_to_its_file_and_holds_its_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, pidfile, log) = (
        dir.path().join("vhost.sock"),
        dir.path().join("d.pid"),
        dir.path().join("d.log"),
    );
    let start = || {
        Command::new(strata_bin())
            .args(["--blockdev", "driver=null-co,node-name=disk"])
            .args([
                "--export",
                &format!(
                    "type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path={}",
                    sock.display()
                ),
            ])
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--log-file")
            .arg(&log)
            .arg("--daemonize")
            .output()
            .unwrap()
    };
    let first = start();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("listening on"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    for p in [&sock, &pidfile, &log] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }

    let second = start();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains("cannot lock the pid file") && err.contains(pid.trim()),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap(), pid, "kept");

    let pid: i32 = pid.trim().parse().unwrap();
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while pidfile.exists() {
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "the socket goes with the daemon");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("shutting down"), "{text}");
}
