//! What the user-space tests share: the `bulkhead` binary, the guest images,
//! temporary folders, and a VM whose serial console is a shell the test types
//! into.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use testkit::{
    collect, dies_with_test, image, run, run_with_limit, threads_of, TempDir, HOST_COMMAND_LIMIT,
};

/// How long a guest may take to boot to its shell (a stock kernel under
/// nested KVM on an emulated L1 takes ~20 s).
pub const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// How long one shell command may take.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// The `bulkhead` binary: `BULKHEAD_BIN` (inside L1), else the one cargo built.
pub fn bulkhead_bin() -> PathBuf {
    std::env::var_os("BULKHEAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bulkhead")))
}

/// Which kernel a guest boots, with the busybox user space built for it.
#[derive(Clone, Copy, Debug)]
pub enum Kernel {
    /// The project's kernel (drivers built in, no ACPI: MP table).
    Project,
    /// Debian's stock kernel (drivers as modules, ACPI).
    Stock,
}

impl Kernel {
    pub fn args(self) -> Vec<String> {
        let (kernel, initrd) = match self {
            Kernel::Project => ("vmlinux", "busybox.cpio.gz"),
            Kernel::Stock => ("stock-vmlinuz", "stock-busybox.cpio.gz"),
        };
        vec![
            "--kernel".into(),
            image(kernel).display().to_string(),
            "--initrd".into(),
            image(initrd).display().to_string(),
        ]
    }
}

/// The default command line plus `extra`.
pub fn cmdline(extra: &str) -> Vec<String> {
    vec![
        "--cmdline".into(),
        format!("console=ttyS0 reboot=k panic=-1 {extra}"),
    ]
}

/// The triple faults L1's KVM has traced so far (L1's init records KVM's
/// "shutdown" exits), under a heading; empty when there were none or
/// outside L1. `intr_info` is what the CPU was delivering when it gave up:
/// 0x80000b0e is a page fault with the error code after it.
pub fn kvm_shutdown_exits() -> String {
    let trace = std::fs::read_to_string("/sys/kernel/tracing/trace").unwrap_or_default();
    let exits: Vec<&str> = trace
        .lines()
        .filter(|line| line.contains("reason shutdown"))
        .map(str::trim)
        .collect();
    match exits.is_empty() {
        true => String::new(),
        false => format!(
            "\n--- KVM's shutdown exits (triple faults) so far in this L1 ---\n{}",
            exits.join("\n")
        ),
    }
}

