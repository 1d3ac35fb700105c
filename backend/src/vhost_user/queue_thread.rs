//! One queue's thread: an epoll over the queue's kick, io_uring, wake and
//! exit eventfds, handing each event to the queue's worker.
//!
//! The control thread adds the kick eventfd while the ring is started and
//! enabled, and removes it otherwise; the other three are watched for the
//! thread's whole life. The thread ends after the worker tears down.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost_user_backend::VringT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::Vring;
use crate::export::Export;
use crate::queue::QueueState;
use crate::worker::{self, Event, QueueRef};

const KICK: u64 = 0;
const RING: u64 = 1;
const WAKE: u64 = 2;
const EXIT: u64 = 3;

/// What a queue's thread serves.
pub(crate) struct QueueCtx {
    pub export: Arc<Export>,
    pub state: Arc<QueueState>,
    pub mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    pub map_version: Arc<AtomicU64>,
    pub vring: Vring,
    pub queue: usize,
}

/// A running queue thread.
pub(crate) struct QueueThread {
    epoll: Arc<Epoll>,
    /// The kick eventfd being watched, if any.
    kick: Option<RawFd>,
    thread: Option<JoinHandle<()>>,
}

impl QueueThread {
    /// Starts the thread of queue `ctx.queue`.
    pub fn spawn(ctx: QueueCtx) -> io::Result<QueueThread> {
        let epoll = Arc::new(Epoll::new()?);
        for (fd, token) in [
            (ctx.state.ring_event.as_raw_fd(), RING),
            (ctx.state.wake.as_raw_fd(), WAKE),
            (ctx.state.exit.as_raw_fd(), EXIT),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let thread = std::thread::Builder::new()
            .name(format!("queue-{}", ctx.queue))
            .spawn({
                let epoll = Arc::clone(&epoll);
                move || run(&epoll, &ctx)
            })?;
        Ok(QueueThread {
            epoll,
            kick: None,
            thread: Some(thread),
        })
    }

    /// Watches `fd` for kicks, or stops watching (`None`). A kick that
    /// came before the watch is still pending on the eventfd, and epoll
    /// reports it at once.
    pub fn watch_kick(&mut self, fd: Option<RawFd>) -> io::Result<()> {
        if self.kick == fd {
            return Ok(());
        }
        if let Some(old) = self.kick.take() {
            // The frontend may have closed it already; then epoll forgot it.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old,
                EpollEvent::new(EventSet::IN, KICK),
            );
        }
        if let Some(fd) = fd {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, KICK),
            )?;
            self.kick = Some(fd);
        }
        Ok(())
    }

    /// Waits for the thread to end (after the worker's exit event).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("a queue thread panicked");
            }
        }
    }
}

fn run(epoll: &Epoll, ctx: &QueueCtx) {
    crate::sandbox::enter_queue_thread();
    let mut events = [EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("queue {}: epoll failed: {e}", ctx.queue);
                return;
            }
        };
        for ev in &events[..n] {
            let event = match ev.data() {
                KICK => match ctx.vring.read_kick() {
                    Ok(true) => Event::Kick,
                    // A disabled ring is not looked at.
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!("queue {}: cannot read its kick: {e}", ctx.queue);
                        continue;
                    }
                },
                RING => Event::Completions,
                WAKE => Event::Wake,
                _ => Event::Exit,
            };
            let q = QueueRef {
                export: &ctx.export,
                state: &ctx.state,
                mem: &ctx.mem,
                map_version: &ctx.map_version,
                queue: ctx.queue,
            };
            worker::handle(q, event, &ctx.vring);
            if event == Event::Exit {
                return;
            }
        }
    }
}
