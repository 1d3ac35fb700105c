//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Strata: a vhost-user-blk backend. It serves disk images to VMs over
/// vhost-user unix sockets that QEMU or cloud-hypervisor connect to.
///
/// Either use a subcommand (`strata serve disk.img --socket vm.sock`), or
/// give qemu-storage-daemon's options (`strata --blockdev ... --export
/// type=vhost-user-blk,... --chardev socket,... --monitor ...`).
#[derive(Debug, Parser)]
#[command(
    name = "strata",
    version,
    propagate_version = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// qemu-storage-daemon options.
    #[command(flatten)]
    pub qsd: QsdArgs,
}

/// qemu-storage-daemon's options. Each takes QEMU's dotted key=value form
/// (`driver=file,node-name=f,filename=x`) or, for --blockdev, --export and
/// --object, a JSON object.
#[derive(Debug, Default, Args)]
pub struct QsdArgs {
    /// Adds a block node (blockdev-add options).
    #[arg(long, value_name = "OPTIONS")]
    pub blockdev: Vec<String>,

    /// Adds an export: type=vhost-user-blk,id=ID,node-name=NODE,
    /// addr.type=unix,addr.path=PATH[,writable=on][,num-queues=N]
    /// [,logical-block-size=N][,writethrough=on]; or type=nbd,id=ID,
    /// node-name=NODE[,name=NAME][,description=TEXT][,writable=on]
    /// [,allocation-depth=on] (needs --nbd-server).
    #[arg(long, value_name = "OPTIONS")]
    pub export: Vec<String>,

    /// Starts the NBD server: addr.type=unix,addr.path=PATH or
    /// addr.type=inet,addr.host=HOST,addr.port=PORT[,max-connections=N].
    #[arg(long, value_name = "OPTIONS")]
    pub nbd_server: Option<String>,

    /// Defines a socket for a monitor: socket,id=ID,path=PATH,server=on,wait=off.
    #[arg(long, value_name = "OPTIONS")]
    pub chardev: Vec<String>,

    /// Runs a QMP monitor on a chardev: chardev=ID[,pretty=on].
    #[arg(long, value_name = "OPTIONS")]
    pub monitor: Vec<String>,

    /// Adds an object: throttle-group,id=ID,limits.iops-total=N,...
    #[arg(long, value_name = "OPTIONS")]
    pub object: Vec<String>,

    /// Writes the daemon's pid to this file (removed at exit).
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// Forks into the background once everything is set up; the command
    /// returns then, with an error if set-up failed. Logs then go to
    /// --log-file, or to journald.
    #[arg(long)]
    pub daemonize: bool,

    /// How the daemon runs as a process.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// How a serving daemon runs as a process: the same for `serve` and the
/// qemu-storage-daemon command line.
#[derive(Debug, Default, Args)]
pub struct ProcessArgs {
    /// Permissions of the vhost-user and QMP sockets the daemon creates, in
    /// octal (default 0600: only the daemon's user may connect).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Append the log here (created mode 0600) instead of stderr.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Confine the process with seccomp filters, as QEMU's -sandbox on: a
    /// system call outside them ends the daemon with SIGSYS, and the log
    /// names it (see README).
    #[arg(long, value_enum, value_name = "on|off", default_value_t = OnOff::On)]
    pub sandbox: OnOff,

    /// `user=NAME` or `user=UID:GID`: once its images and sockets are
    /// open, the daemon drops to this user (and its groups) for good.
    #[arg(long, value_name = "user=NAME", value_parser = crate::run_with::parse)]
    pub run_with: Option<crate::run_with::RunAs>,

    /// With the sandbox on, the daemon reaches only the directories of its
    /// command line's images, sockets and pid file (Landlock); this adds
    /// a directory, for images blockdev-add opens later. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub sandbox_allow: Vec<PathBuf>,

    /// Serve Prometheus metrics over HTTP at http://HOST:PORT/metrics
    /// (off by default; port 0 picks a free one, logged at start).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
}

fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    crate::metrics::parse_addr(s).map_err(|e| format!("{e:#}"))
}

/// QEMU's on/off switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    #[default]
    Off,
}

/// An octal file mode with permission bits only: `0660`, `600`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "'{s}' is not an octal permission mode (0000 to 0777)"
        )),
    }
}

