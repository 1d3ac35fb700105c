//! A few threads for CPU-heavy work that would otherwise stall a queue
//! thread, such as inflating a compressed cluster. The queue thread hands
//! the job over and goes on with its other requests; the job's result
//! wakes the waiting future, as a completion from the disk would.

use std::cell::Cell;
use std::sync::OnceLock;

use futures::channel::oneshot;

/// The pool (rayon's, a thread per core), or `None` when it could not be
/// started.
static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

thread_local! {
    /// Jobs this thread is waiting for.
    static PENDING: Cell<usize> = const { Cell::new(0) };
}

/// How many offloaded jobs this thread's futures are waiting for: work in
/// flight, as far as a thread deciding whether to busy-poll is concerned.
pub fn pending() -> usize {
    PENDING.get()
}

/// Counts this thread as waiting for work another thread does (a job, an
/// NBD reply) while it lives, so that the thread keeps polling for it.
pub struct Waiting;

impl Default for Waiting {
    fn default() -> Self {
        Self::new()
    }
}

impl Waiting {
    /// Starts waiting.
    pub fn new() -> Self {
        PENDING.set(PENDING.get() + 1);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let _ = PENDING.try_with(|p| p.set(p.get().saturating_sub(1)));
    }
}

/// Starts the pool now rather than on first use, so that its threads are
/// spawned by the caller (a sandbox applies the daemon's filter first and
/// a queue thread's narrower one later, which the pool must not inherit).
pub fn start_pool() {
    POOL.get_or_init(start);
}

fn start() -> Option<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("offload-{i}"))
        .build()
        .inspect_err(|e| tracing::warn!("cannot start the offload pool: {e}"))
        .ok()
}

/// Runs `job` on the pool and waits for its result without blocking the
/// thread; `None` if the job panicked. Without a pool, runs it here.
pub async fn run<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let Some(pool) = POOL.get_or_init(start) else {
        return catch(job);
    };
    let (tx, rx) = oneshot::channel();
    // A panicking job loses its result (the sender is dropped), not the
    // pool, which would abort on a panic that escaped.
    pool.spawn(move || {
        if let Some(out) = catch(job) {
            let _ = tx.send(out);
        }
    });
    let _waiting = Waiting::new();
    rx.await.ok()
}

/// Runs `job` here; `None` if it panicked.
fn catch<T>(job: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_other_threads_and_return_their_results() {
        let here = std::thread::current().id();
        let results = futures::executor::block_on(futures::future::join_all(
            (0..8u64).map(|i| run(move || (i * i, std::thread::current().id()))),
        ));
        for (i, r) in results.into_iter().enumerate() {
            let (square, thread) = r.expect("no job panicked");
            assert_eq!(square, (i * i) as u64);
            assert_ne!(thread, here);
        }
    }

    #[test]
    fn a_panicking_job_yields_none_and_the_pool_goes_on() {
        let panicked = futures::executor::block_on(run(|| -> u8 { panic!("inflate bug") }));
        assert_eq!(panicked, None);
        assert_eq!(futures::executor::block_on(run(|| 5u8)), Some(5));
    }
}
