//! How the daemon hands a VMM its machine: one datagram on a Unix socket the
//! VMM inherits (`bulkhead run --launch-fd N`), carrying a typed
//! [`LaunchPlan`] as JSON and, attached (`SCM_RIGHTS`), every host resource
//! the VM needs, already resolved, opened and locked by the daemon.
//!
//! The VMM started this way opens no host path. It takes the descriptors,
//! checks each is the kind the plan says ([`crate::backing`]), confines
//! itself, and only then reads what a tenant or a peer controls: a snapshot
//! in its own directory, or a migration stream on the listener it was given.
//!
//! Descriptors come in this order, each present only when the plan needs it:
//! KVM, the exit report, kernel, initrd, the machine's disks, its TAPs, its
//! vsock listener, the migration listener.
//!
//! The exit report is a file the daemon created empty, outside the VMM's
//! reach by path. The VMM writes one typed [`ExitReport`] to it as it ends
//! (or fails to start), so the daemon learns how its VMM ended without
//! reading the VMM's log, where a guest's doings may show up.

use crate::config::VmSpec;
use crate::sandbox::SandboxConfig;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Raised when a field is added that an older VMM must not ignore.
pub const VERSION: u32 = 2;
/// A plan is a few KiB; anything near this is not one.
pub const MAX_PLAN_BYTES: usize = 64 << 10;
/// KVM, exit report, kernel, initrd, migration listener, and every device a
/// machine can have.
pub const MAX_DESCRIPTORS: usize = 5 + crate::arch::x86_64::layout::irq::VIRTIO.len();
/// An exit report is a few hundred bytes; a fatal error's text is cut to fit.
pub const MAX_REPORT_BYTES: usize = 16 << 10;
/// Raised when the report changes in a way an older daemon must not misread.
pub const REPORT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("launch socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("launch plan: {0}")]
    Plan(String),
    #[error("launch plan version {got}; this VMM takes version {VERSION}")]
    Version { got: u32 },
    #[error("launch plan needs {needed} descriptors, {got} came with it")]
    Descriptors { needed: usize, got: usize },
}

/// Everything a VMM needs to know that is not in its descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchPlan {
    pub version: u32,
    /// The machine as the daemon records it. For a boot, `cmdline` is the
    /// user's (the VMM appends host and device options); for a restore or a
    /// migration, the devices the guest's state is rebuilt onto.
    pub machine: VmSpec,
    pub boot: BootPlan,
    pub origin: LaunchOrigin,
    /// Who the VMM becomes before it reads anything hostile.
    pub sandbox: SandboxConfig,
    /// Where the VMM serves its control and console sockets, relative to its
    /// directory (which becomes its root).
    pub control: PathBuf,
    pub console: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootPlan {
    /// A kernel descriptor comes with the plan; otherwise the VMM boots its embedded guest.
    pub kernel: bool,
    pub initrd: bool,
    /// Append the options this host's KVM needs to the command line.
    pub host_cmdline_options: bool,
    pub prefault_memory: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LaunchOrigin {
    Boot,
    /// A snapshot in the VMM's own `snapshots` directory, read after confinement.
    Restore {
        snapshot: String,
    },
    /// A live migration arriving on the listener passed last, from `source`
    /// only (other peers are dropped unheard), within `timeout_secs`.
    Incoming(ExpectedSource),
}

/// Who may migrate a VM in, and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedSource {
    /// The source host's address: a connection from any other is dropped.
    pub source: std::net::IpAddr,
    /// No migration within this long ends the VMM.
    pub timeout_secs: u64,
    /// The stream is TLS with this identity (the host's), and mutual when
    /// the source must present a certificate of the host's CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::migration::TlsServer>,
}

impl LaunchPlan {
    /// How many descriptors come with this plan, in the module's order.
    pub fn descriptor_count(&self) -> usize {
        let boot = matches!(self.origin, LaunchOrigin::Boot);
        2 + usize::from(boot && self.boot.kernel)
            + usize::from(boot && self.boot.initrd)
            + self.machine.disks.len()
            + self.machine.nics.len()
            + usize::from(self.machine.vsock.is_some())
            + usize::from(matches!(self.origin, LaunchOrigin::Incoming(_)))
    }

