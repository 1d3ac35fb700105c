//! End to end: a Linux guest under QEMU (TCG) uses a Strata disk.
//!
//! These boot a VM, so they are ignored by a plain `cargo test`; ci/test
//! builds the guest and runs them with `--ignored`.

use std::path::Path;
use std::time::Duration;

use std::process::{Command, Stdio};

use serde_json::json;
use strata_tests::daemon::{strata_bin, Daemon};
use strata_tests::guest::{
    boot, boot_migrating, boot_reconnecting, boot_watching, GuestRun, GUEST_RAM,
};
use strata_tests::memory_diff::MemoryDiff;
use strata_tests::qmp::Qmp;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn show(run: &GuestRun) {
    for l in &run.lines {
        println!("{l}");
    }
}

fn check_done(run: &GuestRun, log: &str) {
    assert!(
        run.done,
        "the guest did not finish\n--- console ---\n{}\n--- strata ---\n{log}",
        run.console
    );
    assert!(
        run.failures().is_empty(),
        "guest checks failed: {:?}\n--- strata ---\n{log}",
        run.failures()
    );
}

/// Both fio jobs reported, without errors, and fio exited 0.
fn check_fio(run: &GuestRun) {
    let results: Vec<&String> = run
        .lines
        .iter()
        .filter(|l| l.contains("(groupid="))
        .collect();
    assert_eq!(results.len(), 2, "two fio jobs reported: {results:?}");
    assert!(results.iter().all(|l| l.contains("err= 0")), "{results:?}");
    assert_eq!(run.value("STRATA fio", "rc").as_deref(), Some("0"));
}

