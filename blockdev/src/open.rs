//! `blockdev-add` and `blockdev-reopen`: driver options, spelled as
//! qemu-storage-daemon spells them, become graph nodes.
//!
//! Children may be given inline (created with the parent, and deleted with
//! it) or by node name. Everything happens inside the caller's
//! [`Transaction`], so a failure anywhere leaves the graph untouched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use strata_graph::{
    BlockDriver, EventSink, Graph, GraphError, GraphView, NodeBuilder, NodeId, Transaction,
};

use strata_formats::blkdebug::{BlkdebugNode, Rule};
use strata_formats::blkverify::BlkverifyNode;
use strata_formats::cor::CopyOnReadNode;
use strata_formats::file::{FileNode, FileOptions, ImageLock, Locking};
use strata_formats::image;
use strata_formats::nbd::connection::ConnectOptions;
use strata_formats::nbd::NbdNode;
use strata_formats::null::{NullNode, NullOptions};
use strata_formats::qcow2::{Qcow2Node, Qcow2Options};
use strata_formats::quorum::{QuorumNode, QuorumOptions, ReadPattern};
use strata_formats::raw::{RawNode, RawOptions};
use strata_formats::rbd::{RbdNode, RbdOptions};
use strata_formats::throttle::group::ThrottleGroups;
use strata_formats::throttle::ThrottleNode;
use strata_runtime::reactor::block_on;

use crate::options::{ChildOption, Options, OptionsError};

/// What opening nodes needs from the daemon.
#[derive(Clone)]
pub struct OpenContext {
    /// Groups that throttle nodes name.
    pub throttle_groups: ThrottleGroups,
    /// TLS credentials and authorization objects.
    pub tls: Arc<crate::tls::TlsObjects>,
    /// `secret` objects, for options that name one.
    pub secrets: Arc<crate::secret::Secrets>,
    /// Where drivers report events.
    pub events: Arc<dyn EventSink>,
}

/// A refused blockdev-add or blockdev-reopen.
#[derive(Debug, thiserror::Error)]
pub enum BlockdevError {
    /// A bad option.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The graph refused the change.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// No such driver.
    #[error("Parameter 'driver' does not accept value '{0}'")]
    UnknownDriver(String),
    /// A child named a node that does not exist.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NoSuchNode(String),
    /// A driver or option Strata knows but does not implement yet.
    #[error("{0} is not supported yet")]
    NotSupported(String),
    /// A node added by blockdev-add needs a name.
    #[error("'node-name' must be specified for the root node")]
    RootNeedsName,
    /// Reopen cannot change this option.
    #[error("Cannot change the option '{0}'")]
    CannotChange(String),
    /// A throttle group that does not exist.
    #[error("Throttle group '{0}' does not exist")]
    NoSuchGroup(String),
    /// A backing file that cannot be opened.
    #[error("Could not open backing file '{name}': {reason}")]
    Backing {
        /// The name in the header.
        name: String,
        /// Why.
        reason: String,
    },
    /// A backing chain that comes back to an image already in it.
    #[error("Backing chain loops: {0}")]
    BackingLoop(String),
    /// Reopen must say what becomes of an existing backing child.
    #[error("backing is missing for '{0}'")]
    BackingRequired(String),
}

/// Options every node takes, and what inline children inherit.
#[derive(Clone, Debug, Default)]
struct Common {
    read_only: bool,
    /// `active=off`: opened for a migration's destination, whose image
    /// another process still owns (see [`set_active`]).
    inactive: bool,
    direct: bool,
    no_flush: bool,
    discard: bool,
    force_share: bool,
    /// The node is a backing file whose format was probed, not named.
    probed: bool,
    /// Images above this one in an implicitly opened backing chain.
    chain: Vec<PathBuf>,
}

impl Common {
    /// Drivers open an inactive node without writing: it is made
    /// writable only when activated.
    fn driver_read_only(&self) -> bool {
        self.read_only || self.inactive
    }

