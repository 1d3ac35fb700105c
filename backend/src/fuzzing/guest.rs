//! The guest path under the fuzzer: virtqueues built from its input.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::input::Input;
use super::Harness;

/// Bytes at the start of guest memory that hold the rings and every
/// descriptor table; buffers live above them. The used ring, the only
/// structure the device writes, stays in the upper half, apart from the
/// tables it could otherwise rewrite under the device.
const TABLE_AREA: u64 = 0x3000;

/// Builds a virtqueue from `data` in a guest memory of two or three
/// regions (rings and tables may straddle them), runs it through intake
/// and dispatch on a `null-co` node, and checks that nothing outside the
/// chains' writable buffers and the used ring changed, and that no head
/// completed more often than it was offered. Panics on a violation.
pub fn guest_path(data: &[u8]) {
    let mut input = Input(data);
    const PAGE: u64 = 0x1000;
    let mut sizes = vec![
        PAGE * (1 + u64::from(input.byte() % 3)),
        PAGE * (1 + u64::from(input.byte() % 4)),
    ];
    if input.byte() % 2 == 1 {
        sizes.push(PAGE * (1 + u64::from(input.byte() % 8)));
    }
    let total: u64 = sizes.iter().sum::<u64>().max(TABLE_AREA + PAGE);
    let last = sizes.len() - 1;
    sizes[last] = total - sizes[..last].iter().sum::<u64>();
    let mut start = 0;
    let ranges: Vec<(GuestAddress, usize)> = sizes
        .iter()
        .map(|&len| {
            let r = (GuestAddress(start), len as usize);
            start += len;
            r
        })
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");

    // Memory starts out as the input's bytes, so headers, segments and
    // indirect tables are whatever the fuzzer chose.
    let fill: Vec<u8> = (0..total as usize)
        .map(|i| data.get(i % data.len().max(1)).copied().unwrap_or(0))
        .collect();
    mem.write_slice(&fill, GuestAddress(0)).expect("fill");

    let size = 1u16 << (input.byte() % 6);
    let n = u64::from(size);
    let event_idx = input.byte() % 2 == 1;
    let half = TABLE_AREA / 2;
    let place = |input: &mut Input<'_>, from: u64, len: u64, align: u64| {
        (from + u64::from(input.u16()) % (half - len)) & !(align - 1)
    };
    let desc = place(&mut input, 0, 16 * n, 16);
    let avail = place(&mut input, 0, 6 + 2 * n, 2);
    let used = place(&mut input, half, 6 + 8 * n, 4);

    // The descriptor tables: the queue's, and the indirect ones its
    // entries point at (tables live in the table area, buffers above it,
    // or nowhere at all).
    let write_desc = |input: &mut Input<'_>, at: u64| {
        let flags = u16::from(input.byte() & 7);
        let raw_len = input.u32();
        let kind = input.byte();
        let indirect = u32::from(flags) & VRING_DESC_F_INDIRECT != 0;
        let (addr, len) = if indirect {
            let entries = 1 + u64::from(kind % 8);
            let a = (u64::from(input.u16()) % (TABLE_AREA / 2 - 16 * entries)) & !15;
            (a, (16 * entries) as u32)
        } else {
            let span = total - TABLE_AREA;
            let len = match kind % 4 {
                0 => raw_len,
                _ => raw_len % (span as u32 + 1),
            };
            let addr = match kind % 8 {
                7 => u64::from(raw_len) << 20,
                _ => TABLE_AREA + u64::from(input.u32()) % span,
            };
            (addr, len)
        };
        let next = u16::from(input.byte()) % (size + 2);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at)).expect("descriptor");
    };
    let entry = |at: u64| -> (u64, u64, u16) {
        let b = mem
            .read_obj::<[u8; 16]>(GuestAddress(at))
            .unwrap_or([0; 16]);
        (
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from(u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"))),
            u16::from_le_bytes([b[12], b[13]]),
        )
    };
    let indirect = |flags: u16| u32::from(flags) & VRING_DESC_F_INDIRECT != 0;
    for i in 0..n {
        write_desc(&mut input, desc + 16 * i);
    }
    for i in 0..n {
        let (at, len, flags) = entry(desc + 16 * i);
        if indirect(flags) {
            for k in 0..(len / 16).min(TABLE_AREA / 16) {
                write_desc(&mut input, at + 16 * k);
            }
        }
    }

    // The avail ring, and the used ring's starting state.
    let offered = u16::from(input.byte()) % (size + 1);
    let mut offers = vec![0u32; usize::from(size) + 2];
    for i in 0..u64::from(offered) {
        let head = input.u16() % (size + 2);
        offers[usize::from(head)] += 1;
        mem.write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * i))
            .expect("avail entry");
    }
    mem.write_obj(0u16, GuestAddress(avail))
        .expect("avail flags");
    mem.write_obj(offered.to_le(), GuestAddress(avail + 2))
        .expect("avail index");
    mem.write_obj(input.u16().to_le(), GuestAddress(avail + 4 + 2 * n))
        .expect("used_event");
    mem.write_slice(&vec![0; (6 + 8 * n) as usize], GuestAddress(used))
        .expect("used ring");

    // What the device may write: every device-writable buffer of the
    // tables as they now are (the device does not write them).
    let mut writable = Vec::new();
    for i in 0..n {
        let (at, len, flags) = entry(desc + 16 * i);
        let mut table = vec![(at, len, flags)];
        if indirect(flags) {
            // The device reads no more of a table than memory holds.
            table = (0..(len / 16).min(total / 16))
                .map(|k| entry(at + 16 * k))
                .collect();
        }
        for (at, len, flags) in table {
            if u32::from(flags) & VRING_DESC_F_WRITE != 0 && !indirect(flags) {
                writable.push((at, len));
            }
        }
    }
    let mut before = vec![0u8; total as usize];
    mem.read_slice(&mut before, GuestAddress(0))
        .expect("snapshot");
    let mut queue = Queue::new(size).expect("a queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);

    // A worker stays torn down on its thread: give it one of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            let h = Harness::new(mem.clone(), queue);
            h.kick();
            h.kick();
            h.exit();
        })
        .join()
        .expect("the worker did not panic");
    });

    // Nothing changed but writable buffers and the used ring.
    let mut after = vec![0u8; total as usize];
    mem.read_slice(&mut after, GuestAddress(0))
        .expect("snapshot");
    let used_ring = used..used + 6 + 8 * n;
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let i = i as u64;
        if a != b && !used_ring.contains(&i) {
            assert!(
                writable
                    .iter()
                    .any(|&(at, len)| at <= i && i < at.saturating_add(len)),
                "byte {i:#x} changed ({a:#x} -> {b:#x}) outside every writable buffer"
            );
        }
    }
    // No head completed more often than it was offered.
    let done: u16 = mem
        .read_obj::<u16>(GuestAddress(used + 2))
        .map(u16::from_le)
        .expect("used index");
    assert!(done <= offered, "{done} completions of {offered} chains");
    let mut completed = vec![0u32; usize::from(size) + 2];
    for k in 0..u64::from(done) {
        let id = mem
            .read_obj::<u32>(GuestAddress(used + 4 + 8 * (k % n)))
            .map(u32::from_le)
            .expect("used element");
        let slot = completed
            .get_mut(id as usize)
            .unwrap_or_else(|| panic!("completed head {id}, which is out of range"));
        *slot += 1;
        assert!(
            *slot <= offers[id as usize],
            "head {id} completed {} times, offered {}",
            slot,
            offers[id as usize]
        );
    }
}
