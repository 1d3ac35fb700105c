//! The load generator: libblkio queues, each kept at a fixed depth of 4k
//! random requests by its own thread, timed per batch so the clock costs
//! almost nothing.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use blkio::{Blkio, Completion, ReqFlags};
use hdrhistogram::Histogram;

/// Request size, as in every row of the table.
pub const BLOCK: usize = 4096;
/// The virtqueue size both backends are driven with.
pub const QUEUE_SIZE: i32 = 256;

/// What one run asks of the backend.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Random writes instead of random reads.
    pub write: bool,
    /// Requests kept in flight.
    pub depth: usize,
    /// A polled queue (the client spins on the used ring) instead of an
    /// interrupt-driven one.
    pub poll: bool,
    /// Time before measuring starts, to fill caches and settle polling.
    pub warmup: Duration,
    /// Time measured.
    pub measure: Duration,
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Completions per second in the measured window.
    pub iops: f64,
    /// Mean latency in microseconds.
    pub mean_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// Backend CPU time per completion in nanoseconds.
    pub cpu_ns: f64,
}

/// A xorshift generator: cheap, and the same sequence for every backend.
pub struct Rng(pub u64);

impl Rng {
    /// The next number of the sequence.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `load` against the vhost-user-blk socket, on one queue with the
/// calling thread's CPU affinity. `cpu_ns` reads the backend's CPU time;
/// it is sampled at the edges of the measured window.
pub fn run(
    socket: &Path,
    load: Load,
    cpu_ns: &(dyn Fn() -> u64 + Sync),
) -> anyhow::Result<Outcome> {
    run_queues(socket, load, &[None], cpu_ns)
}

/// Runs `load` on `cpus.len()` queues at once, each kept at `load.depth`
/// by its own thread, pinned to its entry of `cpus` (or left with the
/// caller's affinity). IOPS and CPU per request are over all queues.
pub fn run_queues(
    socket: &Path,
    load: Load,
    cpus: &[Option<usize>],
    cpu_ns: &(dyn Fn() -> u64 + Sync),
) -> anyhow::Result<Outcome> {
    let n = cpus.len();
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket.to_str().context("socket path is not UTF-8")?)?;
    b.connect()
        .with_context(|| format!("connecting to {}", socket.display()))?;
    b.set_i32("num-queues", if load.poll { 0 } else { n as i32 })?;
    b.set_i32("num-poll-queues", if load.poll { n as i32 } else { 0 })?;
    b.set_i32("queue-size", QUEUE_SIZE)?;
    let started = b.start()?;
    let queues = if load.poll {
        started.poll_queues
    } else {
        started.queues
    };
    let capacity = b.get_u64("capacity")?;
    let blocks = capacity / BLOCK as u64;
    if blocks == 0 {
        bail!("the disk is smaller than one block");
    }
    let region = b.alloc_mem_region(n * load.depth * BLOCK)?;
    b.map_mem_region(&region)?;

    let begin = Instant::now();
    let window = Window {
        from: begin + load.warmup,
        end: begin + load.warmup + load.measure,
    };
    std::thread::scope(|s| {
        let drivers: Vec<_> = queues
            .into_iter()
            .zip(cpus)
            .enumerate()
            .map(|(i, (q, &cpu))| {
                let buffers = region.addr + i * load.depth * BLOCK;
                s.spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_self(cpu)?;
                    }
                    drive(q, load, buffers, blocks, window, i as u64)
                })
            })
            .collect();
        std::thread::sleep(window.from.saturating_duration_since(Instant::now()));
        let cpu_start = cpu_ns();
        std::thread::sleep(window.end.saturating_duration_since(Instant::now()));
        let cpu = cpu_ns() - cpu_start;
        let mut hist = Histogram::<u64>::new(3)?;
        let mut done = 0;
        for d in drivers {
            let (n, h) = d
                .join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
            done += n;
            hist.add(h)?;
        }
        Ok(Outcome {
            iops: done as f64 / load.measure.as_secs_f64(),
            mean_us: hist.mean() / 1e3,
            p99_us: hist.value_at_quantile(0.99) as f64 / 1e3,
            cpu_ns: cpu as f64 / done.max(1) as f64,
        })
    })
}

