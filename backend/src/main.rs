//! `strata`: the daemon's entry point.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::Parser;
use strata_backend::cli::{
    CacheArg, Cli, Command, FormatArg, OnOff, ServeArgs, DEFAULT_IMAGE, DEFAULT_SIZE,
};
use strata_backend::daemon::{Daemon, ExportSpec};
use strata_backend::export::ExportOptions;
use strata_backend::img;
use strata_backend::open::{open_image, ImageOptions};
use strata_backend::process;
use strata_formats::image::{self, ImageFormat};
use strata_formats::qcow2::create::{create as create_qcow2, CreateOptions};

fn main() -> ExitCode {
    // Before anything opens a descriptor: only inherited ones may be named.
    strata_backend::handed_fds::adopt();
    let cli = Cli::parse();
    if !matches!(cli.command, Some(Command::Serve(_)) | None) {
        process::log_to_stderr();
    }
    let res = match cli.command {
        Some(Command::Serve(args)) => run_serve(args),
        Some(Command::Create(args)) => img::create(args),
        Some(Command::Info(args)) => img::info(args),
        Some(Command::Map(args)) => img::map(args),
        Some(Command::Check(args)) => match img::check_image(args) {
            Ok(code) => return ExitCode::from(code as u8),
            Err(e) => Err(e),
        },
        Some(Command::Job(args)) => strata_backend::job_cli::run(args),
        Some(Command::Top(args)) => strata_backend::top::run(args),
        None => strata_backend::qsd::run(cli.qsd),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    process::setup(&args.process, false)?;
    let notifier = strata_backend::notify::Notifier::from_env();
    if args.process.sandbox == OnOff::On {
        strata_backend::sandbox::enter()?;
    }
    let (image, create) = match args.image {
        Some(p) => (p, args.create),
        None => (
            PathBuf::from(DEFAULT_IMAGE),
            Some(args.create.unwrap_or(DEFAULT_SIZE)),
        ),
    };
    let format = match args.format {
        FormatArg::Auto => None,
        FormatArg::Raw => Some(ImageFormat::Raw),
        FormatArg::Qcow2 => Some(ImageFormat::Qcow2),
    };
    // qemu-img's `rbd:POOL/IMAGE[@SNAP][:OPTION=VALUE...]`: an image in Ceph.
    let rbd = image
        .to_str()
        .filter(|s| s.starts_with("rbd:"))
        .map(str::to_owned);
    if rbd.is_some() {
        if create.is_some() {
            bail!("--create makes files; create an RBD image with `rbd create --size SIZE POOL/IMAGE`");
        }
        if format == Some(ImageFormat::Qcow2) {
            bail!("an rbd: image is served as it is (raw); give --format raw or auto");
        }
    }
    let mut created = false;
    // The cluster has an rbd: image: nothing to create or look for here.
    if rbd.is_none() {
        if let Some(size) = create {
            if image.exists() {
                tracing::info!("'{}' exists; serving it as it is", image.display());
            } else {
                if format == Some(ImageFormat::Qcow2) {
                    let opts = CreateOptions {
                        size,
                        ..Default::default()
                    };
                    create_qcow2(&image, &opts).context("cannot create the image")?;
                } else {
                    image::create_raw(&image, size).context("cannot create the image")?;
                }
                created = true;
                tracing::info!(
                    "created '{}' ({size} bytes, {})",
                    image.display(),
                    format.unwrap_or(ImageFormat::Raw).name()
                );
            }
        } else if !image.exists() {
            bail!(
                "'{}' does not exist (pass --create SIZE to create it)",
                image.display()
            );
        }
    }

    let daemon = Daemon::new();
    if let Some(m) = args.process.socket_mode {
        daemon.set_socket_mode(m);
    }
    match &rbd {
        Some(name) => strata_backend::open::open_rbd(
            &daemon,
            name,
            args.read_only,
            args.cache == CacheArg::None,
        )
        .map(drop)?,
        None => open_image(
            &daemon,
            &image,
            &ImageOptions {
                // A freshly created image's format is known.
                format: format.or(created.then_some(ImageFormat::Raw)),
                direct: args.cache == CacheArg::None,
                read_only: args.read_only,
            },
        )
        .map(drop)?,
    }
    let mut reach = strata_backend::sandbox::landlock::Reach::default();
    for p in daemon.image_paths() {
        reach.image(&p);
    }
    reach.dir_of(&args.socket);
    if let Some(q) = &args.qmp {
        reach.dir_of(q);
    }
    reach
        .dirs
        .extend(args.process.sandbox_allow.iter().cloned());
    strata_backend::sandbox::confine(reach)?;
    let opts = ExportOptions {
        num_queues: args.num_queues,
        read_only: args.read_only,
        serial: args.serial,
        writeback: !args.writethrough,
        poll_max_ns: args.poll_max_ns,
        // Without a monitor, nothing could resume a held request.
        on_error: match args.qmp {
            Some(_) => strata_backend::on_error::OnError::Enospc,
            None => strata_backend::on_error::OnError::Report,
        },
        ..ExportOptions::new("vhost-user-blk0")
    };
    daemon
        .export_add(ExportSpec {
            node: "disk".into(),
            listen: strata_backend::socket::ListenOn::Path(args.socket.clone()),
            opts,
            iothread: None,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(q) = &args.qmp {
        strata_backend::qmp::server::start_monitor(
            Arc::clone(&daemon),
            &strata_backend::socket::ListenOn::Path(q.clone()),
            false,
        )?;
    }
    if let Some(addr) = args.process.metrics {
        strata_backend::metrics::serve(Arc::clone(&daemon), addr)?;
    }
    if let Some(user) = &args.process.run_with {
        user.drop_privileges()?;
    }
    tracing::info!(
        "serving '{}' on {}{}",
        image.display(),
        args.socket.display(),
        if args.read_only { " (read-only)" } else { "" }
    );
    strata_backend::signals::quit_on_signals(Arc::clone(&daemon))?;
    process::trim_heap();
    notifier.notify("READY=1");
    daemon.wait_quit();
    notifier.notify("STOPPING=1");
    daemon.shutdown();
    tracing::info!("stopped");
    Ok(())
}
