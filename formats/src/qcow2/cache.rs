//! The L2 cache: slices of L2 tables, shared by every queue. Lookups that
//! hit take one short lock and read entries with atomic loads; loading,
//! changing and evicting slices happens only under the image's metadata
//! lock, so a stale copy can never replace a newer one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::entry::L2Entry;
use super::types::Geometry;

/// One loaded slice of an L2 table.
pub struct L2Slice {
    /// Host offset of the slice.
    pub offset: u64,
    words: Box<[AtomicU64]>,
    dirty: AtomicBool,
}

impl L2Slice {
    /// A slice loaded from `bytes` (big-endian words).
    pub fn from_bytes(offset: u64, bytes: &[u8]) -> Self {
        let words = bytes
            .chunks_exact(8)
            .map(|w| AtomicU64::new(u64::from_be_bytes(w.try_into().expect("8 bytes"))))
            .collect();
        L2Slice {
            offset,
            words,
            dirty: AtomicBool::new(false),
        }
    }

    /// Entry `i` of the slice.
    pub fn entry(&self, g: &Geometry, i: usize) -> L2Entry {
        if g.extended {
            L2Entry {
                word: self.words[2 * i].load(Ordering::Acquire),
                bitmap: self.words[2 * i + 1].load(Ordering::Acquire),
            }
        } else {
            L2Entry {
                word: self.words[i].load(Ordering::Acquire),
                bitmap: 0,
            }
        }
    }

    /// Changes entry `i` (under the metadata lock).
    pub fn set(&self, g: &Geometry, i: usize, e: L2Entry) {
        if g.extended {
            self.words[2 * i + 1].store(e.bitmap, Ordering::Release);
            self.words[2 * i].store(e.word, Ordering::Release);
        } else {
            self.words[i].store(e.word, Ordering::Release);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// True when the slice differs from the disk.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Marks the slice written.
    pub fn mark_clean(&self) {
        self.dirty.store(false, Ordering::Release);
    }

    /// The slice as bytes for the disk.
    pub fn to_bytes(&self, out: &mut [u8]) {
        for (w, chunk) in self.words.iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&w.load(Ordering::Acquire).to_be_bytes());
        }
    }
}

struct Inner {
    /// A copy of the L1 table, for lookups.
    l1: Vec<u64>,
    slices: HashMap<u64, (Arc<L2Slice>, u64)>,
    clock: u64,
}

/// The L2 slice cache and the L1 copy lookups read.
pub struct L2Cache {
    inner: Mutex<Inner>,
    slice_bytes: u64,
    capacity: usize,
}

impl L2Cache {
    /// A cache of `capacity` slices of `slice_bytes` each.
    pub fn new(l1: Vec<u64>, slice_bytes: u64, capacity: usize) -> Self {
        L2Cache {
            inner: Mutex::new(Inner {
                l1,
                slices: HashMap::new(),
                clock: 0,
            }),
            slice_bytes,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes per slice.
    pub fn slice_bytes(&self) -> u64 {
        self.slice_bytes
    }

    /// Replaces the L1 copy.
    pub fn set_l1(&self, l1: &[u64]) {
        let mut c = self.lock();
        c.l1.clear();
        c.l1.extend_from_slice(l1);
    }

    /// The slice at host offset `offset`, if cached.
    pub fn get(&self, offset: u64) -> Option<Arc<L2Slice>> {
        let mut c = self.lock();
        c.clock += 1;
        let now = c.clock;
        let (s, last) = c.slices.get_mut(&offset)?;
        *last = now;
        Some(Arc::clone(s))
    }

    /// Looks `entry` up without loading anything: `Some` when the L1
    /// entry is empty (unallocated) or the slice is cached.
    pub fn lookup(&self, g: &Geometry, l1_index: u64, l2_index: u64) -> Option<L2Entry> {
        let mut c = self.lock();
        let l2 = c.l1.get(l1_index as usize).copied().unwrap_or(0) & super::types::OFFSET_MASK;
        if l2 == 0 {
            return Some(L2Entry::default());
        }
        let per_slice = self.slice_bytes / g.l2_entry_bytes();
        let offset = l2 + (l2_index / per_slice) * self.slice_bytes;
        c.clock += 1;
        let now = c.clock;
        let (s, last) = c.slices.get_mut(&offset)?;
        *last = now;
        Some(s.entry(g, (l2_index % per_slice) as usize))
    }

    /// Adds a slice. Returns the least recently used clean slice evicted to
    /// make room, if one was; fails (returning the slice) when every slice
    /// is dirty and the cache is full, so the caller flushes first.
    pub fn insert(&self, slice: Arc<L2Slice>) -> Result<(), Arc<L2Slice>> {
        let mut c = self.lock();
        if c.slices.len() >= self.capacity && !c.slices.contains_key(&slice.offset) {
            let victim = c
                .slices
                .iter()
                .filter(|(_, (s, _))| !s.is_dirty())
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    c.slices.remove(&k);
                }
                None => return Err(slice),
            }
        }
        c.clock += 1;
        let now = c.clock;
        c.slices.insert(slice.offset, (slice, now));
        Ok(())
    }

    /// Every dirty slice.
    pub fn dirty(&self) -> Vec<Arc<L2Slice>> {
        self.lock()
            .slices
            .values()
            .filter(|(s, _)| s.is_dirty())
            .map(|(s, _)| Arc::clone(s))
            .collect()
    }
}
