//! The inflight region (vhost-user INFLIGHT_SHMFD, split rings): shared
//! memory that the frontend keeps across a reconnect, in which the backend
//! marks each head it takes before the request starts and clears it once
//! the request is on the used ring. A new process resubmits what is still
//! marked, oldest first, so a daemon killed at any instant loses no
//! request and completes none twice.
//!
//! Layout, per queue, as the spec defines it (little-endian):
//! ```text
//!  0  u64 features   (0)          16 + 16 * head:
//!  8  u16 version    (1)              0  u8  inflight
//! 10  u16 desc_num   (queue size)     6  u16 next     (the last batch)
//! 12  u16 last_batch_head             8  u64 counter  (submission order)
//! 14  u16 used_idx
//! ```
//! Each queue's part starts on a 64-byte boundary. Fields are accessed as
//! atomics: the frontend maps the same memory, and a crash keeps every
//! store made before it, in program order.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::shared_map::SharedMap;

/// The region's layout version.
const VERSION: u16 = 1;
/// Per-queue header bytes.
const HEADER: usize = 16;
/// Bytes per descriptor state.
const DESC: usize = 16;
/// Each queue's part is aligned to this.
const ALIGN: usize = 64;

/// Bytes one queue of `queue_size` descriptors takes.
pub fn queue_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// A mapped inflight region, shared with the frontend.
pub struct Region {
    map: SharedMap,
    num_queues: u16,
    queue_size: u16,
}

