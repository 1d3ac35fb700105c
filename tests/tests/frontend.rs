//! A hand-built vhost-user frontend sends what well-behaved clients never
//! do: malformed chains, GET_ID, writes to a read-only export. Every bad
//! chain gets its status (or, with nowhere to put one, a used length of
//! 0), and the device keeps working.

use std::path::Path;
use std::time::Duration;

use strata_tests::daemon::Daemon;
use strata_tests::frontend::{TestFrontend, DATA, NEXT, W};
use virtio_bindings::virtio_blk::*;

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x10_0000;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn serve(dir: &Path, size: usize, extra: &[&str]) -> Daemon {
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x11u8; size]).unwrap();
    let mut args = vec![image.to_str().unwrap(), "--format", "raw"];
    args.extend_from_slice(extra);
    Daemon::serve(&args, &dir.join("vm.sock"), &dir.join("strata.log"))
}

/// Runs header + data + 1-byte status; returns (status, used length).
fn request(fe: &mut TestFrontend, ty: u32, sector: u64, data: Option<(u32, u16)>) -> (u8, u32) {
    fe.request(ty, sector, data.map(|(len, flags)| (BUF, len, flags)))
}

fn a_good_read_works(fe: &mut TestFrontend) {
    assert_eq!(
        request(fe, VIRTIO_BLK_T_IN, 0, Some((4096, W))),
        (S_OK, 4097)
    );
    assert_eq!(fe.byte(BUF), 0x11);
}

use vm_memory::Bytes;

#[test]
fn get_id_returns_the_serial() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), 1 << 20, &["--serial", "strata-serial-01"]);
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_GET_ID, 0, Some((512, W))),
        (S_OK, 21)
    );
    let mut id = [0u8; 20];
    fe.mem()
        .read_slice(&mut id, vm_memory::GuestAddress(BUF))
        .unwrap();
    assert_eq!(&id, b"strata-serial-01\0\0\0\0");
    // A buffer shorter than 20 bytes gets what fits.
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_GET_ID, 0, Some((8, W))),
        (S_OK, 9)
    );
}

#[test]
fn get_id_without_a_serial_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), 1 << 20, &[]);
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_GET_ID, 0, Some((20, W))),
        (S_UNSUPP, 1)
    );
}

#[test]
fn the_config_space_describes_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(
        dir.path(),
        3 << 20,
        &["--num-queues", "3", "--writethrough"],
    );
    let mut fe = TestFrontend::connect(daemon.socket(), 3);
    let cfg = fe.config();
    let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        6144,
        "capacity"
    );
    assert_eq!(u32_at(12), 126, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(cfg[32], 0, "writeback off with --writethrough");
    assert_eq!(
        u16::from_le_bytes(cfg[34..36].try_into().unwrap()),
        3,
        "num_queues"
    );
    assert_eq!(u32_at(36), 32768, "max_discard_sectors");
    assert_eq!(u32_at(48), 32768, "max_write_zeroes_sectors");
    assert_eq!(fe.features() & (1 << VIRTIO_BLK_F_RO), 0, "writable");
    // Writes still complete in write-through mode.
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_OUT, 8, Some((512, 0))),
        (S_OK, 1)
    );
}

