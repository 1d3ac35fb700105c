//! Metadata I/O on the image file, through the node's `file` slot.

use strata_graph::{BlockError, GraphView, IoVecs, SlotId};

use super::error::Qcow2Error;

/// The image file as metadata code sees it.
#[derive(Clone, Copy)]
pub struct FileIo<'a> {
    /// The view the request runs against.
    pub g: &'a GraphView,
    /// The `file` slot.
    pub slot: SlotId,
}

impl FileIo<'_> {
    fn err(what: &'static str) -> impl FnOnce(BlockError) -> Qcow2Error {
        move |source| Qcow2Error::Io { what, source }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(
        &self,
        what: &'static str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        let iov = IoVecs::from_slice(buf);
        let file = self.g.child(self.slot).map_err(Self::err(what))?;
        file.read(self.g, offset, &iov)
            .await
            .map_err(Self::err(what))
    }

    /// Writes `buf` at `offset`.
    pub async fn write(
        &self,
        what: &'static str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        let iov = IoVecs::from_slice(buf);
        let file = self.g.child(self.slot).map_err(Self::err(what))?;
        file.write(self.g, offset, &iov)
            .await
            .map_err(Self::err(what))
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), Qcow2Error> {
        let file = self
            .g
            .child(self.slot)
            .map_err(Self::err("flush the image file"))?;
        file.flush(self.g)
            .await
            .map_err(Self::err("flush the image file"))
    }

    /// The file's current size.
    pub fn size(&self) -> Result<u64, Qcow2Error> {
        let file = self
            .g
            .child(self.slot)
            .map_err(Self::err("size the image file"))?;
        file.size(self.g).map_err(Self::err("size the image file"))
    }
}
