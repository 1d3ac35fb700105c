//! Image files as a whole: probing their format and creating new ones.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The image formats Strata recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// The format's name as qemu-img spells it.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Bytes at the start of an image that [`format_of`] looks at.
pub const PROBE_LEN: usize = 4;

/// The format an image starting with `head` would probe as.
pub fn format_of(head: &[u8]) -> ImageFormat {
    if head.starts_with(&QCOW2_MAGIC) {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    }
}

/// Why an image could not be probed or created.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// `create` would overwrite an existing file.
    #[error("{path} already exists")]
    Exists {
        /// The image.
        path: PathBuf,
    },
    /// A zero-sized image is useless to a guest.
    #[error("the size of {path} must be at least 512 bytes and a multiple of 512")]
    BadSize {
        /// The image.
        path: PathBuf,
    },
}

/// Guesses the format of the image at `path` from its first bytes.
pub fn probe(path: &Path) -> Result<ImageFormat, ImageError> {
    let io = |source| ImageError::Io {
        path: path.into(),
        source,
    };
    let mut magic = [0u8; PROBE_LEN];
    let mut f = OpenOptions::new().read(true).open(path).map_err(io)?;
    let mut got = 0;
    while got < magic.len() {
        match f.read(&mut magic[got..]).map_err(io)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(format_of(&magic[..got]))
}

/// Creates a sparse raw image of `size` bytes. Refuses to overwrite.
pub fn create_raw(path: &Path, size: u64) -> Result<(), ImageError> {
    if size == 0 || size % 512 != 0 {
        return Err(ImageError::BadSize { path: path.into() });
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => ImageError::Exists { path: path.into() },
            _ => ImageError::Io {
                path: path.into(),
                source,
            },
        })?;
    f.set_len(size).map_err(|source| ImageError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_qcow2_magic_and_defaults_to_raw() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("a.qcow2");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        assert_eq!(probe(&q).unwrap(), ImageFormat::Qcow2);
        let r = dir.path().join("a.img");
        std::fs::write(&r, b"QF").unwrap();
        assert_eq!(probe(&r).unwrap(), ImageFormat::Raw);
        let err = probe(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn create_raw_is_sparse_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        create_raw(&p, 1 << 30).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 1 << 30);
        assert!(std::os::unix::fs::MetadataExt::blocks(&md) < 64, "sparse");
        assert!(matches!(
            create_raw(&p, 4096),
            Err(ImageError::Exists { .. })
        ));
        assert!(matches!(
            create_raw(&dir.path().join("odd.img"), 1000),
            Err(ImageError::BadSize { .. })
        ));
    }
}