#[test]
fn malformed_chains_get_errors_and_the_device_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = serve(dir.path(), 1 << 20, &[]);
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    a_good_read_works(&mut fe);

    // No status descriptor: nowhere to report, used length 0.
    fe.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(fe.run(0, &[(HDR, 16, 0), (BUF, 512, 0)]), 0);
    a_good_read_works(&mut fe);

    // A read-only buffer for a read; a length that is not a sector multiple.
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_IN, 0, Some((4096, 0))),
        (S_IOERR, 1)
    );
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_IN, 0, Some((1000, W))).0,
        S_IOERR
    );
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_OUT, 0, Some((100, 0))).0,
        S_IOERR
    );
    // Past the end, and a buffer outside guest memory.
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_IN, 2047, Some((1024, W))).0,
        S_IOERR
    );
    fe.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        fe.run(0, &[(HDR, 16, 0), (1 << 40, 512, W), (STATUS, 1, W)]),
        1
    );
    assert_eq!(fe.byte(STATUS), S_IOERR);
    // Unknown type; discard with a flag; two discard segments.
    assert_eq!(request(&mut fe, 77, 0, None), (S_UNSUPP, 1));
    fe.segment(BUF, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_DISCARD, 0, Some((16, 0))).0,
        S_UNSUPP
    );
    fe.segment(BUF, 0, 8, 0);
    fe.segment(BUF + 16, 8, 8, 0);
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_DISCARD, 0, Some((32, 0))).0,
        S_UNSUPP
    );
    a_good_read_works(&mut fe);

    // A chain whose `next` leaves the table, and one that loops: no
    // trusted place for a status.
    fe.header(HDR, VIRTIO_BLK_T_IN, 0);
    fe.offer_raw(0, 0, &[(HDR, 16, NEXT, 1), (BUF, 512, W | NEXT, 500)]);
    assert_eq!(fe.wait_used(0, Duration::from_secs(10)), Some((0, 0)));
    fe.offer_raw(0, 0, &[(HDR, 16, NEXT, 1), (BUF, 512, W | NEXT, 0)]);
    assert_eq!(fe.wait_used(0, Duration::from_secs(10)), Some((0, 0)));
    a_good_read_works(&mut fe);

    assert!(daemon.is_running());
    drop(fe);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("the chain is truncated"),
        "bad chains are logged:\n{log}"
    );
}

#[test]
fn a_read_only_export_refuses_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), 1 << 20, &["--read-only"]);
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    assert_ne!(fe.features() & (1 << VIRTIO_BLK_F_RO), 0, "RO offered");
    fe.mem()
        .write_slice(&[0x22u8; 4096], vm_memory::GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_OUT, 0, Some((4096, 0))),
        (S_IOERR, 1)
    );
    fe.segment(BUF, 0, 8, 0);
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_DISCARD, 0, Some((16, 0))).0,
        S_IOERR
    );
    fe.segment(BUF, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, 0))).0,
        S_IOERR
    );
    assert_eq!(request(&mut fe, VIRTIO_BLK_T_FLUSH, 0, None), (S_OK, 1));
    a_good_read_works(&mut fe);
    drop(fe);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    assert!(
        std::fs::read(dir.path().join("disk.img"))
            .unwrap()
            .iter()
            .all(|&b| b == 0x11),
        "the image is untouched"
    );
}

#[test]
fn the_driver_can_switch_the_write_cache() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), 1 << 20, &[]);
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    assert_eq!(fe.config()[32], 1, "write-back by default");
    fe.set_writeback(false);
    assert_eq!(fe.config()[32], 0);
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_OUT, 0, Some((512, 0))),
        (S_OK, 1)
    );
    fe.set_writeback(true);
    assert_eq!(fe.config()[32], 1);
    drop(fe);
    let (_, log) = daemon.stop();
    assert!(log.contains("write-through"), "{log}");
}

