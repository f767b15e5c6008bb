//! One VMM process per VM: where its files live, how it is started
//! (sandboxed, in its cgroup, in a session of its own so that it outlives
//! the daemon), how the daemon finds it again, and how it ended.

use crate::cgroup::VmCgroup;
use crate::spec::VmSpec;
use std::ffi::OsString;
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
    /// The VMM's stderr: its log and, last, its JSON exit report.
    pub log: PathBuf,
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
    /// `tcp:HOST:PORT` to wait on.
    Incoming(String),
}

/// The `bulkhead run` arguments for `spec`. Paths are relative: the VMM
/// starts in its jail directory, which becomes its root.
pub fn run_arguments(spec: &VmSpec, uid: u32, origin: &Origin) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into()];
    match origin {
        Origin::Boot => boot_arguments(spec, &mut args),
        Origin::Restore(name) => {
            args.push("--restore".into());
            args.push(format!("snapshots/{name}").into());
        }
        Origin::Incoming(uri) => {
            args.push("--incoming".into());
            args.push(uri.into());
        }
    }
    for (flag, value) in [
        ("--control", "control.sock".to_string()),
        ("--console-socket", "console.sock".to_string()),
        ("--sandbox", format!("uid={uid},gid={uid}")),
        ("--output", "json".to_string()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args
}

fn boot_arguments(spec: &VmSpec, args: &mut Vec<OsString>) {
    let mut push = |flag: &str, value: OsString| {
        args.push(flag.into());
        args.push(value);
    };
    if let Some(kernel) = &spec.kernel {
        push("--kernel", kernel.into());
    }
    if let Some(initrd) = &spec.initrd {
        push("--initrd", initrd.into());
    }
    if let Some(cmdline) = &spec.cmdline {
        push("--cmdline", cmdline.into());
    }
    push("--cpus", spec.cpus.to_string().into());
    push("--memory", spec.memory_mib.to_string().into());
    for disk in &spec.disks {
        let mut value = OsString::from("path=");
        value.push(&disk.path);
        if disk.readonly {
            value.push(",readonly");
        }
        push("--disk", value);
    }
    for nic in &spec.nics {
        let mut value = format!("tap={}", nic.tap);
        if let Some(mac) = &nic.mac {
            value.push_str(&format!(",mac={mac}"));
        }
        push("--net", value.into());
    }
    if let Some(vsock) = &spec.vsock {
        push(
            "--vsock",
            format!("cid={},socket=vsock.sock", vsock.cid).into(),
        );
    }
}

/// Prepares the VM's directories and starts its VMM.
pub fn launch(
    binary: &Path,
    id: &str,
    paths: &VmPaths,
    spec: &VmSpec,
    uid: u32,
    origin: &Origin,
    cgroup: Option<&VmCgroup>,
) -> std::io::Result<Child> {
    std::fs::create_dir_all(&paths.jail)?;
    std::os::unix::fs::chown(&paths.jail, Some(uid), Some(uid))?;
    std::fs::set_permissions(
        &paths.jail,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    for stale in [&paths.control, &paths.console] {
        let _ = std::fs::remove_file(stale);
    }
    // The previous run's log is kept beside; this run's report must be the
    // only one in `vmm.log`.
    if paths.log.exists() {
        std::fs::rename(&paths.log, paths.log.with_extension("log.1"))?;
    }
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
        .args(run_arguments(spec, uid, origin))
        .current_dir(&paths.jail)
        .env_clear()
        .env(VM_ID_ENV, id)
        .env("BULKHEAD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: between fork and exec the child only makes system calls
    // (setsid, write) on descriptors opened before the fork; nothing allocates.
    unsafe {
        command.pre_exec(move || {
            // Its own session: the daemon's terminal and process group
            // signals do not reach it, and it outlives the daemon.
            libc::setsid();
            crate::cgroup::join_from_child(&cgroup_files)
        });
    }
    command.spawn()
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

/// How a VMM said it ended, in the JSON report it writes last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitReport {
    pub exit: String,
    /// Ended as asked (powered off, stopped, migrated), not by a fault.
    pub clean: bool,
}

/// The report of the current VMM process (the log is rotated at each start).
pub fn reported_exit(paths: &VmPaths) -> Option<ExitReport> {
    let text = std::fs::read_to_string(&paths.log).ok()?;
    text.lines().rev().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(ExitReport {
            exit: value.get("exit")?.as_str()?.to_string(),
            clean: value.get("clean")?.as_bool()?,
        })
    })
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

    #[test]
    fn arguments_carry_the_whole_spec_and_the_sandbox() {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "a", "kernel": "/k", "cpus": 2, "memory_mib": 64,
            "disks": [{"path": "/d", "readonly": true}],
            "nics": [{"tap": "t0", "mac": "02:00:00:00:00:01"}],
            "vsock": {"cid": 5}
        }))
        .unwrap();
        let args: Vec<String> = run_arguments(&spec, 400_001, &Origin::Boot)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for expected in [
            "run --kernel /k --cpus 2 --memory 64",
            "--disk path=/d,readonly",
            "--net tap=t0,mac=02:00:00:00:00:01",
            "--vsock cid=5,socket=vsock.sock",
            "--sandbox uid=400001,gid=400001",
        ] {
            assert!(joined.contains(expected), "{joined}");
        }
        let restore = run_arguments(&spec, 1, &Origin::Restore("s1".into()));
        let joined = restore
            .join(std::ffi::OsStr::new(" "))
            .into_string()
            .unwrap();
        assert!(
            joined.starts_with("run --restore snapshots/s1 --control"),
            "{joined}"
        );
        assert!(!joined.contains("--kernel"));
    }
}
