use std::os::unix::fs::MetadataExt;

use super::*;
use strata_runtime::reactor::block_on;

fn view() -> GraphView {
    GraphView::default()
}

fn node_with(content: &[u8], direct: bool, read_only: bool) -> (tempfile::NamedTempFile, FileNode) {
    // Not /dev/shm: tmpfs refuses O_DIRECT.
    let tmp = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    std::fs::write(tmp.path(), content).unwrap();
    let node = FileNode::open(&FileOptions {
        filename: tmp.path().into(),
        direct,
        read_only,
        discard: true,
        ..Default::default()
    })
    .unwrap();
    (tmp, node)
}

fn read(node: &FileNode, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    let mut out = vec![0xeeu8; len];
    let g = view();
    let iov = IoVecs::from_slice(&mut out);
    block_on(node.read(&g, offset, &iov)).unwrap()?;
    drop(iov);
    Ok(out)
}

fn write(node: &FileNode, offset: u64, data: &[u8]) -> Result<(), BlockError> {
    let mut data = data.to_vec();
    let g = view();
    let iov = IoVecs::from_slice(&mut data);
    block_on(node.write(&g, offset, &iov)).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn writes_read_back_across_segments() {
    let (_tmp, node) = node_with(&vec![0u8; 64 << 10], false, false);
    let g = view();
    let data = pattern(12 << 10, 7);
    write(&node, 4096, &data).unwrap();

    // Read it back through three unevenly sized segments.
    let mut a = vec![0u8; 1000];
    let mut b = vec![0u8; 8000];
    let mut c = vec![0u8; (12 << 10) - 9000];
    let mut iov = IoVecs::new();
    for s in [&mut a, &mut b, &mut c] {
        // SAFETY: three distinct live Vecs, not touched until `iov` is gone.
        unsafe { iov.push(s.as_mut_ptr(), s.len()) };
    }
    block_on(node.read(&g, 4096, &iov)).unwrap().unwrap();
    drop(iov);
    assert_eq!([a, b, c].concat(), data);
    assert_eq!(read(&node, 0, 4096).unwrap(), vec![0u8; 4096]);
}

#[test]
fn requests_past_the_end_are_refused() {
    let (_tmp, node) = node_with(&[0u8; 8192], false, false);
    let err = read(&node, 4096, 8192).unwrap_err();
    assert!(matches!(
        err,
        BlockError::OutOfRange {
            op: IoOp::Read,
            offset: 4096,
            len: 8192,
            size: 8192
        }
    ));
    let err = write(&node, u64::MAX - 10, &[0; 512]).unwrap_err();
    assert!(matches!(
        err,
        BlockError::OutOfRange {
            op: IoOp::Write,
            ..
        }
    ));
}

#[test]
fn read_only_nodes_refuse_every_write_class_request() {
    let (_tmp, node) = node_with(&[1u8; 4096], false, true);
    let g = view();
    assert!(matches!(
        write(&node, 0, &[0; 512]),
        Err(BlockError::ReadOnly { op: IoOp::Write })
    ));
    let r = block_on(node.discard(&g, 0, 512)).unwrap();
    assert!(matches!(r, Err(BlockError::ReadOnly { op: IoOp::Discard })));
    let r = block_on(node.write_zeroes(&g, 0, 512, false)).unwrap();
    assert!(matches!(
        r,
        Err(BlockError::ReadOnly {
            op: IoOp::WriteZeroes
        })
    ));
    block_on(node.flush(&g)).unwrap().unwrap();
    assert_eq!(read(&node, 0, 4096).unwrap(), vec![1u8; 4096]);
}

#[test]
fn discard_punches_a_hole_that_reads_as_zeroes() {
    let (tmp, node) = node_with(&pattern(1 << 20, 3), false, false);
    let g = view();
    block_on(node.flush(&g)).unwrap().unwrap();
    let blocks_before = std::fs::metadata(tmp.path()).unwrap().blocks();
    block_on(node.discard(&g, 256 << 10, 512 << 10))
        .unwrap()
        .unwrap();
    let blocks_after = std::fs::metadata(tmp.path()).unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "{blocks_after} < {blocks_before}"
    );
    assert_eq!(
        read(&node, 256 << 10, 512 << 10).unwrap(),
        vec![0u8; 512 << 10]
    );
    assert_eq!(read(&node, 0, 4096).unwrap(), pattern(1 << 20, 3)[..4096]);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let data = pattern(1 << 20, 9);
    let (tmp, node) = node_with(&data, false, false);
    let g = view();
    block_on(node.write_zeroes(&g, 4096, 8192, false))
        .unwrap()
        .unwrap();
    block_on(node.write_zeroes(&g, 65536, 65536, true))
        .unwrap()
        .unwrap();
    let mut want = data.clone();
    want[4096..12288].fill(0);
    want[65536..131072].fill(0);
    assert_eq!(read(&node, 0, 1 << 20).unwrap(), want);
    assert_eq!(
        std::fs::metadata(tmp.path()).unwrap().len(),
        1 << 20,
        "size kept"
    );
}

