//! A qcow2 write dropped at each of its await points in turn (a frontend
//! that left, a request cancelled at teardown) leaves the cluster
//! writable, leaks nothing, and corrupts nothing: `qemu-img check` is
//! clean and QEMU reads what the next write wrote.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use strata_runtime::reactor::Reactor;

use super::*;

/// Polls `fut` up to `polls` times, driving this thread's io_uring in
/// between; true when it finished.
fn poll_n<F: Future>(mut fut: Pin<&mut F>, polls: usize) -> bool {
    let reactor = Reactor::current().unwrap();
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    for _ in 0..polls {
        if fut.as_mut().poll(&mut cx).is_ready() {
            return true;
        }
        reactor.wait_for(Duration::from_secs(1)).unwrap();
        reactor.reap();
    }
    false
}

/// Runs `fut` to the end, failing the test if it is still waiting after
/// ten seconds (a claim left behind would make it wait forever).
fn finish<T>(fut: impl Future<Output = T>) -> T {
    let reactor = Reactor::current().unwrap();
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    let mut fut = std::pin::pin!(fut);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "the write after the dropped one hangs"
        );
        reactor.wait_for(Duration::from_millis(100)).unwrap();
        reactor.reap();
    }
}

struct Case {
    name: &'static str,
    opts: CreateOptions,
    backing: bool,
    /// Writes made (and finished) before the one that is dropped.
    before: &'static [(u64, usize)],
    /// The write that is dropped, then made again with other data.
    at: u64,
    len: usize,
    /// A refcount cache this small makes allocation wait for the disk.
    refcount_cache: Option<u64>,
}

fn run(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let size = case.opts.size as usize;
    let base = pattern(size, 7);
    let base_path = dir.path().join("base.raw");
    if case.backing {
        std::fs::write(&base_path, &base).unwrap();
    }
    let mut polls = 0;
    loop {
        let p = dir.path().join(format!("{polls}.qcow2"));
        create(&p, &case.opts).unwrap();
        let opts = Qcow2Options {
            discard: true,
            refcount_cache_size: case.refcount_cache,
            ..Default::default()
        };
        let img = Image::open_with(&p, case.backing.then_some(&base_path), &opts);
        let mut model = if case.backing {
            base.clone()
        } else {
            vec![0u8; size]
        };
        for (i, &(off, len)) in case.before.iter().enumerate() {
            let d = pattern(len, 100 + i as u64);
            img.write(off, &d);
            model[off as usize..off as usize + len].copy_from_slice(&d);
        }
        let finished = {
            let v = img.graph.view();
            let mut data = pattern(case.len, 1);
            let iov = IoVecs::from_slice(&mut data);
            let node = v.node(img.node).unwrap().driver();
            let mut fut = std::pin::pin!(node.write(&v, case.at, &iov));
            poll_n(fut.as_mut(), polls)
            // Dropped here, unless it finished.
        };
        let again = pattern(case.len, 2);
        {
            let v = img.graph.view();
            let mut data = again.clone();
            let iov = IoVecs::from_slice(&mut data);
            let node = v.node(img.node).unwrap().driver();
            finish(node.write(&v, case.at, &iov))
                .unwrap_or_else(|e| panic!("{}, dropped after {polls} polls: {e}", case.name));
            finish(node.flush(&v)).unwrap();
        }
        drop(img);
        let at = case.at as usize;
        model[at..at + case.len].copy_from_slice(&again);
        assert_clean(&p, false);
        assert!(
            to_raw(&p) == model,
            "{}, dropped after {polls} polls: QEMU reads something else",
            case.name
        );
        if finished {
            assert!(polls > 1, "{}: the write never waited", case.name);
            return;
        }
        polls += 1;
    }
}

#[test]
fn a_write_dropped_at_any_await_point_leaves_the_image_clean() {
    let cluster64k = CreateOptions {
        size: 4 << 20,
        cluster_size: 64 << 10,
        ..Default::default()
    };
    for case in [
        Case {
            name: "the first write: a new L2 table, a new cluster, copy-on-write",
            opts: CreateOptions {
                backing_file: Some("base.raw".into()),
                backing_format: Some("raw".into()),
                ..cluster64k.clone()
            },
            backing: true,
            before: &[],
            at: (64 << 10) + 4096,
            len: 4096,
            refcount_cache: None,
        },
        Case {
            name: "a new cluster in an existing table, filled with zeroes",
            opts: cluster64k.clone(),
            backing: false,
            before: &[(0, 4096)],
            at: (1 << 20) + 512,
            len: 8192,
            refcount_cache: None,
        },
        Case {
            name: "an overwrite in place",
            opts: cluster64k.clone(),
            backing: false,
            before: &[(1 << 20, 64 << 10)],
            at: (1 << 20) + 4096,
            len: 4096,
            refcount_cache: None,
        },
        Case {
            name: "a subcluster of an extended L2 cluster",
            opts: CreateOptions {
                extended_l2: true,
                backing_file: Some("base.raw".into()),
                backing_format: Some("raw".into()),
                ..cluster64k.clone()
            },
            backing: true,
            before: &[(2 << 20, 2048)],
            at: (2 << 20) + 8192,
            len: 2048,
            refcount_cache: None,
        },
        Case {
            // 512-byte clusters of 64-bit refcounts: the first table
            // covers 2 MiB of file, which the first write all but fills.
            name: "a write that grows the refcount table",
            opts: CreateOptions {
                size: 4 << 20,
                cluster_size: 512,
                refcount_bits: 64,
                ..Default::default()
            },
            backing: false,
            before: &[(0, 1982 << 10)],
            at: 3 << 20,
            len: 1024,
            // Four blocks: growing the table waits for the disk in the
            // middle, where a drop leaves it half done.
            refcount_cache: Some(2048),
        },
    ] {
        run(&case);
    }
}

/// The net under a change of the refcount tables abandoned half way: the
/// next holder of the metadata lock writes the L2 and L1 tables and
/// rebuilds the refcounts from them.
#[test]
fn refcounts_left_half_changed_are_rebuilt_by_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(
        dir.path(),
        "i.qcow2",
        CreateOptions {
            size: 4 << 20,
            cluster_size: 64 << 10,
            ..Default::default()
        },
    );
    let img = Image::open(&p, None, false);
    let a = pattern(200 << 10, 1);
    img.write(0, &a);
    {
        let v = img.graph.view();
        let state = v.node(img.node).unwrap().driver().reopen_state().unwrap();
        let image = state.downcast::<super::super::node::Image>().unwrap();
        let io = super::super::io::FileIo {
            g: &v,
            slot: v.child_slot(img.node, "file").unwrap(),
        };
        block_on(async {
            let mut meta = image.meta.lock().await;
            // As if a table change had been dropped half way: the in-memory
            // refcounts say the guest's first data cluster is free, so the
            // next allocation would take it.
            meta.refs.interrupted = true;
            let e = meta.entry(io, &image.l2, &image.g, 0).await.unwrap();
            let c = e.host() / (64 << 10);
            assert_ne!(c, 0);
            meta.refs.set_existing(io, c, 0).await.unwrap();
            meta.refs.free_hint = 0;
        })
        .unwrap();
    }
    let b = pattern(64 << 10, 2);
    img.write(1 << 20, &b);
    img.flush();
    drop(img);
    assert_clean(&p, false);
    let raw = to_raw(&p);
    assert!(raw[..200 << 10] == a[..] && raw[1 << 20..(1 << 20) + (64 << 10)] == b[..]);
}
