//! Feature bits and the `virtio_blk_config` space (virtio 1.2, 5.2.4).

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Data segments per request the guest may use, as qemu-storage-daemon
/// offers (enforced: more is IOERR).
pub const SEG_MAX: u32 = 126;
/// The largest segment (descriptor) the guest may use, in bytes (enforced:
/// larger is IOERR). With SEG_MAX it bounds a request to 126 MiB.
pub const SIZE_MAX: u32 = 1 << 20;
/// The largest discard or write-zeroes request, in 512-byte sectors.
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// Length of the config space we expose: up to `write_zeroes_may_unmap`
/// and its padding.
pub const CONFIG_LEN: usize = 60;
/// Offset of the `writeback` byte, the only field a driver may write.
pub const WRITEBACK_OFFSET: usize = 32;

/// The virtio feature bits the device offers.
pub fn device_features(read_only: bool) -> u64 {
    let bits = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
    ];
    let mut f = bits.iter().fold(0u64, |f, &b| f | 1 << b);
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// The values behind the config space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Write-back (true) or write-through (false) cache mode.
    pub writeback: bool,
}

impl BlkConfig {
    /// The config space, little-endian, field by field.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        let sectors_per_block = self.blk_size / 512;
        put(0, &self.capacity.to_le_bytes()); // capacity
        put(8, &SIZE_MAX.to_le_bytes()); // size_max
        put(12, &SEG_MAX.to_le_bytes()); // seg_max
                                         // 16..20: geometry, not offered
        put(20, &self.blk_size.to_le_bytes()); // blk_size
        put(24, &[0]); // physical_block_exp
        put(25, &[0]); // alignment_offset
        put(26, &1u16.to_le_bytes()); // min_io_size, in blocks
        put(28, &0u32.to_le_bytes()); // opt_io_size: no preference
        put(WRITEBACK_OFFSET, &[u8::from(self.writeback)]); // writeback
                                                            // 33: unused0
        put(34, &self.num_queues.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &sectors_per_block.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        let c = BlkConfig {
            capacity: 0x0102_0304_0506_0708,
            blk_size: 4096,
            num_queues: 2,
            writeback: true,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 32768);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn read_only_adds_ro() {
        assert_eq!(
            device_features(true) & !device_features(false),
            1 << VIRTIO_BLK_F_RO
        );
        assert_ne!(device_features(false) & 1 << VIRTIO_F_VERSION_1, 0);
    }
}
