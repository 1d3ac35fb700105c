//! The mapped rings against virtio-queue, the reference: for any
//! descriptor table, a chain yields the same descriptors either way.

use std::sync::Arc;

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const SIZE: u16 = 16;
const TABLES: u64 = 0x8000;
const MEM_SIZE: usize = 0x10000;

/// A descriptor: address, length, flags, next. Indirect ones point at one
/// of four tables at `TABLES`.
fn desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    let flags = prop_oneof![
        4 => Just(VRING_DESC_F_NEXT as u16),
        3 => Just(0u16),
        2 => Just((VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16),
        1 => Just(VRING_DESC_F_WRITE as u16),
        1 => Just(VRING_DESC_F_INDIRECT as u16),
        1 => Just((VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT) as u16),
    ];
    (
        0u64..4,
        any::<u32>(),
        flags,
        0u16..20,
        prop::bool::weighted(0.8),
    )
        .prop_map(|(table, len, flags, next, sane)| {
            if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                // Usually a whole table of 1..8 entries; sometimes a bad length.
                let len = if sane { (len % 8 + 1) * 16 } else { len % 200 };
                (TABLES + table * 0x200, len, flags, next)
            } else {
                (0x1000 + u64::from(len % 0x1000), len % 4096, flags, next)
            }
        })
}

fn write_table(mem: &GuestMemoryMmap, at: u64, descs: &[(u64, u32, u16, u16)]) {
    for (i, &(a, l, f, n)) in descs.iter().enumerate() {
        let p = at + 16 * i as u64;
        mem.write_obj(a.to_le(), GuestAddress(p)).unwrap();
        mem.write_obj(l.to_le(), GuestAddress(p + 8)).unwrap();
        mem.write_obj(f.to_le(), GuestAddress(p + 12)).unwrap();
        mem.write_obj(n.to_le(), GuestAddress(p + 14)).unwrap();
    }
}

fn chains_of(queue: &mut virtio_queue::Queue, mem: &GuestMemoryMmap) -> Vec<Vec<RawDesc>> {
    queue
        .iter(mem)
        .unwrap()
        .map(|chain| {
            chain
                .map(|d| RawDesc {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                    has_next: d.has_next(),
                })
                .collect()
        })
        .collect()
}

proptest! {
    #[test]
    fn chains_match_virtio_queue(
        table in prop::collection::vec(desc(), SIZE as usize),
        indirect in prop::collection::vec(prop::collection::vec(desc(), 8), 4),
        heads in prop::collection::vec(0u16..20, 1..6),
    ) {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        );
        let vq = MockSplitQueue::new(&*mem, SIZE);
        let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
        write_table(&mem, vq.desc_table_addr().0, &table);
        for (i, t) in indirect.iter().enumerate() {
            write_table(&mem, TABLES + 0x200 * i as u64, t);
        }
        // Offer the heads.
        let avail = vq.avail_addr().0;
        for (i, &h) in heads.iter().enumerate() {
            mem.write_obj(h.to_le(), GuestAddress(avail + 4 + 2 * i as u64)).unwrap();
        }
        mem.write_obj((heads.len() as u16).to_le(), GuestAddress(avail + 2)).unwrap();

        let handle = MemHandle::new(Arc::clone(&mem));
        let rings = Rings::new(&queue, &handle).expect("the rings are mapped");
        prop_assert_eq!(rings.avail_idx(), heads.len() as u16);
        let reference = chains_of(&mut queue, &mem);
        for (i, want) in reference.iter().enumerate() {
            let head = rings.avail_head(i as u16);
            prop_assert_eq!(head, heads[i]);
            let got: Vec<RawDesc> = rings.chain(head).collect();
            prop_assert_eq!(&got, want);
        }
    }
}

/// Guest memory of two regions split at `split`: they are contiguous in
/// guest addresses but not in this process.
fn two_regions(split: u64) -> Arc<GuestMemoryMmap> {
    Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), split as usize),
            (GuestAddress(split), MEM_SIZE - split as usize),
        ])
        .unwrap(),
    )
}

