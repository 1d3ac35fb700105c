//! A daemon killed with requests in flight, restarted on the same socket:
//! the frontend (the vhost crate's, set up as QEMU's vhost-user-blk does,
//! with the INFLIGHT_SHMFD region it keeps) reconnects and rewinds each
//! ring to its used index. Every request taken before the kill completes
//! exactly once, none is lost, and new requests follow.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use strata_tests::daemon::Daemon;
use strata_tests::frontend::{TestFrontend, DATA, NEXT, W};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use vm_memory::{Bytes, GuestAddress};

/// A daemon exporting a null-co node whose every request takes `latency`,
/// with `queues` queues, on `dir/vm.sock`.
fn null_daemon(dir: &Path, latency: Duration, queues: u16) -> Daemon {
    Daemon::null(dir, latency, &format!(",num-queues={queues}"))
}

/// Offers `n` 512-byte reads on queue `q` as chains at heads `first`,
/// `first + 3`, ...; their status bytes start at 0xff.
fn offer_reads(fe: &mut TestFrontend, q: usize, first: u16, n: u16) -> Vec<u16> {
    (0..n)
        .map(|i| {
            let head = first + 3 * i;
            let at = DATA + u64::from(head) * 0x2000;
            let (hdr, buf, status) = (at, at + 0x1000, at + 0x1800);
            fe.header(hdr, VIRTIO_BLK_T_IN, u64::from(i) * 8);
            fe.mem().write_obj(0xffu8, GuestAddress(status)).unwrap();
            fe.place(
                q,
                head,
                &[
                    (hdr, 16, NEXT, head + 1),
                    (buf, 512, W | NEXT, head + 2),
                    (status, 1, W, 0),
                ],
            );
            fe.offer_head(q, head);
            head
        })
        .collect()
}

/// Collects used elements of queue `q` until `n` arrived, then checks for
/// a little while that no more do. Returns how often each head was used.
fn used_heads(fe: &mut TestFrontend, q: usize, n: usize) -> BTreeMap<u32, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (id, _) = fe
            .wait_used(q, Duration::from_secs(10))
            .expect("a request taken before the kill completes");
        *seen.entry(id).or_insert(0) += 1;
    }
    assert_eq!(
        fe.wait_used(q, Duration::from_millis(800)),
        None,
        "no request completes twice"
    );
    seen
}

#[test]
fn requests_in_flight_at_a_kill_complete_exactly_once_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let latency = Duration::from_millis(600);
    let daemon = null_daemon(dir.path(), latency, 2);
    let mut fe = TestFrontend::connect(daemon.socket(), 2);
    assert!(
        fe.has_inflight(),
        "the daemon hands over an inflight region"
    );
    // Queue 0: four reads complete before the kill; four more are in
    // flight at it. Queue 1: five in flight.
    offer_reads(&mut fe, 0, 0, 4);
    let before = used_heads(&mut fe, 0, 4);
    assert_eq!(before.keys().copied().collect::<Vec<_>>(), [0, 3, 6, 9]);
    let q0 = offer_reads(&mut fe, 0, 12, 4);
    let q1 = offer_reads(&mut fe, 1, 0, 5);
    std::thread::sleep(Duration::from_millis(150));
    let log = daemon.kill();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(fe.used_idx(0), 4, "nothing of the second batch completed");

    let daemon = null_daemon(dir.path(), latency, 2);
    fe.reconnect(daemon.socket());
    let again0 = used_heads(&mut fe, 0, 4);
    let again1 = used_heads(&mut fe, 1, 5);
    let want = |heads: &[u16]| heads.iter().map(|&h| (u32::from(h), 1)).collect();
    assert_eq!(again0, want(&q0), "queue 0: each once");
    assert_eq!(again1, want(&q1), "queue 1: each once");
    for h in q0.iter().chain(&q1) {
        let status = DATA + u64::from(*h) * 0x2000 + 0x1800;
        assert_eq!(fe.byte(status), VIRTIO_BLK_S_OK as u8);
    }
    assert!(
        daemon
            .log_text()
            .contains("resubmitting 4 requests left in flight"),
        "{}",
        daemon.log_text()
    );
    // The ring goes on from where it is.
    let more = offer_reads(&mut fe, 0, 30, 2);
    assert_eq!(used_heads(&mut fe, 0, 2), want(&more));
    assert_eq!(fe.used_idx(0), 10);
    let (st, log) = daemon.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn a_clean_reconnect_resubmits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = null_daemon(dir.path(), Duration::ZERO, 1);
    let mut fe = TestFrontend::connect(daemon.socket(), 1);
    let heads = offer_reads(&mut fe, 0, 0, 3);
    assert_eq!(used_heads(&mut fe, 0, 3).len(), heads.len());
    let (st, _) = daemon.stop();
    assert!(st.success());
    let daemon = null_daemon(dir.path(), Duration::ZERO, 1);
    fe.reconnect(daemon.socket());
    let more = offer_reads(&mut fe, 0, 9, 2);
    assert_eq!(used_heads(&mut fe, 0, 2).len(), more.len());
    assert!(!daemon.log_text().contains("resubmitting"));
    let (st, log) = daemon.stop();
    assert!(st.success(), "{log}");
}
