//! Strata's async runtime. Every queue thread (and every job thread) runs
//! its requests on its own [`executor`] and does its I/O on its own
//! io_uring ([`reactor`]); nothing on the data path is shared between
//! threads. CPU-heavy work that would stall a queue thread goes to a small
//! pool ([`offload`]).
//!
//! ```text
//!  queue thread i: epoll ─▶ Executor::run_until_stalled ─▶ futures push SQEs
//!                     ▲                                          │
//!                     └── io_uring eventfd ◀── Reactor::reap ◀───┘
//! ```

#![warn(missing_docs)]

pub mod executor;
pub mod offload;
pub mod reactor;
