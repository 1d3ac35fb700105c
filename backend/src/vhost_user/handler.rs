//! The frontend's requests, as the vhost crate parses them: features,
//! guest memory, the vrings and their eventfds, and the config space.
//!
//! ```text
//!  control thread (this handler)              queue thread i
//!  ──────────────────────────────            ──────────────────────────
//!  features, config, memory, vring setup      epoll: kick ─┐
//!  kick watched while started and enabled     epoll: io_uring, wake,  ├▶ worker::handle
//!  GET_VRING_BASE: waits until queue i         exit ──────────────────┘
//!    owes nothing
//!  end of connection: every worker tears down on its thread, threads joined
//! ```
//!
//! Nothing is locked across queues: each queue's state lives on its
//! thread, and what others see of it is its [`QueueState`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

use super::dirty_log::Bitmap;
use super::inflight_region::{queue_bytes, Region};
use super::queue_thread::{QueueCtx, QueueThread};
use super::Vring;
use crate::export::Export;
use crate::queue::{QueueState, Queues};
use crate::virtio::config::{self, CONFIG_LEN, WRITEBACK_OFFSET};

/// Largest virtqueue the device accepts (QEMU's limit too).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest config read vhost-user allows.
const MAX_CONFIG_SIZE: usize = 256;
/// How long a device reset waits for each queue's requests.
const RESET_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the workers of a connection that ended get to tear down.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU's vhost limit).
const MAX_MEM_SLOTS: u64 = 509;

/// The protocol features offered.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// VHOST_F_LOG_ALL: the device logs its writes to guest memory.
const LOG_ALL: u64 = 1 << 26;

/// Where a region of guest memory sits in the frontend's address space.
struct Mapping {
    frontend_addr: u64,
    size: u64,
    gpa: u64,
}

/// One frontend connection's device.
pub(crate) struct Handler {
    export: Arc<Export>,
    queues: Arc<Queues>,
    vrings: Vec<Vring>,
    threads: Vec<QueueThread>,
    mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    /// Bumped after every change of `mem`, so workers notice a change with
    /// one atomic load.
    map_version: Arc<AtomicU64>,
    mappings: Vec<Mapping>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
}

impl Handler {
    /// A device serving `export`, with one thread per queue.
    pub fn new(export: Arc<Export>) -> io::Result<Handler> {
        let n = usize::from(export.options().num_queues);
        let queues = Arc::new(Queues::new(n)?);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let map_version = Arc::new(AtomicU64::new(0));
        let mut h = Handler {
            export,
            queues,
            vrings: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            mem,
            map_version,
            mappings: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
        };
        let states: Vec<_> = h.queues.iter().cloned().collect();
        for (queue, state) in states.into_iter().enumerate() {
            let vring = Vring::new(h.mem.clone(), MAX_QUEUE_SIZE)
                .map_err(|e| io::Error::other(format!("cannot set up vring {queue}: {e}")))?;
            h.vrings.push(vring.clone());
            let ctx = QueueCtx {
                export: Arc::clone(&h.export),
                state,
                mem: h.mem.clone(),
                map_version: Arc::clone(&h.map_version),
                vring,
                queue,
            };
            match QueueThread::spawn(ctx) {
                Ok(t) => h.threads.push(t),
                Err(e) => {
                    h.shutdown();
                    return Err(io::Error::other(format!(
                        "cannot start queue {queue}'s thread: {e}"
                    )));
                }
            }
        }
        Ok(h)
    }

    /// The device's queues, as the export drains them.
    pub fn queues(&self) -> &Arc<Queues> {
        &self.queues
    }