    fn check(&self) -> Result<(), LaunchError> {
        if self.version != VERSION {
            return Err(LaunchError::Version { got: self.version });
        }
        if let LaunchOrigin::Restore { snapshot } = &self.origin {
            if !is_plain_name(snapshot) {
                return Err(LaunchError::Plan(format!(
                    "snapshot name '{snapshot}' is not a plain file name"
                )));
            }
        }
        for (what, path) in [("control", &self.control), ("console", &self.console)] {
            if !path.to_str().is_some_and(is_plain_name) {
                return Err(LaunchError::Plan(format!(
                    "{what} socket '{}' is not a plain file name",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Sends `plan` with `descriptors` (in the module's order) on `socket`.
pub fn send(
    socket: &UnixDatagram,
    plan: &LaunchPlan,
    descriptors: &[RawFd],
) -> Result<(), LaunchError> {
    let needed = plan.descriptor_count();
    if descriptors.len() != needed {
        return Err(LaunchError::Descriptors {
            needed,
            got: descriptors.len(),
        });
    }
    let bytes = serde_json::to_vec(plan).map_err(|e| LaunchError::Plan(e.to_string()))?;
    if bytes.len() > MAX_PLAN_BYTES {
        return Err(LaunchError::Plan(format!(
            "{} bytes, more than {MAX_PLAN_BYTES}",
            bytes.len()
        )));
    }
    socket
        .send_with_fds(&[&bytes[..]], descriptors)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    Ok(())
}

/// Receives the plan and its descriptors from inherited descriptor `fd`,
/// which is closed afterwards.
pub fn receive_from_fd(fd: RawFd) -> Result<(LaunchPlan, Vec<OwnedFd>), LaunchError> {
    // SAFETY: F_GETFD only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(LaunchError::Plan(format!(
            "descriptor {fd} is not open: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is open (checked above) and was handed to this process to
    // own; nothing else in it uses that number.
    let socket = unsafe { UnixDatagram::from_raw_fd(fd) };
    receive(&socket)
}

/// Receives one plan and its descriptors.
pub fn receive(socket: &UnixDatagram) -> Result<(LaunchPlan, Vec<OwnedFd>), LaunchError> {
    let mut buffer = vec![0u8; MAX_PLAN_BYTES + 1];
    let (length, descriptors) = crate::descriptors::receive(socket, &mut buffer, MAX_DESCRIPTORS)?;
    if length > MAX_PLAN_BYTES {
        return Err(LaunchError::Plan(format!(
            "more than {MAX_PLAN_BYTES} bytes"
        )));
    }
    let plan: LaunchPlan =
        serde_json::from_slice(&buffer[..length]).map_err(|e| LaunchError::Plan(e.to_string()))?;
    plan.check()?;
    let needed = plan.descriptor_count();
    if descriptors.len() != needed {
        return Err(LaunchError::Descriptors {
            needed,
            got: descriptors.len(),
        });
    }
    for fd in &descriptors {
        // Received descriptors are not close-on-exec; ours never exec, but
        // nothing should outlive this process by accident.
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((plan, descriptors))
}

/// How a launched VMM ended: the one message it writes to its report
/// descriptor, last thing before it exits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitReport {
    pub version: u32,
    pub exit: crate::exit::VmExit,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("exit report: {0}")]
    Io(#[from] std::io::Error),
    #[error("exit report is empty: the VMM ended without writing one")]
    Missing,
    #[error("exit report is larger than {MAX_REPORT_BYTES} bytes")]
    TooLarge,
    #[error("exit report version {got}; this daemon reads version {REPORT_VERSION}")]
    Version { got: u32 },
    #[error("exit report is malformed: {0}")]
    Malformed(String),
}

impl ExitReport {
    pub fn new(exit: crate::exit::VmExit) -> Self {
        ExitReport {
            version: REPORT_VERSION,
            exit,
        }
    }

    /// Writes the report over whatever `file` held, cutting a fatal error's
    /// text so the whole report stays under [`MAX_REPORT_BYTES`].
    pub fn write_to(&self, file: &mut std::fs::File) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        let mut report = self.clone();
        if let crate::exit::VmExit::Fatal(reason) = &mut report.exit {
            let mut end = reason.len().min(MAX_REPORT_BYTES / 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        let bytes = serde_json::to_vec(&report).map_err(std::io::Error::other)?;
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(&bytes)?;
        file.sync_data()
    }

    /// Reads a report as a daemon does: bounded, typed, versioned.
    pub fn read_from(reader: impl std::io::Read) -> Result<ExitReport, ReportError> {
        use std::io::Read;
        let mut bytes = Vec::new();
        reader
            .take(MAX_REPORT_BYTES as u64 + 1)
            .read_to_end(&mut bytes)?;
        if bytes.is_empty() {
            return Err(ReportError::Missing);
        }
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge);
        }
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let versioned: Versioned =
            serde_json::from_slice(&bytes).map_err(|e| ReportError::Malformed(e.to_string()))?;
        if versioned.version != REPORT_VERSION {
            return Err(ReportError::Version {
                got: versioned.version,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ReportError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn plan() -> LaunchPlan {
        LaunchPlan {
            version: VERSION,
            machine: VmSpec {
                kernel: Some("vmlinux".into()),
                cmdline: Some("console=ttyS0".into()),
                ..VmSpec::named("m")
            },
            boot: BootPlan {
                kernel: true,
                ..BootPlan::default()
            },
            origin: LaunchOrigin::Boot,
            sandbox: SandboxConfig {
                uid: 1000,
                gid: 1000,
            },
            control: "control.sock".into(),
            console: "console.sock".into(),
        }
    }

    fn file_with(text: &str) -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "bulkhead-launch-{}-{}",
            std::process::id(),
            text.len()
        ));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn a_plan_and_its_descriptors_arrive_together_and_in_order() {
        let (daemon, vmm) = UnixDatagram::pair().unwrap();
        let kvm = file_with("kvm");
        let report = file_with("");
        let kernel = file_with("kernel!");
        let sent = [kvm.as_raw_fd(), report.as_raw_fd(), kernel.as_raw_fd()];
        send(&daemon, &plan(), &sent).unwrap();
        let (got, descriptors) = receive(&vmm).unwrap();
        assert_eq!(got, plan());
        let mut texts = Vec::new();
        for fd in descriptors {
            let mut file = std::fs::File::from(fd);
            file.rewind().unwrap();
            let mut text = String::new();
            file.read_to_string(&mut text).unwrap();
            texts.push(text);
        }
        assert_eq!(texts, ["kvm", "", "kernel!"]);
    }

    #[test]
    fn a_plan_with_too_few_descriptors_is_refused_by_the_receiver() {
        let (daemon, vmm) = UnixDatagram::pair().unwrap();
        let kvm = file_with("kvm");
        // Sent around `send`'s own check.
        let bytes = serde_json::to_vec(&plan()).unwrap();
        daemon
            .send_with_fds(&[&bytes[..]], &[kvm.as_raw_fd()])
            .unwrap();
        let error = receive(&vmm).unwrap_err();
        assert!(
            matches!(error, LaunchError::Descriptors { needed: 3, got: 1 }),
            "{error}"
        );
    }

    #[test]
    fn a_snapshot_or_socket_name_that_leaves_the_directory_is_refused() {
        for bad in ["../outside", "/etc/passwd", "a/b", "..", ""] {
            let mut restore = plan();
            restore.origin = LaunchOrigin::Restore {
                snapshot: bad.into(),
            };
            assert!(restore.check().is_err(), "snapshot {bad:?}");
            let mut control = plan();
            control.control = bad.into();
            assert!(control.check().is_err(), "control {bad:?}");
        }
        assert!(plan().check().is_ok());
    }

    #[test]
    fn another_version_and_garbage_are_refused_with_the_reason() {
        let (daemon, vmm) = UnixDatagram::pair().unwrap();
        let mut newer = plan();
        newer.version = VERSION + 1;
        daemon.send(&serde_json::to_vec(&newer).unwrap()).unwrap();
        assert!(matches!(
            receive(&vmm).unwrap_err(),
            LaunchError::Version { got } if got == VERSION + 1
        ));
        daemon
            .send(b"{\"version\": 1, \"path\": \"/etc\"}")
            .unwrap();
        assert!(matches!(receive(&vmm).unwrap_err(), LaunchError::Plan(_)));
        daemon.send(&vec![b' '; MAX_PLAN_BYTES + 10]).unwrap();
        let error = receive(&vmm).unwrap_err();
        assert!(error.to_string().contains("more than"), "{error}");
    }

    #[test]
    fn descriptors_count_by_origin() {
        let mut p = plan();
        p.boot.initrd = true;
        assert_eq!(p.descriptor_count(), 4);
        // A restore loads no kernel.
        p.origin = LaunchOrigin::Restore {
            snapshot: "s".into(),
        };
        assert_eq!(p.descriptor_count(), 2);
        p.origin = LaunchOrigin::Incoming(ExpectedSource {
            source: "192.0.2.1".parse().unwrap(),
            timeout_secs: 60,
            tls: None,
        });
        assert_eq!(p.descriptor_count(), 3);
        // One per disk, per NIC, and the vsock listener.
        let disk = crate::config::DiskSpec {
            path: "d".into(),
            readonly: false,
            id: None,
            rate_limit: Default::default(),
        };
        p.machine.disks = vec![disk; 3];
        p.machine.nics = vec![crate::config::NicSpec {
            tap: "t".into(),
            mac: None,
            rate_limit: Default::default(),
        }];
        p.machine.vsock = Some(crate::config::VsockSpec {
            cid: 3,
            socket: Some("v".into()),
        });
        assert_eq!(p.descriptor_count(), 3 + 3 + 1 + 1);
    }

    #[test]
    fn an_exit_report_is_written_over_the_file_and_read_back_typed() {
        use crate::exit::VmExit;
        let mut file = file_with("left over from before");
        for exit in [
            VmExit::PowerOff,
            VmExit::TripleFault { vcpu: 1 },
            VmExit::Fatal("cannot restore".into()),
        ] {
            ExitReport::new(exit.clone()).write_to(&mut file).unwrap();
            file.rewind().unwrap();
            assert_eq!(ExitReport::read_from(&file).unwrap().exit, exit);
            file.rewind().unwrap();
        }
    }

    #[test]
    fn a_report_of_exactly_the_bound_is_read() {
        let report = r#"{"version":1,"exit":"power_off"}"#;
        let padded = format!("{report:<MAX_REPORT_BYTES$}");
        assert_eq!(padded.len(), MAX_REPORT_BYTES);
        assert_eq!(
            ExitReport::read_from(padded.as_bytes()).unwrap().exit,
            crate::exit::VmExit::PowerOff
        );
    }

    #[test]
    fn a_long_fatal_reason_is_cut_to_fit_the_bound() {
        let mut file = file_with("");
        // An odd start puts the cut inside a two-byte character.
        let reason = format!("a{}", "é".repeat(MAX_REPORT_BYTES));
        ExitReport::new(crate::exit::VmExit::Fatal(reason))
            .write_to(&mut file)
            .unwrap();
        file.rewind().unwrap();
        let crate::exit::VmExit::Fatal(kept) = ExitReport::read_from(&file).unwrap().exit else {
            panic!("not fatal");
        };
        assert_eq!(kept.len(), MAX_REPORT_BYTES / 2 - 1);
    }

    #[test]
    fn a_missing_oversized_foreign_or_malformed_report_is_refused_by_name() {
        let read = |text: &str| ExitReport::read_from(text.as_bytes()).unwrap_err();
        assert!(matches!(read(""), ReportError::Missing));
        assert!(matches!(
            read(&" ".repeat(MAX_REPORT_BYTES + 1)),
            ReportError::TooLarge
        ));
        assert!(matches!(
            read(r#"{"version":2,"exit":"power_off"}"#),
            ReportError::Version { got: 2 }
        ));
        // The log line older VMMs printed is not a report.
        assert!(matches!(
            read(r#"{"exit":"guest powered off","clean":true}"#),
            ReportError::Malformed(_)
        ));
        assert!(matches!(
            read(r#"{"version":1,"exit":"power_off","clean":true}"#),
            ReportError::Malformed(_)
        ));
        assert!(matches!(
            read(r#"{"version":1,"exit":"explode"}"#),
            ReportError::Malformed(_)
        ));
    }
}
