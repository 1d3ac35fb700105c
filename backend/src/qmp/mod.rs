//! The QMP monitor.

pub mod client;
pub mod commands;
pub mod error;
pub mod info;
pub mod jobs;
mod scm_reader;
pub mod server;
