//! A frontend may leave at any moment: with requests in flight, in the
//! middle of GET_VRING_BASE, or while the daemon is being stopped. None of
//! it may take the daemon down, and nothing taken before a ring was given
//! up may ever be published into it.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use strata_tests::daemon::Daemon;
use strata_tests::frontend::{TestFrontend, DATA, W};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

struct Client {
    blkio: Blkio,
    q: Blkioq,
    region: MemoryRegion,
}

fn connect(socket: &Path) -> Client {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    let mut out = b.start().unwrap();
    let region = b.alloc_mem_region(1 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    Client {
        q: out.queues.remove(0),
        blkio: b,
        region,
    }
}

impl Client {
    /// Starts `n` 4 KiB reads without waiting for them.
    fn start_reads(&mut self, n: usize) {
        for i in 0..n {
            let buf = (self.region.addr + i * 4096) as *mut u8;
            self.q
                .read((i * 4096) as u64, buf, 4096, i, ReqFlags::empty());
        }
        let mut none: [MaybeUninit<Completion>; 0] = [];
        self.q.do_io(&mut none, 0, None, None).unwrap();
    }

    /// Waits for `n` completions and returns their results.
    fn wait(&mut self, n: usize) -> Vec<i32> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let left = n - got.len();
            let k = self.q.do_io(&mut comps[..left], left, None, None).unwrap();
            // SAFETY: do_io initialised the first `k` completions.
            got.extend(
                comps[..k]
                    .iter()
                    .map(|c| unsafe { c.assume_init_ref() }.ret),
            );
        }
        got
    }
}

#[test]
fn frontends_that_leave_with_reads_in_flight_do_not_take_the_daemon_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::null(dir.path(), Duration::from_millis(400), "");
    for round in 0..3 {
        let mut c = connect(daemon.socket());
        c.start_reads(32);
        // Let the daemon take them, then vanish as a crashed VM would.
        std::thread::sleep(Duration::from_millis(100));
        drop(c);
        // Longer than the reads take: whatever the daemon does with them
        // has happened.
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            daemon.is_running(),
            "round {round}: the daemon died:\n{}",
            daemon.log_text()
        );
    }
    // A fourth frontend is served.
    let mut c = connect(daemon.socket());
    c.start_reads(4);
    assert_eq!(c.wait(4), [0; 4]);
    // SIGTERM with reads in flight: they finish, and the daemon exits 0.
    c.start_reads(32);
    std::thread::sleep(Duration::from_millis(50));
    let (status, log) = daemon.stop();
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(log.matches("frontend connected").count(), 4, "{log}");
    let _ = &c.blkio;
}

#[test]
fn a_request_abandoned_by_get_vring_base_never_reaches_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::null(dir.path(), Duration::from_secs(2), ",x-stop-timeout-ms=300");
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    let (hdr, buf, status) = (DATA, DATA + 0x1000, DATA + 0x2000);
    fe.header(hdr, VIRTIO_BLK_T_IN, 0);
    fe.offer(0, &[(hdr, 16, 0), (buf, 4096, W), (status, 1, W)]);
    std::thread::sleep(Duration::from_millis(100));
    // The read takes 2 s; GET_VRING_BASE gives up after 300 ms.
    let start = Instant::now();
    assert!(
        fe.get_vring_base(0).is_err(),
        "GET_VRING_BASE cannot succeed with a request in flight"
    );
    assert!(start.elapsed() < Duration::from_millis(1500));
    // The read completes on the daemon's side within the next 2 s; it
    // must not be published.
    let used = fe.used_idx(0);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(fe.used_idx(0), used, "a stale completion reached the ring");
    assert!(daemon.is_running(), "{}", daemon.log_text());
    drop(fe);
    // The next frontend is served.
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    fe.header(hdr, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        fe.run(0, &[(hdr, 16, 0), (buf, 4096, W), (status, 1, W)]),
        4097
    );
    let (st, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn frontends_that_come_and_go_leak_no_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::null(dir.path(), Duration::ZERO, ",num-queues=2");
    let fds = |d: &Daemon| {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count()
    };
    let cycle = || {
        let mut c = connect(daemon.socket());
        c.start_reads(4);
        assert_eq!(c.wait(4), [0; 4]);
    };
    cycle();
    std::thread::sleep(Duration::from_millis(300));
    let before = fds(&daemon);
    for _ in 0..20 {
        cycle();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = fds(&daemon);
    assert!(daemon.is_running());
    assert!(
        after <= before,
        "{before} descriptors open after one connection, {after} after 21"
    );
}
