//! The system calls a running VMM may make. Everything else kills the
//! process: a guest that took over the VMM cannot mount, exec, trace, load
//! modules, change its identity or leave its namespaces.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// What the VMM's threads do after start-up: run vCPUs (ioctl), serve devices
/// (files, TAP, epoll, eventfds), serve the control and console sockets,
/// start short-lived threads (control clients, migration), write snapshots and
/// stream migrations (sockets, files in its own directory).
const ALLOWED: &[i64] = &[
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // Guest RAM that a same-host migration can hand over (`shared_memory`).
    libc::SYS_memfd_create,
    libc::SYS_brk,
    libc::SYS_mincore,
    // Files and descriptors already open, and those inside the sandbox.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_openat,
    libc::SYS_mkdirat,
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_getdents64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_getcwd,
    // KVM, TAP, block devices.
    libc::SYS_ioctl,
    // Waiting and waking.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    // Per-vCPU timers that knock a vCPU out of KVM_RUN.
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_gettime,
    libc::SYS_timer_delete,
    // Rate limiters and the balloon's statistics period wait on timerfds.
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_sched_getaffinity,
    // Sockets: control, console, vsock, migration.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Threads and signals of this process.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Some system calls a VMM never needs and an attacker would want; the
/// tests check that each is refused.
pub const FORBIDDEN_EXAMPLES: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_mount,
    libc::SYS_ptrace,
    libc::SYS_setuid,
    libc::SYS_unshare,
    libc::SYS_init_module,
];

/// The compiled filter: listed calls are allowed, any other kills the process.
pub fn vmm_filter() -> Result<BpfProgram, seccompiler::BackendError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().map(|&call| (call, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    filter.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::tests::{fork, wait, Ended};

    /// Makes `call` in a forked child under the VMM's filter, with arguments
    /// that make it fail harmlessly should the filter let it through.
    fn call_under_the_filter(call: i64) -> Ended {
        let filter = vmm_filter().unwrap();
        wait(fork(move || {
            if seccompiler::apply_filter(&filter).is_err() {
                return 2;
            }
            // SAFETY: invalid pointers and values: the kernel refuses them.
            unsafe { libc::syscall(call, -1i64, -1i64, -1i64, -1i64, -1i64, -1i64) };
            0
        }))
    }

    #[test]
    fn the_filter_kills_the_process_on_a_forbidden_call() {
        // The examples, and calls the list leaves out: legacy `open`, looking
        // up one's identity, `chroot`, `setns`, `bpf`, `personality`.
        let unlisted = [
            libc::SYS_open,
            libc::SYS_getuid,
            libc::SYS_chroot,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_personality,
        ];
        for &call in FORBIDDEN_EXAMPLES.iter().chain(&unlisted) {
            assert_eq!(
                call_under_the_filter(call),
                Ended::Killed(libc::SIGSYS),
                "system call {call}"
            );
        }
    }

    #[test]
    fn the_filter_lets_a_vmm_do_its_work() {
        let filter = vmm_filter().unwrap();
        let pid = fork(move || {
            if seccompiler::apply_filter(&filter).is_err() {
                return 2;
            }
            // Files, memory, a thread, time, sockets: what a VMM does after start-up.
            let work = || -> std::io::Result<()> {
                let bytes = std::fs::read("/proc/self/stat")?;
                let copy = bytes.clone();
                let thread = std::thread::spawn(move || copy.len());
                if thread.join().ok() != Some(bytes.len()) {
                    return Err(std::io::Error::other("thread"));
                }
                let _ = std::time::Instant::now();
                std::thread::sleep(std::time::Duration::from_millis(1));
                let (mut a, mut b) = std::os::unix::net::UnixStream::pair()?;
                use std::io::{Read, Write};
                a.write_all(b"ping")?;
                let mut got = [0u8; 4];
                b.read_exact(&mut got)?;
                if &got != b"ping" {
                    return Err(std::io::Error::other("socket"));
                }
                Ok(())
            };
            match work() {
                Ok(()) => 0,
                Err(_) => 3,
            }
        });
        assert_eq!(wait(pid), Ended::Exited(0));
    }

    #[test]
    fn a_forbidden_call_in_any_thread_kills_the_whole_process() {
        let filter = vmm_filter().unwrap();
        let pid = fork(move || {
            if seccompiler::apply_filter(&filter).is_err() {
                return 2;
            }
            let thread = std::thread::spawn(|| {
                // SAFETY: getuid has no preconditions.
                unsafe { libc::syscall(libc::SYS_getuid) };
            });
            // Were only that thread killed, this one would go on and exit 0.
            let _ = thread.join();
            0
        });
        assert_eq!(wait(pid), Ended::Killed(libc::SIGSYS));
    }

    #[test]
    fn the_filter_compiles_and_allows_none_of_the_forbidden_calls() {
        assert!(!vmm_filter().unwrap().is_empty());
        for call in FORBIDDEN_EXAMPLES {
            assert!(!ALLOWED.contains(call), "{call} must not be allowed");
        }
    }
}
