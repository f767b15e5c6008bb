//! The control socket of a running VM: one JSON request per line, one JSON
//! answer per line, over a Unix socket (`bulkhead run --control PATH`,
//! `bulkhead ctl PATH ...`, and the host daemon).
//!
//! Both sides use the same types: [`Request`] and [`Response`] are
//! serialised and parsed each way, and a client gets a typed answer from
//! [`call`] (or [`status`]), never a JSON value to look fields up in.

use crate::devices::virtio::balloon::{BalloonHandle, BalloonStatus};
use crate::exit::ExitSignal;
use crate::lifecycle::LifecycleError;
use crate::memory_usage::MemoryUsage;
use crate::migration::{MigrateOptions, MigrationError, MigrationReport};
use crate::snapshot::SnapshotInfo;
use crate::vm::{RunningVm, Vm};
pub use crate::vm_core::LiveState;
use crate::vm_core::{DeviceReport, VmCore};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests longer than this are refused.
const MAX_REQUEST_BYTES: u64 = 64 << 10;

#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Balloon {
        target_mib: u64,
    },
    Pause,
    Resume,
    /// Presses Ctrl-Alt-Del on the guest's keyboard: the request to shut
    /// down that a guest acts on by itself (Linux reboots, an init system
    /// shuts down); the VM ends when the guest resets or powers off.
    CtrlAltDel,
    /// Presses the ACPI power button (PM1 PWRBTN_STS, and the SCI when the
    /// guest enabled the event). The answer says whether the guest listens
    /// to it (`armed`: an ACPI OS enabled PWRBTN_EN).
    PowerButton,
    /// Asks the guest to shut down the way it listens to: the ACPI power
    /// button when the guest armed it, else Ctrl-Alt-Del on its keyboard.
    /// The answer's `method` says which (`acpi_power_button`, `ctrl_alt_del`).
    Shutdown,
    /// Writes a snapshot to `path`, a directory that must not exist.
    Snapshot {
        path: PathBuf,
    },
    /// Live-migrates the VM; this process ends when the destination runs it.
    Migrate(MigrateOptions),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub state: LiveState,
    /// The VMM's process id (how a restarted host daemon finds its VMs).
    pub pid: u32,
    pub cpus: u8,
    pub memory_mib: u64,
    pub memory: MemoryUsage,
    pub balloon: Option<BalloonStatus>,
    pub devices: Vec<DeviceReport>,
    /// Each vCPU's exits by reason and emulated instructions, as of a
    /// fraction of a second ago.
    pub vcpus: Vec<crate::vcpu::VcpuReport>,
    /// An outgoing migration's progress, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::MigrationProgress>,
}

/// One answer. On the wire each variant is its own exact set of fields
/// (`ok` is false only in [`Response::Error`]), so parsing finds the one
/// variant that matches and refuses anything else.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Response {
    Status {
        ok: bool,
        status: Status,
    },
    Snapshot {
        ok: bool,
        snapshot: SnapshotInfo,
        pause_ms: f64,
    },
    Migrated {
        ok: bool,
        migration: MigrationReport,
    },
    PowerButton {
        ok: bool,
        armed: bool,
    },
    Shutdown {
        ok: bool,
        method: ShutdownMethod,
    },
    Done {
        ok: bool,
    },
    Error {
        ok: bool,
        error: String,
    },
}

impl Response {
    /// The `ok` every answer carries: false only in a refusal.
    fn is_ok(&self) -> bool {
        match self {
            Response::Status { ok, .. }
            | Response::Snapshot { ok, .. }
            | Response::Migrated { ok, .. }
            | Response::PowerButton { ok, .. }
            | Response::Shutdown { ok, .. }
            | Response::Done { ok }
            | Response::Error { ok, .. } => *ok,
        }
    }

    fn error(message: impl Into<String>) -> Self {
        Response::Error {
            ok: false,
            error: message.into(),
        }
    }

    fn done(result: Result<(), impl std::fmt::Display>) -> Self {
        match result {
            Ok(()) => Response::Done { ok: true },
            Err(e) => Response::error(e.to_string()),
        }
    }
}

/// How a [`Request::Shutdown`] asked the guest.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMethod {
    AcpiPowerButton,
    CtrlAltDel,
}

impl Vm {
    /// The host's handle on this VM, usable before it starts (so the control
    /// socket can be bound before a sandbox takes the right to bind it away).
    pub fn control(&self) -> VmControl {
        VmControl::new(self.core.clone())
    }
}

impl RunningVm {
    /// What the host can do to this VM while it runs (the control socket's
    /// way in).
    pub fn control(&self) -> VmControl {
        self.vm.control()
    }
}

