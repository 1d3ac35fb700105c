//! The L2 cache: slices of L2 tables, shared by every queue. A lookup
//! that hits takes no lock: it loads the L1 copy and the slot of a
//! set-associative table through `arc-swap` and reads the entry with an
//! atomic load. A slice's set is chosen by the guest range it maps, so
//! consecutive ranges fill consecutive sets: a cache with a slot per
//! slice of the disk holds all of them and never evicts. Loading, changing
//! and evicting slices happens only under the image's metadata lock (one
//! writer), so a stale copy can never replace a newer one. Eviction is
//! CLOCK: a hit marks its slice, and a slot's marked clean slice gets a
//! second chance before an unmarked one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use super::entry::L2Entry;
use super::types::Geometry;

/// One loaded slice of an L2 table.
#[derive(Debug)]
pub struct L2Slice {
    /// Host offset of the slice.
    pub offset: u64,
    words: Box<[AtomicU64]>,
    dirty: AtomicBool,
    /// Used since the last eviction pass over its set.
    referenced: AtomicBool,
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
            referenced: AtomicBool::new(true),
        }
    }

    /// Marks the slice used; writes the flag only when it changes, so hot
    /// slices do not bounce a cache line between queues.
    fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
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

/// Where one L2 entry lives: its slice and its index in the slice.
#[derive(Clone, Copy, Debug)]
pub struct SliceAt {
    /// The slice's index counting every slice of every L2 table, which
    /// picks its set.
    pub guest_slice: u64,
    /// Host offset of the slice.
    pub offset: u64,
    /// The entry's index in the slice.
    pub index: usize,
}

/// Slots per set.
const WAYS: usize = 4;

/// One set of the table: a slice lives in the set of the guest slice it
/// maps.
struct Set {
    ways: [ArcSwapOption<L2Slice>; WAYS],
}

/// The L2 slice cache and the L1 copy lookups read.
pub struct L2Cache {
    l1: ArcSwap<Vec<u64>>,
    sets: Box<[Set]>,
    slice_bytes: u64,
    /// Lookups answered from a cached slice, counted by every queue.
    hits: strata_graph::ShardedCounter,
    /// Slices read from the image (under the metadata lock).
    misses: AtomicU64,
}

impl L2Cache {
    /// A cache of `capacity` slices of `slice_bytes` each, in sets of four
    /// slots.
    pub fn new(l1: Vec<u64>, slice_bytes: u64, capacity: usize) -> Self {
        let sets = capacity.max(1).div_ceil(WAYS);
        L2Cache {
            l1: ArcSwap::from_pointee(l1),
            sets: (0..sets)
                .map(|_| Set {
                    ways: Default::default(),
                })
                .collect(),
            slice_bytes,
            hits: Default::default(),
            misses: AtomicU64::new(0),
        }
    }

