//! The daemon's state: one block graph, its exports, throttle groups and
//! the event bus, with the operations QMP and the command line perform.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use strata_blockdev::options::Options;
use strata_blockdev::{self as blockdev, OpenContext};
use strata_formats::throttle::group::ThrottleGroups;
use strata_graph::{EventSink, Graph, NodeId};
use strata_jobs::job::Jobs;
use strata_runtime::reactor::block_on;

use crate::events::EventBus;
use crate::export::{Export, ExportOptions};
use crate::nbd::{NbdExport, NbdExportOptions, NbdServer, ServerOptions, ServerTls};
use crate::on_error::OnError;
use crate::qmp::error::QmpError;
use crate::serve::RunningExport;
use crate::socket::ListenOn;

/// A running Strata daemon.
pub struct Daemon {
    graph: Graph,
    ctx: OpenContext,
    events: Arc<EventBus>,
    jobs: Jobs,
    exports: Mutex<BTreeMap<String, Running>>,
    /// The NBD server, while one runs.
    nbd: Mutex<Option<Arc<NbdServer>>>,
    /// iothread objects by id, with their `poll-max-ns`.
    iothreads: Mutex<BTreeMap<String, u64>>,
    quit: (Mutex<bool>, Condvar),
    /// Permissions of the sockets it creates.
    socket_mode: AtomicU32,
}

/// A block export being served.
enum Running {
    VhostUser(RunningExport),
    Nbd(Arc<NbdExport>),
}

impl Running {
    fn info(&self) -> Value {
        match self {
            Running::VhostUser(r) => {
                let e = r.export();
                json!({
                    "type": "vhost-user-blk",
                    "id": e.options().id,
                    "node-name": e.node_name(),
                    "shutting-down": false,
                    "io-status": e.error_hold().status().name(),
                    "held-requests": e.error_hold().held(),
                })
            }
            Running::Nbd(e) => json!({
                "type": "nbd",
                "id": e.options().id,
                "node-name": e.node_name(),
                "shutting-down": false,
            }),
        }
    }

    /// The export's type (as `block-export-add` names it), node and
    /// counters.
    fn counted(&self) -> (&'static str, String, &crate::io_stats::ExportStats) {
        match self {
            Running::VhostUser(r) => (
                "vhost-user-blk",
                r.export().node_name(),
                r.export().io_stats(),
            ),
            Running::Nbd(e) => ("nbd", e.node_name(), e.io_stats()),
        }
    }
}

/// One export's counters, per queue (vhost-user) or summed over its
/// connections (NBD), for the metrics endpoint.
pub struct ExportSample {
    /// The export's id.
    pub id: String,
    /// `vhost-user-blk` or `nbd`.
    pub kind: &'static str,
    /// The node it exports.
    pub node: String,
    /// Per queue.
    pub queues: Vec<crate::io_stats::Totals>,
}

/// One node's monitoring figures.
pub struct NodeSample {
    /// Its node name.
    pub name: String,
    /// Its driver.
    pub driver: &'static str,
    /// Its size in bytes, if it can tell.
    pub size: Option<u64>,
    /// What the driver reports.
    pub stats: strata_graph::NodeStats,
}

/// What block-export-add or `--export` asks for.
pub enum NewExport {
    /// A vhost-user-blk device.
    VhostUser(ExportSpec),
    /// A node offered by the NBD server.
    Nbd {
        /// The node's name.
        node: String,
        /// How it is offered.
        opts: NbdExportOptions,
    },
}

impl NewExport {
    /// The unix socket a vhost-user export listens on.
    pub fn socket_path(&self) -> Option<&std::path::Path> {
        match self {
            NewExport::VhostUser(s) => s.listen.path(),
            NewExport::Nbd { .. } => None,
        }
    }
}

