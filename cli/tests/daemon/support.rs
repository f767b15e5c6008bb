//! A `bulkhead serve` of the test's own (state directory, socket, VMMs),
//! and a blocking API client for it.

use host::client::{Answer, Client, Endpoint};
use hyper::Method;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");

pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub images: PathBuf,
    /// Extra `bulkhead serve` arguments.
    pub extra: Vec<String>,
    /// The network namespace the daemon (and so its VMMs) runs in.
    pub netns: Option<String>,
    runtime: tokio::runtime::Runtime,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bh-d{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let mut daemon = Daemon {
            child: None,
            socket: dir.join("api.sock"),
            state_dir: dir.join("state"),
            images,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: None,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        daemon.spawn();
        daemon
    }

    /// A daemon whose migrations are mutual TLS, with a certificate of `ca`.
    pub fn start_with_migration_tls(ca: &Authority) -> Daemon {
        let args = ca.daemon_args();
        Self::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A daemon inside network namespace `netns`: the TAPs its VMMs make are there.
    pub fn start_in(netns: &str) -> Daemon {
        let mut daemon = Self::start_with(&[]);
        daemon.kill9();
        daemon.netns = Some(netns.to_string());
        daemon.spawn();
        daemon
    }

    /// Starts (or restarts) the daemon process on the same state.
    pub fn spawn(&mut self) {
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, BIN]);
                command
            }
            None => Command::new(BIN),
        };
        command
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--allow-dir")
            .arg(&self.images)
            .args(&self.extra)
            .env("BULKHEAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("daemon.log"))
                    .unwrap(),
            );
        // The daemon dies with the test (its VMMs do not: the Drop below
        // ends them).
        testkit::dies_with_test(&mut command);
        let mut child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("daemon exited ({status}): {}", self.log());
            }
            // Answering, not just accepting: a killed daemon's socket can
            // still accept for a moment (a VMM it was forking holds it).
            let health =
                self.runtime
                    .block_on(self.client(None).call(Method::GET, "/v1/health", None));
            if health.is_ok_and(|answer| answer.status.is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "daemon never listened: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn client(&self, token: Option<&str>) -> Client {
        Client {
            endpoint: Endpoint::Unix(self.socket.clone()),
            token: token.map(str::to_string),
        }
    }

    pub fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let client = self.client(token);
        self.runtime
            .block_on(client.call(method, path, body.as_ref()))
            .unwrap_or_else(|e| {
                let alive = std::fs::read_to_string(format!(
                    "/proc/{}/stat",
                    self.child.as_ref().map_or(0, |c| c.id())
                ))
                .unwrap_or_default();
                panic!(
                    "{path}: {e:?}\ndaemon: {alive}\nlog tail:\n{}",
                    self.log()
                        .lines()
                        .rev()
                        .take(15)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
    }

    /// A call as the host's administrator that must succeed.
    pub fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let answer = self.call(None, method.clone(), path, body);
        assert!(
            answer.status.is_success(),
            "{method} {path}: {} {}",
            answer.status,
            answer.text
        );
        answer.body
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub fn token(&self, project: &str, role: &str) -> String {
        let body = serde_json::json!({"name": format!("{project}-{role}"), "role": role, "project": project});
        self.ok(Method::POST, "/v1/tokens", Some(body))["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new(BIN)
            .args(args)
            .env("BULKHEAD_SOCKET", &self.socket)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    }

    /// A guest that counts on its console until stopped, in the images dir.
    pub fn counting_guest(&self) -> PathBuf {
        let path = self.images.join("counter.elf");
        if !path.exists() {
            let guest = guests::memory_writer(guests::MemoryWriter {
                region_pages: 16,
                round_tsc_ticks: 50_000_000,
                ..Default::default()
            })
            .unwrap();
            std::fs::write(&path, guest).unwrap();
        }
        path
    }

    /// A guest that halts until the console types to it, then echoes.
    pub fn echo_guest(&self) -> PathBuf {
        let path = self.images.join("echo.elf");
        if !path.exists() {
            std::fs::write(&path, guests::console_echo().unwrap()).unwrap();
        }
        path
    }

    /// Defines a 32 MiB VM running `kernel` (left stopped); returns its id.
    pub fn define_vm(&self, name: &str, kernel: &std::path::Path) -> String {
        let spec = serde_json::json!({"name": name, "kernel": kernel, "memory_mib": 32});
        let created = self.ok(Method::POST, "/v1/vms", Some(spec));
        created["id"].as_str().unwrap().to_string()
    }

    /// Defines and starts a VM running `kernel`; returns its id.
    pub fn start_vm(&self, name: &str, kernel: &std::path::Path) -> String {
        let id = self.define_vm(name, kernel);
        let started = self.ok(Method::POST, &format!("/v1/vms/{id}/start"), None);
        assert_eq!(started["state"], "running", "{started}");
        id
    }

    /// Defines and starts a counting VM; returns its id.
    pub fn running_vm(&self, name: &str) -> String {
        self.start_vm(name, &self.counting_guest())
    }

    pub fn vm(&self, id: &str) -> Value {
        self.ok(Method::GET, &format!("/v1/vms/{id}"), None)
    }

    /// Waits until VM `id` is in `state`.
    pub fn wait_state(&self, id: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let vm = self.vm(id);
            if vm["state"] == state {
                return vm;
            }
            assert!(Instant::now() < deadline, "VM {id} never {state}: {vm}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self, id: &str) -> u32 {
        self.vm(id)["pid"].as_u64().expect("a pid") as u32
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // End every VMM this daemon started, then the daemon.
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("vms")) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = host::vmm_process::find_process(&id) {
                    // SAFETY: kills a VMM process of this test's daemon.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Reads from a console stream until the guest printed a count above
/// `above`; returns it.
pub fn count_above<R: tokio::io::AsyncRead + Unpin>(
    daemon: &Daemon,
    console: &mut R,
    above: i64,
) -> i64 {
    use tokio::io::AsyncReadExt;
    daemon.block_on(async {
        let mut text = String::new();
        let mut buffer = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), console.read(&mut buffer))
                .await
                .expect("console output within 30 s")
                .unwrap();
            assert!(n > 0, "console closed; got {text:?}");
            text.push_str(&String::from_utf8_lossy(&buffer[..n]));
            let complete = if text.ends_with('\n') {
                &text[..]
            } else {
                &text[..text.rfind('\n').map_or(0, |i| i + 1)]
            };
            if let Some(count) = complete
                .lines()
                .rev()
                .find_map(|line| line.trim().parse::<i64>().ok())
                .filter(|&count| count > above)
            {
                return count;
            }
        }
    })
}

pub use testkit::status_field;

/// Reads from a console stream until `text` appeared; returns all read.
/// How long a console may print nothing before a test gives up on it. On
/// kvm_pvm a Linux guest's 8250 probe alone is silent for 30 s and more
/// (docs/host-kvm.md; 30.1 s measured 2026-12-02, before and after that
/// day's changes), which the former 30 s limit failed on.
const CONSOLE_SILENCE_LIMIT: Duration = Duration::from_secs(90);

pub fn read_until<R: tokio::io::AsyncRead + Unpin>(
    daemon: &Daemon,
    console: &mut R,
    text: &str,
) -> String {
    use tokio::io::AsyncReadExt;
    daemon.block_on(async {
        let mut seen = String::new();
        let mut buffer = [0u8; 4096];
        while !seen.contains(text) {
            let n = tokio::time::timeout(CONSOLE_SILENCE_LIMIT, console.read(&mut buffer))
                .await
                .unwrap_or_else(|_| {
                    panic!("no {text:?}: the console was silent {CONSOLE_SILENCE_LIMIT:?}; got {seen:?}")
                })
                .unwrap();
            assert!(n > 0, "console closed; got {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
        seen
    })
}

/// Sends one request over `io` (a socket of any kind) and returns the
/// response as it arrives, its body still streaming.
pub async fn send<IO, B>(
    io: IO,
    request: hyper::Request<B>,
) -> hyper::Response<hyper::body::Incoming>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender.send_request(request).await.unwrap()
}

/// A response's status and its whole body as text.
pub async fn collect(
    response: hyper::Response<hyper::body::Incoming>,
) -> (hyper::StatusCode, String) {
    use http_body_util::BodyExt;
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A certificate authority of the test's own, and the certificates it issues
/// for 127.0.0.1, as PEM files: migration credentials for daemons and peers.
pub struct Authority {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
    dir: PathBuf,
    issued: AtomicU32,
}

impl Authority {
    pub fn new(name: &str) -> Authority {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bh-ca{}-{n}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Authority {
            key,
            cert,
            dir,
            issued: AtomicU32::new(0),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A new certificate for 127.0.0.1 and its key: (cert, key) files.
    pub fn issue(&self) -> (PathBuf, PathBuf) {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        let paths = (
            self.dir.join(format!("host{n}.pem")),
            self.dir.join(format!("host{n}.key")),
        );
        std::fs::write(&paths.0, cert.pem()).unwrap();
        std::fs::write(&paths.1, key.serialize_pem()).unwrap();
        paths
    }

    /// `bulkhead serve` arguments for a host with a certificate of this CA.
    pub fn daemon_args(&self) -> Vec<String> {
        let (cert, key) = self.issue();
        [
            ("--migration-tls-cert", cert),
            ("--migration-tls-key", key),
            ("--migration-tls-ca", self.ca_file()),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
    }
}

impl Drop for Authority {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads an event stream's body until `marker` appeared (each frame within
/// 10 s, or the test fails); returns everything read.
pub fn read_events_until(daemon: &Daemon, mut body: hyper::body::Incoming, marker: &str) -> String {
    daemon.block_on(async {
        use http_body_util::BodyExt;
        let mut text = String::new();
        while !text.contains(marker) {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .unwrap_or_else(|_| panic!("no {marker} in the events within 10 s: {text}"))
                .unwrap()
                .unwrap();
            if let Some(data) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(data));
            }
        }
        text
    })
}

/// A loopback TCP port nothing listens on (bound, then let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
