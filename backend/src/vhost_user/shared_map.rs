//! Memory a frontend shares through a file descriptor (the inflight
//! region, the dirty log): checked against its file, mapped shared,
//! unmapped when dropped. Callers touch it only through atomics.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `len` bytes of a file, mapped read-write and shared.
pub(crate) struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory; every user accesses it through atomics,
// and it is unmapped only when the map is dropped.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` bytes of `file` at `offset`; `what` names the memory in
    /// errors. The range must lie inside the file and start on a page.
    pub fn map(file: &File, offset: u64, len: u64, what: &str) -> io::Result<SharedMap> {
        let file_len = file.metadata()?.len();
        if len == 0
            || offset % 4096 != 0
            || offset.checked_add(len).is_none_or(|end| end > file_len)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the {what} at {offset}+{len} does not fit its {file_len}-byte file, or is \
                     empty or not page aligned"
                ),
            ));
        }
        let len = usize::try_from(len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {what} of {len} bytes"),
            )
        })?;
        // SAFETY: a fresh shared mapping of `len` bytes that `file` holds
        // (checked above), at an address range nothing else uses.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMap {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The first byte.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// How many bytes are mapped.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer used.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
