//! The VMM's own confinement, used when the host daemon starts it
//! (`bulkhead run --sandbox uid=N,gid=N`).
//!
//! Two steps, because a mount namespace can only be entered by a process
//! with one thread, while the files and devices a VM needs must be opened
//! before the view is narrowed:
//! 1. [`isolate_mounts`], first thing in `main`: a private mount namespace.
//! 2. [`confine`], once the VM is built and its sockets are bound: the
//!    current directory becomes the whole file system (pivot_root), the
//!    process takes an unprivileged uid and gid with no capabilities, and a
//!    seccomp filter ([`seccomp`]) limits every thread's system calls.
//!
//! After that the VMM keeps the descriptors it opened (KVM, disks, TAPs,
//! sockets) and can reach nothing else.

pub mod seccomp;

use std::ffi::CString;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxConfig {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {step}: {source}")]
    Os {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("sandbox: the VMM must not keep uid or gid 0")]
    Root,
    #[error("sandbox: cannot install the seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("sandbox: cannot build the seccomp filter: {0}")]
    Filter(#[from] seccompiler::BackendError),
}

fn check(step: &'static str, rc: libc::c_long) -> Result<(), SandboxError> {
    if rc == -1 {
        Err(SandboxError::Os {
            step,
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

fn c_path(path: &std::path::Path) -> Result<CString, SandboxError> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| SandboxError::Os {
        step: "directory name",
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// Gives this process a mount namespace of its own whose mounts do not
/// propagate back to the host. Must run before any thread is started.
pub fn isolate_mounts() -> Result<(), SandboxError> {
    // SAFETY: unshare takes flags only.
    check("unshare the mount namespace", unsafe {
        libc::unshare(libc::CLONE_NEWNS).into()
    })?;
    let root = c"/";
    // SAFETY: the path is a valid C string; the other arguments may be null
    // for a propagation change.
    check("make mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
        .into()
    })
}

/// Narrows the file system to the current directory, drops to `config`'s
/// uid and gid, and installs the system call filter on every thread.
pub fn confine(config: SandboxConfig) -> Result<(), SandboxError> {
    if config.uid == 0 || config.gid == 0 {
        return Err(SandboxError::Root);
    }
    // What later reads /proc must open it now.
    crate::memory_usage::prepare();
    crate::migration::protocol::boot_id();
    crate::host::KvmFlavour::detect();
    crate::host::total_memory_bytes();

    let dir: PathBuf = std::env::current_dir().map_err(|source| SandboxError::Os {
        step: "current directory",
        source,
    })?;
    let dir = c_path(&dir)?;
    let dot = c".";
    // SAFETY: valid C strings; a bind mount of the directory onto itself makes
    // it a mount point, which pivot_root needs.
    check("bind the VM directory", unsafe {
        libc::mount(
            dir.as_ptr(),
            dir.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
        .into()
    })?;
    // SAFETY: as above; nothing in the VM directory is meant to be a device or
    // a program.
    let _ = unsafe {
        libc::mount(
            std::ptr::null(),
            dir.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    // SAFETY: a valid C string.
    check("enter the VM directory", unsafe {
        libc::chdir(dir.as_ptr()).into()
    })?;
    // pivot_root(".", ".") stacks the old root over the new one; detaching it
    // leaves only the VM directory.
    // SAFETY: both arguments are valid C strings.
    check("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr())
    })?;
    // SAFETY: a valid C string.
    check("detach the host's file system", unsafe {
        libc::umount2(dot.as_ptr(), libc::MNT_DETACH).into()
    })?;
    // SAFETY: a valid C string.
    check("chdir /", unsafe { libc::chdir(c"/".as_ptr()).into() })?;

    // glibc applies these to every thread of the process.
    // SAFETY: an empty group list.
    check("drop supplementary groups", unsafe {
        libc::setgroups(0, std::ptr::null()).into()
    })?;
    // SAFETY: plain ids.
    check("set the gid", unsafe {
        libc::setresgid(config.gid, config.gid, config.gid).into()
    })?;
    // Leaving uid 0 for good also clears every capability.
    // SAFETY: plain ids.
    check("set the uid", unsafe {
        libc::setresuid(config.uid, config.uid, config.uid).into()
    })?;
    // SAFETY: getuid and geteuid have no preconditions.
    if unsafe { libc::getuid() } == 0 || unsafe { libc::geteuid() } == 0 {
        return Err(SandboxError::Root);
    }
    // Also sets no_new_privs.
    seccompiler::apply_filter_all_threads(&seccomp::vmm_filter()?)?;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// How a forked child ended.
    #[derive(Debug, PartialEq, Eq)]
    pub(in crate::sandbox) enum Ended {
        Exited(i32),
        Killed(i32),
    }

    /// Runs `child` in a forked copy of this process, where only the calling
    /// thread goes on, and returns its pid. The child exits with what `child`
    /// returns (101 if it panics); an alarm kills it if it hangs.
    pub(in crate::sandbox) fn fork(child: impl FnOnce() -> i32) -> libc::pid_t {
        // SAFETY: the child runs `child` and exits; it never returns into the
        // test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: alarm and _exit take plain values.
            unsafe { libc::alarm(20) };
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        pid
    }

    pub(in crate::sandbox) fn wait(pid: libc::pid_t) -> Ended {
        let mut status = 0;
        // SAFETY: `status` is valid for waitpid to write.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFSIGNALED(status) {
            Ended::Killed(libc::WTERMSIG(status))
        } else {
            Ended::Exited(libc::WEXITSTATUS(status))
        }
    }

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just opened and are owned here only.
        let [read, write] = fds.map(|fd| File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        (read, write)
    }

    fn assert_root() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the sandbox tests need root (as the VMM's launcher has), like the test command"
        );
    }

    /// The values of one line of /proc/PID/task/TID/status.
    fn status_field(status: &str, name: &str) -> Vec<String> {
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {status}"));
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn confine_refuses_to_leave_the_vmm_with_uid_or_gid_0_and_changes_nothing() {
        assert_root();
        let dir = testkit::TempDir::new("sandbox-root");
        let pid = fork(|| {
            // A mount namespace of its own, should confine go ahead by mistake.
            if isolate_mounts().is_err() || std::env::set_current_dir(dir.path()).is_err() {
                return 2;
            }
            for (uid, gid) in [(0, 1000), (1000, 0), (0, 0)] {
                if !matches!(confine(SandboxConfig { uid, gid }), Err(SandboxError::Root)) {
                    return 3;
                }
            }
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/proc/self").exists() {
                return 4;
            }
            0
        });
        assert_eq!(wait(pid), Ended::Exited(0));
    }

    #[test]
    fn a_confined_process_sees_only_its_directory_and_every_thread_is_unprivileged_and_filtered() {
        assert_root();
        const UID: u32 = 4242;
        const GID: u32 = 4343;
        let jail = testkit::TempDir::new("sandbox-jail");
        std::fs::write(jail.join("disk.img"), b"inside").unwrap();
        let outside = testkit::TempDir::new("sandbox-outside");
        std::fs::write(outside.join("host.txt"), b"opened before").unwrap();
        let (mut report_r, report_w) = pipe();
        let (hold_r, hold_w) = pipe();
        let (report_r_fd, hold_w_fd) = (report_r.as_raw_fd(), hold_w.as_raw_fd());
        let (jail_path, outside_file) = (jail.path().to_owned(), outside.join("host.txt"));
        let pid = fork(move || {
            // SAFETY: the parent's ends, copied into this process by fork.
            unsafe {
                libc::close(report_r_fd);
                libc::close(hold_w_fd);
            }
            let mut report = report_w;
            let mut hold = hold_r;
            let checks = || -> Result<std::thread::JoinHandle<()>, String> {
                isolate_mounts().map_err(|e| e.to_string())?;
                // A thread started before confine: it must end up confined too.
                let sleeper = std::thread::spawn(move || {
                    let _ = hold.read(&mut [0u8; 1]);
                    // Not allowed: the filter kills the process.
                    // SAFETY: getuid has no preconditions.
                    unsafe { libc::syscall(libc::SYS_getuid) };
                });
                // A supplementary group for confine to drop.
                // SAFETY: a list of one group id.
                if unsafe { libc::setgroups(1, [4444].as_ptr()) } != 0 {
                    return Err("cannot join group 4444".into());
                }
                let mut kept = File::open(&outside_file).map_err(|e| e.to_string())?;
                std::env::set_current_dir(&jail_path).map_err(|e| e.to_string())?;
                confine(SandboxConfig { uid: UID, gid: GID }).map_err(|e| e.to_string())?;
                match std::fs::read("/disk.img") {
                    Ok(bytes) if bytes == b"inside" => {}
                    other => return Err(format!("/disk.img: {other:?}")),
                }
                for host_path in [
                    std::path::Path::new("/etc"),
                    outside_file.as_path(),
                    jail_path.as_path(),
                ] {
                    if std::fs::metadata(host_path).is_ok() {
                        return Err(format!("{} is visible", host_path.display()));
                    }
                }
                // Not root, and no capability (CAP_DAC_OVERRIDE) to write
                // into root's directory.
                match std::fs::write("/new", b"x") {
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                    other => return Err(format!("writing into root's directory: {other:?}")),
                }
                let mut text = String::new();
                kept.read_to_string(&mut text).map_err(|e| e.to_string())?;
                if text != "opened before" {
                    return Err(format!("the descriptor opened before reads {text:?}"));
                }
                Ok(sleeper)
            };
            let sleeper = match checks() {
                Ok(sleeper) => sleeper,
                Err(e) => {
                    let _ = report.write_all(e.as_bytes());
                    return 2;
                }
            };
            let _ = report.write_all(b"confined");
            drop(report);
            let _ = sleeper.join();
            0
        });
        let mut message = String::new();
        report_r.read_to_string(&mut message).unwrap();
        assert_eq!(message, "confined");
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|task| task.unwrap().path())
            .collect();
        assert_eq!(tasks.len(), 2, "the child and its sleeper thread");
        // The host's mounts are detached, not merely hidden under the VM
        // directory: its mount namespace holds that one mount.
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        assert_eq!(mounts.lines().count(), 1, "{mounts}");
        for task in tasks {
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            assert_eq!(status_field(&status, "Uid"), vec![UID.to_string(); 4]);
            assert_eq!(status_field(&status, "Gid"), vec![GID.to_string(); 4]);
            assert!(status_field(&status, "Groups").is_empty());
            for set in ["CapPrm", "CapEff", "CapAmb"] {
                assert_eq!(status_field(&status, set), ["0000000000000000"], "{set}");
            }
            assert_eq!(status_field(&status, "NoNewPrivs"), ["1"]);
            assert_eq!(status_field(&status, "Seccomp"), ["2"], "filter mode");
        }
        // The sleeper wakes and makes a call the filter refuses: SIGSYS.
        drop(hold_w);
        assert_eq!(wait(pid), Ended::Killed(libc::SIGSYS));
    }
}
