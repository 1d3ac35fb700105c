//! Guest memory as the device holds it: the frontend's map, handles that
//! keep it mapped while requests use it, and the only ways the device reads
//! or writes it outside of I/O buffers.
//!
//! Every byte here can change under us at any time: the guest runs on
//! other CPUs. Reads are volatile and copy into locals, so each value is
//! read exactly once and decided on as read; nothing hands out a Rust
//! reference into guest memory.

use std::ops::Deref;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::Arc;

use strata_graph::IoVecs;
use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The guest's memory, as vhost-user maps it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// A thread-local handle on a guest memory map. While one exists, every
/// region of that map stays mapped, so pointers into it stay valid.
/// The outer `Rc` keeps clones off the shared reference count.
#[derive(Clone)]
#[allow(clippy::redundant_allocation)]
pub struct MemHandle(Rc<Arc<GuestMemory>>);

impl MemHandle {
    /// Wraps a memory map.
    pub fn new(mem: Arc<GuestMemory>) -> Self {
        MemHandle(Rc::new(mem))
    }

    /// True when this handle is on `mem`.
    pub fn is(&self, mem: &Arc<GuestMemory>) -> bool {
        Arc::ptr_eq(&self.0, mem)
    }

    /// True when this handle is on the map `current` guards.
    pub fn is_current(&self, current: &GuestMemoryLoadGuard<GuestMemory>) -> bool {
        std::ptr::eq(Arc::as_ptr(&self.0), &**current)
    }

    /// True when both handles are on the same memory map.
    pub fn same(&self, other: &MemHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The host address of `len` bytes at `addr`, when they lie in one
    /// region and the address is a multiple of `align`.
    pub fn host_ptr(&self, addr: u64, len: usize, align: usize) -> Option<NonNull<u8>> {
        let slice = self.get_slice(GuestAddress(addr), len).ok()?;
        let ptr = slice.ptr_guard_mut().as_ptr();
        (ptr as usize % align == 0)
            .then(|| NonNull::new(ptr))
            .flatten()
    }

    /// The guest physical address of host address `host`, if it lies in
    /// this map: for the dirty log, which counts guest pages.
    pub fn gpa_of(&self, host: *const u8) -> Option<u64> {
        let host = host as usize;
        self.iter().find_map(|r| {
            let base = r.as_ptr() as usize;
            let off = host.checked_sub(base)?;
            (off < r.len() as usize).then(|| r.start_addr().0 + off as u64)
        })
    }

    /// Reads `N` bytes at `addr` with one volatile load, when they lie in
    /// one region.
    pub fn read_bytes<const N: usize>(&self, addr: u64) -> Option<[u8; N]> {
        let p = self.host_ptr(addr, N, 1)?;
        // SAFETY: `p` maps N bytes of guest memory that `self` keeps mapped
        // for this call; `[u8; N]` has alignment 1. The guest may write
        // them concurrently: a volatile load reads each byte once, and the
        // caller decides on the copy.
        Some(unsafe { p.as_ptr().cast::<[u8; N]>().read_volatile() })
    }

    /// Maps `len` bytes at `addr` into `iov`, one segment per region they
    /// cross, up to `max_segments` segments in all.
    pub fn map_into(
        &self,
        iov: &mut IoVecs<'static>,
        addr: u64,
        len: usize,
        max_segments: usize,
    ) -> Result<(), MapError> {
        for slice in GuestMemoryBackend::get_slices(&**self, GuestAddress(addr), len) {
            let slice = slice.map_err(|_| MapError::Unmapped)?;
            if iov.as_iovecs().len() >= max_segments {
                return Err(MapError::TooManySegments);
            }
            // SAFETY: the slice lies in a region of this map; whoever keeps
            // the IoVecs keeps a MemHandle on the map (a request does, in
            // its StatusByte) for as long as they live, and regions are
            // unmapped only when the last handle goes. Guest accesses race
            // only with volatile copies and the kernel's.
            unsafe { iov.push(slice.ptr_guard_mut().as_ptr(), slice.len()) };
        }
        Ok(())
    }
}

/// Why [`MemHandle::map_into`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Part of the range is not guest memory.
    Unmapped,
    /// The range needs more segments than allowed.
    TooManySegments,
}

impl Deref for MemHandle {
    type Target = GuestMemory;

    fn deref(&self) -> &GuestMemory {
        &self.0
    }
}

/// Where a request's status byte goes. Holds the memory it points into.
pub struct StatusByte {
    ptr: NonNull<u8>,
    _mem: MemHandle,
}

impl StatusByte {
    /// The byte at guest address `addr`, if it is guest memory.
    pub fn at(mem: &MemHandle, addr: u64) -> Option<StatusByte> {
        Some(StatusByte {
            ptr: mem.host_ptr(addr, 1, 1)?,
            _mem: mem.clone(),
        })
    }

    /// The memory map the byte is in.
    pub fn memory(&self) -> &MemHandle {
        &self._mem
    }

    /// The byte's guest physical address.
    pub fn gpa(&self) -> Option<u64> {
        self._mem.gpa_of(self.ptr.as_ptr())
    }

    /// Stores the status. Must happen before the chain goes on the used ring.
    pub fn set(&self, status: u8) {
        // SAFETY: `ptr` was mapped from a device-writable descriptor of the
        // guest memory that `_mem` keeps mapped. The guest may race with us,
        // which a volatile byte store tolerates.
        unsafe { self.ptr.as_ptr().write_volatile(status) }
    }
}
