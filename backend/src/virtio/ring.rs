//! The split virtqueue's rings, mapped once per memory map: the hot path
//! reads heads and descriptors and writes used elements through host
//! pointers, instead of translating a guest address on every access.
//!
//! It keeps the same rules as virtio-queue's iterators, which remain the
//! reference (and the path for anything unusual): a chain ends at a
//! descriptor without NEXT, after queue-size descriptors, at an index out
//! of range, or at memory that is not mapped; an indirect table is entered
//! once, must be a whole number of descriptors, and may not nest. The
//! used index is published once per batch rather than once per element.

use std::num::Wrapping;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::QueueT;

use vm_memory::{Bytes, GuestAddress};

use crate::virtio::desc::{RawDesc, TableEntry, DESC_LEN};
use crate::virtio::memory::MemHandle;

/// Where one queue's rings are, for a given memory map.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Layout {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
}

/// A queue's rings mapped into this process.
pub struct Rings {
    layout: Layout,
    mem: MemHandle,
    desc: NonNull<u8>,
    avail: NonNull<u8>,
    used: NonNull<u8>,
}

impl Rings {
    /// Maps `queue`'s rings in `mem`, or `None` when a ring is not wholly
    /// inside one region (the slow path then serves the queue).
    pub fn new<Q: QueueT>(queue: &Q, mem: &MemHandle) -> Option<Rings> {
        let layout = Layout {
            size: queue.size(),
            desc: queue.desc_table(),
            avail: queue.avail_ring(),
            used: queue.used_ring(),
            event_idx: queue.event_idx_enabled(),
        };
        let n = usize::from(layout.size);
        Some(Rings {
            desc: mem.host_ptr(layout.desc, DESC_LEN * n, 16)?,
            avail: mem.host_ptr(layout.avail, 6 + 2 * n, 2)?,
            used: mem.host_ptr(layout.used, 6 + 8 * n, 4)?,
            layout,
            mem: mem.clone(),
        })
    }

    /// True while these mappings still describe `queue` in `mem`.
    pub fn matches<Q: QueueT>(&self, queue: &Q, mem: &MemHandle) -> bool {
        self.mem.same(mem)
            && self.layout
                == Layout {
                    size: queue.size(),
                    desc: queue.desc_table(),
                    avail: queue.avail_ring(),
                    used: queue.used_ring(),
                    event_idx: queue.event_idx_enabled(),
                }
    }

    fn u16_at(&self, base: NonNull<u8>, offset: usize) -> &AtomicU16 {
        // SAFETY: `base` maps a ring of this layout in memory that `self.mem`
        // keeps mapped, every caller's offset lies inside it, and 2-byte
        // alignment holds: the ring bases are checked at least that aligned
        // and the offsets are even. The guest writes these fields
        // concurrently, which atomics allow.
        unsafe { AtomicU16::from_ptr(base.as_ptr().add(offset).cast()) }
    }

