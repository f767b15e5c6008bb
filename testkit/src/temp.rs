//! Temporary folders.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// A folder under the system's temporary folder, unique in this process and
/// across processes, removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty folder whose name starts with `bulkhead-{label}-`.
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("bulkhead-{label}-{}-{n}", std::process::id()));
        // A folder left by a killed run of a process that had this pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot make {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

/// The folder of this whole test process, for helpers that hand out paths
/// without a guard to hold: made on first use, removed when the process
/// exits (the test harness exits normally after a failed test too).
pub fn process_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        extern "C" fn remove_process_dir() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain function without arguments; it only
        // removes a folder, and runs at most once, at exit.
        unsafe { libc::atexit(remove_process_dir) };
        // Not a TempDir: a static is never dropped.
        let dir = TempDir::new("process");
        let path = dir.0.clone();
        std::mem::forget(dir);
        path
    })
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_distinct_and_removed_with_their_contents_on_drop() {
        let first = TempDir::new("testkit");
        let second = TempDir::new("testkit");
        assert_ne!(first.path(), second.path());
        std::fs::create_dir(first.join("inner")).unwrap();
        std::fs::write(first.join("inner/file"), b"x").unwrap();
        let path = first.path().to_path_buf();
        drop(first);
        assert!(!path.exists());
        assert!(second.path().is_dir());
    }

    #[test]
    fn the_process_folder_is_made_once_and_removed_at_exit() {
        assert_eq!(process_dir(), process_dir());
        assert!(process_dir().is_dir());
    }
}