/// Writes one block of zeroes at 0 and flushes it, on a connection of
/// its own. The write is there because QEMU passes no flush down when
/// nothing was written since the last.
pub fn write_and_flush(socket: &Path) -> anyhow::Result<()> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket.to_str().context("socket path is not UTF-8")?)?;
    b.connect()
        .with_context(|| format!("connecting to {}", socket.display()))?;
    b.set_i32("num-queues", 1)?;
    let mut q = b.start()?.queues.pop().context("no queue")?;
    let region = b.alloc_mem_region(BLOCK)?;
    b.map_mem_region(&region)?;
    let mut c = [MaybeUninit::<Completion>::uninit()];
    for flush in [false, true] {
        if flush {
            q.flush(0, ReqFlags::empty());
        } else {
            q.write(0, region.addr as *const u8, BLOCK, 0, ReqFlags::empty());
        }
        let mut timeout = Duration::from_secs(30);
        if q.do_io(&mut c, 1, Some(&mut timeout), None)? != 1 {
            bail!("a request did not complete in 30 s");
        }
        // SAFETY: do_io completed one request.
        let ret = unsafe { c[0].assume_init_ref() }.ret;
        if ret != 0 {
            bail!("a request failed with {ret}");
        }
    }
    Ok(())
}

/// The measured part of a run.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    end: Instant,
}

/// Keeps queue `q` at `load.depth` requests, with buffers from `buffers`,
/// until the window ends. Returns the completions inside the window and
/// their latencies.
fn drive(
    mut q: blkio::Blkioq,
    load: Load,
    buffers: usize,
    blocks: u64,
    window: Window,
    seed: u64,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    // Every backend sees the same sequence; queues differ from each other.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let submit = |q: &mut blkio::Blkioq, slot: usize, rng: &mut Rng| {
        let offset = (rng.next() % blocks) * BLOCK as u64;
        let buf = buffers + slot * BLOCK;
        if load.write {
            q.write(offset, buf as *const u8, BLOCK, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf as *mut u8, BLOCK, slot, ReqFlags::empty());
        }
    };

    let mut hist = Histogram::<u64>::new(3)?;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..load.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut issued = vec![Instant::now(); load.depth];
    for slot in 0..load.depth {
        submit(&mut q, slot, &mut rng);
    }
    let mut done = 0u64;
    loop {
        let got = q.do_io(&mut comps, 1, None, None)?;
        let now = Instant::now();
        let measuring = now >= window.from && now < window.end;
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                bail!(
                    "a request failed with {} ({})",
                    c.ret,
                    std::io::Error::from_raw_os_error(-c.ret)
                );
            }
            let slot = c.user_data;
            if measuring {
                let ns = now.duration_since(issued[slot]).as_nanos() as u64;
                hist.record(ns.max(1))?;
            }
            if now < window.end {
                issued[slot] = now;
                submit(&mut q, slot, &mut rng);
            }
        }
        if measuring {
            done += got as u64;
        }
        if now >= window.end {
            drain(&mut q, &mut comps, load.depth - got)?;
            return Ok((done, hist));
        }
    }
}

/// Waits for the requests still in flight, so the device is left idle.
fn drain(
    q: &mut blkio::Blkioq,
    comps: &mut [MaybeUninit<Completion>],
    mut left: usize,
) -> anyhow::Result<()> {
    let mut timeout = Duration::from_secs(10);
    while left > 0 {
        let got = q.do_io(comps, 1, Some(&mut timeout), None)?;
        if got == 0 {
            bail!("{left} requests never completed");
        }
        left -= got;
    }
    Ok(())
}

/// Pins the calling thread to `cpu`.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        anyhow::bail!("could not pin the client to cpu {cpu}");
    }
    Ok(())
}
