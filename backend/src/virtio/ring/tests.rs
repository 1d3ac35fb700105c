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
        let reference: Vec<Vec<RawDesc>> = queue
            .iter(&*mem)
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
            .collect();
        for (i, want) in reference.iter().enumerate() {
            let head = rings.avail_head(i as u16);
            prop_assert_eq!(head, heads[i]);
            let got: Vec<RawDesc> = rings.chain(head).collect();
            prop_assert_eq!(&got, want);
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
