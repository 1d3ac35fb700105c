//! A minimal vhost-user-blk frontend, for what blkio cannot send: GET_ID,
//! malformed chains, and requests a read-only-aware client would not issue.
//!
//! Guest memory is a memfd shared with the daemon. Queue `q`'s rings sit at
//! `q * RING_STRIDE`; test buffers live from [`DATA`] up.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size.
pub const MEM_SIZE: usize = 16 << 20;
/// Where test buffers start.
pub const DATA: u64 = 1 << 20;
/// Descriptors per queue, unless [`Options`] says otherwise.
pub const QUEUE_SIZE: u16 = 64;
const RING_STRIDE: u64 = 0x4000;
/// Descriptor flag: device-writable.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: chained.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

struct Queue {
    kick: EventFd,
    _call: EventFd,
    base: u64,
    next_avail: u16,
    last_used: u16,
}

/// A connected frontend with `n` queues, all enabled.
pub struct TestFrontend {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    queues: Vec<Queue>,
    setup: Setup,
}

/// What the frontend negotiates, beyond the features every test needs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Descriptors per queue (at most 256: the rings' spacing).
    pub queue_size: u16,
    /// VIRTIO_RING_F_EVENT_IDX: the driver kicks only when the device's
    /// avail_event asks for it (see [`TestFrontend::needs_kick`]).
    pub event_idx: bool,
    /// Take the inflight region when the daemon offers it, as QEMU does.
    pub inflight: bool,
    /// Hand the daemon a dirty-log bitmap and turn VHOST_F_LOG_ALL on, as
    /// QEMU does while migrating (see [`TestFrontend::dirty_pages`]).
    pub dirty_log: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queue_size: QUEUE_SIZE,
            event_idx: false,
            inflight: true,
            dirty_log: false,
        }
    }
}

/// VHOST_F_LOG_ALL.
const LOG_ALL: u64 = 1 << 26;

/// What a (re)connection sets up again.
struct Setup {
    /// The guest memory's memfd.
    file: File,
    regions: Vec<(u64, u64)>,
    changes: Option<Arc<ConfigChanges>>,
    /// The inflight region the daemon handed over, kept across
    /// reconnects.
    inflight: Option<(VhostUserInflight, File)>,
    options: Options,
    /// The virtio features acked, without LOG_ALL.
    features: u64,
    /// The dirty-log bitmap, one bit per 4 KiB page, when logging.
    log: Option<File>,
}

/// The backend-request channel's frontend end, served by the vhost
/// crate's own `FrontendReqHandler` on a thread: counts the config-change
/// messages the daemon sends, and acks each.
#[derive(Default)]
pub struct ConfigChanges(AtomicU64);