/// What the host can do to a running VM.
#[derive(Clone)]
pub struct VmControl {
    core: Arc<VmCore>,
}

impl VmControl {
    pub(crate) fn new(core: Arc<VmCore>) -> Self {
        VmControl { core }
    }

    fn exit(&self) -> &ExitSignal {
        &self.core.shared.exit
    }

    pub fn status(&self) -> Status {
        Status {
            state: self.core.live_state(),
            pid: std::process::id(),
            cpus: self.core.machine.cpus,
            memory_mib: self.core.machine.memory_mib,
            memory: crate::memory_usage::measure(&self.core.shared.memory),
            balloon: self.core.balloon.as_ref().map(BalloonHandle::status),
            devices: crate::vm_core::device_reports(&self.core.virtio),
            vcpus: crate::devices::lock(&self.core.shared.live_reports)
                .values()
                .cloned()
                .collect(),
            migration: crate::devices::lock(&self.core.migration).clone(),
        }
    }

    pub fn set_balloon_target(&self, mib: u64) -> Result<(), String> {
        match &self.core.balloon {
            Some(balloon) => {
                balloon.set_target_mib(mib);
                Ok(())
            }
            None => Err("this VM has no balloon (start it with --balloon)".into()),
        }
    }

    /// Presses the ACPI power button; returns whether the guest listens to it.
    pub fn press_power_button(&self) -> bool {
        let mut pm1 = crate::devices::lock(&self.core.board.pm1);
        pm1.press_power_button();
        pm1.power_button_armed()
    }

    /// Whether an ACPI OS in the guest enabled the power button event.
    pub fn power_button_armed(&self) -> bool {
        crate::devices::lock(&self.core.board.pm1).power_button_armed()
    }

    /// Asks the guest to shut down: the ACPI power button if the guest
    /// armed it, else Ctrl-Alt-Del on the keyboard.
    pub fn shutdown(&self) -> ShutdownMethod {
        {
            let mut pm1 = crate::devices::lock(&self.core.board.pm1);
            if pm1.power_button_armed() {
                pm1.press_power_button();
                return ShutdownMethod::AcpiPowerButton;
            }
        }
        crate::devices::lock(&self.core.board.keyboard).press_ctrl_alt_del();
        ShutdownMethod::CtrlAltDel
    }

    pub fn pause(&self) -> Result<(), LifecycleError> {
        self.core.pause()
    }

    pub fn resume(&self) -> Result<(), LifecycleError> {
        self.core.resume()
    }

    pub fn snapshot(&self, path: &Path) -> Result<SnapshotInfo, LifecycleError> {
        self.core.snapshot(path)
    }

    pub fn migrate(&self, options: &MigrateOptions) -> Result<MigrationReport, MigrationError> {
        self.core.migrate(options)
    }

    pub fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status {
                ok: true,
                status: self.status(),
            },
            Request::Balloon { target_mib } => Response::done(self.set_balloon_target(target_mib)),
            Request::Pause => Response::done(self.pause()),
            Request::Resume => Response::done(self.resume()),
            Request::CtrlAltDel => {
                crate::devices::lock(&self.core.board.keyboard).press_ctrl_alt_del();
                Response::Done { ok: true }
            }
            Request::PowerButton => Response::PowerButton {
                ok: true,
                armed: self.press_power_button(),
            },
            Request::Shutdown => Response::Shutdown {
                ok: true,
                method: self.shutdown(),
            },
            Request::Snapshot { path } => {
                let started = std::time::Instant::now();
                match self.snapshot(&path) {
                    Ok(snapshot) => Response::Snapshot {
                        ok: true,
                        snapshot,
                        pause_ms: started.elapsed().as_secs_f64() * 1e3,
                    },
                    Err(e) => Response::error(e.to_string()),
                }
            }
            Request::Migrate(options) => match self.migrate(&options) {
                Ok(migration) => Response::Migrated {
                    ok: true,
                    migration,
                },
                Err(e) => Response::error(format!("migration failed, the VM runs on here: {e}")),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path} is in use by another VM")]
    InUse { path: String },
    #[error("cannot create control socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start the control thread: {0}")]
    Thread(std::io::Error),
}

/// Serves `control` on a Unix socket at `path` until the VM exits, then
/// removes the socket.
pub fn serve(path: &Path, control: VmControl) -> Result<JoinHandle<()>, ControlError> {
    let name = path.display().to_string();
    if path.exists() {
        // A socket nobody answers on is left from a VM that died: replace it.
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse { path: name });
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: name.clone(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ControlError::Bind { path: name, source })?;
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, path, control))
        .map_err(ControlError::Thread)
}

