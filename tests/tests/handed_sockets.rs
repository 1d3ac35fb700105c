//! Sockets handed in by the parent, as qemu-storage-daemon takes them and
//! as systemd passes them:
//! - two vhost-user-blk exports and a QMP monitor on inherited descriptors
//!   (`addr.type=fd`, `--chardev socket,fd=`), served the same by strata
//!   and qsd, and exit status 0 after SIGTERM;
//! - socket activation under `systemd-socket-activate`, the export found by
//!   its `LISTEN_FDNAMES` name, with `READY=1` and `STOPPING=1` sent to
//!   `NOTIFY_SOCKET`;
//! - the NBD server on a handed TCP socket, read by qemu-img;
//! - descriptors that are no listening unix socket, each named;
//! - the shipped systemd template units, through `systemd-analyze verify`.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_tests::client::SyncClient;
use strata_tests::daemon::strata_bin;
use strata_tests::qmp::Qmp;

const MIB: u64 = 1 << 20;

/// Lets children inherit `fd`.
fn inheritable(fd: &(impl AsRawFd + ?Sized)) -> String {
    // SAFETY: clearing FD_CLOEXEC on our own descriptor.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    fd.as_raw_fd().to_string()
}

fn image(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    p.display().to_string()
}

fn wait(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// What one daemon showed: its exports, whether each disk kept what was
/// written to it (with the other export's frontend connected, and after
/// a reconnect), and its exit status after SIGTERM.
#[derive(Debug, PartialEq)]
struct Seen {
    exports: Value,
    data_ok: [bool; 2],
    exit: Option<i32>,
}

fn two_exports_on_fds(binary: &Path, dir: &Path) -> Seen {
    let socks: Vec<_> = (0..2).map(|i| dir.join(format!("vu{i}.sock"))).collect();
    let listeners: Vec<_> = socks
        .iter()
        .map(|p| UnixListener::bind(p).unwrap())
        .collect();
    let qmp_sock = dir.join("qmp.sock");
    let monitor = UnixListener::bind(&qmp_sock).unwrap();
    let mut cmd = Command::new(binary);
    for (i, l) in listeners.iter().enumerate() {
        cmd.args([
            "--blockdev",
            &format!(
                "driver=file,node-name=disk{i},filename={}",
                image(dir, &format!("disk{i}.img"))
            ),
        ])
        .args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=disk{i},addr.type=fd,addr.str={},node-name=disk{i},\
                 writable=on,num-queues={}",
                inheritable(l),
                [2, 1][i]
            ),
        ]);
    }
    cmd.args([
        "--chardev",
        &format!(
            "socket,id=m0,fd={},server=on,wait=off",
            inheritable(&monitor)
        ),
    ])
    .args(["--monitor", "chardev=m0"]);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop((listeners, monitor));

    let mut qmp = Qmp::connect(&qmp_sock);
    // The keys qsd's answer has (strata adds its own).
    let mut exports: Vec<Value> = qmp
        .execute("query-block-exports", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let keys = ["id", "node-name", "shutting-down", "type"];
            keys.iter().map(|&k| (k.to_owned(), e[k].clone())).collect()
        })
        .collect();
    exports.sort_by_key(|e| e["id"].as_str().unwrap_or_default().to_owned());
    let exports = Value::Array(exports);
    let mut data_ok = [false; 2];
    let mut other = SyncClient::connect(&socks[1], false).unwrap();
    other.write(0, &[0x11; 4096]).unwrap();
    for round in 0..2 {
        // A reconnect on one export leaves the other connected.
        let mut c = SyncClient::connect(&socks[0], false).unwrap();
        let pattern = vec![0xa0 + round as u8; 8192];
        c.write(MIB, &pattern).unwrap();
        c.flush().unwrap();
        data_ok[0] = c.read(MIB, pattern.len()).unwrap() == pattern;
    }
    data_ok[1] = other.read(0, 4096).unwrap() == vec![0x11; 4096];
    drop(other);
    drop(qmp);
    sigterm(&child);
    let exit = wait(&mut child, Duration::from_secs(30)).code();
    Seen {
        exports,
        data_ok,
        exit,
    }
}

