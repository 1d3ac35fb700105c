//! The driver against qemu-img 7.2, the reference: images Strata writes
//! must check clean and read back through QEMU as written, and images QEMU
//! writes must read the same through Strata.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use strata_graph::{BlockDriver, Graph, IoVecs, NodeId};

use super::create::{create, CreateOptions};
use super::node::{Qcow2Node, Qcow2Options};
use crate::file::{FileNode, FileOptions};
use crate::raw::{RawNode, RawOptions};
use strata_runtime::reactor::block_on;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (ci/test installs it)")
}

fn qemu_io(path: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` must find no corruption (and, unless allowed, no leak).
fn assert_clean(path: &Path, leaks_ok: bool) {
    let out = qemu_img(&["check", path.to_str().unwrap()]);
    let code = out.status.code().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        code == 0 || (leaks_ok && code == 3),
        "qemu-img check exited {code}:\n{text}"
    );
}

fn to_raw(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("raw");
    let out = qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    data
}

struct Image {
    graph: Graph,
    node: NodeId,
}

fn file_node(g: &Graph, name: &str, path: &Path, read_only: bool) -> NodeId {
    let opts = FileOptions {
        filename: path.into(),
        read_only,
        discard: true,
        ..Default::default()
    };
    g.add_node(name, |_| {
        FileNode::open(&opts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
    })
    .unwrap()
}

impl Image {
    fn open(path: &Path, backing_raw: Option<&Path>, read_only: bool) -> Image {
        let opts = Qcow2Options {
            read_only,
            discard: true,
            ..Default::default()
        };
        Self::open_with(path, backing_raw, &opts)
    }

    fn open_with(path: &Path, backing_raw: Option<&Path>, opts: &Qcow2Options) -> Image {
        let read_only = opts.read_only;
        let graph = Graph::new();
        let file = file_node(&graph, "file", path, read_only);
        let backing = backing_raw.map(|b| {
            let bf = file_node(&graph, "bfile", b, true);
            graph
                .add_node("base", |bld| {
                    RawNode::open(bld, bf, &RawOptions::default())
                        .map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
                })
                .unwrap()
        });
        let node = graph
            .add_node("img", |b| {
                Qcow2Node::open(b, file, backing, opts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
            })
            .unwrap();
        Image { graph, node }
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let v = self.graph.view();
        let mut buf = vec![0xeeu8; len];
        let iov = IoVecs::from_slice(&mut buf);
        block_on(v.node(self.node).unwrap().driver().read(&v, off, &iov))
            .unwrap()
            .unwrap();
        drop(iov);
        buf
    }

    fn write(&self, off: u64, data: &[u8]) {
        let v = self.graph.view();
        let mut buf = data.to_vec();
        let iov = IoVecs::from_slice(&mut buf);
        block_on(v.node(self.node).unwrap().driver().write(&v, off, &iov))
            .unwrap()
            .unwrap();
    }

    fn zero(&self, off: u64, len: u64, unmap: bool) {
        let v = self.graph.view();
        block_on(
            v.node(self.node)
                .unwrap()
                .driver()
                .write_zeroes(&v, off, len, unmap),
        )
        .unwrap()
        .unwrap();
    }

    fn discard(&self, off: u64, len: u64) {
        let v = self.graph.view();
        block_on(v.node(self.node).unwrap().driver().discard(&v, off, len))
            .unwrap()
            .unwrap();
    }

    fn flush(&self) {
        let v = self.graph.view();
        block_on(v.node(self.node).unwrap().driver().flush(&v))
            .unwrap()
            .unwrap();
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn new_image(dir: &Path, name: &str, opts: CreateOptions) -> PathBuf {
    let p = dir.join(name);
    create(&p, &opts).unwrap();
    p
}

#[test]
fn created_images_check_clean_and_describe_themselves() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, bits, ext, version) in [
        (65536, 16, false, 3),
        (512, 1, false, 3),
        (2 << 20, 64, false, 3),
        (65536, 16, true, 3),
        (4096, 16, false, 2),
    ] {
        let p = new_image(
            dir.path(),
            &format!("c{cs}-{bits}-{ext}-{version}.qcow2"),
            CreateOptions {
                size: 1 << 30,
                cluster_size: cs,
                refcount_bits: bits,
                extended_l2: ext,
                version,
                ..Default::default()
            },
        );
        assert_clean(&p, false);
        let info = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 1u64 << 30, "{info}");
        assert_eq!(info["cluster-size"], cs);
        if version == 3 {
            assert_eq!(info["format-specific"]["data"]["refcount-bits"], bits);
            assert_eq!(info["format-specific"]["data"]["extended-l2"], ext);
        } else {
            assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
        }
    }
}

/// Writes a mix of partial and whole clusters, checks the data through
/// QEMU, then reopens and reads it through Strata.
fn write_and_compare(opts: CreateOptions) {
    let dir = tempfile::tempdir().unwrap();
    let size = opts.size as usize;
    let p = new_image(dir.path(), "w.qcow2", opts.clone());
    let mut model = vec![0u8; size];
    {
        let img = Image::open(&p, None, false);
        let cs = opts.cluster_size as usize;
        let writes = [
            (0, 512),
            (cs - 512, 1024),
            (3 * cs + 100 * 512, 3 * cs),
            (size - 4096, 4096),
            (size / 2, 65536),
            (7 * cs, cs),
        ];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let len = len.min(size - off);
            let data = pattern(len, i as u64 + 1);
            img.write(off as u64, &data);
            model[off..off + len].copy_from_slice(&data);
        }
        // Overwrite in place.
        let data = pattern(1024, 99);
        img.write(0, &data);
        model[..1024].copy_from_slice(&data);
        assert_eq!(img.read(0, size), model, "read back before closing");
        img.flush();
    }
    assert_clean(&p, false);
    assert!(to_raw(&p) == model, "qemu-img sees what was written");
    let img = Image::open(&p, None, true);
    assert!(
        img.read(0, size) == model,
        "Strata reads it back after reopening"
    );
}

#[test]
fn writes_check_clean_at_every_cluster_size_and_width() {
    for (cs, bits) in [(65536, 16), (512, 16), (4096, 1), (2 << 20, 64), (16384, 8)] {
        write_and_compare(CreateOptions {
            size: 16 << 20,
            cluster_size: cs,
            refcount_bits: bits,
            ..Default::default()
        });
    }
    write_and_compare(CreateOptions {
        size: 16 << 20,
        cluster_size: 65536,
        version: 2,
        ..Default::default()
    });
    write_and_compare(CreateOptions {
        size: 16 << 20,
        cluster_size: 65536,
        extended_l2: true,
        ..Default::default()
    });
}

#[test]
fn small_clusters_grow_the_refcount_table() {
    // 512-byte clusters with 64-bit refcounts: 64 clusters per refcount
    // block and 64 blocks per table cluster, so 8 MiB of writes needs many
    // new blocks and a bigger table.
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(
        dir.path(),
        "t.qcow2",
        CreateOptions {
            size: 8 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    );
    let data = pattern(8 << 20, 5);
    {
        let img = Image::open(&p, None, false);
        for off in (0..8 << 20).step_by(64 << 10) {
            img.write(off as u64, &data[off..off + (64 << 10)]);
        }
        img.flush();
    }
    assert_clean(&p, true);
    assert!(to_raw(&p) == data);
}

#[test]
fn qemu_written_images_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for extra in [
        "cluster_size=65536",
        "cluster_size=512",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1",
        "extended_l2=on",
    ] {
        let p = dir.path().join(format!("q-{extra}.qcow2"));
        let out = qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            extra,
            p.to_str().unwrap(),
            "8M",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        qemu_io(&p, "write -P 0x11 0 64k");
        qemu_io(&p, "write -P 0x22 1000k 100k");
        qemu_io(&p, "write -P 0x33 5M 512");
        if !extra.contains("0.10") {
            qemu_io(&p, "write -z 1000k 32k");
        }
        let want = to_raw(&p);
        let img = Image::open(&p, None, true);
        assert!(img.read(0, 8 << 20) == want, "{extra}");
    }
}

#[test]
fn compressed_clusters_read_and_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = pattern(4 << 20, 3);
    data[1 << 20..2 << 20].fill(7); // compresses well
    std::fs::write(&src, &data).unwrap();
    for ty in ["zlib", "zstd"] {
        let p = dir.path().join(format!("c-{ty}.qcow2"));
        let out = qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ty}"),
            src.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut model = data.clone();
        {
            let img = Image::open(&p, None, false);
            assert!(img.read(0, 4 << 20) == data, "{ty} reads");
            // Writing into a compressed cluster copies it out first.
            let w = pattern(4096, 8);
            img.write((1 << 20) + 1000, &w);
            model[(1 << 20) + 1000..(1 << 20) + 1000 + 4096].copy_from_slice(&w);
            img.flush();
        }
        assert_clean(&p, true);
        assert!(to_raw(&p) == model, "{ty} after copy-on-write");
    }
}

#[test]
fn backing_reads_fall_through_and_stop_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_data = pattern(1 << 20, 4); // shorter than the overlay
    std::fs::write(&base, &base_data).unwrap();
    let top = new_image(
        dir.path(),
        "top.qcow2",
        CreateOptions {
            size: 4 << 20,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        },
    );
    let mut model = vec![0u8; 4 << 20];
    model[..1 << 20].copy_from_slice(&base_data);
    let img = Image::open(&top, Some(&base), false);
    assert!(
        img.read(0, 4 << 20) == model,
        "base, then zeroes past its end"
    );
    let w = pattern(1000, 1);
    img.write(65536 + 24, &w); // partial cluster: the rest comes from the base
    model[65536 + 24..65536 + 1024].copy_from_slice(&w);
    img.zero(0, 65536, false); // whole cluster: zero flag over the base
    model[..65536].fill(0);
    img.discard(2 * 65536, 65536); // with a backing file, discard reads zeroes
    model[2 * 65536..3 * 65536].fill(0);
    assert!(img.read(0, 4 << 20) == model);
    img.flush();
    drop(img);
    assert_clean(&top, true);
    assert!(to_raw(&top) == model, "QEMU agrees, backing file included");
}

#[test]
fn zeroing_and_discarding_without_backing() {
    for ext in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let p = new_image(
            dir.path(),
            "z.qcow2",
            CreateOptions {
                size: 4 << 20,
                extended_l2: ext,
                ..Default::default()
            },
        );
        let mut model = pattern(4 << 20, 6);
        {
            let img = Image::open(&p, None, false);
            img.write(0, &model);
            img.zero(65536, 65536, true);
            img.zero(3 * 65536, 2 * 65536, false);
            img.zero(10 * 65536 + 512, 4096, true); // partial: real zeroes
            img.discard(20 * 65536, 65536);
            img.discard(30 * 65536 + 512, 512); // partial discard: ignored
            for (a, b) in [
                (65536, 2 * 65536),
                (3 * 65536, 5 * 65536),
                (10 * 65536 + 512, 10 * 65536 + 4608),
                (20 * 65536, 21 * 65536),
            ] {
                model[a..b].fill(0);
            }
            if ext {
                // A whole subcluster (2 KiB) zeroes in metadata.
                img.zero(40 * 65536 + 2048, 2048, true);
                model[40 * 65536 + 2048..40 * 65536 + 4096].fill(0);
            }
            assert!(img.read(0, 4 << 20) == model);
            img.flush();
        }
        assert_clean(&p, true);
        assert!(to_raw(&p) == model, "extended: {ext}");
    }
}

#[test]
fn growing_keeps_data_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(
        dir.path(),
        "g.qcow2",
        CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            ..Default::default()
        },
    );
    let data = pattern(1 << 20, 2);
    {
        let img = Image::open(&p, None, false);
        img.write(0, &data);
        let v = img.graph.view();
        block_on(v.node(img.node).unwrap().driver().resize(&v, 64 << 20))
            .unwrap()
            .unwrap();
        img.write(60 << 20, &data[..4096]);
        img.flush();
    }
    assert_clean(&p, true);
    let raw = to_raw(&p);
    assert_eq!(raw.len(), 64 << 20);
    assert!(raw[..1 << 20] == data[..] && raw[60 << 20..(60 << 20) + 4096] == data[..4096]);
}

#[test]
fn a_dirty_image_is_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lazy.qcow2");
    let out = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p.to_str().unwrap(),
        "4M",
    ]);
    assert!(out.status.success());
    qemu_io(&p, "write -P 0x5a 0 1M");
    // Mark it dirty as a crash with lazy refcounts leaves it, and drop the
    // refcounts of the data clusters.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[79] |= 1; // incompatible_features: dirty
    std::fs::write(&p, &bytes).unwrap();
    {
        let img = Image::open(&p, None, false);
        img.write(2 << 20, &[1u8; 4096]);
        img.flush();
    }
    assert_clean(&p, true);
    let raw = to_raw(&p);
    assert!(raw[..1 << 20].iter().all(|&b| b == 0x5a));
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after[79] & 1, 0, "the dirty bit is cleared");
}

mod cancel;