#[test]
fn rings_across_two_memory_regions_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve(dir.path(), 1 << 20, &["--serial", "split"]);
    // The descriptor table runs from 0xe00 to 0x1200, across the split.
    let mut fe = TestFrontend::connect_split(daemon.socket(), 1, 0x1000, 0xe00);
    a_good_read_works(&mut fe);
    // Several chains offered before the device looks: they are started
    // and published in batches.
    const CHAINS: u16 = 20;
    for i in 0..CHAINS {
        let (hdr, buf, status) = (
            DATA + 0x4_0000 + 0x20 * u64::from(i),
            BUF + 0x1000 * u64::from(i),
            STATUS + u64::from(i),
        );
        fe.header(hdr, VIRTIO_BLK_T_IN, 0);
        fe.offer_raw(
            0,
            3 * i,
            &[
                (hdr, 16, NEXT, 3 * i + 1),
                (buf, 512, W | NEXT, 3 * i + 2),
                (status, 1, W, 0),
            ],
        );
    }
    let mut heads: Vec<u32> = (0..CHAINS)
        .map(|_| {
            fe.wait_used(0, Duration::from_secs(10))
                .expect("completed")
                .0
        })
        .collect();
    heads.sort_unstable();
    assert_eq!(
        heads,
        (0..CHAINS).map(|i| u32::from(3 * i)).collect::<Vec<_>>()
    );
    for i in 0..CHAINS {
        assert_eq!(fe.byte(STATUS + u64::from(i)), S_OK);
        assert_eq!(fe.byte(BUF + 0x1000 * u64::from(i)), 0x11);
    }
    // Then writes, each read back.
    for sector in 0..40u64 {
        let byte = sector as u8 + 0x40;
        fe.mem()
            .write_slice(&[byte; 512], vm_memory::GuestAddress(BUF))
            .unwrap();
        assert_eq!(
            request(&mut fe, VIRTIO_BLK_T_OUT, sector, Some((512, 0))),
            (S_OK, 1)
        );
    }
    for sector in 0..40u64 {
        assert_eq!(
            request(&mut fe, VIRTIO_BLK_T_IN, sector, Some((512, W))),
            (S_OK, 513)
        );
        assert_eq!(fe.byte(BUF + 511), sector as u8 + 0x40);
    }
    assert_eq!(
        request(&mut fe, VIRTIO_BLK_T_GET_ID, 0, Some((20, W))),
        (S_OK, 21)
    );
    assert_eq!(fe.byte(BUF + 4), b't', "the serial, \"split\"");
    drop(daemon);
}

#[test]
fn a_corrupt_avail_index_does_not_keep_the_queue_spinning() {
    let dir = tempfile::tempdir().unwrap();
    // A window long enough that this frontend's millisecond turnarounds
    // open it (it cannot answer within QEMU's default).
    let daemon = serve(dir.path(), 1 << 20, &["--poll-max-ns", "50000000"]);
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    // Work opens the poll window; then the index jumps past the ring.
    for _ in 0..50 {
        a_good_read_works(&mut fe);
    }
    fe.set_avail_idx(0, 1000);
    std::thread::sleep(Duration::from_millis(200));
    let cpu = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let before = cpu(daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu(daemon.pid()) - before;
    // A spinning thread burns the whole second (100 ticks).
    assert!(
        ticks < 50,
        "the daemon used {ticks} of 100 ticks while idle"
    );
    assert!(daemon.log_text().contains("bad avail ring"));
}

/// The probe guard decides on a snapshot of the first sector and writes
/// that snapshot: a guest flipping its buffer between zeroes and a qcow2
/// magic while writing sector 0 never gets the magic onto the disk.
#[test]
fn a_guest_racing_the_probe_guard_cannot_make_its_disk_a_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    // No --format: the image is probed, so the guard is on.
    let daemon = Daemon::serve(
        &[image.to_str().unwrap()],
        &dir.path().join("vm.sock"),
        &dir.path().join("strata.log"),
    );
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    // The rest of the sector is a plausible v3 header, so only the magic
    // is missing.
    let mut sector = [0u8; 512];
    sector[4..8].copy_from_slice(&3u32.to_be_bytes()); // version
    sector[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
    sector[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes()); // size
    fe.mem()
        .write_slice(&sector, vm_memory::GuestAddress(BUF))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (mem, stop) = (fe.mem().clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for v in [*b"QFI\xfb", [0; 4]] {
                    mem.write_obj(v, vm_memory::GuestAddress(BUF)).unwrap();
                }
            }
        })
    };
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..20_000 {
        match request(&mut fe, VIRTIO_BLK_T_OUT, 0, Some((512, 0))) {
            (S_OK, 1) => ok += 1,
            (S_IOERR, 1) => refused += 1,
            other => panic!("unexpected completion {other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    assert!(ok > 0 && refused > 0, "{ok} written, {refused} refused");
    drop(fe);
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");
    let head = std::fs::read(&image).unwrap();
    assert_ne!(&head[..4], b"QFI\xfb", "the guest made its disk a qcow2");
    let info = strata_tests::qemu::qemu_img_ok(&["info", "--output=json", image.to_str().unwrap()]);
    assert!(info.contains("\"format\": \"raw\""), "{info}");
}
