//! An NBD server that does no work: blocking reads of each request and one
//! vectored write of a simple reply of zeroes, a thread per connection.
//! What fio reaches against it is the most any server can reach on this
//! machine, so it shows how far a goal stated as a ratio to qsd's IOPS is
//! from what the client allows.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::Context as _;
use strata_nbd::consts::{info, opt, rep, tflag, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES};
use strata_nbd::consts::{IHAVEOPT, NBDMAGIC};
use strata_nbd::{option_reply, simple_reply, Command, OptionHeader, Request, REQUEST_LEN};

/// The largest request served; fio's jobs stay far below it.
const MAX_LEN: usize = 32 << 20;

/// Serves an export of `size` bytes at `path` until killed.
pub fn serve(path: &Path, size: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    for conn in listener.incoming() {
        let conn = conn?;
        std::thread::spawn(move || {
            // A probe that connects and leaves, or fio's disconnect.
            let _ = connection(conn, size);
        });
    }
    Ok(())
}

fn bad(e: impl std::fmt::Debug) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}"))
}

fn connection(mut c: UnixStream, size: u64) -> io::Result<()> {
    let mut out = Vec::new();
    out.extend(NBDMAGIC.to_be_bytes());
    out.extend(IHAVEOPT.to_be_bytes());
    out.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    c.write_all(&out)?;
    let mut flags = [0u8; 4];
    c.read_exact(&mut flags)?;
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h)?;
        let h = OptionHeader::parse(&h).map_err(bad)?;
        io::copy(&mut (&mut c).take(h.len.into()), &mut io::sink())?;
        out.clear();
        match h.option {
            opt::GO => {
                let mut export = info::EXPORT.to_be_bytes().to_vec();
                export.extend(size.to_be_bytes());
                export.extend((tflag::HAS_FLAGS | tflag::SEND_FLUSH).to_be_bytes());
                option_reply(&mut out, h.option, rep::INFO, &export);
                option_reply(&mut out, h.option, rep::ACK, &[]);
                c.write_all(&out)?;
                break;
            }
            opt::ABORT => {
                option_reply(&mut out, h.option, rep::ACK, &[]);
                return c.write_all(&out);
            }
            _ => {
                option_reply(&mut out, h.option, rep::ERR_UNSUP, &[]);
                c.write_all(&out)?;
            }
        }
    }
    let zeroes = vec![0u8; MAX_LEN];
    let mut sink = Vec::new();
    loop {
        let mut rq = [0u8; REQUEST_LEN];
        c.read_exact(&mut rq)?;
        let rq = Request::parse(&rq).map_err(bad)?;
        let len = (rq.len as usize).min(MAX_LEN);
        match rq.command {
            Command::Disconnect => return Ok(()),
            Command::Write => {
                sink.resize(len, 0);
                c.read_exact(&mut sink)?;
            }
            _ => {}
        }
        out.clear();
        simple_reply(&mut out, 0, rq.cookie);
        let data = if rq.command == Command::Read {
            &zeroes[..len]
        } else {
            &[]
        };
        let mut parts = [IoSlice::new(&out), IoSlice::new(data)];
        let mut parts = &mut parts[..];
        while !parts.is_empty() {
            let n = c.write_vectored(parts)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut parts, n);
        }
    }
}
