//! `strata job`: starts jobs on a running daemon through its QMP monitor
//! and follows them with a progress bar (throughput and ETA), or with one
//! JSON result for scripts. A failed or cancelled job is an error.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::cli::{CreateArgs, JobAction, JobArgs, JobCommon};
use crate::qmp::client::QmpClient;

/// Runs `strata job`.
pub fn run(args: JobArgs) -> anyhow::Result<()> {
    let mut c = QmpClient::connect(&args.qmp)?;
    let json_out = args.json;
    match args.action {
        JobAction::Snapshot {
            node,
            overlay,
            overlay_node,
        } => {
            let name = snapshot(&mut c, &node, &overlay, overlay_node)?;
            report(json_out, json!({"node": node, "overlay": name}), || {
                format!("'{name}' ({}) is now above '{node}'", overlay.display())
            });
            Ok(())
        }
        JobAction::Stream {
            device,
            base_node,
            bottom,
            backing_file,
            common,
        } => {
            let mut a = job_args(&common, "stream", &device);
            put(&mut a, "base-node", base_node);
            put(&mut a, "bottom", bottom);
            put(&mut a, "backing-file", backing_file);
            start(&mut c, "block-stream", a, &common, false, json_out)
        }
        JobAction::Commit {
            device,
            top_node,
            base_node,
            backing_file,
            no_complete,
            common,
        } => {
            let mut a = job_args(&common, "commit", &device);
            put(&mut a, "top-node", top_node);
            put(&mut a, "base-node", base_node);
            put(&mut a, "backing-file", backing_file);
            start(&mut c, "block-commit", a, &common, !no_complete, json_out)
        }
        JobAction::Mirror {
            device,
            target,
            sync,
            granularity,
            buf_size,
            copy_mode,
            no_complete,
            common,
        } => {
            let mut a = job_args(&common, "mirror", &device);
            if let Some(o) = a.as_object_mut() {
                o.remove("on-error");
            }
            a["on-source-error"] = json!(common.on_error);
            a["on-target-error"] = json!(common.on_error);
            a["target"] = json!(target);
            a["sync"] = json!(sync);
            a["copy-mode"] = json!(copy_mode);
            if let Some(g) = granularity {
                a["granularity"] = json!(g);
            }
            if let Some(b) = buf_size {
                a["buf-size"] = json!(b);
            }
            start(
                &mut c,
                "blockdev-mirror",
                a,
                &common,
                !no_complete,
                json_out,
            )
        }
        JobAction::Resize { node, size } => {
            let bytes = resize_target(&mut c, &node, &size)?;
            c.run("block_resize", json!({"node-name": node, "size": bytes}))?;
            report(json_out, json!({"node": node, "size": bytes}), || {
                format!("'{node}' is now {bytes} bytes")
            });
            Ok(())
        }
        JobAction::List => {
            let jobs = c.run("query-block-jobs", json!({}))?;
            if json_out {
                println!("{jobs}");
                return Ok(());
            }
            println!(
                "{:<20} {:<8} {:<10} {:>7}  SPEED",
                "ID", "TYPE", "STATUS", "DONE"
            );
            for j in jobs.as_array().into_iter().flatten() {
                let (off, len) = (u64_of(j, "offset"), u64_of(j, "len"));
                println!(
                    "{:<20} {:<8} {:<10} {:>6.1}%  {}",
                    str_of(j, "device"),
                    str_of(j, "type"),
                    str_of(j, "status"),
                    if len == 0 {
                        0.0
                    } else {
                        off as f64 * 100.0 / len as f64
                    },
                    u64_of(j, "speed")
                );
            }
            Ok(())
        }
        JobAction::Wait { job } => watch(&mut c, &job, false, json_out),
        JobAction::Pause { job } => control(&mut c, "block-job-pause", &job, json!({}), json_out),
        JobAction::Resume { job } => control(&mut c, "block-job-resume", &job, json!({}), json_out),
        JobAction::Complete { job } => {
            control(&mut c, "block-job-complete", &job, json!({}), json_out)
        }
        JobAction::Cancel { job, force } => control(
            &mut c,
            "block-job-cancel",
            &job,
            json!({"force": force}),
            json_out,
        ),
    }
}

