//! The `nbd` protocol driver: a disk that lives on an NBD server (qemu-nbd,
//! qemu-storage-daemon, another Strata), reached over a unix socket or TCP,
//! with or without TLS. Every thread's requests are pipelined on one
//! connection ([`connection`]); block status comes from the server's
//! `base:allocation`, so stream, commit and mirror skip its holes.

pub mod connection;
pub mod handshake;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::join_all;
use strata_graph::{BlockDriver, BlockError, BlockStatus, GraphView, IoFuture, IoOp, IoVecs};
use strata_nbd::consts::{cflag, tflag, STATE_ZERO};
use strata_nbd::Command;

use connection::{Answer, ConnectOptions, Connection, Failure, Req};
use handshake::ExportInfo;

/// The longest WRITE_ZEROES, TRIM or BLOCK_STATUS sent at once: lengths
/// on the wire are 32 bits.
const MAX_RANGE: u64 = 1 << 30;

/// A node on an NBD export.
pub struct NbdNode {
    conn: Connection,
    info: ExportInfo,
    size: AtomicU64,
    read_only: bool,
}

impl NbdNode {
    /// Connects to the export (`read_only` when the node is opened so).
    pub fn open(opts: ConnectOptions, read_only: bool) -> std::io::Result<NbdNode> {
        let (conn, info) = Connection::open(opts)?;
        Ok(NbdNode {
            conn,
            size: AtomicU64::new(info.size),
            read_only: read_only || info.flags & tflag::READ_ONLY != 0,
            info,
        })
    }

    fn has(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    /// Runs one request and maps a failure to the errno the guest sees.
    async fn call(&self, op: IoOp, req: Req) -> Result<Answer, BlockError> {
        let offset = req.offset;
        let rx = self.conn.submit(req);
        let _waiting = strata_runtime::offload::Waiting::new();
        match rx.await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(Failure::Server { error, message })) => {
                if !message.is_empty() {
                    tracing::debug!("NBD {op} at {offset}: {message}");
                }
                Err(BlockError::errno(op, offset, errno(error)))
            }
            Ok(Err(Failure::Down(why))) => {
                tracing::debug!("NBD {op} at {offset}: {why}");
                Err(BlockError::errno(op, offset, libc::EIO))
            }
            Err(_) => Err(BlockError::errno(op, offset, libc::EIO)),
        }
    }

    fn req(cmd: Command, flags: u16, offset: u64, len: u64) -> Req {
        Req {
            cmd,
            flags,
            offset,
            len: len as u32,
            payload: None,
            buf: Vec::new(),
        }
    }

    /// The pieces of `len` bytes at `offset` at most `max` long each.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
        (0..len.div_ceil(max)).map(move |i| {
            let at = i * max;
            (offset + at, max.min(len - at))
        })
    }

    /// Runs `cmd` over the range in pieces, all in flight at once.
    async fn ranged(
        &self,
        op: IoOp,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let max = MAX_RANGE / u64::from(self.info.min_block) * u64::from(self.info.min_block);
        let calls = Self::pieces(offset, len, max)
            .map(|(at, n)| self.call(op, Self::req(cmd, flags, at, n)));
        join_all(calls)
            .await
            .into_iter()
            .try_for_each(|r| r.map(drop))
    }

    fn writable(&self, op: IoOp) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly { op });
        }
        Ok(())
    }
}

/// The host's errno for an NBD error value; they agree on Linux for the
/// values the protocol names.
fn errno(nbd: u32) -> i32 {
    match nbd {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => nbd as i32,
        _ => libc::EIO,
    }
}

/// A zeroed buffer of `len` bytes, or ENOMEM.
fn zeroed(op: IoOp, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| BlockError::errno(op, offset, libc::ENOMEM))?;
    v.resize(len, 0);
    Ok(v)
}

impl BlockDriver for NbdNode {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn size(&self, _g: &GraphView) -> Result<u64, BlockError> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self, _g: &GraphView) -> u32 {
        self.info.min_block
    }

    fn read<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(async move {
            let max = u64::from(self.info.max_payload);
            let mut calls = Vec::new();
            for (at, n) in Self::pieces(offset, buf.len(), max) {
                let mut req = Self::req(Command::Read, 0, at, n);
                req.buf = zeroed(IoOp::Read, at, n as usize)?;
                calls.push(async move { (at, self.call(IoOp::Read, req).await) });
            }
            for (at, res) in join_all(calls).await {
                buf.copy_from_slice(at - offset, &res?.data);
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, _g: &'a GraphView, offset: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.writable(IoOp::Write)?;
            let max = u64::from(self.info.max_payload);
            let mut calls = Vec::new();
            for (at, n) in Self::pieces(offset, buf.len(), max) {
                // A snapshot of guest memory, which may change under us.
                let mut data = zeroed(IoOp::Write, at, n as usize)?;
                buf.copy_to_slice(at - offset, &mut data);
                let mut req = Self::req(Command::Write, 0, at, n);
                req.payload = Some(std::sync::Arc::new(data));
                calls.push(self.call(IoOp::Write, req));
            }
            join_all(calls)
                .await
                .into_iter()
                .try_for_each(|r| r.map(drop))
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        g: &'a GraphView,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.writable(IoOp::WriteZeroes)?;
            if self.has(tflag::SEND_WRITE_ZEROES) {
                let flags = if may_unmap { 0 } else { cflag::NO_HOLE };
                return self
                    .ranged(IoOp::WriteZeroes, Command::WriteZeroes, flags, offset, len)
                    .await;
            }
            // No WRITE_ZEROES: zeroes written as data.
            let max = u64::from(self.info.max_payload).min(1 << 20);
            let zeroes = zeroed(IoOp::WriteZeroes, offset, max as usize)?;
            for (at, n) in Self::pieces(offset, len, max) {
                let mut z = zeroes[..n as usize].to_vec();
                let iov = IoVecs::from_slice(&mut z);
                self.write(g, at, &iov).await?;
            }
            Ok(())
        })
    }

    fn discard<'a>(&'a self, _g: &'a GraphView, offset: u64, len: u64) -> IoFuture<'a> {
        IoFuture::new(async move {
            self.writable(IoOp::Discard)?;
            if !self.has(tflag::SEND_TRIM) {
                // Discarding is advice; a server that takes none is fine.
                return Ok(());
            }
            self.ranged(IoOp::Discard, Command::Trim, 0, offset, len)
                .await
        })
    }

    fn flush<'a>(&'a self, _g: &'a GraphView) -> IoFuture<'a> {
        IoFuture::new(async move {
            if self.read_only || !self.has(tflag::SEND_FLUSH) {
                return Ok(());
            }
            self.call(IoOp::Flush, Self::req(Command::Flush, 0, 0, 0))
                .await
                .map(drop)
        })
    }

    fn block_status<'a>(
        &'a self,
        _g: &'a GraphView,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        let data = BlockStatus {
            len,
            allocated: true,
            zero: false,
            offset: None,
        };
        if self.info.allocation.is_none() || len == 0 {
            return IoFuture::ready(Ok(data));
        }
        IoFuture::new(async move {
            let align = u64::from(self.info.min_block);
            let ask = len.min(MAX_RANGE / align * align).max(len.min(align));
            let req = Self::req(Command::BlockStatus, cflag::REQ_ONE, offset, ask);
            let answer = self.call(IoOp::Read, req).await?;
            Ok(match answer.extent {
                Some(e) => BlockStatus {
                    len: u64::from(e.len).min(len),
                    zero: e.flags & STATE_ZERO != 0,
                    ..data
                },
                None => data,
            })
        })
    }
}
