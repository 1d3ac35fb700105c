//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Strata: a vhost-user-blk backend. It serves a disk image to a VM over a
/// vhost-user unix socket that QEMU or cloud-hypervisor connects to.
#[derive(Debug, Parser)]
#[command(name = "strata", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk image over a vhost-user-blk socket until SIGINT or
    /// SIGTERM. A frontend that disconnects can reconnect.
    Serve(ServeArgs),
}

/// The image formats `serve` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Guess from the image's first bytes.
    Auto,
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write.
    Qcow2,
}

/// Host cache modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// Bypass the host page cache (O_DIRECT, cache.direct=on).
    None,
    /// Use the host page cache (cache.direct=off).
    Writeback,
}

/// Image used when `serve` is given none.
pub const DEFAULT_IMAGE: &str = "strata-disk.img";
/// Size of the image created when `serve` is given none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Options of `strata serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The disk image: a host file or block device. Without one, serves
    /// ./strata-disk.img, creating a 1 GiB image if it does not exist.
    pub image: Option<PathBuf>,

    /// The vhost-user socket to listen on.
    #[arg(long, short = 's', value_name = "PATH")]
    pub socket: PathBuf,

    /// Create the image, as raw, with this size if it does not exist
    /// (bytes, or with a K, M, G, T or P suffix).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub create: Option<u64>,

    /// The image format.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,

    /// The host cache mode.
    #[arg(long, value_enum, default_value_t = CacheArg::Writeback)]
    pub cache: CacheArg,

    /// Number of request queues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Serve the disk read-only: the guest sees a read-only disk and every
    /// write fails.
    #[arg(long)]
    pub read_only: bool,

    /// The serial number the guest reads (GET_ID), up to 20 bytes.
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,

    /// Start with the guest's write cache off: every write is flushed
    /// before it completes. The guest can switch this (CONFIG_WCE).
    #[arg(long)]
    pub writethrough: bool,
}

/// Parses a size: bytes, or a number with a K, M, G, T or P suffix
/// (powers of 1024), as qemu-img takes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad =
        || format!("invalid size '{s}': use bytes, or a number with a K, M, G, T or P suffix");
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("1X").unwrap_err().contains("invalid size '1X'"));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999P").unwrap_err().contains("too large"));
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
