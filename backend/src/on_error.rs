//! What a failed guest request does: QEMU's `werror`/`rerror`, as the
//! export option `on-error`. A held request is neither failed nor running:
//! it waits in its queue until the operator resumes the export, so a thin
//! volume that filled up can be grown under a guest that never sees EIO.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use strata_graph::{BlockError, EventSink, IoOp};

/// The policy for guest requests that fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Fail the request: the guest sees an I/O error.
    Report,
    /// Hold a request that failed for lack of space; fail the rest.
    #[default]
    Enospc,
    /// Hold every request that fails.
    Stop,
}

impl OnError {
    /// The spellings `on-error` accepts.
    pub const NAMES: &'static [&'static str] = &["report", "enospc", "stop"];

    /// Parses one of [`OnError::NAMES`].
    pub fn parse(s: &str) -> Option<OnError> {
        match s {
            "report" => Some(OnError::Report),
            "enospc" => Some(OnError::Enospc),
            "stop" => Some(OnError::Stop),
            _ => None,
        }
    }

    /// Whether a request that failed with `e` is held. A request the
    /// driver cannot do at all is never held: no resume would change that.
    pub fn holds(self, e: &BlockError) -> bool {
        match self {
            OnError::Report => false,
            OnError::Enospc => os_error(e) == Some(libc::ENOSPC),
            OnError::Stop => !e.is_unsupported(),
        }
    }
}

/// The host errno behind a request's failure, if there is one.
pub fn os_error(e: &BlockError) -> Option<i32> {
    match e {
        BlockError::Io { source, .. } => source.raw_os_error().or_else(|| {
            source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<BlockError>())
                .and_then(os_error)
        }),
        _ => None,
    }
}

/// The export's I/O status, as `query-block` shows a device's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoStatus {
    /// Nothing is held.
    #[default]
    Ok,
    /// A request is held for lack of space.
    NoSpace,
    /// A request is held for another error.
    Failed,
}

impl IoStatus {
    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::NoSpace => "nospace",
            IoStatus::Failed => "failed",
        }
    }
}

/// The export-wide side of held requests: the policy, how many are held,
/// and the resume count the queues compare against.
pub struct ErrorHold {
    policy: OnError,
    events: Arc<dyn EventSink>,
    held: AtomicUsize,
    resumes: AtomicU64,
    status: Mutex<IoStatus>,
}

impl ErrorHold {
    /// Nothing held yet; events go to `events`.
    pub fn new(policy: OnError, events: Arc<dyn EventSink>) -> ErrorHold {
        ErrorHold {
            policy,
            events,
            held: AtomicUsize::new(0),
            resumes: AtomicU64::new(0),
            status: Mutex::new(IoStatus::Ok),
        }
    }

    /// The policy.
    pub fn policy(&self) -> OnError {
        self.policy
    }

    /// Requests held now, over all queues.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// The I/O status.
    pub fn status(&self) -> IoStatus {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many times the export was resumed: a queue retries what it
    /// holds when this moves.
    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Acquire)
    }

    /// Records a failure and decides on it: true when the request is held.
    /// Every held request becomes a BLOCK_IO_ERROR event, and so does a
    /// reported one when `report` (a rate limit) lets it through.
    pub fn failed(
        &self,
        export: &str,
        node: &str,
        op: IoOp,
        e: &BlockError,
        report: impl FnOnce() -> bool,
    ) -> bool {
        let hold = self.policy.holds(e);
        let errno = os_error(e);
        let nospace = errno == Some(libc::ENOSPC);
        if hold {
            self.held.fetch_add(1, Ordering::AcqRel);
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            if *status != IoStatus::NoSpace {
                *status = if nospace {
                    IoStatus::NoSpace
                } else {
                    IoStatus::Failed
                };
            }
        }
        if hold || report() {
            self.events.emit(
                "BLOCK_IO_ERROR",
                event_data(
                    export,
                    node,
                    op,
                    e,
                    errno,
                    if hold { "stop" } else { "report" },
                ),
            );
        }
        hold
    }

    /// `n` held requests were retried or dropped.
    pub fn released(&self, n: usize) {
        if n > 0 {
            let _ = self
                .held
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                    Some(h.saturating_sub(n))
                });
        }
    }

    /// Resumes the export: the queues retry what they hold.
    pub fn resume(&self) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = IoStatus::Ok;
        self.resumes.fetch_add(1, Ordering::AcqRel);
    }
}

/// BLOCK_IO_ERROR's data: QEMU's fields, with the export's id and the
/// errno besides.
fn event_data(
    export: &str,
    node: &str,
    op: IoOp,
    e: &BlockError,
    errno: Option<i32>,
    action: &str,
) -> Value {
    let operation = match op {
        IoOp::Read => "read",
        _ => "write",
    };
    let reason = match errno {
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => e.to_string(),
    };
    json!({
        "device": export,
        "id": export,
        "node-name": node,
        "operation": operation,
        "action": action,
        "nospace": errno == Some(libc::ENOSPC),
        "errno": errno,
        "reason": reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn enospc() -> BlockError {
        BlockError::errno(IoOp::Write, 0, libc::ENOSPC)
    }

    #[test]
    fn each_policy_holds_what_qemu_stops_on() {
        let eio = BlockError::errno(IoOp::Write, 0, libc::EIO);
        let unsupported = BlockError::Unsupported {
            op: IoOp::Discard,
            driver: "x",
        };
        assert!(!OnError::Report.holds(&enospc()));
        assert!(OnError::Enospc.holds(&enospc()));
        assert!(!OnError::Enospc.holds(&eio));
        assert!(OnError::Stop.holds(&eio));
        assert!(!OnError::Stop.holds(&unsupported));
    }

    #[test]
    fn the_errno_is_found_through_a_driver_that_wrapped_it() {
        let wrapped = BlockError::io(IoOp::Write, 4096, io::Error::other(enospc()));
        assert_eq!(os_error(&wrapped), Some(libc::ENOSPC));
    }

    #[test]
    fn a_hold_sets_the_status_and_a_resume_clears_it() {
        let h = ErrorHold::new(OnError::Enospc, Arc::new(strata_graph::NoEvents));
        assert!(h.failed("e", "n", IoOp::Write, &enospc(), || false));
        assert_eq!((h.held(), h.status()), (1, IoStatus::NoSpace));
        let before = h.resumes();
        h.resume();
        h.released(1);
        assert_eq!(
            (h.held(), h.status(), h.resumes()),
            (0, IoStatus::Ok, before + 1)
        );
    }
}
