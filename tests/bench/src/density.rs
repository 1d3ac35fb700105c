//! Many daemons on one host, as one daemon per VM disk gives: 100 of
//! them, each serving its own sparse 10 GiB qcow2 with a QMP monitor, 20
//! with a libblkio frontend connected and idle. Their memory (PSS),
//! threads and CPU over a quiet minute; and how long one takes from exec
//! to a listening socket and to being ready.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use blkio::{Blkio, ReqFlags};

use crate::backend::{cpu_ns, Kind};

/// How many daemons, and how many of them have a frontend.
pub const DAEMONS: usize = 100;
/// See [`DAEMONS`].
pub const CONNECTED: usize = 20;
/// Start-ups timed; the median is reported.
pub const STARTS: usize = 50;

/// What the daemons of one kind cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct Density {
    /// Mean proportional set size per daemon, bytes.
    pub pss: f64,
    /// Mean threads per daemon.
    pub threads: f64,
    /// CPU of all daemons together over the window, as a share of one
    /// core.
    pub idle_cpu: f64,
    /// Median time from exec to an accepting vhost-user socket.
    pub to_socket: Duration,
    /// Median time from exec to ready: `READY=1` for Strata; qsd sends
    /// none, so for it the return of `--daemonize`'s parent, which waits
    /// until the daemon set everything up.
    pub to_ready: Duration,
}

/// One daemon's arguments: a file, a qcow2, a vhost-user export and a
/// monitor, as a per-VM-disk unit would start it.
fn args(dir: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!(
            "driver=file,node-name=file,filename={}",
            dir.join("disk.qcow2").display()
        ),
        "--blockdev".into(),
        "driver=qcow2,node-name=disk,file=file".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=disk,node-name=disk,writable=on,num-queues=1,\
             addr.type=unix,addr.path={}",
            dir.join("vhost.sock").display()
        ),
        "--chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            dir.join("qmp.sock").display()
        ),
        "--monitor".into(),
        "chardev=qmp".into(),
    ]
}

fn qcow2(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.join("disk.qcow2"))
        .arg("10G")
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn spawn(kind: Kind, bin: &Path, dir: &Path) -> anyhow::Result<Child> {
    let _ = std::fs::remove_file(dir.join("vhost.sock"));
    let _ = std::fs::remove_file(dir.join("qmp.sock"));
    Command::new(bin)
        .args(args(dir))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} ({})", bin.display(), kind.name()))
}

fn wait_socket(path: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(path).is_err() {
        if let Some(s) = child.try_wait()? {
            bail!(
                "a daemon exited ({s}) before listening on {}",
                path.display()
            );
        }
        if Instant::now() > deadline {
            bail!("no daemon listened on {}", path.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// `/proc/PID/smaps_rollup`'s Pss, in bytes.
fn pss(pid: u32) -> u64 {
    field(&format!("/proc/{pid}/smaps_rollup"), "Pss:") * 1024
}

fn threads(pid: u32) -> u64 {
    field(&format!("/proc/{pid}/status"), "Threads:")
}

fn field(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A frontend that connects, reads a little, and stays.
fn frontend(socket: &Path) -> anyhow::Result<Blkio> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket.to_str().context("socket path")?)?;
    b.connect()?;
    let mut started = b.start()?;
    let q = &mut started.queues[0];
    let region = b.alloc_mem_region(4096)?;
    b.map_mem_region(&region)?;
    q.read(0, region.addr as *mut u8, 4096, 0, ReqFlags::empty());
    let mut c = [std::mem::MaybeUninit::uninit()];
    q.do_io(&mut c, 1, None, None)?;
    Ok(b)
}

/// Measures `kind`: the fleet over `window`, then [`STARTS`] start-ups.
pub fn measure(
    kind: Kind,
    bin: &Path,
    workdir: &Path,
    window: Duration,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Density> {
    let dirs: Vec<PathBuf> = (0..DAEMONS)
        .map(|i| workdir.join(kind.name()).join(format!("d{i:03}")))
        .collect();
    for d in &dirs {
        qcow2(d)?;
    }
    let mut fleet = Fleet(Vec::new());
    for d in &dirs {
        let mut c = spawn(kind, bin, d)?;
        wait_socket(&d.join("vhost.sock"), &mut c)?;
        fleet.0.push(c);
    }
    let frontends = dirs[..CONNECTED]
        .iter()
        .map(|d| frontend(&d.join("vhost.sock")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Let start-up work (and any adaptive polling) settle.
    std::thread::sleep(Duration::from_secs(5));
    let pids: Vec<u32> = fleet.0.iter().map(Child::id).collect();
    let before: u64 = pids.iter().map(|&p| cpu_ns(p)).sum();
    std::thread::sleep(window);
    let after: u64 = pids.iter().map(|&p| cpu_ns(p)).sum();
    let idle_cpu = (after - before) as f64 / window.as_nanos() as f64;
    let n = pids.len() as f64;
    let pss = pids.iter().map(|&p| pss(p) as f64).sum::<f64>() / n;
    let threads = pids.iter().map(|&p| threads(p) as f64).sum::<f64>() / n;
    progress(&format!(
        "density    {:<6} {DAEMONS} daemons: PSS {:.1} MiB each, {threads:.1} threads, idle CPU {:.2}% of a core",
        kind.name(),
        pss / (1 << 20) as f64,
        idle_cpu * 100.0
    ));
    drop(frontends);
    drop(fleet);

    let dir = &dirs[0];
    let notify_path = workdir.join(format!("{}-notify", kind.name()));
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (mut to_socket, mut to_ready) = (Vec::new(), Vec::new());
    for _ in 0..STARTS {
        let start = Instant::now();
        let mut c = spawn(kind, bin, dir)?;
        wait_socket(&dir.join("vhost.sock"), &mut c)?;
        to_socket.push(start.elapsed());
        let _ = c.kill();
        let _ = c.wait();

        let start = Instant::now();
        if kind == Kind::Qsd {
            let out = Command::new(bin)
                .args(args(dir))
                .arg("--pidfile")
                .arg(dir.join("pid"))
                .arg("--daemonize")
                .stdin(Stdio::null())
                .output()?;
            to_ready.push(start.elapsed());
            if !out.status.success() {
                bail!("qsd --daemonize: {}", String::from_utf8_lossy(&out.stderr));
            }
            let pid: u32 = std::fs::read_to_string(dir.join("pid"))?.trim().parse()?;
            Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()?;
            while Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            let _ = std::fs::remove_file(dir.join("vhost.sock"));
            let mut c = Command::new(bin)
                .args(args(dir))
                .env("NOTIFY_SOCKET", &notify_path)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let mut buf = [0u8; 64];
            let got = notify.recv(&mut buf).context("READY=1")?;
            to_ready.push(start.elapsed());
            if &buf[..got] != b"READY=1" {
                bail!("expected READY=1, got {:?}", &buf[..got]);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let d = Density {
        pss,
        threads,
        idle_cpu,
        to_socket: median(to_socket),
        to_ready: median(to_ready),
    };
    progress(&format!(
        "density    {:<6} start-up: socket {:.1} ms, ready {:.1} ms",
        kind.name(),
        d.to_socket.as_secs_f64() * 1e3,
        d.to_ready.as_secs_f64() * 1e3
    ));
    Ok(d)
}
