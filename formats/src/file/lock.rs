//! Image locks that QEMU, qemu-img, qemu-io and qemu-storage-daemon
//! understand: a shared OFD lock on byte 100+N for each permission N the
//! image's users hold, and on byte 200+N for each they do not share. A
//! process that wants permission N tests byte 200+N; one that will not
//! share N tests byte 100+N.
//!
//! OFD locks belong to an open file description, so two descriptors of one
//! process conflict like two processes. Strata keeps one description per
//! image inode ([`Inode`]) that carries the union of what every node on it
//! holds, and checks its own nodes against each other by hand. A node keeps
//! its [`ImageLock`] across reopen, so the bytes it holds are never let go
//! in between.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use strata_graph::{Perm, SlotPerm};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// Permission bits QEMU defines: consistent-read, write, write-unchanged,
/// resize.
const PERM_BITS: u32 = 4;

/// `locking=`: whether a `file` node takes image locks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock where the filesystem supports OFD locks; elsewhere go on
    /// unlocked with a warning.
    #[default]
    Auto,
    /// Lock, and fail where the filesystem cannot.
    On,
    /// Take no locks and check none.
    Off,
}

/// The bytes a node wants locked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockSet {
    /// Permissions held (bytes 100+N).
    pub need: Perm,
    /// Permissions not shared (bytes 200+N).
    pub unshared: Perm,
}

impl LockSet {
    /// What a node whose parents hold `perm` locks; `force_share` shares
    /// everything, as QEMU's `force-share=on`.
    pub fn from_perm(perm: SlotPerm, force_share: bool) -> LockSet {
        LockSet {
            need: perm.need,
            unshared: if force_share {
                Perm::empty()
            } else {
                Perm::all() - perm.share
            },
        }
    }

    fn union(self, o: LockSet) -> LockSet {
        LockSet {
            need: self.need | o.need,
            unshared: self.unshared | o.unshared,
        }
    }
}

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone holds what this node will not share, or will not share what
    /// it needs. The wording is QEMU's, so scripts that look for it match.
    #[error("Failed to get {}\"{perm}\" lock. Is another process using the image [{path}]?", if *.shared { "shared " } else { "" })]
    Conflict {
        /// The image.
        path: PathBuf,
        /// The permission's QEMU name.
        perm: &'static str,
        /// True when this node refuses to share `perm` that another holds.
        shared: bool,
    },
    /// fcntl failed where a lock was expected to work.
    #[error("cannot lock '{path}': {source}")]
    Os {
        /// The image.
        path: PathBuf,
        /// The host's error.
        #[source]
        source: io::Error,
    },
}

/// One image inode and the locks this process has on it.
struct Inode {
    /// The one description every lock of this process sits on.
    fd: File,
    path: PathBuf,
    key: (u64, u64),
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Per holder: what it holds, and what a permission change in
    /// progress would have it hold.
    holders: HashMap<u64, (LockSet, Option<LockSet>)>,
    applied: LockSet,
}

/// The inodes this process locks, by (device, inode number).
type Registry = Mutex<HashMap<(u64, u64), Weak<Inode>>>;

impl State {
    /// What every holder but `except` holds or is about to.
    fn union_except(&self, except: Option<u64>) -> LockSet {
        self.holders
            .iter()
            .filter(|(id, _)| Some(**id) != except)
            .fold(LockSet::default(), |acc, (_, (held, next))| {
                acc.union(*held).union(next.unwrap_or_default())
            })
    }
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// A node's locks on an image, released when the last reopen generation of
/// the node lets go of it.
pub struct ImageLock {
    inode: Arc<Inode>,
    id: u64,
}

impl std::fmt::Debug for ImageLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageLock({})", self.inode.path.display())
    }
}

