//! The control socket of a running VM: one JSON request per line, one JSON
//! answer per line, over a Unix socket (`bulkhead run --control PATH`,
//! `bulkhead ctl PATH ...`). The host daemon will call [`VmControl`] directly.

use crate::devices::virtio::balloon::{BalloonHandle, BalloonStatus};
use crate::exit::ExitSignal;
use crate::memory_usage::MemoryUsage;
use crate::vm::DeviceReport;
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
    Balloon { target_mib: u64 },
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub state: &'static str,
    pub memory: MemoryUsage,
    pub balloon: Option<BalloonStatus>,
    pub devices: Vec<DeviceReport>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Response {
    Status { ok: bool, status: Status },
    Done { ok: bool },
    Error { ok: bool, error: String },
}

impl Response {
    fn error(message: impl Into<String>) -> Self {
        Response::Error {
            ok: false,
            error: message.into(),
        }
    }
}

/// What the host can do to a running VM.
#[derive(Clone)]
pub struct VmControl {
    pub(crate) balloon: Option<BalloonHandle>,
    pub(crate) memory_usage: Arc<dyn Fn() -> MemoryUsage + Send + Sync>,
    pub(crate) device_reports: Arc<dyn Fn() -> Vec<DeviceReport> + Send + Sync>,
    pub(crate) exit: Arc<ExitSignal>,
}

impl VmControl {
    pub fn status(&self) -> Status {
        Status {
            state: if self.exit.is_requested() {
                "stopping"
            } else {
                "running"
            },
            memory: (self.memory_usage)(),
            balloon: self.balloon.as_ref().map(BalloonHandle::status),
            devices: (self.device_reports)(),
        }
    }

    pub fn set_balloon_target(&self, mib: u64) -> Result<(), String> {
        match &self.balloon {
            Some(balloon) => {
                balloon.set_target_mib(mib);
                Ok(())
            }
            None => Err("this VM has no balloon (start it with --balloon)".into()),
        }
    }

    pub fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status {
                ok: true,
                status: self.status(),
            },
            Request::Balloon { target_mib } => match self.set_balloon_target(target_mib) {
                Ok(()) => Response::Done { ok: true },
                Err(e) => Response::error(e),
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
    while !control.exit.is_requested() {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: control.exit.event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two descriptors that outlive the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        match listener.accept() {
            Ok((stream, _)) => serve_client(stream, &control),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("control socket accept: {e}"),
        }
    }
    let _ = std::fs::remove_file(&path);
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

/// Sends one request to the control socket at `path` and returns the answer
/// line (the client side, used by `bulkhead ctl`).
pub fn request(path: &Path, request: &Request) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::VmExit;

    fn control() -> VmControl {
        VmControl {
            balloon: None,
            memory_usage: Arc::new(MemoryUsage::default),
            device_reports: Arc::new(Vec::new),
            exit: Arc::new(ExitSignal::new().unwrap()),
        }
    }

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
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"command":"balloon","target_mib":-1}"#).is_err()
        );
    }

    #[test]
    fn answers_over_the_socket_and_removes_it_when_the_vm_ends() {
        let path =
            std::env::temp_dir().join(format!("bulkhead-control-{}.sock", std::process::id()));
        let control = control();
        let exit = control.exit.clone();
        let thread = serve(&path, control).unwrap();
        let status = request(&path, &Request::Status).unwrap();
        assert_eq!(status["ok"], true);
        assert_eq!(status["status"]["state"], "running");
        let balloon = request(&path, &Request::Balloon { target_mib: 1 }).unwrap();
        assert_eq!(balloon["ok"], false);
        assert!(balloon["error"].as_str().unwrap().contains("no balloon"));
        // Garbage gets an error, and the server keeps serving.
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"{not json\n").unwrap();
        let mut answer = String::new();
        BufReader::new(&raw).read_line(&mut answer).unwrap();
        assert!(answer.contains("bad request"), "{answer}");
        // A second server on the same path is refused while the first lives.
        assert!(matches!(
            serve(&path, super::tests::control()),
            Err(ControlError::InUse { .. })
        ));
        exit.request(VmExit::Stopped);
        thread.join().unwrap();
        assert!(!path.exists());
    }
}
