//! An NBD export: a node of the graph served under a name, with the
//! requests in flight counted so that a graph edit can drain them.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::io_stats::{ExportStats, QueueStats, Totals};
use strata_graph::{
    BlockError, Graph, GraphError, GraphView, NodeId, Quiesce, SlotId, SlotPerm, User, UserKind,
};

/// The longest READ or WRITE a client may send (QEMU's
/// NBD_MAX_BUFFER_SIZE).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// How long a graph edit waits for an export's requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How to serve the node.
#[derive(Clone, Debug)]
pub struct NbdExportOptions {
    /// The block export's id.
    pub id: String,
    /// The name clients ask for (QEMU's `name`, by default the node's).
    pub name: String,
    /// Shown to clients that list exports or ask for it.
    pub description: Option<String>,
    /// Clients may write.
    pub writable: bool,
    /// Offer the `qemu:allocation-depth` metadata context.
    pub allocation_depth: bool,
    /// Lengths, in seconds, of the `timed_stats` intervals.
    pub stats_intervals: Vec<u64>,
}

/// A node served over NBD.
pub struct NbdExport {
    opts: NbdExportOptions,
    graph: Graph,
    root: SlotId,
    /// Quiesce depth: while non-zero no request starts.
    paused: AtomicU32,
    /// Requests running against the graph, over every connection.
    in_flight: AtomicU64,
    /// The I/O counters of live connections, and the sum of those that
    /// ended (so reconnects cannot grow the list).
    stats: ExportStats,
}

impl NbdExport {
    /// Exports `node` of `graph` through a new slot the export owns.
    pub fn new(
        graph: &Graph,
        node: NodeId,
        opts: NbdExportOptions,
    ) -> Result<Arc<NbdExport>, GraphError> {
        let user = User {
            kind: UserKind::Export,
            name: opts.id.as_str().into(),
            perm: SlotPerm::user(opts.writable),
        };
        let root = graph.attach_user(user, node)?;
        let export = Arc::new(NbdExport {
            stats: ExportStats::new(opts.stats_intervals.clone()),
            opts,
            graph: graph.clone(),
            root,
            paused: AtomicU32::new(0),
            in_flight: AtomicU64::new(0),
        });
        graph.register_quiesce(
            &export.opts.id,
            Arc::new(Drainable(Arc::downgrade(&export))),
        );
        Ok(export)
    }

    /// Detaches the export from the graph.
    pub fn detach(&self) -> Result<(), GraphError> {
        self.graph.unregister_quiesce(&self.opts.id);
        let mut tx = self.graph.transaction();
        tx.detach(self.root)?;
        tx.commit()
    }

    /// The options it was made with.
    pub fn options(&self) -> &NbdExportOptions {
        &self.opts
    }

    /// The graph it serves from.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The slot that holds the exported node.
    pub fn root(&self) -> SlotId {
        self.root
    }

    /// The name of the node served now.
    pub fn node_name(&self) -> String {
        let v = self.graph.view();
        v.child_id(self.root)
            .map_or_else(String::new, |id| v.name(id).to_owned())
    }

    /// The node's size in bytes, in view `v`.
    pub fn size(&self, v: &GraphView) -> Result<u64, BlockError> {
        v.child(self.root)?.size(v)
    }

    /// The alignment the node needs of offsets and lengths.
    pub fn alignment(&self, v: &GraphView) -> u32 {
        v.child(self.root)
            .map_or(1, |n| n.request_alignment(v))
            .clamp(1, 4096)
    }

    /// Counters for a new connection's thread to count into.
    pub fn connection_stats(&self) -> Arc<QueueStats> {
        self.stats.add_queue()
    }

    /// Folds an ended connection's counters into the export's.
    pub fn connection_ended(&self, s: &Arc<QueueStats>) {
        self.stats.end_queue(s);
    }

    /// Every connection's I/O counters, ended ones included, added up.
    pub fn stats(&self) -> Totals {
        self.stats.totals()
    }

    /// The I/O counters, and what the operator set for them.
    pub fn io_stats(&self) -> &ExportStats {
        &self.stats
    }

    /// Starts a request, unless a graph edit holds the export: then the
    /// caller waits and tries again. Every `true` is paired with an
    /// [`end`](Self::end).
    pub fn begin(&self) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.paused.load(Ordering::SeqCst) > 0 {
            self.end();
            return false;
        }
        true
    }

    /// Ends a request started with [`begin`](Self::begin).
    pub fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The export as the graph sees it when draining. Weak: the graph must
/// not keep a deleted export alive.
struct Drainable(Weak<NbdExport>);

impl Quiesce for Drainable {
    fn quiesce(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(export) = self.0.upgrade() else {
            return Ok(());
        };
        export.paused.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while export.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                self.resume();
                return Err(format!(
                    "NBD export '{}': requests still running after {DRAIN_TIMEOUT:?}",
                    export.opts.id
                )
                .into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    fn resume(&self) {
        if let Some(export) = self.0.upgrade() {
            export.paused.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
