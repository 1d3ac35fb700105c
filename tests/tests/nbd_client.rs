//! Strata's `nbd` driver against real servers: qemu-nbd and
//! qemu-storage-daemon's NBD export, plain and over TLS. A node on the
//! export is served over vhost-user to libblkio: what it reads is the
//! image, what it writes lands in the image, block status comes through,
//! and a server killed and restarted under load costs no request an error
//! within `reconnect-delay`, while one that stays away fails requests only
//! after it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;
use strata_tests::nbd_client::free_port;
use strata_tests::pki::Pki;
use strata_tests::qemu::{create, qemu_img, qemu_img_ok, to_raw};

const MIB: u64 = 1 << 20;

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// qemu-nbd serving `img` as `disk` on the unix socket `sock`, or on
/// 127.0.0.1:`port` with `extra` options.
fn qemu_nbd(img: &Path, fmt: &str, sock: Option<&Path>, port: u16, extra: &[&str]) -> Server {
    let mut c = Command::new("qemu-nbd");
    c.args([
        "-f",
        fmt,
        "-x",
        "disk",
        "--persistent",
        "--shared=16",
        "--cache=none",
    ]);
    match sock {
        Some(s) => {
            let _ = std::fs::remove_file(s);
            c.args(["-k", s.to_str().unwrap()]);
        }
        None => {
            c.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
        }
    }
    let child = c
        .args(extra)
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd is installed");
    match sock {
        Some(s) => wait_for("qemu-nbd's socket", || s.exists()),
        None => wait_for("qemu-nbd's port", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }),
    }
    Server(child)
}

/// Strata with `objects`, the node `blockdev` (named `n`) and a writable
/// vhost-user export of it.
fn strata(dir: &Path, objects: &[String], blockdev: &str) -> Result<Daemon, String> {
    let sock = dir.join("vhost.sock");
    let export = format!(
        "type=vhost-user-blk,id=v0,node-name=n,writable=on,addr.type=unix,addr.path={}",
        sock.display()
    );
    let chardev = format!(
        "socket,id=m0,path={},server=on,wait=off",
        dir.join("qmp.sock").display()
    );
    let mut args: Vec<&str> = Vec::new();
    for o in objects {
        args.extend(["--object", o]);
    }
    args.extend(["--blockdev", blockdev, "--export", &export]);
    args.extend(["--chardev", &chardev, "--monitor", "chardev=m0"]);
    Daemon::try_qsd(&args, &sock, &dir.join("strata.log"))
}

/// A qcow2 image with data, a zero range and unallocated ranges.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    create(&img, "qcow2", "16M");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -z 4M 2M",
        ])
        .args(["-c", "write -P 0x22 9M 512k"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success());
    img
}

/// Reads the whole disk, writes a range and reads it back.
fn check_round_trip(d: &Daemon, expected: &[u8]) {
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    assert_eq!(c.capacity, expected.len() as u64);
    for at in (0..expected.len()).step_by(4 << 20) {
        let got = c.read(at as u64, 4 << 20).unwrap();
        assert!(
            got == expected[at..at + (4 << 20)],
            "data differs in the 4 MiB at {at}"
        );
    }
    c.write(12 * MIB, &vec![0x5a; MIB as usize]).unwrap();
    c.write(3 * MIB + 4096, &[0x6b; 8192]).unwrap();
    c.write_zeroes(MIB, 64 << 10, false).unwrap();
    c.flush().unwrap();
    assert_eq!(
        c.read(12 * MIB, MIB as usize).unwrap(),
        vec![0x5a; MIB as usize]
    );
    assert_eq!(c.read(MIB, 64 << 10).unwrap(), vec![0; 64 << 10]);
}

/// [`check_round_trip`], then with the daemon and the server stopped,
/// [`check_landed`].
fn round_trip_lands(d: Daemon, server: Server, img: &Path, expected: &[u8]) {
    check_round_trip(&d, expected);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    drop(server);
    check_landed(img);
}

fn check_landed(img: &Path) {
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 12M 1M",
            "-c",
            "read -P 0x6b 3149824 8192",
        ])
        .args(["-c", "read -P 0 1M 64k", "-c", "read -P 0x11 1088k 1M"])
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
}

