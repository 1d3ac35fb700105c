//! An export: the node a vhost-user-blk device serves, and how the device
//! presents it (size, block size, read-only, serial, cache mode).
//!
//! The export is a user of the graph: it owns the slot that holds its node
//! and can be quiesced, so a graph edit below it first waits for its
//! requests in flight while new ones stay in the virtqueues.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use strata_graph::{
    BlockError, EventSink, Graph, GraphError, NodeId, Quiesce, SlotId, SlotPerm, User, UserKind,
};
use strata_runtime::reactor::block_on;

use crate::io_stats::{ExportStats, QueueStats, Totals};
use crate::on_error::{ErrorHold, OnError};
use crate::queue::Queues;
use crate::vhost_user::Channel;
use crate::virtio::config::BlkConfig;
use crate::virtio::request::Limits;

/// Bytes GET_ID returns (virtio's `VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_LEN: usize = 20;
/// How long a graph edit waits for an export's requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How to present the node.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The export's id; it owns the slot that holds the root node.
    pub id: String,
    /// Number of request queues (one worker thread each).
    pub num_queues: u16,
    /// Refuse write-class requests and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// What GET_ID returns; `None` makes GET_ID unsupported.
    pub serial: Option<String>,
    /// Start in write-back mode (the driver may change it via CONFIG_WCE).
    pub writeback: bool,
    /// The logical block size the guest sees (raised to what the node
    /// needs, if that is more).
    pub logical_block_size: u32,
    /// The longest a queue thread busy-polls for more work before it
    /// sleeps, in ns (QEMU's `poll-max-ns`); 0 never polls. The window
    /// adapts below this: it grows while work keeps arriving soon after,
    /// and shrinks to nothing when the disk is idle.
    pub poll_max_ns: u64,
    /// How long GET_VRING_BASE waits for a queue's requests before it
    /// abandons them and fails (`x-stop-timeout-ms`).
    pub stop_timeout: Duration,
    /// What a failed guest request does (`on-error`).
    pub on_error: OnError,
    /// Lengths, in seconds, of the `timed_stats` intervals.
    pub stats_intervals: Vec<u64>,
}

/// QEMU's default `poll-max-ns` for iothreads.
pub const DEFAULT_POLL_MAX_NS: u64 = 32768;
/// How long GET_VRING_BASE waits for requests by default.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(60);

impl ExportOptions {
    /// Defaults for export `id`: one queue, writable, write-back, 512-byte
    /// blocks, no serial.
    pub fn new(id: &str) -> Self {
        ExportOptions {
            id: id.into(),
            num_queues: 1,
            read_only: false,
            serial: None,
            writeback: true,
            poll_max_ns: DEFAULT_POLL_MAX_NS,
            logical_block_size: 512,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            on_error: OnError::default(),
            stats_intervals: Vec::new(),
        }
    }
}

/// Why an export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The serial does not fit GET_ID's 20 bytes.
    #[error("serial '{serial}' is longer than {SERIAL_LEN} bytes")]
    SerialTooLong {
        /// The serial given.
        serial: String,
    },
    /// Zero queues, or more than a vhost-user device can have.
    #[error("num-queues must be between 1 and 64, not {num_queues}")]
    BadQueueCount {
        /// The count given.
        num_queues: u16,
    },
    /// Not a power of two between 512 and 32768.
    #[error("logical-block-size must be a power of 2 between 512 and 32768, not {size}")]
    BadBlockSize {
        /// The size given.
        size: u32,
    },
    /// The node is smaller than one sector.
    #[error("node '{node}' is {size} bytes: a disk needs at least one 512-byte sector")]
    TooSmall {
        /// The node's name.
        node: String,
        /// Its size.
        size: u64,
    },
    /// The graph refused the export's slot.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// The node could not report its size.
    #[error("cannot size node '{node}': {source}")]
    Size {
        /// The node's name.
        node: String,
        /// Why.
        #[source]
        source: BlockError,
    },
}