proptest! {
    /// With memory in two regions, rings anywhere around the split: the
    /// rings are mapped exactly when none of them crosses it, and then (with
    /// indirect tables and buffers that may cross it) every chain reads as
    /// virtio-queue reads it.
    #[test]
    fn chains_match_virtio_queue_across_memory_regions(
        split_pages in 2u64..15,
        ring_at in 0u64..0x1800,
        table in prop::collection::vec(desc(), SIZE as usize),
        indirect in prop::collection::vec(prop::collection::vec(desc(), 8), 4),
        heads in prop::collection::vec(0u16..20, 1..6),
    ) {
        let split = split_pages * 0x1000;
        let mem = two_regions(split);
        // The rings start up to 6 KiB before the split, 16-aligned.
        let start = (split - 0x1800 + ring_at) & !0xf;
        let vq = MockSplitQueue::create(&*mem, GuestAddress(start), SIZE);
        let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
        // The indirect tables move next to the split: the second one
        // crosses it.
        let tables = split - 0x240;
        let moved = |d: &(u64, u32, u16, u16)| {
            let mut d = *d;
            if d.2 & VRING_DESC_F_INDIRECT as u16 != 0 {
                d.0 = tables + (d.0 - TABLES);
            }
            d
        };
        let table: Vec<_> = table.iter().map(moved).collect();
        write_table(&mem, vq.desc_table_addr().0, &table);
        for (i, t) in indirect.iter().enumerate() {
            let t: Vec<_> = t.iter().map(moved).collect();
            write_table(&mem, tables + 0x200 * i as u64, &t);
        }
        let avail = vq.avail_addr().0;
        for (i, &h) in heads.iter().enumerate() {
            mem.write_obj(h.to_le(), GuestAddress(avail + 4 + 2 * i as u64)).unwrap();
        }
        mem.write_obj((heads.len() as u16).to_le(), GuestAddress(avail + 2)).unwrap();

        let n = u64::from(SIZE);
        let crosses = |at: u64, len: u64| at < split && at + len > split;
        let straddles = crosses(vq.desc_table_addr().0, 16 * n)
            || crosses(avail, 6 + 2 * n)
            || crosses(vq.used_addr().0, 6 + 8 * n);
        let handle = MemHandle::new(Arc::clone(&mem));
        let rings = Rings::new(&queue, &handle);
        prop_assert_eq!(rings.is_none(), straddles);
        let reference = chains_of(&mut queue, &mem);
        prop_assert_eq!(reference.len(), heads.len());
        if let Some(rings) = rings {
            for (i, want) in reference.iter().enumerate() {
                let head = rings.avail_head(i as u16);
                prop_assert_eq!(head, heads[i]);
                let got: Vec<RawDesc> = rings.chain(head).collect();
                prop_assert_eq!(&got, want);
            }
        }
    }
}

#[test]
fn used_elements_are_published_once_with_the_index() {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let vq = MockSplitQueue::new(&*mem, SIZE);
    let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
    queue.set_event_idx(true);
    let handle = MemHandle::new(Arc::clone(&mem));
    let rings = Rings::new(&queue, &handle).unwrap();
    let used = vq.used_addr().0;
    rings.put_used(0, 3, 512);
    rings.put_used(1, 5, 1);
    // The driver asked to hear of element 0 (used_event = 0).
    assert!(rings.publish_used(0, 2));
    assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 2);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 4)).unwrap(), 3);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 512);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 12)).unwrap(), 5);
    // used_event = 5: elements 2..4 need no notification, 2..6 do.
    let avail = vq.avail_addr().0;
    mem.write_obj(5u16, GuestAddress(avail + 4 + 2 * u64::from(SIZE)))
        .unwrap();
    assert!(!rings.publish_used(2, 4));
    assert!(rings.publish_used(4, 6));
    // Rearming writes avail_event and reports entries that raced in.
    assert!(!rings.rearm(0));
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(used + 4 + 8 * u64::from(SIZE)))
            .unwrap(),
        0
    );
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    assert!(rings.rearm(0));
}