    /// The protocol features the frontend acked.
    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::from_bits_truncate(self.acked_protocol_features)
    }

    /// Ends the connection's queues: each worker tears down on its own
    /// thread (nothing more reaches the rings, and the kernel lets go of
    /// guest memory before it is unmapped), and the threads are joined.
    pub fn shutdown(&mut self) {
        let threads = std::mem::take(&mut self.threads);
        match self.queues.exit_all(TEARDOWN_TIMEOUT) {
            Ok(()) => threads.into_iter().for_each(QueueThread::join),
            Err(e) => {
                // Joining a worker that never tore down would hang this
                // thread, and with it the export: leave it behind instead.
                tracing::error!(
                    "export '{}': {e}; leaving its threads behind",
                    self.export.options().id
                );
                std::mem::forget(threads);
            }
        }
    }

    fn vring(&self, index: u32) -> VuResult<&Vring> {
        self.vrings.get(index as usize).ok_or(VuError::InvalidParam)
    }

    fn state(&self, index: u32) -> VuResult<&Arc<QueueState>> {
        self.queues.get(index as usize).ok_or(VuError::InvalidParam)
    }

    /// Watches the ring's kick while the ring is started and enabled, so
    /// no notification is handled outside that and none is lost.
    fn update_watch(&mut self, index: u32) -> VuResult<()> {
        let vring = self.vring(index)?;
        let fd = {
            let s = vring.get_ref();
            let on = s.get_queue().ready() && s.is_enabled();
            s.get_kick().as_ref().filter(|_| on).map(|k| k.as_raw_fd())
        };
        let thread = self
            .threads
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)?;
        thread.watch_kick(fd).map_err(VuError::ReqHandlerError)?;
        if fd.is_some() {
            // The worker looks at the ring at once: after a reconnect,
            // what the inflight region holds must restart without a kick.
            let _ = self.state(index)?.wake.write(1);
        }
        Ok(())
    }

    /// A ring starts once it has both eventfds.
    fn start_if_complete(&mut self, index: u32) -> VuResult<()> {
        let vring = self.vring(index)?;
        let start = {
            let s = vring.get_ref();
            !s.get_queue().ready() && s.get_kick().is_some()
        };
        if start {
            vring.set_queue_ready(true);
        }
        self.update_watch(index)
    }

    /// The queue count and size of an inflight message, checked.
    fn check_inflight(&self, msg: &VhostUserInflight) -> VuResult<(u16, u16)> {
        let (n, size) = (msg.num_queues, msg.queue_size);
        if n == 0 || usize::from(n) > self.queues.len() || size == 0 || size > MAX_QUEUE_SIZE {
            return Err(invalid(format!(
                "an inflight region for {n} queues of {size} (the device has {} queues of at \
                 most {MAX_QUEUE_SIZE})",
                self.queues.len()
            )));
        }
        Ok((n, size))
    }

    fn frontend_to_gpa(&self, addr: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| addr >= m.frontend_addr && addr - m.frontend_addr < m.size)
            .map(|m| addr - m.frontend_addr + m.gpa)
            .ok_or_else(|| {
                VuError::ReqHandlerError(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("ring address {addr:#x} is outside guest memory"),
                ))
            })
    }

    fn memory_changed(&self, mem: GuestMemoryMmap<()>) {
        // Workers pick the new map up on their next batch; requests in
        // flight keep the old one mapped until they finish. The ack goes
        // out after this returns.
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        self.map_version.fetch_add(1, Ordering::Release);
    }
}