/// An export to add: where to serve which node, and how.
pub struct ExportSpec {
    /// The node's name.
    pub node: String,
    /// The vhost-user socket.
    pub listen: crate::socket::ListenOn,
    /// How to present the node.
    pub opts: ExportOptions,
    /// The iothread object whose polling settings the queues take.
    pub iothread: Option<String>,
}

impl Daemon {
    /// A daemon with an empty graph.
    pub fn new() -> Arc<Daemon> {
        let events = Arc::new(EventBus::default());
        let graph = Graph::new();
        Arc::new(Daemon {
            jobs: Jobs::new(graph.clone(), events.clone()),
            graph,
            ctx: OpenContext {
                tls: Default::default(),
                secrets: Default::default(),
                throttle_groups: ThrottleGroups::default(),
                events: events.clone(),
            },
            events,
            exports: Mutex::new(BTreeMap::new()),
            nbd: Mutex::new(None),
            iothreads: Mutex::new(BTreeMap::new()),
            quit: (Mutex::new(false), Condvar::new()),
            socket_mode: AtomicU32::new(crate::socket::DEFAULT_MODE),
        })
    }

    /// Sets the permissions of the sockets created from now on.
    pub fn set_socket_mode(&self, mode: u32) {
        self.socket_mode.store(mode, Ordering::Relaxed);
    }

    /// The permissions sockets are created with.
    pub fn socket_mode(&self) -> u32 {
        self.socket_mode.load(Ordering::Relaxed)
    }

