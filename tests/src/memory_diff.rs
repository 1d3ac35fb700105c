//! Comparing a migrated guest's memory on both sides, before the
//! destination runs: the one check that sees every page migration lost,
//! whoever wrote it.
//!
//! A page the device filled from disk and did not log arrives stale; it
//! is told apart from a page the guest's CPU wrote (which QEMU's own
//! tracking must catch) by its content: the source's copy is a 4 KiB block
//! of the disk.

use std::collections::HashSet;
use std::fs::File;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufReader, Read};
use std::path::Path;

const PAGE: usize = 4096;

/// The pages whose contents differ between two dumps of guest memory.
#[derive(Debug, Default)]
pub struct MemoryDiff {
    /// Every differing page, by guest page number.
    pub pages: Vec<u64>,
    /// Those whose source copy is a block of the disk: data the device
    /// wrote into guest memory.
    pub device_data: Vec<u64>,
}

impl MemoryDiff {
    /// Compares dumps `src` and `dst` of the same guest memory (QMP
    /// `pmemsave` from 0), with `disk` the disk as raw bytes.
    pub fn compare(src: &Path, dst: &Path, disk: &Path) -> MemoryDiff {
        let blocks = block_hashes(disk);
        let open = |p: &Path| {
            BufReader::with_capacity(1 << 20, File::open(p).expect("open a memory dump"))
        };
        let (mut a, mut b) = (open(src), open(dst));
        let (mut pa, mut pb) = ([0u8; PAGE], [0u8; PAGE]);
        let mut diff = MemoryDiff::default();
        for page in 0.. {
            let (na, nb) = (read_page(&mut a, &mut pa), read_page(&mut b, &mut pb));
            assert_eq!(na, nb, "the dumps differ in size");
            if na == 0 {
                break;
            }
            if pa != pb {
                diff.pages.push(page);
                if pa.iter().any(|&x| x != 0) && blocks.contains(&hash(&pa)) {
                    diff.device_data.push(page);
                }
            }
        }
        diff
    }
}

fn read_page(r: &mut impl Read, buf: &mut [u8; PAGE]) -> usize {
    let mut n = 0;
    while n < PAGE {
        match r.read(&mut buf[n..]).expect("read a memory dump") {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn hash(page: &[u8; PAGE]) -> u64 {
    let mut h = DefaultHasher::new();
    page.hash(&mut h);
    h.finish()
}

/// The hashes of every 4 KiB block of `disk` that is not all zeroes.
fn block_hashes(disk: &Path) -> HashSet<u64> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(disk).expect("open the disk"));
    let mut page = [0u8; PAGE];
    let mut set = HashSet::new();
    while read_page(&mut r, &mut page) == PAGE {
        if page.iter().any(|&x| x != 0) {
            set.insert(hash(&page));
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_disk_block_is_device_data_and_a_stale_zero_or_cpu_page_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let block = |b: u8| vec![b; PAGE];
        let disk: Vec<u8> = [block(7), block(9), block(0)].concat();
        let src: Vec<u8> = [block(9), block(1), block(0), block(5)].concat();
        let dst: Vec<u8> = [block(3), block(2), block(4), block(5)].concat();
        let (s, d, k) = (
            dir.path().join("s"),
            dir.path().join("d"),
            dir.path().join("k"),
        );
        std::fs::write(&s, src).unwrap();
        std::fs::write(&d, dst).unwrap();
        std::fs::write(&k, disk).unwrap();
        let diff = MemoryDiff::compare(&s, &d, &k);
        assert_eq!(diff.pages, vec![0, 1, 2]);
        assert_eq!(diff.device_data, vec![0]);
    }
}
