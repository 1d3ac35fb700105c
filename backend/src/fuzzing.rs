//! The guest path in one process, without vhost-user: a virtqueue in a
//! guest memory the caller built, a worker taking its chains, and a
//! `null-co` node serving them. For the guest-path fuzz target and the
//! worker's tests; not built into the daemon.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use strata_formats::null::{NullNode, NullOptions};
use strata_graph::{BlockDriver, Graph};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::export::{Export, ExportOptions};
use crate::queue::QueueState;
use crate::worker::{self, Event, LockedVring, QueueRef, VringLock};

/// A queue with its lock, as vhost-user-backend would hand it over.
pub struct TestVring(Mutex<Queue>);

/// The locked queue.
pub struct TestGuard<'a>(MutexGuard<'a, Queue>);

impl VringLock for TestVring {
    type Guard<'a> = TestGuard<'a>;

    fn lock(&self) -> TestGuard<'_> {
        TestGuard(self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl LockedVring for TestGuard<'_> {
    fn queue(&mut self) -> &mut Queue {
        &mut self.0
    }

    fn enabled(&self) -> bool {
        true
    }

    fn notify(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One queue of an export of a 64 MiB `null-co` node that reads zeroes.
pub struct Harness {
    export: Arc<Export>,
    state: Arc<QueueState>,
    mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    map_version: Arc<std::sync::atomic::AtomicU64>,
    vring: TestVring,
}

impl Harness {
    /// Serves `queue` (set up by the caller) in `mem`.
    pub fn new(mem: GuestMemoryMmap<()>, queue: Queue) -> Harness {
        let graph = Graph::new();
        let node = graph
            .add_node("null0", |_| {
                Ok::<_, std::convert::Infallible>(Arc::new(NullNode::new(NullOptions {
                    size: 64 << 20,
                    read_zeroes: true,
                    latency: Duration::ZERO,
                })) as Arc<dyn BlockDriver>)
            })
            .expect("a null node");
        let mut opts = ExportOptions::new("fuzz0");
        opts.serial = Some("fuzz".into());
        opts.poll_max_ns = 0;
        let export = Export::new(&graph, node, opts).expect("an export");
        Harness {
            export,
            state: Arc::new(QueueState::new().expect("eventfds")),
            mem: GuestMemoryAtomic::new(mem),
            map_version: Arc::default(),
            vring: TestVring(Mutex::new(queue)),
        }
    }

    fn event(&self, event: Event, setup: worker::Setup) {
        let q = QueueRef {
            export: &self.export,
            state: &self.state,
            mem: &self.mem,
            map_version: &self.map_version,
            queue: 0,
        };
        worker::handle_with(q, event, &self.vring, setup);
    }

    /// The guest kicked: the worker takes what is available and runs it.
    pub fn kick(&self) {
        self.event(Event::Kick, worker::setup_io);
    }

    /// A kick to a worker whose io_uring cannot be set up.
    pub fn kick_without_io(&self) {
        self.event(Event::Kick, |_| Err(io::Error::other("no io_uring here")));
    }

    /// The frontend left: the worker tears down. Run the harness on a
    /// thread of its own: the worker stays torn down on it.
    pub fn exit(&self) {
        self.event(Event::Exit, worker::setup_io);
    }

    /// The queue, as the worker left it.
    pub fn queue(&self) -> MutexGuard<'_, Queue> {
        self.vring.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads the fuzzer's input as a stream of choices; past its end, every
/// choice is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
}

/// Bytes at the start of guest memory that hold the rings and every
/// descriptor table; buffers live above them. The used ring, the only
/// structure the device writes, stays in the upper half, apart from the
/// tables it could otherwise rewrite under the device.
const TABLE_AREA: u64 = 0x3000;

/// Builds a virtqueue from `data` in a guest memory of two or three
/// regions (rings and tables may straddle them), runs it through intake
/// and dispatch on a `null-co` node, and checks that nothing outside the
/// chains' writable buffers and the used ring changed, and that no head
/// completed more often than it was offered. Panics on a violation.
pub fn guest_path(data: &[u8]) {
    let mut input = Input(data);
    const PAGE: u64 = 0x1000;
    let mut sizes = vec![
        PAGE * (1 + u64::from(input.byte() % 3)),
        PAGE * (1 + u64::from(input.byte() % 4)),
    ];
    if input.byte() % 2 == 1 {
        sizes.push(PAGE * (1 + u64::from(input.byte() % 8)));
    }
    let total: u64 = sizes.iter().sum::<u64>().max(TABLE_AREA + PAGE);
    let last = sizes.len() - 1;
    sizes[last] = total - sizes[..last].iter().sum::<u64>();
    let mut start = 0;
    let ranges: Vec<(GuestAddress, usize)> = sizes
        .iter()
        .map(|&len| {
            let r = (GuestAddress(start), len as usize);
            start += len;
            r
        })
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");

    // Memory starts out as the input's bytes, so headers, segments and
    // indirect tables are whatever the fuzzer chose.
    let fill: Vec<u8> = (0..total as usize)
        .map(|i| data.get(i % data.len().max(1)).copied().unwrap_or(0))
        .collect();
    mem.write_slice(&fill, GuestAddress(0)).expect("fill");

    let size = 1u16 << (input.byte() % 6);
    let n = u64::from(size);
    let event_idx = input.byte() % 2 == 1;
    let half = TABLE_AREA / 2;
    let place = |input: &mut Input<'_>, from: u64, len: u64, align: u64| {
        (from + u64::from(input.u16()) % (half - len)) & !(align - 1)
    };
    let desc = place(&mut input, 0, 16 * n, 16);
    let avail = place(&mut input, 0, 6 + 2 * n, 2);
    let used = place(&mut input, half, 6 + 8 * n, 4);

    // The descriptor tables: the queue's, and the indirect ones its
    // entries point at (tables live in the table area, buffers above it,
    // or nowhere at all).
    let write_desc = |input: &mut Input<'_>, at: u64| {
        let flags = u16::from(input.byte() & 7);
        let raw_len = input.u32();
        let kind = input.byte();
        let indirect = u32::from(flags) & VRING_DESC_F_INDIRECT != 0;
        let (addr, len) = if indirect {
            let entries = 1 + u64::from(kind % 8);
            let a = (u64::from(input.u16()) % (TABLE_AREA / 2 - 16 * entries)) & !15;
            (a, (16 * entries) as u32)
        } else {
            let span = total - TABLE_AREA;
            let len = match kind % 4 {
                0 => raw_len,
                _ => raw_len % (span as u32 + 1),
            };
            let addr = match kind % 8 {
                7 => u64::from(raw_len) << 20,
                _ => TABLE_AREA + u64::from(input.u32()) % span,
            };
            (addr, len)
        };
        let next = u16::from(input.byte()) % (size + 2);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at)).expect("descriptor");
    };
    let entry = |at: u64| -> (u64, u64, u16) {
        let b = mem
            .read_obj::<[u8; 16]>(GuestAddress(at))
            .unwrap_or([0; 16]);
        (
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from(u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"))),
            u16::from_le_bytes([b[12], b[13]]),
        )
    };
    let indirect = |flags: u16| u32::from(flags) & VRING_DESC_F_INDIRECT != 0;
    for i in 0..n {
        write_desc(&mut input, desc + 16 * i);
    }
    for i in 0..n {
        let (at, len, flags) = entry(desc + 16 * i);
        if indirect(flags) {
            for k in 0..(len / 16).min(TABLE_AREA / 16) {
                write_desc(&mut input, at + 16 * k);
            }
        }
    }

    // The avail ring, and the used ring's starting state.
    let offered = u16::from(input.byte()) % (size + 1);
    let mut offers = vec![0u32; usize::from(size) + 2];
    for i in 0..u64::from(offered) {
        let head = input.u16() % (size + 2);
        offers[usize::from(head)] += 1;
        mem.write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * i))
            .expect("avail entry");
    }
    mem.write_obj(0u16, GuestAddress(avail))
        .expect("avail flags");
    mem.write_obj(offered.to_le(), GuestAddress(avail + 2))
        .expect("avail index");
    mem.write_obj(input.u16().to_le(), GuestAddress(avail + 4 + 2 * n))
        .expect("used_event");
    mem.write_slice(&vec![0; (6 + 8 * n) as usize], GuestAddress(used))
        .expect("used ring");

    // What the device may write: every device-writable buffer of the
    // tables as they now are (the device does not write them).
    let mut writable = Vec::new();
    for i in 0..n {
        let (at, len, flags) = entry(desc + 16 * i);
        let mut table = vec![(at, len, flags)];
        if indirect(flags) {
            // The device reads no more of a table than memory holds.
            table = (0..(len / 16).min(total / 16))
                .map(|k| entry(at + 16 * k))
                .collect();
        }
        for (at, len, flags) in table {
            if u32::from(flags) & VRING_DESC_F_WRITE != 0 && !indirect(flags) {
                writable.push((at, len));
            }
        }
    }
    let mut before = vec![0u8; total as usize];
    mem.read_slice(&mut before, GuestAddress(0))
        .expect("snapshot");
    let mut queue = Queue::new(size).expect("a queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);

    // A worker stays torn down on its thread: give it one of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            let h = Harness::new(mem.clone(), queue);
            h.kick();
            h.kick();
            h.exit();
        })
        .join()
        .expect("the worker did not panic");
    });

    // Nothing changed but writable buffers and the used ring.
    let mut after = vec![0u8; total as usize];
    mem.read_slice(&mut after, GuestAddress(0))
        .expect("snapshot");
    let used_ring = used..used + 6 + 8 * n;
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let i = i as u64;
        if a != b && !used_ring.contains(&i) {
            assert!(
                writable
                    .iter()
                    .any(|&(at, len)| at <= i && i < at.saturating_add(len)),
                "byte {i:#x} changed ({a:#x} -> {b:#x}) outside every writable buffer"
            );
        }
    }
    // No head completed more often than it was offered.
    let done: u16 = mem
        .read_obj::<u16>(GuestAddress(used + 2))
        .map(u16::from_le)
        .expect("used index");
    assert!(done <= offered, "{done} completions of {offered} chains");
    let mut completed = vec![0u32; usize::from(size) + 2];
    for k in 0..u64::from(done) {
        let id = mem
            .read_obj::<u32>(GuestAddress(used + 4 + 8 * (k % n)))
            .map(u32::from_le)
            .expect("used element");
        let slot = completed
            .get_mut(id as usize)
            .unwrap_or_else(|| panic!("completed head {id}, which is out of range"));
        *slot += 1;
        assert!(
            *slot <= offers[id as usize],
            "head {id} completed {} times, offered {}",
            slot,
            offers[id as usize]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(seed: u64, n: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x = seed;
        (0..n).map(move |round| {
            let len = 64 + round * 7 % 1500;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
    }

    #[test]
    fn vhost_user_message_sequences_leave_the_daemon_standing() {
        for data in random(0x1234_5678_9abc_def1, 40) {
            vhost_user_messages(&data);
        }
    }

    #[test]
    fn the_guest_path_holds_for_random_rings() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..300 {
            let len = 64 + round * 7 % 1500;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            guest_path(&data);
        }
    }
}

/// Request codes the vhost-user fuzz target sends (vhost-user.rst).
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const RESET_DEVICE: u32 = 34;
}

/// The order a real frontend sets a device up in, which the fuzzer starts
/// from more often than not, so that later messages reach live rings.
const SETUP: [u32; 11] = [
    req::SET_OWNER,
    req::GET_FEATURES,
    req::SET_FEATURES,
    req::SET_PROTOCOL_FEATURES,
    req::SET_MEM_TABLE,
    req::SET_VRING_NUM,
    req::SET_VRING_ADDR,
    req::SET_VRING_BASE,
    req::SET_VRING_CALL,
    req::SET_VRING_KICK,
    req::SET_VRING_ENABLE,
];

const ANY: [u32; 22] = [
    req::RESET_DEVICE,
    req::GET_FEATURES,
    req::SET_FEATURES,
    req::SET_OWNER,
    req::RESET_OWNER,
    req::SET_MEM_TABLE,
    req::SET_VRING_NUM,
    req::SET_VRING_ADDR,
    req::SET_VRING_BASE,
    req::GET_VRING_BASE,
    req::SET_VRING_KICK,
    req::SET_VRING_CALL,
    req::SET_VRING_ERR,
    req::GET_PROTOCOL_FEATURES,
    req::SET_PROTOCOL_FEATURES,
    req::GET_QUEUE_NUM,
    req::SET_VRING_ENABLE,
    req::GET_CONFIG,
    req::SET_CONFIG,
    req::GET_MAX_MEM_SLOTS,
    req::ADD_MEM_REG,
    req::REM_MEM_REG,
];

/// Guest memory the fuzzer hands the device: one memfd per region, the
/// same bytes each time, so a ring can be found in it.
fn memfd(input: &mut Input<'_>, len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"strata-fuzz".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).expect("memfd size");
    let fill: Vec<u8> = (0..len.min(1 << 16)).map(|_| input.byte()).collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &fill, 0).expect("memfd fill");
    f
}

