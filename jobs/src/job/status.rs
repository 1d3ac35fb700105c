//! QEMU's job states and which commands each state accepts.

use std::fmt;

/// Where a job is in its life (QMP's `JobStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Made, not started.
    Created,
    /// Working.
    Running,
    /// Paused by the user or by an error with `on-error=stop`.
    Paused,
    /// Caught up and waiting for `complete` (mirror, active commit).
    Ready,
    /// Paused while ready.
    Standby,
    /// Done with its work, waiting for the rest of its transaction.
    Waiting,
    /// Waiting to be finalized (`auto-finalize=off`).
    Pending,
    /// Failing or cancelled, undoing its setup.
    Aborting,
    /// Finished; waiting to be dismissed (`auto-dismiss=off`).
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// QMP's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// True once the job has stopped working (successfully or not).
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command on a job (QMP's `JobVerb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobVerb {
    /// block-job-cancel / job-cancel.
    Cancel,
    /// block-job-pause / job-pause.
    Pause,
    /// block-job-resume / job-resume.
    Resume,
    /// block-job-set-speed.
    SetSpeed,
    /// block-job-complete / job-complete.
    Complete,
    /// block-job-finalize / job-finalize.
    Finalize,
    /// block-job-dismiss / job-dismiss.
    Dismiss,
}

impl JobVerb {
    /// QMP's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// Whether a job in `status` accepts this command (QEMU's verb table).
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => status == Ready,
            JobVerb::Finalize => status == Pending,
            JobVerb::Dismiss => status == Concluded,
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
