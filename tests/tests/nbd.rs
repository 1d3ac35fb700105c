//! The NBD server against real peers: qemu-img and qemu-io read, map,
//! convert and write over `nbd+unix://` and `nbd://`, and what they see
//! matches the image itself; a bare client checks block status contexts
//! and hostile input; a node exported over vhost-user and NBD at once
//! shows each side the other's writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_nbd::consts::{cflag, chunk, err, opt, rep};
use strata_nbd::Command as Cmd;
use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;
use strata_tests::nbd_client::{free_port, RawClient, Reply};
use strata_tests::qemu::{create, qemu_img, qemu_img_ok};

const MIB: u64 = 1 << 20;
/// Granularity of the map comparisons.
const UNIT: u64 = 64 << 10;

/// A daemon serving `blockdevs` with an NBD server on `addr` (`unix` puts
/// it at `dir/nbd.sock`) and NBD `exports`.
fn serve(dir: &Path, blockdevs: &[String], addr: &str, exports: &[&str]) -> Daemon {
    let sock = dir.join("nbd.sock");
    let server = if addr == "unix" {
        format!("addr.type=unix,addr.path={}", sock.display())
    } else {
        addr.to_string()
    };
    let mut args: Vec<String> = Vec::new();
    for b in blockdevs {
        args.extend(["--blockdev".into(), b.clone()]);
    }
    args.extend(["--nbd-server".into(), server]);
    for e in exports {
        args.extend(["--export".into(), format!("type=nbd,{e}")]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // Returns once the log says the server listens.
    Daemon::qsd(&refs, &sock, &dir.join("log"))
}

fn wait_for_log(d: &Daemon, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.log_text().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no '{what}' in:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_io(fmt: &str, target: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(target).output().expect("qemu-io is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} on {target}:\n{text}"
    );
    text
}

/// (data, zero) per [`UNIT`] from `qemu-img map --output=json` entries,
/// and the layer (0: none, 1: top, ...) that holds it.
fn per_unit(map: &str, size: u64) -> Vec<(bool, bool, u64)> {
    let entries: Vec<Value> = serde_json::from_str(map).unwrap();
    let mut out = vec![(false, true, 0); (size / UNIT) as usize];
    for e in entries {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let layer = if e["present"].as_bool().unwrap() {
            e["depth"].as_u64().unwrap() + 1
        } else {
            0
        };
        for u in start / UNIT..(start + len) / UNIT {
            out[u as usize] = (
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                layer,
            );
        }
    }
    out
}

/// A raw base with data and a hole, under a qcow2 overlay with data, a
/// zero range and unallocated ranges: every kind of range a map reports.
fn chain(dir: &Path) -> (PathBuf, Vec<String>) {
    let (base, top) = (dir.join("base.raw"), dir.join("top.qcow2"));
    create(&base, "raw", "8M");
    qemu_io(
        "raw",
        base.to_str().unwrap(),
        &["write -P 0x11 0 2M", "write -P 0x22 6M 1M"],
    );
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    qemu_io(
        "qcow2",
        top.to_str().unwrap(),
        &[
            "write -P 0x33 1M 512k",
            "write -z 3M 1M",
            "write -P 0x44 7M 64k",
        ],
    );
    let blockdevs = vec![
        format!("driver=file,node-name=bf,filename={}", base.display()),
        "driver=raw,node-name=base,file=bf".into(),
        format!("driver=file,node-name=tf,filename={}", top.display()),
        "driver=qcow2,node-name=top,file=tf,backing=base".into(),
    ];
    (top, blockdevs)
}

#[test]
fn a_qcow2_chain_reads_and_maps_over_nbd_as_it_does_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (top, blockdevs) = chain(dir.path());
    let d = serve(
        dir.path(),
        &blockdevs,
        "unix",
        &["id=e0,node-name=top,name=disk,allocation-depth=on"],
    );
    let url = format!("nbd+unix:///disk?socket={}", d.socket().display());
    let (top_s, size) = (top.to_str().unwrap(), 8 * MIB);

    let (code, out, e) = qemu_img(&["compare", "-U", "-f", "qcow2", "-F", "raw", top_s, &url]);
    assert_eq!(code, 0, "{out}{e}");
    let copy = dir.path().join("copy.raw");
    qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &url,
        copy.to_str().unwrap(),
    ]);
    let (code, out, e) = qemu_img(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        top_s,
        copy.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "convert over NBD: {out}{e}");

    // Data and zeroes agree, unit by unit, with the image's own map.
    let local = per_unit(&qemu_img_ok(&["map", "-U", "--output=json", top_s]), size);
    let remote = per_unit(
        &qemu_img_ok(&["map", "--output=json", "-f", "raw", &url]),
        size,
    );
    for (u, (l, r)) in local.iter().zip(&remote).enumerate() {
        assert_eq!(
            (l.0, l.1),
            (r.0, r.1),
            "data/zero at {:#x}",
            u as u64 * UNIT
        );
    }

    // libnbd's nbdinfo, a client that is not QEMU's, sees the same.
    for (context, depth) in [("base:allocation", false), ("qemu:allocation-depth", true)] {
        let out = Command::new("nbdinfo")
            .arg(format!("--map={context}"))
            .args(["--json", &url])
            .output()
            .expect("nbdinfo is installed (ci/host-packages installs libnbd-bin)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let extents: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        let mut covered = 0;
        for e in extents {
            let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            let ty = e["type"].as_u64().unwrap();
            for u in off / UNIT..(off + len) / UNIT {
                let l = local[u as usize];
                let want = if depth {
                    l.2
                } else if l.0 {
                    0
                } else {
                    3
                };
                assert_eq!(ty, want, "nbdinfo {context} at {:#x}", u * UNIT);
            }
            covered += len;
        }
        assert_eq!(covered, size, "nbdinfo {context} covers the disk");
    }

    // qemu:allocation-depth names the layer, base:allocation the holes.
    let (mut c, got) = RawClient::go(
        d.socket(),
        "disk",
        &["base:allocation", "qemu:allocation-depth"],
    );
    assert_eq!(got, size);
    c.send(Cmd::BlockStatus, 0, 5, 0, size as u32, &[]);
    let mut contexts = Vec::new();
    loop {
        let Reply::Chunk {
            flags,
            ty,
            cookie,
            payload,
        } = c.reply()
        else {
            panic!("a structured reply");
        };
        assert_eq!((ty, cookie), (chunk::BLOCK_STATUS, 5));
        contexts.push(payload);
        if flags & chunk::FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(contexts.len(), 2);
    let expand = |p: &[u8]| {
        let mut units = Vec::new();
        for e in p[4..].chunks(8) {
            let len = u64::from(u32::from_be_bytes(e[..4].try_into().unwrap()));
            let flags = u32::from_be_bytes(e[4..].try_into().unwrap());
            units.extend(std::iter::repeat_n(flags, (len / UNIT) as usize));
        }
        (u32::from_be_bytes(p[..4].try_into().unwrap()), units)
    };
    for p in &contexts {
        let (id, units) = expand(p);
        assert_eq!(
            units.len() as u64,
            size / UNIT,
            "context {id} covers the disk"
        );
        for (u, (flags, l)) in units.iter().zip(&local).enumerate() {
            let at = u as u64 * UNIT;
            if id == 2 {
                assert_eq!(u64::from(*flags), l.2, "depth at {at:#x}");
            } else {
                let want = if l.0 { 0 } else { 3 };
                assert_eq!(*flags, want, "base:allocation at {at:#x}");
            }
        }
    }
}

#[test]
fn writes_over_tcp_land_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create(&img, "qcow2", "32M");
    let port = free_port();
    let d = serve(
        dir.path(),
        &[
            format!("driver=file,node-name=f,filename={}", img.display()),
            "driver=qcow2,node-name=disk,file=f".into(),
        ],
        &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        &["id=e0,node-name=disk,writable=on"],
    );
    let url = format!("nbd://127.0.0.1:{port}/disk");
    qemu_io(
        "raw",
        &url,
        &[
            "write -P 0x5a 0 1M",
            "write -f -P 0x6b 4M 128k",
            "write -P 0x77 8M 1M",
            "write -z 8M 256k",
            "write -z -u 8704k 256k",
            "aio_write -P 0x01 16M 4k",
            "aio_write -P 0x02 20M 4k",
            "aio_flush",
            "read -P 0x5a 0 1M",
            "read -P 0x6b 4M 128k",
            "read -P 0 8M 256k",
            "read -P 0x77 8448k 256k",
            "read -P 0 8704k 256k",
            "read -P 0x77 8960k 64k",
        ],
    );
    drop(d);
    qemu_io(
        "qcow2",
        img.to_str().unwrap(),
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x6b 4M 128k",
            "read -P 0 8M 256k",
            "read -P 0x77 8448k 256k",
            "read -P 0 8704k 256k",
            "read -P 0x77 8960k 64k",
            "read -P 0x01 16M 4k",
            "read -P 0x02 20M 4k",
        ],
    );
    let (code, out) = strata_tests::qemu::check(&img);
    assert_eq!(code, 0, "{out}");
}