#[test]
fn a_node_over_qemu_nbd_reads_the_image_and_its_writes_land() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let expected = to_raw(&img);
    let sock = dir.path().join("qemu-nbd.sock");
    let server = qemu_nbd(&img, "qcow2", Some(&sock), 0, &[]);
    let d = strata(
        dir.path(),
        &[],
        &format!(
            "driver=nbd,node-name=n,server.type=unix,server.path={},export=disk",
            sock.display()
        ),
    )
    .unwrap();
    round_trip_lands(d, server, &img, &expected);
}

#[test]
fn a_node_over_qsd_nbd_export_on_tcp_maps_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let expected = to_raw(&img);
    let port = free_port();
    let qsd = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", img.display()),
            "--blockdev",
            "driver=qcow2,node-name=disk,file=f",
            "--nbd-server",
            &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            "--export",
            "type=nbd,id=e0,node-name=disk,writable=on",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon is installed");
    let qsd = Server(qsd);
    wait_for("qsd's port", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let d = strata(
        dir.path(),
        &[],
        &format!(
            "driver=nbd,node-name=n,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk"
        ),
    )
    .unwrap();

    // Block status crosses both hops: Strata's node, re-exported over
    // Strata's NBD server, maps as the image does.
    let nbd_sock = dir.path().join("strata-nbd.sock");
    let mut qmp = strata_tests::qmp::Qmp::connect(&dir.path().join("qmp.sock"));
    qmp.execute(
        "nbd-server-start",
        serde_json::json!({"addr": {"type": "unix", "path": nbd_sock}}),
    )
    .unwrap();
    qmp.execute(
        "block-export-add",
        serde_json::json!({"type": "nbd", "id": "e1", "node-name": "n", "name": "again"}),
    )
    .unwrap();
    let url = format!("nbd+unix:///again?socket={}", nbd_sock.display());
    let map = qemu_img_ok(&["map", "--output=json", "-f", "raw", &url]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(0, 3 * MIB), (9 * MIB, 512 << 10)], "{map}");
    qmp.execute("nbd-server-stop", serde_json::json!({}))
        .unwrap();

    round_trip_lands(d, qsd, &img, &expected);
}

/// A node on a raw image served by qemu-nbd on `sock`, reconnecting for
/// `delay` seconds.
fn reconnecting(dir: &Path, img: &Path, sock: &Path, delay: u32) -> (Server, Daemon) {
    let server = qemu_nbd(img, "raw", Some(sock), 0, &[]);
    let d = strata(
        dir,
        &[],
        &format!(
            "driver=nbd,node-name=n,server.type=unix,server.path={},export=disk,reconnect-delay={delay}",
            sock.display()
        ),
    )
    .unwrap();
    (server, d)
}

#[test]
fn a_server_restarted_under_load_costs_no_request_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    create(&img, "raw", "64M");
    let sock = dir.path().join("qemu-nbd.sock");
    let (server, d) = reconnecting(dir.path(), &img, &sock, 10);
    let stop = Arc::new(AtomicBool::new(false));
    let load = std::thread::spawn({
        let (socket, stop) = (d.socket().to_path_buf(), Arc::clone(&stop));
        move || {
            let mut c = SyncClient::connect(&socket, false).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let at = (i % 256) * (256 << 10);
                let data = vec![(i % 251) as u8 + 1; 64 << 10];
                c.write(at, &data)
                    .unwrap_or_else(|e| panic!("write {i}: errno {e}"));
                let got = c
                    .read(at, 64 << 10)
                    .unwrap_or_else(|e| panic!("read {i}: errno {e}"));
                assert!(got == data, "request {i} read back other data");
                i += 1;
            }
            i
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    drop(server);
    std::thread::sleep(Duration::from_secs(2));
    let server = qemu_nbd(&img, "raw", Some(&sock), 0, &[]);
    wait_for("the reconnection", || d.log_text().contains("reconnected"));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let done = load.join().expect("no request failed");
    assert!(done > 10, "only {done} requests ran");
    assert!(d.log_text().contains("connection lost"), "{}", d.log_text());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    drop(server);
}

#[test]
fn a_server_that_stays_away_fails_requests_only_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    create(&img, "raw", "16M");
    let sock = dir.path().join("qemu-nbd.sock");
    let (server, mut d) = reconnecting(dir.path(), &img, &sock, 2);
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    c.write(0, &[7; 4096]).unwrap();
    drop(server);
    let t = Instant::now();
    let err = c.read(0, 4096).expect_err("a read with no server");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "failed after {waited:?}, errno {err}"
    );
    // Past the delay, requests fail at once, and the daemon goes on.
    let t = Instant::now();
    assert!(c.read(0, 4096).is_err());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(d.is_running());
    // The server comes back: so do the requests.
    let _server = qemu_nbd(&img, "raw", Some(&sock), 0, &[]);
    wait_for("the reconnection", || d.log_text().contains("reconnected"));
    assert_eq!(c.read(0, 4096).unwrap(), vec![7; 4096]);
}

