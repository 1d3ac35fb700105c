//! Drain under load: while libblkio reads at random and checks every byte,
//! a raw node's `file` is swapped between two identical copies 1000 times.
//! No request may fail, and no read may return anything but the data.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use serde_json::json;
use strata_tests::daemon::strata_bin;
use strata_tests::qmp::Qmp;

const DISK: usize = 16 << 20;
const BLOCK: usize = 4096;

/// Block `i` holds its index in every 8-byte word, so a read of the wrong
/// block (or a torn one) is caught.
fn block(i: usize) -> Vec<u8> {
    (0..BLOCK / 8)
        .flat_map(|_| (i as u64).to_le_bytes())
        .collect()
}

/// A daemon with `blockdevs`, node `disk` exported (with `export`
/// options) and a QMP monitor; killed when the first value drops.
fn daemon(dir: &Path, blockdevs: &[&str], export: &str) -> (Kill, Qmp, PathBuf) {
    let qmp_sock = dir.join("qmp.sock");
    let vhost_sock = dir.join("vhost.sock");
    let log = std::fs::File::create(dir.join("strata.log")).unwrap();
    let mut cmd = Command::new(strata_bin());
    for b in blockdevs {
        cmd.args(["--blockdev", b]);
    }
    let child = cmd
        .args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},{export}",
                vhost_sock.display()
            ),
        ])
        .args([
            "--chardev",
            &format!(
                "socket,id=m0,path={},server=on,wait=off",
                qmp_sock.display()
            ),
        ])
        .args(["--monitor", "chardev=m0"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let child = Kill(child);
    let qmp = Qmp::connect(&qmp_sock);
    (child, qmp, vhost_sock)
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn swapping_file_1000_times_under_random_reads() {
    let dir = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..DISK / BLOCK).flat_map(block).collect();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a, &content).unwrap();
    std::fs::write(&b, &content).unwrap();
    let fa = format!("driver=file,node-name=fa,filename={}", a.display());
    let fb = format!("driver=file,node-name=fb,filename={}", b.display());
    let (_child, mut qmp, vhost_sock) = daemon(
        dir.path(),
        &[&fa, &fb, "driver=raw,node-name=disk,file=fa"],
        "num-queues=2",
    );

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, sock) = (stop.clone(), reads.clone(), vhost_sock.clone());
        std::thread::spawn(move || {
            let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
            b.set_str("path", sock.to_str().unwrap()).unwrap();
            b.set_bool("read-only", true).unwrap();
            b.connect().unwrap();
            b.set_i32("num-queues", 2).unwrap();
            let mut out = b.start().unwrap();
            const QD: usize = 16;
            let region = b.alloc_mem_region(QD * BLOCK * 2).unwrap();
            b.map_mem_region(&region).unwrap();
            let mut x: u64 = 0x1234_5678;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x as usize) % (DISK / BLOCK)
            };
            let mut comps: Vec<MaybeUninit<Completion>> =
                (0..QD).map(|_| MaybeUninit::uninit()).collect();
            // Queue q uses buffers [q*QD, q*QD+QD); user_data = slot | block << 8.
            let mut slots: Vec<Vec<usize>> = vec![vec![0; QD]; 2];
            for (qi, q) in out.queues.iter_mut().enumerate() {
                for (s, slot) in slots[qi].iter_mut().enumerate() {
                    let blk = next();
                    *slot = blk;
                    let addr = region.addr + (qi * QD + s) * BLOCK;
                    q.read(
                        (blk * BLOCK) as u64,
                        addr as *mut u8,
                        BLOCK,
                        s,
                        ReqFlags::empty(),
                    );
                }
            }
            while !stop.load(Ordering::Relaxed) {
                for (qi, q) in out.queues.iter_mut().enumerate() {
                    let got = q.do_io(&mut comps, 1, None, None).unwrap();
                    for c in &comps[..got] {
                        // SAFETY: do_io initialised the first `got` entries.
                        let c = unsafe { c.assume_init_ref() };
                        assert_eq!(c.ret, 0, "a read failed during the swaps");
                        let s = c.user_data;
                        let addr = region.addr + (qi * QD + s) * BLOCK;
                        // SAFETY: the request on this buffer has completed.
                        let data = unsafe { std::slice::from_raw_parts(addr as *const u8, BLOCK) };
                        assert!(
                            data == &block(slots[qi][s])[..],
                            "torn or wrong read of block {}",
                            slots[qi][s]
                        );
                        reads.fetch_add(1, Ordering::Relaxed);
                        let blk = next();
                        slots[qi][s] = blk;
                        q.read(
                            (blk * BLOCK) as u64,
                            addr as *mut u8,
                            BLOCK,
                            s,
                            ReqFlags::empty(),
                        );
                    }
                }
            }
        })
    };

    // Let reads get going, then swap.
    let start = Instant::now();
    while reads.load(Ordering::Relaxed) < 1000 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "reads did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = reads.load(Ordering::Relaxed);
    for i in 0..1000 {
        let file = if i % 2 == 0 { "fb" } else { "fa" };
        qmp.execute(
            "blockdev-reopen",
            json!({"options": [{"driver": "raw", "node-name": "disk", "file": file}]}),
        )
        .unwrap_or_else(|e| panic!("swap {i}: {e}"));
    }
    let swapped = start.elapsed();
    let during = reads.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .expect("no read failed and every read was right");
    println!("1000 swaps in {swapped:?}, {during} verified reads meanwhile");
    assert!(
        during > 1000,
        "reads kept flowing during the swaps: {during}"
    );
    let nodes = qmp.execute("query-named-block-nodes", json!({})).unwrap();
    let disk = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk")
        .unwrap();
    assert_eq!(
        disk["children"],
        json!([{"child": "file", "node-name": "fa"}]),
        "1000 swaps end on fa"
    );
    qmp.execute("quit", json!({})).unwrap();
}