    fn take(o: &mut Options, inherited: &Common) -> Result<Common, BlockdevError> {
        let mut c = inherited.clone();
        if let Some(ro) = o.take_bool("read-only")? {
            c.read_only = ro;
        }
        if let Some(active) = o.take_bool("active")? {
            c.inactive = !active;
        }
        // Strata opens what it is told to; the hint needs no action.
        o.take_bool("auto-read-only")?;
        if let Some(fs) = o.take_bool("force-share")? {
            if fs && !c.read_only {
                return Err(OptionsError::Value {
                    param: o.param("force-share"),
                    expected: "read-only=on to be set too".into(),
                }
                .into());
            }
            c.force_share = fs;
        }
        if let Some(d) = o.take_enum("discard", &["ignore", "off", "unmap", "on"])? {
            c.discard = d == "unmap" || d == "on";
        }
        if let Some(z) = o.take_enum("detect-zeroes", &["off", "on", "unmap"])? {
            if z != "off" {
                return Err(BlockdevError::NotSupported(format!("detect-zeroes={z}")));
            }
        }
        if let Some(mut cache) = o.take_group("cache")? {
            if let Some(d) = cache.take_bool("direct")? {
                c.direct = d;
            }
            if let Some(n) = cache.take_bool("no-flush")? {
                c.no_flush = n;
            }
            cache.finish()?;
        }
        Ok(c)
    }
}

/// A driver with its options parsed and its children resolved: all that
/// is left is to open it, as a new node or in place of an old one.
enum Spec {
    File(FileOptions),
    Raw(NodeId, RawOptions),
    Null(NullOptions),
    Throttle(NodeId, String),
    CopyOnRead(NodeId),
    Quorum(Vec<(String, NodeId)>, QuorumOptions),
    Blkverify(NodeId, NodeId),
    Blkdebug(NodeId, Vec<Rule>),
    Qcow2(NodeId, Option<NodeId>, Qcow2Options),
    Nbd(ConnectOptions, bool),
    Rbd(RbdOptions),
}

/// Adds the node described by `opts` (and its inline children) as a
/// monitor-owned node.
pub fn add(
    tx: &mut Transaction<'_>,
    opts: Options,
    ctx: &OpenContext,
) -> Result<NodeId, BlockdevError> {
    if !opts.has("node-name") {
        return Err(BlockdevError::RootNeedsName);
    }
    open_node(tx, opts, true, &Common::default(), ctx)
}

fn open_node(
    tx: &mut Transaction<'_>,
    mut o: Options,
    monitor_owned: bool,
    inherited: &Common,
    ctx: &OpenContext,
) -> Result<NodeId, BlockdevError> {
    let recorded = o.to_json();
    let driver = o.take_str("driver")?;
    let driver = o.required("driver", driver)?;
    let name = o.take_str("node-name")?;
    let common = Common::take(&mut o, inherited)?;
    let spec = parse(tx, &driver, &mut o, &common, None, ctx)?;
    o.finish()?;
    let recorded = record(recorded, tx, &spec);
    let ctx = ctx.clone();
    let id = tx.add_node(name.as_deref(), recorded, monitor_owned, move |b| {
        build(b, spec, &ctx, Build::Reuse)
    })?;
    if common.inactive {
        tx.set_active(id, false)?;
    }
    Ok(id)
}

/// Reopens the node named in `opts` with these options: options left out
/// go back to their defaults, `driver` and `filename` cannot change, and a
/// child given by name replaces the current one.
pub fn reopen(
    tx: &mut Transaction<'_>,
    o: Options,
    ctx: &OpenContext,
) -> Result<NodeId, BlockdevError> {
    reopen_as(tx, o, ctx, false)
}

