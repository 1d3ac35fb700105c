//! The daemon's guest-facing paths in one process, for the fuzz targets
//! and the tests; not built into the daemon. [`Harness`] is the guest path
//! without vhost-user: a virtqueue in a guest memory the caller built, a
//! worker taking its chains, and a `null-co` node serving them.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use strata_formats::null::{NullNode, NullOptions};
use strata_graph::{BlockDriver, Graph};
use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

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
        let mut opts = ExportOptions::new("fuzz0");
        opts.serial = Some("fuzz".into());
        opts.poll_max_ns = 0;
        let export = null_export(opts);
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

    /// The queue's dirty log.
    pub fn log(&self) -> &crate::vhost_user::DirtyLog {
        self.state.log()
    }

    /// The queue, as the worker left it.
    pub fn queue(&self) -> MutexGuard<'_, Queue> {
        self.vring.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

mod guest;
mod input;
mod nbd;
mod vhost_user;

pub use guest::guest_path;
pub use nbd::nbd_client_bytes;
pub use vhost_user::vhost_user_messages;

/// An export of a 64 MiB `null-co` node that reads zeroes.
fn null_export(opts: ExportOptions) -> Arc<Export> {
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
    Export::new(&graph, node, opts, Arc::new(strata_graph::NoEvents)).expect("an export")
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
    fn nbd_negotiations_of_random_bytes_end_cleanly() {
        for data in random(0x0bad_cafe_f00d_0001, 200) {
            nbd_client_bytes(&data);
        }
        // A well-formed start, then noise: the noise reaches the options.
        let mut hello = 3u32.to_be_bytes().to_vec();
        for data in random(0x0bad_cafe_f00d_0002, 200) {
            hello.truncate(4);
            hello.extend(strata_nbd::OptionHeader { option: 7, len: 9 }.encode());
            hello.extend([0, 0, 0, 1, b'n', 0, 1, 0, 3]);
            hello.extend(&data);
            nbd_client_bytes(&hello);
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
