//! CPU and memory limits for each VMM: cgroup v2 where the host runs the
//! unified hierarchy with those controllers, v1 otherwise.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The CFS period the CPU quota is expressed in.
const CPU_PERIOD_US: u64 = 100_000;
/// Memory a VMM may use beyond its guest's (code, queues, page cache of
/// snapshot writes).
pub const VMM_OVERHEAD_MIB: u64 = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cgroups {
    V2 {
        root: PathBuf,
    },
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
    },
    /// No usable controllers: VMs run without limits (and the daemon says so).
    Unavailable,
}

/// The limits of one VM: its cgroup directories, and where to join them.
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroups {
    pub fn detect() -> Cgroups {
        Self::detect_in(Path::new("/sys/fs/cgroup"))
    }

    fn detect_in(base: &Path) -> Cgroups {
        let controllers =
            std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
        let has = |name| controllers.split_whitespace().any(|c| c == name);
        if has("cpu") && has("memory") {
            return Cgroups::V2 {
                root: base.join("bulkhead"),
            };
        }
        let (cpu, memory) = (base.join("cpu"), base.join("memory"));
        if cpu.join("cpu.cfs_quota_us").exists() && memory.join("memory.limit_in_bytes").exists() {
            return Cgroups::V1 {
                cpu: cpu.join("bulkhead"),
                memory: memory.join("bulkhead"),
            };
        }
        Cgroups::Unavailable
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Cgroups::V2 { .. } => "cgroup v2",
            Cgroups::V1 { .. } => "cgroup v1",
            Cgroups::Unavailable => "none",
        }
    }

    /// Creates the cgroup of VM `id`: `cpus` CPUs' worth of time (plus half
    /// a CPU for its device and I/O threads) and its memory plus overhead.
    pub fn create(&self, id: &str, cpus: u8, memory_mib: u64) -> std::io::Result<Option<VmCgroup>> {
        let quota = u64::from(cpus) * CPU_PERIOD_US + CPU_PERIOD_US / 2;
        let memory = ((memory_mib + VMM_OVERHEAD_MIB) << 20).to_string();
        match self {
            Cgroups::V2 { root } => {
                let parent = root.parent().unwrap_or(root);
                // Controllers must be enabled for the children of each level.
                let _ = write(&parent.join("cgroup.subtree_control"), "+cpu +memory");
                std::fs::create_dir_all(root)?;
                write(&root.join("cgroup.subtree_control"), "+cpu +memory")?;
                let dir = root.join(id);
                std::fs::create_dir_all(&dir)?;
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir.join("memory.max"), &memory)?;
                Ok(Some(VmCgroup { dirs: vec![dir] }))
            }
            Cgroups::V1 { cpu, memory: mem } => {
                let cpu_dir = cpu.join(id);
                let memory_dir = mem.join(id);
                std::fs::create_dir_all(&cpu_dir)?;
                std::fs::create_dir_all(&memory_dir)?;
                write(
                    &cpu_dir.join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write(&cpu_dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&memory_dir.join("memory.limit_in_bytes"), &memory)?;
                Ok(Some(VmCgroup {
                    dirs: vec![cpu_dir, memory_dir],
                }))
            }
            Cgroups::Unavailable => Ok(None),
        }
    }

    /// Removes VM `id`'s cgroups (once its process has ended).
    pub fn remove(&self, id: &str) {
        let dirs = match self {
            Cgroups::V2 { root } => vec![root.join(id)],
            Cgroups::V1 { cpu, memory } => vec![cpu.join(id), memory.join(id)],
            Cgroups::Unavailable => Vec::new(),
        };
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl VmCgroup {
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files, opened now so that the child can join
    /// between fork and exec, before it allocates anything.
    pub fn procs_files(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|dir| {
                // `create` as in [`write`]: a no-op on a cgroup file system.
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(dir.join("cgroup.procs"))?;
                Ok(OwnedFd::from(file))
            })
            .collect()
    }
}

