//! The worker on a queue in test memory, through the in-process harness.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::fuzzing::Harness;

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// A queue holding one 4 KiB read, and the memory it is in.
fn one_read() -> (GuestMemoryMmap<()>, Queue, GuestAddress) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    mem.write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(HDR))
        .unwrap(); // type
    mem.write_obj(8u64.to_le(), GuestAddress(HDR + 8)).unwrap(); // sector
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    mem.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let descs: Vec<RawDescriptor> = [
        (HDR, 16, NEXT, 1),
        (DATA, 4096, W | NEXT, 2),
        (STATUS, 1, W, 0),
    ]
    .iter()
    .map(|&(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(a, l, f, n)))
    .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    let used = vq.used_addr();
    (mem, queue, used)
}

/// The used element the device published first: (id, len), and the index.
fn used(mem: &GuestMemoryMmap<()>, at: GuestAddress) -> (u32, u32, u16) {
    let idx: u16 = mem.read_obj(at.unchecked_add(2)).unwrap();
    let id: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
    let len: u32 = mem.read_obj(at.unchecked_add(8)).unwrap();
    (id, len, idx)
}

#[test]
fn a_read_runs_through_intake_and_dispatch() {
    let (mem, queue, at) = one_read();
    let h = Harness::new(mem.clone(), queue);
    h.kick();
    assert_eq!(used(&mem, at), (0, 4097, 1));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(),
        0,
        "null-co reads zeroes"
    );
    h.exit();
}

#[test]
fn a_queue_without_io_fails_its_requests_instead_of_hanging() {
    let (mem, queue, at) = one_read();
    let h = Harness::new(mem.clone(), queue);
    h.kick_without_io();
    assert_eq!(used(&mem, at), (0, 1, 1), "completed, with the status only");
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(),
        0x5a,
        "no I/O was done"
    );
    h.exit();
}

#[test]
fn with_logging_on_a_read_marks_its_data_status_and_used_ring_and_nothing_else() {
    use crate::vhost_user::LOG_PAGE;
    let (mem, queue, used_at) = one_read();
    let h = Harness::new(mem.clone(), queue);
    let (bitmap, _file) = crate::vhost_user::test_bitmap(8);
    h.log().set_bitmap(std::sync::Arc::clone(&bitmap));
    h.log().set_active(true);
    h.kick();
    assert_eq!(used(&mem, used_at).2, 1, "completed");
    let page = |addr: u64| addr / LOG_PAGE;
    let marked: Vec<u64> = (0..64).filter(|&p| bitmap.is_marked(p)).collect();
    let mut want = vec![page(DATA), page(STATUS), page(used_at.0)];
    want.sort_unstable();
    want.dedup();
    assert_eq!(marked, want, "the header is read, not written: not marked");
    h.exit();
}

#[test]
fn with_logging_off_nothing_is_marked() {
    let (mem, queue, _) = one_read();
    let h = Harness::new(mem, queue);
    let (bitmap, _file) = crate::vhost_user::test_bitmap(8);
    h.log().set_bitmap(std::sync::Arc::clone(&bitmap));
    h.kick();
    assert!((0..64).all(|p| !bitmap.is_marked(p)));
    h.exit();
}
