//! Block jobs: long operations (stream, commit) that run beside guest I/O
//! on a thread of their own, through QEMU's job states, with pause,
//! cancel, rate limits, error policies and events.
//!
//! ```text
//!  created ─▶ running ⇄ paused          ready ⇄ standby
//!               │  └──────────────────────▲ │
//!               ▼                           ▼ (complete)
//!            waiting ─▶ pending ─(finalize: prepare)─▶ concluded ─(dismiss)─▶ null
//!               │ error / cancel                ▲
//!               └──────────▶ aborting ──────────┘
//! ```
//!
//! What a job does is its [`JobBody`]; this module runs it. The body's
//! `run` does the copying and calls [`JobContext::pause_point`] between
//! chunks; its `prepare` makes the job's one graph change when it
//! finalizes; `abort` undoes its setup when it fails; `clean` releases what
//! it holds either way.

mod ratelimit;
mod registry;
mod status;

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use ratelimit::RateLimit;
pub use registry::Jobs;
pub use status::{JobStatus, JobVerb};
use strata_graph::{EventSink, Graph, Quiesce};

/// What a job does when an I/O request fails (QMP's `BlockdevOnError`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Fail the job.
    Report,
    /// Skip the failed chunk and go on.
    Ignore,
    /// Pause the job; `resume` retries the chunk.
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
}

impl OnError {
    /// Parses QMP's spelling.
    pub fn parse(s: &str) -> Option<OnError> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "stop" => OnError::Stop,
            "enospc" => OnError::Enospc,
            _ => return None,
        })
    }
}

/// How a job is set up by its command.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// The job id (also the `device` of its events, as in QEMU).
    pub id: String,
    /// Bytes per second; 0 is unlimited.
    pub speed: u64,
    /// What to do when a read fails (and, for jobs with one policy, any
    /// request).
    pub on_error: OnError,
    /// What to do when a write to the job's target fails.
    pub on_target_error: OnError,
    /// Finalize (make the graph change) as soon as the work is done.
    pub auto_finalize: bool,
    /// Disappear as soon as concluded.
    pub auto_dismiss: bool,
}

/// Why a job's work stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// It was cancelled.
    Cancelled,
    /// It failed; the message goes into `BLOCK_JOB_COMPLETED`'s `error`.
    Failed(String),
}

impl From<strata_graph::AllocError> for JobError {
    fn from(e: strata_graph::AllocError) -> Self {
        JobError::Failed(e.to_string())
    }
}

/// What a body should do after an I/O error, per the job's `on-error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    /// Skip the chunk.
    Ignore,
    /// Try the chunk again (the job was stopped and has been resumed).
    Retry,
}

/// The work of one job type.
pub trait JobBody: Send + 'static {
    /// QMP's job type: `stream`, `commit`, ...
    fn kind(&self) -> &'static str;

    /// Whether the job reaches `ready` and waits for `complete`.
    fn has_ready(&self) -> bool {
        false
    }

    /// Does the work, calling [`JobContext::pause_point`] between chunks.
    fn run(&mut self, ctx: &JobContext) -> Result<(), JobError>;

    /// After successful work, makes the job's graph change. An error fails
    /// the job (and `abort` follows).
    fn prepare(&mut self, graph: &Graph, ctx: &JobContext) -> Result<(), String>;

    /// Undoes the setup after a failure or cancel.
    fn abort(&mut self, graph: &Graph);

    /// Releases what the job holds (frozen slots, its users of nodes),
    /// after `prepare` or `abort`.
    fn clean(&mut self, graph: &Graph);
}

#[derive(Debug)]
struct State {
    status: JobStatus,
    user_paused: bool,
    error_paused: bool,
    /// Quiesce requests in force: the job parks at its next pause point.
    drains: usize,
    /// The job thread is inside `run` (not parked).
    busy: bool,
    parked: bool,
    cancelled: bool,
    force: bool,
    should_complete: bool,
    speed: u64,
    offset: u64,
    len: u64,
    error: Option<String>,
    io_status: &'static str,
    limit: RateLimit,
}

/// A job. Shared by the registry, the job thread and the graph's
/// quiescers.
pub struct Job {
    opts: JobOptions,
    kind: &'static str,
    has_ready: bool,
    graph: Graph,
    events: Arc<dyn EventSink>,
    state: Mutex<State>,
    cond: Condvar,
    body: Mutex<Option<Box<dyn JobBody>>>,
    registry: Weak<registry::Inner>,
}