impl QsdArgs {
    /// True when no qemu-storage-daemon option was given.
    pub fn is_empty(&self) -> bool {
        self.blockdev.is_empty()
            && self.export.is_empty()
            && self.nbd_server.is_none()
            && self.chardev.is_empty()
            && self.monitor.is_empty()
            && self.object.is_empty()
            && self.pidfile.is_none()
            && !self.daemonize
            && self.process.socket_mode.is_none()
            && self.process.log_file.is_none()
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk image over a vhost-user-blk socket until SIGINT or
    /// SIGTERM. A frontend that disconnects can reconnect.
    Serve(ServeArgs),
    /// Create a disk image (as `qemu-img create`).
    Create(CreateArgs),
    /// Show facts about an image (as `qemu-img info`).
    Info(InfoArgs),
    /// Show where an image's data is (as `qemu-img map`).
    Map(MapArgs),
    /// Check an image's metadata, and repair it (as `qemu-img check`).
    /// Exit codes: 0 clean, 2 corrupt, 3 leaked clusters only, 1 error.
    Check(CheckArgs),
    /// Snapshot, stream, commit and mirror a running daemon's disk through its QMP
    /// monitor, with a progress bar; exits non-zero when the job fails.
    Job(JobArgs),
    /// Watch the I/O of running daemons, like `iostat -x`: per export,
    /// IOPS, MB/s, latency and queue depth, from query-blockstats.
    Top(TopArgs),
}

/// Options of `strata top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// A daemon's QMP monitor socket. Repeatable.
    #[arg(long, value_name = "PATH")]
    pub qmp: Vec<PathBuf>,
    /// Every daemon whose QMP socket matches this pattern (quote it:
    /// '/run/strata/*.qmp'); matched again each round, so daemons that
    /// start later appear.
    #[arg(long, value_name = "PATTERN")]
    pub glob: Option<String>,
    /// Seconds between reports.
    #[arg(short, long, value_name = "SECONDS", default_value = "1", value_parser = parse_interval)]
    pub interval: f64,
    /// Stop after this many reports (default: until interrupted).
    #[arg(short = 'n', long, value_name = "N")]
    pub count: Option<u64>,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.05..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds from 0.05 to 3600"
        )),
    }
}

/// Options of `strata job`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The daemon's QMP monitor socket (--chardev socket,path=PATH).
    #[arg(long, value_name = "PATH")]
    pub qmp: PathBuf,
    /// Print one JSON result for scripts instead of progress.
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub action: JobAction,
}

/// Settings every job takes.
#[derive(Debug, Args)]
pub struct JobCommon {
    /// The job's id (default: ACTION-DEVICE, e.g. stream-disk).
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
    /// Bytes per second, with an optional K, M or G suffix; 0 is unlimited.
    #[arg(long, value_name = "RATE", value_parser = parse_size, default_value = "0")]
    pub speed: u64,
    /// What to do on an I/O error: report, ignore, stop or enospc.
    #[arg(long, value_name = "POLICY", default_value = "report")]
    pub on_error: String,
    /// Start the job and return without waiting for it.
    #[arg(long)]
    pub no_wait: bool,
}

/// The `strata job` actions.
#[derive(Debug, Subcommand)]
pub enum JobAction {
    /// Put a new qcow2 overlay above a live node: the guest's writes go to
    /// the overlay from its next request on (blockdev-snapshot).
    Snapshot {
        /// The node to snapshot (for example the export's node).
        node: String,
        /// The overlay image to create, backed by the node's image.
        #[arg(long, value_name = "FILE")]
        overlay: PathBuf,
        /// The overlay's node name (default: the file's stem).
        #[arg(long, value_name = "NAME")]
        overlay_node: Option<String>,
    },
    /// Copy the data of a node's backing layers into it, then drop them
    /// from its chain (block-stream).
    Stream {
        /// The node streamed into.
        device: String,
        /// Keep this backing node (and what is below it).
        #[arg(long, value_name = "NODE", conflicts_with = "bottom")]
        base_node: Option<String>,
        /// Copy down to this layer; the one below it stays.
        #[arg(long, value_name = "NODE")]
        bottom: Option<String>,
        /// The backing file name to record in the image header.
        #[arg(long, value_name = "NAME")]
        backing_file: Option<String>,
        #[command(flatten)]
        common: JobCommon,
    },
    /// Merge layers into a lower one (block-commit). Committing the active
    /// layer mirrors the guest's writes until ready, then switches the
    /// disk to the base.
    Commit {
        /// The node whose chain is committed (usually the export's node).
        device: String,
        /// The top layer merged (default: the device itself).
        #[arg(long, value_name = "NODE")]
        top_node: Option<String>,
        /// The layer merged into (default: the bottom of the chain).
        #[arg(long, value_name = "NODE")]
        base_node: Option<String>,
        /// The backing file name to record in the image above top.
        #[arg(long, value_name = "NAME")]
        backing_file: Option<String>,
        /// Leave an active commit ready instead of completing it.
        #[arg(long)]
        no_complete: bool,
        #[command(flatten)]
        common: JobCommon,
    },
    /// Copy a live node into another node (a local image, or an NBD
    /// export on another host), keep copying the guest's writes until
    /// ready, then switch the disk to the target (blockdev-mirror).
    Mirror {
        /// The node mirrored (usually the export's node).
        device: String,
        /// The node copied to, added beforehand (blockdev-add).
        #[arg(long, value_name = "NODE")]
        target: String,
        /// What the first copy takes: full (the whole chain), top (the
        /// top layer) or none (only new writes).
        #[arg(long, value_name = "SYNC", default_value = "full")]
        sync: String,
        /// The dirty map's granule in bytes.
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        granularity: Option<u64>,
        /// At most this much data in flight.
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        buf_size: Option<u64>,
        /// background, or write-blocking: guest writes reach the target
        /// before they complete.
        #[arg(long, value_name = "MODE", default_value = "background")]
        copy_mode: String,
        /// Leave the mirror ready instead of completing it.
        #[arg(long)]
        no_complete: bool,
        #[command(flatten)]
        common: JobCommon,
    },
    /// Grow a node while the guest runs (block_resize); the guest sees
    /// the new capacity at once.
    Resize {
        /// The node to grow (usually the export's node).
        node: String,
        /// The new size (`20G`), or how much to add (`+1G`).
        size: String,
    },
    /// List the jobs.
    List,
    /// Wait for a job, with progress.
    Wait {
        /// The job id.
        job: String,
    },
    /// Pause a job.
    Pause {
        /// The job id.
        job: String,
    },
    /// Resume a paused job.
    Resume {
        /// The job id.
        job: String,
    },
    /// Cancel a job; a ready commit finishes without switching unless
    /// --force.
    Cancel {
        /// The job id.
        job: String,
        /// Cancel even a ready job outright.
        #[arg(long)]
        force: bool,
    },
    /// Complete a ready active commit or mirror: switch the disk to the
    /// base or the target.
    Complete {
        /// The job id.
        job: String,
    },
}

