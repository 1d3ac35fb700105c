//! The NBD server with `tls-creds` and `tls-authz`, against QEMU's and
//! libnbd's GnuTLS clients with certificates openssl made: an allowed
//! client reads, maps and writes; a client without TLS, without a
//! certificate, with one the CA did not sign, or with a subject not
//! allowed is refused, and the server goes on serving.

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_tests::daemon::Daemon;
use strata_tests::nbd_client::free_port;
use strata_tests::pki::Pki;
use strata_tests::qemu::{create, qemu_img, qemu_img_ok};

/// The subject `tls-authz` lets in, as GnuTLS spells the certificate's.
const ALLOWED: &str = "O=Strata,CN=client";

/// A daemon exporting `img` (qcow2) as `disk` over TLS on `port`, with
/// verify-peer on and `ALLOWED` as the only identity.
fn serve_tls(dir: &Path, creds: &Path, img: &Path, port: u16) -> Result<Daemon, String> {
    // A comma in an option value is written twice.
    let objects = [
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
            creds.display()
        ),
        format!(
            "authz-simple,id=authz0,identity={}",
            ALLOWED.replace(',', ",,")
        ),
    ];
    let blockdev = format!(
        "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
        img.display()
    );
    let server = format!(
        "addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0,tls-authz=authz0"
    );
    Daemon::try_qsd(
        &[
            "--object",
            &objects[0],
            "--object",
            &objects[1],
            "--blockdev",
            &blockdev,
            "--nbd-server",
            &server,
            "--export",
            "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
        ],
        &dir.join("nbd.sock"),
        &dir.join("log"),
    )
}

/// QEMU's client object for the credentials in `creds`.
fn client_object(creds: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client,sanity-check=off",
        creds.display()
    )
}

fn image_opts(port: u16) -> String {
    format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0"
    )
}

fn qemu_io_tls(creds: &Path, port: u16, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["--object", &client_object(creds), "--image-opts"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c
        .arg(image_opts(port))
        .output()
        .expect("qemu-io is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    img: PathBuf,
    port: u16,
    daemon: Daemon,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "strata-test-ca");
    let img = dir.path().join("disk.qcow2");
    create(&img, "qcow2", "16M");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 2M",
            "-c",
            "write -z 8M 1M",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success());
    let port = free_port();
    let daemon = serve_tls(dir.path(), &pki.server("server"), &img, port).unwrap();
    Setup {
        dir,
        pki,
        img,
        port,
        daemon,
    }
}

#[test]
fn an_allowed_client_reads_maps_and_writes_over_tls() {
    let s = setup();
    let creds = s.pki.client("allowed", "/O=Strata/CN=client");
    let object = client_object(&creds);

    // Converted over TLS, the disk is the image.
    let copy = s.dir.path().join("copy.raw");
    qemu_img_ok(&[
        "convert",
        "--object",
        &object,
        "--image-opts",
        &image_opts(s.port),
        "-O",
        "raw",
        copy.to_str().unwrap(),
    ]);
    let (code, out, e) = qemu_img(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s.img.to_str().unwrap(),
        copy.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "convert over TLS: {out}{e}");

    // Block status crosses TLS too: the data range is the only data.
    let map = qemu_img_ok(&[
        "map",
        "--output=json",
        "--object",
        &object,
        "--image-opts",
        &image_opts(s.port),
    ]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(1 << 20, 2 << 20)], "{map}");

    // Large writes and reads, across many TLS records.
    let (ok, text) = qemu_io_tls(
        &creds,
        s.port,
        &[
            "write -P 0x6b 4M 3M",
            "aio_write -P 0x01 12M 4k",
            "aio_write -P 0x02 12M 4k",
            "aio_flush",
            "read -P 0x6b 4M 3M",
            "read -P 0x5a 1M 2M",
        ],
    );
    assert!(ok, "{text}");

    // qemu-nbd, as a client, lists the export over TLS.
    let out = Command::new("qemu-nbd")
        .args(["--list", "-b", "127.0.0.1", "-p", &s.port.to_string()])
        .args(["--object", &object, "--tls-creds", "tls0"])
        .output()
        .expect("qemu-nbd is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("exports available: 1") && text.contains("disk"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // libnbd, a client that is not QEMU's, reads the same disk.
    let uri = format!(
        "nbds://127.0.0.1:{}/disk?tls-certificates={}",
        s.port,
        creds.display()
    );
    let out = Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .expect("nbdinfo is installed");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (16u64 << 20).to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (status, log) = s.daemon.stop();
    assert!(status.success(), "{log}");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0x6b 4M 3M",
            "-c",
            "read -P 0x02 12M 4k",
        ])
        .arg(&s.img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("fail"), "the writes did not land: {text}");
}

