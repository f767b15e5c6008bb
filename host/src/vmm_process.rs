//! One VMM process per VM: where its files live, how it is started
//! (sandboxed, in its cgroup, in a session of its own so that it outlives
//! the daemon), how the daemon finds it again, and how it ended.

use crate::cgroup::VmCgroup;
use crate::resources::{open_beneath, Access, ResourceError};
use crate::spec::VmSpec;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The environment variable that marks a VMM process with its VM's id, so a
/// restarted daemon can find processes it started but never recorded.
pub const VM_ID_ENV: &str = "BULKHEAD_VM_ID";

/// The files of one VM under the daemon's state directory.
#[derive(Clone, Debug)]
pub struct VmPaths {
    /// `vms/<id>`: owned by root; holds the log and the jail.
    pub dir: PathBuf,
    /// `vms/<id>/jail`: the VMM's whole file system once it is sandboxed,
    /// owned by the VM's uid.
    pub jail: PathBuf,
    pub control: PathBuf,
    pub console: PathBuf,
    pub vsock: PathBuf,
    pub snapshots: PathBuf,
    /// The VMM's stderr: its log, for people (the daemon decides nothing
    /// from it).
    pub log: PathBuf,
    /// Where the VMM writes how it ended ([`vmm::launch::ExitReport`]),
    /// through a descriptor: the VMM cannot reach this path.
    pub exit_report: PathBuf,
}

impl VmPaths {
    pub fn new(state_dir: &Path, id: &str) -> VmPaths {
        let dir = state_dir.join("vms").join(id);
        let jail = dir.join("jail");
        VmPaths {
            control: jail.join("control.sock"),
            console: jail.join("console.sock"),
            vsock: jail.join("vsock.sock"),
            snapshots: jail.join("snapshots"),
            log: dir.join("vmm.log"),
            exit_report: dir.join("exit-report.json"),
            jail,
            dir,
        }
    }
}

/// How a VMM comes to life: booted from its spec, resumed from one of its
/// snapshots, or received from a live migration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    #[default]
    Boot,
    /// A snapshot name under the VM's `snapshots` directory.
    Restore(String),
    /// `tcp:IP:PORT` to wait on, for the source named.
    Incoming {
        uri: String,
        from: vmm::launch::ExpectedSource,
    },
}

/// The machine a VMM receives for `spec`: the spec itself, with the host
/// resources the daemon places filled in (the vsock socket, in the VM's
/// jail). Host paths are for information: the VMM gets their files open.
pub fn machine(spec: &VmSpec) -> VmSpec {
    let mut machine = spec.clone();
    if let Some(vsock) = &mut machine.vsock {
        vsock.socket = Some("vsock.sock".into());
    }
    machine
}

/// What a VMM is started with: its plan and the descriptors that go with it.
pub struct Launch {
    pub plan: vmm::launch::LaunchPlan,
    pub descriptors: Vec<OwnedFd>,
}

