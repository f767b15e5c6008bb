//! The VMM's sandbox (`bulkhead run --sandbox uid=N,gid=N`), checked from
//! the outside: what the process can see, who it runs as, and that a system
//! call outside its filter ends it and nothing else.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::status_field;

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");
const VM_UID: u32 = 61_000;

fn work_dir(name: &str) -> testkit::TempDir {
    testkit::TempDir::new(&format!("sandbox-{name}"))
}

/// A guest that counts on its console forever.
fn counting_guest(dir: &Path) -> PathBuf {
    let path = dir.join("guest.elf");
    let guest = guests::memory_writer(guests::MemoryWriter {
        region_pages: 16,
        round_tsc_ticks: 20_000_000,
        ..Default::default()
    })
    .unwrap();
    std::fs::write(&path, guest).unwrap();
    path
}

struct Sandboxed {
    child: Child,
    jail: PathBuf,
}

impl Drop for Sandboxed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a sandboxed VMM whose file system is `jail` (owned by its uid);
/// the kernel lies outside it, opened before the sandbox closes.
fn start(kernel: &Path, jail: PathBuf, uid: u32, extra: &[&str]) -> Sandboxed {
    std::fs::create_dir_all(&jail).unwrap();
    std::os::unix::fs::chown(&jail, Some(uid), Some(uid)).unwrap();
    let mut command = Command::new(BIN);
    command
        .current_dir(&jail)
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "32", "--control", "control.sock"])
        .args(["--console-socket", "console.sock"])
        .arg("--sandbox")
        .arg(format!("uid={uid},gid={uid}"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    testkit::dies_with_test(&mut command);
    let child = command.spawn().unwrap();
    Sandboxed { child, jail }
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("VMM exited ({status}): {stderr}");
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the console until it shows a count above `above`; returns it.
fn count_above(console: &mut UnixStream, above: i64) -> i64 {
    console
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut text = String::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = console.read(&mut buffer).expect("console output");
        assert!(n > 0, "console closed; got {text:?}");
        text.push_str(&String::from_utf8_lossy(&buffer[..n]));
        let last = text
            .lines()
            .rev()
            .skip(usize::from(!text.ends_with('\n')))
            .find_map(|line| line.trim().parse::<i64>().ok());
        if let Some(count) = last.filter(|&count| count > above) {
            return count;
        }
    }
}

fn ctl(jail: &Path, args: &[&str]) -> String {
    let output = Command::new(BIN)
        .arg("ctl")
        .arg(jail.join("control.sock"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ctl {args:?}: {text}");
    text
}

#[test]
fn a_sandboxed_vmm_sees_only_its_directory_and_runs_unprivileged() {
    let dir = work_dir("view");
    let kernel = counting_guest(dir.path());
    let mut vmm = start(&kernel, dir.join("jail"), VM_UID, &[]);
    wait_for(&vmm.jail.join("console.sock"), &mut vmm.child);
    let mut console = UnixStream::connect(vmm.jail.join("console.sock")).unwrap();
    let first = count_above(&mut console, -1);
    let pid = vmm.child.id();

    // Its root is the jail: the host's files are not there, its own are.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut visible: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    visible.sort();
    assert_eq!(visible, ["console.sock", "control.sock"]);
    for host_path in ["etc/passwd", "dev/kvm", "proc/1", "guest.elf"] {
        assert!(!root.join(host_path).exists(), "{host_path} is visible");
    }
    assert_eq!(
        std::fs::metadata(&root).unwrap().ino(),
        std::fs::metadata(&vmm.jail).unwrap().ino()
    );

    // Unprivileged, no capabilities, filtered.
    let uids = status_field(pid, "Uid");
    assert!(
        uids.split_whitespace().all(|uid| uid == VM_UID.to_string()),
        "Uid: {uids}"
    );
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");

    // Everything a running VMM is asked to do still works inside.
    let status: serde_json::Value = serde_json::from_str(&ctl(&vmm.jail, &["status"])).unwrap();
    assert_eq!(status["state"], "running");
    assert!(status["memory"]["process_rss_kib"].as_u64().unwrap() > 0);
    ctl(&vmm.jail, &["pause"]);
    ctl(&vmm.jail, &["resume"]);
    // Paths a sandboxed VMM is given are inside its directory.
    let mut control = UnixStream::connect(vmm.jail.join("control.sock")).unwrap();
    std::io::Write::write_all(
        &mut control,
        b"{\"command\":\"snapshot\",\"path\":\"snap\"}\n",
    )
    .unwrap();
    let mut answer = String::new();
    control.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("\"ok\":true"), "{answer}");
    assert!(vmm.jail.join("snap/manifest.json").exists());
    let later = count_above(&mut console, first);
    assert!(later > first);

    // A stop signal still ends it cleanly.
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = vmm.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_forbidden_system_call_kills_that_vmm_and_no_other() {
    let dir = work_dir("seccomp");
    let kernel = counting_guest(dir.path());
    let mut bystander = start(&kernel, dir.join("bystander"), VM_UID + 1, &[]);
    wait_for(&bystander.jail.join("console.sock"), &mut bystander.child);
    let mut console = UnixStream::connect(bystander.jail.join("console.sock")).unwrap();
    let before = count_above(&mut console, -1);

    let mut offender = start(
        &kernel,
        dir.join("offender"),
        VM_UID + 2,
        &["--sandbox-selftest"],
    );
    let status = offender.child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "the offending VMM ended with {status}"
    );

    count_above(&mut console, before);
    assert!(bystander.child.try_wait().unwrap().is_none());
}
