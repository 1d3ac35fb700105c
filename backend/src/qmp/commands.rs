//! The QMP commands and their arguments.

use serde_json::{json, Map, Value};
use strata_blockdev::options::Options;

use crate::daemon::Daemon;
use crate::qmp::error::QmpError;
use crate::qmp::info;

/// Every command, for query-commands.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "getfd",
    "closefd",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "blockdev-reopen",
    "query-named-block-nodes",
    "x-debug-query-block-graph",
    "x-blockdev-change",
    "block-export-add",
    "block-export-del",
    "block-export-resume",
    "query-block-exports",
    "query-blockstats",
    "block-latency-histogram-set",
    "nbd-server-start",
    "nbd-server-stop",
    "object-add",
    "object-del",
    "block_resize",
    "blockdev-set-active",
];

/// Runs command `name` with `args`. (`qmp_capabilities` is the session's.)
pub fn execute(daemon: &Daemon, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = Options::from_json(Value::Object(args))?;
    let out = match name {
        "query-version" => {
            a.finish()?;
            json!({
                "qemu": {"major": 7, "minor": 2, "micro": 0},
                "package": format!("strata {}", env!("CARGO_PKG_VERSION")),
            })
        }
        "query-commands" => {
            a.finish()?;
            Value::Array(
                COMMANDS
                    .iter()
                    .chain(crate::qmp::jobs::COMMANDS)
                    .map(|c| json!({"name": c}))
                    .collect(),
            )
        }
        "quit" => {
            a.finish()?;
            daemon.request_quit();
            json!({})
        }
        "blockdev-add" => {
            daemon.blockdev_add(a)?;
            json!({})
        }
        "blockdev-del" => {
            let node = a.take_str("node-name")?;
            let node = a.required("node-name", node)?;
            a.finish()?;
            daemon.blockdev_del(&node)?;
            json!({})
        }
        "blockdev-reopen" => {
            let list = match a.take("options") {
                Some(Value::Array(list)) => list,
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'options', expected: array",
                    ))
                }
                None => return Err(QmpError::generic("Parameter 'options' is missing")),
            };
            a.finish()?;
            let list = list
                .into_iter()
                .map(Options::from_json)
                .collect::<Result<Vec<_>, _>>()?;
            daemon.blockdev_reopen(list)?;
            json!({})
        }
        "query-named-block-nodes" => {
            a.take_bool("flat")?;
            a.finish()?;
            info::named_block_nodes(&daemon.graph().view())
        }
        "x-debug-query-block-graph" => {
            a.finish()?;
            info::block_graph(&daemon.graph().view())
        }
        "x-blockdev-change" => {
            let parent = a.take_str("parent")?;
            let parent = a.required("parent", parent)?;
            let child = a.take_str("child")?;
            let node = a.take_str("node")?;
            a.finish()?;
            daemon.blockdev_change(&parent, child.as_deref(), node.as_deref())?;
            json!({})
        }
        "block-export-add" => {
            let spec = Daemon::export_spec(&mut a)?;
            a.finish()?;
            daemon.add_export(spec)?;
            json!({})
        }
        "block-export-del" => {
            let id = a.take_str("id")?;
            let id = a.required("id", id)?;
            let hard = a
                .take_enum("mode", &["safe", "hard"])?
                .is_some_and(|m| m == "hard");
            a.finish()?;
            daemon.export_del(&id, hard)?;
            json!({})
        }
        "block-export-resume" => {
            let id = a.take_str("id")?;
            let id = a.required("id", id)?;
            a.finish()?;
            daemon.export_resume(&id)?;
            json!({})
        }
        "nbd-server-start" => {
            let opts = Daemon::nbd_server_spec(&mut a)?;
            a.finish()?;
            daemon.nbd_server_start(opts)?;
            json!({})
        }
        "nbd-server-stop" => {
            a.finish()?;
            daemon.nbd_server_stop()?;
            json!({})
        }
        "query-block-exports" => {
            a.finish()?;
            daemon.exports_info()
        }
        "query-blockstats" => {
            let nodes = a.take_bool("query-nodes")?.unwrap_or(false);
            a.finish()?;
            daemon.blockstats(nodes)
        }
        "block-latency-histogram-set" => {
            let id = a.take_str("id")?;
            let id = a.required("id", id)?;
            let all = a.take_u64_list("boundaries")?;
            let given = [
                ("boundaries-read", a.take_u64_list("boundaries-read")?),
                ("boundaries-write", a.take_u64_list("boundaries-write")?),
                ("boundaries-flush", a.take_u64_list("boundaries-flush")?),
            ];
            // Zone appends: there are none to count.
            let zap = a.take_u64_list("boundaries-zap")?;
            a.finish()?;
            daemon.latency_histogram_set(&id, all, given, zap.is_some())?;
            json!({})
        }
        "object-add" => {
            daemon.object_add(&mut a)?;
            a.finish()?;
            json!({})
        }
        "blockdev-set-active" => {
            let node = a.take_str("node-name")?;
            let active = a.take_bool("active")?;
            let active = a.required("active", active)?;
            a.finish()?;
            daemon.blockdev_set_active(node.as_deref(), active)?;
            json!({})
        }
        "block_resize" => {
            let device = a.take_str("device")?;
            let node = a.take_str("node-name")?;
            let size = a.take_i64("size")?;
            let size = a.required("size", size)?;
            a.finish()?;
            daemon.block_resize(device.as_deref(), node.as_deref(), size)?;
            json!({})
        }
        "object-del" => {
            let id = a.take_str("id")?;
            let id = a.required("id", id)?;
            a.finish()?;
            daemon.object_del(&id)?;
            json!({})
        }
        other => match crate::qmp::jobs::execute(daemon, other, a) {
            Some(res) => res?,
            None => {
                return Err(QmpError::command_not_found(format!(
                    "The command {other} has not been found"
                )))
            }
        },
    };
    Ok(out)
}
