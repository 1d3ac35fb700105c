//! What a guest can make the daemon allocate is bounded: requests past
//! SIZE_MAX and SEG_MAX are refused with IOERR, and misaligned buffers
//! under `--cache none` are bounced a bounded chunk at a time.

use std::mem::MaybeUninit;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use strata_tests::daemon::Daemon;

const MIB: usize = 1 << 20;

fn wait_all(q: &mut Blkioq, n: usize) -> Vec<i32> {
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut got = Vec::new();
    while got.len() < n {
        let left = n - got.len();
        let k = q.do_io(&mut comps[..left], left, None, None).unwrap();
        // SAFETY: do_io initialised the first `k` completions.
        got.extend(
            comps[..k]
                .iter()
                .map(|c| unsafe { c.assume_init_ref() }.ret),
        );
    }
    got
}

fn pattern(at: usize) -> u8 {
    (at / 4093) as u8 ^ (at % 251) as u8
}

#[test]
fn misaligned_giant_reads_under_cache_none_keep_memory_bounded() {
    // O_DIRECT needs a filesystem that has it: not tmpfs.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = dir.path().join("disk.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(512 * MIB as u64).unwrap();
    let head: Vec<u8> = (0..4 * MIB).map(pattern).collect();
    std::fs::write(&image, &head).unwrap();
    f.set_len(512 * MIB as u64).unwrap();
    let daemon = Daemon::serve(
        &[
            image.to_str().unwrap(),
            "--format",
            "raw",
            "--cache",
            "none",
        ],
        &dir.path().join("vm.sock"),
        &dir.path().join("strata.log"),
    );

    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", daemon.socket().to_str().unwrap())
        .unwrap();
    b.connect().unwrap();
    b.set_i32("queue-size", 256).unwrap();
    let mut out = b.start().unwrap();
    let region = b.alloc_mem_region(256 * MIB + 2 * MIB).unwrap();
    b.map_mem_region(&region).unwrap();
    let q = &mut out.queues[0];
    // One byte past a page: no O_DIRECT alignment holds.
    let odd = region.addr + 1;

    // 16 reads of 256 MiB, each one misaligned buffer: past size_max.
    for i in 0..16 {
        q.read(0, odd as *mut u8, 256 * MIB, i, ReqFlags::empty());
    }
    let res = wait_all(q, 16);
    let peak = daemon.peak_rss();
    assert!(
        peak < 256 * MIB as u64,
        "peak RSS {} MiB",
        peak / MIB as u64
    );
    assert!(res.iter().all(|&r| r == -libc::EIO), "{res:?}");

    // 16 reads of the most a request may carry: 126 misaligned 1 MiB
    // segments (all over the same guest memory), bounced in chunks.
    let segs: Vec<libc::iovec> = (0..126)
        .map(|_| libc::iovec {
            iov_base: odd as *mut libc::c_void,
            iov_len: MIB,
        })
        .collect();
    for i in 0..16 {
        q.readv((i * MIB) as u64, segs.as_ptr(), 126, i, ReqFlags::empty());
    }
    let res = wait_all(q, 16);
    assert!(res.iter().all(|&r| r == 0), "{res:?}");
    let peak = daemon.peak_rss();
    assert!(
        peak < 256 * MIB as u64,
        "peak RSS {} MiB",
        peak / MIB as u64
    );
    assert_eq!(
        b.get_i32("max-segment-len").unwrap(),
        MIB as i32,
        "size_max"
    );
    assert_eq!(b.get_i32("max-segments").unwrap(), 126, "seg_max");
    // One more segment than seg_max is refused.
    let many: Vec<libc::iovec> = (0..127)
        .map(|_| libc::iovec {
            iov_base: odd as *mut libc::c_void,
            iov_len: 512,
        })
        .collect();
    q.readv(0, many.as_ptr(), 127, 0, ReqFlags::empty());
    assert_eq!(wait_all(q, 1), [-libc::EIO]);

    // Bouncing in chunks still reads and writes the right bytes: 3 MiB
    // misaligned, across chunk boundaries.
    let three: Vec<libc::iovec> = (0..3)
        .map(|i| libc::iovec {
            iov_base: (odd + i * MIB) as *mut libc::c_void,
            iov_len: MIB,
        })
        .collect();
    q.readv(512, three.as_ptr(), 3, 0, ReqFlags::empty());
    assert_eq!(wait_all(q, 1), [0]);
    // SAFETY: the region is mapped for the client's life and no request
    // is in flight.
    let got = unsafe { std::slice::from_raw_parts(odd as *const u8, 3 * MIB) };
    assert!(got == &head[512..512 + 3 * MIB], "a bounced read is wrong");
    q.writev(8 * MIB as u64, three.as_ptr(), 3, 0, ReqFlags::empty());
    assert_eq!(wait_all(q, 1), [0]);

    let peak = daemon.peak_rss();
    assert!(
        peak < 256 * MIB as u64,
        "peak RSS {} MiB",
        peak / MIB as u64
    );
    drop(out);
    drop(b);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    let back = std::fs::read(&image).unwrap();
    assert!(
        back[8 * MIB..11 * MIB] == head[512..512 + 3 * MIB],
        "a bounced write is wrong"
    );
}

/// A qcow2 of 512-byte clusters marked dirty (so it is repaired on open)
/// in a sparse file of 8 TiB: 16 Gi clusters, whose census would take
/// 64 GiB if it were sized by the file.
fn dirty_image_in_a_sparse_8_tib_file(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let image = dir.join("hostile.qcow2");
    strata_tests::qemu::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        image.to_str().unwrap(),
        "16G",
    ]);
    strata_tests::qemu::qemu_io(&image, "write -P 7 0 4k");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.set_len(8 << 40).unwrap();
    // The dirty bit of the incompatible features.
    f.write_all_at(&1u64.to_be_bytes(), 72).unwrap();
    image
}

#[test]
fn a_dirty_image_in_a_huge_sparse_file_is_repaired_in_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let image = dirty_image_in_a_sparse_8_tib_file(dir.path());
    let d = Daemon::serve(
        &[image.to_str().unwrap()],
        &dir.path().join("vhost.sock"),
        &dir.path().join("log"),
    );
    assert!(
        d.log_text().contains("refcounts rebuilt"),
        "{}",
        d.log_text()
    );
    let mut c = strata_tests::client::SyncClient::connect(d.socket(), false).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![7; 4096]);
    c.write(1 << 20, &[9; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    let peak = d.peak_rss();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);
    let out = std::process::Command::new(strata_tests::daemon::strata_bin())
        .args(["check", image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metadata_pointing_far_into_a_huge_sparse_file_is_refused() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dirty_image_in_a_sparse_8_tib_file(dir.path());
    // Point the first L2 entry at the file's last cluster.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let mut word = [0u8; 8];
    f.read_exact_at(&mut word, 40).unwrap();
    let l1 = u64::from_be_bytes(word);
    f.read_exact_at(&mut word, l1).unwrap();
    let l2 = u64::from_be_bytes(word) & 0x00ff_ffff_ffff_fe00;
    let far = ((8u64 << 40) - 512) | 1 << 63;
    f.write_all_at(&far.to_be_bytes(), l2).unwrap();
    let out = std::process::Command::new(strata_tests::daemon::strata_bin())
        .args(["serve", image.to_str().unwrap(), "--socket"])
        .arg(dir.path().join("vhost.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a clear error, not an abort: {err}"
    );
    assert!(
        err.contains("refusing rather than running out of memory"),
        "{err}"
    );
}