fn accept_loop(listener: UnixListener, path: PathBuf, control: VmControl) {
    accept_until_exit(&listener, control.exit(), |stream| {
        // One thread per client: a status request is answered while a
        // migration or snapshot runs.
        let control = control.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || serve_client(stream, &control));
        if let Err(e) = spawned {
            tracing::warn!("cannot serve a control client: {e}");
        }
    });
    let _ = std::fs::remove_file(&path);
}

/// Hands each client of a non-blocking `listener` to `on_client` until the
/// VM exits.
pub(crate) fn accept_until_exit(
    listener: &UnixListener,
    exit: &ExitSignal,
    mut on_client: impl FnMut(UnixStream),
) {
    while !exit.is_requested() {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: exit.event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two descriptors that outlive the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        match listener.accept() {
            Ok((stream, _)) => on_client(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("accept on {listener:?}: {e}"),
        }
    }
}

fn serve_client(stream: UnixStream, control: &VmControl) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut reader = BufReader::new(std::io::Read::take(&stream, MAX_REQUEST_BYTES));
    let mut line = String::new();
    let response = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) if !line.ends_with('\n') => {
            Response::error("request too long or not ended by a newline")
        }
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => control.handle(request),
            Err(e) => Response::error(format!("bad request: {e}")),
        },
        Err(e) => Response::error(format!("cannot read the request: {e}")),
    };
    let mut answer = serde_json::to_string(&response).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"error\":\"cannot encode the answer: {e}\"}}")
    });
    answer.push('\n');
    let _ = (&stream).write_all(answer.as_bytes());
}

/// Why a control request got no answer it could use.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the VMM does not answer: {0}")]
    Io(#[from] std::io::Error),
    /// The VMM answered `ok: false`; its reason.
    #[error("{0}")]
    Refused(String),
    #[error("the VMM's answer is not one the control protocol has: {0}")]
    Malformed(String),
    #[error("the VMM answered {answer} to {request}")]
    Unexpected { request: String, answer: String },
}

/// The longest answer a client reads (a status with many devices and vCPUs
/// is a few KiB).
const MAX_ANSWER_BYTES: u64 = 1 << 20;

/// Sends one request to the control socket at `path` and returns the VMM's
/// typed answer; an `ok: false` answer is [`CallError::Refused`]. Migrations
/// and snapshots take as long as they take; other requests get 30 s.
pub fn call(path: &Path, request: &Request) -> Result<Response, CallError> {
    let mut stream = UnixStream::connect(path)?;
    let timeout = match request {
        Request::Migrate(_) | Request::Snapshot { .. } => None,
        _ => Some(Duration::from_secs(30)),
    };
    stream.set_read_timeout(timeout)?;
    let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_ANSWER_BYTES)).read_line(&mut answer)?;
    parse_answer(request, &answer)
}

/// Parses an answer line to `request`: one of the protocol's answers, and
/// one that fits what was asked.
fn parse_answer(request: &Request, line: &str) -> Result<Response, CallError> {
    let response: Response =
        serde_json::from_str(line).map_err(|e| CallError::Malformed(e.to_string()))?;
    let fits = match (&response, request) {
        (Response::Error { ok: false, error }, _) => return Err(CallError::Refused(error.clone())),
        (Response::Status { .. }, Request::Status)
        | (Response::Snapshot { .. }, Request::Snapshot { .. })
        | (Response::Migrated { .. }, Request::Migrate(_))
        | (Response::PowerButton { .. }, Request::PowerButton)
        | (Response::Shutdown { .. }, Request::Shutdown) => true,
        (
            Response::Done { .. },
            Request::Balloon { .. } | Request::Pause | Request::Resume | Request::CtrlAltDel,
        ) => true,
        _ => false,
    };
    if !fits || !response.is_ok() {
        return Err(mismatch(request, &response));
    }
    Ok(response)
}

fn mismatch(request: &Request, answer: &Response) -> CallError {
    CallError::Unexpected {
        request: serde_json::to_string(request).unwrap_or_default(),
        answer: serde_json::to_string(answer).unwrap_or_default(),
    }
}

/// The VMM's status.
pub fn status(path: &Path) -> Result<Status, CallError> {
    let request = Request::Status;
    match call(path, &request)? {
        Response::Status { status, .. } => Ok(status),
        other => Err(mismatch(&request, &other)),
    }
}

/// Writes a snapshot; returns what was written and how long the VM paused.
pub fn snapshot(path: &Path, to: &Path) -> Result<(SnapshotInfo, f64), CallError> {
    let request = Request::Snapshot { path: to.into() };
    match call(path, &request)? {
        Response::Snapshot {
            snapshot, pause_ms, ..
        } => Ok((snapshot, pause_ms)),
        other => Err(mismatch(&request, &other)),
    }
}

