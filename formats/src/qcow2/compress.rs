//! Compressed clusters: raw deflate (zlib) or a zstd frame, inflating to
//! exactly one cluster.

use super::error::Qcow2Error;
use super::header::Compression;

/// Decompresses `data` (read from host offset `offset`) into `out`, which
/// is one cluster. Trailing bytes past the compressed stream are ignored:
/// compressed clusters end inside a sector.
pub fn decompress(
    kind: Compression,
    offset: u64,
    data: &[u8],
    out: &mut [u8],
) -> Result<(), Qcow2Error> {
    let fail = |reason: String| Qcow2Error::Decompress { offset, reason };
    match kind {
        Compression::Zlib => {
            let mut z = flate2::Decompress::new(false);
            let status = z
                .decompress(data, out, flate2::FlushDecompress::Finish)
                .map_err(|e| fail(e.to_string()))?;
            if z.total_out() as usize != out.len() {
                return Err(fail(format!(
                    "inflated to {} bytes instead of {} ({status:?})",
                    z.total_out(),
                    out.len()
                )));
            }
        }
        Compression::Zstd => {
            let mut d = zstd::bulk::Decompressor::new().map_err(|e| fail(e.to_string()))?;
            // A zstd frame says how long it is; the sector padding after it
            // must not be taken for a second frame.
            let frame = zstd::zstd_safe::find_frame_compressed_size(data)
                .map_err(|e| fail(format!("bad frame ({e})")))?;
            let n = d
                .decompress_to_buffer(&data[..frame], out)
                .map_err(|e| fail(e.to_string()))?;
            if n != out.len() {
                return Err(fail(format!(
                    "inflated to {n} bytes instead of {}",
                    out.len()
                )));
            }
        }
    }
    Ok(())
}

/// Compresses one cluster (for tests and, later, `convert -c`).
pub fn compress(kind: Compression, data: &[u8]) -> Vec<u8> {
    match kind {
        Compression::Zlib => {
            let mut z = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = vec![0u8; data.len() * 2 + 64];
            z.compress(data, &mut out, flate2::FlushCompress::Finish)
                .expect("deflate into a large enough buffer");
            out.truncate(z.total_out() as usize);
            out
        }
        Compression::Zstd => zstd::bulk::compress(data, 0).expect("zstd into a growable buffer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_round_trip_with_sector_padding() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [Compression::Zlib, Compression::Zstd] {
            let mut c = compress(kind, &data);
            c.resize(c.len().div_ceil(512) * 512, 0xa5);
            let mut out = vec![0u8; 65536];
            decompress(kind, 0, &c, &mut out).unwrap();
            assert!(out == data, "{kind:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        let mut out = vec![0u8; 4096];
        for kind in [Compression::Zlib, Compression::Zstd] {
            let err = decompress(kind, 0x1000, &[0xff; 100], &mut out).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("compressed cluster at 0x1000 does not decompress"),
                "{err}"
            );
        }
        let short = compress(Compression::Zlib, &[1u8; 1000]);
        let err = decompress(Compression::Zlib, 0, &short, &mut out).unwrap_err();
        assert!(
            err.to_string()
                .contains("inflated to 1000 bytes instead of 4096"),
            "{err}"
        );
    }
}
