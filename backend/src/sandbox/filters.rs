//! The system calls each kind of thread may make. Every thread starts
//! under [`daemon`], set before the first thread is spawned; queue threads
//! add [`queue`] on top, the narrower, since they are the ones that parse
//! what a guest wrote.

use libc::*;

/// What the daemon as a whole does: open images, listen on and talk over
/// sockets, run threads, and drive io_uring. No execve, no ptrace, no
/// module or mount calls, no new namespaces.
pub fn daemon() -> Vec<i64> {
    let mut v = queue();
    v.extend([
        // Files: images, sockets' paths, the pid and log files.
        SYS_openat,
        SYS_statx,
        SYS_fstat,
        SYS_newfstatat,
        SYS_fstatfs,
        SYS_statfs,
        SYS_fallocate,
        SYS_ftruncate,
        SYS_fsync,
        SYS_fdatasync,
        SYS_flock,
        SYS_ioctl,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_unlink,
        SYS_unlinkat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_chmod,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_readlink,
        SYS_readlinkat,
        SYS_getcwd,
        SYS_chdir,
        SYS_getdents64,
        SYS_dup,
        SYS_dup2,
        SYS_dup3,
        SYS_pipe2,
        SYS_memfd_create,
        // Sockets: vhost-user and QMP listeners, their connections and the
        // file descriptors a frontend passes.
        SYS_socket,
        SYS_socketpair,
        SYS_bind,
        SYS_listen,
        SYS_accept4,
        SYS_connect,
        SYS_recvmsg,
        SYS_recvfrom,
        SYS_sendto,
        SYS_shutdown,
        SYS_getsockopt,
        SYS_setsockopt,
        SYS_getsockname,
        // Name lookups of NBD servers: glibc sends both DNS queries at once.
        SYS_sendmmsg,
        // Threads, signals and waiting.
        SYS_clone,
        SYS_clone3,
        SYS_set_robust_list,
        SYS_prctl,
        // Queue threads narrow their own filter; the main thread confines
        // the process with Landlock once the images are open.
        SYS_seccomp,
        SYS_landlock_create_ruleset,
        SYS_landlock_add_rule,
        SYS_landlock_restrict_self,
        SYS_rt_sigaction,
        SYS_rt_sigtimedwait,
        SYS_rt_sigsuspend,
        SYS_kill,
        SYS_poll,
        SYS_ppoll,
        SYS_epoll_create1,
        // librados (driver=rbd): its messenger's epoll, and the files it
        // looks for (ceph.conf, keyrings) at start-up.
        SYS_epoll_create,
        SYS_access,
        // librados's admin socket (`ceph daemon` commands), if the conf
        // asks for one.
        SYS_accept,
        SYS_eventfd2,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_sched_getaffinity,
        SYS_sched_setaffinity,
        SYS_prlimit64,
        SYS_getrlimit,
        SYS_uname,
        SYS_setsid,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_getppid,
        SYS_wait4,
        SYS_umask,
    ]);
    v
}

/// What a queue thread may try and is told no, rather than being killed
/// for: glibc's malloc opens /proc/sys/vm/overcommit_memory the first time
/// it shrinks a thread's arena, which is when a queue thread ends, and
/// copes when that fails.
pub const QUEUE_REFUSED: &[(i64, i32)] = &[(SYS_openat, EACCES)];

/// What an NBD connection's thread adds to a queue thread's calls:
/// receiving from its socket without the ring when bytes are waiting
/// (sending already is there, for the log).
pub const NBD_CONNECTION: &[i64] = &[SYS_recvfrom];

/// What a queue thread does while it serves a guest: io_uring, eventfds
/// and epoll, memory, futexes, and the log.
pub fn queue() -> Vec<i64> {
    vec![
        SYS_io_uring_enter,
        SYS_io_uring_setup,
        SYS_io_uring_register,
        SYS_read,
        SYS_readv,
        SYS_write,
        SYS_writev,
        // The log, when it goes to journald.
        SYS_sendmsg,
        SYS_close,
        // Descriptor flags (a cloned eventfd is close-on-exec).
        SYS_fcntl,
        // SEEK_DATA/SEEK_HOLE for block status.
        SYS_lseek,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_epoll_ctl,
        SYS_futex,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_madvise,
        SYS_brk,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_sched_yield,
        SYS_getrandom,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_gettid,
        SYS_getpid,
        // Raising SIGSYS after reporting a violation, and panics.
        SYS_tgkill,
        SYS_rseq,
        // --run-with: glibc has every thread change its own credentials.
        // Only root can change them to anything but its own, so this
        // gives a thread nothing it does not already have.
        SYS_setuid,
        SYS_setgid,
        SYS_setgroups,
        SYS_exit,
        SYS_exit_group,
        SYS_restart_syscall,
    ]
}