#[test]
fn exports_and_a_monitor_on_handed_descriptors_serve_as_qsd_does() {
    let dir = tempfile::tempdir().unwrap();
    let strata = two_exports_on_fds(strata_bin(), dir.path());
    assert_eq!(strata.data_ok, [true, true]);
    assert_eq!(strata.exit, Some(0), "exit status after SIGTERM");
    let ids: Vec<_> = strata
        .exports
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(ids, [&json!("disk0"), &json!("disk1")]);
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok()
    {
        let dir = tempfile::tempdir().unwrap();
        let qsd = two_exports_on_fds(Path::new("qemu-storage-daemon"), dir.path());
        assert_eq!(strata, qsd, "strata and qsd differ");
    }
}

#[test]
fn socket_activation_finds_the_export_by_name_and_notifies_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm1-disk0.sock");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg("--fdname=vm1-disk0")
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg(strata_bin())
        .args([
            "--blockdev",
            &format!(
                "driver=file,node-name=disk,filename={}",
                image(dir.path(), "disk.img")
            ),
        ])
        .args([
            "--export",
            "type=vhost-user-blk,id=disk0,addr.type=fd,addr.str=vm1-disk0,node-name=disk,writable=on",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the activator did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, which then accepts it.
    let mut c = SyncClient::connect(&sock, false).unwrap();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    c.write(0, &[0x5a; 4096]).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    drop(c);
    sigterm(&child);
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = wait(&mut child, Duration::from_secs(30));
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
}

/// Runs strata with one export on `addr.str=STR` and `fd` inherited, and
/// returns what it printed; it must fail.
fn refused(dir: &Path, addr: &str, fd: Option<&dyn AsRawFd>) -> String {
    if let Some(fd) = fd {
        inheritable(fd);
    }
    let out = Command::new(strata_bin())
        .args([
            "--blockdev",
            &format!(
                "driver=file,node-name=disk,filename={}",
                image(dir, "d.img")
            ),
        ])
        .args([
            "--export",
            &format!("type=vhost-user-blk,id=e,node-name=disk,writable=on,{addr}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{addr} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn descriptors_that_cannot_serve_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = refused(dir.path(), "addr.type=fd,addr.str=77", None);
    assert!(e.contains("addr.str '77' is neither a descriptor"), "{e}");
    let e = refused(dir.path(), "addr.type=fd,addr.str=vm9-disk0", None);
    assert!(e.contains("'vm9-disk0'"), "{e}");
    let e = refused(dir.path(), "addr.type=fd", None);
    assert!(e.contains("str"), "{e}");
    let e = refused(dir.path(), "addr.type=vsock,addr.cid=3", None);
    assert!(e.contains("vsock"), "{e}");

    let file = std::fs::File::open(dir.path().join("d.img")).unwrap();
    let addr = format!("addr.type=fd,addr.str={}", file.as_raw_fd());
    let e = refused(dir.path(), &addr, Some(&file));
    assert!(e.contains("is not a socket"), "{e}");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("addr.type=fd,addr.str={}", tcp.as_raw_fd());
    let e = refused(dir.path(), &addr, Some(&tcp));
    assert!(e.contains("not a unix socket"), "{e}");
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let addr = format!("addr.type=fd,addr.str={}", a.as_raw_fd());
    let e = refused(dir.path(), &addr, Some(&a));
    assert!(e.contains("does not listen"), "{e}");
}

#[test]
fn the_nbd_server_listens_on_a_handed_tcp_socket() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let mut child = Command::new(strata_bin())
        .args(["--blockdev", "driver=null-co,node-name=n,size=64M"])
        .args([
            "--nbd-server",
            &format!("addr.type=fd,addr.str={}", inheritable(&tcp)),
        ])
        .args(["--export", "type=nbd,id=e,node-name=n,name=n"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(tcp);
    let out = Command::new("qemu-img")
        .args([
            "info",
            "--output=json",
            &format!("nbd://127.0.0.1:{port}/n"),
        ])
        .output()
        .unwrap();
    sigterm(&child);
    assert_eq!(wait(&mut child, Duration::from_secs(30)).code(), Some(0));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], json!(64 * MIB));
}

/// The shipped template units parse as systemd reads them.
#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../backend/systemd");
    let service = std::fs::read_to_string(units.join("strata@.service")).unwrap();
    // verify wants ExecStart's program to exist.
    let service = service.replace("/usr/local/bin/strata", &strata_bin().display().to_string());
    std::fs::write(dir.path().join("strata@.service"), service).unwrap();
    std::fs::copy(
        units.join("strata@.socket"),
        dir.path().join("strata@.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("strata@vm1-disk0.service"))
        .arg(dir.path().join("strata@vm1-disk0.socket"))
        .output()
        .expect("systemd-analyze (package systemd)");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}
