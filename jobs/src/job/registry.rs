//! The daemon's jobs, by id.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Job, JobBody, JobOptions, JobStatus, RateLimit, State};
use strata_graph::{EventSink, Graph};

#[derive(Default)]
pub(super) struct Inner {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// Every job of a daemon. Cloning gives another handle on the same set.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
    graph: Graph,
    events: Arc<dyn EventSink>,
}

impl Jobs {
    /// No jobs yet, on `graph`, reporting to `events`.
    pub fn new(graph: Graph, events: Arc<dyn EventSink>) -> Self {
        Jobs {
            inner: Arc::default(),
            graph,
            events,
        }
    }

    /// Creates and starts a job. `setup` prepares the graph (freezes the
    /// slots the job works on, attaches its users) and returns the body;
    /// it runs only once the id is known to be free and valid.
    pub fn start(
        &self,
        opts: JobOptions,
        setup: impl FnOnce(&Graph) -> Result<Box<dyn JobBody>, String>,
    ) -> Result<Arc<Job>, String> {
        check_id(&opts.id)?;
        let mut jobs = self.inner.lock();
        if jobs.contains_key(&opts.id) {
            return Err(format!("Job ID '{}' already in use", opts.id));
        }
        let body = setup(&self.graph)?;
        let job = Arc::new(Job {
            kind: body.kind(),
            has_ready: body.has_ready(),
            graph: self.graph.clone(),
            events: self.events.clone(),
            state: Mutex::new(State {
                status: JobStatus::Created,
                user_paused: false,
                error_paused: false,
                drains: 0,
                busy: false,
                parked: false,
                cancelled: false,
                force: false,
                should_complete: false,
                speed: opts.speed,
                offset: 0,
                len: 0,
                error: None,
                io_status: "ok",
                limit: RateLimit::new(),
            }),
            cond: Condvar::new(),
            body: Mutex::new(Some(body)),
            registry: Arc::downgrade(&self.inner),
            opts,
        });
        self.events.emit(
            "JOB_STATUS_CHANGE",
            serde_json::json!({"id": job.id(), "status": "created"}),
        );
        jobs.insert(job.id().to_string(), Arc::clone(&job));
        self.graph.register_quiesce(job.id(), job.clone());
        drop(jobs);
        if let Err(e) = job.start() {
            job.abort_and_conclude(Some(format!("cannot start the job thread: {e}")));
            return Err(format!("cannot start the job thread: {e}"));
        }
        Ok(job)
    }

    /// The job with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        let job = self.inner.lock().get(id).cloned()?;
        live(&job).then_some(job)
    }

    /// Every job, by id.
    pub fn list(&self) -> Vec<Arc<Job>> {
        let jobs: Vec<_> = self.inner.lock().values().cloned().collect();
        jobs.into_iter().filter(live).collect()
    }

    /// Cancels every job and waits up to `timeout` for each to finish (at
    /// exit: the graph must not change under a job that is still running).
    pub fn cancel_all(&self, timeout: Duration) {
        for job in self.list() {
            let _ = job.cancel(true);
            if matches!(job.wait_completed(timeout), JobStatus::Concluded) {
                let _ = job.dismiss();
            }
        }
    }
}

/// False for a job that reached null but is not yet out of the table: it
/// concludes under its own lock, which `status` waits for, and events go
/// out before that, so a client that saw the last event must not find it.
fn live(job: &Arc<Job>) -> bool {
    job.status() != JobStatus::Null
}

fn check_id(id: &str) -> Result<(), String> {
    if strata_graph::valid_id(id) {
        Ok(())
    } else {
        Err(format!("Invalid job ID '{id}'"))
    }
}
