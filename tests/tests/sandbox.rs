//! The sandbox: every thread of a serving daemon runs under seccomp, no
//! new privileges can be gained, and a system call a queue thread may not
//! make ends the daemon with SIGSYS and a log line that names it.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;

/// (thread name, its status file) for every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let t = t.unwrap().path();
            (
                std::fs::read_to_string(t.join("comm"))
                    .unwrap()
                    .trim()
                    .to_owned(),
                std::fs::read_to_string(t.join("status")).unwrap(),
            )
        })
        .collect()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or("")
}

fn serve(dir: &std::path::Path, sandbox: &str, env: &[(&str, &str)]) -> Daemon {
    let image = dir.join("disk.img");
    let image = image.to_str().unwrap();
    let args = [
        image,
        "--create",
        "16M",
        "--num-queues",
        "2",
        "--sandbox",
        sandbox,
    ];
    Daemon::serve_with_env(&args, env, &dir.join("vm.sock"), &dir.join("log"))
}

#[test]
fn every_thread_of_a_serving_daemon_is_under_seccomp() {
    let dir = tempfile::tempdir().unwrap();
    let d = serve(dir.path(), "on", &[]);
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    c.write(0, &[1; 4096]).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![1; 4096]);
    let all = threads(d.pid());
    let queues = all.iter().filter(|(n, _)| n.starts_with("queue-")).count();
    assert_eq!(queues, 2, "{all:?}");
    for (name, status) in &all {
        assert_eq!(field(status, "Seccomp:"), "2", "thread {name}");
        assert_eq!(field(status, "NoNewPrivs:"), "1", "thread {name}");
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_forbidden_system_call_on_a_queue_thread_ends_the_daemon_with_sigsys() {
    let dir = tempfile::tempdir().unwrap();
    let d = serve(dir.path(), "on", &[("STRATA_TEST_SANDBOX_VIOLATION", "1")]);
    // A queue thread makes the forbidden call as it starts:
    // the daemon may be gone before the client is set up, or with its
    // request, which libblkio then waits for for ever: a thread left
    // behind does the I/O.
    let socket = d.socket().to_owned();
    std::thread::spawn(move || {
        if let Ok(mut c) = SyncClient::connect(&socket, false) {
            let _ = c.read(0, 4096);
        }
    });
    let (status, log) = d.wait_exit(Duration::from_secs(30));
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}\n{log}");
    assert!(
        log.contains("sandbox violation: system call socket (41) on thread 'queue-"),
        "{log}"
    );
}

#[test]
fn sandbox_off_applies_no_filter() {
    let dir = tempfile::tempdir().unwrap();
    let d = serve(dir.path(), "off", &[("STRATA_TEST_SANDBOX_VIOLATION", "1")]);
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![0; 4096]);
    for (name, status) in threads(d.pid()) {
        assert_eq!(field(&status, "Seccomp:"), "0", "thread {name}");
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn run_with_drops_every_thread_to_the_user_once_the_disk_is_open() {
    let dir = tempfile::tempdir().unwrap();
    // Root's alone, as the tempdir is: the daemon opens it before it drops.
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let (d, mut qmp) = Daemon::qsd_with_monitor(
        dir.path(),
        &[&format!(
            "driver=file,node-name=disk,filename={}",
            image.display()
        )],
        "id=e0,node-name=disk,writable=on,num-queues=2",
        &["--run-with", "user=nobody"],
    );
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    c.write(0, &[7; 4096]).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![7; 4096]);
    c.flush().unwrap();
    let all = threads(d.pid());
    assert!(all.iter().any(|(n, _)| n.starts_with("queue-")), "{all:?}");
    for (name, status) in &all {
        assert_eq!(
            field(status, "Uid:"),
            "65534\t65534\t65534\t65534",
            "{name}"
        );
        assert_eq!(
            field(status, "Gid:"),
            "65534\t65534\t65534\t65534",
            "{name}"
        );
        assert_eq!(field(status, "Groups:"), "65534", "{name}");
        assert_eq!(field(status, "Seccomp:"), "2", "{name}");
    }
    // What the daemon opens from now on, it opens as nobody.
    let e = qmp
        .execute(
            "blockdev-add",
            serde_json::json!({"driver": "file", "node-name": "late",
                               "filename": dir.path().join("disk.img")}),
        )
        .unwrap_err();
    assert!(
        e["desc"].as_str().unwrap().contains("Permission denied"),
        "{e}"
    );
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        log.contains("running as nobody (uid 65534, gid 65534)"),
        "{log}"
    );
}

#[test]
fn run_with_names_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(strata_tests::daemon::strata_bin())
        .args(["serve", "--socket"])
        .arg(dir.path().join("vm.sock"))
        .args(["--run-with", "user=no-such-user-here"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--run-with") && err.contains("user 'no-such-user-here': no such user"),
        "{err}"
    );
}

#[test]
fn landlock_keeps_the_daemon_to_the_directories_it_was_given() {
    let [dir, other, allowed] = [(); 3].map(|()| tempfile::tempdir().unwrap());
    let img = |d: &tempfile::TempDir, name: &str| {
        let p = d.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        p
    };
    let disk = img(&dir, "disk.img");
    let (d, mut qmp) = Daemon::qsd_with_monitor(
        dir.path(),
        &[&format!(
            "driver=file,node-name=disk,filename={}",
            disk.display()
        )],
        "id=e0,node-name=disk",
        &["--sandbox-allow", allowed.path().to_str().unwrap()],
    );
    let mut add = |name: &str, path: &std::path::Path| {
        qmp.execute(
            "blockdev-add",
            serde_json::json!({"driver": "file", "node-name": name, "filename": path, "read-only": true}),
        )
    };
    let outside = img(&other, "x.img");
    let e = add("outside", &outside).unwrap_err();
    let desc = e["desc"].as_str().unwrap();
    assert!(
        desc.contains("Permission denied") && desc.contains(outside.to_str().unwrap()),
        "{e}"
    );
    add("allowed", &img(&allowed, "y.img")).expect("a directory the operator allowed");
    add("beside", &img(&dir, "z.img")).expect("the image's own directory");
    let e = add("etc", std::path::Path::new("/etc/hostname")).unwrap_err();
    assert!(
        e["desc"].as_str().unwrap().contains("Permission denied"),
        "{e}"
    );
    let (_, log) = d.stop();
    assert!(log.contains("Landlock fully enforced"), "{log}");
}
