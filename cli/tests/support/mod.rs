//! What the Linux guest tests share: a network namespace of their own, the
//! `bulkhead run` process with its console and control socket.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{command:?} failed: {text}");
    text
}

/// A network namespace of this test's own, deleted (with its TAP) on drop.
pub struct Namespace(pub String);

impl Namespace {
    pub fn new() -> Namespace {
        let name = format!("bulkhead-test-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Namespace(name)
    }

    pub fn exec(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0, program]);
        command
    }

    /// Runs `f` on a thread that has entered this namespace (a thread's
    /// network namespace is its own), e.g. to open sockets there.
    pub fn on_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd we own.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The booted guest: the `bulkhead run` process, its console, its control socket.
pub struct Guest {
    pub child: Child,
    pub console: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    pub control: PathBuf,
}

impl Guest {
    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    pub fn wait_for_console(&mut self, text: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.console().contains(text) {
                return true;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "bulkhead exited ({status}) before '{text}':\n{}\n{}",
                    self.console(),
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        run(Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("ctl")
            .arg(&self.control)
            .args(args))
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ctl(&["status"])).expect("status is JSON")
    }

    /// Stops the VM as a user would (SIGTERM) and returns its JSON report.
    pub fn stop(self) -> (std::process::ExitStatus, Value) {
        // SAFETY: signals our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let (status, report) = self.stop_when_exited();
        assert!(!report.is_null(), "no JSON report on stderr");
        (status, report)
    }
}

/// Makes the process `command` starts die with the test thread that started
/// it, so a failed assertion leaves no VMM running.
pub fn dies_with_test(command: &mut Command) {
    // SAFETY: prctl in the child before exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<String>>, echo: bool) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line);
            if echo {
                eprint!("{text}");
            }
            into.lock().unwrap().push_str(&text);
            line.clear();
        }
    });
}

pub fn device<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no device {name} in {status}"))
        .get("counters")
        .unwrap()
}

pub fn rss_kib(status: &Value) -> u64 {
    status["memory"]["process_rss_kib"].as_u64().unwrap()
}

/// Polls the control socket until `done` holds for the status, or `limit`.
pub fn wait_status(guest: &Guest, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let status = guest.status();
        if done(&status) || Instant::now() >= deadline {
            return status;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

impl Guest {
    /// Starts `bulkhead run ARGS --control CONTROL --output json` inside
    /// `namespace`; the VMM dies with the test.
    pub fn spawn(namespace: &Namespace, args: &[std::ffi::OsString], control: PathBuf) -> Guest {
        let mut command = namespace.exec(env!("CARGO_BIN_EXE_bulkhead"));
        command
            .arg("run")
            .args(args)
            .arg("--control")
            .arg(&control)
            .args(["--output", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        dies_with_test(&mut command);
        let mut child = command.spawn().expect("start bulkhead");
        let console = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let echo = std::env::var_os("BULKHEAD_TEST_CONSOLE").is_some();
        collect(child.stdout.take().unwrap(), console.clone(), echo);
        collect(child.stderr.take().unwrap(), stderr.clone(), echo);
        Guest {
            child,
            console,
            stderr,
            control,
        }
    }

    /// Waits for a VMM that ends by itself (a migrated source), with its
    /// JSON report (null when it printed none).
    pub fn stop_when_exited(mut self) -> (std::process::ExitStatus, Value) {
        let status = self.child.wait().unwrap();
        // The reader thread has the last lines once the pipe closed.
        std::thread::sleep(Duration::from_millis(200));
        let stderr = self.stderr.lock().unwrap().clone();
        let report = stderr
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<Value>(line).ok())
            .unwrap_or(Value::Null);
        (status, report)
    }

    /// Waits until the control socket answers (the VM is built and runs).
    pub fn wait_for_control(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.control.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "bulkhead exited ({status}):\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no control socket: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