fn reopen_as(
    tx: &mut Transaction<'_>,
    mut o: Options,
    ctx: &OpenContext,
    fresh: bool,
) -> Result<NodeId, BlockdevError> {
    let recorded = o.to_json();
    let name = o.take_str("node-name")?;
    let name = o.required("node-name", name)?;
    let id = tx
        .view()
        .find(&name)
        .ok_or_else(|| BlockdevError::NoSuchNode(name.clone()))?;
    let old = tx.view().node(id).expect("found above").options().clone();
    let driver = o.take_str("driver")?;
    let driver = o.required("driver", driver)?;
    if old
        .get("driver")
        .and_then(Value::as_str)
        .is_some_and(|d| d != driver)
    {
        return Err(BlockdevError::CannotChange("driver".into()));
    }
    let common = Common::take(&mut o, &Common::default())?;
    if common.inactive == tx.view().node(id).expect("found above").is_active() && !fresh {
        return Err(BlockdevError::CannotChange(
            "active (blockdev-set-active changes it)".into(),
        ));
    }
    let spec = parse(tx, &driver, &mut o, &common, Some(id), ctx)?;
    o.finish()?;
    if let (Spec::File(f), Some(old_name)) = (&spec, old.get("filename").and_then(Value::as_str)) {
        if f.filename != std::path::Path::new(old_name) {
            return Err(BlockdevError::CannotChange("filename".into()));
        }
    }
    let recorded = record(recorded, tx, &spec);
    let ctx = ctx.clone();
    let how = if fresh { Build::Fresh } else { Build::Reuse };
    tx.reopen_node(id, recorded, move |b| build(b, spec, &ctx, how))?;
    if fresh {
        tx.set_active(id, !common.inactive)?;
    }
    Ok(id)
}

/// How a reopened node treats its predecessor's state.
#[derive(Clone, Copy)]
enum Build {
    /// Carries it over (a reopen changes options, not what is known).
    Reuse,
    /// Reads the image again and writes nothing: a node changing between
    /// active and inactive, whose image another process may have
    /// changed. A writable qcow2 is then reopened once more to prepare
    /// for writing, once the locks are held.
    Fresh,
}

/// blockdev-set-active: makes node `id` and every node below it active
/// or inactive, as a live migration hands an image between two daemons
/// on shared storage.
///
/// Inactivating flushes everything while the users are drained, reopens
/// every node of the subtree without its cached metadata and read-only,
/// and makes it inactive: it takes no I/O and its images hold no locks.
/// Activating reopens each node from the image as it is now, makes it
/// active and takes its locks (and fails, leaving it inactive, while the
/// other process holds them); then a qcow2 node is reopened writable
/// (a dirty image is repaired only now, under the lock).
pub fn set_active(
    graph: &Graph,
    id: NodeId,
    active: bool,
    ctx: &OpenContext,
) -> Result<(), BlockdevError> {
    let mut tx = graph.transaction();
    let mut order = subtree(tx.view(), id);
    if !active {
        // Top down: a format node rereads its image while its file is
        // still active.
        order.reverse();
    }
    let before = graph.view();
    let mut changed = Vec::new();
    for n in order {
        let node = tx
            .view()
            .node(n)
            .ok_or_else(|| BlockdevError::NoSuchNode(n.to_string()))?;
        if node.is_active() == active {
            continue;
        }
        let mut opts = node.options().clone();
        opts["node-name"] = json!(node.name());
        opts["active"] = json!(active);
        reopen_as(&mut tx, Options::from_keyval(opts)?, ctx, true)?;
        changed.push(n);
    }
    if changed.is_empty() {
        return Ok(());
    }
    tx.commit_drained(|| {
        if active {
            return Ok(());
        }
        // Everything the old drivers cached reaches the image before they
        // go, while no request runs.
        let top = before.node(id).ok_or(GraphError::NoSuchNode { id })?;
        let flushed = match block_on(top.driver().flush(&before)) {
            Ok(res) => res.map_err(Into::into),
            Err(e) => Err(e.into()),
        };
        flushed.map_err(|source| GraphError::Open {
            name: top.name().into(),
            source,
        })
    })?;
    if active {
        let mut tx = graph.transaction();
        for &n in &changed {
            let v = tx.view();
            let node = v.node(n).expect("reopened above");
            if node.driver().driver_name() != "qcow2" || node.driver().is_read_only() {
                continue;
            }
            let mut opts = node.options().clone();
            opts["node-name"] = json!(node.name());
            reopen(&mut tx, Options::from_keyval(opts)?, ctx)?;
        }
        tx.commit()?;
    }
    Ok(())
}

