//! Bad input to `bulkhead run`: each case ends with status 1 and one line on
//! stderr that names the problem, never a panic or a backtrace.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Runs `bulkhead run ARGS` and returns its one stderr line.
fn run_fails(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("start bulkhead");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(!stderr.contains("backtrace"), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line:\n{stderr}");
    lines[0].to_string()
}

fn assert_names(line: &str, words: &[&str]) {
    for word in words {
        assert!(line.contains(word), "{line:?} does not say {word:?}");
    }
}

/// A file in a per-test temporary folder.
fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let path = testkit::process_dir().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn missing_kvm_device() {
    let line = run_fails(&["--kvm-device", "/nonexistent/kvm"]);
    assert_names(&line, &["/nonexistent/kvm", "No such file"]);
}

#[test]
fn a_kvm_device_that_is_not_kvm() {
    let line = run_fails(&["--kvm-device", "/dev/null"]);
    assert_names(&line, &["/dev/null is not a KVM device"]);
}

#[test]
fn unreadable_kvm_device() {
    let line = run_fails(&["--kvm-device", "/"]);
    assert_names(&line, &["cannot open /"]);
}

#[test]
fn a_file_that_is_not_a_kernel() {
    let path = temp_file("not-a-kernel", &b"not a kernel\n".repeat(300));
    let line = run_fails(&["--kernel", path.to_str().unwrap()]);
    assert_names(&line, &["not-a-kernel", "not a kernel image"]);
}

#[test]
fn a_missing_kernel() {
    let line = run_fails(&["--kernel", "/nonexistent/vmlinux"]);
    assert_names(&line, &["/nonexistent/vmlinux", "No such file"]);
}

/// An ELF whose loadable segment lies past the end of the file.
#[test]
fn a_truncated_elf_kernel() {
    let mut elf = guests::default_guest().unwrap();
    let full = elf.len();
    elf.truncate(full - 16);
    let path = temp_file("truncated.elf", &elf);
    let line = run_fails(&["--kernel", path.to_str().unwrap()]);
    assert_names(
        &line,
        &[
            "truncated kernel image",
            &format!("{full} bytes"),
            &format!("has {}", full - 16),
        ],
    );
}

/// A bzImage header that promises more protected-mode code than follows.
#[test]
fn a_truncated_bzimage() {
    let mut image = vec![0u8; 8192];
    image[0x1f1] = 4;
    image[0x1f4..0x1f8].copy_from_slice(&0x1000u32.to_le_bytes());
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    let path = temp_file("truncated-bzImage", &image);
    let line = run_fails(&["--kernel", path.to_str().unwrap()]);
    assert_names(&line, &["truncated kernel image", "has 8192"]);
}

#[test]
fn zero_memory() {
    let line = run_fails(&["--memory", "0"]);
    assert_names(&line, &["--memory", "0 MiB"]);
}

#[test]
fn zero_cpus() {
    let line = run_fails(&["--cpus", "0"]);
    assert_names(&line, &["--cpus", "not 0"]);
}

#[test]
fn too_many_cpus() {
    let line = run_fails(&["--cpus", "100000"]);
    assert_names(&line, &["--cpus", "not 100000"]);
}

#[test]
fn more_memory_than_the_host_has() {
    let line = run_fails(&["--memory", "100000000"]);
    assert_names(&line, &["--memory 100000000 MiB", "more than this host"]);
}

#[test]
fn a_missing_disk_file() {
    let line = run_fails(&["--disk", "path=/nonexistent/disk.img"]);
    assert_names(
        &line,
        &["cannot open disk /nonexistent/disk.img", "No such file"],
    );
}

#[test]
fn an_empty_disk_file() {
    let path = temp_file("empty.img", b"");
    let line = run_fails(&["--disk", &format!("path={}", path.display())]);
    assert_names(&line, &["empty.img", "smaller than one 512-byte sector"]);
}

#[test]
fn a_vsock_socket_in_a_missing_folder() {
    let line = run_fails(&["--vsock", "cid=3,socket=/nonexistent/v.sock"]);
    assert_names(
        &line,
        &["cannot listen on vsock socket /nonexistent/v.sock"],
    );
}

#[test]
fn a_tap_name_the_kernel_cannot_take() {
    let line = run_fails(&["--net", "tap=a-name-far-too-long-for-linux"]);
    assert_names(&line, &["TAP name", "longer than 15 bytes"]);
}

#[test]
fn a_control_socket_in_a_missing_folder() {
    let line = run_fails(&["--control", "/nonexistent/control.sock"]);
    assert_names(
        &line,
        &["cannot create control socket /nonexistent/control.sock"],
    );
}

/// `bulkhead ctl` on a socket nobody serves: one line naming it.
#[test]
fn ctl_without_a_vm() {
    let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["ctl", "/nonexistent/control.sock", "status"])
        .output()
        .expect("start bulkhead");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_names(
        &stderr,
        &["cannot talk to control socket /nonexistent/control.sock"],
    );
}

#[test]
fn restoring_a_folder_that_is_not_a_snapshot() {
    let line = run_fails(&["--restore", "/nonexistent/snapshot"]);
    assert_names(
        &line,
        &["/nonexistent/snapshot is not a complete Bulkhead snapshot"],
    );
    let manifest = temp_file("manifest.json", b"{\"format\": \"something else\"}");
    let line = run_fails(&["--restore", manifest.parent().unwrap().to_str().unwrap()]);
    assert_names(&line, &["manifest.json", "not a snapshot manifest"]);
}

