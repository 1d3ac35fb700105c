use std::sync::Arc;

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::*;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x40_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Fixture {
    mem: Arc<GuestMemory>,
    handle: MemHandle,
}

impl Fixture {
    fn new() -> Self {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let handle = MemHandle::new(Arc::clone(&mem));
        Fixture { mem, handle }
    }

    fn header(&self, ty: u32, sector: u64) {
        self.mem.write_obj(ty.to_le(), GuestAddress(HDR)).unwrap(); // type
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap(); // reserved
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap(); // sector
    }

    fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at))
            .unwrap(); // sector
        self.mem
            .write_obj(sectors.to_le(), GuestAddress(at + 8))
            .unwrap(); // num_sectors
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap(); // flags
    }

    /// Parses one chain made of `descs` (addr, len, flags); `next` links are
    /// filled in by the mock.
    fn parse(&self, descs: &[(u64, u32, u16)], limits: &Limits) -> Result<Request, Rejected> {
        let vq = MockSplitQueue::new(&*self.mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        let chain = vq.build_desc_chain(&raw).unwrap();
        parse(chain, &self.handle, limits)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

fn limits() -> Limits {
    Limits {
        capacity: 2048,
        block_size: 512,
        read_only: false,
    }
}

fn rejected(r: Result<Request, Rejected>) -> Rejected {
    match r {
        Ok(req) => panic!("expected a rejection, got {:?}", req.kind),
        Err(rej) => rej,
    }
}

#[test]
fn a_read_maps_every_writable_data_segment() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 8);
    let req = f
        .parse(
            &[
                (HDR, 16, 0),
                (DATA, 1024, W),
                (DATA + 4096, 3072, W),
                (STATUS, 1, W),
            ],
            &limits(),
        )
        .unwrap();
    assert_eq!(req.kind, RequestKind::Read { offset: 4096 });
    assert_eq!(req.data().len(), 4096);
    assert_eq!(req.data().as_iovecs().len(), 2);
    req.data().copy_from_slice(0, &[7u8; 4096]);
    let back: u8 = f.mem.read_obj(GuestAddress(DATA + 4096)).unwrap();
    assert_eq!(back, 7, "segment 2 maps to guest address DATA+4096");
    req.status.set(0);
    assert_eq!(f.status(), 0);
}

#[test]
fn a_header_split_across_descriptors_is_gathered() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_OUT, 16);
    let req = f
        .parse(
            &[(HDR, 8, 0), (HDR + 8, 8, 0), (DATA, 512, 0), (STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
    assert_eq!(req.kind, RequestKind::Write { offset: 8192 });
    assert_eq!(req.data().len(), 512);
}

#[test]
fn an_unaligned_header_is_read_whole() {
    // libblkio packs its request headers at an odd stride.
    let f = Fixture::new();
    let at = HDR + 3;
    f.mem
        .write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(at))
        .unwrap();
    f.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    f.mem.write_obj(5u64.to_le(), GuestAddress(at + 8)).unwrap();
    let req = f
        .parse(&[(at, 16, 0), (DATA, 512, W), (STATUS, 1, W)], &limits())
        .unwrap();
    assert_eq!(req.kind, RequestKind::Read { offset: 2560 });
}

#[test]
fn the_header_and_data_may_share_a_descriptor() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_OUT, 0);
    let req = f
        .parse(&[(HDR, 16 + 1024, 0), (STATUS, 1, W)], &limits())
        .unwrap();
    assert_eq!(req.kind, RequestKind::Write { offset: 0 });
    assert_eq!(req.data().len(), 1024);
    assert_eq!(
        req.data().as_iovecs()[0].iov_base as usize,
        f.mem.get_host_address(GuestAddress(HDR + 16)).unwrap() as usize
    );
}

#[test]
fn a_missing_status_descriptor_gets_no_status() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 512, 0)], &limits()));
    assert_eq!(rej.error, RequestError::NoStatus);
    assert!(rej.status.is_none());
    assert_eq!(rej.complete(), 0, "completed with a used length of 0");
}

#[test]
fn an_empty_status_descriptor_gets_no_status() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (STATUS, 0, W)], &limits()));
    assert_eq!(rej.error, RequestError::NoStatus);
}

#[test]
fn a_read_only_buffer_for_a_read_is_an_io_error() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 4096, 0), (STATUS, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::UnexpectedReadable { len: 4096 });
    assert_eq!(rej.complete(), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn a_writable_buffer_for_a_write_is_an_io_error() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_OUT, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::UnexpectedWritable { len: 512 });
}