/// A frontend that keeps its avail ring full while the device works on
/// it: a drain must still get in between two batches.
#[test]
fn a_ring_that_never_runs_dry_does_not_hold_off_a_drain() {
    use strata_tests::frontend::{TestFrontend, DATA, NEXT, QUEUE_SIZE, W};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

    let dir = tempfile::tempdir().unwrap();
    let (_child, mut qmp, vhost_sock) = daemon(
        dir.path(),
        &[
            "driver=null-co,node-name=null0,size=64M",
            "driver=raw,node-name=disk,file=null0",
        ],
        "writable=on",
    );

    // 32 chains of two descriptors each: a header, then 1 MiB of data and
    // the status byte in one device-writable buffer (the same one for
    // every chain). Zeroing it takes the device far longer than
    // re-offering a chain takes the frontend, so a full ring holds
    // milliseconds of work even when the frontend is descheduled.
    const CHAINS: u16 = 32;
    const LEN: u32 = (1 << 20) - 512;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let spinner = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut fe = TestFrontend::connect(&vhost_sock, 1);
            for c in 0..CHAINS {
                let at = DATA + u64::from(c) * 0x100;
                fe.header(at, VIRTIO_BLK_T_IN, u64::from(c) * 2048);
                fe.place(
                    0,
                    2 * c,
                    &[(at, 16, NEXT, 2 * c + 1), (DATA + 0x10_0000, LEN + 1, W, 0)],
                );
                fe.offer_head(0, 2 * c);
            }
            // Keep the ring as full as it may be: up to a ring's worth
            // ahead of what the device completed, re-offering the chains in
            // turn without waiting to hear which completed.
            let mut next = 0;
            let mut offered: u16 = CHAINS;
            while !stop.load(Ordering::Relaxed) {
                while let Some((head, len)) = fe.poll_used(0) {
                    assert_eq!(len, LEN + 1, "chain {head} completed whole");
                    done.fetch_add(1, Ordering::Relaxed);
                }
                if offered.wrapping_sub(fe.used_idx(0)) < QUEUE_SIZE {
                    fe.offer_head_quietly(0, 2 * next);
                    next = (next + 1) % CHAINS;
                    offered = offered.wrapping_add(1);
                    if offered % 64 == 0 {
                        fe.kick(0);
                    }
                }
            }
        })
    };
    let start = Instant::now();
    while done.load(Ordering::Relaxed) < 2_000 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "I/O did not get going"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 0..6 {
        let t = Instant::now();
        qmp.execute(
            "blockdev-reopen",
            json!({"options": [{"driver": "raw", "node-name": "disk", "file": "null0"}]}),
        )
        .unwrap_or_else(|e| panic!("reopen {i}: {e}"));
        let took = t.elapsed();
        println!(
            "reopen {i}: {took:?}, {} done",
            done.load(Ordering::Relaxed)
        );
        assert!(took < Duration::from_secs(1), "reopen {i} took {took:?}");
    }
    let before = done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        done.load(Ordering::Relaxed) > before,
        "I/O goes on after the drains"
    );
    stop.store(true, Ordering::Relaxed);
    spinner.join().expect("every chain completed whole");
    qmp.execute("quit", json!({})).unwrap();
}