#[test]
fn unmapping_zeroes_keep_blocks_under_discard_ignore() {
    // Not /dev/shm: tmpfs may zero-range by punching.
    let tmp = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    std::fs::write(tmp.path(), pattern(1 << 20, 3)).unwrap();
    let blocks = || std::fs::metadata(tmp.path()).unwrap().blocks();
    let node = FileNode::open(&FileOptions {
        filename: tmp.path().into(),
        discard: false,
        ..Default::default()
    })
    .unwrap();
    let before = blocks();
    block_on(node.write_zeroes(&view(), 0, 1 << 20, true))
        .unwrap()
        .unwrap();
    assert_eq!(read(&node, 0, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(blocks(), before, "discard=ignore: no hole punched");
}

#[test]
fn direct_io_bounces_misaligned_buffers() {
    let (_tmp, node) = node_with(&vec![0u8; 64 << 10], true, false);
    assert!(node.request_alignment(&view()) >= 512);
    let data = pattern(8192, 1);
    // A Vec<u8> of odd length is rarely 512-aligned; force it with an offset.
    let mut storage = vec![0u8; 8192 + 1];
    storage[1..].copy_from_slice(&data);
    let g = view();
    let iov = IoVecs::from_slice(&mut storage[1..]);
    block_on(node.write(&g, 8192, &iov)).unwrap().unwrap();
    drop(iov);
    let mut back = vec![0u8; 8192 + 3];
    let iov = IoVecs::from_slice(&mut back[3..]);
    block_on(node.read(&g, 8192, &iov)).unwrap().unwrap();
    drop(iov);
    assert_eq!(&back[3..], &data[..]);
}

#[test]
fn open_errors_name_the_file() {
    let missing = FileNode::open(&FileOptions {
        filename: "/nonexistent/disk.img".into(),
        ..Default::default()
    });
    let err = missing.err().unwrap();
    assert!(matches!(err, FileError::Open { .. }));
    assert!(
        err.to_string()
            .starts_with("cannot open '/nonexistent/disk.img'"),
        "{err}"
    );
    let dir = FileNode::open(&FileOptions {
        filename: "/var/tmp".into(),
        read_only: true,
        ..Default::default()
    });
    assert!(matches!(dir.err().unwrap(), FileError::NotAFile { .. }));
}

#[test]
fn discard_is_ignored_unless_enabled() {
    let tmp = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    std::fs::write(tmp.path(), [7u8; 8192]).unwrap();
    let node = FileNode::open(&FileOptions {
        filename: tmp.path().into(),
        ..Default::default()
    })
    .unwrap();
    let g = view();
    block_on(node.discard(&g, 0, 4096)).unwrap().unwrap();
    assert_eq!(
        read(&node, 0, 4096).unwrap(),
        vec![7u8; 4096],
        "discard=ignore keeps data"
    );
    block_on(node.write_zeroes(&g, 0, 4096, true))
        .unwrap()
        .unwrap();
    assert_eq!(
        read(&node, 0, 4096).unwrap(),
        vec![0u8; 4096],
        "write-zeroes still zeroes"
    );
}

/// The bytes of `path` someone holds OFD locks on. /proc/locks is read in
/// pieces, and a line can slip between them while other tests lock and
/// unlock: read until two reads agree.
fn locked(path: &std::path::Path) -> Vec<u64> {
    let mut last = locked_once(path);
    for _ in 0..20 {
        let now = locked_once(path);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

fn locked_once(path: &std::path::Path) -> Vec<u64> {
    let m = std::fs::metadata(path).unwrap();
    let dev = format!(
        "{:02x}:{:02x}:{}",
        libc::major(m.dev()),
        libc::minor(m.dev()),
        m.ino()
    );
    let mut held: Vec<u64> = std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| l.contains("OFDLCK") && !l.contains("->"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[5] == dev).then(|| f[6].parse::<u64>().unwrap()..=f[7].parse().unwrap())
        })
        .flatten()
        .collect();
    held.sort();
    held
}

#[test]
fn a_prepared_change_adds_and_an_abort_takes_back() {
    let (tmp, node) = node_with(&[0; 4096], false, false);
    let writer = SlotPerm::user(true);
    node.prepare_perm(writer).unwrap();
    node.commit_perm();
    assert_eq!(locked(tmp.path()), [100, 101, 201]);
    // Until commit, the old bytes stay with the new ones.
    node.prepare_perm(SlotPerm::user(false)).unwrap();
    assert_eq!(locked(tmp.path()), [100, 101, 201]);
    node.abort_perm();
    assert_eq!(locked(tmp.path()), [100, 101, 201]);
    node.prepare_perm(SlotPerm::user(false)).unwrap();
    node.commit_perm();
    assert_eq!(locked(tmp.path()), [100]);
    drop(node);
    assert_eq!(locked(tmp.path()), Vec::<u64>::new());
}

#[test]
fn two_nodes_of_one_process_conflict_but_a_reopen_does_not() {
    let (tmp, node) = node_with(&[0; 4096], false, false);
    node.prepare_perm(SlotPerm::user(true)).unwrap();
    node.commit_perm();
    let opts = FileOptions {
        filename: tmp.path().into(),
        ..Default::default()
    };
    let err = FileNode::open(&opts).err().expect("a second writer");
    assert!(
        err.to_string().starts_with("Failed to get \"write\" lock"),
        "{err}"
    );
    let state = node
        .reopen_state()
        .and_then(|s| s.downcast::<ImageLock>().ok());
    let next = FileNode::reopen(&opts, state).unwrap();
    drop(node);
    // The next generation still holds what the node held.
    assert_eq!(locked(tmp.path()), [100, 101, 201]);
    drop(next);
    assert_eq!(locked(tmp.path()), Vec::<u64>::new());
}

/// Another process's claim on `byte` (a shared OFD lock on its own open
/// file description), as qemu-io takes one for a moment before it sees the
/// conflict and backs off.
fn claim(path: &std::path::Path, byte: i64) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: a valid flock for the call, on our own descriptor.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(rc, 0);
    f
}

#[test]
fn a_change_that_asks_for_nothing_new_ignores_a_passing_claim() {
    let (tmp, node) = node_with(&[0; 4096], false, false);
    node.prepare_perm(SlotPerm::user(true)).unwrap();
    node.commit_perm();
    // Someone claims "write" (byte 101), which this node does not share.
    let other = claim(tmp.path(), 101);
    // The same permissions again (a reopen): nothing new to check.
    node.prepare_perm(SlotPerm::user(true))
        .expect("no new permission, so no new conflict");
    node.commit_perm();
    // Fewer permissions: still nothing new.
    node.prepare_perm(SlotPerm::user(false)).unwrap();
    node.abort_perm();
    drop(other);
    // A new permission is still checked: a reader that now asks to write
    // meets someone who does not share writing (byte 201).
    let (tmp2, reader) = node_with(&[0; 4096], false, false);
    reader.prepare_perm(SlotPerm::user(false)).unwrap();
    reader.commit_perm();
    let other = claim(tmp2.path(), 201);
    let err = reader.prepare_perm(SlotPerm::user(true)).err();
    assert!(err.is_some(), "a new permission meets the claim");
    drop(other);
}

/// Status inside a data extent lseek found is answered from the cache,
/// and a discard or an unmapping zeroing through the node forgets it.
#[test]
fn block_status_remembers_data_until_the_node_punches_a_hole() {
    let (tmp, node) = node_with(&pattern(1 << 20, 4), false, false);
    let g = view();
    let status = |offset| {
        block_on(node.block_status(&g, offset, 4096))
            .unwrap()
            .unwrap()
    };
    assert!(status(0).allocated && !status(0).zero);
    // Behind the node's back the answer stays (data is never wrong) ...
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(tmp.path())
        .unwrap();
    // SAFETY: a plain fallocate on a file this test owns.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            8192,
            4096,
        )
    };
    assert_eq!(r, 0);
    assert!(!status(8192).zero, "answered from the cache");
    // ... and the node's own hole punching is seen at once.
    block_on(node.discard(&g, 65536, 65536)).unwrap().unwrap();
    assert!(status(65536).zero, "a discard forgets the cache");
    assert!(status(8192).zero);
    assert!(!status(0).zero);
    block_on(node.write_zeroes(&g, 0, 4096, true))
        .unwrap()
        .unwrap();
    assert!(status(0).zero, "an unmapping zeroing forgets it too");
}