#[test]
fn clients_outside_the_policy_are_refused_and_the_server_goes_on() {
    let s = setup();
    let log = || s.daemon.log_text();

    // No TLS at all.
    let url = format!("nbd://127.0.0.1:{}/disk", s.port);
    let (code, _, e) = qemu_img(&["info", &url]);
    assert_ne!(code, 0);
    assert!(e.contains("requires TLS"), "{e}");

    // TLS, but no client certificate.
    let no_cert = s.dir.path().join("no-cert");
    std::fs::create_dir_all(&no_cert).unwrap();
    std::fs::copy(s.pki.ca_cert(), no_cert.join("ca-cert.pem")).unwrap();
    // A certificate from another CA, with the allowed subject.
    let rogue = Pki::new(s.dir.path(), "rogue-ca").client("rogue", "/O=Strata/CN=client");
    std::fs::copy(s.pki.ca_cert(), rogue.join("ca-cert.pem")).unwrap();
    // The right CA, another subject.
    let intruder = s.pki.client("intruder", "/O=Strata/CN=intruder");
    for (who, creds) in [
        ("no certificate", &no_cert),
        ("rogue CA", &rogue),
        ("intruder", &intruder),
    ] {
        let (ok, text) = qemu_io_tls(creds, s.port, &["read 0 4k"]);
        assert!(!ok, "{who} was let in: {text}");
    }
    assert!(log().contains("peer sent no certificates"), "{}", log());
    assert!(
        log().contains("TLS x509 authz check for O=Strata,CN=intruder is denied"),
        "{}",
        log()
    );

    // The allowed client is still served.
    let allowed = s.pki.client("allowed", "/O=Strata/CN=client");
    let (ok, text) = qemu_io_tls(&allowed, s.port, &["read -P 0x5a 1M 2M"]);
    assert!(ok, "{text}\n{}", log());
}

#[test]
fn bad_tls_objects_and_references_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "ca");
    let server = pki.server("server");
    let client = pki.client("client", "/CN=client");
    let port = free_port().to_string();
    let nbd = |extra: &str| format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}{extra}");
    let try_run = |args: &[&str]| {
        let mut all = vec!["--blockdev", "driver=null-co,node-name=n"];
        all.extend_from_slice(args);
        match Daemon::try_qsd(&all, &dir.path().join("nbd.sock"), &dir.path().join("log")) {
            Ok(d) => panic!("started with {args:?}:\n{}", d.log_text()),
            Err(log) => log,
        }
    };
    let missing = dir.path().join("nowhere");
    let obj = |d: &Path, endpoint: &str| {
        format!(
            "tls-creds-x509,id=t,dir={},endpoint={endpoint}",
            d.display()
        )
    };
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--object".into(), obj(&missing, "server")],
            format!("{}", missing.join("ca-cert.pem").display()),
        ),
        (
            vec!["--object".into(), obj(&client, "server")],
            "server-cert.pem".into(),
        ),
        (
            vec!["--nbd-server".into(), nbd(",tls-creds=nope")],
            "no TLS credentials with id 'nope'".into(),
        ),
        (
            vec![
                "--object".into(),
                obj(&client, "client"),
                "--nbd-server".into(),
                nbd(",tls-creds=t"),
            ],
            "are for a client".into(),
        ),
        (
            vec![
                "--object".into(),
                obj(&server, "server"),
                "--nbd-server".into(),
                nbd(",tls-creds=t,tls-authz=who"),
            ],
            "no authorization object with id 'who'".into(),
        ),
        (
            vec!["--nbd-server".into(), nbd(",tls-authz=who")],
            "'tls-authz' is only valid with 'tls-creds'".into(),
        ),
        (
            vec![
                "--object".into(),
                format!("{},priority=NORMAL", obj(&server, "server")),
            ],
            "priority='NORMAL' is not supported".into(),
        ),
    ];
    for (args, want) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = try_run(&refs);
        assert!(log.contains(&want), "{args:?}: want '{want}' in:\n{log}");
    }
}