impl ImageLock {
    /// Locks `want` on the image open as `file`, or refuses if another
    /// process or another node of this one is in the way.
    pub fn acquire(file: &File, path: &Path, want: LockSet) -> Result<Arc<ImageLock>, LockError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let inode = Inode::of(file, path)?;
        let lock = ImageLock {
            inode,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        };
        {
            let mut st = lock.inode.lock_state();
            st.holders.insert(lock.id, (want, None));
        }
        // Take before testing: of two processes racing, one sees the other.
        lock.inode.apply()?;
        lock.inode.check(lock.id, want)?;
        Ok(Arc::new(lock))
    }

    /// Whether this lock is on the image open as `file`.
    pub fn is_on(&self, file: &File) -> bool {
        file.metadata()
            .is_ok_and(|m| (m.dev(), m.ino()) == self.inode.key)
    }

    /// Tests `want` without taking it.
    pub fn check(&self, want: LockSet) -> Result<(), LockError> {
        self.inode.check(self.id, want)
    }

    /// First phase of a change to `want`: takes it on top of what is held,
    /// so nothing is let go before the change commits. A change that asks
    /// for no permission it does not hold, and shares no less, is not
    /// checked again: what it wants is held already, and another process
    /// that claims a conflicting byte meanwhile backs off by its own check
    /// (as QEMU's file-posix does on reopen).
    pub fn prepare(&self, want: LockSet) -> Result<(), LockError> {
        let held = {
            let mut st = self.inode.lock_state();
            let h = st.holders.entry(self.id).or_default();
            h.1 = Some(want);
            h.0
        };
        self.inode.apply()?;
        if held.need.contains(want.need) && held.unshared.contains(want.unshared) {
            return Ok(());
        }
        self.inode.check(self.id, want)
    }

    /// Makes the prepared change the held one and lets go of the rest.
    pub fn commit(&self) {
        {
            let mut st = self.inode.lock_state();
            let h = st.holders.entry(self.id).or_default();
            if let Some(next) = h.1.take() {
                h.0 = next;
            }
        }
        self.inode.apply_or_warn();
    }

    /// Drops a prepared change.
    pub fn abort(&self) {
        if let Some(h) = self.inode.lock_state().holders.get_mut(&self.id) {
            h.1 = None;
        }
        self.inode.apply_or_warn();
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        self.inode.lock_state().holders.remove(&self.id);
        self.inode.apply_or_warn();
    }
}

impl Inode {
    fn of(file: &File, path: &Path) -> Result<Arc<Inode>, LockError> {
        let os = |source| LockError::Os {
            path: path.into(),
            source,
        };
        let m = file.metadata().map_err(os)?;
        let key = (m.dev(), m.ino());
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(inode) = reg.get(&key).and_then(Weak::upgrade) {
            return Ok(inode);
        }
        let inode = Arc::new(Inode {
            fd: file.try_clone().map_err(os)?,
            path: path.into(),
            key,
            state: Mutex::default(),
        });
        reg.retain(|_, w| w.strong_count() > 0);
        reg.insert(key, Arc::downgrade(&inode));
        Ok(inode)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the bytes on the description to the union of every holder's.
    fn apply(&self) -> Result<(), LockError> {
        let mut st = self.lock_state();
        let want = st.union_except(None);
        for bit in 0..PERM_BITS {
            let p = Perm::from_bits_truncate(1 << bit);
            for (base, now, then) in [
                (PERM_BASE, st.applied.need, want.need),
                (SHARED_BASE, st.applied.unshared, want.unshared),
            ] {
                if now.contains(p) != then.contains(p) {
                    let kind = if then.contains(p) {
                        libc::F_RDLCK
                    } else {
                        libc::F_UNLCK
                    };
                    self.fcntl(libc::F_OFD_SETLK, kind, base + bit as i64)
                        .map_err(|source| LockError::Os {
                            path: self.path.clone(),
                            source,
                        })?;
                }
            }
        }
        st.applied = want;
        Ok(())
    }

    /// Letting go cannot be refused; a failure here only leaves a byte
    /// locked longer than it should be.
    fn apply_or_warn(&self) {
        if let Err(e) = self.apply() {
            tracing::warn!("{e}");
        }
    }

    /// Refuses `want` if another process, or another holder here, is in
    /// its way.
    fn check(&self, me: u64, want: LockSet) -> Result<(), LockError> {
        let others = self.lock_state().union_except(Some(me));
        for bit in 0..PERM_BITS {
            let p = Perm::from_bits_truncate(1 << bit);
            for (mine, theirs, base, shared) in [
                (want.need, others.unshared, SHARED_BASE, false),
                (want.unshared, others.need, PERM_BASE, true),
            ] {
                if !mine.contains(p) {
                    continue;
                }
                let held = theirs.contains(p) || self.held_elsewhere(base + bit as i64)?;
                if held {
                    return Err(LockError::Conflict {
                        path: self.path.clone(),
                        perm: p.names()[0],
                        shared,
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether another description (another process) locks `byte`.
    fn held_elsewhere(&self, byte: i64) -> Result<bool, LockError> {
        let fl = self
            .fcntl(libc::F_OFD_GETLK, libc::F_WRLCK, byte)
            .map_err(|source| LockError::Os {
                path: self.path.clone(),
                source,
            })?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    fn fcntl(&self, cmd: libc::c_int, kind: libc::c_int, byte: i64) -> io::Result<libc::flock> {
        // SAFETY: flock is plain old data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte;
        fl.l_len = 1;
        // SAFETY: `fl` is a valid flock for the duration of the call, and
        // OFD locking touches nothing else of ours.
        let rc = unsafe { libc::fcntl(self.fd.as_raw_fd(), cmd, &mut fl) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl)
    }
}
