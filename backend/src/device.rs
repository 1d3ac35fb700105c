//! The vhost-user-blk device: what vhost-user-backend calls into.
//!
//! ```text
//!  frontend thread (vhost-user messages)      worker thread i (queue i)
//!  ───────────────────────────────────       ──────────────────────────
//!  features, config, memory, vring setup      epoll: kick eventfd ─┐
//!  GET_VRING_BASE ─▶ stop_vring(i):           epoll: io_uring eventfd ─┤
//!    waits for queue i's in-flight count      handle_event ─▶ worker::Worker
//! ```
//!
//! The device implements [`VhostUserBackend`] on `&self`: nothing is locked
//! across queues. Each queue's state lives on its worker thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringMutex};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::export::Export;
use crate::virtio::config::{self, CONFIG_LEN, WRITEBACK_OFFSET};
use crate::worker;

/// Largest virtqueue the device accepts (QEMU's limit too).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest config read vhost-user allows.
const MAX_CONFIG_SIZE: usize = 256;
/// How long GET_VRING_BASE waits for a queue's requests before giving up.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The vring type the device uses: one mutex per queue, never shared.
pub type Vring = VringMutex<GuestMemoryAtomic<GuestMemoryMmap<()>>>;

/// What other threads may see of one queue.
pub struct QueueShared {
    /// Signalled by the queue's io_uring on completions.
    pub(crate) ring_event: EventFd,
    /// Signalled to make the worker look at its virtqueue again (after a
    /// drain ends).
    pub(crate) wake: EventFd,
    /// Set while the worker takes requests from the avail ring: a drain
    /// waits for it to clear (see `Export::paused`).
    pub(crate) busy: AtomicBool,
    /// Requests taken from the avail ring and not yet on the used ring.
    pub(crate) in_flight: AtomicUsize,
    /// Requests completed since the frontend connected.
    pub(crate) completed: AtomicU64,
}

/// One connection's device. Cloning shares it.
#[derive(Clone)]
pub struct BlkDevice {
    inner: Arc<DeviceInner>,
}

pub(crate) struct DeviceInner {
    pub(crate) export: Arc<Export>,
    pub(crate) queues: Vec<QueueShared>,
    /// The guest's memory, as the frontend last mapped it.
    pub(crate) mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
}

impl BlkDevice {
    /// A device serving `export` for one frontend connection. `mem` is the
    /// map the daemon updates as the frontend sends its memory table.
    pub fn new(
        export: Arc<Export>,
        mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ) -> io::Result<Self> {
        let queues = (0..export.options().num_queues)
            .map(|_| {
                Ok(QueueShared {
                    ring_event: EventFd::new(EFD_NONBLOCK)?,
                    wake: EventFd::new(EFD_NONBLOCK)?,
                    busy: AtomicBool::new(false),
                    in_flight: AtomicUsize::new(0),
                    completed: AtomicU64::new(0),
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(BlkDevice {
            inner: Arc::new(DeviceInner {
                export,
                queues,
                mem,
            }),
        })
    }

    /// The epoll token of a worker's io_uring eventfd: the first one
    /// vhost-user-backend leaves to the device.
    fn ring_token(&self) -> u64 {
        self.inner.queues.len() as u64 + 1
    }

    /// The epoll token of a worker's wake eventfd.
    fn wake_token(&self) -> u64 {
        self.ring_token() + 1
    }

    /// Registers each worker's io_uring and wake eventfds in that worker's
    /// epoll.
    pub fn register_listeners(&self, handlers: &[Arc<VringEpollHandler<Self>>]) -> io::Result<()> {
        for (q, h) in self.inner.queues.iter().zip(handlers) {
            h.register_listener(q.ring_event.as_raw_fd(), EventSet::IN, self.ring_token())?;
            h.register_listener(q.wake.as_raw_fd(), EventSet::IN, self.wake_token())?;
        }
        Ok(())
    }

    /// The device as the export tracks it, for draining.
    pub(crate) fn inner(&self) -> &Arc<DeviceInner> {
        &self.inner
    }

    /// Completed requests per queue since the frontend connected.
    pub fn completed_per_queue(&self) -> Vec<u64> {
        self.inner
            .queues
            .iter()
            .map(|q| q.completed.load(Ordering::Relaxed))
            .collect()
    }

    fn wait_idle(&self, queues: impl Iterator<Item = usize>) -> io::Result<()> {
        self.inner.wait_idle(queues, STOP_TIMEOUT)
    }
}

impl DeviceInner {
    /// Waits until the given queues have nothing in flight and are not
    /// taking requests.
    fn wait_idle(&self, queues: impl Iterator<Item = usize>, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in queues {
            let q = &self.queues[i];
            while q.busy.load(Ordering::SeqCst) || q.in_flight.load(Ordering::Acquire) > 0 {
                if Instant::now() > deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("queue {i}: requests still in flight after {timeout:?}"),
                    ));
                }
                thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }

    /// Waits until no queue has a request in flight. Callers have paused
    /// the export, so none starts meanwhile.
    pub(crate) fn wait_quiescent(&self, timeout: Duration) -> io::Result<()> {
        self.wait_idle(0..self.queues.len(), timeout)
    }

    /// Makes every worker look at its virtqueue again.
    pub(crate) fn wake_all(&self) {
        for q in &self.queues {
            if let Err(e) = q.wake.write(1) {
                tracing::error!("cannot wake a queue worker: {e}");
            }
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.inner.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::device_features(self.inner.export.options().read_only)
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
        let bytes = self.inner.export.config().to_bytes();
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
                    offset + buf.len()
                ),
            ));
        };
        let on = buf[at] != 0;
        tracing::info!(
            "guest switched the write cache to {}",
            if on { "write-back" } else { "write-through" }
        );
        self.inner.export.set_writeback(on);
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        // Workers pick the new map up from their vring on the next kick;
        // requests in flight keep the old one mapped until they finish.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.queues.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .inspect_err(|e| tracing::error!("cannot create a worker exit event: {e}"))
            .ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.wait_idle(
            std::iter::once(queue_index as usize).filter(|&q| q < self.inner.queues.len()),
        )
    }

    fn reset_device(&self) {
        if let Err(e) = self.wait_idle(0..self.inner.queues.len()) {
            tracing::error!("device reset: {e}");
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the worker thread, so every failure is
        // handled (and logged) inside.
        let event = match u64::from(device_event) {
            t if t == self.ring_token() => worker::Event::Completions,
            t if t == self.wake_token() => worker::Event::Wake,
            _ => worker::Event::Kick,
        };
        if let Some(vring) = vrings.first() {
            worker::handle(&self.inner, thread_id, event, vring);
        }
        Ok(())
    }
}