fn invalid(what: String) -> VuError {
    VuError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, what))
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for i in 0..self.vrings.len() as u32 {
            self.vring(i)?.set_enabled(false);
            self.update_watch(i)?;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if let Err(e) = q.wait_published(i, RESET_TIMEOUT) {
                tracing::error!("device reset: {e}; abandoning them");
            }
            q.bump_generation();
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(config::device_features(self.export.options().read_only)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | LOG_ALL)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.get_features()? != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES the rings start enabled (the spec's
        // ring states); with it, they keep their state.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for i in 0..self.vrings.len() as u32 {
                self.vring(i)?.set_enabled(true);
                self.update_watch(i)?;
            }
        }
        self.queues.log().set_active(features & LOG_ALL != 0);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            let gpa = r.guest_phys_addr;
            let region = GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(gpa))
                .ok_or_else(|| invalid(format!("memory region at {gpa:#x} wraps")))?;
            regions.push(region);
            mappings.push(Mapping {
                frontend_addr: r.user_addr,
                size: r.memory_size,
                gpa: r.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| invalid(format!("bad memory table: {e}")))?;
        self.memory_changed(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let vring = self.vring(index)?;
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) {
            return Err(invalid(format!(
                "vring {index}: size {num} is not in 1..={MAX_QUEUE_SIZE}"
            )));
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let desc = self.frontend_to_gpa(descriptor)?;
        let avail = self.frontend_to_gpa(available)?;
        let used = self.frontend_to_gpa(used)?;
        let vring = self.vring(index)?;
        // QEMU sends the addresses again, unchanged, on a running ring when
        // it turns dirty logging on or off (the log flag). The ring goes on
        // as it is: rereading the used index under a worker that is
        // publishing would rewind it.
        let running_same = {
            let s = vring.get_ref();
            let q = s.get_queue();
            q.ready() && q.desc_table() == desc && q.avail_ring() == avail && q.used_ring() == used
        };
        if running_same {
            return Ok(());
        }
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| VuError::InvalidParam)?;
        // SET_VRING_BASE restores only the avail index: the used index
        // is the ring's own, as a rebooted driver reset it.
        let idx = vring
            .queue_used_idx()
            .map_err(|_| VuError::BackendInternalError)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    /// GET_VRING_BASE: the ring stops once everything taken from it is on
    /// the used ring. A request that does not finish in time is abandoned:
    /// the queue starts a new generation, so it can never complete into a
    /// ring the frontend sets up again, and the error ends the connection
    /// (QEMU then resubmits from the used index).
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?.set_queue_ready(false);
        self.update_watch(index)?;
        let q = self.state(index)?;
        let timeout = self.export.options().stop_timeout;
        if let Err(e) = q.wait_published(index as usize, timeout) {
            q.bump_generation();
            tracing::error!("GET_VRING_BASE: {e}; abandoning them");
            return Err(VuError::ReqHandlerError(io::Error::new(
                io::ErrorKind::TimedOut,
                e,
            )));
        }
        let vring = self.vring(index)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let index = u32::from(index);
        // Stop watching the old eventfd before it is closed.
        self.threads
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)?
            .watch_kick(None)
            .map_err(VuError::ReqHandlerError)?;
        self.vring(index)?.set_kick(fd);
        self.start_if_complete(index)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let index = u32::from(index);
        self.vring(index)?.set_call(fd);
        self.start_if_complete(index)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if features & !protocol_features().bits() != 0 {
            return Err(invalid(format!(
                "protocol features {features:#x} include some not offered ({:#x})",
                protocol_features().bits()
            )));
        }
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VuError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_watch(index)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // Fields past the ones we fill (secure erase, zoned) read as zero,
        // which means "not offered"; frontends ask for the size they know.
        let bytes = self.export.config().to_bytes();
        let mut out = vec![0u8; (size as usize).min(MAX_CONFIG_SIZE)];
        let start = (offset as usize).min(CONFIG_LEN);
        let n = (CONFIG_LEN - start).min(out.len());
        out[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(out)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Only `writeback` is writable (CONFIG_WCE); QEMU may send it alone
        // or inside a write of the whole space.
        let offset = offset as usize;
        let Some(at) = WRITEBACK_OFFSET
            .checked_sub(offset)
            .filter(|&at| at < buf.len())
        else {
            return Err(invalid(format!(
                "config bytes {offset}..{} are read-only",
                offset.saturating_add(buf.len())
            )));
        };
        let on = buf[at] != 0;
        tracing::info!(
            "guest switched the write cache to {}",
            if on { "write-back" } else { "write-through" }
        );
        self.export.set_writeback(on);
        Ok(())
    }

    // The connection loop takes SET_BACKEND_REQ_FD before the vhost crate
    // sees it (see `channel`), so this is never called.
    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    /// A new, zeroed inflight region for the frontend to keep; it hands
    /// it back with SET_INFLIGHT_FD, now and after every reconnect.
    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = self.check_inflight(msg)?;
        let (region, file) = Region::create(num_queues, queue_size)
            .map_err(|e| invalid(format!("cannot create the inflight region: {e}")))?;
        let size = (queue_bytes(queue_size) * usize::from(num_queues)) as u64;
        drop(region);
        tracing::info!("inflight region: {num_queues} queues of {queue_size}, {size} bytes");
        Ok((
            VhostUserInflight::new(size, 0, num_queues, queue_size),
            file,
        ))
    }

    /// Maps the region the frontend kept: what a previous process left
    /// marked in it is resubmitted when each ring starts.
    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        let (num_queues, queue_size) = self.check_inflight(msg)?;
        let region = Region::map(
            &file,
            msg.mmap_offset,
            msg.mmap_size,
            num_queues,
            queue_size,
        )
        .map_err(|e| invalid(format!("SET_INFLIGHT_FD: {e}")))?;
        for (i, q) in self.queues.iter().enumerate() {
            q.set_inflight(region.queue(i));
        }
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            return Err(invalid(format!("more than {MAX_MEM_SLOTS} memory regions")));
        }
        let gpa = r.guest_phys_addr;
        let region = GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(gpa))
            .ok_or_else(|| invalid(format!("memory region at {gpa:#x} wraps")))?;
        let mem = self
            .mem
            .memory()
            .insert_region(Arc::new(region))
            .map_err(|e| invalid(format!("cannot add a memory region: {e}")))?;
        self.memory_changed(mem);
        self.mappings.push(Mapping {
            frontend_addr: r.user_addr,
            size: r.memory_size,
            gpa: r.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, r: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(r.guest_phys_addr), r.memory_size)
            .map_err(|e| invalid(format!("cannot remove a memory region: {e}")))?;
        self.memory_changed(mem);
        self.mappings.retain(|m| m.gpa != r.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("no device state to transfer"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("no device state to transfer"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    /// The frontend's dirty-log bitmap: marked while LOG_ALL is acked.
    fn set_log_base(&mut self, msg: &VhostUserLog, file: File) -> VuResult<()> {
        let bitmap = Bitmap::map(&file, msg.mmap_offset, msg.mmap_size)
            .map_err(|e| invalid(format!("SET_LOG_BASE: {e}")))?;
        self.queues.log().set_bitmap(bitmap);
        Ok(())
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
        }
    }
}