impl Region {
    /// A new region for `num_queues` queues of `queue_size` in a memfd,
    /// zeroed (every queue uninitialised); returns it with the file to
    /// hand to the frontend.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(Arc<Region>, File)> {
        // SAFETY: a static NUL-terminated name; the new fd is ours.
        let fd = unsafe { libc::memfd_create(c"strata-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let len = queue_bytes(queue_size) * usize::from(num_queues);
        file.set_len(len as u64)?;
        let region = Region::map(&file, 0, len as u64, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps `mmap_size` bytes of `file` at `mmap_offset`, as the frontend
    /// hands them back after a reconnect. The size must hold
    /// `num_queues` queues of `queue_size`.
    pub fn map(
        file: &File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Region>> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        if num_queues == 0 || queue_size == 0 {
            return Err(bad(format!(
                "an inflight region of {num_queues} queues of {queue_size} descriptors"
            )));
        }
        let need = queue_bytes(queue_size) * usize::from(num_queues);
        if mmap_size < need as u64 {
            return Err(bad(format!(
                "an inflight region of {mmap_size} bytes cannot hold {num_queues} queues \
                 of {queue_size} ({need} bytes)"
            )));
        }
        let map = SharedMap::map(file, mmap_offset, need as u64, "inflight region")?;
        Ok(Arc::new(Region {
            map,
            num_queues,
            queue_size,
        }))
    }

    /// How many queues it holds.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The descriptors per queue it was made for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `q`'s part, if the region has one.
    pub fn queue(self: &Arc<Region>, q: usize) -> Option<QueueRegion> {
        (q < usize::from(self.num_queues)).then(|| QueueRegion {
            region: Arc::clone(self),
            base: q * queue_bytes(self.queue_size),
        })
    }
}

/// One queue's part of the region; only that queue's thread writes it.
#[derive(Clone)]
pub struct QueueRegion {
    region: Arc<Region>,
    base: usize,
}

/// What a new process finds in a queue's part.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    /// False for a part just initialised: nothing was tracked in it, and
    /// the ring goes on from where the frontend says (SET_VRING_BASE).
    pub tracked: bool,
    /// Heads still in flight, oldest first: to resubmit before new ones.
    pub resubmit: Vec<u16>,
    /// The counter to give the next head.
    pub next_counter: u64,
}

impl QueueRegion {
    fn at<T>(&self, off: usize) -> &T {
        debug_assert!(off + std::mem::size_of::<T>() <= queue_bytes(self.region.queue_size));
        // SAFETY: `off` is inside this queue's part (every caller bounds
        // it by the queue size), aligned for T (the part is 64-byte
        // aligned and every field sits at a multiple of its size), and
        // atomics of T's size may alias the shared memory.
        unsafe { &*self.region.map.ptr().add(self.base + off).cast::<T>() }
    }

    fn version(&self) -> &AtomicU16 {
        self.at(8)
    }

    fn desc_num(&self) -> &AtomicU16 {
        self.at(10)
    }

    fn last_batch_head(&self) -> &AtomicU16 {
        self.at(12)
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.at(14)
    }

    fn in_range(&self, head: u16) -> bool {
        head < self.region.queue_size
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.at(HEADER + DESC * usize::from(head))
    }

    fn next(&self, head: u16) -> &AtomicU16 {
        self.at(HEADER + DESC * usize::from(head) + 6)
    }

    fn counter(&self, head: u16) -> &AtomicU64 {
        self.at(HEADER + DESC * usize::from(head) + 8)
    }

    /// Before the queue takes its first chain on a ring the frontend set
    /// up (whose used index is `ring_used`, read from guest memory): an
    /// uninitialised part is initialised; an initialised one is
    /// repaired and its heads still in flight are returned.
    ///
    /// The repair: if the frontend's used index is past `used_idx`, the
    /// process died after publishing its last batch but before clearing
    /// it; that batch (the list from `last_batch_head`, as long as the
    /// two indices differ) is cleared now.
    pub fn recover(&self, ring_size: u16, ring_used: u16) -> Recovered {
        let size = ring_size.min(self.region.queue_size);
        if self.version().load(Ordering::Acquire) != VERSION {
            for h in 0..self.region.queue_size {
                self.inflight(h).store(0, Ordering::Relaxed);
            }
            self.desc_num().store(size, Ordering::Relaxed);
            self.used_idx().store(ring_used, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            return Recovered {
                tracked: false,
                resubmit: Vec::new(),
                next_counter: 0,
            };
        }
        let mut batch = ring_used.wrapping_sub(self.used_idx().load(Ordering::Acquire));
        // GUEST-INPUT: the list is the frontend's memory too; it is
        // walked at most the batch size, within the ring.
        let mut head = self.last_batch_head().load(Ordering::Relaxed);
        while batch > 0 && self.in_range(head) {
            self.inflight(head).store(0, Ordering::Relaxed);
            head = self.next(head).load(Ordering::Relaxed);
            batch -= 1;
        }
        self.used_idx().store(ring_used, Ordering::Release);
        let mut live: Vec<(u64, u16)> = (0..size)
            .filter(|&h| self.inflight(h).load(Ordering::Relaxed) == 1)
            .map(|h| (self.counter(h).load(Ordering::Relaxed), h))
            .collect();
        live.sort_unstable();
        let next_counter = live.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Recovered {
            tracked: true,
            resubmit: live.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        }
    }

    /// Marks `head` in flight, as the `counter`-th taken.
    pub fn start(&self, head: u16, counter: u64) {
        if !self.in_range(head) {
            return;
        }
        self.counter(head).store(counter, Ordering::Relaxed);
        self.inflight(head).store(1, Ordering::Release);
    }

    /// Adds `head` to the batch about to be published, before its used
    /// element can be seen. Returns what to hand [`QueueRegion::unput`]
    /// if the element cannot be written after all.
    pub fn put(&self, head: u16) -> u16 {
        let last = self.last_batch_head().load(Ordering::Relaxed);
        if self.in_range(head) {
            self.next(head).store(last, Ordering::Relaxed);
            self.last_batch_head().store(head, Ordering::Release);
        }
        last
    }

    /// Takes back the last [`QueueRegion::put`].
    pub fn unput(&self, last: u16) {
        self.last_batch_head().store(last, Ordering::Release);
    }

    /// After the used index became `used`: clears the batch's heads.
    pub fn published(&self, heads: impl IntoIterator<Item = u16>, used: u16) {
        for h in heads {
            if self.in_range(h) {
                self.inflight(h).store(0, Ordering::Release);
            }
        }
        self.used_idx().store(used, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(r: &Region) -> &[u8] {
        // SAFETY: the whole mapping, read while nothing writes it.
        unsafe { std::slice::from_raw_parts(r.map.ptr(), r.map.len()) }
    }

    #[test]
    fn the_layout_is_the_specs() {
        assert_eq!(queue_bytes(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_bytes(256) % 64, 0);
        let (r, file) = Region::create(2, 8).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 2 * queue_bytes(8) as u64);
        let q1 = r.queue(1).unwrap();
        assert!(r.queue(2).is_none());
        assert!(q1.recover(8, 7).resubmit.is_empty());
        q1.start(3, 0x0102_0304_0506_0708);
        q1.put(3);
        let b = &bytes(&r)[queue_bytes(8)..];
        assert_eq!(&b[8..10], &1u16.to_le_bytes(), "version");
        assert_eq!(&b[10..12], &8u16.to_le_bytes(), "desc_num");
        assert_eq!(&b[12..14], &3u16.to_le_bytes(), "last_batch_head");
        assert_eq!(&b[14..16], &7u16.to_le_bytes(), "used_idx");
        let d = &b[16 + 3 * 16..16 + 4 * 16];
        assert_eq!(d[0], 1, "inflight");
        assert_eq!(
            &d[8..16],
            &0x0102_0304_0506_0708u64.to_le_bytes(),
            "counter"
        );
        assert!(
            bytes(&r)[..queue_bytes(8)].iter().all(|&b| b == 0),
            "queue 0 untouched"
        );
    }

    #[test]
    fn a_new_process_resubmits_what_was_in_flight_oldest_first() {
        let (r, file) = Region::create(1, 16).unwrap();
        let q = r.queue(0).unwrap();
        q.recover(16, 0);
        for (i, h) in [5u16, 2, 9, 7].into_iter().enumerate() {
            q.start(h, i as u64);
        }
        // 2 and 7 complete in one batch; the used index moves to 2.
        q.put(2);
        q.put(7);
        q.published([2, 7], 2);
        drop(q);
        // The process dies; the frontend hands the same file over.
        let again = Region::map(&file, 0, file.metadata().unwrap().len(), 1, 16).unwrap();
        let q = again.queue(0).unwrap();
        assert_eq!(
            q.recover(16, 2),
            Recovered {
                tracked: true,
                resubmit: vec![5, 9],
                next_counter: 3
            }
        );
        drop(r);
    }

    #[test]
    fn a_crash_between_the_used_index_and_the_clearing_is_repaired() {
        let (r, _file) = Region::create(1, 16).unwrap();
        let q = r.queue(0).unwrap();
        q.recover(16, 10);
        for (i, h) in [1u16, 4, 6, 8].into_iter().enumerate() {
            q.start(h, 100 + i as u64);
        }
        // The batch 4, 6, 8 reached the used ring (index 10 -> 13), and
        // the process died before clearing it.
        q.put(4);
        q.put(6);
        q.put(8);
        let rec = q.recover(16, 13);
        assert_eq!(rec.resubmit, vec![1], "only the one not on the used ring");
        assert_eq!(rec.next_counter, 101);
        // An earlier batch's heads, already cleared, are not touched: a
        // later recovery with nothing new changes nothing.
        assert_eq!(q.recover(16, 13).resubmit, vec![1]);
    }

    #[test]
    fn a_region_that_does_not_fit_is_refused() {
        let (_r, file) = Region::create(1, 16).unwrap();
        let len = file.metadata().unwrap().len();
        let e = Region::map(&file, 0, len, 2, 16).err().unwrap();
        assert!(e.to_string().contains("cannot hold 2 queues"), "{e}");
        let e = Region::map(&file, 4096, len, 1, 16).err().unwrap();
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(Region::map(&file, 0, len, 1, 0).is_err());
    }

    #[test]
    fn a_hostile_batch_list_is_walked_within_bounds() {
        let (r, _file) = Region::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.recover(4, 0);
        q.start(1, 0);
        // The frontend scribbles: a list that loops, and a claimed batch
        // of 60000.
        q.next(1).store(1, Ordering::Relaxed);
        q.last_batch_head().store(1, Ordering::Relaxed);
        let rec = q.recover(4, 60000);
        assert!(rec.resubmit.is_empty());
        q.last_batch_head().store(999, Ordering::Relaxed);
        q.start(2, 1);
        assert_eq!(q.recover(4, 60001).resubmit, vec![2]);
    }
}
