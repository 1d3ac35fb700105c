//! SIGINT and SIGTERM ask the daemon to quit.

use std::sync::Arc;

use anyhow::Context as _;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::daemon::Daemon;

/// Starts a thread that turns the first SIGINT or SIGTERM into a quit.
pub fn quit_on_signals(daemon: Arc<Daemon>) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!("signal {sig}: stopping");
                daemon.request_quit();
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}
