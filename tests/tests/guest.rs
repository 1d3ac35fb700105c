//! End to end: a Linux guest under QEMU (TCG) uses a Strata disk.
//!
//! These boot a VM, so they are ignored by a plain `cargo test`; ci/test
//! builds the guest and runs them with `--ignored`.

use std::time::Duration;

use strata_tests::daemon::Daemon;
use strata_tests::guest::{boot, GuestRun};

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
    let job_results: Vec<&String> = run
        .lines
        .iter()
        .filter(|l| l.contains("(groupid="))
        .collect();
    assert_eq!(
        job_results.len(),
        2,
        "two fio jobs reported: {job_results:?}"
    );
    assert!(
        job_results.iter().all(|l| l.contains("err= 0")),
        "{job_results:?}"
    );
    assert_eq!(run.value("STRATA fio", "rc").as_deref(), Some("0"));

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
