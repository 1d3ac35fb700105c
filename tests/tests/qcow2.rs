//! qcow2 against qemu-img 7.2, through the whole daemon: images QEMU made
//! read byte for byte as QEMU reads them, images Strata wrote check clean
//! and compare identical, and the image tools agree with qemu-img.

use std::path::{Path, PathBuf};

use strata_tests::client::SyncClient;
use strata_tests::daemon::{strata_bin, Daemon};
use strata_tests::qemu::{check, qemu_img, qemu_img_ok, qemu_io, to_raw};

fn serve(dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec![image.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::serve(&args, &dir.join("vm.sock"), &dir.join("strata.log"))
}

/// Reads the whole disk through Strata.
fn read_through_strata(dir: &Path, image: &Path) -> Vec<u8> {
    let d = serve(dir, image, &["--read-only"]);
    let mut c = SyncClient::connect(d.socket(), true).unwrap();
    let all = c.read(0, c.capacity as usize).unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    all
}

/// An image of `size` written by qemu-io with patterns, zeroes and
/// overwrites, in layouts that cover partial and whole clusters.
fn fill(path: &Path, zero: bool) {
    qemu_io(path, "write -P 0x11 0 64k");
    qemu_io(path, "write -P 0x22 100k 300k");
    qemu_io(path, "write -P 0x33 3M 512");
    qemu_io(path, "write -P 0x44 5000k 1M");
    qemu_io(path, "write -P 0x55 120k 8k");
    if zero {
        qemu_io(path, "write -z 4M 128k");
        qemu_io(path, "write -z 130k 64k");
    }
}

#[test]
fn the_interop_matrix_reads_as_qemu_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(String, PathBuf)> = Vec::new();
    let mut make = |name: &str, opts: &str, zero: bool| {
        let p = dir.path().join(format!("{name}.qcow2"));
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            p.to_str().unwrap(),
            "8M",
        ]);
        fill(&p, zero);
        cases.push((name.to_owned(), p));
    };
    for cs in ["512", "4k", "64k", "2M"] {
        make(
            &format!("cluster-{cs}"),
            &format!("cluster_size={cs}"),
            true,
        );
    }
    make("compat-0.10", "compat=0.10", false);
    make("compat-1.1", "compat=1.1", true);
    for bits in ["1", "16", "64"] {
        make(
            &format!("refcount-{bits}"),
            &format!("refcount_bits={bits}"),
            true,
        );
    }
    make("extended-l2", "extended_l2=on,cluster_size=64k", true);
    make("extended-l2-2M", "extended_l2=on,cluster_size=2M", true);
    // Compressed, both kinds.
    let src = dir.path().join("src.raw");
    let mut data: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4099) as u8).collect();
    data[3 << 20..4 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    for ty in ["zlib", "zstd"] {
        let p = dir.path().join(format!("compressed-{ty}.qcow2"));
        qemu_img_ok(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ty}"),
            src.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        qemu_io(&p, "write -P 0x66 1M 4k");
        cases.push((format!("compressed-{ty}"), p));
    }
    // Three-deep chains mixing raw and qcow2.
    let base = dir.path().join("base.raw");
    std::fs::write(&base, &data).unwrap();
    let mid = dir.path().join("mid.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
        "8M",
    ]);
    qemu_io(&mid, "write -P 0x77 2M 1M");
    qemu_io(&mid, "write -z 6M 64k");
    let top = dir.path().join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "8M",
    ]);
    qemu_io(&top, "write -P 0x88 2500k 16k");
    cases.push(("chain raw <- qcow2 <- qcow2".into(), top));
    let qbase = dir.path().join("qbase.qcow2");
    qemu_img_ok(&[
        "convert",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        qbase.to_str().unwrap(),
    ]);
    let qmid = dir.path().join("qmid.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "qbase.qcow2",
        "-F",
        "qcow2",
        qmid.to_str().unwrap(),
        "4M",
    ]);
    let qtop = dir.path().join("qtop.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "qmid.qcow2",
        "-F",
        "qcow2",
        qtop.to_str().unwrap(),
        "8M",
    ]);
    qemu_io(&qtop, "write -P 0x99 7M 4k");
    cases.push(("chain qcow2 <- short qcow2 <- qcow2".into(), qtop));

    for (name, path) in &cases {
        let want = to_raw(path);
        let got = read_through_strata(dir.path(), path);
        assert_eq!(got.len(), want.len(), "{name}: size");
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("{name}: Strata and qemu-img differ at byte {i}");
        }
    }
    println!(
        "interop matrix: {} qemu-img images read identically through Strata",
        cases.len()
    );
}

