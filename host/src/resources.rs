//! The host resources of one VM, resolved and opened by the daemon and
//! handed to its VMM as descriptors ([`vmm::launch`]): the VMM never gets a
//! host path to open as root.
//!
//! Files are resolved beneath one of the daemon's storage directories with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`,
//! so a link swapped in after a check cannot lead outside them: there is no
//! separate check, the open is the check. Every writable disk is locked
//! exclusively and every read-only disk shared (`flock`, held by the VMM
//! through the passed descriptor), so two VMs never write one disk.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("{field}: {path} is outside the daemon's storage directories")]
    Outside { field: String, path: String },
    #[error("{field}: {path} cannot be opened beneath its storage directory: {why}")]
    Open {
        field: String,
        path: String,
        why: String,
    },
    #[error("{field}: {path} is not a regular file")]
    NotAFile { field: String, path: String },
    #[error("{field}: {path} is in use by another VM ({how})")]
    InUse {
        field: String,
        path: String,
        how: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tap(#[from] vmm::devices::virtio::net::tap::TapError),
}

/// How a file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Kernels, initrds: read, no lock.
    Read,
    /// A read-only disk: read, shared lock.
    SharedDisk,
    /// A writable disk: read and write, exclusive lock.
    ExclusiveDisk,
}

/// Opens `path` (absolute) beneath whichever of `allowed_dirs` contains it,
/// refusing symbolic links anywhere below that directory and anything but a
/// regular file. `field` names the spec field in errors.
pub fn open_beneath(
    field: &str,
    path: &Path,
    allowed_dirs: &[PathBuf],
    access: Access,
) -> Result<File, ResourceError> {
    let shown = path.display().to_string();
    let outside = || ResourceError::Outside {
        field: field.to_string(),
        path: shown.clone(),
    };
    let (dir, relative) = allowed_dirs
        .iter()
        .find_map(|dir| {
            let relative = path.strip_prefix(dir).ok()?;
            let plain = relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            (plain && relative.components().next().is_some()).then_some((dir, relative))
        })
        .ok_or_else(outside)?;
    let dir_fd = open_directory(dir).map_err(|source| ResourceError::Io {
        what: format!("storage directory {}", dir.display()),
        source,
    })?;
    let relative =
        std::ffi::CString::new(relative.as_os_str().as_encoded_bytes()).map_err(|_| outside())?;
    let mode = match access {
        Access::ExclusiveDisk => libc::O_RDWR,
        Access::Read | Access::SharedDisk => libc::O_RDONLY,
    };
    let how = OpenHow {
        // O_NONBLOCK: a FIFO planted in the directory must not hang the daemon.
        flags: (mode | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads `how` (its size passed) and the C string; both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir_fd.as_raw_fd(),
            relative.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        let why = match error.raw_os_error() {
            Some(libc::ELOOP) => "a symbolic link is on the way (links are not followed)".into(),
            _ => error.to_string(),
        };
        return Err(ResourceError::Open {
            field: field.to_string(),
            path: shown,
            why,
        });
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd as RawFd) };
    let metadata = file.metadata().map_err(|source| ResourceError::Io {
        what: shown.clone(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(ResourceError::NotAFile {
            field: field.to_string(),
            path: shown,
        });
    }
    // SAFETY: F_SETFL on our descriptor: back to blocking I/O for a regular file.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, mode) };
    let lock = match access {
        Access::Read => return Ok(file),
        Access::SharedDisk => (libc::LOCK_SH, "it is written by a running VM"),
        Access::ExclusiveDisk => (libc::LOCK_EX, "a running VM uses it"),
    };
    // SAFETY: flock on our descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), lock.0 | libc::LOCK_NB) } < 0 {
        return Err(ResourceError::InUse {
            field: field.to_string(),
            path: shown,
            how: lock.1,
        });
    }
    Ok(file)
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn open_directory(dir: &Path) -> std::io::Result<OwnedFd> {
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid C string and constant flags; the result is checked.
    let fd = unsafe {
        libc::open(
            c_dir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds a Unix listener at `path`, replacing a leftover socket file, made
/// reachable only by root (the daemon and the host's own programs).
pub fn bind_socket(path: &Path) -> Result<UnixListener, ResourceError> {
    let io = |source| ResourceError::Io {
        what: format!("socket {}", path.display()),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()) => {
            std::fs::remove_file(path).map_err(io)?
        }
        Ok(_) => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is there",
            )))
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dirs(name: &str) -> (Dir, Dir) {
        let base = std::env::temp_dir().join(format!("bulkhead-res-{}-{name}", std::process::id()));
        let allowed = base.join("allowed");
        let outside = base.join("outside");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        (
            Dir(allowed.canonicalize().unwrap()),
            Dir(outside.canonicalize().unwrap()),
        )
    }

    #[test]
    fn a_file_beneath_an_allowed_directory_opens() {
        let (allowed, _outside) = dirs("ok");
        std::fs::create_dir(allowed.0.join("sub")).unwrap();
        let path = allowed.0.join("sub/disk.img");
        std::fs::write(&path, b"disk").unwrap();
        let file = open_beneath(
            "disk",
            &path,
            std::slice::from_ref(&allowed.0),
            Access::Read,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap(),
            "disk"
        );
    }

    #[test]
    fn a_path_outside_or_climbing_out_is_refused_before_any_open() {
        let (allowed, outside) = dirs("outside");
        std::fs::write(outside.0.join("secret"), b"x").unwrap();
        let roots = [allowed.0.clone()];
        for path in [
            outside.0.join("secret"),
            allowed.0.join("../outside/secret"),
            allowed.0.clone(),
            PathBuf::from("relative/disk"),
        ] {
            let error = open_beneath("disk", &path, &roots, Access::Read).unwrap_err();
            assert!(
                matches!(error, ResourceError::Outside { .. }),
                "{path:?}: {error}"
            );
        }
    }

    #[test]
    fn a_symbolic_link_anywhere_below_the_directory_is_refused() {
        let (allowed, outside) = dirs("links");
        std::fs::write(outside.0.join("secret"), b"x").unwrap();
        std::fs::write(allowed.0.join("real"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.0.join("secret"), allowed.0.join("out")).unwrap();
        // Even a link that stays inside.
        std::os::unix::fs::symlink(allowed.0.join("real"), allowed.0.join("in")).unwrap();
        std::os::unix::fs::symlink(&outside.0, allowed.0.join("dir")).unwrap();
        let roots = [allowed.0.clone()];
        for name in ["out", "in", "dir/secret"] {
            let error =
                open_beneath("disk", &allowed.0.join(name), &roots, Access::Read).unwrap_err();
            assert!(
                error.to_string().contains("symbolic link"),
                "{name}: {error}"
            );
        }
    }

    #[test]
    fn a_fifo_or_directory_is_not_a_file_and_does_not_hang() {
        let (allowed, _outside) = dirs("fifo");
        let fifo = allowed.0.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::create_dir(allowed.0.join("d")).unwrap();
        let roots = [allowed.0.clone()];
        // Read-only: opening a FIFO for reading would wait for a writer.
        for (name, access) in [
            ("fifo", Access::Read),
            ("fifo", Access::ExclusiveDisk),
            ("d", Access::Read),
        ] {
            let error = open_beneath("disk", &allowed.0.join(name), &roots, access).unwrap_err();
            assert!(
                matches!(
                    error,
                    ResourceError::NotAFile { .. } | ResourceError::Open { .. }
                ),
                "{name}: {error}"
            );
        }
    }

    #[test]
    fn a_writable_disk_opens_for_writing_and_a_read_only_one_does_not() {
        use std::io::Write;
        let (allowed, _outside) = dirs("modes");
        let path = allowed.0.join("disk.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let roots = [allowed.0.clone()];
        let mut writable = open_beneath("disks[0]", &path, &roots, Access::ExclusiveDisk).unwrap();
        writable.write_all(b"written").unwrap();
        drop(writable);
        let mut read_only = open_beneath("disks[0]", &path, &roots, Access::SharedDisk).unwrap();
        assert!(read_only.write_all(b"x").is_err());
        assert_eq!(&std::fs::read(&path).unwrap()[..7], b"written");
    }

    #[test]
    fn a_socket_replaces_a_leftover_socket_but_no_other_file() {
        let (allowed, _outside) = dirs("sockets");
        let path = allowed.0.join("vsock.sock");
        let first = bind_socket(&path).unwrap();
        drop(first);
        // The file of a socket nobody listens on any more.
        let _second = bind_socket(&path).unwrap();
        let file = allowed.0.join("a-file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(bind_socket(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn a_writable_disk_is_exclusive_and_read_only_disks_share() {
        let (allowed, _outside) = dirs("locks");
        let path = allowed.0.join("disk.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let roots = [allowed.0.clone()];
        let writer = open_beneath("disks[0]", &path, &roots, Access::ExclusiveDisk).unwrap();
        for access in [Access::ExclusiveDisk, Access::SharedDisk] {
            let error = open_beneath("disks[0]", &path, &roots, access).unwrap_err();
            assert!(matches!(error, ResourceError::InUse { .. }), "{error}");
        }
        // Kernels are read without a lock.
        open_beneath("kernel", &path, &roots, Access::Read).unwrap();
        drop(writer);
        let reader = open_beneath("disks[0]", &path, &roots, Access::SharedDisk).unwrap();
        let _second = open_beneath("disks[0]", &path, &roots, Access::SharedDisk).unwrap();
        let error = open_beneath("disks[0]", &path, &roots, Access::ExclusiveDisk).unwrap_err();
        assert!(error.to_string().contains("in use"), "{error}");
        drop(reader);
    }
}
