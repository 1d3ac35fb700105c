//! Booting the test guest (ci/build-guest) under QEMU against a socket.
//!
//! The guest's init runs the checks named on its command line and prints
//! lines containing "STRATA "; this module collects them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where ci/build-guest put the kernel and initramfs.
pub fn guest_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STRATA_GUEST_DIR") {
        return d.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest")
}

/// What a guest run printed.
pub struct GuestRun {
    /// The "STRATA ..." lines, from "STRATA" on, in order.
    pub lines: Vec<String>,
    /// Whether the guest's init reached its end.
    pub done: bool,
    /// The whole console, for failure messages.
    pub console: String,
}

impl GuestRun {
    /// The value of `key=` in the first line that starts with `prefix`
    /// and has that key.
    pub fn value(&self, prefix: &str, key: &str) -> Option<String> {
        let pat = format!(" {key}=");
        self.lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .find_map(|l| l.find(&pat).map(|at| &l[at + pat.len()..]))
            .map(|v| v.split(' ').next().unwrap_or("").to_owned())
    }

    /// Lines reporting a failed check.
    pub fn failures(&self) -> Vec<&String> {
        self.lines
            .iter()
            .filter(|l| l.starts_with("STRATA FAIL"))
            .collect()
    }
}

/// Boots the guest with a vhost-user-blk disk on `socket` and runs
/// `tests` (comma-separated names from ci/guest/init).
pub fn boot(socket: &Path, num_queues: u16, tests: &str, timeout: Duration) -> GuestRun {
    boot_watching(socket, num_queues, tests, timeout, &mut |_| {})
}

/// [`boot`], calling `on_line` with each "STRATA ..." line as it arrives.
pub fn boot_watching(
    socket: &Path,
    num_queues: u16,
    tests: &str,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> GuestRun {
    boot_with(socket, num_queues, tests, "", timeout, on_line)
}

/// [`boot_watching`], with QEMU reconnecting to the socket every second
/// after the daemon goes (`reconnect=1`), as it is run in production.
pub fn boot_reconnecting(
    socket: &Path,
    num_queues: u16,
    tests: &str,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> GuestRun {
    boot_with(socket, num_queues, tests, ",reconnect=1", timeout, on_line)
}

/// [`boot_watching`], with QEMU's own QMP monitor on `qmp` for the test
/// to drive (hotplug, say) from `on_line`.
pub fn boot_with_monitor(
    socket: &Path,
    num_queues: u16,
    tests: &str,
    qmp: &Path,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> GuestRun {
    let (tx, rx) = mpsc::channel();
    let chardev = format!("socket,id=c0,path={}", socket.display());
    let extra = [
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ];
    let _vm = Vm::start(&chardev, num_queues, tests, "", &extra, tx, 0);
    collect(&rx, timeout, &mut |_, l| on_line(l))
}

fn boot_with(
    socket: &Path,
    num_queues: u16,
    tests: &str,
    chardev_opts: &str,
    timeout: Duration,
    on_line: &mut dyn FnMut(&str),
) -> GuestRun {
    let (tx, rx) = mpsc::channel();
    let chardev = format!("socket,id=c0,path={}{chardev_opts}", socket.display());
    let _vm = Vm::start(&chardev, num_queues, tests, "", &[], tx, 0);
    collect(&rx, timeout, &mut |_, l| on_line(l))
}

/// Boots the guest on the source's vhost-user socket, and a second QEMU
/// that waits for it on the destination's (`-incoming unix:MIG -S`), each
/// with a QMP monitor: `sides` holds both sockets of each. `kernel_args`
/// go on the guest kernel's command line. `on_line` gets each "STRATA ..." line with 0 for
/// the source and 1 for the destination; it drives the migration. Ends
/// when the guest's init ends on either side, or at `timeout`.
pub fn boot_migrating(
    sides: [(&Path, &Path); 2],
    incoming: &Path,
    num_queues: u16,
    tests: &str,
    kernel_args: &str,
    timeout: Duration,
    on_line: &mut dyn FnMut(u8, &str),
) -> GuestRun {
    let (tx, rx) = mpsc::channel();
    let mut vms = Vec::new();
    for side in 0..2u8 {
        let chardev = format!(
            "socket,id=c0,path={},reconnect=1",
            sides[usize::from(side)].0.display()
        );
        let mut extra = vec![
            "-qmp".to_owned(),
            format!(
                "unix:{},server=on,wait=off",
                sides[usize::from(side)].1.display()
            ),
        ];
        if side == 1 {
            extra.extend([
                "-incoming".to_owned(),
                format!("unix:{}", incoming.display()),
                "-S".to_owned(),
            ]);
        }
        vms.push(Vm::start(
            &chardev,
            num_queues,
            tests,
            kernel_args,
            &extra,
            tx.clone(),
            side,
        ));
    }
    drop(tx);
    collect(&rx, timeout, on_line)
}

/// The guest's RAM, in bytes: one memfd that vhost-user shares.
pub const GUEST_RAM: u64 = 512 << 20;

/// A QEMU running the test guest, killed when dropped.
struct Vm(std::process::Child);

impl Vm {
    /// Starts QEMU with the guest's disk on `chardev`; its console lines
    /// go to `tx`, tagged `tag`.
    fn start(
        chardev: &str,
        num_queues: u16,
        tests: &str,
        kernel_args: &str,
        extra: &[String],
        tx: mpsc::Sender<(u8, String)>,
        tag: u8,
    ) -> Vm {
        let dir = guest_dir();
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.gz"));
        assert!(
            kernel.exists() && initrd.exists(),
            "no guest in {}: run ci/build-guest (ci/test does)",
            dir.display()
        );
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
            .args(["-m", &format!("{}M", GUEST_RAM >> 20)])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .args([
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    GUEST_RAM >> 20
                ),
            ])
            .args(["-numa", "node,memdev=mem"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 strata.test={tests} {kernel_args}"
            ))
            .args(["-chardev", chardev])
            .arg("-device")
            .arg(format!(
                "vhost-user-blk-pci,chardev=c0,num-queues={num_queues}"
            ))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-system-x86_64 (apt-get install qemu-system-x86)");
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = String::from_utf8_lossy(&line).replace('\r', "");
                    if tx.send((tag, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Vm(child)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects console lines until the guest's init ends or `timeout`.
fn collect(
    rx: &mpsc::Receiver<(u8, String)>,
    timeout: Duration,
    on_line: &mut dyn FnMut(u8, &str),
) -> GuestRun {
    let deadline = Instant::now() + timeout;
    let mut run = GuestRun {
        lines: Vec::new(),
        done: false,
        console: String::new(),
    };
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((tag, line)) => {
                run.console.push_str(&line);
                run.console.push('\n');
                // The console prefixes escape codes: match anywhere.
                if line.contains("STRATA-DONE") {
                    run.done = true;
                    break;
                } else if let Some(at) = line.find("STRATA ") {
                    let l = line[at..].trim_end().to_owned();
                    on_line(tag, &l);
                    run.lines.push(l);
                }
            }
            Err(_) => break,
        }
    }
    run
}
