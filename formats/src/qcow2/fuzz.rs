//! The fuzzing harness (built for tests and `cargo fuzz` only): any bytes,
//! opened as a qcow2 image, read through and checked, must give errors,
//! never a panic, a hang or an outsized allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use strata_graph::{BlockDriver, Graph, IoVecs, SlotPerm, User, UserKind};

use super::check::{check_slot, Repair};
use super::header::Header;
use super::node::{Qcow2Node, Qcow2Options};
use crate::file::{FileNode, FileOptions};
use strata_runtime::reactor::block_on;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Bytes of the virtual disk the harness reads at most.
const READ_LIMIT: u64 = 4 << 20;

/// Parses, opens, reads and checks `data` as a qcow2 image.
pub fn open_and_read(data: &[u8]) {
    let _ = Header::parse(data, data.len() as u64);
    let path = std::env::temp_dir().join(format!(
        "strata-fuzz-{}-{}.qcow2",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    run(&path);
    let _ = std::fs::remove_file(&path);
}

fn run(path: &std::path::Path) {
    let graph = Graph::new();
    let fopts = FileOptions {
        filename: path.into(),
        read_only: true,
        ..Default::default()
    };
    let Ok(file) = graph.add_node("file", |_| {
        FileNode::open(&fopts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
    }) else {
        return;
    };
    let opts = Qcow2Options {
        read_only: true,
        l2_cache_size: Some(1 << 20),
        ..Default::default()
    };
    if let Ok(node) = graph.add_node("image", |b| {
        Qcow2Node::open(b, file, None, &opts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
    }) {
        let v = graph.view();
        let d = v.node(node).expect("just added").driver();
        let size = d.size(&v).unwrap_or(0).min(READ_LIMIT);
        let mut buf = vec![0u8; 65536];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(65536);
            let iov = IoVecs::from_slice(&mut buf[..n as usize]);
            let _ = block_on(d.read(&v, off, &iov));
            let _ = block_on(d.block_status(&v, off, n));
            off += n;
        }
    }
    let user = User {
        kind: UserKind::Job,
        name: "check".into(),
        perm: SlotPerm::user(false),
    };
    if let Ok(slot) = graph.attach_user(user, file) {
        let v = graph.view();
        let _ = block_on(check_slot(&v, slot, Repair::None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed corpus, and deterministic mutations of it: the "short run"
    /// of the fuzzer that every test run includes.
    #[test]
    fn the_seed_corpus_and_its_mutations_never_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2");
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .expect("the seed corpus is in fuzz/corpus/qcow2")
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        seeds.sort();
        assert!(seeds.len() >= 5, "seeds in {}", dir.display());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let mut runs = 0;
        for seed in &seeds {
            open_and_read(seed);
            for _ in 0..400 {
                let mut m = seed.clone();
                for _ in 0..1 + rand(8) {
                    // Bias the damage towards the header and the first tables.
                    let at = if rand(2) == 0 {
                        rand(m.len().min(512))
                    } else {
                        rand(m.len())
                    };
                    match rand(3) {
                        0 => m[at] ^= 1 << rand(8),
                        1 => m[at] = [0, 0xff, 0x80, 0x7f][rand(4)],
                        _ => m.truncate(at.max(1)),
                    }
                    if m.len() < 2 {
                        break;
                    }
                }
                open_and_read(&m);
                runs += 1;
            }
        }
        println!(
            "fuzz short run: {} seeds, {runs} mutations, no panic",
            seeds.len()
        );
    }
}
