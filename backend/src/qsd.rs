//! The qemu-storage-daemon command line: `--blockdev`, `--export`,
//! `--chardev`, `--monitor`, `--object`, `--pidfile`, `--daemonize`.
//! Every option is checked before anything is opened, and any error names
//! the option it came from.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use strata_blockdev::options::Options;

use crate::cli::QsdArgs;
use crate::daemon::Daemon;
use crate::keyval;
use crate::pidfile::PidFile;
use crate::qmp::server::start_monitor;
use crate::socket::ListenOn;

/// An option parsed into [`Options`]: JSON keeps its types, the dotted form
/// gives strings.
fn options(flag: &str, arg: &str, implied: Option<&str>) -> anyhow::Result<Options> {
    let value = keyval::parse(arg, implied).map_err(|e| anyhow!("{flag} {arg}: {e}"))?;
    let parsed = if arg.trim_start().starts_with('{') {
        Options::from_json(value)
    } else {
        Options::from_keyval(value)
    };
    parsed.map_err(|e| anyhow!("{flag} {arg}: {e}"))
}

struct Monitor {
    on: ListenOn,
    pretty: bool,
}

/// Parses `--chardev` and `--monitor` into monitors on unix sockets.
fn monitors(args: &QsdArgs) -> anyhow::Result<Vec<Monitor>> {
    let mut chardevs = BTreeMap::new();
    for arg in &args.chardev {
        let ctx = |e: &dyn std::fmt::Display| anyhow!("--chardev {arg}: {e}");
        let mut o = options("--chardev", arg, Some("backend"))?;
        let backend = o.take_str("backend").map_err(|e| ctx(&e))?;
        let backend = o.required("backend", backend).map_err(|e| ctx(&e))?;
        if backend != "socket" {
            bail!("--chardev {arg}: chardev backend '{backend}' is not supported (use socket)");
        }
        let id = o.take_str("id").map_err(|e| ctx(&e))?;
        let id = o.required("id", id).map_err(|e| ctx(&e))?;
        let path = o.take_str("path").map_err(|e| ctx(&e))?;
        let fd = o.take_str("fd").map_err(|e| ctx(&e))?;
        let on = match (path, fd) {
            (Some(p), None) => ListenOn::Path(PathBuf::from(p)),
            (None, Some(fd)) => ListenOn::Fd(fd),
            (Some(_), Some(_)) => bail!("--chardev {arg}: give 'path' or 'fd', not both"),
            (None, None) => bail!("--chardev {arg}: 'path' or 'fd' is required"),
        };
        if o.take_bool("server").map_err(|e| ctx(&e))? != Some(true) {
            bail!("--chardev {arg}: only server=on is supported");
        }
        if o.take_bool("wait").map_err(|e| ctx(&e))? != Some(false) {
            bail!("--chardev {arg}: only wait=off is supported");
        }
        o.finish().map_err(|e| ctx(&e))?;
        if chardevs.insert(id.clone(), on).is_some() {
            bail!("--chardev {arg}: duplicate chardev id '{id}'");
        }
    }
    let mut out = Vec::new();
    for arg in &args.monitor {
        let ctx = |e: &dyn std::fmt::Display| anyhow!("--monitor {arg}: {e}");
        let mut o = options("--monitor", arg, Some("chardev"))?;
        let chardev = o.take_str("chardev").map_err(|e| ctx(&e))?;
        let chardev = o.required("chardev", chardev).map_err(|e| ctx(&e))?;
        if o.take_enum("mode", &["control", "readline"])
            .map_err(|e| ctx(&e))?
            .is_some_and(|m| m != "control")
        {
            bail!("--monitor {arg}: only mode=control (QMP) is supported");
        }
        let pretty = o.take_bool("pretty").map_err(|e| ctx(&e))?.unwrap_or(false);
        o.take_str("id").map_err(|e| ctx(&e))?;
        o.finish().map_err(|e| ctx(&e))?;
        let on = chardevs.remove(&chardev).ok_or_else(|| {
            anyhow!("--monitor {arg}: chardev '{chardev}' is not defined (or already used)")
        })?;
        out.push(Monitor { on, pretty });
    }
    if let Some(id) = chardevs.keys().next() {
        tracing::warn!("chardev '{id}' is not used by any monitor");
    }
    Ok(out)
}