/// A node served as a disk.
pub struct Export {
    opts: ExportOptions,
    graph: Graph,
    root: SlotId,
    serial: Option<[u8; SERIAL_LEN]>,
    block_size: u32,
    capacity: AtomicU64,
    writeback: AtomicBool,
    /// Quiesce depth: while non-zero, workers take no new requests (see
    /// [`crate::queue`] for how a drain and the workers meet).
    paused: AtomicU32,
    /// The connected frontend's queues, if any.
    queues: Mutex<Option<Arc<Queues>>>,
    /// Requests held on error (`on-error`).
    hold: ErrorHold,
    /// The connected frontend's backend-request channel, if it gave one.
    channel: Mutex<Option<Arc<Channel>>>,
    /// Each queue's I/O counters; they outlive frontend connections.
    stats: ExportStats,
    /// Each queue's counters in `stats`, by queue index.
    queue_stats: Vec<Arc<QueueStats>>,
}

impl Export {
    /// Exports `node` of `graph`: attaches it to a new slot owned by the
    /// export and makes the export one of the graph's drainable users.
    /// Its BLOCK_IO_ERROR events go to `events`.
    pub fn new(
        graph: &Graph,
        node: NodeId,
        opts: ExportOptions,
        events: Arc<dyn EventSink>,
    ) -> Result<Arc<Export>, ExportError> {
        if !(1..=64).contains(&opts.num_queues) {
            return Err(ExportError::BadQueueCount {
                num_queues: opts.num_queues,
            });
        }
        let lbs = opts.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=32768).contains(&lbs) {
            return Err(ExportError::BadBlockSize { size: lbs });
        }
        let serial = match &opts.serial {
            Some(s) if s.len() > SERIAL_LEN => {
                return Err(ExportError::SerialTooLong { serial: s.clone() })
            }
            Some(s) => {
                let mut b = [0u8; SERIAL_LEN];
                b[..s.len()].copy_from_slice(s.as_bytes());
                Some(b)
            }
            None => None,
        };
        let view = graph.view();
        let n = view.node(node).ok_or(GraphError::NoSuchNode { id: node })?;
        let size = n.driver().size(&view).map_err(|source| ExportError::Size {
            node: n.name().into(),
            source,
        })?;
        if size < 512 {
            return Err(ExportError::TooSmall {
                node: n.name().into(),
                size,
            });
        }
        // The guest must never send what the node cannot take in one piece
        // (O_DIRECT on a 4k-sector host disk, say).
        let block_size = n
            .driver()
            .request_alignment(&view)
            .clamp(lbs, 32768)
            .next_power_of_two();
        let user = User {
            kind: UserKind::Export,
            name: opts.id.as_str().into(),
            perm: SlotPerm::user(!opts.read_only),
        };
        let root = graph.attach_user(user, node)?;
        let hold = ErrorHold::new(opts.on_error, events);
        let stats = ExportStats::new(opts.stats_intervals.clone());
        let queue_stats = (0..opts.num_queues).map(|_| stats.add_queue()).collect();
        let export = Arc::new(Export {
            writeback: AtomicBool::new(opts.writeback),
            opts,
            graph: graph.clone(),
            root,
            serial,
            block_size,
            capacity: AtomicU64::new(size / 512),
            paused: AtomicU32::new(0),
            queues: Mutex::new(None),
            hold,
            channel: Mutex::new(None),
            stats,
            queue_stats,
        });
        graph.register_quiesce(
            &export.opts.id,
            Arc::new(Drainable(Arc::downgrade(&export))),
        );
        Ok(export)
    }

    /// Detaches the export from the graph: its node loses this user.
    pub fn detach(&self) -> Result<(), GraphError> {
        self.graph.unregister_quiesce(&self.opts.id);
        let mut tx = self.graph.transaction();
        tx.detach(self.root)?;
        tx.commit()
    }

    /// Queue `queue`'s I/O counters, for its thread to count into.
    pub fn queue_stats(&self, queue: usize) -> Arc<QueueStats> {
        // A queue index past num_queues never reaches a worker; counting it
        // with the last queue keeps this total.
        Arc::clone(&self.queue_stats[queue.min(self.queue_stats.len() - 1)])
    }

    /// The I/O counters of every queue, added up.
    pub fn stats(&self) -> Totals {
        self.stats.totals()
    }

    /// The I/O counters, and what the operator set for them.
    pub fn io_stats(&self) -> &ExportStats {
        &self.stats
    }

    /// The options the export was made with.
    pub fn options(&self) -> &ExportOptions {
        &self.opts
    }

    /// The graph the export serves from.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The slot holding the exported node.
    pub fn root(&self) -> SlotId {
        self.root
    }

    /// The name of the node the export serves now.
    pub fn node_name(&self) -> String {
        let v = self.graph.view();
        v.child_id(self.root)
            .map_or_else(String::new, |id| v.name(id).to_owned())
    }

    /// The 20 bytes GET_ID returns, if a serial was set.
    pub fn serial(&self) -> Option<&[u8; SERIAL_LEN]> {
        self.serial.as_ref()
    }

    /// Whether writes are cached (flush makes them durable) or written
    /// through (each write is flushed before it completes).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Switches the cache mode (CONFIG_WCE).
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed)
    }

    /// True while a graph edit holds the export's requests.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst) > 0
    }

    /// Requests held on error, and the export's I/O status.
    pub fn error_hold(&self) -> &ErrorHold {
        &self.hold
    }

    /// Retries the requests held on error (block-export-resume).
    pub fn resume_held(&self) {
        self.hold.resume();
        if let Some(queues) = self.queues() {
            queues.wake_all();
        }
    }

    /// True while a frontend is connected.
    pub fn connected(&self) -> bool {
        self.queues().is_some()
    }

    fn queues(&self) -> Option<Arc<Queues>> {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records the connected frontend's queues (or that none is).
    pub fn set_queues(&self, queues: Option<Arc<Queues>>) {
        *self.queues.lock().unwrap_or_else(|e| e.into_inner()) = queues;
    }

    /// Records the connected frontend's backend-request channel.
    pub fn set_channel(&self, channel: Option<Arc<Channel>>) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// Before a stop: takes no more requests, and waits (up to `timeout`)
    /// for those in flight to reach the guest. The export stays paused.
    pub fn pause_for_stop(&self, timeout: Duration) {
        self.paused.fetch_add(1, Ordering::SeqCst);
        if let Some(queues) = self.queues() {
            if let Err(e) = queues.wait_idle(timeout) {
                tracing::warn!("export '{}': stopping with {e}", self.opts.id);
            }
        }
    }

    /// Reads the exported node's size again after a resize. When the
    /// capacity changed, the connected frontend is told (the config-change
    /// message), and the new capacity in sectors is returned.
    pub fn refresh_capacity(&self) -> Result<Option<u64>, BlockError> {
        let view = self.graph.view();
        let size = view.child(self.root)?.size(&view)?;
        let sectors = size / 512;
        if self.capacity.swap(sectors, Ordering::SeqCst) == sectors {
            return Ok(None);
        }
        tracing::info!(
            "export '{}': the disk is now {size} bytes ({sectors} sectors)",
            self.opts.id
        );
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match channel {
            Some(ch) => {
                if let Err(e) = ch.config_changed() {
                    tracing::warn!(
                        "export '{}': cannot tell the frontend about the new size: {e}",
                        self.opts.id
                    );
                }
            }
            None if self.connected() => tracing::warn!(
                "export '{}': the frontend gave no backend channel; the guest sees \
                 the new size after it reads the config again",
                self.opts.id
            ),
            None => {}
        }
        Ok(Some(sectors))
    }

    /// What request validation checks against.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity.load(Ordering::Relaxed),
            block_size: self.block_size,
            read_only: self.opts.read_only,
        }
    }

    /// The device's config space.
    pub fn config(&self) -> BlkConfig {
        BlkConfig {
            capacity: self.capacity.load(Ordering::Relaxed),
            blk_size: self.block_size,
            num_queues: self.opts.num_queues,
            writeback: self.writeback(),
        }
    }

    /// Flushes the exported node, blocking this thread.
    pub fn flush_blocking(&self) -> Result<(), BlockError> {
        let view = self.graph.view();
        let res = block_on(async {
            let node = view.child(self.root)?;
            node.flush(&view).await
        });
        res.map_err(|e| BlockError::io(strata_graph::IoOp::Flush, 0, e))?
    }
}

/// The export as the graph sees it when draining. Weak: the graph must not
/// keep a deleted export alive.
struct Drainable(Weak<Export>);

impl Quiesce for Drainable {
    fn quiesce(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(export) = self.0.upgrade() else {
            return Ok(());
        };
        export.paused.fetch_add(1, Ordering::SeqCst);
        if let Some(queues) = export.queues() {
            if let Err(e) = queues.wait_idle(DRAIN_TIMEOUT) {
                self.resume();
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn resume(&self) {
        let Some(export) = self.0.upgrade() else {
            return;
        };
        if export.paused.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(queues) = export.queues() {
                queues.wake_all();
            }
        }
    }
}