    /// The block graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The event bus.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    /// The block jobs.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// What opening nodes needs.
    pub fn open_context(&self) -> &OpenContext {
        &self.ctx
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// blockdev-add.
    pub fn blockdev_add(&self, opts: Options) -> Result<NodeId, QmpError> {
        let mut tx = self.graph.transaction();
        let id = blockdev::add(&mut tx, opts, &self.ctx)?;
        tx.commit()?;
        Ok(id)
    }

    /// blockdev-del: deletes a node added by blockdev-add that nothing uses,
    /// with the children created inline for it.
    pub fn blockdev_del(&self, name: &str) -> Result<(), QmpError> {
        let mut tx = self.graph.transaction();
        let id = tx.view().find(name).ok_or_else(|| {
            QmpError::device_not_found(format!("Failed to find node with node-name='{name}'"))
        })?;
        if !tx.view().node(id).expect("found above").monitor_owned() {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        tx.delete_node(id)?;
        tx.commit()?;
        Ok(())
    }

    /// blockdev-reopen: all of `list` in one transaction.
    pub fn blockdev_reopen(&self, list: Vec<Options>) -> Result<(), QmpError> {
        let mut tx = self.graph.transaction();
        for opts in list {
            blockdev::reopen(&mut tx, opts, &self.ctx)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// x-blockdev-change: adds `node` to quorum `parent`, or removes its
    /// child in role `child`.
    pub fn blockdev_change(
        &self,
        parent: &str,
        child: Option<&str>,
        node: Option<&str>,
    ) -> Result<(), QmpError> {
        if child.is_some() == node.is_some() {
            return Err(QmpError::generic(
                "Exactly one of 'child' and 'node' must be given",
            ));
        }
        let mut tx = self.graph.transaction();
        blockdev::change_quorum(&mut tx, parent, node, child, &self.ctx)?;
        tx.commit()?;
        Ok(())
    }

    /// Parses block-export-add / --export options.
    pub fn export_spec(o: &mut Options) -> Result<NewExport, QmpError> {
        let ty = o.take_enum("type", &["vhost-user-blk", "nbd"])?;
        let ty = o.required("type", ty)?;
        let id = o.take_str("id")?;
        let id = o.required("id", id)?;
        let node = o.take_str("node-name")?;
        let node = o.required("node-name", node)?;
        let writable = o.take_bool("writable")?.unwrap_or(false);
        let writethrough = o.take_bool("writethrough")?.unwrap_or(false);
        let stats_intervals = o.take_u64_list("stats-intervals")?.unwrap_or_default();
        crate::io_stats::timed::check_intervals(&stats_intervals).map_err(QmpError::generic)?;
        if ty == "nbd" {
            // Requests run on the connections' threads.
            o.take_str("iothread")?;
            o.take_bool("fixed-iothread")?;
            if o.has("bitmaps") {
                return Err(QmpError::generic(
                    "NBD export 'bitmaps' is not supported: Strata has no dirty bitmaps",
                ));
            }
            if writethrough {
                return Err(QmpError::generic(
                    "writethrough is not supported for NBD exports: clients ask for FUA",
                ));
            }
            let name = o.take_str("name")?.unwrap_or_else(|| node.clone());
            let description = o.take_str("description")?;
            let allocation_depth = o.take_bool("allocation-depth")?.unwrap_or(false);
            return Ok(NewExport::Nbd {
                node,
                opts: NbdExportOptions {
                    id,
                    name,
                    description,
                    writable,
                    allocation_depth,
                    stats_intervals,
                },
            });
        }
        let addr = o.take_group("addr")?;
        let mut addr = o.required("addr", addr)?;
        let kind = addr.take_enum("type", &["unix", "fd"])?;
        let kind = addr.required("type", kind)?;
        if let Some(data) = addr.take_group("data")? {
            addr = data;
        }
        let listen = if kind == "fd" {
            let s = addr.take_str("str")?;
            ListenOn::Fd(addr.required("str", s)?)
        } else {
            let path = addr.take_str("path")?;
            let path = addr.required("path", path)?;
            // QEMU's abstract-namespace flags: only the default is supported.
            if addr.take_bool("abstract")? == Some(true) {
                return Err(QmpError::generic("abstract unix sockets are not supported"));
            }
            addr.take_bool("tight")?;
            ListenOn::Path(path.into())
        };
        addr.finish()?;
        let num_queues = o.take_u64("num-queues")?.unwrap_or(1);
        let logical_block_size = o.take_size("logical-block-size")?.unwrap_or(512);
        // Every queue has its own thread; an iothread only lends its
        // polling settings.
        let iothread = o.take_str("iothread")?;
        o.take_bool("fixed-iothread")?;
        let serial = o.take_str("serial")?;
        let stop_timeout = o
            .take_u64("x-stop-timeout-ms")?
            .map_or(crate::export::DEFAULT_STOP_TIMEOUT, Duration::from_millis);
        let on_error = o
            .take_enum("on-error", OnError::NAMES)?
            .and_then(|s| OnError::parse(&s))
            .unwrap_or_default();
        Ok(NewExport::VhostUser(ExportSpec {
            node,
            listen,
            opts: ExportOptions {
                id,
                num_queues: u16::try_from(num_queues).unwrap_or(u16::MAX),
                read_only: !writable,
                serial,
                writeback: !writethrough,
                logical_block_size: u32::try_from(logical_block_size).unwrap_or(u32::MAX),
                poll_max_ns: crate::export::DEFAULT_POLL_MAX_NS,
                stop_timeout,
                on_error,
                stats_intervals,
            },
            iothread,
        }))
    }

    /// block-export-add of any type.
    pub fn add_export(&self, spec: NewExport) -> Result<(), QmpError> {
        match spec {
            NewExport::VhostUser(s) => self.export_add(s),
            NewExport::Nbd { node, opts } => self.nbd_export_add(&node, opts),
        }
    }

    fn find_node(&self, name: &str) -> Result<NodeId, QmpError> {
        self.graph.view().find(name).ok_or_else(|| {
            QmpError::device_not_found(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    /// block-export-add type=nbd: offers `node` on the running NBD server.
    fn nbd_export_add(&self, node: &str, opts: NbdExportOptions) -> Result<(), QmpError> {
        let server = self
            .nbd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                QmpError::generic(
                    "NBD server not running (start it with nbd-server-start or --nbd-server)",
                )
            })?;
        let mut exports = self.exports();
        if exports.contains_key(&opts.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                opts.id
            )));
        }
        let node = self.find_node(node)?;
        let id = opts.id.clone();
        let export = NbdExport::new(&self.graph, node, opts)?;
        if let Err(e) = server.add(Arc::clone(&export)) {
            if let Err(d) = export.detach() {
                tracing::error!("export '{id}': cannot detach after a failed start: {d}");
            }
            return Err(QmpError::generic(e));
        }
        tracing::info!(
            "NBD export '{id}': node '{}' as '{}'",
            export.node_name(),
            export.options().name
        );
        exports.insert(id, Running::Nbd(export));
        Ok(())
    }

    /// Parses nbd-server-start / --nbd-server options. QMP's legacy
    /// address form (`{"type": "unix", "data": {...}}`) is taken too.
    pub fn nbd_server_spec(o: &mut Options) -> Result<ServerOptions, QmpError> {
        let addr = strata_blockdev::socket_address::take_socket_address(o, "addr")?;
        let tls_creds = o.take_str("tls-creds")?;
        let tls_authz = o.take_str("tls-authz")?;
        if tls_authz.is_some() && tls_creds.is_none() {
            return Err(QmpError::generic(
                "'tls-authz' is only valid with 'tls-creds'",
            ));
        }
        let max_connections = o.take_u64("max-connections")?.unwrap_or(0);
        let max_connections = u32::try_from(max_connections).map_err(|_| {
            QmpError::generic(format!("max-connections {max_connections} is too large"))
        })?;
        Ok(ServerOptions {
            addr,
            max_connections,
            tls_creds,
            tls_authz,
        })
    }

    /// nbd-server-start.
    pub fn nbd_server_start(&self, opts: ServerOptions) -> Result<(), QmpError> {
        let mut nbd = self.nbd.lock().unwrap_or_else(|e| e.into_inner());
        if nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let tls = match &opts.tls_creds {
            Some(id) => {
                let config = self.ctx.tls.creds(id).and_then(|c| c.server());
                let authz = opts.tls_authz.as_deref().map(|a| self.ctx.tls.authz(a));
                Some(ServerTls {
                    config: config.map_err(QmpError::generic)?,
                    authz: authz.transpose().map_err(QmpError::generic)?,
                })
            }
            None => None,
        };
        let server = NbdServer::start(opts, tls, self.socket_mode())
            .map_err(|e| QmpError::generic(format!("{e:#}")))?;
        *nbd = Some(Arc::new(server));
        Ok(())
    }

    /// nbd-server-stop: stops the server and removes its exports.
    pub fn nbd_server_stop(&self) -> Result<(), QmpError> {
        let server = self
            .nbd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        server.stop();
        let removed: Vec<(String, Running)> = {
            let mut exports = self.exports();
            let ids: Vec<String> = exports
                .iter()
                .filter(|(_, r)| matches!(r, Running::Nbd(_)))
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| exports.remove(&id).map(|r| (id, r)))
                .collect()
        };
        for (id, r) in removed {
            if let Running::Nbd(e) = r {
                if let Err(err) = e.detach() {
                    tracing::error!("NBD export '{id}': cannot detach: {err}");
                }
                self.events.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
            }
        }
        Ok(())
    }

    /// block-export-add of a vhost-user-blk export.
    pub fn export_add(&self, mut spec: ExportSpec) -> Result<(), QmpError> {
        if let Some(t) = &spec.iothread {
            let iothreads = self.iothreads.lock().unwrap_or_else(|e| e.into_inner());
            spec.opts.poll_max_ns = *iothreads
                .get(t)
                .ok_or_else(|| QmpError::generic(format!("Cannot find iothread '{t}'")))?;
        }
        let mut exports = self.exports();
        if exports.contains_key(&spec.opts.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                spec.opts.id
            )));
        }
        let node = self.graph.view().find(&spec.node).ok_or_else(|| {
            QmpError::device_not_found(format!(
                "Cannot find device='{0}' nor node-name='{0}'",
                spec.node
            ))
        })?;
        let id = spec.opts.id.clone();
        let events = Arc::clone(&self.events) as Arc<dyn strata_graph::EventSink>;
        let export = Export::new(&self.graph, node, spec.opts, events)?;
        match RunningExport::start(Arc::clone(&export), &spec.listen, self.socket_mode()) {
            Ok(running) => {
                exports.insert(id, Running::VhostUser(running));
                Ok(())
            }
            Err(e) => {
                if let Err(d) = export.detach() {
                    tracing::error!("export '{id}': cannot detach after a failed start: {d}");
                }
                Err(QmpError::generic(format!("{e:#}")))
            }
        }
    }

    /// block-export-del. A connected frontend or NBD client makes it fail
    /// unless `hard`, which disconnects it.
    pub fn export_del(&self, id: &str, hard: bool) -> Result<(), QmpError> {
        let running = {
            let mut exports = self.exports();
            let running = exports
                .get(id)
                .ok_or_else(|| QmpError::generic(format!("Export '{id}' is not found")))?;
            match running {
                Running::VhostUser(r) if r.export().connected() && !hard => {
                    return Err(QmpError::generic(format!(
                        "export '{id}' still in use (use mode=hard to disconnect its client)"
                    )));
                }
                Running::Nbd(_) => {
                    let server = self.nbd.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(server) = server {
                        server.remove(id, hard).map_err(QmpError::generic)?;
                    }
                }
                Running::VhostUser(_) => {}
            }
            exports.remove(id).expect("present above")
        };
        match running {
            Running::VhostUser(running) => {
                let export = Arc::clone(running.export());
                running.stop();
                export.detach()?;
            }
            Running::Nbd(export) => export.detach()?,
        }
        self.events.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
        Ok(())
    }

    /// The host files the graph's nodes name (`filename`).
    pub fn image_paths(&self) -> Vec<PathBuf> {
        let v = self.graph.view();
        v.nodes()
            .filter_map(|(_, n)| n.options().get("filename")?.as_str().map(PathBuf::from))
            .collect()
    }

    /// blockdev-set-active: activates or inactivates the node named
    /// `node` with the nodes below it, or, without a name, every node.
    pub fn blockdev_set_active(&self, node: Option<&str>, active: bool) -> Result<(), QmpError> {
        let v = self.graph.view();
        let tops: Vec<NodeId> = match node {
            Some(name) => vec![v.find(name).ok_or_else(|| {
                QmpError::device_not_found(format!("Failed to find node with node-name='{name}'"))
            })?],
            // Every node no other node has as a child: their subtrees
            // cover the graph.
            None => v
                .nodes()
                .filter(|(id, _)| {
                    !v.parents(*id)
                        .any(|(_, s)| matches!(s.parent(), strata_graph::Parent::Node(_)))
                })
                .map(|(id, _)| id)
                .collect(),
        };
        for id in tops {
            blockdev::set_active(&self.graph, id, active, &self.ctx)?;
        }
        Ok(())
    }

    /// block_resize: grows the node named `node` (or `device`) to `size`
    /// bytes, and tells the frontend of every export whose disk grew.
    pub fn block_resize(
        &self,
        device: Option<&str>,
        node: Option<&str>,
        size: i64,
    ) -> Result<(), QmpError> {
        let name = match (device, node) {
            (_, Some(n)) | (Some(n), None) => n,
            (None, None) => {
                return Err(QmpError::generic(
                    "block_resize needs 'node-name' (or 'device')",
                ))
            }
        };
        let size = u64::try_from(size)
            .map_err(|_| QmpError::generic("Parameter 'size' expects a >0 size"))?;
        let id = self.graph.view().find(name).ok_or_else(|| {
            QmpError::device_not_found(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.unwrap_or(""),
                node.unwrap_or("")
            ))
        })?;
        crate::resize::grow(&self.graph, id, size)?;
        for r in self.exports().values() {
            // NBD clients learn the size when they connect.
            let Running::VhostUser(r) = r else {
                continue;
            };
            if let Err(e) = r.export().refresh_capacity() {
                tracing::error!(
                    "export '{}': cannot read its size after block_resize: {e}",
                    r.export().options().id
                );
            }
        }
        Ok(())
    }

    /// block-export-resume: retries the export's requests held on error.
    pub fn export_resume(&self, id: &str) -> Result<(), QmpError> {
        let exports = self.exports();
        match exports.get(id) {
            Some(Running::VhostUser(r)) => r.export().resume_held(),
            // An NBD export answers every failure at once: nothing is held.
            Some(Running::Nbd(_)) => {}
            None => return Err(QmpError::generic(format!("Export '{id}' is not found"))),
        }
        Ok(())
    }

    /// query-blockstats. Without `query_nodes`, one entry per export
    /// (named `device` by its id, as QEMU names a device's backend); with it, one per named node, whose counts are
    /// those of the exports it is the root of (the guests' requests enter
    /// the graph there).
    pub fn blockstats(&self, query_nodes: bool) -> Value {
        let exports: Vec<(String, String, crate::io_stats::Totals)> = self
            .exports()
            .iter()
            .map(|(id, r)| {
                let (_, node, stats) = r.counted();
                (id.clone(), node, stats.totals())
            })
            .collect();
        if !query_nodes {
            return exports
                .iter()
                .map(|(id, node, t)| json!({"device": id, "node-name": node, "stats": t.to_json()}))
                .collect();
        }
        let v = self.graph.view();
        v.nodes()
            .map(|(_, n)| {
                let mut t = crate::io_stats::Totals::default();
                for (_, _, e) in exports.iter().filter(|(_, node, _)| node == n.name()) {
                    t.merge(e);
                }
                json!({"node-name": n.name(), "stats": t.to_json()})
            })
            .collect()
    }

    /// block-latency-histogram-set on export `id`: `all` and each kind's
    /// own boundaries (the kind's win), as QEMU takes them; with none at
    /// all, every histogram goes.
    pub fn latency_histogram_set(
        &self,
        id: &str,
        all: Option<Vec<u64>>,
        per_kind: [(&'static str, Option<Vec<u64>>); 3],
        any_other: bool,
    ) -> Result<(), QmpError> {
        use crate::io_stats::HistogramChange;
        let exports = self.exports();
        let Some((_, _, stats)) = exports.get(id).map(Running::counted) else {
            return Err(QmpError::device_not_found(format!(
                "Device '{id}' not found"
            )));
        };
        let none_given = all.is_none() && !any_other && per_kind.iter().all(|(_, b)| b.is_none());
        let names = per_kind
            .each_ref()
            .map(|(key, own)| if own.is_some() { *key } else { "boundaries" });
        let changes = per_kind.map(|(_, own)| match own.or_else(|| all.clone()) {
            Some(b) => HistogramChange::Set(b),
            None if none_given => HistogramChange::Remove,
            None => HistogramChange::Keep,
        });
        stats
            .set_histograms(&changes)
            .map_err(|(i, e)| QmpError::generic(format!("Parameter '{}': {e}", names[i])))
    }

    /// Every export's counters, for the metrics endpoint.
    pub fn export_samples(&self) -> Vec<ExportSample> {
        self.exports()
            .iter()
            .map(|(id, r)| {
                let (kind, node, stats) = r.counted();
                let queues = match r {
                    Running::VhostUser(_) => stats.per_queue(),
                    // Connections come and go; their sum only grows.
                    Running::Nbd(_) => vec![stats.totals()],
                };
                ExportSample {
                    id: id.clone(),
                    kind,
                    node,
                    queues,
                }
            })
            .collect()
    }

    /// Every named node's figures, for the metrics endpoint.
    pub fn node_samples(&self) -> Vec<NodeSample> {
        let v = self.graph.view();
        v.nodes()
            .map(|(_, n)| NodeSample {
                name: n.name().to_owned(),
                driver: n.driver().driver_name(),
                size: n.driver().size(&v).ok(),
                stats: n.driver().stats(&v),
            })
            .collect()
    }

    /// query-block-exports.
    pub fn exports_info(&self) -> Value {
        Value::Array(self.exports().values().map(Running::info).collect())
    }

    /// object-add / --object: throttle groups (and iothreads, which have
    /// nothing to do here).
    pub fn object_add(&self, o: &mut Options) -> Result<(), QmpError> {
        let ty = o.take_str("qom-type")?;
        let ty = o.required("qom-type", ty)?;
        let id = o.take_str("id")?;
        let id = o.required("id", id)?;
        if self.ctx.tls.add(&ty, &id, o)? {
            return Ok(());
        }
        match ty.as_str() {
            "throttle-group" => {
                let limits = strata_blockdev::throttle::throttle_limits(o)?;
                self.ctx
                    .throttle_groups
                    .add(&id, limits)
                    .map_err(QmpError::generic)?;
            }
            "secret" => self.ctx.secrets.add(&id, o)?,
            "iothread" => {
                let poll = o
                    .take_u64("poll-max-ns")?
                    .unwrap_or(crate::export::DEFAULT_POLL_MAX_NS);
                // The window grows and shrinks by its own rule.
                for key in ["poll-grow", "poll-shrink", "aio-max-batch"] {
                    o.take_u64(key)?;
                }
                let mut iothreads = self.iothreads.lock().unwrap_or_else(|e| e.into_inner());
                if iothreads.insert(id.clone(), poll).is_some() {
                    return Err(QmpError::generic(format!(
                        "attempt to add duplicate property '{id}' to object (type 'container')"
                    )));
                }
            }
            other => {
                return Err(QmpError::generic(format!(
                    "object type '{other}' is not supported (throttle-group, iothread, \
                     secret, tls-creds-x509 and authz-simple are)"
                )))
            }
        }
        Ok(())
    }

    /// object-del.
    pub fn object_del(&self, id: &str) -> Result<(), QmpError> {
        let mut iothreads = self.iothreads.lock().unwrap_or_else(|e| e.into_inner());
        if iothreads.remove(id).is_some() {
            return Ok(());
        }
        if self.ctx.tls.remove(id) || self.ctx.secrets.remove(id) {
            return Ok(());
        }
        drop(iothreads);
        self.ctx
            .throttle_groups
            .remove(id)
            .map_err(QmpError::generic)
    }

    /// Asks the daemon to exit (QMP quit, SIGTERM).
    pub fn request_quit(&self) {
        *self.quit.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.quit.1.notify_all();
    }

    /// Blocks until [`Daemon::request_quit`].
    pub fn wait_quit(&self) {
        let mut q = self.quit.0.lock().unwrap_or_else(|e| e.into_inner());
        while !*q {
            q = self.quit.1.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Cancels every job, stops every export and flushes every node.
    pub fn shutdown(&self) {
        self.jobs.cancel_all(std::time::Duration::from_secs(30));
        let nbd = self.nbd.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(server) = nbd {
            server.stop();
        }
        let exports = std::mem::take(&mut *self.exports());
        for (_, running) in exports {
            if let Running::VhostUser(r) = running {
                r.stop();
            }
        }
        let view = self.graph.view();
        for (_, node) in view.nodes() {
            match block_on(node.driver().flush(&view)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("flushing '{}' failed: {e}", node.name()),
                Err(e) => tracing::error!("flushing '{}' failed: {e}", node.name()),
            }
        }
        for (_, node) in view.nodes() {
            node.driver().close();
        }
    }
}