fn null_export(dir: &Path, extra: &str) -> Daemon {
    serve(
        dir,
        &["driver=null-co,node-name=n,size=64M,read-zeroes=on".into()],
        "unix",
        &[&format!("id=e0,node-name=n,name=n{extra}")],
    )
}

#[test]
fn bad_requests_get_the_error_the_protocol_names_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = null_export(dir.path(), "");
    let (mut c, size) = RawClient::go(d.socket(), "n", &[]);
    let cases: [(Cmd, u16, u64, u32, u32); 6] = [
        (Cmd::Read, 0, 0, 64 << 20, err::EOVERFLOW),
        (Cmd::Read, 0, size - 512, 1024, err::EINVAL),
        (Cmd::Read, 0, 0, 0, err::EINVAL),
        (Cmd::Unknown(99), 0, 0, 512, err::EINVAL),
        (Cmd::BlockStatus, 0, 0, 512, err::EINVAL),
        (Cmd::Read, cflag::FUA, 0, 512, err::EINVAL),
    ];
    for (i, &(cmd, flags, off, len, want)) in cases.iter().enumerate() {
        c.send(cmd, flags, i as u64, off, len, &[]);
        let r = c.reply();
        assert_eq!(RawClient::error_of(&r), want, "{cmd:?} {off}+{len}: {r:?}");
    }
    // A read-only export refuses writes, and still serves reads.
    c.send(Cmd::Write, 0, 10, 0, 512, &[0xab; 512]);
    assert_eq!(RawClient::error_of(&c.reply()), err::EPERM);
    c.send(Cmd::Read, cflag::DF, 11, 0, 4096, &[]);
    match c.reply() {
        Reply::Chunk {
            ty,
            cookie,
            payload,
            flags,
        } => {
            assert_eq!(
                (ty, cookie, flags),
                (chunk::OFFSET_DATA, 11, chunk::FLAG_DONE)
            );
            assert_eq!(payload.len(), 8 + 4096);
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_client_that_breaks_the_protocol_is_dropped_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = null_export(dir.path(), ",writable=on");
    let sock = d.socket().to_path_buf();

    // A bad option magic.
    let mut c = RawClient::connect(&sock);
    c.flags();
    use std::io::Write;
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.closed(), "bad option magic");
    // An option too long to read.
    let mut c = RawClient::connect(&sock);
    c.flags();
    let h = strata_nbd::OptionHeader {
        option: opt::GO,
        len: u32::MAX,
    };
    c.s.write_all(&h.encode()).unwrap();
    assert!(c.closed(), "huge option");
    // Unknown client flags.
    let mut c = RawClient::connect(&sock);
    c.s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(c.closed(), "unknown client flags");
    // A handshake cut short.
    let mut c = RawClient::connect(&sock);
    c.s.write_all(&[0, 0]).unwrap();
    drop(c);
    // An unknown option is refused, and negotiation goes on.
    let mut c = RawClient::connect(&sock);
    c.flags();
    assert_eq!(c.option(999, b"xyz")[0].0, rep::ERR_UNSUP);
    assert_eq!(c.option(opt::LIST, &[1])[0].0, rep::ERR_INVALID);
    let listed = c.option(opt::LIST, &[]);
    assert_eq!(listed.len(), 2, "one export and the ACK: {listed:?}");
    assert_eq!(c.option(opt::STARTTLS, &[])[0].0, rep::ERR_POLICY);
    // A request with a bad magic.
    let (mut c, _) = RawClient::go(&sock, "n", &[]);
    c.s.write_all(&[0xffu8; 28]).unwrap();
    assert!(c.closed(), "bad request magic");
    // A WRITE longer than any payload the server reads.
    let (mut c, _) = RawClient::go(&sock, "n", &[]);
    c.send(Cmd::Write, 0, 1, 0, 64 << 20, &[]);
    assert!(c.closed(), "oversized write");

    // The server still serves.
    let (mut c, _) = RawClient::go(&sock, "n", &[]);
    c.send(Cmd::Write, cflag::FUA, 2, 0, 4096, &[7; 4096]);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            error: 0,
            cookie: 2
        }
    );
}