#[test]
fn waiting_for_a_migration_on_a_bad_address() {
    let line = run_fails(&["--incoming", "ftp:somewhere"]);
    assert_names(
        &line,
        &[
            "bad migration URI \"ftp:somewhere\"",
            "tcp:IP:PORT (an address, not a name) or unix:PATH",
        ],
    );
    // A name is never looked up.
    let line = run_fails(&["--incoming", "tcp:localhost:4444"]);
    assert_names(&line, &["bad migration URI \"tcp:localhost:4444\""]);
    let line = run_fails(&["--incoming", "unix:/nonexistent/migration.sock"]);
    assert_names(
        &line,
        &["cannot listen on unix:/nonexistent/migration.sock"],
    );
}

/// The destination reads its certificate, key and client CA before it waits
/// (the VMM gets their contents, never their paths): a bad one is named at
/// once, before anything listens.
#[test]
fn incoming_tls_with_unreadable_certificates() {
    let socket = temp_file("tls.sock", b"");
    std::fs::remove_file(&socket).unwrap();
    let uri = format!("unix:{}", socket.display());
    let line = run_fails(&[
        "--incoming",
        &uri,
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]);
    assert_names(&line, &["/nonexistent/cert.pem"]);
    let not_pem = temp_file("not-pem.pem", b"not a certificate");
    let line = run_fails(&[
        "--incoming",
        &uri,
        "--tls-cert",
        not_pem.to_str().unwrap(),
        "--tls-key",
        not_pem.to_str().unwrap(),
    ]);
    assert_names(&line, &["certificate", "no PEM certificate"]);
    assert!(!socket.exists(), "it listened before checking its files");
}

/// `--restore` and `--incoming` take the machine from the snapshot or the
/// source: options that describe one are refused, not ignored.
#[test]
fn restore_with_machine_options() {
    let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--restore", "/tmp/x", "--memory", "64"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

/// A `bulkhead-vmm` beside `bulkhead` from another build is never started:
/// the VM runs in `bulkhead` itself, and the warning says why. The one
/// from the same build is (the report comes from it either way).
#[test]
fn a_vmm_program_from_another_build_is_passed_over() {
    use std::os::unix::fs::PermissionsExt;
    let dir = testkit::TempDir::new("stale-vmm");
    let bulkhead = dir.join("bulkhead");
    std::fs::copy(env!("CARGO_BIN_EXE_bulkhead"), &bulkhead).unwrap();
    let marker = dir.join("stale-vmm-ran");
    let stale = dir.join("bulkhead-vmm");
    std::fs::write(
        &stale,
        format!(
            "#!/bin/sh\n[ \"$1\" = build-id ] && echo 0123456789abcdef && exit 0\ntouch {}\n",
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = || {
        Command::new(&bulkhead)
            .args(["run", "--output", "json"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let output = run();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!marker.exists(), "the stale VMM program ran");
    assert!(
        stderr.contains("from another build") && stderr.contains("0123456789abcdef"),
        "{stderr}"
    );
    // The same build's VMM program runs the VM.
    std::fs::copy(env!("CARGO_BIN_EXE_bulkhead-vmm"), &stale).unwrap();
    let output = run();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("another build"), "{stderr}");
}

/// `--config FILE` takes the API's VM spec; what is wrong in it is named.
#[test]
fn a_bad_config_file_is_named() {
    let missing = run_fails(&["--config", "/nonexistent/vm.json"]);
    assert_names(&missing, &["/nonexistent/vm.json"]);
    let small = temp_file("small.json", br#"{"name": "a", "memory_mib": 1}"#);
    assert_names(
        &run_fails(&["--config", small.to_str().unwrap()]),
        &["memory_mib", "small.json"],
    );
    let unknown = temp_file("unknown.json", br#"{"name": "a", "memroy_mib": 64}"#);
    assert_names(
        &run_fails(&["--config", unknown.to_str().unwrap()]),
        &["memroy_mib"],
    );
    let rate = temp_file(
        "rate.json",
        br#"{"name": "a", "nics": [{"tap": "t0", "rate_limit": {"bytes_per_sec": 0}}]}"#,
    );
    assert_names(
        &run_fails(&["--config", rate.to_str().unwrap()]),
        &["nics[0].rate_limit", "bytes_per_sec"],
    );
}

/// A `--config` file boots the VM it describes (the embedded guest prints
/// what it was given); machine flags cannot be mixed in.
#[test]
fn a_config_file_boots_the_vm_it_describes() {
    let file = temp_file(
        "embedded.json",
        br#"{"name": "embedded", "cpus": 2, "memory_mib": 48, "rng": true}"#,
    );
    let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--output", "json", "--config"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("cpus: 2, memory: 48 MiB"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(stderr.lines().last().unwrap_or_default()).unwrap();
    assert!(
        report["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|device| device["name"] == "rng"),
        "{report}"
    );
    let mixed = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--cpus", "2", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!mixed.status.success());
    assert!(
        String::from_utf8_lossy(&mixed.stderr).contains("cannot be used with"),
        "{mixed:?}"
    );
}
