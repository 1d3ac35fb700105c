//! `strata top` over two real daemons found by a pattern: the one whose
//! export a frontend keeps busy shows reads per second, the idle one
//! zeroes, and a socket nobody listens on is reported, not fatal.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use strata_tests::client::SyncClient;
use strata_tests::daemon::{strata_bin, Daemon};

fn daemon(dir: &std::path::Path, id: &str) -> (Daemon, strata_tests::qmp::Qmp) {
    std::fs::create_dir_all(dir).unwrap();
    let img = dir.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let file = format!("driver=file,node-name=file,filename={}", img.display());
    Daemon::qsd_with_monitor(
        dir,
        &[&file, "driver=raw,node-name=disk,file=file"],
        &format!("id={id},node-name=disk,writable=on"),
        &[],
    )
}

#[test]
fn top_shows_each_daemons_exports_by_pattern() {
    let root = tempfile::tempdir().unwrap();
    let (busy, _q1) = daemon(&root.path().join("vm1"), "vda");
    let (_idle, _q2) = daemon(&root.path().join("vm2"), "vdb");
    // A third "daemon" that is gone: its socket file stays behind.
    let gone = root.path().join("vm3");
    std::fs::create_dir_all(&gone).unwrap();
    drop(std::os::unix::net::UnixListener::bind(gone.join("qmp.sock")).unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (sock, stop) = (busy.socket().to_owned(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut c = SyncClient::connect(&sock, true).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                c.read((n % 1024) * 4096, 4096).unwrap();
                n += 1;
            }
            n
        })
    };
    let pattern = format!("{}/*/qmp.sock", root.path().display());
    let out = Command::new(strata_bin())
        .args([
            "top",
            "--glob",
            &pattern,
            "--interval",
            "0.5",
            "--count",
            "2",
        ])
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Two reports, each with a header; the last one is checked.
    let reports: Vec<&str> = text
        .split("\n\n")
        .filter(|r| !r.trim().is_empty())
        .collect();
    assert_eq!(reports.len(), 2, "{text}");
    let last = reports[1];
    assert!(last.starts_with("daemon/export"), "{last}");
    let field = |row: &str, col: usize| -> f64 {
        row.split_whitespace().nth(col).unwrap().parse().unwrap()
    };
    // Socket paths share a file name, so daemons go by their paths.
    let vm1 = last
        .lines()
        .find(|l| l.contains("vm1/qmp.sock/vda"))
        .unwrap_or_else(|| panic!("{last}"));
    let vm2 = last
        .lines()
        .find(|l| l.contains("vm2/qmp.sock/vdb"))
        .unwrap_or_else(|| panic!("{last}"));
    assert!(field(vm1, 2) > 0.0, "reads per second: {vm1}");
    assert_eq!(field(vm1, 3), 0.0, "writes per second: {vm1}");
    assert!(field(vm1, 6) > 0.0, "read latency: {vm1}");
    assert_eq!(field(vm2, 2), 0.0, "{vm2}");
    assert!(
        last.lines()
            .any(|l| l.contains("vm3/qmp.sock") && l.contains("unreachable: cannot connect")),
        "{last}"
    );
}

#[test]
fn top_without_daemons_says_what_to_give() {
    let out = Command::new(strata_bin()).args(["top"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--qmp PATH") && err.contains("--glob PATTERN"),
        "{err}"
    );
    let out = Command::new(strata_bin())
        .args(["top", "--qmp", "x", "--interval", "0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("'0' is not a number of seconds"));
}
