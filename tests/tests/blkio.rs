//! libblkio (the `blkio` crate) as the frontend, with no guest: every
//! request type against a real image, checked byte for byte.

use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use strata_tests::daemon::Daemon;
use strata_tests::pattern::pattern;

const DISK: usize = 32 << 20;
const BUF: usize = 8 << 20;

struct Client {
    _blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

impl Client {
    fn connect(socket: &Path, num_queues: i32) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", socket.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", num_queues).unwrap();
        let out = b.start().unwrap();
        let region = b.alloc_mem_region(BUF).unwrap();
        b.map_mem_region(&region).unwrap();
        Client {
            _blkio: b,
            queues: out.queues,
            region,
        }
    }

    /// The client's I/O buffer.
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is BUF bytes mapped for the client's life, and
        // `&mut self` keeps this the only Rust view of it while no request
        // is in flight (every helper waits for its requests).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn ptr(&self, at: usize) -> *mut u8 {
        (self.region.addr + at) as *mut u8
    }
}

/// Waits for `n` completions on `q`, returning them by user_data.
fn wait(q: &mut Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut done = Vec::new();
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    while done.len() < n {
        let left = n - done.len();
        let got = q.do_io(&mut comps[..left], left, None, None).unwrap();
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            done.push((c.user_data, c.ret));
        }
    }
    done.sort_unstable();
    done
}

fn one(q: &mut Blkioq) -> i32 {
    wait(q, 1)[0].1
}

fn serve(dir: &Path, image_content: &[u8], extra: &[&str]) -> Daemon {
    let image = dir.join("disk.img");
    std::fs::write(&image, image_content).unwrap();
    let mut args = vec![image.to_str().unwrap(), "--format", "raw"];
    args.extend_from_slice(extra);
    Daemon::serve(&args, &dir.join("vm.sock"), &dir.join("strata.log"))
}

#[test]
fn every_request_type_reads_back_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = pattern(DISK, 1);
    let daemon = serve(dir.path(), &model, &["--serial", "blkio"]);
    let mut c = Client::connect(daemon.socket(), 1);
    let mut q = c.queues.remove(0);

    // Writes of many sizes at once (queue depth 32), then reads of them.
    let mut at = 0usize;
    let mut ios = Vec::new();
    for i in 0..32usize {
        let len = 512 << (i % 12); // 512 B .. 1 MiB
        let off = (i * 997 * 512) % (DISK - len) / 512 * 512;
        let data = pattern(len, 100 + i as u64);
        c.buf()[at..at + len].copy_from_slice(&data);
        model[off..off + len].copy_from_slice(&data);
        q.write(off as u64, c.ptr(at), len, i, ReqFlags::empty());
        ios.push((off, len, at));
        at += len;
        if at + (1 << 20) > BUF {
            break;
        }
    }
    let n = ios.len();
    assert!(wait(&mut q, n).iter().all(|&(_, r)| r == 0));
    c.buf().fill(0);
    for (i, &(off, len, at)) in ios.iter().enumerate() {
        q.read(off as u64, c.ptr(at), len, i, ReqFlags::empty());
    }
    assert!(wait(&mut q, n).iter().all(|&(_, r)| r == 0));
    for &(off, len, at) in &ios {
        assert!(
            c.buf()[at..at + len] == model[off..off + len],
            "read at {off}+{len}"
        );
    }

    // Vectored: three uneven segments each way.
    let data = pattern(12288, 7);
    c.buf()[..12288].copy_from_slice(&data);
    let iov = |c: &Client, base: usize| {
        [(0, 1024), (1024, 8192), (9216, 3072)].map(|(o, l)| libc::iovec {
            iov_base: c.ptr(base + o).cast(),
            iov_len: l,
        })
    };
    let out = iov(&c, 0);
    q.writev(1 << 20, out.as_ptr(), 3, 0, ReqFlags::empty());
    assert_eq!(one(&mut q), 0);
    model[1 << 20..(1 << 20) + 12288].copy_from_slice(&data);
    let inn = iov(&c, 1 << 20);
    q.readv(1 << 20, inn.as_ptr(), 3, 0, ReqFlags::empty());
    assert_eq!(one(&mut q), 0);
    assert!(c.buf()[1 << 20..(1 << 20) + 12288] == data[..]);

    // Write-zeroes, allowed to unmap and not; discard punches a hole.
    q.write_zeroes(4 << 20, 64 << 10, 0, ReqFlags::empty());
    assert_eq!(one(&mut q), 0);
    q.write_zeroes(5 << 20, 4096, 0, ReqFlags::NO_UNMAP);
    assert_eq!(one(&mut q), 0);
    q.discard(6 << 20, 1 << 20, 0, ReqFlags::empty());
    assert_eq!(one(&mut q), 0);
    q.flush(0, ReqFlags::empty());
    assert_eq!(one(&mut q), 0);
    model[4 << 20..(4 << 20) + (64 << 10)].fill(0);
    model[5 << 20..(5 << 20) + 4096].fill(0);
    model[6 << 20..7 << 20].fill(0);

    // The whole disk, through the device, equals the model: 8 MiB per
    // request, in segments of the device's size_max.
    const SEG: usize = 1 << 20;
    let segs: Vec<libc::iovec> = (0..BUF / SEG)
        .map(|i| libc::iovec {
            iov_base: c.ptr(i * SEG).cast(),
            iov_len: SEG,
        })
        .collect();
    for chunk in 0..DISK / BUF {
        let off = (chunk * BUF) as u64;
        q.readv(off, segs.as_ptr(), segs.len() as u32, 0, ReqFlags::empty());
        assert_eq!(one(&mut q), 0);
        let got = &c.buf()[..];
        let want = &model[chunk * BUF..(chunk + 1) * BUF];
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!("disk differs from the model at byte {}", chunk * BUF + i);
        }
    }
    drop(q);
    drop(c);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert!(
        std::fs::read(dir.path().join("disk.img")).unwrap() == model,
        "the image file equals the model"
    );
}