/// `id` and the nodes below it, children before parents.
fn subtree(v: &GraphView, id: NodeId) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut stack = vec![(id, false)];
    while let Some((n, expanded)) = stack.pop() {
        if expanded {
            if !out.contains(&n) {
                out.push(n);
            }
            continue;
        }
        stack.push((n, true));
        for (_, s) in v.children(n) {
            stack.push((s.child(), false));
        }
    }
    out
}

/// Points node `id`'s `backing` slot at `backing`, or detaches it, by
/// reopening the node with the options it has: the node keeps its state,
/// the slot keeps its identity, and the options it reports name the new
/// backing node. This is the one-slot rewrite that stream and commit end
/// with.
pub fn set_backing(
    tx: &mut Transaction<'_>,
    id: NodeId,
    backing: Option<NodeId>,
    ctx: &OpenContext,
) -> Result<(), BlockdevError> {
    let v = tx.view();
    let node = v
        .node(id)
        .ok_or_else(|| BlockdevError::NoSuchNode(id.to_string()))?;
    let mut opts = node.options().clone();
    opts["node-name"] = json!(node.name());
    opts["backing"] = backing.map_or(Value::Null, |b| json!(v.name(b)));
    // Recorded options keep the command line's strings ("on"); the keyval
    // reading accepts those as well as JSON types.
    reopen(tx, Options::from_keyval(opts)?, ctx)?;
    Ok(())
}

/// Adds (`add`) or removes (the child in role `remove`) a quorum child,
/// as x-blockdev-change does. Other children keep their names.
pub fn change_quorum(
    tx: &mut Transaction<'_>,
    parent: &str,
    add: Option<&str>,
    remove: Option<&str>,
    ctx: &OpenContext,
) -> Result<(), BlockdevError> {
    let id = tx
        .view()
        .find(parent)
        .ok_or_else(|| BlockdevError::NoSuchNode(parent.into()))?;
    let node = tx.view().node(id).expect("found above");
    if node.driver().driver_name() != "quorum" {
        return Err(BlockdevError::NotSupported(format!(
            "x-blockdev-change on a '{}' node",
            node.driver().driver_name()
        )));
    }
    let mut children: Vec<(String, NodeId)> = tx
        .view()
        .children(id)
        .map(|(_, s)| (s.role().to_owned(), s.child()))
        .collect();
    let mut o = Options::from_json(node.options().clone())?;
    if let Some(role) = remove {
        let before = children.len();
        children.retain(|(r, _)| r != role);
        if children.len() == before {
            return Err(BlockdevError::NoSuchNode(role.into()));
        }
    }
    if let Some(child) = add {
        let cid = tx
            .view()
            .find(child)
            .ok_or_else(|| BlockdevError::NoSuchNode(child.into()))?;
        let next = children
            .iter()
            .filter_map(|(r, _)| r.strip_prefix("children.")?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1);
        children.push((format!("children.{next}"), cid));
    }
    let qopts = quorum_options(&mut o)?;
    let mut recorded = node.options().clone();
    recorded["children"] = json!(children
        .iter()
        .map(|(_, c)| tx.view().name(*c))
        .collect::<Vec<_>>());
    let events = ctx.events.clone();
    tx.reopen_node(id, recorded, move |b| {
        QuorumNode::open(b, &children, qopts, events).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
    })?;
    Ok(())
}