/// A job's handle on itself while it runs: pause points, progress and
/// error policy. The body calls these from the job thread.
pub struct JobContext {
    job: Arc<Job>,
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.opts.id
    }

    /// The job type.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    fn set_status(&self, s: &mut State, status: JobStatus) {
        if s.status == status {
            return;
        }
        s.status = status;
        self.events.emit(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id(), "status": status.as_str()}),
        );
        self.cond.notify_all();
    }

    fn check_verb(&self, s: &State, verb: JobVerb) -> Result<(), String> {
        if verb.allowed_in(s.status) {
            Ok(())
        } else {
            Err(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                self.id(),
                s.status,
                verb
            ))
        }
    }

    /// The common part of the completion events.
    fn event_data(&self, s: &State) -> Value {
        json!({
            "type": self.kind,
            "device": self.id(),
            "len": s.len,
            "offset": s.offset,
            "speed": s.speed,
        })
    }

    /// block-job-pause.
    pub fn pause(&self) -> Result<(), String> {
        let mut s = self.lock();
        self.check_verb(&s, JobVerb::Pause)?;
        if s.user_paused {
            return Err(format!("Job '{}' is already paused", self.id()));
        }
        s.user_paused = true;
        self.cond.notify_all();
        Ok(())
    }

    /// block-job-resume.
    pub fn resume(&self) -> Result<(), String> {
        let mut s = self.lock();
        self.check_verb(&s, JobVerb::Resume)?;
        if !s.user_paused && !s.error_paused {
            return Err(format!(
                "Can't resume a job that was not paused ('{}')",
                self.id()
            ));
        }
        s.user_paused = false;
        s.error_paused = false;
        s.io_status = "ok";
        self.cond.notify_all();
        Ok(())
    }

    /// block-job-set-speed.
    pub fn set_speed(&self, speed: i64) -> Result<(), String> {
        let mut s = self.lock();
        self.check_verb(&s, JobVerb::SetSpeed)?;
        if speed < 0 {
            return Err("Parameter 'speed' expects a non-negative value".into());
        }
        s.speed = speed as u64;
        self.cond.notify_all();
        Ok(())
    }

    /// block-job-complete.
    pub fn complete(&self) -> Result<(), String> {
        let mut s = self.lock();
        if !self.has_ready {
            return Err(format!(
                "Job '{}' of type '{}' does not support completion",
                self.id(),
                self.kind
            ));
        }
        self.check_verb(&s, JobVerb::Complete)?;
        s.should_complete = true;
        self.cond.notify_all();
        Ok(())
    }

    /// block-job-cancel. Without `force`, a ready job completes without
    /// making its switch; any other job stops and undoes its setup.
    pub fn cancel(self: &Arc<Self>, force: bool) -> Result<(), String> {
        let mut s = self.lock();
        self.check_verb(&s, JobVerb::Cancel)?;
        s.cancelled = true;
        s.force |= force;
        // A cancelled job does not stay paused.
        s.user_paused = false;
        s.error_paused = false;
        self.cond.notify_all();
        if s.status == JobStatus::Pending || s.status == JobStatus::Created {
            drop(s);
            self.abort_and_conclude(None);
        }
        Ok(())
    }

    /// block-job-finalize.
    pub fn finalize(self: &Arc<Self>) -> Result<(), String> {
        let s = self.lock();
        self.check_verb(&s, JobVerb::Finalize)?;
        drop(s);
        self.do_finalize();
        Ok(())
    }

    /// block-job-dismiss.
    pub fn dismiss(&self) -> Result<(), String> {
        let mut s = self.lock();
        self.check_verb(&s, JobVerb::Dismiss)?;
        self.set_status(&mut s, JobStatus::Null);
        drop(s);
        self.unregister();
        Ok(())
    }

    /// Waits until the job is concluded or gone, or `timeout` passes.
    /// Returns the status it had then.
    pub fn wait_completed(&self, timeout: Duration) -> JobStatus {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while !matches!(s.status, JobStatus::Concluded | JobStatus::Null) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .cond
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.status
    }

    /// One entry of query-jobs.
    pub fn job_info(&self) -> Value {
        let s = self.lock();
        let mut v = json!({
            "id": self.id(),
            "type": self.kind,
            "status": s.status.as_str(),
            "current-progress": s.offset,
            "total-progress": s.len,
        });
        if let Some(e) = &s.error {
            v["error"] = json!(e);
        }
        v
    }

    /// One entry of query-block-jobs.
    pub fn block_job_info(&self) -> Value {
        let s = self.lock();
        let mut v = self.event_data(&s);
        let paused = s.user_paused || s.error_paused;
        v["busy"] = json!(s.busy && !s.parked);
        v["paused"] = json!(paused);
        v["io-status"] = json!(s.io_status);
        v["ready"] = json!(matches!(s.status, JobStatus::Ready | JobStatus::Standby));
        v["status"] = json!(s.status.as_str());
        v["auto-finalize"] = json!(self.opts.auto_finalize);
        v["auto-dismiss"] = json!(self.opts.auto_dismiss);
        if let Some(e) = &s.error {
            v["error"] = json!(e);
        }
        v
    }

    fn start(self: &Arc<Self>) -> std::io::Result<()> {
        {
            let mut s = self.lock();
            s.busy = true;
            self.set_status(&mut s, JobStatus::Running);
        }
        let job = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("job {}", self.id()))
            .spawn(move || job.thread_main())
            .map(|_| ())
    }

    fn thread_main(self: Arc<Self>) {
        let mut body = self
            .body
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("a job runs once");
        let ctx = JobContext {
            job: Arc::clone(&self),
        };
        let res = body.run(&ctx);
        *self.body.lock().unwrap_or_else(|e| e.into_inner()) = Some(body);
        let mut s = self.lock();
        s.busy = false;
        self.cond.notify_all();
        let hard_cancel = s.cancelled && (s.force || !self.has_ready || !is_ready(s.status));
        match res {
            Ok(()) if !hard_cancel => {
                self.set_status(&mut s, JobStatus::Waiting);
                self.set_status(&mut s, JobStatus::Pending);
                self.events.emit(
                    "BLOCK_JOB_PENDING",
                    json!({"type": self.kind, "id": self.id()}),
                );
                drop(s);
                if self.opts.auto_finalize {
                    self.do_finalize();
                }
            }
            Ok(()) | Err(JobError::Cancelled) => {
                drop(s);
                self.abort_and_conclude(None);
            }
            Err(JobError::Failed(e)) => {
                drop(s);
                self.abort_and_conclude(Some(e));
            }
        }
    }

    fn do_finalize(self: &Arc<Self>) {
        let ctx = JobContext {
            job: Arc::clone(self),
        };
        let mut guard = self.body.lock().unwrap_or_else(|e| e.into_inner());
        let Some(body) = guard.as_mut() else { return };
        match body.prepare(&self.graph, &ctx) {
            Ok(()) => {
                body.clean(&self.graph);
                drop(guard);
                let mut s = self.lock();
                let data = self.event_data(&s);
                self.events.emit("BLOCK_JOB_COMPLETED", data);
                self.conclude(&mut s);
            }
            Err(e) => {
                drop(guard);
                self.abort_and_conclude(Some(e));
            }
        }
    }

    /// The failure and cancel path: aborting, undo, clean, event, conclude.
    fn abort_and_conclude(self: &Arc<Self>, error: Option<String>) {
        {
            let mut s = self.lock();
            if matches!(s.status, JobStatus::Concluded | JobStatus::Null) {
                return;
            }
            if error.is_some() {
                s.error = error.clone();
            }
            self.set_status(&mut s, JobStatus::Aborting);
        }
        if let Some(body) = self.body.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            body.abort(&self.graph);
            body.clean(&self.graph);
        }
        let mut s = self.lock();
        let mut data = self.event_data(&s);
        match &error {
            Some(e) => {
                data["error"] = json!(e);
                self.events.emit("BLOCK_JOB_COMPLETED", data);
            }
            None => self.events.emit("BLOCK_JOB_CANCELLED", data),
        }
        self.conclude(&mut s);
    }

    fn conclude(&self, s: &mut MutexGuard<'_, State>) {
        self.set_status(s, JobStatus::Concluded);
        if self.opts.auto_dismiss {
            self.set_status(s, JobStatus::Null);
            self.unregister();
        }
    }

    fn unregister(&self) {
        self.graph.unregister_quiesce(self.id());
        if let Some(r) = self.registry.upgrade() {
            r.remove(self.id());
        }
    }
}