#[test]
fn a_length_that_is_not_a_sector_multiple_is_an_io_error() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 1000, W), (STATUS, 1, W)], &limits()));
    assert_eq!(
        rej.error,
        RequestError::LengthNotSectorMultiple { len: 1000 }
    );
    rej.complete();
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn a_short_header_is_an_io_error() {
    let f = Fixture::new();
    let rej = rejected(f.parse(&[(HDR, 12, 0), (STATUS, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::HeaderTooShort { len: 12 });
    assert_eq!(rej.error.status(), Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn readable_after_writable_is_an_io_error() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let rej = rejected(f.parse(
        &[
            (HDR, 16, 0),
            (DATA, 512, W),
            (DATA + 512, 512, 0),
            (STATUS, 1, W),
        ],
        &limits(),
    ));
    assert_eq!(rej.error, RequestError::ReadableAfterWritable);
}

#[test]
fn ranges_past_the_end_and_misaligned_ranges_are_io_errors() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 2047);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)], &limits()));
    assert_eq!(
        rej.error,
        RequestError::OutOfRange {
            sector: 2047,
            len: 1024,
            capacity: 2048
        }
    );

    f.header(VIRTIO_BLK_T_IN, u64::MAX / 256);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)], &limits()));
    assert!(
        matches!(rej.error, RequestError::OutOfRange { .. }),
        "overflow is out of range"
    );

    let l4k = Limits {
        block_size: 4096,
        ..limits()
    };
    f.header(VIRTIO_BLK_T_OUT, 1);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 4096, 0), (STATUS, 1, W)], &l4k));
    assert_eq!(
        rej.error,
        RequestError::Misaligned {
            sector: 1,
            len: 4096,
            block_size: 4096
        }
    );
    f.header(VIRTIO_BLK_T_OUT, 8);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)], &l4k));
    assert_eq!(
        rej.error,
        RequestError::Misaligned {
            sector: 8,
            len: 512,
            block_size: 4096
        }
    );
}

#[test]
fn writes_to_a_read_only_export_are_io_errors_and_reads_are_not() {
    let f = Fixture::new();
    let ro = Limits {
        read_only: true,
        ..limits()
    };
    f.header(VIRTIO_BLK_T_OUT, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)], &ro));
    assert_eq!(rej.error, RequestError::ReadOnly);
    f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    f.segment(DATA, 0, 8, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)], &ro));
    assert_eq!(rej.error, RequestError::ReadOnly);
    f.header(VIRTIO_BLK_T_IN, 0);
    assert!(f
        .parse(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)], &ro)
        .is_ok());
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert!(f.parse(&[(HDR, 16, 0), (STATUS, 1, W)], &ro).is_ok());
}

#[test]
fn unknown_types_and_flags_are_unsupported() {
    let f = Fixture::new();
    f.header(99, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (STATUS, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::UnknownType { ty: 99 });
    rej.complete();
    assert_eq!(f.status(), VIRTIO_BLK_S_UNSUPP as u8);

    f.header(VIRTIO_BLK_T_DISCARD, 0);
    f.segment(DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::UnknownFlags { flags: 1 });

    f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    f.segment(DATA, 0, 8, 2);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::UnknownFlags { flags: 2 });
}

#[test]
fn discard_and_write_zeroes_take_exactly_one_segment() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    f.segment(DATA, 16, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let req = f
        .parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)], &limits())
        .unwrap();
    assert_eq!(
        req.kind,
        RequestKind::WriteZeroes {
            offset: 8192,
            len: 4096,
            unmap: true
        }
    );

    f.header(VIRTIO_BLK_T_DISCARD, 0);
    f.segment(DATA, 0, 8, 0);
    f.segment(DATA + 16, 8, 8, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::MultipleSegments { len: 32 });
    assert_eq!(rej.error.status(), Some(VIRTIO_BLK_S_UNSUPP as u8));

    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 8, 0), (STATUS, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::SegmentTooShort { len: 8 });

    f.segment(DATA, 0, 40000, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)], &limits()));
    assert_eq!(
        rej.error,
        RequestError::TooManySectors {
            sectors: 40000,
            max: 32768
        }
    );

    f.segment(DATA, 2040, 16, 0);
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)], &limits()));
    assert!(matches!(
        rej.error,
        RequestError::OutOfRange { sector: 2040, .. }
    ));
}

#[test]
fn buffers_outside_guest_memory_are_io_errors() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let far = MEM_SIZE as u64 + 0x1000;
    let rej = rejected(f.parse(&[(HDR, 16, 0), (far, 512, W), (STATUS, 1, W)], &limits()));
    assert_eq!(
        rej.error,
        RequestError::UnmappedBuffer {
            addr: far,
            len: 512
        }
    );
    // A buffer that starts inside memory and runs off its end.
    let edge = MEM_SIZE as u64 - 256;
    let rej = rejected(f.parse(&[(HDR, 16, 0), (edge, 512, W), (STATUS, 1, W)], &limits()));
    assert_eq!(
        rej.error,
        RequestError::UnmappedBuffer {
            addr: edge,
            len: 512
        }
    );
    // A status byte outside memory: nowhere to report anything.
    let rej = rejected(f.parse(&[(HDR, 16, 0), (DATA, 512, W), (far, 1, W)], &limits()));
    assert_eq!(rej.error, RequestError::UnmappedStatus { addr: far });
    assert!(rej.status.is_none());
}