/// The options as the node keeps them: as given, with inline children
/// replaced by the names they were created under.
fn record(mut given: Value, tx: &Transaction<'_>, spec: &Spec) -> Value {
    let name = |id: NodeId| Value::String(tx.view().name(id).to_owned());
    match spec {
        Spec::Raw(f, _) | Spec::Throttle(f, _) | Spec::CopyOnRead(f) => given["file"] = name(*f),
        Spec::Quorum(children, _) => {
            given["children"] = Value::Array(children.iter().map(|c| name(c.1)).collect())
        }
        Spec::Blkdebug(image, _) => given["image"] = name(*image),
        Spec::Blkverify(t, r) => {
            given["test"] = name(*t);
            given["raw"] = name(*r);
        }
        Spec::Qcow2(f, backing, _) => {
            given["file"] = name(*f);
            given["backing"] = backing.map_or(Value::Null, name);
        }
        Spec::File(_) | Spec::Null(_) | Spec::Nbd(..) | Spec::Rbd(_) => {}
    }
    given
}

/// Resolves a child option: a reference, an inline node to create, or (on
/// reopen) the child the node has now when the option is left out.
fn child(
    tx: &mut Transaction<'_>,
    o: &mut Options,
    key: &str,
    common: &Common,
    reopening: Option<NodeId>,
    ctx: &OpenContext,
) -> Result<NodeId, BlockdevError> {
    let current = reopening
        .and_then(|id| tx.view().child_slot(id, key))
        .and_then(|s| tx.view().child_id(s));
    match o.take_child(key)? {
        Some(ChildOption::Reference(n)) => tx.view().find(&n).ok_or(BlockdevError::NoSuchNode(n)),
        Some(ChildOption::Inline(inline)) => resolve_inline(tx, inline, common, current, ctx),
        Some(ChildOption::Null) => Err(OptionsError::Type {
            param: o.param(key),
            expected: "node name or object",
        }
        .into()),
        None => current.ok_or_else(|| {
            OptionsError::Missing {
                param: o.param(key),
            }
            .into()
        }),
    }
}

/// Inline options: a new child, or on reopen the current child reopened
/// when they name it.
fn resolve_inline(
    tx: &mut Transaction<'_>,
    inline: Options,
    common: &Common,
    current: Option<NodeId>,
    ctx: &OpenContext,
) -> Result<NodeId, BlockdevError> {
    let names_current = |tx: &Transaction<'_>| {
        let json = inline.to_json();
        let n = json.get("node-name").and_then(Value::as_str)?;
        current.filter(|&c| tx.view().name(c) == n)
    };
    match names_current(tx) {
        Some(_) => reopen(tx, inline, ctx),
        None => open_node(tx, inline, false, common, ctx),
    }
}

