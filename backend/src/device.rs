//! The vhost-user-blk device: what vhost-user-backend calls into.
//!
//! ```text
//!  frontend thread (vhost-user messages)      worker thread i (queue i)
//!  ───────────────────────────────────       ──────────────────────────
//!  features, config, memory, vring setup      epoll: kick eventfd ─┐
//!  GET_VRING_BASE ─▶ stop_vring(i):           epoll: io_uring, wake,  ├▶ worker::handle
//!    waits until queue i owes nothing         exit eventfds ─────────┘
//!  disconnect ─▶ Queues::exit_all: each worker tears down on its thread,
//!                and its epoll loop ends
//! ```
//!
//! The device implements [`VhostUserBackend`] on `&self`: nothing is locked
//! across queues. Each queue's state lives on its worker thread; what
//! other threads see of it is its [`QueueState`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringMutex};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::export::Export;
use crate::queue::{QueueState, Queues};
use crate::virtio::config::{self, CONFIG_LEN, WRITEBACK_OFFSET};
use crate::worker::{self, QueueRef};

/// Largest virtqueue the device accepts (QEMU's limit too).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest config read vhost-user allows.
const MAX_CONFIG_SIZE: usize = 256;
/// How long a device reset waits for each queue's requests.
const RESET_TIMEOUT: Duration = Duration::from_secs(60);

/// The vring type the device uses: one mutex per queue, never shared.
pub type Vring = VringMutex<GuestMemoryAtomic<GuestMemoryMmap<()>>>;

/// One connection's device. Cloning shares it.
#[derive(Clone)]
pub struct BlkDevice {
    export: Arc<Export>,
    queues: Arc<Queues>,
    /// The guest's memory, as the frontend last mapped it.
    mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    /// Bumped after every change of `mem`, so workers notice a change with
    /// one atomic load.
    map_version: Arc<AtomicU64>,
}

impl BlkDevice {
    /// A device serving `export` for one frontend connection. `mem` is the
    /// map the daemon updates as the frontend sends its memory table.
    pub fn new(
        export: Arc<Export>,
        mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ) -> io::Result<Self> {
        let queues = Arc::new(Queues::new(usize::from(export.options().num_queues))?);
        Ok(BlkDevice {
            export,
            queues,
            mem,
            map_version: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The epoll token of a worker's io_uring eventfd: the first one
    /// vhost-user-backend leaves to the device.
    fn ring_token(&self) -> u64 {
        self.queues.len() as u64 + 1
    }

    /// The epoll token of a worker's wake eventfd.
    fn wake_token(&self) -> u64 {
        self.ring_token() + 1
    }

    /// The epoll token of a worker's exit eventfd.
    fn exit_token(&self) -> u64 {
        self.ring_token() + 2
    }

    /// Registers each worker's io_uring, wake and exit eventfds in that
    /// worker's epoll.
    pub fn register_listeners(&self, handlers: &[Arc<VringEpollHandler<Self>>]) -> io::Result<()> {
        for (q, h) in self.queues.iter().zip(handlers) {
            h.register_listener(q.ring_event.as_raw_fd(), EventSet::IN, self.ring_token())?;
            h.register_listener(q.wake.as_raw_fd(), EventSet::IN, self.wake_token())?;
            h.register_listener(q.exit.as_raw_fd(), EventSet::IN, self.exit_token())?;
        }
        Ok(())
    }

    /// The device's queues, as the export drains them.
    pub fn queues(&self) -> &Arc<Queues> {
        &self.queues
    }

    fn queue(&self, i: u32) -> io::Result<&Arc<QueueState>> {
        self.queues.get(i as usize).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no queue {i} (the device has {})", self.queues.len()),
            )
        })
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::device_features(self.export.options().read_only)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    // The vrings apply EVENT_IDX themselves.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Fields past the ones we fill (secure erase, zoned) read as zero,
        // which means "not offered"; frontends ask for the size they know.
        let bytes = self.export.config().to_bytes();
        let mut out = vec![0u8; (size as usize).min(MAX_CONFIG_SIZE)];
        let start = (offset as usize).min(CONFIG_LEN);
        let n = (CONFIG_LEN - start).min(out.len());
        out[..n].copy_from_slice(&bytes[start..start + n]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable (CONFIG_WCE); QEMU may send it alone
        // or inside a write of the whole space.
        let offset = offset as usize;
        let Some(at) = WRITEBACK_OFFSET
            .checked_sub(offset)
            .filter(|&at| at < buf.len())
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "config bytes {offset}..{} are read-only",
                    offset.saturating_add(buf.len())
                ),
            ));
        };
        let on = buf[at] != 0;
        tracing::info!(
            "guest switched the write cache to {}",
            if on { "write-back" } else { "write-through" }
        );
        self.export.set_writeback(on);
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        // vhost-user-backend replaced the map before calling this, and
        // acknowledges the frontend's message after it returns. Workers
        // pick the new map up on their next batch; requests in flight keep
        // the old one mapped until they finish.
        self.map_version.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.len()).map(|q| 1u64 << q).collect()
    }

    // vhost-user-backend registers its exit event's descriptor in the
    // worker's epoll and never closes it: one leaked eventfd per queue per
    // connection. The device ends its workers with exit eventfds of its
    // own instead (see `handle_event`).
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        None
    }

    /// GET_VRING_BASE: the ring stops once everything taken from it is on
    /// the used ring. A request that does not finish in time is abandoned:
    /// the queue starts a new generation, so it can never complete into a
    /// ring the frontend sets up again, and the error ends the connection
    /// (QEMU then resubmits from the used index).
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = self.queue(queue_index)?;
        let timeout = self.export.options().stop_timeout;
        if let Err(e) = q.wait_published(queue_index as usize, timeout) {
            q.bump_generation();
            tracing::error!("GET_VRING_BASE: {e}; abandoning them");
            return Err(io::Error::new(io::ErrorKind::TimedOut, e));
        }
        Ok(())
    }

    fn reset_device(&self) {
        for (i, q) in self.queues.iter().enumerate() {
            if let Err(e) = q.wait_published(i, RESET_TIMEOUT) {
                tracing::error!("device reset: {e}; abandoning them");
            }
            q.bump_generation();
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        crate::sandbox::enter_queue_thread();
        // An error ends the worker thread's epoll loop: only the exit event
        // returns one, once the worker has torn down. Every other failure
        // is handled (and logged) inside.
        let event = match u64::from(device_event) {
            t if t == self.ring_token() => worker::Event::Completions,
            t if t == self.wake_token() => worker::Event::Wake,
            t if t == self.exit_token() => worker::Event::Exit,
            _ => worker::Event::Kick,
        };
        let (Some(vring), Some(state)) = (vrings.first(), self.queues.get(thread_id)) else {
            return Ok(());
        };
        let q = QueueRef {
            export: &self.export,
            state,
            mem: &self.mem,
            map_version: &self.map_version,
            queue: thread_id,
        };
        worker::handle(q, event, vring);
        if event == worker::Event::Exit {
            return Err(io::Error::other("the queue's worker has torn down"));
        }
        Ok(())
    }
}
