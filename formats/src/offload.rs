//! A few threads for CPU-heavy work that would otherwise stall a queue
//! thread, such as inflating a compressed cluster. The queue thread hands
//! the job over and goes on with its other requests; the job's result
//! wakes the waiting future, as a completion from the disk would.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use futures::channel::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The pool's queue of jobs, or `None` when no thread could be started.
static POOL: OnceLock<Option<Sender<Job>>> = OnceLock::new();

thread_local! {
    /// Jobs this thread is waiting for.
    static PENDING: Cell<usize> = const { Cell::new(0) };
}

/// How many offloaded jobs this thread's futures are waiting for: work in
/// flight, as far as a thread deciding whether to busy-poll is concerned.
pub fn pending() -> usize {
    PENDING.get()
}

/// Counts a job as pending while its future lives.
struct Waiting;

impl Waiting {
    fn new() -> Self {
        PENDING.set(PENDING.get() + 1);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let _ = PENDING.try_with(|p| p.set(p.get().saturating_sub(1)));
    }
}

fn start() -> Option<Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut started = 0;
    for i in 0..threads {
        let rx = Arc::clone(&rx);
        let spawned = std::thread::Builder::new()
            .name(format!("offload-{i}"))
            .spawn(move || serve(&rx));
        match spawned {
            Ok(_) => started += 1,
            Err(e) => tracing::warn!("cannot start offload thread {i}: {e}"),
        }
    }
    (started > 0).then_some(tx)
}

fn serve(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        // A panicking job loses its result, not the thread.
        catch(job);
    }
}

/// Runs `job` on the pool and waits for its result without blocking the
/// thread; `None` if the job panicked. Without a pool (no thread could be
/// started), runs it here.
pub async fn run<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let Some(pool) = POOL.get_or_init(start) else {
        return catch(job);
    };
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(job());
    });
    if let Err(mpsc::SendError(job)) = pool.send(job) {
        // Every pool thread is gone; the job still owns the sender.
        catch(job);
    }
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