/// One message of the vhost-user fuzz target: the header, the payload and
/// the descriptors it carries.
fn message(input: &mut Input<'_>, code: u32, files: &mut Vec<std::fs::File>) -> Vec<u8> {
    use vmm_sys_util::eventfd::EventFd;
    let mut body = Vec::new();
    let u32le = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
    let u64le = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
    let queue = u32::from(input.byte() % 3);
    let region = |input: &mut Input<'_>, body: &mut Vec<u8>, files: &mut Vec<std::fs::File>| {
        let pages = 1 + u64::from(input.byte() % 16);
        // Mostly at 0, where the rings are looked for.
        let gpa = match input.byte() % 4 {
            0 => u64::from(input.u16()) << 12,
            k => u64::from(k - 1) << 16,
        };
        u64le(body, gpa); // guest_phys_addr
        u64le(body, pages << 12); // memory_size
        u64le(body, 0x7f00_0000_0000 + gpa); // userspace_addr
        u64le(body, u64::from(input.byte() % 2) << 12); // mmap_offset
        files.push(memfd(input, (pages + 1) << 12));
    };
    match code {
        req::SET_FEATURES | req::SET_PROTOCOL_FEATURES => {
            let v = if input.byte() % 4 == 0 {
                u64::from(input.u32()) | u64::from(input.u32()) << 32
            } else if code == req::SET_FEATURES {
                // Mostly what the device offers.
                crate::virtio::config::device_features(false) | 1 << 30
            } else {
                // MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS.
                0x8209
            };
            u64le(&mut body, v);
        }
        req::SET_MEM_TABLE => {
            let n = 1 + u32::from(input.byte() % 3);
            u32le(&mut body, n);
            u32le(&mut body, 0); // padding
            for _ in 0..n {
                region(input, &mut body, files);
            }
        }
        req::ADD_MEM_REG | req::REM_MEM_REG => {
            u64le(&mut body, 0); // padding
            region(input, &mut body, files);
            if code == req::REM_MEM_REG {
                files.pop();
            }
        }
        req::SET_VRING_NUM | req::SET_VRING_BASE | req::GET_VRING_BASE | req::SET_VRING_ENABLE => {
            u32le(&mut body, queue);
            let num = match code {
                req::SET_VRING_NUM => 1 << (input.byte() % 11),
                req::SET_VRING_ENABLE => u32::from(input.byte() % 2),
                _ => u32::from(input.u16()),
            };
            u32le(&mut body, num);
        }
        req::SET_VRING_ADDR => {
            u32le(&mut body, queue);
            u32le(&mut body, 0); // flags
            let base = 0x7f00_0000_0000 + (u64::from(input.byte()) << 4);
            u64le(&mut body, base); // desc
            u64le(&mut body, base + 0x1000 + (u64::from(input.byte()) << 4)); // used
            u64le(&mut body, base + 0x800 + (u64::from(input.byte()) << 1)); // avail
            u64le(&mut body, 0); // log
        }
        req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
            if input.byte() % 8 == 0 {
                u64le(&mut body, u64::from(queue) | 0x100); // no fd
            } else {
                u64le(&mut body, u64::from(queue));
                let e = EventFd::new(0).expect("eventfd");
                // A kick the worker finds as soon as it is registered.
                let _ = e.write(1);
                // SAFETY: the File takes over the descriptor the EventFd
                // gives up.
                files.push(unsafe {
                    <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(
                        std::os::fd::IntoRawFd::into_raw_fd(e),
                    )
                });
            }
        }
        req::GET_CONFIG | req::SET_CONFIG => {
            let size = u32::from(input.byte() % 80);
            u32le(&mut body, u32::from(input.byte() % 64)); // offset
            u32le(&mut body, size);
            u32le(&mut body, 0); // flags
            body.extend((0..size).map(|_| input.byte()));
        }
        _ => {}
    }
    // Now and then, a header that lies about the payload's size.
    let size = match input.byte() % 16 {
        0 => u32::from(input.u16()),
        _ => body.len() as u32,
    };
    let flags: u32 = 1 | if input.byte() % 4 == 0 { 1 << 3 } else { 0 };
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// Sends a sequence of vhost-user messages chosen by `data` (memory
/// tables, vring num/addr/base/kick, features, config) to a device
/// serving a `null-co` node, then disconnects. The daemon must neither
/// panic nor hang, and must tear the connection down.
pub fn vhost_user_messages(data: &[u8]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    let dir = std::env::temp_dir().join(format!("strata-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a socket directory");
    let path = dir.join(format!("{:?}.sock", std::thread::current().id()));
    let mut listener = vhost::vhost_user::Listener::new(&path, true).expect("a listener");

    let graph = Graph::new();
    let node = graph
        .add_node("null0", |_| {
            Ok::<_, std::convert::Infallible>(Arc::new(NullNode::new(NullOptions {
                size: 64 << 20,
                read_zeroes: true,
                latency: Duration::ZERO,
            })) as Arc<dyn BlockDriver>)
        })
        .expect("a null node");
    let mut opts = ExportOptions::new("fuzz0");
    opts.num_queues = 2;
    opts.poll_max_ns = 0;
    opts.stop_timeout = Duration::from_millis(200);
    let export = Export::new(&graph, node, opts).expect("an export");

    let mut input = Input(data);
    // Connected before the daemon accepts: the connection waits in the
    // listener's backlog.
    let stream = UnixStream::connect(&path).expect("connect to the daemon");
    let client = {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let mut input = Input(&data);
            let setup = input.byte() % 2 == 0;
            let count = 1 + usize::from(input.byte() % 24);
            let mut files = Vec::new();
            for i in 0..count {
                let code = match (setup, SETUP.get(i)) {
                    (true, Some(&c)) => c,
                    _ => ANY[usize::from(input.byte()) % ANY.len()],
                };
                let mut fds_of = Vec::new();
                let msg = message(&mut input, code, &mut fds_of);
                let fds: Vec<i32> = fds_of.iter().map(|f| f.as_raw_fd()).collect();
                if stream.send_with_fds(&[&msg[..]], &fds).is_err() {
                    break;
                }
                files.extend(fds_of);
            }
            // Let the device work on whatever rings it has, then leave.
            std::thread::sleep(Duration::from_millis(u64::from(input.byte() % 4)));
            drop(stream);
            drop(files);
        })
    };
    let _ = input.byte();
    let stop = crate::serve::StopHandle::default();
    if let Err(e) = crate::serve::serve_one(&mut listener, &export, &stop) {
        tracing::debug!("fuzz connection: {e:#}");
    }
    client.join().expect("the client did not panic");
    assert!(!export.connected(), "the connection was torn down");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
}