/// Resolves, opens and locks everything `spec` needs for `origin`, in the
/// order [`vmm::launch`] defines. Nothing is left behind on failure: the
/// descriptors close, the locks go with them.
pub fn prepare(
    spec: &VmSpec,
    uid: u32,
    origin: &Origin,
    paths: &VmPaths,
    allowed_dirs: &[PathBuf],
    kvm_device: &Path,
) -> Result<Launch, ResourceError> {
    use vmm::launch::{BootPlan, LaunchOrigin, LaunchPlan};
    let machine = machine(spec);
    let launch_origin = match origin {
        Origin::Boot => LaunchOrigin::Boot,
        Origin::Restore(name) => LaunchOrigin::Restore {
            snapshot: name.clone(),
        },
        Origin::Incoming { from, .. } => LaunchOrigin::Incoming(from.clone()),
    };
    let boot = launch_origin == LaunchOrigin::Boot;
    let mut descriptors: Vec<OwnedFd> = Vec::new();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_device)
        .map_err(|source| ResourceError::Io {
            what: kvm_device.display().to_string(),
            source,
        })?;
    descriptors.push(kvm.into());
    // Fresh and empty: no report of an earlier run can be taken for this one's.
    let report = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&paths.exit_report)
        .map_err(|source| ResourceError::Io {
            what: paths.exit_report.display().to_string(),
            source,
        })?;
    descriptors.push(report.into());
    if boot {
        if let Some(kernel) = &spec.kernel {
            descriptors.push(open_beneath("kernel", kernel, allowed_dirs, Access::Read)?.into());
        }
        if let Some(initrd) = &spec.initrd {
            descriptors.push(open_beneath("initrd", initrd, allowed_dirs, Access::Read)?.into());
        }
    }
    for (index, disk) in spec.disks.iter().enumerate() {
        let access = match disk.readonly {
            true => Access::SharedDisk,
            false => Access::ExclusiveDisk,
        };
        let field = format!("disks[{index}].path");
        descriptors.push(open_beneath(&field, &disk.path, allowed_dirs, access)?.into());
    }
    for nic in &spec.nics {
        let tap = vmm::devices::virtio::net::tap::Tap::open(&nic.tap)?;
        let file = tap.file().try_clone().map_err(|source| ResourceError::Io {
            what: format!("TAP {}", nic.tap),
            source,
        })?;
        descriptors.push(file.into());
    }
    if spec.vsock.is_some() {
        let listener = crate::resources::bind_socket(&paths.vsock)?;
        descriptors.push(listener.into());
    }
    if let Origin::Incoming { uri, .. } = origin {
        let address = uri.strip_prefix("tcp:").unwrap_or(uri);
        let listener =
            std::net::TcpListener::bind(address).map_err(|source| ResourceError::Io {
                what: format!("cannot listen on {uri}"),
                source,
            })?;
        descriptors.push(listener.into());
    }
    let plan = LaunchPlan {
        version: vmm::launch::VERSION,
        machine,
        boot: BootPlan {
            kernel: spec.kernel.is_some(),
            initrd: spec.initrd.is_some(),
            host_cmdline_options: true,
            prefault_memory: false,
        },
        origin: launch_origin,
        sandbox: vmm::sandbox::SandboxConfig { uid, gid: uid },
        control: "control.sock".into(),
        console: "console.sock".into(),
    };
    Ok(Launch { plan, descriptors })
}

/// The descriptor number the VMM finds its launch socket at.
const LAUNCH_FD: i32 = 3;

/// Prepares the VM's directories and starts its VMM with `launch`.
pub fn launch(
    binary: &Path,
    id: &str,
    paths: &VmPaths,
    launch: Launch,
    cgroup: Option<&VmCgroup>,
) -> std::io::Result<Child> {
    let (ours, theirs) = std::os::unix::net::UnixDatagram::pair()?;
    let raw: Vec<i32> = launch.descriptors.iter().map(|fd| fd.as_raw_fd()).collect();
    // Queued in the socket before the VMM exists; it reads it first thing.
    vmm::launch::send(&ours, &launch.plan, &raw).map_err(std::io::Error::other)?;
    drop(ours);
    drop(launch.descriptors);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)?;
    let cgroup_files = match cgroup {
        Some(cgroup) => cgroup.procs_files()?,
        None => Vec::new(),
    };
    let mut command = Command::new(binary);
    command
        .args([
            "run",
            "--launch-fd",
            &LAUNCH_FD.to_string(),
            "--output",
            "json",
        ])
        .current_dir(&paths.jail)
        .env_clear()
        .env(VM_ID_ENV, id)
        .env("BULKHEAD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let launch_socket = theirs.as_raw_fd();
    // SAFETY: between fork and exec the child only makes system calls
    // (setsid, dup2, close_range, write) on descriptors opened before the
    // fork; nothing allocates.
    unsafe {
        command.pre_exec(move || {
            // Its own session: the daemon's terminal and process group
            // signals do not reach it, and it outlives the daemon.
            libc::setsid();
            crate::cgroup::join_from_child(&cgroup_files)?;
            // The launch socket at its agreed number, without close-on-exec.
            if libc::dup2(launch_socket, LAUNCH_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing else the daemon holds reaches the VMM.
            libc::syscall(libc::SYS_close_range, LAUNCH_FD + 1, u32::MAX, 0);
            Ok(())
        });
    }
    let child = command.spawn();
    drop(theirs);
    child
}

/// Makes VM `id`'s directories ready for a new VMM: the jail, owned by the
/// VM's uid, no stale sockets, the previous log kept beside.
pub fn prepare_directories(paths: &VmPaths, uid: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(&paths.jail)?;
    std::os::unix::fs::chown(&paths.jail, Some(uid), Some(uid))?;
    std::fs::set_permissions(
        &paths.jail,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    for stale in [&paths.control, &paths.console] {
        let _ = std::fs::remove_file(stale);
    }
    match std::fs::remove_file(&paths.exit_report) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // The previous run's log is kept beside.
    if paths.log.exists() {
        std::fs::rename(&paths.log, paths.log.with_extension("log.1"))?;
    }
    Ok(())
}

/// The VMM process of VM `id`, found by the mark in its environment.
pub fn find_process(id: &str) -> Option<u32> {
    let mark = format!("{VM_ID_ENV}={id}");
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        environ
            .split(|&b| b == 0)
            .any(|item| item == mark.as_bytes())
            .then_some(pid)
    })
}

