//! Refcounts: the refcount table, a cache of refcount blocks, and entries
//! of 1 to 64 bits. Used only under the image's metadata lock.

use std::collections::HashMap;

use strata_graph::AlignedBuf;

use super::error::Qcow2Error;
use super::io::FileIo;
use super::types::{Geometry, OFFSET_MASK};

struct Block {
    data: AlignedBuf,
    dirty: bool,
    last: u64,
}

/// The refcount structures of an open image.
pub struct Refcounts {
    pub(super) g: Geometry,
    /// Refcount block offsets, by block index.
    pub(super) table: Vec<u64>,
    /// Where the table is (or will be, once written).
    pub(super) table_offset: u64,
    /// Clusters the table occupies.
    pub(super) table_clusters: u64,
    pub(super) table_dirty: bool,
    /// The table the header still points at, when the table has grown
    /// and moved but the header has not been rewritten yet.
    pub(super) moved_from: Option<(u64, u64)>,
    blocks: HashMap<u64, Block>,
    clock: u64,
    capacity: usize,
    /// Where the search for free clusters starts.
    pub(super) free_hint: u64,
    /// A change to the table was abandoned half done (its future was
    /// dropped): the in-memory refcounts cannot be trusted until rebuilt.
    pub(super) interrupted: bool,
}

