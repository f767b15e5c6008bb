//! Processes a test starts, and what `/proc` says of them.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Makes the process `command` starts die (SIGKILL) with the thread that
/// starts it, so a failed assertion leaves no VMM or daemon running.
pub fn dies_with_test(command: &mut Command) {
    // SAFETY: prctl between fork and exec; it allocates nothing.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// How long a host command a test runs may take by default (`ip`, a
/// snapshot or migration of a small guest, fsck of a small disk).
pub const HOST_COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Runs a command to its end; panics with its output when it fails or
/// takes longer than [`HOST_COMMAND_LIMIT`] (a hang becomes a failure that
/// names the command). Returns stdout followed by stderr.
pub fn run(command: &mut Command) -> String {
    run_with_limit(command, HOST_COMMAND_LIMIT, String::new)
}

/// [`run`] with its own limit; a failure adds what `diagnose` says.
pub fn run_with_limit(
    command: &mut Command,
    limit: Duration,
    diagnose: impl Fn() -> String,
) -> String {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    dies_with_test(command);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let readers = [
        collect(child.stdout.take().unwrap(), stdout.clone(), None),
        collect(child.stderr.take().unwrap(), stderr.clone(), None),
    ];
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not finish within {limit:?}: {}{}\n{}",
                stdout.lock().unwrap(),
                stderr.lock().unwrap(),
                diagnose()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let text = stdout.lock().unwrap().clone() + &stderr.lock().unwrap();
    assert!(
        status.success(),
        "{command:?} failed ({status}): {text}\n{}",
        diagnose()
    );
    text
}

/// Appends what `stream` produces to `into` as it arrives (a console's
/// prompt has no newline after it); with `echo`, also prints it line by
/// line after that prefix (libtest shows it for a failed test). The thread
/// ends with the stream.
pub fn collect(
    mut stream: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    echo: Option<&'static str>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        let mut pending = String::new();
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let text = String::from_utf8_lossy(&chunk[..n]);
            into.lock().unwrap().push_str(&text);
            let Some(prefix) = echo else { continue };
            pending.push_str(&text);
            while let Some(end) = pending.find('\n') {
                eprintln!("{prefix}{}", pending[..end].trim_end_matches('\r'));
                pending.drain(..=end);
            }
        }
        if let (Some(prefix), false) = (echo, pending.is_empty()) {
            eprintln!("{prefix}{pending}");
        }
    })
}

/// A field of `/proc/PID/status` (`Uid`, `CapEff`, `Seccomp`...), trimmed.
/// Panics when the process or the field does not exist: a check on a field
/// that is not there must not compare an empty string.
pub fn status_field(pid: u32, field: &str) -> String {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    status_line(&status, field).unwrap_or_else(|| panic!("no {field} in {path}:\n{status}"))
}

fn status_line(status: &str, field: &str) -> Option<String> {
    status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')
            .map(|value| value.trim().to_string())
    })
}

/// What each thread of process `pid` is doing (name, state, kernel wait
/// channel and stack where readable): for a failure message about a hang.
pub fn threads_of(pid: u32) -> String {
    let mut text = format!("--- threads of {pid} ---\n");
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return text + "(gone)\n";
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        text.push_str(&format!(
            "{} {} state {state} wchan {}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            read("stack")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_field_is_found_by_its_whole_name_only() {
        let status = "Uid:\t0\t0\t0\t0\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(status_line(status, "Seccomp").as_deref(), Some("2"));
        assert_eq!(status_line(status, "Seccomp_filters").as_deref(), Some("1"));
        assert_eq!(status_line(status, "Uid").as_deref(), Some("0\t0\t0\t0"));
        assert_eq!(status_line(status, "Seccom"), None);
    }

    #[test]
    #[should_panic(expected = "no NoSuchField in /proc/")]
    fn a_missing_status_field_fails_instead_of_reading_empty() {
        status_field(std::process::id(), "NoSuchField");
    }

    #[test]
    fn run_returns_the_output_of_a_command_that_succeeds() {
        let text = run(Command::new("sh").args(["-c", "echo out; echo err >&2"]));
        assert_eq!(text, "out\nerr\n");
    }

    #[test]
    #[should_panic(expected = "failed (exit status: 3): gone")]
    fn run_fails_with_the_output_of_a_command_that_fails() {
        run(Command::new("sh").args(["-c", "echo gone; exit 3"]));
    }

    #[test]
    #[should_panic(expected = "did not finish within 200ms: started")]
    fn a_command_that_hangs_fails_at_its_limit() {
        run_with_limit(
            Command::new("sh").args(["-c", "echo started; sleep 30"]),
            Duration::from_millis(200),
            String::new,
        );
    }

    #[test]
    fn threads_of_names_this_process_threads() {
        let text = threads_of(std::process::id());
        assert!(text.contains("state "), "{text}");
        assert!(threads_of(u32::MAX).ends_with("(gone)\n"));
    }
}
