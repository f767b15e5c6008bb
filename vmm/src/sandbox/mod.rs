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
