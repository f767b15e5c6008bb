//! Shared helpers for integration tests that run real guests on /dev/kvm.

#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::{KernelSource, Vm, VmConfig, VmExit, VmReport};

/// Serial output captured in memory (and echoed to stderr when
/// BULKHEAD_TEST_CONSOLE is set, to watch a guest boot).
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        if std::env::var_os("BULKHEAD_TEST_CONSOLE").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Outcome {
    pub output: String,
    pub report: VmReport,
}

impl Outcome {
    pub fn emulated(&self, mnemonic: &str) -> u64 {
        self.report
            .vcpus
            .iter()
            .map(|v| v.emulated.get(mnemonic).copied().unwrap_or(0))
            .sum()
    }
}

pub fn config_for(name: &str, image: Vec<u8>) -> VmConfig {
    let mut config = VmConfig::new(KernelSource::Bytes {
        name: name.into(),
        image: image.into(),
    });
    config.machine.cmdline = Some(String::new());
    config.machine.memory_mib = 64;
    config
}

/// Runs a VM until it ends on its own, or stops it after `limit` (the
/// outcome then says `Stopped`).
pub fn run_config(config: &VmConfig, limit: Duration) -> Outcome {
    run_until(config, limit, |_| false, Duration::ZERO).0
}

/// Runs a VM until its serial output satisfies `until` (then lets it run
/// `then` longer), until it ends on its own, or until `limit`; then stops it.
/// The outcome's `reached` says whether `until` was met while it ran.
pub fn run_until(
    config: &VmConfig,
    limit: Duration,
    until: impl Fn(&str) -> bool,
    then: Duration,
) -> (Outcome, bool) {
    let capture = Capture::default();
    let vm = Vm::new(config, Box::new(capture.clone())).expect("VM builds");
    let running = vm.start().expect("VM starts");
    let exit = running.exit_signal();
    let deadline = Instant::now() + limit;
    let mut reached_at = None;
    while !exit.is_requested() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        if reached_at.is_none() && until(&capture.text()) {
            reached_at = Some(Instant::now());
        }
        if reached_at.is_some_and(|at| at.elapsed() >= then) {
            break;
        }
    }
    if !exit.is_requested() {
        exit.request(VmExit::Stopped);
    }
    let report = running.wait();
    (
        Outcome {
            output: capture.text(),
            report,
        },
        reached_at.is_some(),
    )
}

pub fn run_guest(name: &str, image: Vec<u8>) -> Outcome {
    run_config(&config_for(name, image), Duration::from_secs(20))
}

/// Parses `key=value` lines the tiny guests print.
pub fn value(output: &str, key: &str) -> Option<String> {
    output.lines().find_map(|line| {
        line.trim()
            .strip_prefix(key)?
            .strip_prefix('=')
            .map(str::to_string)
    })
}
