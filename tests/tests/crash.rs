//! Crash safety: the daemon is killed with SIGKILL at random points while
//! a client makes allocating writes and flushes. After every kill,
//! `qemu-img check` must find no corruption (leaked clusters are allowed),
//! and every write acknowledged before an acknowledged flush must be in
//! the image.

use std::collections::BTreeMap;
use std::time::Duration;

use strata_tests::client::SyncClient;
use strata_tests::daemon::{strata_bin, Daemon};
use strata_tests::qemu::{check, to_raw};

const SLOT: u64 = 4096;
const WRITE: usize = 4096;

fn data_for(slot: u64, iteration: u64) -> Vec<u8> {
    let mut v = vec![0u8; WRITE];
    for (i, chunk) in v.chunks_exact_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&slot.to_le_bytes());
        chunk[8..].copy_from_slice(&(iteration << 20 | i as u64).to_le_bytes());
    }
    v
}

#[test]
fn sigkill_during_allocating_writes_never_corrupts() {
    let iterations: u64 = std::env::var("STRATA_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    let size: u64 = 128 << 20;
    let out = std::process::Command::new(strata_bin())
        .args([
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            img.to_str().unwrap(),
            "128M",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());

    let mut durable: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut next_slot = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (mut leaky, mut writes, mut flushes) = (0, 0, 0);
    for it in 0..iterations {
        let daemon = Daemon::serve(
            &[img.to_str().unwrap(), "--format", "qcow2"],
            &dir.path().join("vm.sock"),
            &dir.path().join("strata.log"),
        );
        let mut c = SyncClient::connect(daemon.socket(), false).expect("connect");
        // A request the dead daemon never completes fails after this.
        c.timeout = Some(Duration::from_millis(250));
        let kill_after = Duration::from_micros(1000 + rand(40_000));
        let pid = daemon.pid() as i32;
        // SIGKILL at a random moment, mid-request or not: no flush, no
        // clean shutdown.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            // SAFETY: kill(2) on our own child has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let mut pending = Vec::new();
        while next_slot * SLOT + WRITE as u64 <= size {
            let slot = next_slot;
            let data = data_for(slot, it);
            if c.write(slot * SLOT, &data).is_err() {
                break;
            }
            next_slot += 1;
            writes += 1;
            pending.push((slot, data));
            if pending.len() == 4 {
                if c.flush().is_err() {
                    break;
                }
                flushes += 1;
                durable.extend(pending.drain(..));
            }
        }
        killer.join().unwrap();
        drop(c);
        drop(daemon);
        let (code, out) = check(&img);
        assert!(
            code == 0 || code == 3,
            "iteration {it}: qemu-img check found corruption (exit {code}):\n{out}"
        );
        if code == 3 {
            leaky += 1;
        }
        if it % 25 == 24 || it + 1 == iterations {
            let raw = to_raw(&img);
            for (slot, data) in &durable {
                let at = (slot * SLOT) as usize;
                assert!(
                    raw[at..at + WRITE] == data[..],
                    "iteration {it}: flushed write to slot {slot} is lost"
                );
            }
        }
        if next_slot * SLOT + WRITE as u64 > size {
            break;
        }
    }
    println!(
        "crash test: {iterations} SIGKILLs during {writes} allocating writes and {flushes} flushes; \
         no corruption ({leaky} runs left leaks), all {} flushed writes present",
        durable.len()
    );
}