/// Live-migrates the VM; returns the source's report once the destination runs it.
pub fn migrate(path: &Path, options: MigrateOptions) -> Result<MigrationReport, CallError> {
    let request = Request::Migrate(options);
    match call(path, &request)? {
        Response::Migrated { migration, .. } => Ok(migration),
        other => Err(mismatch(&request, &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_refuses_unknown_ones() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"balloon","target_mib":64}"#).unwrap(),
            Request::Balloon { target_mib: 64 }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"snapshot","path":"/s"}"#).unwrap(),
            Request::Snapshot { path: "/s".into() }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"power_button"}"#).unwrap(),
            Request::PowerButton
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"shutdown"}"#).unwrap(),
            Request::Shutdown
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"command":"snapshot"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"command":"balloon","target_mib":-1}"#).is_err()
        );
    }

    #[test]
    fn answers_parse_back_to_their_variant_and_must_fit_the_request() {
        let parse = |request: &Request, line: &str| parse_answer(request, line);
        assert_eq!(
            parse(&Request::Pause, r#"{"ok":true}"#).unwrap(),
            Response::Done { ok: true }
        );
        assert_eq!(
            parse(&Request::Shutdown, r#"{"ok":true,"method":"ctrl_alt_del"}"#).unwrap(),
            Response::Shutdown {
                ok: true,
                method: ShutdownMethod::CtrlAltDel
            }
        );
        // A refusal carries its reason, whatever was asked.
        assert!(matches!(
            parse(&Request::Status, r#"{"ok":false,"error":"no balloon"}"#),
            Err(CallError::Refused(reason)) if reason == "no balloon"
        ));
        // An answer of another request, a success that says ok: false, an
        // unknown field, and garbage are each refused.
        assert!(matches!(
            parse(&Request::Status, r#"{"ok":true}"#),
            Err(CallError::Unexpected { .. })
        ));
        assert!(matches!(
            parse(&Request::Pause, r#"{"ok":false}"#),
            Err(CallError::Unexpected { .. })
        ));
        assert!(matches!(
            parse(&Request::Pause, r#"{"ok":true,"extra":1}"#),
            Err(CallError::Malformed(_))
        ));
        assert!(matches!(
            parse(&Request::Pause, "not json"),
            Err(CallError::Malformed(_))
        ));
    }

    #[test]
    fn a_status_goes_over_the_wire_and_back_unchanged() {
        let status = Status {
            state: LiveState::Paused,
            pid: 7,
            cpus: 2,
            memory_mib: 256,
            memory: MemoryUsage {
                process_rss_kib: 3,
                guest_resident_kib: 2,
                vmm_overhead_kib: 1,
            },
            balloon: Some(BalloonStatus {
                target_mib: 64,
                ..BalloonStatus::default()
            }),
            devices: vec![DeviceReport {
                name: "virtio-blk".into(),
                state: crate::vm::DeviceState::NeedsReset,
                counters: [("reads".to_string(), 3)].into(),
            }],
            vcpus: vec![crate::vcpu::VcpuReport::default()],
            migration: Some(crate::migration::MigrationProgress {
                phase: crate::migration::MigrationPhase::StopAndCopy,
                round: 3,
                ..Default::default()
            }),
        };
        let line = serde_json::to_string(&Response::Status { ok: true, status }).unwrap();
        assert!(line.contains(r#""state":"paused""#), "{line}");
        assert!(line.contains(r#""state":"needs_reset""#), "{line}");
        let Response::Status { status: back, .. } = parse_answer(&Request::Status, &line).unwrap()
        else {
            panic!("not a status");
        };
        assert_eq!(
            serde_json::to_string(&Response::Status {
                ok: true,
                status: back
            })
            .unwrap(),
            line
        );
    }

    #[test]
    fn shutdown_and_power_button_answers() {
        let answer = |response: Response| serde_json::to_string(&response).unwrap();
        assert_eq!(
            answer(Response::Shutdown {
                ok: true,
                method: ShutdownMethod::AcpiPowerButton
            }),
            r#"{"ok":true,"method":"acpi_power_button"}"#
        );
        assert_eq!(
            answer(Response::Shutdown {
                ok: true,
                method: ShutdownMethod::CtrlAltDel
            }),
            r#"{"ok":true,"method":"ctrl_alt_del"}"#
        );
        assert_eq!(
            answer(Response::PowerButton {
                ok: true,
                armed: false
            }),
            r#"{"ok":true,"armed":false}"#
        );
    }
}
