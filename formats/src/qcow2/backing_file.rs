//! Rewriting the backing file name and format in the header, as stream and
//! commit do when they change an image's backing node.
//!
//! The switch is one write. The new name first goes to bytes of the first
//! cluster that nothing refers to, and is flushed; then a single write of
//! the header and its extensions points at it and names the new format.
//! A crash before that write leaves the old header whole; after it, the
//! new one. Only when the first cluster has no spare room (tiny clusters)
//! are the name and the header written together in place, as QEMU does.

use strata_graph::AlignedBuf;

use super::error::Qcow2Error;
use super::header::{EXT_BACKING_FORMAT, EXT_END};
use super::io::FileIo;
use super::meta::Meta;

/// QEMU's limit on a backing file name.
const MAX_NAME: usize = 1023;
const SECTOR: usize = 512;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The header's extensions, each with its 8-byte header and padding, and
/// where the area ends (after the end marker).
fn extensions(head: &[u8], start: usize) -> (Vec<Vec<u8>>, usize) {
    let mut out = Vec::new();
    let mut at = start;
    while at + 8 <= head.len() {
        let kind = be32(head, at);
        if kind == EXT_END {
            return (out, at + 8);
        }
        let padded = (be32(head, at + 4) as usize).div_ceil(8) * 8;
        let end = (at + 8 + padded).min(head.len());
        out.push(head[at..end].to_vec());
        at = end;
    }
    (out, at)
}

fn ext(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(8 + data.len().div_ceil(8) * 8);
    e.extend_from_slice(&kind.to_be_bytes());
    e.extend_from_slice(&(data.len() as u32).to_be_bytes());
    e.extend_from_slice(data);
    e.resize(8 + data.len().div_ceil(8) * 8, 0);
    e
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Points the header at backing file `name` of format `format` (or at no
/// backing file), under the metadata lock, and updates the in-memory copy.
pub(super) async fn set_backing_file(
    meta: &mut Meta,
    io: FileIo<'_>,
    cluster_size: u64,
    name: Option<&str>,
    format: Option<&str>,
) -> Result<(), Qcow2Error> {
    let invalid = |reason: String| Qcow2Error::HeaderUpdate { reason };
    if let Some(n) = name {
        if n.is_empty() || n.len() > MAX_NAME {
            return Err(invalid(format!(
                "backing file name must be 1 to {MAX_NAME} bytes, not {}",
                n.len()
            )));
        }
    }
    if format.is_some_and(|f| f.len() > 16) {
        return Err(invalid(
            "backing format name is longer than 16 bytes".into(),
        ));
    }
    let file_size = io.size()?;
    let room = (cluster_size as usize).min(64 << 10);
    let len = round_up(room.min(file_size as usize).max(SECTOR), SECTOR);
    let mut buf = AlignedBuf::zeroed(len, 4096)?;
    io.read("read the header cluster", 0, buf.as_mut_slice())
        .await?;
    let head = buf.as_mut_slice();

    let hl = meta.header.header_length as usize;
    let (old, old_ext_end) = extensions(head, hl);
    let old_name_end = if meta.header.backing_file_offset == 0 {
        0
    } else {
        (meta.header.backing_file_offset + u64::from(meta.header.backing_file_size)) as usize
    };
    let mut exts: Vec<Vec<u8>> = old
        .into_iter()
        .filter(|e| be32(e, 0) != EXT_BACKING_FORMAT)
        .collect();
    if let (Some(f), Some(_)) = (format, name) {
        exts.insert(0, ext(EXT_BACKING_FORMAT, f.as_bytes()));
    }
    let mut area: Vec<u8> = exts.concat();
    area.extend_from_slice(&[0; 8]);
    let new_ext_end = hl + area.len();
    let limit = head.len().min(cluster_size as usize);

    // Where the name goes: past everything the current header uses, so
    // writing it changes nothing a reader of the old header sees.
    let name_len = name.map_or(0, str::len);
    let spare = round_up(old_ext_end.max(old_name_end).max(new_ext_end), 8);
    let (name_at, two_step) = if name.is_none() {
        (0, false)
    } else if spare + name_len <= limit {
        (spare, true)
    } else if new_ext_end + name_len <= limit {
        (new_ext_end, false)
    } else {
        return Err(invalid(format!(
            "the header, its extensions and a {name_len}-byte backing file name do not fit in \
             the first cluster ({cluster_size} bytes)"
        )));
    };

    if let Some(n) = name {
        head[name_at..name_at + n.len()].copy_from_slice(n.as_bytes());
    }
    if two_step {
        let from = name_at / SECTOR * SECTOR;
        let to = round_up(name_at + name_len, SECTOR).min(head.len());
        io.write(
            "write the backing file name",
            from as u64,
            &mut head[from..to],
        )
        .await?;
        io.flush().await?;
    }

    // The switch: header fields and extensions in one write.
    head[hl..new_ext_end].copy_from_slice(&area);
    let clear_to = old_ext_end.max(new_ext_end);
    let tail_end = if two_step {
        clear_to.min(name_at)
    } else {
        clear_to
    };
    let tail_from = if two_step || name.is_none() {
        new_ext_end
    } else {
        name_at + name_len
    };
    if tail_from < tail_end {
        head[tail_from..tail_end].fill(0);
    }
    head[8..16].copy_from_slice(&(name.map_or(0, |_| name_at as u64)).to_be_bytes());
    head[16..20].copy_from_slice(&(name_len as u32).to_be_bytes());
    let end = if two_step {
        clear_to
    } else {
        clear_to.max(name_at + name_len)
    };
    let end = round_up(end, SECTOR).min(head.len());
    io.write("write the header", 0, &mut head[..end]).await?;
    io.flush().await?;

    let keep = meta.head_block.len().min(head.len());
    meta.head_block.as_mut_slice()[..keep].copy_from_slice(&head[..keep]);
    meta.header.backing_file_offset = name.map_or(0, |_| name_at as u64);
    meta.header.backing_file_size = name_len as u32;
    meta.header.backing_file = name.map(str::to_owned);
    meta.header.backing_format = name.and(format).map(str::to_owned);
    Ok(())
}
