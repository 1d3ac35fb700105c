//! Dirty logging over the vhost-user socket, set up as QEMU does while
//! migrating (SET_LOG_BASE with a memfd, then LOG_ALL): every page the
//! daemon writes is marked, pages it only reads are not, and marking stops
//! when LOG_ALL is cleared.

use strata_tests::daemon::Daemon;
use strata_tests::frontend::{Options, TestFrontend, DATA, W};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const PAGE: u64 = 4096;

fn logging_frontend(dir: &std::path::Path) -> (Daemon, TestFrontend) {
    let daemon = Daemon::null(dir, std::time::Duration::ZERO, "");
    let opts = Options {
        event_idx: true,
        dirty_log: true,
        ..Options::default()
    };
    let fe = TestFrontend::connect_opts(daemon.socket(), 1, opts);
    (daemon, fe)
}

#[test]
fn the_pages_a_request_writes_are_marked_and_no_others() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut fe) = logging_frontend(dir.path());
    let (_, _, used) = fe.ring_addrs(0);
    // Header at DATA, status at DATA + 1 MiB (see `request`).
    let (hdr_page, status_page) = (DATA / PAGE, (DATA + 0x10_0000) / PAGE);

    // A read over two pages: the device writes both, the status and the
    // used ring, and reads only the header.
    let buf = DATA + 0x4000 + 0x800;
    fe.clear_dirty_pages();
    let (status, _) = fe.request(VIRTIO_BLK_T_IN, 0, Some((buf, 4096, W)));
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let marked = fe.dirty_pages().unwrap();
    for page in [buf / PAGE, buf / PAGE + 1, status_page, used / PAGE] {
        assert!(
            marked.contains(&page),
            "page {page:#x} marked in {marked:x?}"
        );
    }
    assert!(!marked.contains(&hdr_page), "the header page is only read");
    assert_eq!(marked.len(), 4, "only the written pages: {marked:x?}");

    // A write: the device only reads its data.
    fe.clear_dirty_pages();
    let (status, _) = fe.request(VIRTIO_BLK_T_OUT, 0, Some((buf, 4096, 0)));
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let marked = fe.dirty_pages().unwrap();
    assert_eq!(marked, [used / PAGE, status_page], "data pages only read");

    // With LOG_ALL cleared, nothing more is marked.
    fe.set_dirty_logging(false);
    fe.clear_dirty_pages();
    let (status, _) = fe.request(VIRTIO_BLK_T_IN, 0, Some((buf, 4096, W)));
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(fe.dirty_pages().unwrap(), [] as [u64; 0]);

    // And on again.
    fe.set_dirty_logging(true);
    let (status, _) = fe.request(VIRTIO_BLK_T_IN, 0, Some((buf, 4096, W)));
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert!(fe.dirty_pages().unwrap().contains(&(buf / PAGE)));
}
