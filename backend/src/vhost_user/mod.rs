//! Strata's vhost-user control plane, on the vhost crate's message layer.
//!
//! vhost-user-backend's daemon refuses the inflight region and cannot send
//! the frontend backend requests (a config change), so the requests are
//! handled here; vhost-user-backend still provides the vring type.

mod channel;
mod connection;
mod dirty_log;
mod handler;
mod inflight_region;
mod queue_thread;
mod shared_map;

pub use channel::Channel;
pub(crate) use connection::serve_one;
#[cfg(test)]
pub(crate) use dirty_log::test_bitmap;
pub use dirty_log::{Bitmap, DirtyLog, Marker, LOG_PAGE};
pub use handler::{protocol_features, MAX_QUEUE_SIZE};
pub use inflight_region::{QueueRegion, Recovered, Region};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// The vring type the device uses: one mutex per queue, never shared.
pub type Vring = vhost_user_backend::VringMutex<GuestMemoryAtomic<GuestMemoryMmap<()>>>;
