//! An NBD server that does no work: blocking reads of each request and one
//! vectored write of a simple reply of zeroes, a thread per connection.
//! What fio reaches against it is the most any server can reach on this
//! machine, so it shows how far a goal stated as a ratio to qsd's IOPS is
//! from what the client allows.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::Context as _;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x3_e889_0455_65a9;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
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

fn connection(mut c: UnixStream, size: u64) -> io::Result<()> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    // FIXED_NEWSTYLE | NO_ZEROES
    hello.extend_from_slice(&3u16.to_be_bytes());
    c.write_all(&hello)?;
    let mut flags = [0u8; 4];
    c.read_exact(&mut flags)?;
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        io::copy(&mut (&mut c).take(len.into()), &mut io::sink())?;
        match opt {
            OPT_GO => {
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&0u16.to_be_bytes()); // NBD_INFO_EXPORT
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&(1u16 | 4).to_be_bytes()); // HAS_FLAGS | SEND_FLUSH
                option_reply(&mut c, opt, REP_INFO, &info)?;
                option_reply(&mut c, opt, REP_ACK, &[])?;
                break;
            }
            OPT_ABORT => return option_reply(&mut c, opt, REP_ACK, &[]),
            _ => option_reply(&mut c, opt, REP_ERR_UNSUP, &[])?,
        }
    }
    let zeroes = vec![0u8; MAX_LEN];
    let mut sink = Vec::new();
    loop {
        let mut rq = [0u8; 28];
        c.read_exact(&mut rq)?;
        let cmd = u16::from_be_bytes(rq[6..8].try_into().unwrap());
        let len = (u32::from_be_bytes(rq[24..28].try_into().unwrap()) as usize).min(MAX_LEN);
        match cmd {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                sink.resize(len, 0);
                c.read_exact(&mut sink)?;
            }
            _ => {}
        }
        let mut reply = [0u8; 16];
        reply[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        reply[8..].copy_from_slice(&rq[8..16]);
        let data = if cmd == CMD_READ { &zeroes[..len] } else { &[] };
        let mut parts = [IoSlice::new(&reply), IoSlice::new(data)];
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

fn option_reply(c: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    c.write_all(&r)
}