/// Whether `pid` is still VM `id`'s VMM (and not a recycled pid).
pub fn is_vm_process(pid: u32, id: &str) -> bool {
    let mark = format!("{VM_ID_ENV}={id}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|environ| {
            environ
                .split(|&b| b == 0)
                .any(|item| item == mark.as_bytes())
        })
        .unwrap_or(false)
}

pub fn signal(pid: u32, signal: i32) {
    // SAFETY: sends a signal; the pid was checked to be the VM's VMM.
    unsafe { libc::kill(pid as i32, signal) };
}

/// Blocks until process `pid` (not our child) has ended.
pub fn wait_for_exit(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0) };
    if fd < 0 {
        // Already gone.
        return;
    }
    let mut pollfd = libc::pollfd {
        fd: fd as i32,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls the pidfd we own; it becomes readable when the process ends.
    while unsafe { libc::poll(&mut pollfd, 1, -1) } < 0 {}
    // SAFETY: closes the pidfd we own.
    unsafe { libc::close(fd as i32) };
}

/// How a VMM said it ended, from its typed exit report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitReport {
    pub exit: String,
    /// Ended as asked (powered off, stopped, migrated), not by a fault.
    pub clean: bool,
}

/// The exit report of the current VMM process (each launch starts a new,
/// empty one); `None` when the VMM wrote none (it was killed, or crashed).
pub fn reported_exit(paths: &VmPaths) -> Option<ExitReport> {
    let file = std::fs::File::open(&paths.exit_report).ok()?;
    match vmm::launch::ExitReport::read_from(file) {
        Ok(report) => Some(ExitReport {
            exit: report.exit.to_string(),
            clean: report.exit.is_clean(),
        }),
        Err(vmm::launch::ReportError::Missing) => None,
        Err(e) => {
            tracing::warn!(report = %paths.exit_report.display(), "{e}");
            None
        }
    }
}

/// The VMM's last complaints (errors and warnings in its log), to say why it
/// failed to start or ended.
pub fn log_tail(paths: &VmPaths, lines: usize) -> String {
    let text = std::fs::read_to_string(&paths.log).unwrap_or_default();
    let mut tail: Vec<&str> = text
        .lines()
        .rev()
        .filter(|line| !line.starts_with('{'))
        .filter(|line| line.contains("error") || line.contains("ERROR") || line.contains("WARN"))
        .take(lines)
        .collect();
    tail.reverse();
    tail.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VMM gets the spec itself (one description), with only the
    /// resources the daemon places filled in.
    #[test]
    fn the_vmm_gets_the_spec_with_the_socket_the_daemon_places() {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "a", "kernel": "/k", "cpus": 2, "memory_mib": 64,
            "disks": [{"path": "/d", "readonly": true, "id": "data",
                       "rate_limit": {"bytes_per_sec": 1000000, "ops_per_sec": 100}}],
            "nics": [{"tap": "t0", "mac": "02:00:00:00:00:01",
                      "rate_limit": {"bytes_per_sec": 2000000, "bytes_burst": 4000000}}],
            "vsock": {"cid": 5},
            "rng": true,
            "balloon": {"target_mib": 16, "deflate_on_oom": true}
        }))
        .unwrap();
        let given = machine(&spec);
        let mut expected = spec.clone();
        // Relative: inside the VMM's own directory.
        expected.vsock.as_mut().unwrap().socket = Some(PathBuf::from("vsock.sock"));
        assert_eq!(given, expected);
        let embedded: VmSpec = serde_json::from_value(serde_json::json!({"name": "e"})).unwrap();
        assert_eq!(machine(&embedded), embedded);
    }
}