/// The size `spec` asks for: absolute, or `+N` more than `node` has now.
fn resize_target(c: &mut QmpClient, node: &str, spec: &str) -> anyhow::Result<u64> {
    let (relative, s) = match spec.strip_prefix('+') {
        Some(s) => (true, s),
        None => (false, spec),
    };
    let n = strata_blockdev::options::parse_size(s)
        .ok_or_else(|| anyhow!("'{spec}' is not a size (as 20G, 512M or +1G)"))?;
    if !relative {
        return Ok(n);
    }
    let nodes = c.run("query-named-block-nodes", json!({}))?;
    let now = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| str_of(v, "node-name") == node)
        .and_then(|v| v["image"]["virtual-size"].as_u64())
        .ok_or_else(|| anyhow!("no node '{node}' on this daemon"))?;
    now.checked_add(n)
        .ok_or_else(|| anyhow!("'{node}' cannot grow by {spec}"))
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn u64_of(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn report(json_out: bool, v: Value, human: impl FnOnce() -> String) {
    if json_out {
        println!("{v}");
    } else {
        println!("{}", human());
    }
}

fn put(a: &mut Value, key: &str, v: Option<String>) {
    if let Some(v) = v {
        a[key] = json!(v);
    }
}

fn job_args(common: &JobCommon, kind: &str, device: &str) -> Value {
    json!({
        "job-id": common.job_id.clone().unwrap_or_else(|| format!("{kind}-{device}")),
        "device": device,
        "speed": common.speed,
        "on-error": common.on_error,
    })
}

fn control(
    c: &mut QmpClient,
    cmd: &str,
    job: &str,
    mut a: Value,
    json_out: bool,
) -> anyhow::Result<()> {
    a["device"] = json!(job);
    c.run(cmd, a)?;
    report(json_out, json!({"job": job, "done": cmd}), || {
        format!("{cmd} {job}: done")
    });
    Ok(())
}

fn start(
    c: &mut QmpClient,
    cmd: &str,
    a: Value,
    common: &JobCommon,
    complete_when_ready: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    let id = str_of(&a, "job-id").to_string();
    c.run(cmd, a)?;
    if common.no_wait {
        report(json_out, json!({"job": id, "status": "started"}), || {
            format!("job '{id}' started")
        });
        return Ok(());
    }
    watch(c, &id, complete_when_ready, json_out)
}

/// Follows job `id` until it ends; completes it when it becomes ready if
/// asked to.
fn watch(
    c: &mut QmpClient,
    id: &str,
    complete_when_ready: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    // Drawn once the job's length is known (the first query).
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:<24} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{id}: starting"));
    let mine = |ev: &Value| ev["data"]["device"] == json!(id) || ev["data"]["id"] == json!(id);
    loop {
        let until = std::time::Instant::now() + Duration::from_millis(200);
        while let Some(ev) = c.event(until.saturating_duration_since(std::time::Instant::now()))? {
            if !mine(&ev) {
                continue;
            }
            let data = &ev["data"];
            match str_of(&ev, "event") {
                "BLOCK_JOB_READY" if complete_when_ready => {
                    bar.set_message(format!("{id}: completing"));
                    c.run("block-job-complete", json!({"device": id}))?;
                }
                "BLOCK_JOB_READY" => {
                    bar.abandon_with_message(format!("{id}: ready"));
                    report(json_out, json!({"job": id, "status": "ready"}), || {
                        format!(
                            "job '{id}' is ready: `strata job complete {id}` switches the disk over"
                        )
                    });
                    return Ok(());
                }
                "BLOCK_JOB_ERROR" => bar.println(format!(
                    "{id}: {} error, action {}",
                    str_of(data, "operation"),
                    str_of(data, "action")
                )),
                "BLOCK_JOB_COMPLETED" => {
                    let (off, len) = (u64_of(data, "offset"), u64_of(data, "len"));
                    if let Some(e) = data.get("error").and_then(Value::as_str) {
                        bar.abandon_with_message(format!("{id}: failed"));
                        report(
                            json_out,
                            json!({"job": id, "status": "failed", "error": e,
                                                "offset": off, "len": len}),
                            String::new,
                        );
                        bail!("job '{id}' failed: {e}");
                    }
                    bar.set_length(len);
                    bar.set_position(off);
                    bar.finish_with_message(format!("{id}: completed"));
                    report(
                        json_out,
                        json!({"job": id, "status": "completed", "offset": off,
                                            "len": len}),
                        || format!("job '{id}' completed"),
                    );
                    return Ok(());
                }
                "BLOCK_JOB_CANCELLED" => {
                    bar.abandon_with_message(format!("{id}: cancelled"));
                    report(
                        json_out,
                        json!({"job": id, "status": "cancelled"}),
                        String::new,
                    );
                    bail!("job '{id}' was cancelled");
                }
                _ => {}
            }
        }
        let jobs = c.run("query-block-jobs", json!({}))?;
        let Some(j) = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| str_of(j, "device") == id)
            .cloned()
        else {
            bail!("job '{id}' is not running (it may have ended before it was watched)");
        };
        bar.set_length(u64_of(&j, "len"));
        bar.set_position(u64_of(&j, "offset"));
        if bar.is_hidden() && !json_out {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_message(format!("{id}: {}", str_of(&j, "status")));
        if str_of(&j, "status") == "concluded" {
            // auto-dismiss off: the events went by already.
            match j.get("error").and_then(Value::as_str) {
                Some(e) => bail!("job '{id}' failed: {e}"),
                None => return Ok(()),
            }
        }
    }
}

/// Creates the overlay file, adds it as a node and snapshots `node` onto
/// it. Returns the overlay's node name.
fn snapshot(
    c: &mut QmpClient,
    node: &str,
    overlay: &Path,
    overlay_node: Option<String>,
) -> anyhow::Result<String> {
    let nodes = c.run("query-named-block-nodes", json!({}))?;
    let n = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| str_of(n, "node-name") == node)
        .ok_or_else(|| anyhow!("no node named '{node}'"))?;
    let backing = str_of(n, "file").to_string();
    let format = str_of(n, "drv").to_string();
    if overlay.exists() {
        bail!(
            "{} exists already: snapshot creates a new overlay",
            overlay.display()
        );
    }
    let name = match overlay_node {
        Some(n) => n,
        None => overlay
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| s.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-"))
            .filter(|s| s.starts_with(|c: char| c.is_ascii_alphabetic()))
            .ok_or_else(|| anyhow!("give --overlay-node: the file name is no node name"))?,
    };
    crate::img::create(CreateArgs {
        format: "qcow2".into(),
        backing: Some(backing),
        backing_format: Some(format),
        options: Vec::new(),
        quiet: true,
        file: overlay.to_path_buf(),
        size: None,
    })
    .with_context(|| format!("creating {}", overlay.display()))?;
    let filename = std::fs::canonicalize(overlay)?;
    let added = c.run(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": name, "backing": null,
               "file": {"driver": "file", "filename": filename}}),
    );
    if let Err(e) =
        added.and_then(|_| c.run("blockdev-snapshot", json!({"node": node, "overlay": name})))
    {
        let _ = c.execute("blockdev-del", json!({"node-name": name}));
        let _ = std::fs::remove_file(overlay);
        return Err(e);
    }
    Ok(name)
}