/// How the image tools print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Human,
    /// For scripts, as qemu-img's JSON.
    Json,
}

/// Options of `strata create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format: qcow2 or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "raw")]
    pub format: String,
    /// Backing file (qcow2), resolved relative to the new image's directory.
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Format options: cluster_size, refcount_bits, extended_l2=on|off,
    /// compat=0.10|1.1, lazy_refcounts=on|off, compression_type=zlib|zstd,
    /// backing_file, backing_fmt.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image to create.
    pub file: PathBuf,
    /// Its size (bytes or with a K, M, G, T suffix); defaults to the
    /// backing file's.
    pub size: Option<String>,
}

/// Options of `strata info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Open even if another process is using the image, sharing every
    /// permission with it (read-only; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show the whole backing chain.
    #[arg(long)]
    pub backing_chain: bool,
    /// Image format (probed if not given).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// The image.
    pub file: PathBuf,
}

/// Options of `strata map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// Open even if another process is using the image, sharing every
    /// permission with it (read-only; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Image format (probed if not given).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// The image.
    pub file: PathBuf,
}

/// Options of `strata check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Open even if another process is using the image, sharing every
    /// permission with it (read-only; what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Repair: leaks (leaked clusters) or all (also corruptions).
    #[arg(short = 'r', value_name = "leaks|all")]
    pub repair: Option<String>,
    /// Image format (probed if not given).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// The image.
    pub file: PathBuf,
}

/// The image formats `serve` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Guess from the image's first bytes.
    Auto,
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write.
    Qcow2,
}

/// Host cache modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// Bypass the host page cache (O_DIRECT, cache.direct=on).
    None,
    /// Use the host page cache (cache.direct=off).
    Writeback,
}

/// Image used when `serve` is given none.
pub const DEFAULT_IMAGE: &str = "strata-disk.img";
/// Size of the image created when `serve` is given none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Options of `strata serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The disk image: a host file or block device. Without one, serves
    /// ./strata-disk.img, creating a 1 GiB image if it does not exist.
    pub image: Option<PathBuf>,

    /// The vhost-user socket to listen on.
    #[arg(long, short = 's', value_name = "PATH")]
    pub socket: PathBuf,

    /// Also serve a QMP monitor on this unix socket (query the disk, run
    /// jobs, resume requests held on error). With one, a request that
    /// fails for lack of space is held until `block-export-resume`, as
    /// qemu-storage-daemon's exports default to; without, it fails.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,

    /// How the daemon runs as a process.
    #[command(flatten)]
    pub process: ProcessArgs,

    /// Create the image, as raw, with this size if it does not exist
    /// (bytes, or with a K, M, G, T or P suffix).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub create: Option<u64>,

    /// The image format.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,

    /// The host cache mode.
    #[arg(long, value_enum, default_value_t = CacheArg::Writeback)]
    pub cache: CacheArg,

    /// Number of request queues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Serve the disk read-only: the guest sees a read-only disk and every
    /// write fails.
    #[arg(long)]
    pub read_only: bool,

    /// The serial number the guest reads (GET_ID), up to 20 bytes.
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,

    /// Start with the guest's write cache off: every write is flushed
    /// before it completes. The guest can switch this (CONFIG_WCE).
    #[arg(long)]
    pub writethrough: bool,

    /// The longest each queue thread busy-polls for new requests and
    /// completions before it sleeps, in ns (as QEMU's poll-max-ns). The
    /// window adapts below this and is zero while the disk is idle; 0
    /// turns polling off.
    #[arg(long, value_name = "NS", default_value_t = crate::export::DEFAULT_POLL_MAX_NS)]
    pub poll_max_ns: u64,
}

/// Parses a size: bytes, or a number with a K, M, G, T or P suffix
/// (powers of 1024), as qemu-img takes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    strata_blockdev::options::parse_size(s).ok_or_else(|| {
        format!("invalid size '{s}': use bytes, or a number with a K, M, G, T or P suffix")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("1X").unwrap_err().contains("invalid size '1X'"));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999P")
            .unwrap_err()
            .contains("invalid size"));
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