/// Refcount entry `i` of a block in the encoding of `order`.
pub fn get_entry(data: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            u64::from((data[i / per_byte] >> shift) & (((1u16 << bits) - 1) as u8))
        }
        3 => u64::from(data[i]),
        4 => u64::from(u16::from_be_bytes([data[2 * i], data[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(
            data[4 * i..4 * i + 4].try_into().expect("4 bytes"),
        )),
        _ => u64::from_be_bytes(data[8 * i..8 * i + 8].try_into().expect("8 bytes")),
    }
}

/// Sets refcount entry `i`; `v` must fit the width.
pub fn set_entry(data: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = ((1u16 << bits) - 1) as u8;
            let b = &mut data[i / per_byte];
            *b = (*b & !(mask << shift)) | (((v as u8) & mask) << shift);
        }
        3 => data[i] = v as u8,
        4 => data[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => data[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => data[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

impl Refcounts {
    /// The refcount structures of an image whose table (of `clusters`
    /// clusters at `offset`) holds `table`. `cache_bytes` bounds the block
    /// cache.
    pub fn new(g: Geometry, table: Vec<u64>, offset: u64, clusters: u64, cache_bytes: u64) -> Self {
        Refcounts {
            g,
            table,
            table_offset: offset,
            table_clusters: clusters,
            table_dirty: false,
            moved_from: None,
            blocks: HashMap::new(),
            clock: 0,
            capacity: (cache_bytes / g.cluster_size()).max(4) as usize,
            free_hint: 0,
            interrupted: false,
        }
    }

    /// The offset of the block for `cluster`, if it exists.
    fn block_offset(&self, cluster: u64) -> Option<u64> {
        let bi = (cluster / self.g.refblock_entries()) as usize;
        self.table
            .get(bi)
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
    }

    /// Loads the block at `offset` into the cache.
    pub(super) async fn load(&mut self, io: FileIo<'_>, offset: u64) -> Result<(), Qcow2Error> {
        self.clock += 1;
        if let Some(b) = self.blocks.get_mut(&offset) {
            b.last = self.clock;
            return Ok(());
        }
        if offset % self.g.cluster_size() != 0 {
            return Err(Qcow2Error::BadEntry {
                what: "refcount table",
                entry: offset,
                guest: 0,
            });
        }
        if self.blocks.len() >= self.capacity {
            self.evict(io).await?;
        }
        let mut data = AlignedBuf::zeroed(self.g.cluster_size() as usize, 4096)?;
        if offset < io.size()? {
            io.read("read a refcount block", offset, data.as_mut_slice())
                .await?;
        }
        self.blocks.insert(
            offset,
            Block {
                data,
                dirty: false,
                last: self.clock,
            },
        );
        Ok(())
    }

    /// Starts a new, empty block at `offset` (no read).
    pub(super) fn add_empty(&mut self, offset: u64) -> Result<(), Qcow2Error> {
        self.clock += 1;
        let data = AlignedBuf::zeroed(self.g.cluster_size() as usize, 4096)?;
        self.blocks.insert(
            offset,
            Block {
                data,
                dirty: true,
                last: self.clock,
            },
        );
        Ok(())
    }

    async fn evict(&mut self, io: FileIo<'_>) -> Result<(), Qcow2Error> {
        let Some((&off, _)) = self.blocks.iter().min_by_key(|(_, b)| b.last) else {
            return Ok(());
        };
        let b = self.blocks.get_mut(&off).expect("chosen above");
        if b.dirty {
            // Refcounts may always reach the disk ahead of the L2 tables
            // (decrements are applied only once the L2 change is durable).
            // The block stays cached until it is written, so abandoning
            // the write loses nothing.
            io.write("write a refcount block", off, b.data.as_mut_slice())
                .await?;
        }
        self.blocks.remove(&off);
        Ok(())
    }

    /// The refcount of host cluster `cluster`.
    pub async fn get(&mut self, io: FileIo<'_>, cluster: u64) -> Result<u64, Qcow2Error> {
        let Some(off) = self.block_offset(cluster) else {
            return Ok(0);
        };
        self.load(io, off).await?;
        let b = &self.blocks[&off];
        Ok(get_entry(
            b.data.as_slice(),
            self.g.refcount_order,
            (cluster % self.g.refblock_entries()) as usize,
        ))
    }

    /// Sets the refcount of `cluster`, whose block must exist.
    pub(super) async fn set_existing(
        &mut self,
        io: FileIo<'_>,
        cluster: u64,
        v: u64,
    ) -> Result<(), Qcow2Error> {
        let off = self
            .block_offset(cluster)
            .expect("the caller made the block");
        self.load(io, off).await?;
        let order = self.g.refcount_order;
        let i = (cluster % self.g.refblock_entries()) as usize;
        let b = self.blocks.get_mut(&off).expect("loaded above");
        set_entry(b.data.as_mut_slice(), order, i, v);
        b.dirty = true;
        if v == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// True when `cluster` has a refcount block.
    pub(super) fn has_block(&self, cluster: u64) -> bool {
        self.block_offset(cluster).is_some()
    }

    /// Writes every dirty block.
    pub async fn write_blocks(&mut self, io: FileIo<'_>) -> Result<(), Qcow2Error> {
        let dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(o, _)| *o)
            .collect();
        for off in dirty {
            let b = self.blocks.get_mut(&off).expect("listed above");
            io.write("write a refcount block", off, b.data.as_mut_slice())
                .await?;
            b.dirty = false;
        }
        Ok(())
    }

    /// Writes the table where it now lives, if it changed.
    pub async fn write_table(&mut self, io: FileIo<'_>) -> Result<(), Qcow2Error> {
        if !self.table_dirty {
            return Ok(());
        }
        let bytes = (self.table_clusters * self.g.cluster_size()) as usize;
        let mut buf = AlignedBuf::zeroed(bytes, 4096)?;
        for (chunk, e) in buf.as_mut_slice().chunks_exact_mut(8).zip(&self.table) {
            chunk.copy_from_slice(&e.to_be_bytes());
        }
        io.write(
            "write the refcount table",
            self.table_offset,
            buf.as_mut_slice(),
        )
        .await?;
        self.table_dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_and_packs_like_qemu() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut data = vec![0u8; 64];
            let n = 64 * 8 / bits as usize;
            for i in 0..n {
                set_entry(&mut data, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&data, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // 1-bit refcounts: entry i is bit i % 8 of byte i / 8, LSB first.
        let mut d = [0u8; 2];
        set_entry(&mut d, 0, 9, 1);
        assert_eq!(d, [0, 0b10]);
        // 16-bit refcounts are big-endian.
        let mut d = [0u8; 4];
        set_entry(&mut d, 4, 1, 0x0102);
        assert_eq!(d, [0, 0, 1, 2]);
    }
}
