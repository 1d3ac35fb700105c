use super::*;

/// A v3 header for a 1 GiB image with 64 KiB clusters, as qemu-img lays it
/// out: reftable at 0x10000, L1 at 0x30000 (2 entries), then extensions.
fn v3() -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MAGIC.to_be_bytes()); // magic
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
    h.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
    h.extend_from_slice(&16u32.to_be_bytes()); // cluster_bits
    h.extend_from_slice(&(1u64 << 30).to_be_bytes()); // size
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    h.extend_from_slice(&2u32.to_be_bytes()); // l1_size
    h.extend_from_slice(&0x30000u64.to_be_bytes()); // l1_table_offset
    h.extend_from_slice(&0x10000u64.to_be_bytes()); // refcount_table_offset
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount_order
    h.extend_from_slice(&112u32.to_be_bytes()); // header_length
    h.extend_from_slice(&[0; 8]); // compression_type + padding
    h.extend_from_slice(&EXT_END.to_be_bytes()); // end of extensions
    h.extend_from_slice(&0u32.to_be_bytes());
    h.resize(65536, 0);
    h
}

const FILE: u64 = 0x40000;

fn set32(h: &mut [u8], at: usize, v: u32) {
    h[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn set64(h: &mut [u8], at: usize, v: u64) {
    h[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn err(h: &[u8]) -> String {
    Header::parse(h, FILE).unwrap_err().to_string()
}

#[test]
fn a_plain_v3_header() {
    let h = Header::parse(&v3(), FILE).unwrap();
    assert_eq!((h.version, h.size, h.l1_size), (3, 1 << 30, 2));
    assert_eq!(h.geometry.cluster_size(), 65536);
    assert_eq!(h.geometry.refcount_bits(), 16);
    assert_eq!(h.compression, Compression::Zlib);
    assert!(!h.is_dirty() && !h.is_corrupt());
}

#[test]
fn backing_name_and_format_extension() {
    let mut h = v3();
    let at = 112;
    set32(&mut h, at, EXT_BACKING_FORMAT); // type
    set32(&mut h, at + 4, 3); // length
    h[at + 8..at + 11].copy_from_slice(b"raw"); // data, padded to 8
    set32(&mut h, at + 16, EXT_END);
    set32(&mut h, at + 20, 0);
    h[0x200..0x208].copy_from_slice(b"base.img");
    set64(&mut h, 8, 0x200); // backing_file_offset
    set32(&mut h, 16, 8); // backing_file_size
    let p = Header::parse(&h, FILE).unwrap();
    assert_eq!(p.backing_file.as_deref(), Some("base.img"));
    assert_eq!(p.backing_format.as_deref(), Some("raw"));
}

#[test]
fn hostile_headers_get_clear_errors() {
    assert_eq!(
        Header::parse(&v3()[..50], 50).unwrap_err().to_string(),
        "image is truncated: 50 bytes, too short for a qcow2 header"
    );
    let mut h = v3();
    set32(&mut h, 0, 0x12345678);
    assert_eq!(err(&h), "not a qcow2 image (bad magic)");
    let mut h = v3();
    set32(&mut h, 4, 4);
    assert_eq!(err(&h), "unsupported qcow2 version 4");
    let mut h = v3();
    set32(&mut h, 20, 30);
    assert!(err(&h).starts_with("cluster_bits 30 is invalid"));
    let mut h = v3();
    set32(&mut h, 32, 1);
    assert_eq!(err(&h), "encrypted qcow2 images are not supported");
    let mut h = v3();
    set32(&mut h, 36, 1 << 30); // l1_size
    assert_eq!(
        err(&h),
        "L1 table has 1073741824 entries, more than the limit of 4194304"
    );
    let mut h = v3();
    set32(&mut h, 36, 1); // too few for 1 GiB
    assert_eq!(
        err(&h),
        "L1 table has 1 entries, too few for a 1073741824-byte disk (2 needed)"
    );
    let mut h = v3();
    set64(&mut h, 40, 0x30001);
    assert_eq!(
        err(&h),
        "L1 table offset 0x30001 is not aligned to a cluster"
    );
    let mut h = v3();
    set64(&mut h, 40, 1 << 40);
    assert!(
        err(&h).starts_with("L1 table (16 bytes at 0x10000000000) lies past the end of the file")
    );
    let mut h = v3();
    set64(&mut h, 40, 0x10000); // L1 on top of the refcount table
    assert_eq!(err(&h), "L1 table and refcount table overlap");
    let mut h = v3();
    set64(&mut h, 48, 0); // refcount table on top of the header
    assert_eq!(err(&h), "header and refcount table overlap");
    let mut h = v3();
    set32(&mut h, 56, 1 << 20); // refcount_table_clusters
    assert!(err(&h).starts_with("refcount table has"));
    let mut h = v3();
    set64(&mut h, 24, u64::MAX); // size
    assert_eq!(err(&h), format!("virtual size {} is too large", u64::MAX));
    let mut h = v3();
    set32(&mut h, 96, 7);
    assert_eq!(err(&h), "refcount_order 7 is invalid for a version 3 image");
    let mut h = v3();
    set32(&mut h, 100, 4 << 20);
    assert!(err(&h).starts_with("header_length 4194304 is invalid"));
    let mut h = v3();
    set64(&mut h, 8, 0x200);
    set32(&mut h, 16, 5000);
    assert_eq!(
        err(&h),
        "backing file name (5000 bytes at 0x200) is invalid"
    );
    let mut h = v3();
    set32(&mut h, 112, EXT_FEATURE_NAMES);
    set32(&mut h, 116, 0xffff_0000);
    assert!(err(&h).starts_with("header extension 0x6803f857"));
}

#[test]
fn unknown_incompatible_features_are_named() {
    let mut h = v3();
    set64(&mut h, 72, 1 << 9);
    assert_eq!(
        err(&h),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 200"
    );
    // With a feature name table, the name is used.
    let at = 112;
    set32(&mut h, at, EXT_FEATURE_NAMES);
    set32(&mut h, at + 4, 48);
    h[at + 8] = 0; // type: incompatible
    h[at + 9] = 9; // bit
    h[at + 10..at + 10 + 12].copy_from_slice(b"time travel\0");
    set32(&mut h, at + 56, EXT_END);
    assert_eq!(err(&h), "Unsupported qcow2 feature(s): time travel");
    let mut h = v3();
    set64(&mut h, 72, INCOMPAT_DATA_FILE);
    assert_eq!(
        err(&h),
        "qcow2 feature 'external data file' is not supported"
    );
}