fn parse(
    tx: &mut Transaction<'_>,
    driver: &str,
    o: &mut Options,
    common: &Common,
    reopening: Option<NodeId>,
    ctx: &OpenContext,
) -> Result<Spec, BlockdevError> {
    let child_common = common.clone();
    Ok(match driver {
        "file" | "host_device" => {
            let filename = o.take_str("filename")?;
            let filename = o.required("filename", filename)?;
            // Every aio mode is served by io_uring.
            o.take_enum("aio", &["threads", "native", "io_uring"])?;
            o.take_u64("aio-max-batch")?;
            let locking = match o.take_enum("locking", &["auto", "on", "off"])?.as_deref() {
                Some("on") => Locking::On,
                Some("off") => Locking::Off,
                _ => Locking::Auto,
            };
            Spec::File(FileOptions {
                filename: filename.into(),
                direct: common.direct,
                read_only: common.driver_read_only(),
                no_flush: common.no_flush,
                discard: common.discard,
                locking,
                force_share: common.force_share,
            })
        }
        "raw" => {
            let file = child(tx, o, "file", &child_common, reopening, ctx)?;
            let offset = o.take_size("offset")?.unwrap_or(0);
            let size = o.take_size("size")?;
            Spec::Raw(
                file,
                RawOptions {
                    offset,
                    size,
                    guard_format: o.take_bool("x-guard-format")?.unwrap_or(false),
                },
            )
        }
        "nbd" => Spec::Nbd(nbd::options(o, ctx)?, common.driver_read_only()),
        "rbd" => Spec::Rbd(rbd::options(o, ctx, common)?),
        "null-co" | "null-aio" => {
            let size = o.take_size("size")?.unwrap_or(1 << 30);
            let read_zeroes = o.take_bool("read-zeroes")?.unwrap_or(true);
            let latency = Duration::from_nanos(o.take_u64("latency-ns")?.unwrap_or(0));
            Spec::Null(NullOptions {
                size,
                read_zeroes,
                latency,
            })
        }
        "throttle" => {
            let group = o.take_str("throttle-group")?;
            let group = o.required("throttle-group", group)?;
            ctx.throttle_groups
                .get(&group)
                .map_err(|_| BlockdevError::NoSuchGroup(group.clone()))?;
            let file = child(tx, o, "file", &child_common, reopening, ctx)?;
            Spec::Throttle(file, group)
        }
        "copy-on-read" => {
            if o.has("bottom") {
                return Err(BlockdevError::NotSupported(
                    "copy-on-read's 'bottom' option".into(),
                ));
            }
            let file = child(tx, o, "file", &child_common, reopening, ctx)?;
            Spec::CopyOnRead(file)
        }
        "quorum" => {
            let qopts = quorum_options(o)?;
            let list = o.take_children("children")?;
            let list = o.required("children", list)?;
            let mut children = Vec::new();
            for (i, c) in list.into_iter().enumerate() {
                let id = match c {
                    ChildOption::Reference(n) => {
                        tx.view().find(&n).ok_or(BlockdevError::NoSuchNode(n))?
                    }
                    ChildOption::Inline(inline) => {
                        open_node(tx, inline, false, &child_common, ctx)?
                    }
                    ChildOption::Null => {
                        return Err(OptionsError::Type {
                            param: format!("children.{i}"),
                            expected: "node name or object",
                        }
                        .into())
                    }
                };
                children.push((format!("children.{i}"), id));
            }
            Spec::Quorum(children, qopts)
        }
        "blkdebug" => {
            for unsupported in ["config", "set-state"] {
                if o.has(unsupported) {
                    return Err(BlockdevError::NotSupported(format!(
                        "blkdebug's '{unsupported}' option"
                    )));
                }
            }
            let rules = o
                .take_groups("inject-error")?
                .unwrap_or_default()
                .into_iter()
                .map(crate::blkdebug::inject_error_rule)
                .collect::<Result<Vec<_>, _>>()?;
            let image = child(tx, o, "image", &child_common, reopening, ctx)?;
            Spec::Blkdebug(image, rules)
        }
        "blkverify" => {
            let test = child(tx, o, "test", &child_common, reopening, ctx)?;
            let raw = child(tx, o, "raw", &child_common, reopening, ctx)?;
            Spec::Blkverify(test, raw)
        }
        "qcow2" => {
            let file = child(tx, o, "file", &child_common, reopening, ctx)?;
            for k in [
                "lazy-refcounts",
                "pass-discard-request",
                "pass-discard-snapshot",
                "pass-discard-other",
            ] {
                o.take_bool(k)?;
            }
            o.take_size("l2-cache-entry-size")?;
            o.take_u64("cache-clean-interval")?;
            // Strata checks every metadata offset it uses; the option only
            // tunes QEMU's extra checks.
            o.take("overlap-check");
            for unsupported in ["data-file", "encrypt"] {
                if o.has(unsupported) {
                    return Err(BlockdevError::NotSupported(format!(
                        "qcow2's '{unsupported}' option"
                    )));
                }
            }
            let total = o.take_size("cache-size")?;
            let l2 = o.take_size("l2-cache-size")?.or(total.map(|t| t / 4 * 3));
            let rc = o.take_size("refcount-cache-size")?.or(total.map(|t| t / 4));
            let backing = match o.take_child("backing")? {
                Some(ChildOption::Reference(n)) => {
                    Some(tx.view().find(&n).ok_or(BlockdevError::NoSuchNode(n))?)
                }
                Some(ChildOption::Inline(inline)) => {
                    let current = reopening
                        .and_then(|id| tx.view().child_slot(id, "backing"))
                        .and_then(|s| tx.view().child_id(s));
                    let mut ro = child_common.clone();
                    ro.read_only = true;
                    Some(resolve_inline(tx, inline, &ro, current, ctx)?)
                }
                Some(ChildOption::Null) => None,
                None => match reopening {
                    Some(id) if tx.view().child_slot(id, "backing").is_some() => {
                        return Err(BlockdevError::BackingRequired(
                            tx.view().name(id).to_owned(),
                        ));
                    }
                    Some(_) => None,
                    None => implicit_backing(tx, file, common, ctx)?,
                },
            };
            Spec::Qcow2(
                file,
                backing,
                Qcow2Options {
                    read_only: common.driver_read_only(),
                    l2_cache_size: l2,
                    refcount_cache_size: rc,
                    discard: common.discard,
                },
            )
        }
        other => return Err(BlockdevError::UnknownDriver(other.into())),
    })
}