#[test]
fn a_client_that_stops_reading_holds_up_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let d = null_export(dir.path(), "");
    let (mut stalled, _) = RawClient::go(d.socket(), "n", &[]);
    // Far more than the socket buffers and the server's window hold, each
    // as long as a request may be.
    let n = 1000u64;
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            let r = strata_nbd::Request {
                flags: 0,
                command: Cmd::Read,
                cookie: i,
                offset: 0,
                len: 32 << 20,
            };
            use std::io::Write;
            if stalled.s.write_all(&r.encode()).is_err() {
                break;
            }
        }
        stalled
    });
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    let (mut c, _) = RawClient::go(d.socket(), "n", &[]);
    for i in 0..100 {
        c.send(Cmd::Read, 0, i, 0, 64 << 10, &[]);
        match c.reply() {
            Reply::Chunk { ty, .. } => assert_eq!(ty, chunk::OFFSET_DATA),
            r => panic!("{r:?}"),
        }
    }
    assert!(start.elapsed() < Duration::from_secs(10), "served promptly");
    // What the stalled client made the daemon hold is bounded by the
    // data its requests in flight may hold (64 MiB), not by their number.
    let rss = d.peak_rss();
    assert!(rss < 256 << 20, "peak RSS {} MiB", rss >> 20);
    drop(d);
    let _ = writer.join();
}

