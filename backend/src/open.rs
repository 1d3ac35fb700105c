//! Opening a disk image as graph nodes: `file`, then the format on top.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::json;
use strata_blockdev::options::Options;
use strata_formats::file::{FileNode, FileOptions};
use strata_formats::image::{self, ImageFormat};
use strata_formats::raw::{RawNode, RawOptions};
use strata_graph::{BlockDriver, NodeId};

use crate::daemon::Daemon;

/// How `serve` opens its image.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// `None` probes the format.
    pub format: Option<ImageFormat>,
    /// O_DIRECT (`cache.direct=on`).
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
}

/// Adds the nodes for `path` to the daemon's graph and returns the top one.
pub fn open_image(daemon: &Daemon, path: &Path, opts: &ImageOptions) -> anyhow::Result<NodeId> {
    let graph = daemon.graph();
    let probed = opts.format.is_none();
    let format = match opts.format {
        Some(f) => f,
        None => image::probe(path).context("cannot probe the image format")?,
    };
    if format == ImageFormat::Qcow2 {
        // The backing chain the header names is opened with it.
        let opts = json!({
            "driver": "qcow2",
            "node-name": "disk",
            "read-only": opts.read_only,
            "discard": "unmap",
            "file": {
                "driver": "file",
                "node-name": "disk-file",
                "filename": path.to_string_lossy(),
                "read-only": opts.read_only,
                "discard": "unmap",
                "cache": {"direct": opts.direct},
            },
        });
        return daemon
            .blockdev_add(Options::from_json(opts)?)
            .map_err(|e| anyhow::anyhow!("cannot open '{}': {e}", path.display()));
    }
    if probed {
        tracing::warn!(
            "the format of '{}' was probed as raw; writes that would make it look like \
             another format are refused. Pass --format raw to lift this.",
            path.display()
        );
    }
    let file_opts = FileOptions {
        filename: path.into(),
        direct: opts.direct,
        read_only: opts.read_only,
        discard: true,
        ..Default::default()
    };
    let events = daemon.open_context().events.clone();
    let file = graph.add_node("disk-file", |_| {
        FileNode::open(&file_opts)
            .map(|n| Arc::new(n.reporting_to(events, "disk-file")) as Arc<dyn BlockDriver>)
    })?;
    let raw_opts = RawOptions {
        guard_format: probed,
        ..Default::default()
    };
    let disk = graph.add_node("disk", |b| {
        RawNode::open(b, file, &raw_opts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
    })?;
    Ok(disk)
}

/// Adds the RBD image named as qemu-img names it
/// (`rbd:POOL/IMAGE[@SNAP][:OPTION=VALUE...]`) as node `disk`; `direct`
/// turns librbd's cache off, as `cache.direct=on` does.
pub fn open_rbd(
    daemon: &Daemon,
    name: &str,
    read_only: bool,
    direct: bool,
) -> anyhow::Result<NodeId> {
    let mut o = strata_formats::rbd::filename::parse(name).map_err(anyhow::Error::msg)?;
    o.read_only |= read_only;
    o.cache = !direct;
    o.discard = true;
    daemon
        .graph()
        .add_node("disk", |_| {
            strata_formats::rbd::RbdNode::open(&o).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
        })
        // GraphError already says its source: a context would say it twice.
        .map_err(|e| anyhow::anyhow!("cannot open '{name}': {e}"))
}