/// The host file an image node sits on, following `file` children.
fn filename_of(tx: &Transaction<'_>, id: NodeId) -> Option<PathBuf> {
    let v = tx.view();
    let node = v.node(id)?;
    if let Some(f) = node.options().get("filename").and_then(Value::as_str) {
        return Some(PathBuf::from(f));
    }
    filename_of(tx, v.child_id(v.child_slot(id, "file")?)?)
}

/// Opens the backing chain a qcow2 header names, as inline, read-only
/// nodes: the backing file's own `file` node and its format node.
fn implicit_backing(
    tx: &mut Transaction<'_>,
    file: NodeId,
    common: &Common,
    ctx: &OpenContext,
) -> Result<Option<NodeId>, BlockdevError> {
    let view = tx.view();
    let driver = view.node(file).expect("resolved above").driver();
    let info = block_on(Qcow2Node::backing_info(view, driver))
        .map_err(|e| BlockdevError::NotSupported(format!("I/O without a reactor ({e})")))?;
    let info = match info {
        Ok(i) => i,
        // Not a qcow2 image: the qcow2 driver itself will say so.
        Err(_) => return Ok(None),
    };
    let Some(name) = info.file else {
        return Ok(None);
    };
    let fail = |reason: String| BlockdevError::Backing {
        name: name.clone(),
        reason,
    };
    // The gate on implicit opens: an image whose format was guessed from
    // its content may be anything its writer (a guest) made it look like,
    // so it does not get to name further host files.
    if common.probed {
        return Err(fail(
            "it is named by an image whose own format was probed, not recorded; record the \
             formats with `qemu-img rebase -u -F FMT` or give the chain as blockdev options"
                .into(),
        ));
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(fail("only plain file names are supported".into()));
    }
    let image = filename_of(tx, file)
        .ok_or_else(|| fail("the image has no file name to resolve it against".into()))?;
    let path = match Path::new(&name) {
        p if p.is_absolute() => p.to_path_buf(),
        p => image.parent().unwrap_or(Path::new(".")).join(p),
    };
    let canonical =
        |p: &Path| std::fs::canonicalize(p).map_err(|e| fail(format!("{}: {e}", p.display())));
    let this = canonical(&image)?;
    let target = canonical(&path)?;
    let mut chain = common.chain.clone();
    chain.push(this);
    if chain.contains(&target) {
        let names: Vec<String> = chain
            .iter()
            .chain([&target])
            .map(|p| p.display().to_string())
            .collect();
        return Err(BlockdevError::BackingLoop(names.join(" -> ")));
    }
    if chain.len() >= MAX_CHAIN {
        return Err(fail(format!(
            "the backing chain is deeper than {MAX_CHAIN} images"
        )));
    }
    let probed = info.format.is_none();
    let format = match info.format {
        Some(f) => f,
        None => image::probe(&path)
            .map_err(|e| fail(e.to_string()))?
            .name()
            .to_owned(),
    };
    if format != "raw" && format != "qcow2" {
        return Err(fail(format!("backing format '{format}' is not supported")));
    }
    let mut opts = json!({
        "driver": format,
        "read-only": true,
        "file": {"driver": "file", "filename": path.to_string_lossy(), "read-only": true},
    });
    if probed && format == "raw" {
        // Whoever writes it later (a commit into it) must not make it
        // probe as something else next time. Recorded with the node's
        // options, so a reopen keeps it.
        opts["x-guard-format"] = true.into();
    }
    let inherited = Common {
        read_only: true,
        probed,
        chain,
        ..common.clone()
    };
    open_node(tx, Options::from_json(opts)?, false, &inherited, ctx).map(Some)
}

