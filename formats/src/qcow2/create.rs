//! Creating qcow2 images, with qemu-img's options.
//!
//! The file starts minimal (header, one refcount table cluster, one
//! refcount block, no L1 table), then is opened and grown to its size by
//! the driver itself, so creation uses the same allocation code as
//! everything else.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_graph::{BlockDriver, Graph};

use super::error::Qcow2Error;
use super::header::{
    Compression, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_END, EXT_FEATURE_NAMES,
    INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, MAGIC,
};
use super::node::{Qcow2Node, Qcow2Options};
use super::refcount::set_entry;
use crate::file::{FileNode, FileOptions};
use strata_runtime::reactor::block_on;

/// Options of a new qcow2 image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// Refcount width: a power of two from 1 to 64 bits.
    pub refcount_bits: u64,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Set the lazy refcounts feature bit.
    pub lazy_refcounts: bool,
    /// How compressed clusters will be compressed.
    pub compression: Compression,
    /// The backing file name, as stored in the header.
    pub backing_file: Option<String>,
    /// The backing file's format.
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            extended_l2: false,
            version: 3,
            lazy_refcounts: false,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Why an image could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A bad option combination.
    #[error("{0}")]
    Invalid(String),
    /// The file exists.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// Writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Growing the new image failed.
    #[error("{0}")]
    Qcow2(#[from] Qcow2Error),
}

impl CreateOptions {
    fn validate(&self) -> Result<(), CreateError> {
        let bad = |m: String| Err(CreateError::Invalid(m));
        if !self.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&self.cluster_size) {
            return bad(format!(
                "Cluster size must be a power of two between 512 and 2048k, not {}",
                self.cluster_size
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad(format!(
                "Refcount width must be a power of two and may not exceed 64 bits, not {}",
                self.refcount_bits
            ));
        }
        if self.size % 512 != 0 {
            return bad(format!(
                "Image size must be a multiple of 512 bytes, not {}",
                self.size
            ));
        }
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into());
            }
            if self.extended_l2 {
                return bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into());
            }
            if self.lazy_refcounts {
                return bad("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into());
            }
            if self.compression != Compression::Zlib {
                return bad("Compression types other than zlib require compatibility level 1.1 or above (use compat=1.1 or greater)".into());
            }
        } else if self.version != 3 {
            return bad(format!(
                "compat must be 0.10 or 1.1, not version {}",
                self.version
            ));
        }
        if self.extended_l2 && self.cluster_size < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16 KB"
                    .into(),
            );
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file".into());
        }
        if self.backing_file.as_ref().is_some_and(|b| b.len() > 1023) {
            return bad("Backing file name too long".into());
        }
        Ok(())
    }

    /// The header cluster of the new, empty image.
    fn header_cluster(&self) -> Vec<u8> {
        let cs = self.cluster_size as usize;
        let mut h = vec![0u8; cs];
        let put32 =
            |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut h, 0, MAGIC);
        put32(&mut h, 4, self.version);
        put32(&mut h, 20, self.cluster_size.trailing_zeros());
        put64(&mut h, 48, self.cluster_size); // refcount table at cluster 1
        put32(&mut h, 56, 1);
        let mut at = if self.version == 3 {
            let mut incompat = 0;
            if self.extended_l2 {
                incompat |= INCOMPAT_EXTL2;
            }
            if self.compression == Compression::Zstd {
                incompat |= INCOMPAT_COMPRESSION;
                h[104] = 1;
            }
            put64(&mut h, 72, incompat);
            put64(
                &mut h,
                80,
                if self.lazy_refcounts {
                    COMPAT_LAZY_REFCOUNTS
                } else {
                    0
                },
            );
            put32(&mut h, 96, self.refcount_bits.trailing_zeros());
            put32(&mut h, 100, 112);
            112
        } else {
            72
        };
        let ext = |h: &mut [u8], at: &mut usize, kind: u32, data: &[u8]| {
            put32(h, *at, kind);
            put32(h, *at + 4, data.len() as u32);
            h[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
            *at += 8 + data.len().div_ceil(8) * 8;
        };
        if let Some(f) = &self.backing_format {
            ext(&mut h, &mut at, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if self.version == 3 && cs >= 4096 {
            let names: &[(u8, u8, &str)] = &[
                (0, 0, "dirty bit"),
                (0, 1, "corrupt bit"),
                (0, 2, "external data file"),
                (0, 3, "compression type"),
                (0, 4, "extended L2 entries"),
                (1, 0, "lazy refcounts"),
                (2, 0, "bitmaps"),
                (2, 1, "raw external data"),
            ];
            let mut table = Vec::new();
            for (t, b, n) in names {
                let mut e = [0u8; 48];
                e[0] = *t;
                e[1] = *b;
                e[2..2 + n.len()].copy_from_slice(n.as_bytes());
                table.extend_from_slice(&e);
            }
            ext(&mut h, &mut at, EXT_FEATURE_NAMES, &table);
        }
        put32(&mut h, at, EXT_END);
        put32(&mut h, at + 4, 0);
        at += 8;
        if let Some(b) = &self.backing_file {
            put64(&mut h, 8, at as u64);
            put32(&mut h, 16, b.len() as u32);
            h[at..at + b.len()].copy_from_slice(b.as_bytes());
        }
        h
    }
}

/// Creates the image `path`. Refuses to overwrite.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), CreateError> {
    opts.validate()?;
    let cs = opts.cluster_size as usize;
    let mut image = opts.header_cluster();
    if image.len() < 72 + opts.backing_file.as_ref().map_or(0, |b| b.len()) {
        return Err(CreateError::Invalid(
            "the header does not fit in one cluster".into(),
        ));
    }
    // Cluster 1: the refcount table; cluster 2: its first block.
    let mut table = vec![0u8; cs];
    table[..8].copy_from_slice(&(2 * opts.cluster_size).to_be_bytes());
    let mut block = vec![0u8; cs];
    let order = opts.refcount_bits.trailing_zeros();
    for c in 0..3 {
        set_entry(&mut block, order, c, 1);
    }
    image.extend_from_slice(&table);
    image.extend_from_slice(&block);
    let io = |source| CreateError::Io {
        path: path.into(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CreateError::Exists(path.into()),
            _ => io(e),
        })?;
    f.write_all(&image).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);

    let graph = Graph::new();
    let fopts = FileOptions {
        filename: path.into(),
        ..Default::default()
    };
    let file = graph
        .add_node("file", |_| {
            FileNode::open(&fopts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
        })
        .map_err(|e| CreateError::Invalid(e.to_string()))?;
    let qopts = Qcow2Options::default();
    let node = graph
        .add_node("image", |b| {
            Qcow2Node::open(b, file, None, &qopts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
        })
        .map_err(|e| CreateError::Invalid(e.to_string()))?;
    let v = graph.view();
    let driver = v.node(node).expect("just added").driver();
    block_on(async {
        driver.resize(&v, opts.size).await?;
        driver.flush(&v).await
    })
    .map_err(io)?
    .map_err(|e| CreateError::Invalid(e.to_string()))?;
    Ok(())
}