/// Builds a chain whose links are given explicitly and pops it.
fn parse_linked(f: &Fixture, descs: &[(u64, u32, u16, u16)]) -> Result<Request, Rejected> {
    let vq = MockSplitQueue::new(&*f.mem, 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, l, fl, next)| RawDescriptor::from(SplitDescriptor::new(a, l, fl, next)))
        .collect();
    let chain = vq.build_multiple_desc_chains(&raw).unwrap();
    parse(chain, &f.handle, &limits())
}

#[test]
fn a_chain_that_links_past_the_queue_is_truncated() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let n = VRING_DESC_F_NEXT as u16;
    let rej = rejected(parse_linked(
        &f,
        &[(HDR, 16, n, 1), (DATA, 512, W | n, 200), (STATUS, 1, W, 0)],
    ));
    assert_eq!(rej.error, RequestError::Truncated);
    assert!(rej.status.is_none(), "no trusted place for a status");
}

#[test]
fn a_chain_that_loops_is_truncated() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_IN, 0);
    let n = VRING_DESC_F_NEXT as u16;
    let rej = rejected(parse_linked(&f, &[(HDR, 16, n, 1), (DATA, 512, W | n, 0)]));
    assert_eq!(rej.error, RequestError::Truncated);
}

#[test]
fn get_id_writes_into_the_data_buffer() {
    let f = Fixture::new();
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    let req = f
        .parse(&[(HDR, 16, 0), (DATA, 20, W), (STATUS, 1, W)], &limits())
        .unwrap();
    assert_eq!(req.kind, RequestKind::GetId);
    assert_eq!(req.data().len(), 20);
}

#[derive(Clone, Copy, Debug)]
enum Dir {
    Readable,
    Writable,
}

fn dir() -> impl Strategy<Value = Dir> {
    prop_oneof![Just(Dir::Readable), Just(Dir::Writable)]
}

proptest! {
    /// Random reads and writes with a data descriptor of random direction
    /// and length, a status of random size and a random sector: the model
    /// below states which error, if any, each must give.
    #[test]
    fn random_reads_and_writes_get_the_expected_outcome(
        is_read in any::<bool>(),
        sector in 0u64..2100,
        data_len in 0u32..8192,
        data_dir in dir(),
        status_len in 0u32..3,
        read_only in any::<bool>(),
    ) {
        let f = Fixture::new();
        let ty = if is_read { VIRTIO_BLK_T_IN } else { VIRTIO_BLK_T_OUT };
        f.header(ty, sector);
        let lim = Limits { read_only, ..limits() };
        let mut descs = vec![(HDR, 16, 0)];
        let flags = match data_dir { Dir::Readable => 0, Dir::Writable => W };
        if data_len > 0 {
            descs.push((DATA, data_len, flags));
        }
        descs.push((STATUS, status_len, W));
        let len = u64::from(data_len);
        let extra_status = u64::from(status_len.saturating_sub(1));
        let expected = if status_len == 0 {
            // The data descriptor, when writable, is the last writable one.
            Err(RequestError::NoStatus)
        } else if is_read && data_len > 0 && matches!(data_dir, Dir::Readable) {
            Err(RequestError::UnexpectedReadable { len })
        } else if !is_read && (extra_status > 0 || (data_len > 0 && matches!(data_dir, Dir::Writable))) {
            let w = extra_status + if matches!(data_dir, Dir::Writable) { len } else { 0 };
            Err(RequestError::UnexpectedWritable { len: w })
        } else if !is_read && read_only {
            Err(RequestError::ReadOnly)
        } else {
            let data = if is_read { len + extra_status } else { len };
            if data % 512 != 0 {
                Err(RequestError::LengthNotSectorMultiple { len: data })
            } else if sector * 512 + data > 2048 * 512 {
                Err(RequestError::OutOfRange { sector, len: data, capacity: 2048 })
            } else {
                Ok(if is_read {
                    RequestKind::Read { offset: sector * 512 }
                } else {
                    RequestKind::Write { offset: sector * 512 }
                })
            }
        };
        let got = f.parse(&descs, &lim).map(|r| r.kind).map_err(|r| r.error);
        prop_assert_eq!(got, expected);
    }
}
