//! Running the `strata` binary as a test daemon.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `strata` binary of this build, built on first use.
pub fn strata_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("STRATA_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<test binary> -> target/<profile>/strata
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.args([
            "build",
            "--quiet",
            "-p",
            "strata-backend",
            "--bin",
            "strata",
        ]);
        if release {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "building strata failed");
        profile_dir.join("strata")
    })
}

/// A `strata serve` process. Killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Runs `strata serve ARGS --socket SOCKET`, logging to LOG, and waits
    /// until it listens.
    pub fn serve(args: &[&str], socket: &Path, log: &Path) -> Daemon {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        all.push("--socket");
        all.push(socket.to_str().expect("a UTF-8 socket path"));
        Self::run(&all, socket, log)
    }

    /// Runs `strata ARGS` (qemu-storage-daemon's command line), whose
    /// export listens on `socket`, and waits until it listens.
    pub fn qsd(args: &[&str], socket: &Path, log: &Path) -> Daemon {
        Self::run(args, socket, log)
    }

    /// `strata` on qemu-storage-daemon's command line, in `dir`: the
    /// `blockdevs`, a vhost-user-blk export on `dir/vhost.sock` (`export`
    /// gives its id, node and options), a QMP monitor on `dir/qmp.sock`,
    /// and `extra` arguments. Logs to `dir/log`; returns the daemon once it
    /// listens, and a monitor session.
    pub fn qsd_with_monitor(
        dir: &Path,
        blockdevs: &[&str],
        export: &str,
        extra: &[&str],
    ) -> (Daemon, crate::qmp::Qmp) {
        let (sock, qmp_sock) = (dir.join("vhost.sock"), dir.join("qmp.sock"));
        let export = format!(
            "type=vhost-user-blk,{export},addr.type=unix,addr.path={}",
            sock.display()
        );
        let chardev = format!(
            "socket,id=m0,path={},server=on,wait=off",
            qmp_sock.display()
        );
        let mut args: Vec<&str> = Vec::new();
        for b in blockdevs {
            args.extend(["--blockdev", b]);
        }
        args.extend([
            "--export",
            &export,
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=m0",
        ]);
        args.extend_from_slice(extra);
        let d = Self::qsd(&args, &sock, &dir.join("log"));
        let qmp = crate::qmp::Qmp::connect(&qmp_sock);
        (d, qmp)
    }

    /// As [`serve`](Self::serve), with `env` set for the daemon.
    pub fn serve_with_env(
        args: &[&str],
        env: &[(&str, &str)],
        socket: &Path,
        log: &Path,
    ) -> Daemon {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        all.push("--socket");
        all.push(socket.to_str().expect("a UTF-8 socket path"));
        Self::run_with_env(&all, env, socket, log)
    }

    fn run(args: &[&str], socket: &Path, log: &Path) -> Daemon {
        Self::run_with_env(args, &[], socket, log)
    }

    /// A daemon in `dir` exporting a 64 MiB null-co node whose every
    /// request takes `latency`, on `dir/vm.sock`, with `extra_export`
    /// appended to the export's options.
    pub fn null(dir: &Path, latency: Duration, extra_export: &str) -> Daemon {
        let sock = dir.join("vm.sock");
        Self::qsd(
            &[
                "--blockdev",
                &format!(
                    "driver=null-co,node-name=null0,size=64M,latency-ns={}",
                    latency.as_nanos()
                ),
                "--export",
                &format!(
                    "type=vhost-user-blk,id=e0,node-name=null0,addr.type=unix,addr.path={},\
                     writable=on{extra_export}",
                    sock.display()
                ),
            ],
            &sock,
            &dir.join("strata.log"),
        )
    }

    /// As [`qsd`](Self::qsd), but a daemon that exits before it listens
    /// is an error carrying its log, not a panic: for restarts, which a
    /// supervisor would try again.
    pub fn try_qsd(args: &[&str], socket: &Path, log: &Path) -> Result<Daemon, String> {
        let mut d = Self::spawn(args, &[], socket, log);
        d.try_wait_listening().map(|()| d)
    }

    fn run_with_env(args: &[&str], env: &[(&str, &str)], socket: &Path, log: &Path) -> Daemon {
        let mut d = Self::spawn(args, env, socket, log);
        if let Err(e) = d.try_wait_listening() {
            panic!("{e}");
        }
        d
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], socket: &Path, log: &Path) -> Daemon {
        let out = File::create(log).expect("create daemon log");
        let child = Command::new(strata_bin())
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start strata");
        Daemon {
            child: Some(child),
            socket: socket.into(),
            log: log.into(),
        }
    }

    fn try_wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains("listening on")
        {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!(
                    "strata exited with {status} before listening:\n{}",
                    self.log_text()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "strata did not listen:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the daemon has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Peak resident memory so far, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc status")
            * 1024
    }

    /// Waits up to `timeout` for the daemon to exit on its own; returns the
    /// status and log.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, self.log_text());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("strata did not exit:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL (a crash) and waits for it to go;
    /// returns its log.
    pub fn kill(mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.log_text()
    }

    /// Sends SIGTERM and waits for the exit; returns the status and log.
    pub fn stop(self) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(30))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
