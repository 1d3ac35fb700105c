//! The job commands: block-stream, block-commit, blockdev-mirror,
//! blockdev-snapshot, the
//! block-job-* and job-* controls, and the job queries.

use std::sync::Arc;

use serde_json::{json, Value};
use strata_blockdev::options::Options;
use strata_jobs::job::{Job, JobOptions, OnError};
use strata_jobs::{self as jobs, CommitArgs, NodeRef, StreamArgs};

use crate::daemon::Daemon;
use crate::qmp::error::QmpError;

/// The commands this module answers, for query-commands.
pub const COMMANDS: &[&str] = &[
    "block-stream",
    "block-commit",
    "blockdev-mirror",
    "drive-mirror",
    "blockdev-snapshot",
    "query-jobs",
    "query-block-jobs",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "block-job-set-speed",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
];

/// Runs job command `name`, or returns `None` if it is not one.
pub fn execute(daemon: &Daemon, name: &str, a: Options) -> Option<Result<Value, QmpError>> {
    let res = match name {
        "block-stream" => stream(daemon, a),
        "block-commit" => commit(daemon, a),
        "blockdev-mirror" => mirror(daemon, a),
        "drive-mirror" => Err(QmpError::generic(
            "drive-mirror creates its target image itself, which Strata does not: \
             create it (blockdev-add) and use blockdev-mirror",
        )),
        "blockdev-snapshot" => snapshot(daemon, a),
        "query-jobs" => a
            .finish()
            .map_err(Into::into)
            .map(|()| Value::Array(daemon.jobs().list().iter().map(|j| j.job_info()).collect())),
        "query-block-jobs" => a.finish().map_err(Into::into).map(|()| {
            Value::Array(
                daemon
                    .jobs()
                    .list()
                    .iter()
                    .map(|j| j.block_job_info())
                    .collect(),
            )
        }),
        _ => {
            let (verb, block) = match (name.strip_prefix("block-job-"), name.strip_prefix("job-")) {
                (Some(v), _) => (v, true),
                (None, Some(v)) => (v, false),
                _ => return None,
            };
            control(daemon, a, verb, block)
        }
    };
    Some(res)
}

/// The options every job command shares.
fn job_options(a: &mut Options, device: &str) -> Result<JobOptions, QmpError> {
    let id = a.take_str("job-id")?;
    let id = id.ok_or_else(|| {
        QmpError::generic(format!(
            "Parameter 'job-id' is missing: an explicit job ID is required for node '{device}'"
        ))
    })?;
    let speed = a.take_i64("speed")?.unwrap_or(0);
    if speed < 0 {
        return Err(QmpError::generic(
            "Parameter 'speed' expects a non-negative value",
        ));
    }
    let on_error = on_error(a, "on-error")?;
    Ok(JobOptions {
        id,
        speed: speed as u64,
        on_error,
        on_target_error: on_error,
        auto_finalize: a.take_bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: a.take_bool("auto-dismiss")?.unwrap_or(true),
    })
}

/// A `BlockdevOnError` argument; `report` when left out.
fn on_error(a: &mut Options, key: &str) -> Result<OnError, QmpError> {
    match a.take_str(key)? {
        None => Ok(OnError::Report),
        Some(s) => OnError::parse(&s).ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter '{key}' does not accept value '{s}' (report, ignore, stop, enospc)"
            ))
        }),
    }
}

/// `x-node` and `x` (a file name) as one reference; both is an error.
fn node_ref(a: &mut Options, node_key: &str, file_key: &str) -> Result<Option<NodeRef>, QmpError> {
    match (a.take_str(node_key)?, a.take_str(file_key)?) {
        (Some(_), Some(_)) => Err(QmpError::generic(format!(
            "'{file_key}' and '{node_key}' cannot be specified at the same time"
        ))),
        (Some(n), None) => Ok(Some(NodeRef::Node(n))),
        (None, Some(f)) => Ok(Some(NodeRef::File(f))),
        (None, None) => Ok(None),
    }
}

fn device(a: &mut Options) -> Result<String, QmpError> {
    let d = a.take_str("device")?;
    Ok(a.required("device", d)?)
}

fn stream(daemon: &Daemon, mut a: Options) -> Result<Value, QmpError> {
    let device = device(&mut a)?;
    let base = node_ref(&mut a, "base-node", "base")?;
    let bottom = a.take_str("bottom")?;
    let backing_file = a.take_str("backing-file")?;
    a.take_bool("backing-mask-protocol")?;
    if a.take_str("filter-node-name")?.is_some() {
        return Err(QmpError::generic(
            "'filter-node-name' is not supported by block-stream: Strata's stream needs no filter",
        ));
    }
    let opts = job_options(&mut a, &device)?;
    a.finish()?;
    let args = StreamArgs {
        device,
        base,
        bottom,
        backing_file,
    };
    let ctx = daemon.open_context().clone();
    let id = opts.id.clone();
    daemon
        .jobs()
        .start(opts, |g| jobs::stream(g, &id, args, &ctx))
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}

