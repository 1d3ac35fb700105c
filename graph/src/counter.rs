//! A counter that many threads add to on the data path and a monitor
//! reads rarely: each thread adds to its own cache line, so counting never
//! bounces a line between queues.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

const SHARDS: usize = 16;

#[derive(Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// A sum spread over per-thread shards.
#[derive(Default)]
pub struct ShardedCounter([Shard; SHARDS]);

impl std::fmt::Debug for ShardedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardedCounter({})", self.sum())
    }
}

fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    MINE.with(|s| *s)
}

impl ShardedCounter {
    /// Adds `n`. Threads past the number of shards share one, which costs
    /// speed, never counts.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0[shard()].0.fetch_add(n, Relaxed);
    }

    /// The sum so far.
    pub fn sum(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |s, x| s.wrapping_add(x.0.load(Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn every_threads_adds_are_summed() {
        let c = Arc::new(ShardedCounter::default());
        let threads: Vec<_> = (0..40)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || (0..1000).for_each(|_| c.add(1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.sum(), 40_000);
    }
}