/// Runs the daemon the options describe until SIGINT, SIGTERM or QMP quit.
pub fn run(args: QsdArgs) -> anyhow::Result<()> {
    if args.is_empty() {
        crate::process::log_to_stderr();
        bail!("nothing to do: give --blockdev/--export/--monitor options or a subcommand (see --help)");
    }
    let log = crate::process::setup(&args.process, args.daemonize)?;
    let notifier = crate::notify::Notifier::from_env();
    // Parse what can be parsed up front, so mistakes stop us before any
    // side effect.
    let mut objects = Vec::new();
    for arg in &args.object {
        objects.push((arg, options("--object", arg, Some("qom-type"))?));
    }
    let mut blockdevs = Vec::new();
    for arg in &args.blockdev {
        blockdevs.push((arg, options("--blockdev", arg, None)?));
    }
    let nbd_server = match &args.nbd_server {
        Some(arg) => {
            let mut o = options("--nbd-server", arg, None)?;
            let spec =
                Daemon::nbd_server_spec(&mut o).map_err(|e| anyhow!("--nbd-server {arg}: {e}"))?;
            o.finish().map_err(|e| anyhow!("--nbd-server {arg}: {e}"))?;
            Some((arg, spec))
        }
        None => None,
    };
    let mut exports = Vec::new();
    for arg in &args.export {
        let mut o = options("--export", arg, None)?;
        let spec = Daemon::export_spec(&mut o).map_err(|e| anyhow!("--export {arg}: {e}"))?;
        o.finish().map_err(|e| anyhow!("--export {arg}: {e}"))?;
        exports.push((arg, spec));
    }
    let monitors = monitors(&args)?;

    let ready = if args.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    // After the fork: the sandbox starts threads, which a fork leaves
    // behind.
    if args.process.sandbox == crate::cli::OnOff::On {
        if let Err(e) = crate::sandbox::enter() {
            if let Some(r) = ready {
                r.fail(&format!("{e:#}"));
                std::process::exit(1);
            }
            return Err(e);
        }
    }
    let daemon = Daemon::new();
    if let Some(m) = args.process.socket_mode {
        daemon.set_socket_mode(m);
    }
    let mut pidfile = None;
    let setup = || -> anyhow::Result<()> {
        // First, so a second daemon on the same pid file opens nothing.
        if let Some(p) = &args.pidfile {
            pidfile = Some(PidFile::create(p)?);
        }
        for (arg, mut o) in objects {
            daemon
                .object_add(&mut o)
                .map_err(|e| anyhow!("--object {arg}: {e}"))?;
            o.finish().map_err(|e| anyhow!("--object {arg}: {e}"))?;
        }
        for (arg, o) in blockdevs {
            daemon
                .blockdev_add(o)
                .map_err(|e| anyhow!("--blockdev {arg}: {e}"))?;
        }
        // Landlock: from here on, only the directories of what the
        // command line names.
        let mut reach = crate::sandbox::landlock::Reach::default();
        for p in daemon.image_paths() {
            reach.image(&p);
        }
        for path in exports.iter().filter_map(|(_, spec)| spec.socket_path()) {
            reach.dir_of(path);
        }
        if let Some((
            _,
            crate::nbd::ServerOptions {
                addr: crate::nbd::ServerAddr::Unix(p),
                ..
            },
        )) = &nbd_server
        {
            reach.dir_of(p);
        }
        for m in monitors.iter().filter_map(|m| m.on.path()) {
            reach.dir_of(m);
        }
        if let Some(p) = &args.pidfile {
            reach.dir_of(p);
        }
        reach
            .dirs
            .extend(args.process.sandbox_allow.iter().cloned());
        crate::sandbox::confine(reach)?;
        if let Some((arg, spec)) = nbd_server {
            daemon
                .nbd_server_start(spec)
                .map_err(|e| anyhow!("--nbd-server {arg}: {e}"))?;
        }
        for (arg, spec) in exports {
            daemon
                .add_export(spec)
                .map_err(|e| anyhow!("--export {arg}: {e}"))?;
        }
        for m in monitors {
            start_monitor(Arc::clone(&daemon), &m.on, m.pretty)?;
        }
        if let Some(addr) = args.process.metrics {
            crate::metrics::serve(Arc::clone(&daemon), addr)?;
        }
        if let Some(user) = &args.process.run_with {
            user.drop_privileges()?;
        }
        Ok(())
    };
    if let Err(e) = setup() {
        daemon.shutdown();
        return match ready {
            Some(r) => {
                r.fail(&format!("{e:#}"));
                std::process::exit(1);
            }
            None => Err(e),
        };
    }
    if let Some(r) = ready {
        r.ready(log.as_ref());
    }
    crate::signals::quit_on_signals(Arc::clone(&daemon))?;
    crate::process::trim_heap();
    notifier.notify("READY=1");
    daemon.wait_quit();
    notifier.notify("STOPPING=1");
    tracing::info!("shutting down");
    daemon.shutdown();
    drop(pidfile);
    Ok(())
}

/// The child's end of `--daemonize`: tells the waiting parent whether the
/// daemon came up. Holds /dev/null, opened before the sandbox would refuse
/// it, for the daemon's standard descriptors.
struct Ready(File, File);

impl Ready {
    fn ready(mut self, log: Option<&File>) {
        let _ = self.0.write_all(b"ok");
        detach_stdio(&self.1, log);
    }

    fn fail(mut self, msg: &str) {
        let _ = self.0.write_all(msg.as_bytes());
    }
}

/// Forks. The parent waits until the child reports, then exits with the
/// child's verdict; the child returns, in a new session.
fn daemonize() -> anyhow::Result<Ready> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("--daemonize: pipe");
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    let (mut rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (we fork before starting any), so
    // the child's copy of the process is consistent.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("--daemonize: fork"),
        0 => {
            drop(rd);
            // SAFETY: setsid has no memory effects.
            unsafe { libc::setsid() };
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .context("--daemonize: /dev/null")?;
            Ok(Ready(wr, null))
        }
        _child => {
            drop(wr);
            let mut msg = String::new();
            let _ = rd.read_to_string(&mut msg);
            if msg == "ok" {
                std::process::exit(0);
            }
            if msg.is_empty() {
                msg = "the daemon exited during start-up".into();
            }
            eprintln!("strata: {msg}");
            std::process::exit(1);
        }
    }
}

/// Once the daemon is up, its stdin is /dev/null and its stdout and
/// stderr the log file, or /dev/null without one (as qsd's), so that a
/// caller waiting for the command's output is not kept waiting.
fn detach_stdio(null: &File, log: Option<&File>) {
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto our own standard input.
    unsafe { libc::dup2(null.as_raw_fd(), 0) };
    crate::process::redirect_stdio(log.unwrap_or(null));
    let _ = std::env::set_current_dir(Path::new("/"));
}