/// A client may send all it has before it reads a reply: replies it does
/// not read yet must not stop the server from reading its requests while
/// they fit in the server's window.
#[test]
fn a_client_that_sends_everything_before_reading_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = null_export(dir.path(), ",writable=on");
    let (mut c, _) = RawClient::go(d.socket(), "n", &[]);
    // Failing here means the server stopped reading, a deadlock.
    c.s.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Replies to the reads fill the socket before the writes are sent.
    let reads = 8u64;
    for i in 0..reads {
        c.send(Cmd::Read, 0, i, i * MIB, MIB as u32, &[]);
    }
    let payload = vec![0x5a; MIB as usize];
    for i in 0..8 {
        c.send(Cmd::Write, 0, reads + i, i * MIB, MIB as u32, &payload);
    }
    let mut cookies = Vec::new();
    while cookies.len() < 16 {
        match c.reply() {
            Reply::Simple { error: 0, cookie } => cookies.push(cookie),
            Reply::Chunk { flags, cookie, .. } => {
                if flags & chunk::FLAG_DONE != 0 {
                    cookies.push(cookie);
                }
            }
            r => panic!("{r:?}"),
        }
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..16).collect::<Vec<_>>());
}

#[test]
fn one_node_over_vhost_user_and_nbd_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    create(&img, "raw", "16M");
    let (vsock, nsock) = (dir.path().join("vhost.sock"), dir.path().join("nbd.sock"));
    let d = Daemon::qsd(
        &[
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", img.display()),
            "--blockdev",
            "driver=raw,node-name=disk,file=f",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nsock.display()),
            "--export",
            "type=nbd,id=n0,node-name=disk,writable=on",
            "--export",
            &format!(
                "type=vhost-user-blk,id=v0,node-name=disk,writable=on,addr.type=unix,addr.path={}",
                vsock.display()
            ),
        ],
        &nsock,
        &dir.path().join("log"),
    );
    wait_for_log(&d, "export 'v0': listening");
    let url = format!("nbd+unix:///disk?socket={}", nsock.display());
    let mut blk = SyncClient::connect(&vsock, false).unwrap();
    blk.write(MIB, &[0x3c; 65536]).unwrap();
    qemu_io(
        "raw",
        &url,
        &["read -P 0x3c 1M 64k", "write -P 0x4d 2M 64k"],
    );
    assert_eq!(blk.read(2 * MIB, 65536).unwrap(), vec![0x4d; 65536]);
}