/// Completed requests per queue, from the daemon's disconnect log lines.
fn completions_per_queue(log: &str) -> Vec<Vec<u64>> {
    log.lines()
        .filter_map(|l| l.split("requests completed per queue: [").nth(1))
        .map(|rest| {
            rest.trim_end_matches(']')
                .split(", ")
                .map(|n| n.parse().expect("a count"))
                .collect()
        })
        .collect()
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn fio_verify_and_discard_on_two_queues_then_a_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let daemon = Daemon::serve(
        &[
            image.to_str().unwrap(),
            "--create",
            "256M",
            "--num-queues",
            "2",
            "--serial",
            "strata-e2e",
        ],
        &dir.path().join("vm.sock"),
        &dir.path().join("strata.log"),
    );

    let run = boot(daemon.socket(), 2, "fio,discard", BOOT_TIMEOUT);
    show(&run);
    check_done(&run, &daemon.log_text());
    assert_eq!(
        run.value("STRATA sysfs", "size_sectors").as_deref(),
        Some("524288")
    );
    assert_eq!(run.value("STRATA sysfs", "ro").as_deref(), Some("0"));
    assert_eq!(
        run.value("STRATA sysfs", "serial").as_deref(),
        Some("strata-e2e")
    );
    assert_eq!(run.value("STRATA sysfs", "queues").as_deref(), Some("2"));
    assert_eq!(
        run.value("STRATA sysfs", "discard_max").as_deref(),
        Some("16777216")
    );
    assert_eq!(
        run.value("STRATA sysfs", "write_zeroes_max").as_deref(),
        Some("16777216")
    );
    check_fio(&run);

    // A second boot against the same daemon: a VM reboot reconnects.
    let again = boot(daemon.socket(), 2, "", BOOT_TIMEOUT);
    check_done(&again, &daemon.log_text());
    assert_eq!(
        again.value("STRATA sysfs", "size_sectors").as_deref(),
        Some("524288")
    );

    let (status, log) = daemon.stop();
    assert!(status.success(), "strata exited with {status}:\n{log}");
    let per_queue = completions_per_queue(&log);
    assert_eq!(per_queue.len(), 2, "two connections:\n{log}");
    println!(
        "requests completed per queue, first boot: {:?}",
        per_queue[0]
    );
    assert!(
        per_queue[0].iter().all(|&n| n > 100),
        "both queues carried fio's I/O: {:?}",
        per_queue[0]
    );
    assert!(log.contains("stopped"), "clean shutdown:\n{log}");
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn a_read_only_export_reads_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.img");
    let pattern: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &pattern).unwrap();
    let daemon = Daemon::serve(
        &[
            image.to_str().unwrap(),
            "--format",
            "raw",
            "--read-only",
            "--num-queues",
            "2",
        ],
        &dir.path().join("vm.sock"),
        &dir.path().join("strata.log"),
    );
    let run = boot(daemon.socket(), 2, "ro", BOOT_TIMEOUT);
    show(&run);
    check_done(&run, &daemon.log_text());
    assert_eq!(run.value("STRATA sysfs", "ro").as_deref(), Some("1"));
    assert_eq!(run.value("STRATA ro", "read").as_deref(), Some("ok"));
    let md5 = run.value("STRATA ro", "md5").unwrap();
    let want = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&pattern[..1 << 20])?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(
        md5,
        String::from_utf8_lossy(&want.stdout)[..32],
        "the guest read the image's bytes"
    );
    // The guest kernel itself refuses writes to a disk offered as read-only.
    assert_eq!(run.value("STRATA ro", "write").as_deref(), Some("failed"));
    assert_eq!(run.value("STRATA ro", "discard").as_deref(), Some("failed"));
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert_eq!(
        std::fs::read(&image).unwrap(),
        pattern,
        "the image is untouched"
    );
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn rewiring_the_graph_under_fio_verify() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    // The copy shares the original's blocks (a hard link): at the moment of
    // the swap it holds every write made so far, as a copy must.
    let copy = dir.path().join("copy.img");
    std::fs::hard_link(&image, &copy).unwrap();
    let (qmp_sock, vhost_sock) = (dir.path().join("qmp.sock"), dir.path().join("vm.sock"));
    let log_path = dir.path().join("strata.log");
    let mut child = Command::new(strata_bin())
        .args(["--object", "throttle-group,id=tg0,limits.iops-total=4000,limits.iops-total-max=8000"])
        .args(["--blockdev", &format!("driver=file,node-name=f0,filename={},discard=unmap", image.display())])
        .args(["--blockdev", "driver=raw,node-name=disk,file=f0"])
        .args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=vda,node-name=disk,writable=on,num-queues=2,addr.type=unix,addr.path={}",
                vhost_sock.display()
            ),
        ])
        .args(["--chardev", &format!("socket,id=m0,path={},server=on,wait=off", qmp_sock.display())])
        .args(["--monitor", "chardev=m0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut qmp = Qmp::connect(&qmp_sock);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let mut rewire = None;
    let copy_path = copy.display().to_string();
    let run = boot_watching(&vhost_sock, 2, "fio-long", BOOT_TIMEOUT, &mut |line| {
        if line.starts_with("STRATA fio-running") && rewire.is_none() {
            let qmp_sock = qmp_sock.clone();
            let copy_path = copy_path.clone();
            rewire = Some(std::thread::spawn(move || {
                let mut q = Qmp::connect(&qmp_sock);
                let pause = || std::thread::sleep(Duration::from_secs(3));
                let mut step = |what: &str, cmd: &str, args: serde_json::Value| {
                    q.execute(cmd, args)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    println!("rewired: {what}");
                };
                pause();
                step(
                    "add a throttle filter",
                    "blockdev-add",
                    json!({"driver": "throttle", "node-name": "thr", "throttle-group": "tg0", "file": "f0"}),
                );
                step(
                    "insert it",
                    "blockdev-reopen",
                    json!({"options": [{"driver": "raw", "node-name": "disk", "file": "thr"}]}),
                );
                pause();
                step(
                    "open the copy",
                    "blockdev-add",
                    // The same inode as f0's: without locking=off its lock
                    // conflicts with f0's, as QEMU's would.
                    json!({"driver": "file", "node-name": "f1", "filename": copy_path, "discard": "unmap", "locking": "off"}),
                );
                step(
                    "swap the file under the filter",
                    "blockdev-reopen",
                    json!({"options": [{"driver": "throttle", "node-name": "thr", "throttle-group": "tg0", "file": "f1"}]}),
                );
                pause();
                step(
                    "remove the filter",
                    "blockdev-reopen",
                    json!({"options": [{"driver": "raw", "node-name": "disk", "file": "f1"}]}),
                );
                step(
                    "delete the filter",
                    "blockdev-del",
                    json!({"node-name": "thr"}),
                );
                step(
                    "delete the original",
                    "blockdev-del",
                    json!({"node-name": "f0"}),
                );
            }));
        }
    });
    show(&run);
    let rewired = rewire.expect("fio started").join();
    check_done(&run, &log());
    assert!(rewired.is_ok(), "every rewiring step succeeded:\n{}", log());
    check_fio(&run);
    let nodes = qmp.execute("query-named-block-nodes", json!({})).unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["disk", "f1"],
        "the filter and the original are gone"
    );
    qmp.execute("quit", json!({})).unwrap();
    assert!(child.wait().unwrap().success(), "{}", log());
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn fio_verify_on_a_qcow2_overlay_over_a_raw_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let pattern: Vec<u8> = (0..256u32 << 20 >> 2)
        .flat_map(|i| (i.wrapping_mul(2654435761)).to_le_bytes())
        .collect();
    std::fs::write(&base, &pattern).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    let out = Command::new(strata_bin())
        .args([
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon = Daemon::serve(
        &[
            overlay.to_str().unwrap(),
            "--format",
            "qcow2",
            "--num-queues",
            "2",
        ],
        &dir.path().join("vm.sock"),
        &dir.path().join("strata.log"),
    );
    let run = boot(daemon.socket(), 2, "fio,discard", BOOT_TIMEOUT);
    show(&run);
    check_done(&run, &daemon.log_text());
    assert_eq!(
        run.value("STRATA sysfs", "size_sectors").as_deref(),
        Some("524288")
    );
    check_fio(&run);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    let (code, out) = strata_tests::qemu::check(&overlay);
    assert_eq!(code, 0, "qemu-img check after the guest run:\n{out}");
    // What the guest did not touch still comes from the base.
    let raw = strata_tests::qemu::to_raw(&overlay);
    let tail = 200 << 20;
    assert!(
        raw[tail..] == pattern[tail..],
        "untouched data reads through to the base"
    );
    println!("qcow2 overlay: qemu-img check clean after fio verify in the guest");
}

/// Runs `qemu-io -c CMD` on a raw or qcow2 image.
fn qemu_io_fmt(fmt: &str, path: &std::path::Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", fmt, "-c", cmd])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn snapshot_stream_commit_and_active_commit_under_fio_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, mid, top, snap) = (
        d.join("base.raw"),
        d.join("mid.qcow2"),
        d.join("top.qcow2"),
        d.join("snap.qcow2"),
    );
    std::fs::File::create(&base)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let create = |args: &[&str]| {
        let out = Command::new(strata_bin())
            .arg("create")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    create(&[
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
    ]);
    create(&[
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    // Data only the lower layers hold, away from where the guest writes
    // (fio writes [0, 16M) and [32M, 48M)).
    qemu_io_fmt("raw", &base, "write -P 0x11 112M 8M");
    qemu_io_fmt("qcow2", &mid, "write -P 0x22 64M 16M");
    qemu_io_fmt("qcow2", &top, "write -P 0x33 96M 4M");

    let (qmp_sock, vhost_sock) = (d.join("qmp.sock"), d.join("vm.sock"));
    let log_path = d.join("strata.log");
    let blockdev = |s: String| ["--blockdev".to_string(), s];
    let mut child = Command::new(strata_bin())
        .args(blockdev(format!("driver=file,node-name=base-file,filename={}", base.display())))
        .args(blockdev("driver=raw,node-name=base,file=base-file".into()))
        .args(blockdev(format!(
            r#"{{"driver":"qcow2","node-name":"mid","backing":"base","file":{{"driver":"file","filename":"{}"}}}}"#,
            mid.display()
        )))
        .args(blockdev(format!(
            r#"{{"driver":"qcow2","node-name":"top","backing":"mid","file":{{"driver":"file","filename":"{}"}}}}"#,
            top.display()
        )))
        .args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=vda,node-name=top,writable=on,num-queues=2,addr.type=unix,addr.path={}",
                vhost_sock.display()
            ),
        ])
        .args(["--chardev", &format!("socket,id=m0,path={},server=on,wait=off", qmp_sock.display())])
        .args(["--monitor", "chardev=m0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let mut steps = None;
    let snap_path = snap.clone();
    let run = boot_watching(&vhost_sock, 2, "fio-long40", BOOT_TIMEOUT, &mut |line| {
        if !line.starts_with("STRATA fio-running") || steps.is_some() {
            return;
        }
        let qmp_sock = qmp_sock.clone();
        let snap = snap_path.clone();
        let strata = strata_bin().to_path_buf();
        steps = Some(std::thread::spawn(move || {
            let mut q = Qmp::connect(&qmp_sock);
            let minute = Duration::from_secs(60);
            fn run(q: &mut Qmp, what: &str, cmd: &str, args: serde_json::Value) {
                q.execute(cmd, args)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                println!("jobs: {what}");
            }
            std::thread::sleep(Duration::from_secs(3));
            // 1. A snapshot: the guest's writes go to a new overlay.
            let out = Command::new(&strata)
                .args(["create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2"])
                .arg(&snap)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            run(
                &mut q,
                "add the overlay",
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "snap", "backing": null,
                       "file": {"driver": "file", "filename": snap}}),
            );
            run(
                &mut q,
                "snapshot",
                "blockdev-snapshot",
                json!({"node": "top", "overlay": "snap"}),
            );
            std::thread::sleep(Duration::from_secs(2));
            // 2. Stream top into the new overlay: snap's backing becomes mid.
            run(
                &mut q,
                "stream top into snap",
                "block-stream",
                json!({"job-id": "stream", "device": "snap", "base-node": "mid"}),
            );
            q.wait_event("BLOCK_JOB_COMPLETED", "device", "stream", minute);
            // 3. Commit the intermediate mid into base: snap's backing
            //    becomes base.
            run(
                &mut q,
                "commit mid into base",
                "block-commit",
                json!({"job-id": "commit", "device": "snap", "top-node": "mid", "base-node": "base"}),
            );
            let done = q.wait_event("BLOCK_JOB_COMPLETED", "device", "commit", minute);
            assert!(done.get("error").is_none(), "{done}");
            // 4. Commit the active layer: the export moves to base.
            run(
                &mut q,
                "active commit",
                "block-commit",
                json!({"job-id": "active", "device": "snap", "base-node": "base"}),
            );
            q.wait_event("BLOCK_JOB_READY", "device", "active", minute);
            run(
                &mut q,
                "complete the active commit",
                "block-job-complete",
                json!({"device": "active"}),
            );
            let done = q.wait_event("BLOCK_JOB_COMPLETED", "device", "active", minute);
            assert!(done.get("error").is_none(), "{done}");
            let exports = q.execute("query-block-exports", json!({})).unwrap();
            assert_eq!(exports[0]["node-name"], "base", "{exports}");
        }));
    });
    show(&run);
    let stepped = steps.expect("fio started").join();
    check_done(&run, &log());
    assert!(stepped.is_ok(), "every job step succeeded:\n{}", log());
    check_fio(&run);

    let mut q = Qmp::connect(&qmp_sock);
    q.execute("quit", json!({})).unwrap();
    assert!(child.wait().unwrap().success(), "{}", log());
    for img in [&snap, &top, &mid] {
        let (code, out) = strata_tests::qemu::check(img);
        assert_eq!(code, 0, "qemu-img check {}:\n{out}", img.display());
    }
    // The disk is now base.raw alone, and holds every layer's data.
    let raw = std::fs::read(&base).unwrap();
    let all = |from: usize, len: usize, byte: u8| {
        raw[from << 20..(from + len) << 20]
            .iter()
            .all(|&b| b == byte)
    };
    assert!(all(64, 16, 0x22), "mid's data was committed into base");
    assert!(all(96, 4, 0x33), "top's data was streamed, then committed");
    assert!(all(112, 8, 0x11), "base's own data is untouched");
    let info = strata_tests::qemu::qemu_img_ok(&["info", "-U", snap.to_str().unwrap()]);
    assert!(
        info.contains("backing file: ") && info.contains("base.raw"),
        "{info}"
    );
    println!(
        "jobs: snapshot, stream, commit and active commit under fio verify: all data in place"
    );
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn a_volume_that_fills_under_fio_is_grown_and_resumed_without_a_guest_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A thin 128 MiB qcow2 on a volume that holds 16 MiB: fio's 48 MiB
    // cannot fit until the host grows it.
    let vol = strata_tests::host::Tmpfs::mount(d, "vol", "16M");
    let img = vol.path.join("disk.qcow2");
    strata_tests::qemu::create(&img, "qcow2", "128M");
    let (daemon, mut qmp) = Daemon::qsd_with_monitor(
        d,
        &[
            &format!("driver=file,node-name=file,filename={}", img.display()),
            "driver=qcow2,node-name=disk,file=file",
        ],
        "id=vda,node-name=disk,writable=on",
        &[],
    );
    let (sock, qmp_sock) = (daemon.socket().to_owned(), d.join("qmp.sock"));
    let mut operator = None;
    let run = boot_watching(&sock, 1, "fio-fill", BOOT_TIMEOUT, &mut |line| {
        if !line.starts_with("STRATA fio-running") || operator.is_some() {
            return;
        }
        let mut q = Qmp::connect(&qmp_sock);
        let vol = vol.path.clone();
        operator = Some(std::thread::spawn(move || {
            let ev = q.wait_event("BLOCK_IO_ERROR", "id", "vda", Duration::from_secs(120));
            println!("on-error: {ev}");
            // The guest waits while the operator takes their time.
            std::thread::sleep(Duration::from_secs(3));
            let exports = q.execute("query-block-exports", json!({})).unwrap();
            assert_eq!(exports[0]["io-status"], "nospace", "{exports}");
            strata_tests::host::sh("mount", &["-o", "remount,size=256M", vol.to_str().unwrap()]);
            q.execute("block-export-resume", json!({"id": "vda"}))
                .unwrap();
            ev
        }));
    });
    show(&run);
    let Some(operator) = operator else {
        panic!(
            "the guest never started fio\n--- console ---\n{}\n--- strata ---\n{}",
            run.console,
            daemon.log_text()
        );
    };
    let ev = operator
        .join()
        .expect("the volume filled, and was grown and resumed");
    assert_eq!(
        (&ev["nospace"], &ev["action"]),
        (&json!(true), &json!("stop"))
    );
    check_done(&run, &daemon.log_text());
    assert_eq!(run.value("STRATA fio", "rc").as_deref(), Some("0"));
    let exports = qmp.execute("query-block-exports", json!({})).unwrap();
    assert_eq!(exports[0]["io-status"], "ok", "{exports}");
    let (_, log) = daemon.stop();
    let (code, out) = strata_tests::qemu::check(&img);
    assert_eq!(code, 0, "qemu-img check:\n{out}\n{log}");
    println!("on-error: the guest saw no error across a full volume, grown and resumed");
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn the_guest_sees_a_resize_at_once_and_writes_the_new_tail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    strata_tests::qemu::create(&img, "qcow2", "64M");
    let (daemon, mut qmp) = Daemon::qsd_with_monitor(
        d,
        &[
            &format!("driver=file,node-name=file,filename={}", img.display()),
            "driver=qcow2,node-name=disk,file=file",
        ],
        "id=vda,node-name=disk,writable=on",
        &[],
    );
    let sock = daemon.socket().to_owned();
    let mut resized = None;
    let run = boot_watching(&sock, 1, "resize", BOOT_TIMEOUT, &mut |line| {
        if line.contains("STRATA resize-waiting") && resized.is_none() {
            qmp.execute(
                "block_resize",
                json!({"node-name": "disk", "size": 96 << 20}),
            )
            .unwrap();
            resized = Some(std::time::Instant::now());
        }
    });
    show(&run);
    check_done(&run, &daemon.log_text());
    assert!(resized.is_some(), "the guest never waited for the resize");
    assert_eq!(
        run.value("STRATA resize seen", "size").as_deref(),
        Some("196608"),
        "the guest sees 96 MiB"
    );
    let tenths: u64 = run
        .value("STRATA resize seen", "tenths")
        .and_then(|t| t.parse().ok())
        .expect("the guest reports how long it waited");
    assert!(
        tenths <= 100,
        "the guest saw the new size after {tenths} tenths of a second"
    );
    assert_eq!(run.value("STRATA fio", "rc").as_deref(), Some("0"));
    let (_, log) = daemon.stop();
    let (code, out) = strata_tests::qemu::check(&img);
    assert_eq!(code, 0, "qemu-img check:\n{out}\n{log}");
    println!("resize: the guest saw 96 MiB {tenths} tenths of a second after block_resize");
}

/// A raw image served with two queues on `dir/vhost.sock`, as incarnation
/// `n` of the daemon (its log is `dir/log.N`). A start that fails is
/// tried again, as a supervisor would, and said so.
fn raw_daemon(dir: &std::path::Path, img: &std::path::Path, n: usize) -> Daemon {
    let sock = dir.join("vhost.sock");
    let blockdev = format!("driver=file,node-name=disk,filename={}", img.display());
    let export = format!(
        "type=vhost-user-blk,id=vda,node-name=disk,addr.type=unix,addr.path={},\
         writable=on,num-queues=2",
        sock.display()
    );
    let args = ["--blockdev", &blockdev, "--export", &export];
    let mut attempt = 0;
    loop {
        let log = dir.join(format!("log.{n}.{attempt}"));
        match Daemon::try_qsd(&args, &sock, &log) {
            Ok(d) => return d,
            Err(e) if attempt < 10 => {
                println!("restart {n}: attempt {attempt} failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
                attempt += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Rounds of fio verify on two queues for `secs` seconds, while the
/// daemon is ended with `signal` and started again on the same socket
/// `restarts` times, at random moments. QEMU reconnects (`reconnect=1`)
/// and hands the new daemon the inflight region.
fn restarts_under_fio(signal: i32, restarts: usize, secs: u32) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let img = d.join("disk.raw");
    strata_tests::qemu::create(&img, "raw", "256M");
    let first = raw_daemon(&d, &img, 0);
    let sock = first.socket().to_owned();
    let daemon = std::sync::Arc::new(std::sync::Mutex::new(Some(first)));
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("restart: seed {seed}");
    let mut operator = None;
    let run = boot_reconnecting(
        &sock,
        2,
        &format!("fio-rounds{secs}"),
        BOOT_TIMEOUT,
        &mut |line| {
            if !line.starts_with("STRATA fio-running") || operator.is_some() {
                return;
            }
            let (daemon, d, img) = (std::sync::Arc::clone(&daemon), d.clone(), img.clone());
            let window = u64::from(secs) * 1000 / (restarts as u64 + 1);
            operator = Some(std::thread::spawn(move || {
                for n in 1..=restarts {
                    // A random moment in each slice of the run.
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let wait = window / 2 + (seed >> 33) % (window / 2);
                    std::thread::sleep(Duration::from_millis(wait));
                    let old = daemon.lock().unwrap().take().expect("a daemon runs");
                    let pid = old.pid();
                    let log = if signal == libc::SIGKILL {
                        old.kill()
                    } else {
                        let (st, log) = old.stop();
                        assert!(st.success(), "SIGTERM: exit {st}\n{log}");
                        log
                    };
                    assert!(!log.contains("panicked"), "{log}");
                    println!("restart {n}: daemon {pid} ended after {wait} ms");
                    *daemon.lock().unwrap() = Some(raw_daemon(&d, &img, n));
                }
            }));
        },
    );
    show(&run);
    operator
        .expect("fio started")
        .join()
        .expect("every restart went through");
    let last = daemon.lock().unwrap().take().unwrap();
    check_done(&run, &last.log_text());
    let rounds: Vec<_> = run
        .lines
        .iter()
        .filter(|l| l.starts_with("STRATA round"))
        .collect();
    assert!(rounds.len() >= 2, "fio ran {} rounds", rounds.len());
    for r in &rounds {
        let clean = r
            .split(' ')
            .filter(|w| w.starts_with("rc=") || w.starts_with("err="))
            .all(|w| w.ends_with("=0"));
        assert!(clean, "{r}");
    }
    let resubmitted: usize = (1..=restarts)
        .map(|n| {
            (0..=10)
                .map(|a| {
                    std::fs::read_to_string(d.join(format!("log.{n}.{a}"))).unwrap_or_default()
                })
                .map(|log| log.matches("resubmitting").count())
                .sum::<usize>()
        })
        .sum();
    let (st, log) = last.stop();
    assert!(st.success(), "{log}");
    println!(
        "restart: {restarts} restarts by signal {signal} under {} fio rounds, every one clean; \
         {resubmitted} queues resubmitted requests left in flight",
        rounds.len()
    );
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn sigkill_and_restart_five_times_under_fio_verify_loses_nothing() {
    restarts_under_fio(libc::SIGKILL, 5, 60);
}

#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn the_upgrade_path_sigterm_and_restart_under_fio_verify() {
    restarts_under_fio(libc::SIGTERM, 3, 30);
}

/// Tries to migrate at most this many times: QEMU 7.2's TCG loses pages
/// the guest's CPU wrote, about one migration in three here, with
/// qemu-storage-daemon or QEMU's own virtio-blk as much as with Strata.
const MIGRATION_ATTEMPTS: usize = 6;

/// Live migration between two QEMUs, each with its own Strata daemon on
/// one `fmt` image, while the guest writes and reads with fio verify. Two
/// migrations:
/// - The device's part, with a guest that does not zero pages it
///   allocates (`init_on_alloc=0`): the kernel's zeroing would dirty for
///   QEMU a page the device then fills, and hide a page it failed to log.
///   Once QEMU says "completed", no page the device filled from disk may
///   differ between the two sides. Such a guest makes QEMU's TCG lose its
///   own pages nearly every time, so it does not run on.
/// - End to end, with the default guest: both sides' memory must be
///   identical, then the disk is handed over and the guest runs on the
///   destination, where every fio round passes, and `qemu-img check` is
///   clean. A migration in which QEMU lost pages the guest's CPU wrote
///   (and no disk data) is QEMU's failure, not Strata's: it is reported
///   and tried again.
fn live_migration(fmt: &str) {
    match migrate_once(fmt, Mode::DeviceWrites) {
        Ok(done) => println!("{done}"),
        Err(lost) => println!("device writes: {lost}"),
    }
    for attempt in 1..=MIGRATION_ATTEMPTS {
        match migrate_once(fmt, Mode::EndToEnd) {
            Ok(done) => return println!("{done}"),
            Err(lost) => println!("migration attempt {attempt}: {lost}; trying again"),
        }
    }
    panic!("QEMU lost guest pages in {MIGRATION_ATTEMPTS} migrations in a row");
}

/// What one migration checks.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Only that every page the device filled arrived.
    DeviceWrites,
    /// That all memory arrived, and the guest runs on with its disk.
    EndToEnd,
}

/// How the memory of both sides compared once QEMU said "completed".
enum Moved {
    /// Identical: the guest may run on the destination.
    Identical,
    /// QEMU lost pages the guest's CPU wrote; both QEMUs were quit.
    LostByQemu(String),
}

fn migrate_once(fmt: &str, mode: Mode) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join(format!("disk.{fmt}"));
    strata_tests::qemu::create(&img, fmt, "256M");
    let serve = |side: &str, active: &str| {
        let sd = d.join(side);
        std::fs::create_dir_all(&sd).unwrap();
        Daemon::qsd_with_monitor(
            &sd,
            &[
                &format!(
                    "driver=file,node-name=file,filename={}{active}",
                    img.display()
                ),
                &format!("driver={fmt},node-name=disk,file=file{active}"),
            ],
            "id=vda,node-name=disk,writable=on,num-queues=2",
            &[],
        )
    };
    let (src, src_strata) = serve("src", "");
    let (dst, dst_strata) = serve("dst", ",active=off");
    let (qmp_src, qmp_dst, mig) = (
        d.join("qemu-src.qmp"),
        d.join("qemu-dst.qmp"),
        d.join("mig.sock"),
    );
    let mut operator = None;
    let mut strata = Some((src_strata, dst_strata));
    let mut sides = Vec::new();
    let run = boot_migrating(
        [(src.socket(), &qmp_src), (dst.socket(), &qmp_dst)],
        &mig,
        2,
        "migrate30",
        match mode {
            Mode::DeviceWrites => "init_on_alloc=0",
            Mode::EndToEnd => "",
        },
        BOOT_TIMEOUT,
        &mut |side, line| {
            sides.push((side, line.to_owned()));
            // Once the guest is into its rounds: reads fill its page cache
            // while its RAM moves.
            if !line.starts_with("STRATA round n=1 ") || operator.is_some() {
                return;
            }
            let (mut src_strata, mut dst_strata) = strata.take().unwrap();
            let (qmp_src, qmp_dst) = (qmp_src.clone(), qmp_dst.clone());
            let (mig, d, img) = (mig.clone(), d.to_owned(), img.clone());
            operator = Some(std::thread::spawn(move || {
                let mut qs = Qmp::connect(&qmp_src);
                let mut qd = Qmp::connect(&qmp_dst);
                qs.execute(
                    "migrate-set-parameters",
                    json!({"downtime-limit": 300, "max-bandwidth": 100u64 << 20}),
                )
                .unwrap();
                let start = std::time::Instant::now();
                qs.execute("migrate", json!({"uri": format!("unix:{}", mig.display())}))
                    .unwrap();
                let info = loop {
                    let info = qs.execute("query-migrate", json!({})).unwrap();
                    match info["status"].as_str() {
                        Some("completed") => break info,
                        Some("failed" | "cancelled") => panic!("migration failed: {info}"),
                        _ => std::thread::sleep(Duration::from_millis(100)),
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(120),
                        "migration hangs: {info}"
                    );
                };
                let elapsed = start.elapsed();
                let diff = compare_memory(&d, &img, [&mut qs, &mut qd]);
                if !diff.pages.is_empty() || mode == Mode::DeviceWrites {
                    for q in [&mut qs, &mut qd] {
                        let _ = q.execute("quit", json!({}));
                    }
                    assert!(
                        diff.device_data.is_empty(),
                        "pages the device filled from disk arrived stale (not logged): {:x?}",
                        diff.device_data
                    );
                    let lost = format!(
                        "every page the device filled arrived; QEMU lost {} pages the guest's \
                         CPU wrote ({:x?})",
                        diff.pages.len(),
                        &diff.pages[..diff.pages.len().min(8)]
                    );
                    return (Moved::LostByQemu(lost), src_strata, dst_strata);
                }
                // The hand-over: the source lets go of the image, the
                // destination takes it, and only then does the guest run.
                src_strata
                    .execute("blockdev-set-active", json!({"active": false}))
                    .unwrap();
                dst_strata
                    .execute("blockdev-set-active", json!({"active": true}))
                    .unwrap();
                qd.execute("cont", json!({})).unwrap();
                println!(
                    "migration: completed in {elapsed:?}, memory identical on both sides: {}",
                    info["ram"]
                );
                (Moved::Identical, src_strata, dst_strata)
            }));
        },
    );
    show(&run);
    let (moved, _src_strata, _dst_strata) = operator
        .expect("the guest got ready")
        .join()
        .expect("the migration and hand-over went through");
    if let Moved::LostByQemu(lost) = moved {
        return Err(lost);
    }
    check_done(&run, &dst.log_text());
    let rounds: Vec<_> = sides
        .iter()
        .filter(|(_, l)| l.starts_with("STRATA round n="))
        .collect();
    for (_, r) in &rounds {
        let clean = r
            .split(' ')
            .filter(|w| w.starts_with("rc=") || w.starts_with("rrc=") || w.starts_with("err="))
            .all(|w| w.ends_with("=0"));
        assert!(clean, "{r}");
    }
    let on_dst = rounds.iter().filter(|(side, _)| *side == 1).count();
    assert!(
        on_dst >= 1,
        "no fio round ended on the destination: {rounds:?}"
    );
    assert!(
        sides
            .iter()
            .any(|(side, l)| *side == 1 && l.starts_with("STRATA DONE failed=0")),
        "the guest finished on the destination"
    );
    let src_log = src.log_text();
    assert!(src_log.contains("dirty logging on"), "{src_log}");
    let (st, log) = dst.stop();
    assert!(st.success(), "{log}");
    let (st, log) = src.stop();
    assert!(st.success(), "{log}");
    if fmt == "qcow2" {
        let (code, out) = strata_tests::qemu::check(&img);
        assert_eq!(code, 0, "qemu-img check:\n{out}");
    }
    Ok(format!(
        "migration ({fmt}): {} fio rounds, {on_dst} of them on the destination, all clean",
        rounds.len()
    ))
}

/// Dumps both sides' guest memory (both are stopped) and the disk as raw
/// bytes, and compares them.
fn compare_memory(d: &Path, img: &Path, qmp: [&mut Qmp; 2]) -> MemoryDiff {
    let dumps = [d.join("src.mem"), d.join("dst.mem")];
    for (q, dump) in qmp.into_iter().zip(&dumps) {
        q.execute(
            "pmemsave",
            json!({"val": 0, "size": GUEST_RAM, "filename": dump}),
        )
        .unwrap();
    }
    let disk = d.join("disk.bytes");
    strata_tests::host::sh(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            img.to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    let diff = MemoryDiff::compare(&dumps[0], &dumps[1], &disk);
    for f in dumps.iter().chain([&disk]) {
        let _ = std::fs::remove_file(f);
    }
    diff
}

#[test]
#[ignore = "boots two QEMU guests; ci/test runs it"]
fn live_migration_of_a_qcow2_disk_under_fio_verify() {
    live_migration("qcow2");
}

#[test]
#[ignore = "boots two QEMU guests; ci/test runs it"]
fn live_migration_of_a_raw_disk_under_fio_verify() {
    live_migration("raw");
}

/// Storage migration to another host, as libvirt runs it for a disk not on
/// shared storage: daemon B exports an empty image over NBD with TLS;
/// daemon A, under a guest running fio verify, adds an `nbd` node for it
/// and mirrors into it in write-blocking mode. The mirror is ready while
/// fio runs; once the guest's I/O has stopped it completes, and B's image
/// is A's source.
#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn storage_migration_over_nbd_with_tls_under_fio_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, dst) = (d.join("source.raw"), d.join("dest.qcow2"));
    std::fs::File::create(&src)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    // Data the guest never writes, which only the first copy moves.
    qemu_io_fmt("raw", &src, "write -P 0x5c 100M 8M");
    strata_tests::qemu::create(&dst, "qcow2", "128M");
    let pki = strata_tests::pki::Pki::new(d, "migration-ca");
    let (server_creds, client_creds) = (
        pki.server("b-creds"),
        pki.client("a-creds", "/O=Strata/CN=host-a"),
    );
    let port = strata_tests::nbd_client::free_port();

    // Host B: the empty disk, exported over NBD with TLS for host A only.
    let b_dir = d.join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let b = Daemon::qsd(
        &[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                server_creds.display()
            ),
            "--object",
            "authz-simple,id=authz0,identity=O=Strata,,CN=host-a",
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
                dst.display()
            ),
            "--nbd-server",
            &format!(
                "addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0,tls-authz=authz0"
            ),
            "--export",
            "type=nbd,id=incoming,node-name=disk,writable=on",
        ],
        &b_dir.join("nbd.sock"),
        &b_dir.join("log"),
    );

    // Host A: the guest's disk.
    let a_dir = d.join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let a = Daemon::qsd(
        &[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                client_creds.display()
            ),
            "--blockdev",
            &format!(
                "driver=raw,node-name=disk,file.driver=file,file.filename={}",
                src.display()
            ),
            "--export",
            &format!(
                "type=vhost-user-blk,id=vda,node-name=disk,writable=on,num-queues=2,addr.type=unix,addr.path={}",
                a_dir.join("vm.sock").display()
            ),
            "--chardev",
            &format!(
                "socket,id=m0,path={},server=on,wait=off",
                a_dir.join("qmp.sock").display()
            ),
            "--monitor",
            "chardev=m0",
        ],
        &a_dir.join("vm.sock"),
        &a_dir.join("log"),
    );
    let qmp_sock = a_dir.join("qmp.sock");
    let mut mirror = None;
    let run = boot_watching(
        &a_dir.join("vm.sock"),
        2,
        "fio-long40",
        BOOT_TIMEOUT,
        &mut |line| {
            if !line.starts_with("STRATA fio-running") || mirror.is_some() {
                return;
            }
            let qmp_sock = qmp_sock.clone();
            mirror = Some(std::thread::spawn(move || {
                let mut q = Qmp::connect(&qmp_sock);
                std::thread::sleep(Duration::from_secs(3));
                q.execute(
                    "blockdev-add",
                    json!({"driver": "nbd", "node-name": "remote", "export": "disk",
                       "tls-creds": "tls0",
                       "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
                )
                .expect("the nbd node on host B");
                q.execute(
                    "blockdev-mirror",
                    json!({"job-id": "migrate", "device": "disk", "target": "remote",
                       "sync": "full", "copy-mode": "write-blocking"}),
                )
                .expect("the mirror starts");
                q.wait_event(
                    "BLOCK_JOB_READY",
                    "device",
                    "migrate",
                    Duration::from_secs(120),
                );
                println!("migration: the mirror is ready while fio runs");
                q
            }));
        },
    );
    show(&run);
    check_done(&run, &a.log_text());
    check_fio(&run);
    let mut q = mirror
        .expect("fio started")
        .join()
        .expect("the mirror became ready");
    // The guest's I/O has stopped: the switch-over.
    q.execute("block-job-complete", json!({"device": "migrate"}))
        .unwrap();
    let done = q.wait_event(
        "BLOCK_JOB_COMPLETED",
        "device",
        "migrate",
        Duration::from_secs(60),
    );
    assert!(done.get("error").is_none(), "{done}");
    let exports = q.execute("query-block-exports", json!({})).unwrap();
    assert_eq!(exports[0]["node-name"], "remote", "{exports}");
    let (status, log) = a.stop();
    assert!(status.success(), "{log}");
    let (status, log) = b.stop();
    assert!(status.success(), "{log}");
    let (code, out, e) = strata_tests::qemu::qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "host B's image is not host A's:\n{out}{e}");
    let (code, out) = strata_tests::qemu::check(&dst);
    assert_eq!(code, 0, "{out}");
    println!("migration: host B's image equals host A's source");
}

/// PCI hotplug: one daemon with a 1-queue export the guest boots with and
/// an 8-queue export that QEMU plugs in, unplugs and plugs in again
/// (`device_add`/`device_del` of vhost-user-blk-pci) while fio verify
/// keeps the first disk busy. The second disk keeps what was written to
/// it across the replug; the first never sees an error.
#[test]
#[ignore = "boots a QEMU guest; ci/test runs it"]
fn a_disk_hotplugged_unplugged_and_replugged_beside_a_busy_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    for img in [&a, &b] {
        std::fs::File::create(img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
    }
    let (fa, fb) = (
        format!("driver=file,node-name=fa,filename={}", a.display()),
        format!("driver=file,node-name=fb,filename={}", b.display()),
    );
    let vdb_sock = dir.path().join("vdb.sock");
    let vdb = format!(
        "type=vhost-user-blk,id=vdb,node-name=b,writable=on,num-queues=8,addr.type=unix,addr.path={}",
        vdb_sock.display()
    );
    let (daemon, mut strata_qmp) = Daemon::qsd_with_monitor(
        dir.path(),
        &[&fa, "driver=raw,node-name=a,file=fa"],
        "id=vda,node-name=a,writable=on,num-queues=1",
        &[
            "--blockdev",
            &fb,
            "--blockdev",
            "driver=raw,node-name=b,file=fb",
            "--export",
            &vdb,
        ],
    );

    let qemu_qmp_path = dir.path().join("qemu.qmp");
    let mut qemu: Option<Qmp> = None;
    let plug = |q: &mut Qmp| {
        q.execute(
            "device_add",
            json!({"driver": "vhost-user-blk-pci", "id": "hp0", "chardev": "c1", "num-queues": 8}),
        )
        .unwrap_or_else(|e| panic!("device_add: {e}"));
    };
    let run = strata_tests::guest::boot_with_monitor(
        daemon.socket(),
        1,
        "hotplug",
        &qemu_qmp_path,
        BOOT_TIMEOUT,
        &mut |line| {
            let q = qemu.get_or_insert_with(|| Qmp::connect(&qemu_qmp_path));
            if line.starts_with("STRATA hotplug-plug") {
                q.execute(
                    "chardev-add",
                    json!({"id": "c1", "backend": {"type": "socket", "data": {
                        "addr": {"type": "unix", "data": {"path": vdb_sock.to_str().unwrap()}},
                        "server": false}}}),
                )
                .unwrap_or_else(|e| panic!("chardev-add: {e}"));
                plug(q);
            } else if line.starts_with("STRATA hotplug-unplug") {
                q.execute("device_del", json!({"id": "hp0"}))
                    .unwrap_or_else(|e| panic!("device_del: {e}"));
            } else if line.starts_with("STRATA hotplug-replug") {
                q.wait_event("DEVICE_DELETED", "device", "hp0", Duration::from_secs(60));
                plug(q);
            }
        },
    );
    show(&run);
    check_done(&run, &daemon.log_text());
    assert!(run.failures().is_empty(), "{:?}", run.failures());
    assert_eq!(
        run.value("STRATA hotplug vdb", "size_sectors").as_deref(),
        Some("131072")
    );
    // Linux uses no more queues than it has CPUs (two); QEMU still set up
    // all eight with the daemon.
    assert_eq!(
        run.value("STRATA hotplug vdb", "queues").as_deref(),
        Some("2")
    );
    assert!(run
        .lines
        .iter()
        .any(|l| l.starts_with("STRATA hotplug replugged")));

    let stats = strata_qmp.execute("query-blockstats", json!({})).unwrap();
    let ops = |id: &str, k: &str| {
        stats
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["device"] == id)
            .unwrap()["stats"][k]
            .as_u64()
            .unwrap()
    };
    assert!(ops("vda", "wr_operations") > 100, "{stats}");
    assert!(ops("vdb", "wr_operations") > 100, "{stats}");
    assert!(ops("vdb", "rd_operations") > 0, "{stats}");
    let (status, log) = daemon.stop();
    assert!(status.success(), "strata exited with {status}:\n{log}");
}