/// Backing chains deeper than this are refused.
const MAX_CHAIN: usize = 64;

fn quorum_options(o: &mut Options) -> Result<QuorumOptions, BlockdevError> {
    let threshold = o.take_u64("vote-threshold")?;
    let threshold = o.required("vote-threshold", threshold)?;
    if o.take_bool("blkverify")? == Some(true) {
        return Err(BlockdevError::NotSupported(
            "quorum's blkverify mode".into(),
        ));
    }
    let pattern = match o.take_enum("read-pattern", &["quorum", "fifo"])?.as_deref() {
        Some("fifo") => ReadPattern::Fifo,
        _ => ReadPattern::Quorum,
    };
    Ok(QuorumOptions {
        vote_threshold: threshold as usize,
        read_pattern: pattern,
        rewrite_corrupted: o.take_bool("rewrite-corrupted")?.unwrap_or(false),
    })
}

/// Opens the driver for `spec`, attaching its children through `b`.
fn build(
    b: &mut NodeBuilder<'_>,
    spec: Spec,
    ctx: &OpenContext,
    how: Build,
) -> Result<Arc<dyn BlockDriver>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(match spec {
        Spec::File(f) => {
            let lock = b
                .previous()
                .and_then(|p| p.reopen_state())
                .and_then(|s| s.downcast::<ImageLock>().ok());
            Arc::new(FileNode::reopen(&f, lock)?.reporting_to(ctx.events.clone(), b.name()))
        }
        Spec::Raw(file, r) => Arc::new(RawNode::open(b, file, &r)?),
        Spec::Null(n) => Arc::new(NullNode::new(n)),
        Spec::Nbd(opts, read_only) => Arc::new(NbdNode::open(opts, read_only)?),
        Spec::Rbd(opts) => Arc::new(RbdNode::open(&opts)?),
        Spec::Throttle(file, group) => {
            let group = ctx.throttle_groups.get(&group)?;
            Arc::new(ThrottleNode::open(b, file, group)?)
        }
        Spec::CopyOnRead(file) => Arc::new(CopyOnReadNode::open(b, file)?),
        Spec::Quorum(children, q) => {
            Arc::new(QuorumNode::open(b, &children, q, ctx.events.clone())?)
        }
        Spec::Blkverify(test, raw) => Arc::new(BlkverifyNode::open(b, test, raw)?),
        Spec::Blkdebug(image, rules) => Arc::new(BlkdebugNode::open(b, image, rules)?),
        Spec::Qcow2(file, backing, q) => match (how, b.previous().and_then(|p| p.reopen_state())) {
            (Build::Fresh, _) => Arc::new(Qcow2Node::open_unprepared(b, file, backing, &q)?),
            (Build::Reuse, Some(state)) => {
                Arc::new(Qcow2Node::reopen(b, state, file, backing, &q)?)
            }
            (Build::Reuse, None) => Arc::new(Qcow2Node::open(b, file, backing, &q)?),
        },
    })
}

mod nbd;
mod rbd;
#[cfg(test)]
mod tests;