#[test]
fn a_node_over_tls_to_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let expected = to_raw(&img);
    let pki = Pki::new(dir.path(), "ca");
    let server_creds = pki.server("server");
    let client_creds = pki.client("client", "/O=Strata/CN=client");
    let port = free_port();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        server_creds.display()
    );
    let server = qemu_nbd(
        &img,
        "qcow2",
        None,
        port,
        &["--object", &object, "--tls-creds", "tls0"],
    );
    let node = format!(
        "driver=nbd,node-name=n,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk"
    );
    let creds = |d: &Path| format!("tls-creds-x509,id=t,dir={},endpoint=client", d.display());

    // Without TLS, or with a CA that did not sign the server, no node.
    let sub = |name: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let log = strata(&sub("plain"), &[], &node).map(|_| ()).unwrap_err();
    assert!(log.contains("requires TLS"), "{log}");
    let rogue = Pki::new(dir.path(), "rogue").client("rogue-client", "/CN=client");
    let log = strata(
        &sub("rogue"),
        &[creds(&rogue)],
        &format!("{node},tls-creds=t"),
    )
    .map(|_| ())
    .unwrap_err();
    assert!(log.contains("TLS handshake failed"), "{log}");

    let d = strata(
        &sub("tls"),
        &[creds(&client_creds)],
        &format!("{node},tls-creds=t"),
    )
    .unwrap();
    round_trip_lands(d, server, &img, &expected);
}

#[test]
fn bad_nbd_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    create(&img, "raw", "1M");
    let sock = dir.path().join("qemu-nbd.sock");
    let _server = qemu_nbd(&img, "raw", Some(&sock), 0, &[]);
    let unix = format!("server.type=unix,server.path={}", sock.display());
    let cases = [
        (
            "driver=nbd,node-name=n,export=disk".to_string(),
            "Parameter 'server' is missing",
        ),
        (
            "driver=nbd,node-name=n,server.type=inet,server.host=127.0.0.1,server.port=http".into(),
            "server.port 'http': not a port number",
        ),
        (
            format!("driver=nbd,node-name=n,{unix},export=nope"),
            "no such export",
        ),
        // A name that does not resolve: an error, not a sandbox violation.
        (
            "driver=nbd,node-name=n,server.type=inet,server.host=nowhere.invalid,server.port=10809"
                .into(),
            "server.host 'nowhere.invalid'",
        ),
        (
            format!("driver=nbd,node-name=n,{unix},export=disk,tls-creds=none"),
            "no TLS credentials with id 'none'",
        ),
        (
            format!(
                "driver=nbd,node-name=n,server.type=unix,server.path={}/gone.sock,open-timeout=1",
                dir.path().display()
            ),
            "gone.sock",
        ),
    ];
    for (i, (blockdev, want)) in cases.iter().enumerate() {
        let sub = dir.path().join(format!("case{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        let t = Instant::now();
        let log = strata(&sub, &[], blockdev).map(|_| ()).unwrap_err();
        assert!(log.contains(want), "{blockdev}: want '{want}' in:\n{log}");
        if blockdev.contains("open-timeout=1") {
            assert!(
                t.elapsed() >= Duration::from_millis(900),
                "{:?}",
                t.elapsed()
            );
        }
    }
    let (code, _, _) = qemu_img(&["info", "-U", img.to_str().unwrap()]);
    assert_eq!(code, 0);
}