    /// The driver's avail index.
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, 2).load(Ordering::Acquire))
    }

    /// The head of avail entry `i` (counted from the start, wrapping).
    pub fn avail_head(&self, i: u16) -> u16 {
        let slot = usize::from(i % self.layout.size);
        u16::from_le(
            self.u16_at(self.avail, 4 + 2 * slot)
                .load(Ordering::Relaxed),
        )
    }

    /// The descriptors of the chain starting at `head`, as the rules in the
    /// module docs end it.
    pub fn chain(&self, head: u16) -> Chain<'_> {
        Chain {
            mem: &self.mem,
            table: Table::Mapped(self.desc),
            table_len: self.layout.size,
            next: head,
            ttl: self.layout.size,
            indirect: false,
            bytes: 0,
        }
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Writes a used element at position `next_used`. Visible to the
    /// driver only after [`Rings::publish_used`].
    pub fn put_used(&self, next_used: u16, head: u16, len: u32) {
        let slot = usize::from(next_used % self.layout.size);
        // SAFETY: the element lies inside the mapped used ring (checked at
        // `new`), 4-byte aligned as the ring base is; the driver does not
        // read it before the index that covers it is published with
        // Release ordering.
        unsafe {
            let p = self.used.as_ptr().add(4 + 8 * slot);
            p.cast::<u32>().write_volatile(u32::from(head).to_le());
            p.add(4).cast::<u32>().write_volatile(len.to_le());
        }
    }

    /// Publishes the used index, and says whether the driver asked to be
    /// notified for an element in `old..new` (always, without EVENT_IDX).
    pub fn publish_used(&self, old: u16, new: u16) -> bool {
        self.u16_at(self.used, 2)
            .store(new.to_le(), Ordering::Release);
        if !self.layout.event_idx {
            return true;
        }
        // The index must be visible before the driver's wish is read.
        fence(Ordering::SeqCst);
        let at = 4 + 2 * usize::from(self.layout.size);
        let used_event = Wrapping(u16::from_le(
            self.u16_at(self.avail, at).load(Ordering::Relaxed),
        ));
        let (old, new) = (Wrapping(old), Wrapping(new));
        new - used_event - Wrapping(1) < new - old
    }

    /// Asks the driver to notify (kick) once it adds entry `next_avail`,
    /// and says whether entries arrived meanwhile. Without EVENT_IDX the
    /// driver always notifies.
    pub fn rearm(&self, next_avail: u16) -> bool {
        if self.layout.event_idx {
            let at = 4 + 8 * usize::from(self.layout.size);
            self.u16_at(self.used, at)
                .store(next_avail.to_le(), Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        u16::from_le(self.u16_at(self.avail, 2).load(Ordering::Relaxed)) != next_avail
    }

    /// The memory map the rings are in.
    pub fn memory(&self) -> &MemHandle {
        &self.mem
    }
}

/// The descriptors of one chain.
pub struct Chain<'a> {
    mem: &'a MemHandle,
    table: Table,
    table_len: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

/// Where a chain's descriptors are read from.
#[derive(Clone, Copy)]
enum Table {
    /// Mapped whole into this process.
    Mapped(NonNull<u8>),
    /// An indirect table across memory regions, read descriptor by
    /// descriptor at this guest address.
    Guest(u64),
}

impl<'a> Chain<'a> {
    /// The chain starting at `head` of the descriptor table at guest
    /// address `desc` with `size` entries, read descriptor by descriptor
    /// through `mem`: for the rare chain taken other than from the avail
    /// ring (one resubmitted after a restart), wherever the table lies.
    pub fn in_guest(mem: &'a MemHandle, desc: u64, size: u16, head: u16) -> Chain<'a> {
        Chain {
            mem,
            table: Table::Guest(desc),
            table_len: size,
            next: head,
            ttl: size,
            indirect: false,
            bytes: 0,
        }
    }

    fn read(&self, index: u16) -> Option<TableEntry> {
        let at = DESC_LEN * usize::from(index);
        // GUEST-INPUT: the guest may rewrite the descriptor while we read;
        // one load takes a snapshot, and only the snapshot is used.
        let entry = match self.table {
            // SAFETY: `p` maps `table_len` descriptors (the queue's table,
            // checked at `Rings::new`, or an indirect table mapped whole by
            // `enter`) and `index < table_len`. An 8-aligned descriptor is
            // read as two volatile words, any other as one volatile load of
            // 16 bytes: each byte is read once.
            Table::Mapped(p) => unsafe {
                let d = p.as_ptr().add(at);
                if d as usize % 8 == 0 {
                    let [a, b] = d.cast::<[u64; 2]>().read_volatile();
                    TableEntry::from_words(u64::from_le(a), u64::from_le(b))
                } else {
                    TableEntry::from_bytes(d.cast::<[u8; DESC_LEN]>().read_volatile())
                }
            },
            Table::Guest(addr) => TableEntry::from_bytes(
                self.mem
                    .read_obj::<[u8; DESC_LEN]>(GuestAddress(addr + at as u64))
                    .ok()?,
            ),
        };
        Some(entry)
    }

    /// Switches to the indirect table `addr`, `len` bytes long.
    fn enter(&mut self, addr: u64, len: u32) -> Option<()> {
        if self.indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
            return None;
        }
        let n = (len / 16) as u16;
        self.table = match self.mem.host_ptr(addr, len as usize, 1) {
            Some(p) => Table::Mapped(p),
            None => Table::Guest(addr),
        };
        self.table_len = n;
        self.next = 0;
        self.ttl = n;
        self.indirect = true;
        Some(())
    }
}

impl Iterator for Chain<'_> {
    type Item = RawDesc;

    fn next(&mut self) -> Option<RawDesc> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let d = self.read(self.next)?;
            if d.indirect() {
                self.enter(d.addr, d.len)?;
                continue;
            }
            // The chain's total stays below 4 GiB, so a used length never
            // wraps.
            self.bytes = self.bytes.checked_add(d.len)?;
            if d.has_next() {
                self.next = d.next;
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d.raw());
        }
    }
}

#[cfg(test)]
mod tests;