#[test]
fn graph_edits_under_nbd_writes_lose_nothing() {
    use serde_json::json;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use strata_tests::qmp::Qmp;

    let dir = tempfile::tempdir().unwrap();
    let (top, snap) = (dir.path().join("top.qcow2"), dir.path().join("snap.qcow2"));
    create(&top, "qcow2", "64M");
    let (nsock, qsock) = (dir.path().join("nbd.sock"), dir.path().join("qmp.sock"));
    let d = Daemon::qsd(
        &[
            "--blockdev",
            &format!("driver=file,node-name=tf,filename={}", top.display()),
            "--blockdev",
            "driver=qcow2,node-name=top,file=tf",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nsock.display()),
            "--export",
            "type=nbd,id=n0,node-name=top,name=disk,writable=on",
            "--chardev",
            &format!("socket,id=m0,path={},server=on,wait=off", qsock.display()),
            "--monitor",
            "chardev=m0",
        ],
        &nsock,
        &dir.path().join("log"),
    );
    let mut q = Qmp::connect(&qsock);

    // Rounds of 32 pipelined 64 KiB writes, each round with its own byte,
    // then every block read back.
    let stop = Arc::new(AtomicBool::new(false));
    let io = std::thread::spawn({
        let (stop, sock) = (Arc::clone(&stop), nsock.clone());
        move || {
            let (mut c, _) = RawClient::go(&sock, "disk", &[]);
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) || rounds < 3 {
                let byte = (rounds % 250) as u8 + 1;
                for i in 0..32u64 {
                    c.send(Cmd::Write, 0, i, i * MIB, 65536, &[byte; 65536]);
                }
                for _ in 0..32 {
                    let r = c.reply();
                    assert_eq!(RawClient::error_of(&r), 0, "round {rounds}: {r:?}");
                }
                for i in 0..32u64 {
                    c.send(Cmd::Read, 0, 100 + i, i * MIB, 65536, &[]);
                    match c.reply() {
                        Reply::Chunk { ty, payload, .. } if ty == chunk::OFFSET_DATA => {
                            assert!(
                                payload[8..].iter().all(|&b| b == byte),
                                "round {rounds}: block {i} reads back what was written"
                            );
                        }
                        r => panic!("round {rounds}: {r:?}"),
                    }
                }
                rounds += 1;
            }
            rounds
        }
    });

    std::thread::sleep(Duration::from_millis(500));
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        top.to_str().unwrap(),
        "-F",
        "qcow2",
        snap.to_str().unwrap(),
    ]);
    q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "snap", "backing": null,
               "file": {"driver": "file", "filename": snap}}),
    )
    .unwrap();
    q.execute(
        "blockdev-snapshot",
        json!({"node": "top", "overlay": "snap"}),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let exports = q.execute("query-block-exports", json!({})).unwrap();
    assert_eq!(exports[0]["node-name"], "snap", "{exports}");
    q.execute(
        "block-commit",
        json!({"job-id": "c", "device": "snap", "base-node": "top"}),
    )
    .unwrap();
    q.wait_event("BLOCK_JOB_READY", "device", "c", Duration::from_secs(60));
    q.execute("block-job-complete", json!({"device": "c"}))
        .unwrap();
    let done = q.wait_event(
        "BLOCK_JOB_COMPLETED",
        "device",
        "c",
        Duration::from_secs(60),
    );
    assert!(done.get("error").is_none(), "{done}");
    let exports = q.execute("query-block-exports", json!({})).unwrap();
    assert_eq!(exports[0]["node-name"], "top", "{exports}");

    stop.store(true, Ordering::SeqCst);
    let rounds = io.join().expect("every round verified");
    assert!(rounds >= 3, "{rounds} rounds");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let (code, out) = strata_tests::qemu::check(&top);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn fast_zero_is_refused_where_zeroing_would_mean_writing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create(&img, "qcow2", "16M");
    qemu_io("qcow2", img.to_str().unwrap(), &["write -P 0x5a 0 4M"]);
    let serve_disk = || {
        serve(
            dir.path(),
            &[format!(
                "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
                img.display()
            )],
            "unix",
            &["id=e0,node-name=disk,writable=on"],
        )
    };
    let d = serve_disk();
    let (mut c, _) = RawClient::go(d.socket(), "disk", &[]);
    let fast = cflag::FAST_ZERO | cflag::NO_HOLE;
    // Whole 64 KiB clusters are zeroed in metadata: done.
    c.send(Cmd::WriteZeroes, fast, 1, 1 << 20, 128 << 10, &[]);
    assert_eq!(RawClient::error_of(&c.reply()), 0);
    // Part of a cluster would be a write of zeroes: refused, untouched.
    c.send(Cmd::WriteZeroes, fast, 2, 2 << 20, 4096, &[]);
    assert_eq!(RawClient::error_of(&c.reply()), err::ENOTSUP);
    // Without FAST_ZERO, the same request is done the slow way.
    c.send(Cmd::WriteZeroes, cflag::NO_HOLE, 3, 3 << 20, 4096, &[]);
    assert_eq!(RawClient::error_of(&c.reply()), 0);
    // Zeroed clusters are metadata, durable once flushed.
    c.send(Cmd::Flush, 0, 4, 0, 0, &[]);
    assert_eq!(RawClient::error_of(&c.reply()), 0);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    qemu_io(
        "qcow2",
        img.to_str().unwrap(),
        &[
            "read -P 0 1M 128k",
            "read -P 0x5a 1152k 896k",
            "read -P 0x5a 2M 1M",
            "read -P 0 3M 4k",
            "read -P 0x5a 3076k 1020k",
        ],
    );

    // qemu-img convert onto an export that is not zero yet zeroes it
    // first with FAST_ZERO, and the result is the source.
    let src = dir.path().join("src.qcow2");
    create(&src, "qcow2", "16M");
    qemu_io("qcow2", src.to_str().unwrap(), &["write -P 0x77 6M 1M"]);
    let d = serve_disk();
    let url = format!("nbd+unix:///disk?socket={}", d.socket().display());
    qemu_img_ok(&[
        "convert",
        "-n",
        "-f",
        "qcow2",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &url,
    ]);
    let (code, out, e) = qemu_img(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &url,
    ]);
    assert_eq!(code, 0, "{out}{e}");
}