#[test]
fn requests_past_the_end_fail_and_the_disk_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), &vec![0u8; 1 << 20], &[]);
    let mut c = Client::connect(daemon.socket(), 1);
    let mut q = c.queues.remove(0);
    q.read(1 << 20, c.ptr(0), 4096, 0, ReqFlags::empty());
    assert!(one(&mut q) < 0, "a read past the end fails");
    q.write((1 << 20) - 512, c.ptr(0), 1024, 0, ReqFlags::empty());
    assert!(one(&mut q) < 0, "a write straddling the end fails");
    q.discard(1 << 20, 512, 0, ReqFlags::empty());
    assert!(one(&mut q) < 0, "a discard past the end fails");
    q.read(0, c.ptr(0), 4096, 0, ReqFlags::empty());
    assert_eq!(one(&mut q), 0, "the disk still works");
    drop(q);
    drop(c);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn two_queues_carry_io_at_the_same_time() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), &vec![0u8; DISK], &["--num-queues", "2"]);
    let mut c = Client::connect(daemon.socket(), 2);
    let queues = std::mem::take(&mut c.queues);
    let base = c.region.addr;
    let half = BUF / 2;
    std::thread::scope(|s| {
        for (i, mut q) in queues.into_iter().enumerate() {
            s.spawn(move || {
                // Each queue owns half the buffer and half the disk.
                let buf = base + i * half;
                let disk = i * DISK / 2;
                for round in 0..20u64 {
                    let data = pattern(64 << 10, round * 2 + i as u64);
                    for k in 0..16usize {
                        // SAFETY: this thread's half of the mapped region,
                        // not used by any request in flight.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut((buf + k * 65536) as *mut u8, 65536)
                        };
                        dst.copy_from_slice(&data);
                        let off = disk + ((round as usize * 16 + k) * 65536) % (DISK / 2);
                        q.write(off as u64, dst.as_mut_ptr(), 65536, k, ReqFlags::empty());
                    }
                    assert!(wait(&mut q, 16).iter().all(|&(_, r)| r == 0));
                    for k in 0..16usize {
                        let off = disk + ((round as usize * 16 + k) * 65536) % (DISK / 2);
                        q.read(
                            off as u64,
                            (buf + k * 65536) as *mut u8,
                            65536,
                            k,
                            ReqFlags::empty(),
                        );
                    }
                    assert!(wait(&mut q, 16).iter().all(|&(_, r)| r == 0));
                    for k in 0..16usize {
                        // SAFETY: as above; the reads have completed.
                        let got = unsafe {
                            std::slice::from_raw_parts((buf + k * 65536) as *const u8, 65536)
                        };
                        assert!(got == &data[..], "queue {i} round {round} block {k}");
                    }
                }
            });
        }
    });
    drop(c);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    let counts = log
        .lines()
        .find_map(|l| l.split("requests completed per queue: ").nth(1))
        .expect("per-queue counts in the log");
    assert_eq!(
        counts, "[640, 640]",
        "each queue completed its own requests"
    );
}

#[test]
fn a_client_that_reconnects_is_served_again() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), &vec![0u8; 1 << 20], &[]);
    let data = pattern(4096, 42);
    {
        let mut c = Client::connect(daemon.socket(), 1);
        let mut q = c.queues.remove(0);
        c.buf()[..4096].copy_from_slice(&data);
        q.write(8192, c.ptr(0), 4096, 0, ReqFlags::empty());
        assert_eq!(one(&mut q), 0);
    }
    for _ in 0..3 {
        let mut c = Client::connect(daemon.socket(), 1);
        let mut q = c.queues.remove(0);
        q.read(8192, c.ptr(0), 4096, 0, ReqFlags::empty());
        assert_eq!(one(&mut q), 0);
        assert!(c.buf()[..4096] == data[..]);
    }
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("frontend connected").count(), 4, "{log}");
}

#[test]
fn sigterm_with_a_client_connected_flushes_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), &vec![0u8; 1 << 20], &[]);
    let mut c = Client::connect(daemon.socket(), 1);
    let mut q = c.queues.remove(0);
    let data = pattern(65536, 9);
    c.buf()[..65536].copy_from_slice(&data);
    q.write(0, c.ptr(0), 65536, 0, ReqFlags::empty());
    assert_eq!(one(&mut q), 0);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("stopping") && log.contains("stopped"), "{log}");
    assert_eq!(
        std::fs::read(dir.path().join("disk.img")).unwrap()[..65536],
        data[..]
    );
}
