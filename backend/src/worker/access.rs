//! Two ways to read and write one split virtqueue behind one trait, so
//! intake has a single take/publish loop: the rings mapped once per memory
//! map (the fast path), and virtio-queue's walkers (rings that straddle
//! memory regions).

use std::io;
use std::num::Wrapping;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::virtio::memory::MemHandle;
use crate::virtio::request::{self, Limits, Rejected, Request};
use crate::virtio::ring::Rings;

/// A chain taken from the avail ring: its head, and its validation.
pub(crate) type Taken = (u16, Result<Request, Rejected>);

/// One split ring, read and written while the caller holds the queue.
pub(crate) trait RingAccess {
    /// True while this access still describes `q`'s rings.
    fn fits(&self, q: &Queue) -> bool;
    /// Entries the driver has made available past `q.next_avail()`; an
    /// error when its index runs further ahead than the ring is long.
    fn pending(&self, q: &Queue) -> Result<u16, String>;
    /// Takes the next available chain. `None` when the ring yields none
    /// (it was empty after all, or it is broken).
    fn take(&self, q: &mut Queue, limits: &Limits) -> Option<Taken>;
    /// Puts a used element at `q.next_used()` and advances it; the driver
    /// sees it only after [`RingAccess::publish`].
    fn put_used(&self, q: &mut Queue, head: u16, len: u32) -> Result<(), String>;
    /// Publishes the used elements put since `old`; true when the driver
    /// asked to be notified.
    fn publish(&self, q: &mut Queue, old: u16) -> bool;
    /// Asks for a kick once the driver adds the next entry; true when
    /// entries arrived meanwhile (look again before sleeping).
    fn rearm(&self, q: &mut Queue) -> bool;
    /// The guest memory the rings are read through.
    fn memory(&self) -> &MemHandle;
}

/// The rings mapped into this process.
pub(crate) struct Mapped(pub Rc<Rings>);

impl RingAccess for Mapped {
    fn fits(&self, q: &Queue) -> bool {
        self.0.matches(q, self.0.memory())
    }

    fn pending(&self, q: &Queue) -> Result<u16, String> {
        let next = q.next_avail();
        // GUEST-INPUT: the avail index; it is read once per batch.
        let avail = self.0.avail_idx();
        let pending = avail.wrapping_sub(next);
        if pending > self.0.size() {
            return Err(format!(
                "avail index {avail} is {pending} entries ahead of {next}"
            ));
        }
        Ok(pending)
    }

    fn take(&self, q: &mut Queue, limits: &Limits) -> Option<Taken> {
        let next = q.next_avail();
        // GUEST-INPUT: the head; read once, then only the copy is used.
        let head = self.0.avail_head(next);
        q.set_next_avail(next.wrapping_add(1));
        let rings = &self.0;
        let parsed = request::parse_descs(head, rings.chain(head), rings.memory(), limits);
        Some((head, parsed))
    }

    fn put_used(&self, q: &mut Queue, head: u16, len: u32) -> Result<(), String> {
        if head >= self.0.size() {
            return Err(format!("head {head} is out of range"));
        }
        let next = q.next_used();
        self.0.put_used(next, head, len);
        q.set_next_used(next.wrapping_add(1));
        Ok(())
    }

    fn publish(&self, q: &mut Queue, old: u16) -> bool {
        self.0.publish_used(old, q.next_used())
    }

    fn rearm(&self, q: &mut Queue) -> bool {
        self.0.rearm(q.next_avail())
    }

    fn memory(&self) -> &MemHandle {
        self.0.memory()
    }
}

/// virtio-queue's walkers over the whole memory map.
pub(crate) struct Generic(pub MemHandle);

impl RingAccess for Generic {
    // Reads any layout; a layout that can now be mapped is mapped on the
    // next pass.
    fn fits(&self, _q: &Queue) -> bool {
        true
    }

    fn pending(&self, q: &Queue) -> Result<u16, String> {
        let avail = q
            .avail_idx(&*self.0, Ordering::Acquire)
            .map_err(|e| format!("cannot read the avail index: {e}"))?;
        let pending = (avail - Wrapping(q.next_avail())).0;
        if pending > q.size() {
            return Err(format!(
                "avail index {} is {pending} entries ahead of {}",
                avail.0,
                q.next_avail()
            ));
        }
        Ok(pending)
    }

    fn take(&self, q: &mut Queue, limits: &Limits) -> Option<Taken> {
        let chain = q.pop_descriptor_chain(&*self.0)?;
        let head = chain.head_index();
        Some((head, request::parse(chain, &self.0, limits)))
    }

    fn put_used(&self, q: &mut Queue, head: u16, len: u32) -> Result<(), String> {
        q.add_used(&*self.0, head, len).map_err(|e| e.to_string())
    }

    fn publish(&self, q: &mut Queue, _old: u16) -> bool {
        q.needs_notification(&*self.0).unwrap_or(true)
    }

    fn rearm(&self, q: &mut Queue) -> bool {
        q.enable_notification(&*self.0).unwrap_or(false)
    }

    fn memory(&self) -> &MemHandle {
        &self.0
    }
}

/// A virtqueue behind a lock, as vhost-user-backend hands it over.
pub(crate) trait VringLock {
    /// The locked queue.
    type Guard<'a>: LockedVring
    where
        Self: 'a;
    /// Locks the queue.
    fn lock(&self) -> Self::Guard<'_>;
}

/// A locked virtqueue.
pub(crate) trait LockedVring {
    /// The queue's state.
    fn queue(&mut self) -> &mut Queue;
    /// The frontend enabled the ring (SET_VRING_ENABLE).
    fn enabled(&self) -> bool;
    /// Interrupts the driver.
    fn notify(&self) -> io::Result<()>;
}

type Gm = GuestMemoryAtomic<GuestMemoryMmap<()>>;

impl VringLock for VringMutex<Gm> {
    type Guard<'a> = MutexGuard<'a, VringState<Gm>>;

    fn lock(&self) -> Self::Guard<'_> {
        self.get_mut()
    }
}

impl LockedVring for MutexGuard<'_, VringState<Gm>> {
    fn queue(&mut self) -> &mut Queue {
        self.get_queue_mut()
    }

    fn enabled(&self) -> bool {
        self.is_enabled()
    }

    fn notify(&self) -> io::Result<()> {
        self.signal_used_queue()
    }
}
