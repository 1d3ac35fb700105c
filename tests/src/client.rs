//! A synchronous libblkio client for correctness tests: one request at a
//! time, each checked, through a 4 MiB bounce region split into segments
//! of the device's `size_max`, as a guest's driver splits them.

use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

const REGION: usize = 4 << 20;

/// A connected client on queue 0.
pub struct SyncClient {
    _blkio: Blkio,
    q: Blkioq,
    region: MemoryRegion,
    /// The disk's size in bytes.
    pub capacity: u64,
    /// How long to wait for a completion; `None` waits forever.
    pub timeout: Option<std::time::Duration>,
    /// The region as segments no larger than the device's `size_max`.
    segments: Vec<libc::iovec>,
}

impl SyncClient {
    /// Connects to `socket`.
    pub fn connect(socket: &Path, read_only: bool) -> Result<SyncClient, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        let mut out = b.start()?;
        let capacity = b.get_u64("capacity")?;
        let region = b.alloc_mem_region(REGION)?;
        b.map_mem_region(&region)?;
        let seg = match b.get_i32("max-segment-len")? {
            n if n > 0 => (n as usize).min(REGION),
            _ => REGION,
        };
        let segments = (0..REGION.div_ceil(seg))
            .map(|i| libc::iovec {
                iov_base: (region.addr + i * seg) as *mut libc::c_void,
                iov_len: seg.min(REGION - i * seg),
            })
            .collect();
        Ok(SyncClient {
            q: out.queues.remove(0),
            _blkio: b,
            region,
            capacity,
            timeout: None,
            segments,
        })
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for the client's life and no request
        // is in flight whenever this is called (every call waits).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, REGION) }
    }

    /// The segments covering the first `n` bytes of the region.
    fn segments(&self, n: usize) -> Vec<libc::iovec> {
        let mut left = n;
        let mut out = Vec::new();
        for s in &self.segments {
            if left == 0 {
                break;
            }
            let len = s.iov_len.min(left);
            out.push(libc::iovec {
                iov_base: s.iov_base,
                iov_len: len,
            });
            left -= len;
        }
        out
    }

    /// The request's result; -ETIME when the timeout passed first.
    fn wait(&mut self) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = self.timeout;
        match self.q.do_io(&mut c, 1, t.as_mut(), None) {
            // SAFETY: do_io completed one request.
            Ok(1) => unsafe { c[0].assume_init_ref() }.ret,
            Ok(_) => -libc::ETIME,
            Err(_) => -libc::EIO,
        }
    }

    /// Reads `len` bytes at `offset`; Err(-errno) on failure.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let mut out = Vec::with_capacity(len);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(REGION);
            let iov = self.segments(n);
            self.q.readv(
                offset + done as u64,
                iov.as_ptr(),
                iov.len() as u32,
                0,
                ReqFlags::empty(),
            );
            match self.wait() {
                0 => out.extend_from_slice(&self.buf()[..n]),
                e => return Err(e),
            }
            done += n;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), i32> {
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(REGION);
            self.buf()[..n].copy_from_slice(&data[done..done + n]);
            let iov = self.segments(n);
            self.q.writev(
                offset + done as u64,
                iov.as_ptr(),
                iov.len() as u32,
                0,
                ReqFlags::empty(),
            );
            match self.wait() {
                0 => {}
                e => return Err(e),
            }
            done += n;
        }
        Ok(())
    }

    /// Write-zeroes, allowed to unmap unless `keep`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, keep: bool) -> Result<(), i32> {
        let flags = if keep {
            ReqFlags::NO_UNMAP
        } else {
            ReqFlags::empty()
        };
        self.q.write_zeroes(offset, len, 0, flags);
        match self.wait() {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// Discard.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), i32> {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        match self.wait() {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// Flush.
    pub fn flush(&mut self) -> Result<(), i32> {
        self.q.flush(0, ReqFlags::empty());
        match self.wait() {
            0 => Ok(()),
            e => Err(e),
        }
    }
}