/// A deterministic generator for the workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Applies a random workload through Strata while keeping a model.
fn differential(name: &str, create_opts: &[&str], backing: Option<Vec<u8>>, seed: u64) -> [u64; 4] {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 16 << 20;
    let img = dir.path().join("d.qcow2");
    let mut model = vec![0u8; size as usize];
    let mut args = vec!["create", "-f", "qcow2"];
    for o in create_opts {
        args.extend_from_slice(&["-o", o]);
    }
    if let Some(b) = &backing {
        std::fs::write(dir.path().join("base.raw"), b).unwrap();
        model[..b.len()].copy_from_slice(b);
        args.extend_from_slice(&["-b", "base.raw", "-F", "raw"]);
    }
    let img_s = img.to_str().unwrap().to_owned();
    args.push(&img_s);
    args.push("16M");
    // Created by Strata's own tool: its images must be QEMU's too.
    let out = std::process::Command::new(strata_bin())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let d = serve(dir.path(), &img, &["--format", "qcow2"]);
    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    let mut rng = Rng(seed);
    let mut counts = [0u64; 4];
    for i in 0..600 {
        let sector = rng.below(size / 512);
        let max = (size / 512 - sector).min(512);
        let n = 1 + rng.below(max);
        let (off, len) = (sector * 512, n * 512);
        match rng.below(10) {
            0..=5 => {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                c.write(off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                counts[0] += 1;
            }
            6 | 7 => {
                c.write_zeroes(off, len.min(16 << 20), rng.below(2) == 0)
                    .unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                counts[1] += 1;
            }
            8 => {
                c.discard(off, len).unwrap();
                // Discard leaves the content unspecified; read it back so the
                // model follows what the image now says.
                let now = c.read(off, len as usize).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&now);
                counts[2] += 1;
            }
            _ => {
                let got = c.read(off, len as usize).unwrap();
                assert!(
                    got == model[off as usize..(off + len) as usize],
                    "{name}: read {i} at {off}+{len} differs"
                );
                counts[3] += 1;
            }
        }
        if i % 100 == 99 {
            c.flush().unwrap();
        }
    }
    c.flush().unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let (code, out) = check(&img);
    assert_eq!(code, 0, "{name}: qemu-img check is not clean:\n{out}");
    let model_path = dir.path().join("model.raw");
    std::fs::write(&model_path, &model).unwrap();
    let (code, out, err) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        model_path.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{name}: qemu-img compare: {out}{err}");
    counts
}

#[test]
fn random_workloads_check_clean_and_compare_identical() {
    let base: Vec<u8> = (0..12u32 << 20).map(|i| (i / 512 % 251) as u8).collect();
    type Run<'a> = (&'a str, Vec<&'a str>, Option<Vec<u8>>);
    let runs: [Run<'_>; 5] = [
        ("64k clusters", vec![], None),
        (
            "4k clusters over a raw base",
            vec!["cluster_size=4k"],
            Some(base.clone()),
        ),
        (
            "extended L2 over a raw base",
            vec!["extended_l2=on"],
            Some(base),
        ),
        (
            "512-byte clusters, 64-bit refcounts",
            vec!["cluster_size=512", "refcount_bits=64"],
            None,
        ),
        ("compat 0.10", vec!["compat=0.10"], None),
    ];
    let mut total = [0u64; 4];
    for (seed, (name, opts, backing)) in runs.into_iter().enumerate() {
        let c = differential(name, &opts, backing, seed as u64 * 7919 + 1);
        for i in 0..4 {
            total[i] += c[i];
        }
    }
    println!(
        "differential: {} writes, {} write-zeroes, {} discards, {} verified reads; qemu-img check clean and compare identical",
        total[0], total[1], total[2], total[3]
    );
}

