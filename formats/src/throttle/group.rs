//! Throttle groups: shared I/O limits (per-VM-disk QoS), with QEMU's
//! leaky-bucket semantics: an average rate, and optionally a burst rate
//! that may be kept up for a burst length.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which way a request moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Reads.
    Read,
    /// Writes, write-zeroes and discards.
    Write,
}

/// One limit: units per second on average, and an optional burst.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limit {
    /// Average units per second; 0 means unlimited.
    pub avg: f64,
    /// Burst units per second; 0 means no burst.
    pub max: f64,
    /// How long, in seconds, the burst rate may be kept up.
    pub max_length: f64,
}

/// The six limits of a group, as QEMU names them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// bps-total, bps-read, bps-write.
    pub bps: [Limit; 3],
    /// iops-total, iops-read, iops-write.
    pub iops: [Limit; 3],
    /// iops-size: a request counts as one operation per this many bytes.
    pub iops_size: u64,
}

/// A leaky bucket.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    limit: Limit,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    fn leak(&mut self, secs: f64) {
        self.level = (self.level - self.limit.avg * secs).max(0.0);
        if self.limit.max > 0.0 {
            self.burst_level = (self.burst_level - self.limit.max * secs).max(0.0);
        }
    }

    /// Seconds to wait before the bucket admits anything more.
    fn wait(&self) -> f64 {
        let l = self.limit;
        if l.avg == 0.0 {
            return 0.0;
        }
        let (size, burst_size) = if l.max == 0.0 {
            (l.avg / 10.0, 0.0)
        } else {
            (l.max * l.max_length, l.max / 10.0)
        };
        let mut wait = (self.level - size).max(0.0) / l.avg;
        if burst_size > 0.0 && self.burst_level > burst_size {
            wait = wait.max((self.burst_level - burst_size) / l.max);
        }
        wait
    }

    fn charge(&mut self, units: f64) {
        if self.limit.avg > 0.0 {
            self.level += units;
            if self.limit.max > 0.0 {
                self.burst_level += units;
            }
        }
    }
}

struct State {
    limits: Limits,
    bps: [Bucket; 3],
    iops: [Bucket; 3],
    last: Instant,
}

/// A set of limits shared by every throttle node that names it.
pub struct ThrottleGroup {
    name: String,
    state: Mutex<State>,
}

impl ThrottleGroup {
    /// A group with `limits`.
    pub fn new(name: &str, limits: Limits) -> Self {
        let bucket = |l: Limit| Bucket {
            limit: l,
            ..Default::default()
        };
        ThrottleGroup {
            name: name.into(),
            state: Mutex::new(State {
                limits,
                bps: limits.bps.map(bucket),
                iops: limits.iops.map(bucket),
                last: Instant::now(),
            }),
        }
    }

    /// The group's id.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current limits.
    pub fn limits(&self) -> Limits {
        self.lock().limits
    }

    /// Replaces the limits; requests waiting now see the new ones.
    pub fn set_limits(&self, limits: Limits) {
        let mut s = self.lock();
        s.limits = limits;
        for (b, l) in s.bps.iter_mut().zip(limits.bps) {
            b.limit = l;
        }
        for (b, l) in s.iops.iter_mut().zip(limits.iops) {
            b.limit = l;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a request of `bytes` going `dir` now and returns `None`, or
    /// returns how long to wait before asking again.
    pub fn try_admit(&self, dir: Direction, bytes: u64) -> Option<Duration> {
        self.admit_at(dir, bytes, Instant::now())
    }

    fn admit_at(&self, dir: Direction, bytes: u64, now: Instant) -> Option<Duration> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let secs = now.saturating_duration_since(s.last).as_secs_f64();
        s.last = s.last.max(now);
        let k = match dir {
            Direction::Read => 1,
            Direction::Write => 2,
        };
        for b in s.bps.iter_mut().chain(s.iops.iter_mut()) {
            b.leak(secs);
        }
        let wait = [s.bps[0], s.bps[k], s.iops[0], s.iops[k]]
            .iter()
            .map(Bucket::wait)
            .fold(0.0, f64::max);
        if wait > 0.0 {
            return Some(Duration::from_secs_f64(wait.max(1e-4)));
        }
        let ops = if s.limits.iops_size > 0 {
            bytes.div_ceil(s.limits.iops_size).max(1) as f64
        } else {
            1.0
        };
        s.bps[0].charge(bytes as f64);
        s.bps[k].charge(bytes as f64);
        s.iops[0].charge(ops);
        s.iops[k].charge(ops);
        None
    }
}

/// Error of the group registry.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The id is taken.
    #[error("attempt to add duplicate throttle group '{0}'")]
    Duplicate(String),
    /// No group has this id.
    #[error("throttle group '{0}' does not exist")]
    Unknown(String),
    /// A node still uses the group.
    #[error("throttle group '{0}' is in use")]
    InUse(String),
}