fn is_ready(s: JobStatus) -> bool {
    matches!(s, JobStatus::Ready | JobStatus::Standby)
}

impl Quiesce for Job {
    fn quiesce(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut s = self.lock();
        s.drains += 1;
        self.cond.notify_all();
        while s.busy && !s.parked {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    fn resume(&self) {
        let mut s = self.lock();
        s.drains = s.drains.saturating_sub(1);
        self.cond.notify_all();
    }
}

impl JobContext {
    /// The job.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Where the job parks while paused or while the graph changes, and
    /// where a cancel takes effect. Call it between chunks, with nothing
    /// in flight, and fetch a fresh graph view after it.
    pub fn pause_point(&self) -> Result<(), JobError> {
        let job = &*self.job;
        let mut s = job.lock();
        loop {
            if s.cancelled && (s.force || !is_ready(s.status)) {
                return Err(JobError::Cancelled);
            }
            let paused = (s.user_paused || s.error_paused) && !s.cancelled;
            if !paused && s.drains == 0 {
                break;
            }
            if paused {
                let to = if is_ready(s.status) {
                    JobStatus::Standby
                } else {
                    JobStatus::Paused
                };
                job.set_status(&mut s, to);
            }
            s.parked = true;
            job.cond.notify_all();
            s = job.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked = false;
        match s.status {
            JobStatus::Paused => job.set_status(&mut s, JobStatus::Running),
            JobStatus::Standby => job.set_status(&mut s, JobStatus::Ready),
            _ => {}
        }
        Ok(())
    }

    /// Counts `bytes` against the speed limit and sleeps as long as the
    /// limit asks, waking early for a pause, a cancel or a new speed.
    pub fn rate_limit(&self, bytes: u64) -> Result<(), JobError> {
        let job = &*self.job;
        let mut s = job.lock();
        s.limit.account(bytes, Instant::now());
        loop {
            let speed = s.speed;
            let delay = s.limit.delay(speed, Instant::now());
            if delay.is_zero() {
                return Ok(());
            }
            if s.cancelled || s.user_paused || s.drains > 0 || s.should_complete {
                drop(s);
                self.pause_point()?;
                s = job.lock();
                continue;
            }
            s = job
                .cond
                .wait_timeout(s, delay)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sets how much work there is, in bytes.
    pub fn set_len(&self, len: u64) {
        self.job.lock().len = len;
    }

    /// Adds to the work left (a mirror that found new dirty data).
    pub fn add_len(&self, n: u64) {
        self.job.lock().len += n;
    }

    /// Records `n` bytes of work done.
    pub fn progress(&self, n: u64) {
        self.job.lock().offset += n;
    }

    /// Enters `ready` (once) and tells the user.
    pub fn ready(&self) {
        let job = &*self.job;
        let mut s = job.lock();
        if s.status == JobStatus::Running {
            job.set_status(&mut s, JobStatus::Ready);
            let data = job.event_data(&s);
            job.events.emit("BLOCK_JOB_READY", data);
        }
    }

    /// True once `complete` was asked for.
    pub fn should_complete(&self) -> bool {
        self.job.lock().should_complete
    }

    /// True once the job was cancelled (for a ready job: asked to finish
    /// without its switch).
    pub fn is_cancelled(&self) -> bool {
        self.job.lock().cancelled
    }

    /// Waits up to `timeout` for something to happen to the job (a
    /// command, a drain), for bodies that poll for work.
    pub fn idle(&self, timeout: Duration) {
        let job = &*self.job;
        let s = job.lock();
        if s.cancelled || s.should_complete || s.user_paused || s.drains > 0 {
            return;
        }
        let _ = job.cond.wait_timeout(s, timeout);
    }

    /// Applies the job's `on-error` policy to a failed request. `Err`
    /// means the job fails (or was cancelled while stopped).
    pub fn io_error(
        &self,
        error: &dyn std::fmt::Display,
        read: bool,
        errno: Option<i32>,
    ) -> Result<ErrorAction, JobError> {
        let job = &*self.job;
        let policy = if read {
            job.opts.on_error
        } else {
            job.opts.on_target_error
        };
        let action = match policy {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Stop => "stop",
            OnError::Enospc if errno == Some(libc::ENOSPC) => "stop",
            OnError::Enospc => "report",
        };
        let mut event = json!({
            "device": job.id(),
            "id": job.id(),
            "operation": if read { "read" } else { "write" },
            "action": action,
        });
        if errno == Some(libc::ENOSPC) {
            event["nospace"] = json!(true);
        }
        if action == "stop" {
            // Paused before the event goes out: whoever reacts to it finds
            // the job stopped.
            let mut s = job.lock();
            s.error_paused = true;
            s.io_status = if errno == Some(libc::ENOSPC) {
                "nospace"
            } else {
                "failed"
            };
        }
        job.events.emit("BLOCK_JOB_ERROR", event);
        match action {
            "ignore" => Ok(ErrorAction::Ignore),
            "stop" => {
                self.pause_point()?;
                Ok(ErrorAction::Retry)
            }
            _ => Err(JobError::Failed(error.to_string())),
        }
    }
}
