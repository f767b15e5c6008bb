//! Pause, snapshot, restore and live migration through the `bulkhead`
//! binary, with a tiny guest that keeps changing its memory and counting on
//! its console (`guests::memory_writer`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn work_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bulkhead-migration-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unique(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    work_dir().join(format!("{name}-{n}"))
}

fn writer_guest(writer: guests::MemoryWriter) -> PathBuf {
    let path = unique("writer.elf");
    std::fs::write(&path, guests::memory_writer(writer).unwrap()).unwrap();
    path
}

/// A `bulkhead run` process whose console output is collected as it comes.
struct Vmm {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    control: PathBuf,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let writer = sink.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = from.read(&mut buffer) {
            if n == 0 {
                break;
            }
            writer.lock().unwrap().extend_from_slice(&buffer[..n]);
        }
    });
    sink
}

impl Vmm {
    fn start(args: &[&std::ffi::OsStr]) -> Vmm {
        let control = unique("control.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("run")
            .args(args)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Vmm {
            child,
            output,
            stderr,
            control,
        }
    }

    fn boot(guest: &Path, memory_mib: u64) -> Vmm {
        let memory = memory_mib.to_string();
        Vmm::start(&[
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--memory".as_ref(),
            memory.as_ref(),
        ])
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// The last complete count the guest printed.
    fn count(&self) -> Option<u64> {
        let output = self.output();
        let complete = &output[..output.rfind('\n')?];
        complete.rsplit('\n').next()?.trim().parse().ok()
    }

    fn wait_for_count(&self, at_least: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(count) = self.count().filter(|&c| c >= at_least) {
                return count;
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not count to {at_least}: {:?}\n{}",
                self.count(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for_control(&self) {
        let deadline = Instant::now() + WAIT;
        while !self.control.exists() {
            assert!(
                Instant::now() < deadline,
                "no control socket:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ctl(&self, args: &[&str]) -> (bool, String) {
        self.wait_for_control();
        let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("ctl")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    }

    fn ctl_ok(&self, args: &[&str]) -> serde_json::Value {
        let (ok, text) = self.ctl(args);
        assert!(
            ok,
            "bulkhead ctl {args:?} failed: {text}\nVMM stderr:\n{}",
            self.stderr()
        );
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    fn state(&self) -> String {
        self.ctl_ok(&["status"])["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn wait_exit(mut self) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return (status, self.output(), self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "the VMM did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.output()
    }
}

/// The counts in console output, dropping a partial first line (a restored
/// or migrated-in guest may resume in the middle of printing a number).
fn counts(output: &str, skip_first_partial: bool) -> Vec<u64> {
    let mut lines: Vec<&str> = output.split('\n').collect();
    lines.pop(); // after the last newline: incomplete
    if skip_first_partial && !lines.is_empty() {
        lines.remove(0);
    }
    lines
        .iter()
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a count: {l:?}"))
        })
        .collect()
}

fn assert_consecutive(counts: &[u64], what: &str) {
    for pair in counts.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{what}: gap or repeat in {counts:?}");
    }
}

#[test]
fn pause_resume_snapshot_and_two_independent_restores() {
    let guest = writer_guest(guests::MemoryWriter::default());
    let source = Vmm::boot(&guest, 64);
    source.wait_for_count(5);
    assert_eq!(source.state(), "running");

    source.ctl_ok(&["pause"]);
    assert_eq!(source.state(), "paused");
    let paused_at = source.count().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        source.count(),
        Some(paused_at),
        "a paused guest went on counting"
    );
    source.ctl_ok(&["resume"]);
    source.wait_for_count(paused_at + 3);

    let snapshot = unique("snapshot");
    let answer = source.ctl_ok(&["snapshot", snapshot.to_str().unwrap()]);
    assert!(answer["snapshot"]["memory_pages_written"].as_u64().unwrap() >= 1024);
    assert_eq!(source.state(), "running", "a snapshot resumes a running VM");
    // A second snapshot to the same place is refused; the first is intact.
    let (ok, text) = source.ctl(&["snapshot", snapshot.to_str().unwrap()]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let source_output = source.kill();

    let restore = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--restore".as_ref(), snapshot.as_os_str()];
        args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
        Vmm::start(&args)
    };
    let first = restore(&[]);
    let second = restore(&["--verify-memory"]);
    first.wait_for_count(1);
    second.wait_for_count(1);
    let (a, b) = (first.count().unwrap(), second.count().unwrap());
    first.wait_for_count(a + 20);
    second.wait_for_count(b + 20);
    let (first_output, second_output) = (first.kill(), second.kill());
    let first_counts = counts(&first_output, true);
    let second_counts = counts(&second_output, true);
    assert_consecutive(&first_counts, "first clone");
    assert_consecutive(&second_counts, "second clone");
    // Both clones go on from the same point, which the source had reached.
    assert_eq!(first_counts[0], second_counts[0]);
    let before = counts(&source_output, false);
    assert!(
        before.contains(&(first_counts[0] - 1)),
        "the clones resumed at {}, the source never printed {}",
        first_counts[0],
        first_counts[0] - 1
    );
    // The memory file is untouched by the clones' writes.
    let third = restore(&["--verify-memory"]);
    third.wait_for_count(1);
    third.kill();
}