/// The daemon's throttle groups, by id.
#[derive(Clone, Default)]
pub struct ThrottleGroups {
    map: Arc<Mutex<BTreeMap<String, Arc<ThrottleGroup>>>>,
}

impl ThrottleGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<ThrottleGroup>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a group.
    pub fn add(&self, name: &str, limits: Limits) -> Result<Arc<ThrottleGroup>, GroupError> {
        let mut m = self.lock();
        if m.contains_key(name) {
            return Err(GroupError::Duplicate(name.into()));
        }
        let g = Arc::new(ThrottleGroup::new(name, limits));
        m.insert(name.into(), Arc::clone(&g));
        Ok(g)
    }

    /// The group `name`.
    pub fn get(&self, name: &str) -> Result<Arc<ThrottleGroup>, GroupError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| GroupError::Unknown(name.into()))
    }

    /// Removes a group no node uses.
    pub fn remove(&self, name: &str) -> Result<(), GroupError> {
        let mut m = self.lock();
        let g = m
            .get(name)
            .ok_or_else(|| GroupError::Unknown(name.into()))?;
        if Arc::strong_count(g) > 1 {
            return Err(GroupError::InUse(name.into()));
        }
        m.remove(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_rate_holds_over_time() {
        let mut l = Limits::default();
        l.iops[0] = Limit {
            avg: 100.0,
            max: 0.0,
            max_length: 1.0,
        };
        let g = ThrottleGroup::new("tg", l);
        let n = admitted(&g, Direction::Read, 4096, 10.0);
        assert!((990..=1020).contains(&n), "{n} ops in 10 s at 100 iops");
    }

    #[test]
    fn a_burst_is_allowed_then_the_average_applies() {
        let mut l = Limits::default();
        l.iops[2] = Limit {
            avg: 10.0,
            max: 100.0,
            max_length: 2.0,
        };
        let g = ThrottleGroup::new("tg", l);
        // Reads are not limited at all.
        assert!(g.try_admit(Direction::Read, 4096).is_none());
        let first_second = admitted(&g, Direction::Write, 4096, 1.0);
        assert!(first_second >= 90, "burst: {first_second}");
        let later = admitted(&g, Direction::Write, 4096, 10.0);
        assert!(later <= 200, "then about 10/s: {later} in 10 s");
    }

    #[test]
    fn groups_in_use_cannot_be_removed() {
        let groups = ThrottleGroups::default();
        let g = groups.add("tg0", Limits::default()).unwrap();
        assert_eq!(
            groups
                .add("tg0", Limits::default())
                .err()
                .unwrap()
                .to_string(),
            "attempt to add duplicate throttle group 'tg0'"
        );
        assert_eq!(
            groups.remove("tg0").unwrap_err().to_string(),
            "throttle group 'tg0' is in use"
        );
        drop(g);
        groups.remove("tg0").unwrap();
        assert!(groups.get("tg0").is_err());
    }

    /// How many requests the group admits in `secs` of simulated time,
    /// for a client that always waits as long as it is told.
    fn admitted(g: &ThrottleGroup, dir: Direction, bytes: u64, secs: f64) -> u64 {
        let start = g.lock().last;
        let mut t = 0.0;
        let mut n = 0;
        while t < secs {
            match g.admit_at(dir, bytes, start + Duration::from_secs_f64(t)) {
                None => n += 1,
                Some(w) => t += w.as_secs_f64(),
            }
        }
        n
    }
}
