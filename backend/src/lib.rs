//! The Strata daemon: vhost-user-blk devices in front of a block graph,
//! a QMP monitor, and the command line.

pub mod cli;
pub mod daemon;
pub mod events;
pub mod export;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod handed_fds;
pub mod img;
pub mod io_stats;
pub mod job_cli;
pub mod keyval;
pub mod metrics;
pub mod nbd;
pub mod notify;
pub mod on_error;
pub mod open;
pub mod pidfile;
pub mod process;
pub mod qmp;
pub mod qsd;
pub mod queue;
mod ratelimit;
pub mod resize;
pub mod run_with;
pub mod sandbox;
pub mod serve;
pub mod signals;
pub mod socket;
pub mod stop_signal;
pub mod top;
pub mod vhost_user;
pub mod virtio;
mod worker;