    /// Lookups answered from the cache, and slices read from the image.
    pub fn stats(&self) -> strata_graph::CacheStats {
        strata_graph::CacheStats {
            name: "l2",
            hits: self.hits.sum(),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Counts a slice read from the image.
    pub fn missed(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes per slice.
    pub fn slice_bytes(&self) -> u64 {
        self.slice_bytes
    }

    fn set_of(&self, guest_slice: u64) -> &Set {
        &self.sets[(guest_slice % self.sets.len() as u64) as usize]
    }

    /// Where entry `l2_index` of the L2 table at host offset `table`
    /// (L1 entry `l1_index`) lives in the cache.
    pub fn locate(&self, g: &Geometry, table: u64, l1_index: u64, l2_index: u64) -> SliceAt {
        let per_slice = self.slice_bytes / g.l2_entry_bytes();
        SliceAt {
            guest_slice: (l1_index * g.l2_entries() + l2_index) / per_slice,
            offset: table + (l2_index / per_slice) * self.slice_bytes,
            index: (l2_index % per_slice) as usize,
        }
    }

    /// Replaces the L1 copy (under the metadata lock).
    pub fn set_l1(&self, l1: &[u64]) {
        self.l1.store(Arc::new(l1.to_vec()));
    }

    /// The slice at `at`, if cached.
    pub fn get(&self, at: &SliceAt) -> Option<Arc<L2Slice>> {
        self.set_of(at.guest_slice).ways.iter().find_map(|w| {
            let s = w.load_full()?;
            (s.offset == at.offset).then(|| {
                s.touch();
                s
            })
        })
    }

    /// Looks `entry` up without loading anything: `Some` when the L1
    /// entry is empty (unallocated) or the slice is cached.
    pub fn lookup(&self, g: &Geometry, l1_index: u64, l2_index: u64) -> Option<L2Entry> {
        let l2 =
            self.l1.load().get(l1_index as usize).copied().unwrap_or(0) & super::types::OFFSET_MASK;
        if l2 == 0 {
            return Some(L2Entry::default());
        }
        let at = self.locate(g, l2, l1_index, l2_index);
        for w in &self.set_of(at.guest_slice).ways {
            let guard = w.load();
            if let Some(s) = guard.as_ref().filter(|s| s.offset == at.offset) {
                s.touch();
                self.hits.add(1);
                return Some(s.entry(g, at.index));
            }
        }
        None
    }

    /// Adds the slice loaded for `at` (under the metadata lock). Fails,
    /// returning the slice, when every slot of its set holds a dirty slice,
    /// so the caller flushes first.
    pub fn insert(&self, at: &SliceAt, slice: Arc<L2Slice>) -> Result<(), Arc<L2Slice>> {
        let set = self.set_of(at.guest_slice);
        let current: [Option<Arc<L2Slice>>; WAYS] =
            std::array::from_fn(|i| set.ways[i].load_full());
        let slot = current
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.offset == slice.offset))
            .or_else(|| current.iter().position(Option::is_none))
            .or_else(|| {
                // Second chance: a used clean slice loses its mark and
                // stays; an unused clean one goes.
                current.iter().position(|c| {
                    let c = c.as_ref().expect("no empty slot left");
                    !c.is_dirty() && !c.referenced.swap(false, Ordering::Relaxed)
                })
            })
            .or_else(|| {
                current
                    .iter()
                    .position(|c| c.as_ref().is_some_and(|c| !c.is_dirty()))
            });
        match slot {
            Some(i) => {
                set.ways[i].store(Some(slice));
                Ok(())
            }
            None => Err(slice),
        }
    }

    /// Every dirty slice.
    pub fn dirty(&self) -> Vec<Arc<L2Slice>> {
        self.sets
            .iter()
            .flat_map(|s| s.ways.iter())
            .filter_map(|w| w.load_full())
            .filter(|s| s.is_dirty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(offset: u64) -> Arc<L2Slice> {
        Arc::new(L2Slice::from_bytes(offset, &[0u8; 512]))
    }

    fn at(guest_slice: u64, offset: u64) -> SliceAt {
        SliceAt {
            guest_slice,
            offset,
            index: 0,
        }
    }

    #[test]
    fn lookups_hit_what_was_inserted_and_eviction_keeps_dirty_slices() {
        let c = L2Cache::new(vec![0x10000], 512, 4);
        let off = |i: u64| 0x10000 + 512 * i;
        for i in 0..4 {
            c.insert(&at(i, off(i)), slice(off(i))).unwrap();
        }
        assert!(c.get(&at(0, off(0))).is_some());
        // Fill far past capacity: every insert lands, while clean slices
        // make room.
        for i in 4..64 {
            c.insert(&at(i, off(i)), slice(off(i))).unwrap();
            assert!(c.get(&at(i, off(i))).is_some());
        }
        // A set of dirty slices refuses more until written back.
        let dirty: Vec<_> = (0..64)
            .filter_map(|i| c.get(&at(i, off(i))))
            .inspect(|s| s.dirty.store(true, Ordering::Release))
            .collect();
        assert!(!dirty.is_empty());
        let refused = (64..256)
            .map(|i| c.insert(&at(i, off(i)), slice(off(i))))
            .find(Result::is_err);
        assert!(refused.is_some(), "a full dirty set refuses");
        assert_eq!(c.dirty().len(), dirty.len());
    }

    #[test]
    fn a_cache_with_a_slot_per_slice_holds_the_whole_disk() {
        let slices = 1000;
        let c = L2Cache::new(vec![0x10000], 512, slices);
        // Tables scattered over the file, as allocation leaves them.
        let off = |i: u64| 0x10000 + 512 * ((i * 7919) % 4096);
        for i in 0..slices as u64 {
            c.insert(&at(i, off(i)), slice(off(i))).unwrap();
        }
        for i in 0..slices as u64 {
            assert!(c.get(&at(i, off(i))).is_some(), "slice {i} was evicted");
        }
    }
}