/// A `bulkhead run` process whose console (stdin/stdout) the test holds.
pub struct Vm {
    pub child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    pub control: PathBuf,
    commands: usize,
    /// The threads reading stdout and stderr; they end when the VMM does.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Vm {
    /// Starts `bulkhead run ARGS --control DIR/control.sock --output json`.
    pub fn start(args: &[String], dir: &Path) -> Vm {
        let control = dir.join("control.sock");
        let mut command = Command::new(bulkhead_bin());
        command
            .arg("run")
            .args(args)
            .arg("--control")
            .arg(&control)
            .args(["--output", "json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        dies_with_test(&mut command);
        let mut child = command.spawn().expect("start bulkhead run");
        let console = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(
                child.stdout.take().unwrap(),
                console.clone(),
                Some("console| "),
            ),
            collect(child.stderr.take().unwrap(), stderr.clone(), Some("vmm| ")),
        ];
        Vm {
            readers,
            stdin: child.stdin.take(),
            child,
            console,
            stderr,
            control,
            commands: 0,
        }
    }

    /// Boots `kernel` with its busybox user space and waits for its shell.
    pub fn boot(kernel: Kernel, extra: &[String], dir: &Path) -> Vm {
        let mut args = kernel.args();
        args.extend_from_slice(extra);
        let mut vm = Vm::start(&args, dir);
        vm.wait_for("bulkhead-guest: up", BOOT_LIMIT);
        vm.wait_for_shell();
        vm
    }

    /// Waits for the shell's prompt, then turns the terminal's echo off:
    /// busybox's line editing then reads plain lines (no echoed input, no
    /// cursor-position queries, no wrapping), so what comes back is only the
    /// commands' output.
    pub fn wait_for_shell(&mut self) {
        self.wait_for("guest# ", COMMAND_LIMIT);
        self.sh("stty -echo");
    }

    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything the test knows about this VM, for a failure message.
    pub fn describe(&self) -> String {
        format!(
            "--- console ---\n{}\n--- stderr ---\n{}{}",
            self.console(),
            self.stderr(),
            kvm_shutdown_exits()
        )
    }

    /// Waits until the console shows `text`; panics (with the console) if
    /// the VM ends or `limit` passes first.
    pub fn wait_for(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if without_kernel_messages(&self.console()).contains(text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "bulkhead exited ({status}) before the console showed '{text}'\n{}",
                    self.describe()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the console did not show '{text}' within {limit:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `text` on the console.
    pub fn type_text(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("console input is open");
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Starts `command` in the guest, detached from the console's shell:
    /// busybox's ash exits when a job of its own ends while it waits at its
    /// prompt (seen in the lane: `tool &` ended, init started a new shell,
    /// and the line typed next was lost to it), so the command runs as
    /// init's child instead. Its output still goes to the console.
    pub fn start_detached(&mut self, command: &str) {
        self.sh(&format!("({command} &)"));
    }

    /// Runs `command` in the guest's shell; returns its exit status and what
    /// it printed (the typed line itself excluded).
    pub fn shell(&mut self, command: &str) -> (i32, String) {
        self.shell_with_limit(command, COMMAND_LIMIT)
    }

    pub fn shell_with_limit(&mut self, command: &str, limit: Duration) -> (i32, String) {
        self.commands += 1;
        let marker = format!("@@{}:", self.commands);
        // Typed before the prompt is whole, the prompt's tail ("st# ") would
        // be read as the start of this command's output (seen in CI).
        let prompt_deadline = Instant::now() + PROMPT_LIMIT;
        while !at_prompt(&self.console()) && Instant::now() < prompt_deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let start = self.console().len();
        self.type_text(&format!("{command}; echo \"{marker}$?@@\"\n"));
        let deadline = Instant::now() + limit;
        loop {
            let console = self.console();
            let new = &console[start.min(console.len())..];
            // The typed line echoes `@@N:$?@@`; only the answer has digits.
            if let Some((status, end)) = find_marker(new, &marker) {
                return (status, command_output(&new[..end]));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "bulkhead exited ({status}) during `{command}`\n{}",
                    self.describe()
                );
            }
            assert!(
                Instant::now() < deadline,
                "`{command}` did not finish within {limit:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `command`, which must succeed; returns its output.
    pub fn sh(&mut self, command: &str) -> String {
        let (status, output) = self.shell(command);
        assert_eq!(
            status,
            0,
            "`{command}` failed in the guest:\n{output}\n{}",
            self.describe()
        );
        output
    }

    /// `bulkhead ctl CONTROL ARGS...`, which must succeed within
    /// [`HOST_COMMAND_LIMIT`]; a failure shows the VMM's threads and console.
    pub fn ctl(&self, args: &[&str]) -> String {
        let pid = self.child.id();
        run_with_limit(
            Command::new(bulkhead_bin())
                .arg("ctl")
                .arg(&self.control)
                .args(args),
            HOST_COMMAND_LIMIT,
            || format!("{}\n{}", threads_of(pid), self.describe()),
        )
    }

    /// Waits for the VMM to end by itself; returns its exit status and its
    /// JSON report.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Value) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the VM did not end within {limit:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // The pipes close with the process: once the readers are done, the
        // console and the report are complete.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let report = self
            .stderr()
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<Value>(line).ok())
            .unwrap_or(Value::Null);
        (status, report)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        // Reaped if it ends in time; a VMM stuck in the kernel is left
        // rather than hanging the test.
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How long a command waits for the shell's prompt before it is typed
/// anyway (a command may run where no prompt comes, e.g. in a subshell).
const PROMPT_LIMIT: Duration = Duration::from_secs(5);

/// Whether the console ends at the guest shell's prompt (busybox asks the
/// terminal for the cursor position after its first one).
fn at_prompt(console: &str) -> bool {
    let console = console.trim_end_matches("\x1b[6n");
    console.ends_with("guest# ")
}

/// What a command printed: the console between typing it and its marker,
/// without carriage returns, prompts, and (until `stty -echo`) the echoed
/// command line.
fn command_output(text: &str) -> String {
    let text = without_kernel_messages(&text.replace('\r', ""));
    let mut output = text.as_str();
    // The previous command's marker is seen before its line ends, so this
    // command's text may start with that newline, then the prompt.
    while let Some(rest) = output
        .strip_prefix("guest# ")
        .or_else(|| output.strip_prefix('\n'))
    {
        output = rest;
    }
    // With echo still on, the typed line comes back first.
    if let Some(at) = output.find("; echo \"@@") {
        output = output[at..].split_once('\n').map_or("", |(_, rest)| rest);
    }
    output.to_string()
}

/// `console` without the kernel's messages (`[    8.985049] text` up to
/// its line's end), wherever they landed: the kernel writes them to the
/// console between any two bytes of a program's output (seen in CI: the
/// clocksource watchdog's, in the middle of a command's answer and of a
/// program's error message).
pub fn without_kernel_messages(console: &str) -> String {
    let mut kept = String::with_capacity(console.len());
    let mut rest = console;
    while let Some(open) = rest.find('[') {
        kept.push_str(&rest[..open]);
        let after = &rest[open..];
        match kernel_message_len(after) {
            Some(len) => rest = &after[len..],
            None => {
                kept.push('[');
                rest = &after[1..];
            }
        }
    }
    kept.push_str(rest);
    kept
}

/// The length of the kernel message `text` starts with, its newline
/// included: `[`, blanks, seconds, `.`, digits, `] `.
fn kernel_message_len(text: &str) -> Option<usize> {
    let stamp = text.strip_prefix('[')?.trim_start_matches(' ');
    let (seconds, rest) = stamp.split_once('.')?;
    let (fraction, _) = rest.split_once("] ")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(seconds) || !digits(fraction) {
        return None;
    }
    Some(text.find('\n').map_or(text.len(), |end| end + 1))
}

/// Finds `MARKER<digits>@@` in `text`: the status and where the marker starts.
fn find_marker(text: &str, marker: &str) -> Option<(i32, usize)> {
    let mut from = 0;
    while let Some(offset) = text[from..].find(marker) {
        let start = from + offset;
        let rest = &text[start + marker.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && rest[digits.len()..].starts_with("@@") {
            return Some((digits.parse().ok()?, start));
        }
        from = start + marker.len();
    }
    None
}

#[test]
fn markers_with_digits_are_answers_and_typed_ones_are_not() {
    let text = "echo \"@@3:$?@@\"\r\n42\r\n@@3:0@@\r\n";
    let (status, at) = find_marker(text, "@@3:").unwrap();
    assert_eq!(status, 0);
    assert_eq!(&text[..at], "echo \"@@3:$?@@\"\r\n42\r\n");
    assert!(find_marker("@@3:$?@@", "@@3:").is_none());
    assert_eq!(find_marker("x@@12:127@@", "@@12:").unwrap().0, 127);
}

#[test]
fn a_prompt_is_whole_only_once_it_ends_the_console() {
    assert!(at_prompt("@@2:0@@\r\nguest# "));
    assert!(at_prompt("BusyBox\r\nguest# \x1b[6n"));
    assert!(!at_prompt("@@2:0@@\r\ngue"));
    assert!(!at_prompt("guest# 1111\r\n"));
}

#[test]
fn command_output_drops_prompts_and_the_echoed_line() {
    assert_eq!(command_output("guest# 42\r\n"), "42\n");
    // Seen in CI: the newline that ended the previous marker's line first.
    assert_eq!(command_output("\nguest# 1\r\n"), "1\n");
    assert_eq!(
        command_output("guest# \x1b[6nstty -echo; echo \"@@1:$?@@\"\r\n"),
        ""
    );
    assert_eq!(command_output("a\nb\n"), "a\nb\n");
    // Seen in CI: the clocksource watchdog's lines after the prompt.
    assert_eq!(
        command_output(
            "guest# [    8.985049] clocksource: watchdog on CPU0:\r\n\
             [    9.027681] clocksource:    'kvm-clock'\r\n64\r\n"
        ),
        "64\n"
    );
}

#[test]
fn kernel_messages_are_taken_out_wherever_they_land() {
    assert_eq!(
        without_kernel_messages(
            "tool: [    5.562010] clocksource: skew\n[    5.655536] tsc: unstable\nvsock read\n"
        ),
        "tool: vsock read\n"
    );
    assert_eq!(without_kernel_messages("6[ 10.1] x\n4\n"), "64\n");
    assert_eq!(without_kernel_messages("end [  1.5] cut"), "end ");
    // Brackets that are not a kernel's time stamp stay.
    for kept in ["[1] Done", "a [x.1] b\n", "[ .5] c", "[3.] d", "[2.5]e"] {
        assert_eq!(without_kernel_messages(kept), kept);
    }
    assert_eq!(without_kernel_messages("[[ 1.0] x\ny"), "[y");
}

/// Runs `f` on a thread of its own in a new network namespace (with its
/// loopback up): TAPs, addresses and the processes it starts (which inherit
/// the thread's namespace) stay there, and go with it.
pub fn in_new_network_namespace<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        run(Command::new("ip").args(["link", "set", "lo", "up"]));
        f()
    });
    match thread.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A TCP stream read to its end on a thread of its own: a stalled stream
/// fails the test naming it, instead of hanging the lane.
pub struct StreamReceiver {
    result: std::sync::mpsc::Receiver<std::io::Result<(u64, Duration)>>,
}

/// Accepts one connection on `listener` and reads it to its end.
pub fn receive_stream(listener: std::net::TcpListener) -> StreamReceiver {
    let (sender, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let received = (|| {
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(COMMAND_LIMIT))?;
            let started = Instant::now();
            let bytes = std::io::copy(&mut stream, &mut std::io::sink())?;
            Ok((bytes, started.elapsed()))
        })();
        let _ = sender.send(received);
    });
    StreamReceiver { result }
}

impl StreamReceiver {
    /// The bytes received and how long reading them took (from the
    /// connection on), once the stream ended within `limit`.
    pub fn wait(self, limit: Duration, what: &str) -> (u64, Duration) {
        match self.result.recv_timeout(limit) {
            Ok(Ok(received)) => received,
            Ok(Err(e)) => panic!("{what}: {e}"),
            Err(_) => panic!("{what}: the stream did not end within {limit:?}"),
        }
    }
}

/// The numbers of the `count N` lines of `console`, in order. A kernel
/// message may land on a count's line before its newline (seen in CI: the
/// clocksource watchdog's, after a live update): the digits are read up to it.
pub fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|line| line.strip_prefix("count "))
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

#[test]
fn counts_survive_a_kernel_message_on_their_line() {
    let console = "count 16\r\ncount 17[   10.418501] clocksource: timekeeping watchdog\r\n\
                   count 18\r\ncount x\r\nthe count 19\r\n";
    assert_eq!(counts(console), [16, 17, 18]);
}

/// The host file's allocated bytes (holes excluded).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}
