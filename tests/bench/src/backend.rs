//! A backend under test: Strata or qemu-storage-daemon, started with the
//! same qsd-style command line and pinned to its own core.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Which daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// This project.
    Strata,
    /// This project with `--sandbox off`, to price the sandbox.
    StrataSandboxOff,
    /// qemu-storage-daemon, the reference.
    Qsd,
}

impl Kind {
    /// The name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Strata => "strata",
            Kind::StrataSandboxOff => "strata-nosandbox",
            Kind::Qsd => "qsd",
        }
    }
}

/// A running daemon serving one export. Killed when dropped.
pub struct Backend {
    child: Child,
    /// The export's vhost-user socket.
    pub socket: PathBuf,
    log: PathBuf,
}

impl Backend {
    /// Starts `bin` with `blockdevs` and a writable vhost-user-blk export
    /// of node `root` with `queues` queues, pinned to `cpus` (a taskset
    /// list). `iothread` adds an iothread object with that `poll-max-ns`
    /// and runs the export in it.
    pub fn start(
        kind: Kind,
        bin: &Path,
        dir: &Path,
        blockdevs: &[String],
        iothread: Option<u64>,
        cpus: &str,
        queues: usize,
    ) -> anyhow::Result<Backend> {
        let socket = dir.join(format!("{}.sock", kind.name()));
        let mut args = Vec::new();
        let mut export = format!(
            "type=vhost-user-blk,id=exp,node-name=root,writable=on,num-queues={queues},\
             addr.type=unix,addr.path={}",
            socket.display()
        );
        if let Some(ns) = iothread {
            args.push("--object".into());
            args.push(format!("iothread,id=io0,poll-max-ns={ns}"));
            export.push_str(",iothread=io0");
        }
        args.push("--export".into());
        args.push(export);
        Self::spawn(kind, bin, dir, blockdevs, args, socket, cpus)
    }

    /// Starts `bin` with `blockdevs`, an NBD server on a unix socket and a
    /// writable NBD export of node `root` named `disk`, pinned to `cpus`.
    pub fn start_nbd(
        kind: Kind,
        bin: &Path,
        dir: &Path,
        blockdevs: &[String],
        cpus: &str,
    ) -> anyhow::Result<Backend> {
        let socket = dir.join(format!("{}-nbd.sock", kind.name()));
        let args = vec![
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", socket.display()),
            "--export".into(),
            "type=nbd,id=exp,node-name=root,name=disk,writable=on".into(),
        ];
        Self::spawn(kind, bin, dir, blockdevs, args, socket, cpus)
    }

    /// Starts this benchmark's no-work NBD server ([`crate::nbd_floor`])
    /// on a unix socket in `dir`, pinned to `cpus`.
    pub fn start_nbd_floor(dir: &Path, cpus: &str) -> anyhow::Result<Backend> {
        let socket = dir.join("floor-nbd.sock");
        let log = dir.join("floor.log");
        let out = File::create(&log)?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(cpus)
            .arg(std::env::current_exe()?)
            .arg("--nbd-floor")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the no-work NBD server")?;
        let mut b = Backend { child, socket, log };
        b.wait_ready()?;
        Ok(b)
    }

    fn spawn(
        kind: Kind,
        bin: &Path,
        dir: &Path,
        blockdevs: &[String],
        args: Vec<String>,
        socket: PathBuf,
        cpus: &str,
    ) -> anyhow::Result<Backend> {
        let log = dir.join(format!("{}.log", kind.name()));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new("taskset");
        cmd.arg("-c").arg(cpus).arg(bin);
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        cmd.args(args);
        if kind == Kind::StrataSandboxOff {
            cmd.args(["--sandbox", "off"]);
        }
        let out = File::create(&log)?;
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut b = Backend { child, socket, log };
        b.wait_ready()?;
        Ok(b)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the daemon exited ({status}) before listening:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("the daemon did not listen on {}", self.socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The probe connection above counts as a frontend session; give the
        // daemon a moment to see it close before the real client comes.
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    /// The daemon's CPU time so far (utime + stime, all threads), in ns.
    pub fn cpu_ns(&self) -> u64 {
        cpu_ns(self.child.id())
    }

    /// The daemon's resident set, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Backend {
    /// Stops the daemon as an operator would (SIGTERM), so it lets go of
    /// what it holds outside itself (an RBD image's lock) before the next
    /// one starts; killed if it takes more than 30 s.
    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of process `pid`, in ns.
pub fn cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // After ")": state is field 3, so utime (14) and stime (15) sit at 11, 12.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // USER_HZ, the unit of these fields, is fixed at 100 by the Linux ABI on
    // x86 and arm64.
    ticks * 10_000_000
}