fn strata_out(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(strata_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Drops what differs between `info` outputs for reasons other than the
/// image: the allocated size, and the protocol child qemu-img 8 and later
/// list.
fn strip_info(v: &mut serde_json::Value) {
    let o = v.as_object_mut().unwrap();
    o.remove("actual-size");
    o.remove("children");
}

#[test]
fn the_tools_agree_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    let (code, out) = strata_out(&["create", "-f", "raw", base.to_str().unwrap(), "8M"]);
    assert_eq!(code, 0, "{out}");
    let img = d.join("img.qcow2");
    let (code, out) = strata_out(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=8",
        "-b",
        "base.raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("fmt=qcow2 cluster_size=4096"), "{out}");
    qemu_io(&img, "write -P 1 0 64k");
    qemu_io(&img, "write -z 128k 64k");
    qemu_io(&img, "write -P 2 1M 12k");
    let cmp = |ours: &[&str], theirs: &[&str]| {
        let (code, out) = strata_out(ours);
        assert_eq!(code, 0, "{ours:?}: {out}");
        (json(&out), json(&qemu_img_ok(theirs)))
    };
    let p = img.to_str().unwrap();
    let (mut ours, mut theirs) = cmp(
        &["info", "--output", "json", p],
        &["info", "--output=json", p],
    );
    for v in [&mut ours, &mut theirs] {
        strip_info(v);
    }
    assert_eq!(ours, theirs, "info");
    let (ours, theirs) = cmp(
        &["map", "--output", "json", p],
        &["map", "--output=json", p],
    );
    assert_eq!(ours, theirs, "map");
    let (ours, theirs) = cmp(
        &["check", "--output", "json", p],
        &["check", "--output=json", p],
    );
    assert_eq!(ours, theirs, "check");
    let (ours, theirs) = cmp(
        &["info", "--backing-chain", "--output", "json", p],
        &["info", "--backing-chain", "--output=json", p],
    );
    let strip = |mut v: serde_json::Value| {
        v.as_array_mut().unwrap().iter_mut().for_each(strip_info);
        v
    };
    assert_eq!(strip(ours), strip(theirs), "info --backing-chain");

    // Leaks: qemu-img and strata both exit 3, and both repair them.
    let leaky = d.join("leaky.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", leaky.to_str().unwrap(), "4M"]);
    qemu_io(&leaky, "write -P 3 0 1M");
    let mut bytes = std::fs::read(&leaky).unwrap();
    let l = leaky.to_str().unwrap();
    // Drop the first data cluster from L2: its refcount leaks.
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        as usize;
    bytes[l2..l2 + 8].fill(0);
    std::fs::write(&leaky, &bytes).unwrap();
    let (theirs, _) = check(&leaky);
    let (ours, out) = strata_out(&["check", l]);
    assert_eq!((ours, theirs), (3, 3), "{out}");
    assert!(out.contains("1 leaked clusters were found"), "{out}");
    let (code, out) = strata_out(&["check", "-r", "leaks", l]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(check(&leaky).0, 0, "qemu-img agrees it is repaired");

    // Corruption: a refcount of 0 for a used cluster.
    let corrupt = d.join("corrupt.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        corrupt.to_str().unwrap(),
        "4M",
    ]);
    qemu_io(&corrupt, "write -P 3 0 64k");
    let mut bytes = std::fs::read(&corrupt).unwrap();
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize;
    let data_cluster = 5; // header, reftable, refblock, L1, L2, then data
    bytes[rb + 2 * data_cluster..rb + 2 * data_cluster + 2].fill(0);
    std::fs::write(&corrupt, &bytes).unwrap();
    let c = corrupt.to_str().unwrap();
    assert_eq!(check(&corrupt).0, 2);
    let (code, out) = strata_out(&["check", c]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = strata_out(&["check", "-r", "all", c]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        check(&corrupt).0,
        0,
        "repaired for qemu-img too:\n{}",
        check(&corrupt).1
    );
    assert!(
        to_raw(&corrupt)[..65536].iter().all(|&b| b == 3),
        "data intact"
    );
}

/// Corrupts an image in place.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn hostile_images_get_clear_errors_and_never_crash_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = d.join("good.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", good.to_str().unwrap(), "4M"]);
    qemu_io(&good, "write -P 7 0 256k");
    let bytes = std::fs::read(&good).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;

    // Header damage: refused at open with an error that names the problem.
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated",
            Box::new(|b: &mut Vec<u8>| b.truncate(50)),
            "image is truncated",
        ),
        (
            "huge L1",
            Box::new(|b: &mut Vec<u8>| b[36..40].copy_from_slice(&(1u32 << 30).to_be_bytes())),
            "L1 table has 1073741824 entries, more than the limit",
        ),
        (
            "L1 past the end",
            Box::new(|b: &mut Vec<u8>| b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            "lies past the end of the file",
        ),
        (
            "overlap",
            Box::new(|b: &mut Vec<u8>| {
                let rt = b[48..56].to_vec();
                b[40..48].copy_from_slice(&rt)
            }),
            "overlap",
        ),
        (
            "huge refcount table",
            Box::new(|b: &mut Vec<u8>| b[56..60].copy_from_slice(&(1u32 << 24).to_be_bytes())),
            "refcount table has",
        ),
        (
            "unknown feature",
            Box::new(|b: &mut Vec<u8>| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000",
        ),
        (
            "encrypted",
            Box::new(|b: &mut Vec<u8>| b[32..36].copy_from_slice(&1u32.to_be_bytes())),
            "encrypted qcow2 images are not supported",
        ),
        (
            "corrupt bit",
            Box::new(|b: &mut Vec<u8>| b[79] |= 2),
            "image is marked corrupt",
        ),
    ];
    for (name, damage, want) in &cases {
        let p = d.join(format!("{}.qcow2", name.replace(' ', "-")));
        let mut b = bytes.clone();
        damage(&mut b);
        std::fs::write(&p, &b).unwrap();
        let out = std::process::Command::new(strata_bin())
            .args([
                "serve",
                p.to_str().unwrap(),
                "--format",
                "qcow2",
                "--socket",
            ])
            .arg(d.join("h.sock"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: exits with an error, not a crash: {err}"
        );
        assert!(err.contains(want), "{name}: '{want}' not in: {err}");
    }

    // Metadata damage inside the tables: only the damaged clusters fail.
    let mut b = bytes.clone();
    let past_end = 1u64 << 50 | 1 << 63;
    b[l2 + 8..l2 + 16].copy_from_slice(&past_end.to_be_bytes()); // cluster 1: past the end
    let into_l1 = l1 as u64 | 1 << 63;
    b[l2 + 16..l2 + 24].copy_from_slice(&into_l1.to_be_bytes()); // cluster 2: the L1 table
    let p = d.join("bad-l2.qcow2");
    std::fs::write(&p, &b).unwrap();
    let mut daemon = serve(d, &p, &["--format", "qcow2"]);
    let mut c = SyncClient::connect(daemon.socket(), false).unwrap();
    assert_eq!(
        c.read(0, 65536).unwrap(),
        vec![7u8; 65536],
        "a good cluster reads"
    );
    assert!(c.read(65536, 4096).is_err(), "past the end: an I/O error");
    assert!(
        c.read(2 * 65536, 4096).is_err(),
        "into the L1 table: an I/O error"
    );
    assert!(
        c.write(2 * 65536, &[1; 4096]).is_err(),
        "and no write lands on the L1 table"
    );
    assert_eq!(c.read(3 * 65536, 512).unwrap(), vec![7u8; 512]);
    drop(c);
    assert!(daemon.is_running(), "the daemon survives");
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("points into metadata") && log.contains("points past the end of the file"),
        "{log}"
    );
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        &after[l1..l1 + 8],
        &bytes[l1..l1 + 8],
        "the L1 table is untouched"
    );
}
