//! An idle daemon sleeps: hundreds of them run on one host, so no thread
//! may wake on a timer while nothing happens, with or without a frontend
//! connected (once its queues' poll window has passed).

use std::collections::BTreeMap;
use std::time::Duration;

use strata_tests::client::SyncClient;
use strata_tests::daemon::Daemon;

/// Context switches of each thread of `pid`, by thread name and id.
fn switches(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let get = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let n: u64 = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .iter()
            .filter_map(|k| get(k).parse::<u64>().ok())
            .sum();
        let name = format!("{} ({})", get("Name:"), t.file_name().to_string_lossy());
        out.insert(name, n);
    }
    out
}

/// Threads that woke during `window`.
fn woken(pid: u32, window: Duration) -> Vec<String> {
    let before = switches(pid);
    std::thread::sleep(window);
    let after = switches(pid);
    after
        .iter()
        .filter(|(t, n)| before.get(*t).is_some_and(|b| *n > b))
        .map(|(t, n)| format!("{t}: {} switches", n - before[t]))
        .collect()
}

#[test]
fn no_thread_of_an_idle_daemon_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::null(dir.path(), Duration::ZERO, ",num-queues=2");
    std::thread::sleep(Duration::from_millis(300));
    let w = woken(d.pid(), Duration::from_secs(2));
    assert!(w.is_empty(), "woke with no frontend: {w:?}");

    let mut c = SyncClient::connect(d.socket(), false).unwrap();
    c.write(0, &[1; 4096]).unwrap();
    c.read(0, 4096).unwrap();
    // The queues poll for a while after the last request, then sleep.
    std::thread::sleep(Duration::from_millis(500));
    let w = woken(d.pid(), Duration::from_secs(2));
    assert!(w.is_empty(), "woke with an idle frontend: {w:?}");
}
