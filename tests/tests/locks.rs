//! Image locks against the real tools, both ways: what strata serves,
//! qemu-img, qemu-io, qemu-storage-daemon and a second strata may not
//! write; what they write, strata does not serve.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata_tests::daemon::{strata_bin, Daemon};
use strata_tests::qemu::qemu_img_ok;

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .expect("the tool runs")
}

fn strata(args: &[&str]) -> Output {
    Command::new(strata_bin())
        .args(args)
        .output()
        .expect("strata runs")
}

#[track_caller]
fn refused(out: Output, lock: &str, image: &Path) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(
        err.contains(&format!("Failed to get {lock} lock")),
        "no {lock} lock in: {err}"
    );
    assert!(
        err.contains(&format!("[{}]", image.display())),
        "the image is not named in: {err}"
    );
}

#[track_caller]
fn allowed(out: Output) {
    assert!(
        out.status.success(),
        "refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chain(dir: &Path) -> (String, String) {
    let base = dir.join("base.qcow2").display().to_string();
    let top = dir.join("top.qcow2").display().to_string();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", &base, "64M"]);
    qemu_img_ok(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    (base, top)
}

#[test]
fn what_strata_serves_no_one_else_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    let (topp, basep) = (Path::new(&top), Path::new(&base));
    let d = Daemon::serve(
        &[&top],
        &dir.path().join("vhost.sock"),
        &dir.path().join("log"),
    );

    // qemu-img and qemu-io: readers that mind writes, and writers.
    refused(run("qemu-img", &["info", &top]), "shared \"write\"", topp);
    allowed(run("qemu-img", &["info", "-U", &top]));
    refused(run("qemu-img", &["check", &top]), "shared \"write\"", topp);
    refused(run("qemu-img", &["commit", &top]), "\"write\"", topp);
    refused(
        run("qemu-io", &["-c", "write 0 4k", &top]),
        "\"write\"",
        topp,
    );
    // The backing file is read, so readers may look but not write.
    allowed(run("qemu-img", &["info", &base]));
    refused(
        run("qemu-io", &["-c", "write 0 4k", &base]),
        "\"write\"",
        basep,
    );

    // A second strata, and strata's own image tools.
    let second = dir.path().join("second.sock");
    refused(
        strata(&["serve", &top, "--socket", second.to_str().unwrap()]),
        "\"write\"",
        topp,
    );
    refused(
        strata(&[
            "serve",
            &top,
            "--read-only",
            "--socket",
            second.to_str().unwrap(),
        ]),
        "shared \"write\"",
        topp,
    );
    refused(strata(&["info", &top]), "shared \"write\"", topp);
    allowed(strata(&["info", "-U", &top]));
    refused(strata(&["map", &top]), "shared \"write\"", topp);
    refused(strata(&["check", "-r", "all", &top]), "\"write\"", topp);
    refused(strata(&["check", &top]), "shared \"write\"", topp);
    allowed(strata(&["check", "-U", &top]));

    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // Gone with the daemon.
    allowed(run("qemu-img", &["check", &top]));
    allowed(run("qemu-io", &["-c", "write 0 4k", &base]));
}

/// A qemu-io holding `image` open for writing, until dropped.
struct QemuIo(Child);

impl QemuIo {
    fn open(image: &str) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // It prompts once the image is open.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        use std::io::Write as _;
        writeln!(child.stdin.as_mut().unwrap(), "help").unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "qemu-io did not open {image}");
        QemuIo(child)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn strata_does_not_serve_what_qemu_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    let sock = dir.path().join("vhost.sock");
    let sock = sock.to_str().unwrap();

    let io = QemuIo::open(&top);
    refused(
        strata(&["serve", &top, "--socket", sock]),
        "\"write\"",
        Path::new(&top),
    );
    refused(
        strata(&["serve", &top, "--read-only", "--socket", sock]),
        "shared \"write\"",
        Path::new(&top),
    );
    refused(strata(&["info", &top]), "shared \"write\"", Path::new(&top));
    allowed(strata(&["info", "-U", &top]));
    drop(io);

    // qemu-storage-daemon exporting the image writable.
    let qsd_sock = dir.path().join("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f,filename={top}"),
            "--blockdev",
            "driver=qcow2,node-name=disk,file=f",
            "--export",
            &format!(
                "type=vhost-user-blk,id=e,node-name=disk,writable=on,addr.type=unix,addr.path={}",
                qsd_sock.display()
            ),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !qsd_sock.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    refused(
        strata(&["serve", &top, "--socket", sock]),
        "\"write\"",
        Path::new(&top),
    );
    // Its backing file is only read: strata may serve it read-only...
    let ro = Daemon::serve(
        &[&base, "--read-only"],
        Path::new(sock),
        &dir.path().join("ro.log"),
    );
    let (status, log) = ro.stop();
    assert!(status.success(), "{log}");
    // ...but not write it.
    refused(
        strata(&["serve", &base, "--socket", sock]),
        "\"write\"",
        Path::new(&base),
    );
    let _ = qsd.kill();
    let _ = qsd.wait();
}