/// Moves the calling process into each cgroup (writing "0" means "me").
/// Async-signal-safe: for use between fork and exec.
pub fn join_from_child(files: &[OwnedFd]) -> std::io::Result<()> {
    for file in files {
        // SAFETY: writes one byte from a static buffer to an open descriptor.
        if unsafe { libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes a control file. `create` changes nothing on a cgroup file system
/// (its files exist once their directory does, and it makes no others);
/// it lets the tests run the same code over a plain directory.
fn write(path: &Path, value: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(value.as_bytes())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_prefers_v2_with_both_controllers() {
        let base = std::env::temp_dir().join(format!("bulkhead-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(base.join("cpu")).unwrap();
        std::fs::create_dir_all(base.join("memory")).unwrap();
        assert_eq!(Cgroups::detect_in(&base), Cgroups::Unavailable);
        std::fs::write(base.join("cpu/cpu.cfs_quota_us"), "").unwrap();
        std::fs::write(base.join("memory/memory.limit_in_bytes"), "").unwrap();
        assert!(matches!(Cgroups::detect_in(&base), Cgroups::V1 { .. }));
        std::fs::write(
            base.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert!(matches!(Cgroups::detect_in(&base), Cgroups::V2 { .. }));
        let _ = std::fs::remove_dir_all(&base);
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// The v2 path (this host has v1 only, so the daemon's tests run v1):
    /// the values written, over a plain directory.
    #[test]
    fn v2_limits_are_the_vcpus_plus_half_a_cpu_and_the_guest_plus_overhead() {
        let base = std::env::temp_dir().join(format!("bulkhead-cgroup-v2-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let cgroups = Cgroups::V2 {
            root: base.join("bulkhead"),
        };
        let vm = cgroups.create("vm1", 2, 512).unwrap().unwrap();
        assert_eq!(vm.dirs(), [base.join("bulkhead/vm1")]);
        assert_eq!(read(&base.join("bulkhead/vm1/cpu.max")), "250000 100000");
        assert_eq!(
            read(&base.join("bulkhead/vm1/memory.max")),
            ((512 + 256) << 20).to_string()
        );
        assert_eq!(read(&base.join("cgroup.subtree_control")), "+cpu +memory");
        assert_eq!(
            read(&base.join("bulkhead/cgroup.subtree_control")),
            "+cpu +memory"
        );
        // A second VM's limits are its own.
        cgroups.create("vm2", 1, 64).unwrap().unwrap();
        assert_eq!(read(&base.join("bulkhead/vm2/cpu.max")), "150000 100000");
        assert_eq!(
            read(&base.join("bulkhead/vm2/memory.max")),
            ((64 + 256) << 20).to_string()
        );
        std::fs::remove_file(base.join("bulkhead/vm1/cpu.max")).unwrap();
        std::fs::remove_file(base.join("bulkhead/vm1/memory.max")).unwrap();
        cgroups.remove("vm1");
        assert!(!base.join("bulkhead/vm1").exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn v1_limits_are_written_to_the_cpu_and_memory_hierarchies() {
        let base = std::env::temp_dir().join(format!("bulkhead-cgroup-v1-{}", std::process::id()));
        let cgroups = Cgroups::V1 {
            cpu: base.join("cpu/bulkhead"),
            memory: base.join("memory/bulkhead"),
        };
        let vm = cgroups.create("vm1", 4, 1024).unwrap().unwrap();
        assert_eq!(
            vm.dirs(),
            [
                base.join("cpu/bulkhead/vm1"),
                base.join("memory/bulkhead/vm1")
            ]
        );
        assert_eq!(
            read(&base.join("cpu/bulkhead/vm1/cpu.cfs_period_us")),
            "100000"
        );
        assert_eq!(
            read(&base.join("cpu/bulkhead/vm1/cpu.cfs_quota_us")),
            "450000"
        );
        assert_eq!(
            read(&base.join("memory/bulkhead/vm1/memory.limit_in_bytes")),
            ((1024 + 256) << 20).to_string()
        );
        assert!(Cgroups::Unavailable.create("vm1", 1, 1).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&base);
    }
}