impl ConfigChanges {
    /// How many arrived so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits until more than `seen` arrived; the count then.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let n = self.count();
            if n > seen {
                return Some(n);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> std::io::Result<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// One descriptor: guest address, length, flags.
pub type Desc = (u64, u32, u16);

impl TestFrontend {
    /// Connects to `socket` and sets up `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: usize) -> TestFrontend {
        Self::connect_opts(socket, num_queues, Options::default())
    }

    /// Like [`connect`](Self::connect), negotiating as `options` says.
    pub fn connect_opts(socket: &Path, num_queues: usize, options: Options) -> TestFrontend {
        Self::connect_with(
            socket,
            num_queues,
            &[(0, MEM_SIZE as u64)],
            0,
            None,
            options,
        )
    }

    /// Like [`connect`](Self::connect), with the BACKEND_REQ protocol
    /// feature and a backend-request channel: the daemon's config-change
    /// messages are counted.
    pub fn connect_with_channel(
        socket: &Path,
        num_queues: usize,
    ) -> (TestFrontend, Arc<ConfigChanges>) {
        let changes = Arc::new(ConfigChanges::default());
        let fe = Self::connect_with(
            socket,
            num_queues,
            &[(0, MEM_SIZE as u64)],
            0,
            Some(Arc::clone(&changes)),
            Options::default(),
        );
        (fe, changes)
    }

    /// Like [`connect`](Self::connect), but guest memory is two regions
    /// split at `split` (page aligned) and every queue's rings start
    /// `ring_offset` bytes later: rings across the split cannot be mapped
    /// whole, so the device serves them through its general path.
    pub fn connect_split(
        socket: &Path,
        num_queues: usize,
        split: u64,
        ring_offset: u64,
    ) -> TestFrontend {
        let regions = [(0, split), (split, MEM_SIZE as u64 - split)];
        Self::connect_with(
            socket,
            num_queues,
            &regions,
            ring_offset,
            None,
            Options::default(),
        )
    }

    fn connect_with(
        socket: &Path,
        num_queues: usize,
        regions: &[(u64, u64)],
        ring_offset: u64,
        changes: Option<Arc<ConfigChanges>>,
        options: Options,
    ) -> TestFrontend {
        assert!(options.queue_size <= 256, "rings are 16 KiB apart");
        let file = memfd(c"strata-test-guest", MEM_SIZE as u64);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let queues = (0..num_queues)
            .map(|q| Queue {
                kick: EventFd::new(0).unwrap(),
                _call: EventFd::new(0).unwrap(),
                base: q as u64 * RING_STRIDE + ring_offset,
                next_avail: 0,
                last_used: 0,
            })
            .collect();
        let setup = Setup {
            file,
            regions: regions.to_vec(),
            changes,
            inflight: None,
            options,
            features: 0,
            log: options
                .dirty_log
                .then(|| memfd(c"strata-test-log", DIRTY_LOG_SIZE)),
        };
        let fe = Frontend::connect(socket, num_queues as u64).expect("connect");
        let mut t = TestFrontend {
            fe,
            mem,
            queues,
            setup,
        };
        t.handshake();
        t
    }

    /// Connects again to `socket` (a restarted daemon) with the same
    /// guest memory, rings and inflight region, rewinding each ring's
    /// avail index to its used index as QEMU does after a disconnect.
    pub fn reconnect(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        self.fe = loop {
            match Frontend::connect(socket, self.queues.len() as u64) {
                Ok(fe) => break fe,
                Err(e) if Instant::now() > deadline => panic!("reconnect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        self.handshake();
    }

    /// The vhost-user setup, as QEMU's vhost-user-blk sends it (with the
    /// inflight region whenever the daemon offers it): features,
    /// memory, the inflight region (fetched once, then handed back), and
    /// every ring from its used index.
    fn handshake(&mut self) {
        let opts = self.setup.options;
        let qs = opts.queue_size;
        let fe = &mut self.fe;
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_ne!(offered & proto, 0, "PROTOCOL_FEATURES offered");
        let mut wanted = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_RO | proto;
        if opts.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        self.setup.features = offered & wanted;
        fe.set_features(self.setup.features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        let mut need = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if opts.inflight {
            need |= pf & VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        if self.setup.changes.is_some() {
            need |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        if opts.dirty_log {
            need |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        assert!(pf.contains(need), "protocol features {pf:?} lack {need:?}");
        fe.set_protocol_features(need).unwrap();
        if let Some(changes) = &self.setup.changes {
            let mut handler = FrontendReqHandler::new(Arc::clone(changes)).unwrap();
            handler.set_reply_ack_flag(true);
            fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
            std::thread::spawn(move || while handler.handle_request().is_ok() {});
        }
        let host = self.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let table: Vec<_> = self
            .setup
            .regions
            .iter()
            .map(|&(start, len)| VhostUserMemoryRegionInfo {
                guest_phys_addr: start,
                memory_size: len,
                userspace_addr: host + start,
                mmap_offset: start,
                mmap_handle: self.setup.file.as_raw_fd(),
            })
            .collect();
        fe.set_mem_table(&table).unwrap();
        if let Some(log) = &self.setup.log {
            // QEMU's order: the log first, then LOG_ALL with the features.
            let region = VhostUserDirtyLogRegion {
                mmap_size: DIRTY_LOG_SIZE,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            };
            fe.set_log_base(0, Some(region)).unwrap();
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            fe.set_features(self.setup.features | LOG_ALL).unwrap();
            fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        if need.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.setup.inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, self.queues.len() as u16, qs);
                self.setup.inflight = Some(fe.get_inflight_fd(&ask).unwrap());
            }
            let (msg, file) = self.setup.inflight.as_ref().expect("fetched above");
            fe.set_inflight_fd(msg, file.as_raw_fd()).unwrap();
        }
        for (q, queue) in self.queues.iter().enumerate() {
            let (desc, avail, used) = ring_addrs(queue.base, qs);
            fe.set_vring_num(q, qs).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: qs,
                    queue_size: qs,
                    flags: 0,
                    desc_table_addr: host + desc,
                    used_ring_addr: host + used,
                    avail_ring_addr: host + avail,
                    log_addr: None,
                },
            )
            .unwrap();
            let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            fe.set_vring_base(q, u16::from_le(used_idx)).unwrap();
            fe.set_vring_call(q, &queue._call).unwrap();
            fe.set_vring_kick(q, &queue.kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
        }
    }

    /// True when the daemon handed over an inflight region.
    pub fn has_inflight(&self) -> bool {
        self.setup.inflight.is_some()
    }

    /// Queue `q`'s descriptor table, avail ring and used ring.
    pub fn ring_addrs(&self, q: usize) -> (u64, u64, u64) {
        ring_addrs(self.queues[q].base, self.setup.options.queue_size)
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.setup.options.queue_size
    }

    /// With EVENT_IDX, whether the device asked to be kicked for an
    /// avail index moving from `old` to `new` (the spec's
    /// vring_need_event on avail_event). Always true without it.
    pub fn needs_kick(&self, q: usize, old: u16, new: u16) -> bool {
        if !self.setup.options.event_idx {
            return true;
        }
        let (_, _, used) = self.ring_addrs(q);
        fence(Ordering::SeqCst);
        let at = GuestAddress(used + 4 + 8 * u64::from(self.queue_size()));
        let event = u16::from_le(self.mem.read_obj(at).unwrap());
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Turns VHOST_F_LOG_ALL on or off, as QEMU does when a migration
    /// starts and when it ends or fails; the log stays mapped.
    pub fn set_dirty_logging(&mut self, on: bool) {
        assert!(self.setup.log.is_some(), "connected without a dirty log");
        let acked = self.setup.features;
        // Like QEMU, wait for the daemon's ack, so that requests offered
        // next are logged (or not) for sure.
        self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let set = self
            .fe
            .set_features(if on { acked | LOG_ALL } else { acked });
        self.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        set.unwrap();
    }

    /// Clears the dirty log, as QEMU does after each sync.
    pub fn clear_dirty_pages(&self) {
        let log = self
            .setup
            .log
            .as_ref()
            .expect("connected without a dirty log");
        log.write_all_at(&[0; DIRTY_LOG_SIZE as usize], 0).unwrap();
    }

    /// The guest pages the daemon marked in the dirty log so far, or
    /// `None` when not logging.
    pub fn dirty_pages(&self) -> Option<Vec<u64>> {
        let mut bits = vec![0u8; DIRTY_LOG_SIZE as usize];
        self.setup
            .log
            .as_ref()?
            .read_exact_at(&mut bits, 0)
            .unwrap();
        let pages =
            (0..MEM_SIZE as u64 / 4096).filter(|&p| bits[(p / 8) as usize] >> (p % 8) & 1 != 0);
        Some(pages.collect())
    }

    /// The guest memory, to place buffers and read results.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The device's config space (60 bytes).
    pub fn config(&mut self) -> Vec<u8> {
        let (_, payload) = self
            .fe
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .unwrap();
        payload
    }

    /// Writes the config space's `writeback` byte (CONFIG_WCE).
    pub fn set_writeback(&mut self, on: bool) {
        self.fe
            .set_config(32, VhostUserConfigFlags::WRITABLE, &[u8::from(on)])
            .unwrap();
    }

    /// Offered virtio features.
    pub fn features(&self) -> u64 {
        self.fe.get_features().unwrap()
    }

    /// Places descriptors at table indices starting at `first`, linked in
    /// order unless `links` overrides a `next` field, and offers the chain.
    pub fn offer_raw(&mut self, q: usize, first: u16, descs: &[(u64, u32, u16, u16)]) -> u16 {
        self.place(q, first, descs);
        self.offer_head(q, first);
        first
    }

    /// Makes the chain already in the table at `head` available again,
    /// and kicks.
    pub fn offer_head(&mut self, q: usize, head: u16) {
        self.offer_head_quietly(q, head);
        self.kick(q);
    }

    /// Kicks queue `q`.
    pub fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).unwrap();
    }

    /// Makes the chain at `head` available again without kicking.
    pub fn offer_head_quietly(&mut self, q: usize, head: u16) {
        let (_, avail, _) = self.ring_addrs(q);
        let qs = self.queue_size();
        let queue = &mut self.queues[q];
        let slot = queue.next_avail % qs;
        self.mem
            .write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * u64::from(slot)))
            .unwrap();
        queue.next_avail = queue.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(queue.next_avail.to_le(), GuestAddress(avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
    }

    /// Places descriptors at table indices starting at `first` without
    /// offering them.
    pub fn place(&mut self, q: usize, first: u16, descs: &[(u64, u32, u16, u16)]) {
        let (desc, _, _) = self.ring_addrs(q);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let at = GuestAddress(desc + 16 * u64::from(first + i as u16));
            self.mem.write_obj(addr.to_le(), at).unwrap(); // addr
            self.mem
                .write_obj(len.to_le(), at.unchecked_add(8))
                .unwrap(); // len
            self.mem
                .write_obj(flags.to_le(), at.unchecked_add(12))
                .unwrap(); // flags
            self.mem
                .write_obj(next.to_le(), at.unchecked_add(14))
                .unwrap(); // next
        }
    }

    /// Publishes `idx` as queue `q`'s avail index, whatever the ring holds,
    /// and kicks: what a buggy or hostile driver might do.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let (_, avail, _) = self.ring_addrs(q);
        self.mem
            .write_obj(idx.to_le(), GuestAddress(avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.queues[q].kick.write(1).unwrap();
    }

    /// Offers a well-linked chain from table index 0 and waits for it.
    /// Returns the used length.
    pub fn run(&mut self, q: usize, descs: &[Desc]) -> u32 {
        let head = self.offer(q, descs);
        let (id, len) = self
            .wait_used(q, Duration::from_secs(10))
            .expect("request completed");
        assert_eq!(id, u32::from(head), "completed the chain we offered");
        len
    }

    /// Offers a well-linked chain from table index 0 without waiting.
    pub fn offer(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let n = descs.len();
        let linked: Vec<(u64, u32, u16, u16)> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                if i + 1 < n {
                    (a, l, f | NEXT, i as u16 + 1)
                } else {
                    (a, l, f & !NEXT, 0)
                }
            })
            .collect();
        self.offer_raw(q, 0, &linked)
    }

    /// Runs one request on queue 0: its header at [`DATA`], the data
    /// buffer `(address, length, flags)` if any, the status byte at
    /// `DATA + 1 MiB`. Returns the status and the used length.
    pub fn request(&mut self, ty: u32, sector: u64, data: Option<Desc>) -> (u8, u32) {
        let (hdr, status) = (DATA, DATA + 0x10_0000);
        self.header(hdr, ty, sector);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut descs = vec![(hdr, 16, 0)];
        descs.extend(data);
        descs.push((status, 1, W));
        let used = self.run(0, &descs);
        (self.byte(status), used)
    }

    /// The used index the device last published on queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        let (_, _, used) = self.ring_addrs(q);
        fence(Ordering::SeqCst);
        u16::from_le(self.mem.read_obj(GuestAddress(used + 2)).unwrap())
    }

    /// Sends GET_VRING_BASE for queue `q`: the device stops the ring.
    pub fn get_vring_base(&mut self, q: usize) -> vhost::Result<u32> {
        self.fe.get_vring_base(q)
    }

    /// Waits for the next used element of queue `q`: (id, len).
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Option<(u32, u32)> {
        let start = Instant::now();
        loop {
            if let Some(e) = self.poll_used(q) {
                return Some(e);
            }
            let waited = start.elapsed();
            if waited > timeout {
                return None;
            }
            // Most requests finish within microseconds: yield before
            // sleeping.
            if waited < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// The next used element of queue `q`, if the device published one.
    pub fn poll_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let (_, _, used) = self.ring_addrs(q);
        fence(Ordering::SeqCst);
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let qs = self.queue_size();
        let queue = &mut self.queues[q];
        if u16::from_le(idx) == queue.last_used {
            return None;
        }
        let slot = u64::from(queue.last_used % qs);
        let elem = GuestAddress(used + 4 + 8 * slot);
        let id: u32 = self.mem.read_obj(elem).unwrap();
        let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
        queue.last_used = queue.last_used.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }

    /// Writes a request header at `at`.
    pub fn header(&self, at: u64, ty: u32, sector: u64) {
        self.mem.write_obj(ty.to_le(), GuestAddress(at)).unwrap(); // type
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap(); // reserved
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at + 8))
            .unwrap(); // sector
    }

    /// Writes a discard / write-zeroes segment at `at`.
    pub fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at))
            .unwrap(); // sector
        self.mem
            .write_obj(sectors.to_le(), GuestAddress(at + 8))
            .unwrap(); // num_sectors
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap(); // flags
    }

    /// Reads one byte of guest memory.
    pub fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

/// The dirty log's size: one bit per 4 KiB page of guest memory, in one
/// page.
const DIRTY_LOG_SIZE: u64 = 4096;
const _: () = assert!(MEM_SIZE as u64 / 4096 / 8 <= DIRTY_LOG_SIZE);

fn ring_addrs(base: u64, queue_size: u16) -> (u64, u64, u64) {
    let desc = base;
    let avail = desc + 16 * u64::from(queue_size);
    let used = (avail + 6 + 2 * u64::from(queue_size) + 3) & !3;
    (desc, avail, used)
}

/// A zeroed memfd of `len` bytes.
fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}