fn commit(daemon: &Daemon, mut a: Options) -> Result<Value, QmpError> {
    let device = device(&mut a)?;
    let top = node_ref(&mut a, "top-node", "top")?;
    let base = node_ref(&mut a, "base-node", "base")?;
    let backing_file = a.take_str("backing-file")?;
    a.take_bool("backing-mask-protocol")?;
    let filter_node_name = a.take_str("filter-node-name")?;
    let opts = job_options(&mut a, &device)?;
    a.finish()?;
    let args = CommitArgs {
        device,
        top,
        base,
        backing_file,
        filter_node_name,
    };
    let ctx = daemon.open_context().clone();
    let id = opts.id.clone();
    daemon
        .jobs()
        .start(opts, |g| jobs::commit(g, &id, args, &ctx))
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}

fn mirror(daemon: &Daemon, mut a: Options) -> Result<Value, QmpError> {
    let device = device(&mut a)?;
    let target = a.take_str("target")?;
    let target = a.required("target", target)?;
    let sync = a.take_str("sync")?;
    let sync = a.required("sync", sync)?;
    let sync = jobs::Sync::parse(&sync).ok_or_else(|| {
        QmpError::generic(format!(
            "Parameter 'sync' does not accept value '{sync}' (full, top, none)"
        ))
    })?;
    if let Some(r) = a.take_str("replaces")? {
        if r != device {
            return Err(QmpError::generic(format!(
                "replaces='{r}': Strata's mirror replaces the device node itself"
            )));
        }
    }
    let write_blocking = match a.take_str("copy-mode")?.as_deref() {
        None | Some("background") => false,
        Some("write-blocking") => true,
        Some(m) => {
            return Err(QmpError::generic(format!(
                "Parameter 'copy-mode' does not accept value '{m}' (background, write-blocking)"
            )))
        }
    };
    // Zeroes reach the target as zero writes either way.
    a.take_bool("unmap")?;
    if a.has("on-error") {
        return Err(QmpError::generic(
            "Parameter 'on-error' is unexpected (blockdev-mirror takes on-source-error and on-target-error)",
        ));
    }
    let granularity = a.take_u64("granularity")?;
    let buf_size = a.take_u64("buf-size")?;
    let filter_node_name = a.take_str("filter-node-name")?;
    let on_source_error = on_error(&mut a, "on-source-error")?;
    let on_target_error = on_error(&mut a, "on-target-error")?;
    let mut opts = job_options(&mut a, &device)?;
    opts.on_error = on_source_error;
    opts.on_target_error = on_target_error;
    a.finish()?;
    let args = jobs::MirrorArgs {
        device,
        target,
        sync,
        granularity,
        buf_size,
        write_blocking,
        filter_node_name,
    };
    let id = opts.id.clone();
    daemon
        .jobs()
        .start(opts, |g| jobs::mirror(g, &id, args))
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}

fn snapshot(daemon: &Daemon, mut a: Options) -> Result<Value, QmpError> {
    let node = a.take_str("node")?;
    let node = a.required("node", node)?;
    let overlay = a.take_str("overlay")?;
    let overlay = a.required("overlay", overlay)?;
    a.finish()?;
    jobs::snapshot(daemon.graph(), &node, &overlay, daemon.open_context())
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}

fn find(daemon: &Daemon, id: &str, block: bool) -> Result<Arc<Job>, QmpError> {
    daemon.jobs().get(id).ok_or_else(|| {
        if block {
            QmpError {
                class: "DeviceNotActive",
                desc: format!("Block job '{id}' not found"),
            }
        } else {
            QmpError::generic(format!("Job '{id}' not found"))
        }
    })
}

/// A control verb on a job: block-job-* name it by `device`, job-* by `id`.
fn control(daemon: &Daemon, mut a: Options, verb: &str, block: bool) -> Result<Value, QmpError> {
    let key = if block { "device" } else { "id" };
    let id = a.take_str(key)?;
    let id = a.required(key, id)?;
    let force = if verb == "cancel" && block {
        a.take_bool("force")?.unwrap_or(false)
    } else {
        // job-cancel has no force: a ready job is cancelled without
        // completing.
        true
    };
    let speed = if verb == "set-speed" && block {
        let speed = a.take_i64("speed")?;
        Some(a.required("speed", speed)?)
    } else {
        None
    };
    a.finish()?;
    let job = find(daemon, &id, block)?;
    let res = match verb {
        "pause" => job.pause(),
        "resume" => job.resume(),
        "complete" => job.complete(),
        "finalize" => job.finalize(),
        "dismiss" => job.dismiss(),
        "cancel" => job.cancel(force),
        "set-speed" if speed.is_some() => job.set_speed(speed.unwrap_or(0)),
        _ => {
            return Err(QmpError::command_not_found(format!(
                "The command {}{verb} has not been found",
                if block { "block-job-" } else { "job-" }
            )))
        }
    };
    res.map_err(QmpError::generic)?;
    Ok(json!({}))
}
