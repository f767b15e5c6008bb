//! `bulkhead run` options the README promises, each seen doing what it
//! says: JSON logs, the host's guest options and `--no-host-options`,
//! `--sample-rip-ms`, and `ctl ctrl-alt-del`.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::host::KvmFlavour;

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");

fn test_guest(name: &str) -> PathBuf {
    let path = testkit::process_dir().join(format!("{name}.elf"));
    std::fs::write(&path, guests::test_guest(name).unwrap().unwrap()).unwrap();
    path
}

/// `bulkhead run ARGS` with info logs as JSON; its stderr as it comes.
struct Run {
    child: Child,
    console: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Run {
    fn start(args: &[&std::ffi::OsStr]) -> Run {
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .args(args)
            .env("BULKHEAD_LOG", "info")
            .env("BULKHEAD_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        testkit::dies_with_test(&mut command);
        let mut child = command.spawn().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            testkit::collect(child.stdout.take().unwrap(), console.clone(), None),
            testkit::collect(child.stderr.take().unwrap(), stderr.clone(), None),
        ];
        Run {
            child,
            console,
            stderr,
            readers,
        }
    }

    fn wait_for_console(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.console.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} on the console: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VMM's end (at most a minute); its status and stderr.
    fn wait(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the VMM did not end: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        let stderr = self.stderr.lock().unwrap().clone();
        (status, stderr)
    }

    fn terminate(self) -> (std::process::ExitStatus, String) {
        // SAFETY: signals our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait()
    }
}

/// Every log line on stderr is one JSON object (the last line is the
/// `--output json` report, also JSON); returns the log events.
fn json_events(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{stderr}"))
        })
        .filter(|value| value.get("level").is_some())
        .collect()
}

fn logged_cmdline(events: &[Value]) -> String {
    events
        .iter()
        .find(|event| event["fields"]["message"] == "starting")
        .and_then(|event| event["fields"]["cmdline"].as_str())
        .unwrap_or_else(|| panic!("no kernel command line logged: {events:?}"))
        .to_string()
}

/// With `BULKHEAD_LOG_FORMAT=json` each log event is a JSON object with its
/// level, target and fields; the command line the VMM gives the kernel is
/// one of them: with this host's guest options (kvm_pvm needs some), and
/// without them after `--no-host-options`.
#[test]
fn json_logs_show_the_host_guest_options_and_no_host_options_leaves_them_out() {
    let guest = test_guest("halt");
    let run = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--cmdline".as_ref(),
            "console=ttyS0 marker=1".as_ref(),
            "--output".as_ref(),
            "json".as_ref(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let (status, stderr) = Run::start(&args).wait();
        assert!(status.success(), "{stderr}");
        let events = json_events(&stderr);
        assert!(
            events
                .iter()
                .all(|event| event["level"].is_string() && event["target"].is_string()),
            "{events:?}"
        );
        logged_cmdline(&events)
    };
    let host_options = KvmFlavour::detect().guest_cmdline_options();
    let with = run(&[]);
    let without = run(&["--no-host-options"]);
    assert!(with.starts_with("console=ttyS0 marker=1"), "{with}");
    assert!(without.starts_with("console=ttyS0 marker=1"), "{without}");
    assert!(with.contains(host_options), "{with}");
    for option in host_options.split_whitespace() {
        assert!(!without.contains(option), "{option} in {without}");
    }
    assert_eq!(
        with == without,
        host_options.is_empty(),
        "{with} / {without}"
    );
}

/// `--sample-rip-ms N` logs each vCPU's RIP every N ms: a spinning guest
/// on two vCPUs is sampled on both, again and again, inside its code.
#[test]
fn sample_rip_ms_logs_every_vcpus_rip_repeatedly() {
    let guest = test_guest("spin");
    let run = Run::start(&[
        "--kernel".as_ref(),
        guest.as_os_str(),
        "--cpus".as_ref(),
        "2".as_ref(),
        "--sample-rip-ms".as_ref(),
        "20".as_ref(),
        "--output".as_ref(),
        "json".as_ref(),
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let (_, stderr) = run.terminate();
    let samples: Vec<(u64, u64)> = json_events(&stderr)
        .iter()
        .filter(|event| event["fields"]["message"] == "RIP sample")
        .map(|event| {
            let rip = event["fields"]["rip"].as_str().unwrap();
            (
                event["fields"]["vcpu"].as_u64().unwrap(),
                u64::from_str_radix(rip.trim_start_matches("0x"), 16).unwrap(),
            )
        })
        .collect();
    for vcpu in [0, 1] {
        let count = samples.iter().filter(|(v, _)| *v == vcpu).count();
        assert!(count >= 3, "vCPU {vcpu}: {count} samples: {stderr}");
    }
    // The boot vCPU spins in the guest's code (loaded at 1 MiB), not at 0.
    assert!(
        samples
            .iter()
            .any(|&(vcpu, rip)| vcpu == 0 && (0x10_0000..0x20_0000).contains(&rip)),
        "{samples:x?}"
    );
    // Sampling without the option: no samples.
    let run = Run::start(&[
        "--kernel".as_ref(),
        guest.as_os_str(),
        "--output".as_ref(),
        "json".as_ref(),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let (_, stderr) = run.terminate();
    assert!(!stderr.contains("RIP sample"), "{stderr}");
}

/// `ctl ctrl-alt-del` presses Ctrl-Alt-Del on the guest's keyboard: the
/// echo guest powers off on it, and the VMM ends with status 0 and says why.
#[test]
fn ctl_ctrl_alt_del_reaches_the_guest_keyboard() {
    let guest = testkit::process_dir().join("echo.elf");
    std::fs::write(&guest, guests::console_echo().unwrap()).unwrap();
    let dir = testkit::TempDir::new("run-ctrl-alt-del");
    let control = dir.join("control.sock");
    let run = Run::start(&[
        "--kernel".as_ref(),
        guest.as_os_str(),
        "--control".as_ref(),
        control.as_os_str(),
        "--output".as_ref(),
        "json".as_ref(),
    ]);
    // Its keyboard is set up once it says it is ready.
    run.wait_for_console(guests::CONSOLE_ECHO_READY);
    let answer = testkit::run(
        Command::new(BIN)
            .arg("ctl")
            .arg(&control)
            .arg("ctrl-alt-del"),
    );
    let (status, stderr) = run.wait();
    assert!(status.success(), "{answer}\n{stderr}");
    let report: Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(report["exit"], "guest powered off", "{report}");
}
