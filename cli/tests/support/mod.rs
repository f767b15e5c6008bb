//! What the Linux guest tests share: a network namespace of their own, the
//! `bulkhead run` process with its console and control socket.

#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use testkit::{collect, dies_with_test, run, Namespace};

/// The booted guest: the `bulkhead run` process, its console, its control socket.
pub struct Guest {
    pub child: Child,
    pub console: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    pub control: PathBuf,
    /// The threads reading its stdout and stderr: joined once it exited,
    /// so that its last lines are read before its report is.
    readers: Vec<std::thread::JoinHandle<()>>,
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
        let echo = std::env::var_os("BULKHEAD_TEST_CONSOLE").map(|_| "");
        let readers = vec![
            collect(child.stdout.take().unwrap(), console.clone(), echo),
            collect(child.stderr.take().unwrap(), stderr.clone(), echo),
        ];
        Guest {
            child,
            console,
            stderr,
            control,
            readers,
        }
    }

    /// Waits for a VMM that ends by itself (a migrated source), with its
    /// JSON report (null when it printed none).
    pub fn stop_when_exited(mut self) -> (std::process::ExitStatus, Value) {
        let status = self.child.wait().unwrap();
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
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
