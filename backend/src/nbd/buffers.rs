//! A connection's I/O buffers, kept for reuse: a 1 MiB read would
//! otherwise map, fault in, zero and unmap a fresh buffer every time.
//! Buffers come in powers of two from 4 KiB; a few MiB of them are kept.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use strata_graph::{AlignedBuf, AllocError, IoVecs};

/// What O_DIRECT below may need.
const ALIGN: usize = 4096;
/// Most bytes of idle buffers a connection keeps.
const KEEP: usize = 8 << 20;

/// The idle buffers of one connection.
#[derive(Default)]
pub struct Pool {
    free: RefCell<Vec<AlignedBuf>>,
    kept: Cell<usize>,
}

/// A buffer of `len` bytes from a [`Pool`], back to it when dropped.
/// A reused buffer holds what its last request left in it: only ever
/// this connection's own data.
pub struct Buf {
    buf: Option<AlignedBuf>,
    len: usize,
    pool: Rc<Pool>,
}

impl Pool {
    /// A buffer of at least `len` bytes.
    pub fn get(self: &Rc<Self>, len: usize) -> Result<Buf, AllocError> {
        let size = len.max(ALIGN).next_power_of_two();
        let reused = {
            let mut free = self.free.borrow_mut();
            free.iter()
                .position(|b| b.len() == size)
                .map(|i| free.swap_remove(i))
        };
        let buf = match reused {
            Some(b) => {
                self.kept.set(self.kept.get() - size);
                b
            }
            None => AlignedBuf::zeroed(size, ALIGN)?,
        };
        Ok(Buf {
            buf: Some(buf),
            len,
            pool: Rc::clone(self),
        })
    }
}

impl Buf {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf.as_ref().expect("until dropped").as_slice()[..self.len]
    }

    /// The bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut().expect("until dropped").as_mut_slice()[..self.len]
    }

    /// The bytes as an I/O vector.
    pub fn iovecs(&mut self) -> IoVecs<'_> {
        IoVecs::from_slice(self.as_mut_slice())
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let Some(b) = self.buf.take() else { return };
        let p = &self.pool;
        if p.kept.get() + b.len() <= KEEP {
            p.kept.set(p.kept.get() + b.len());
            p.free.borrow_mut().push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_and_the_pool_stays_bounded() {
        let pool = Rc::new(Pool::default());
        let mut a = pool.get(1 << 20).unwrap();
        a.as_mut_slice()[0] = 7;
        let addr = a.as_slice().as_ptr();
        drop(a);
        let b = pool.get(1000 << 10).unwrap();
        assert_eq!(b.as_slice().as_ptr(), addr, "the same 1 MiB buffer");
        assert_eq!(b.as_slice().len(), 1000 << 10);
        let many: Vec<Buf> = (0..20).map(|_| pool.get(1 << 20).unwrap()).collect();
        drop(many);
        assert!(pool.kept.get() <= KEEP);
    }
}
