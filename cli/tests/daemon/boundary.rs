//! The VMM boundary, attacked as a tenant would: each test is one attack that
//! once worked, and fails if it works again. What a VMM holds is read from
//! `/proc/PID/fd`, who it is from `/proc/PID/status`.

use crate::support::{count_above, free_port, status_field, Authority, Daemon, BIN};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The files a process holds open.
fn open_files(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn holds(pid: u32, path: &Path) -> bool {
    open_files(pid).iter().any(|held| held == path)
}

/// A 1 MiB disk image with a recognisable first sector.
fn disk(path: &Path, mark: &str) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..mark.len()].copy_from_slice(mark.as_bytes());
    std::fs::write(path, bytes).unwrap();
    path.canonicalize().unwrap()
}

fn assert_confined(daemon: &Daemon, id: &str, pid: u32) {
    let uid = daemon.vm(id)["uid"].as_u64().unwrap().to_string();
    let uids: Vec<String> = status_field(pid, "Uid")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(uids, [uid.clone(), uid.clone(), uid.clone(), uid]);
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp"), "2");
}

/// Replaces a snapshot's state as its VM could: the manifest's checksum and
/// size recomputed, so only the content says it was tampered with.
fn write_state(snapshot: &Path, state: &serde_json::Value) {
    let bytes = serde_json::to_vec(state).unwrap();
    std::fs::write(snapshot.join("state.json"), &bytes).unwrap();
    let manifest_path = snapshot.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    for file in manifest["files"].as_array_mut().unwrap() {
        if file["name"] == "state.json" {
            file["crc32"] = json!(crc32fast::hash(&bytes));
            file["bytes"] = json!(bytes.len());
        }
    }
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

/// A VMM the test runs itself, outside the daemon: the "peer" of a migration,
/// which may describe any machine it likes.
struct Peer {
    child: std::process::Child,
    control: PathBuf,
}

impl Peer {
    fn start(dir: &Path, kernel: &Path, disk: Option<&Path>) -> Peer {
        let control = dir.join(format!("peer-{}.sock", std::process::id()));
        // An earlier peer's, left behind when it was killed.
        let _ = std::fs::remove_file(&control);
        let mut command = Command::new(BIN);
        command
            .args(["run", "--memory", "32", "--kernel"])
            .arg(kernel)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(disk) = disk {
            command
                .arg("--disk")
                .arg(format!("path={}", disk.display()));
        }
        let child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !control.exists() {
            assert!(Instant::now() < deadline, "the peer never served control");
            std::thread::sleep(Duration::from_millis(20));
        }
        Peer { child, control }
    }

    fn migrate(&self, uri: &str) -> (bool, String) {
        self.migrate_with(uri, &[])
    }

    fn migrate_with(&self, uri: &str, options: &[&str]) -> (bool, String) {
        let output = Command::new(BIN)
            .arg("ctl")
            .arg(&self.control)
            .args(["migrate", uri])
            .args(options)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_incoming_vmm_is_confined_before_a_peer_speaks_and_builds_its_own_machine() {
    let daemon = Daemon::start();
    let kernel = daemon.counting_guest();
    let ours = disk(&daemon.images.join("ours.img"), "ours");
    let outside = disk(&daemon.dir.join("outside/victim.img"), "victim");
    let created = daemon.ok(
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "dest", "kernel": kernel, "memory_mib": 32,
                    "disks": [{"path": ours}]})),
    );
    let id = created["id"].as_str().unwrap().to_string();
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let waiting = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        Some(json!({"incoming": uri, "incoming_from": "127.0.0.1"})),
    );
    assert_eq!(waiting["state"], "starting", "{waiting}");
    let pid = daemon.pid(&id);
    // Nobody has connected yet, and it is already who it will be.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_field(pid, "Seccomp") != "2" {
        assert!(
            Instant::now() < deadline,
            "the waiting VMM never confined itself"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_confined(&daemon, &id, pid);
    assert!(holds(pid, &ours), "{:?}", open_files(pid));

    // A peer whose machine names a disk outside every storage directory.
    let peer = Peer::start(&daemon.dir, &kernel, Some(&outside));
    let (migrated, text) = peer.migrate(&uri);
    assert!(migrated, "{text}");
    let running = daemon.wait_state(&id, "running");
    let pid = running["pid"].as_u64().unwrap() as u32;
    assert!(holds(pid, &ours), "{:?}", open_files(pid));
    assert!(!holds(pid, &outside), "{:?}", open_files(pid));
    assert_eq!(&std::fs::read(&outside).unwrap()[..6], b"victim");
    let client = daemon.client(None);
    let mut console = daemon.block_on(client.console(&id, false)).unwrap();
    count_above(&daemon, &mut console, -1);
    drop(peer);

    // A peer of another shape (no disk) is refused, and survives it.
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"force": true})),
    );
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        Some(json!({"incoming": uri, "incoming_from": "127.0.0.1"})),
    );
    let mut peer = Peer::start(&daemon.dir, &kernel, None);
    let (migrated, text) = peer.migrate(&uri);
    assert!(!migrated, "{text}");
    assert!(text.contains("disks"), "{text}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        peer.running(),
        "a refused migration must leave the source running"
    );
}

#[test]
fn a_restore_rebuilds_the_daemons_machine_whatever_the_snapshot_says() {
    let daemon = Daemon::start();
    let ours = disk(&daemon.images.join("ours.img"), "ours");
    let outside = disk(&daemon.dir.join("outside/victim.img"), "victim");
    let created = daemon.ok(
        Method::POST,
        "/v1/vms",
        Some(
            json!({"name": "vm", "kernel": daemon.counting_guest(), "memory_mib": 32,
                    "disks": [{"path": ours}], "vsock": {"cid": 7}}),
        ),
    );
    let id = created["id"].as_str().unwrap().to_string();
    daemon.ok(Method::POST, &format!("/v1/vms/{id}/start"), None);
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/snapshot"),
        Some(json!({"name": "s"})),
    );
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"force": true})),
    );

    // The VM (its uid owns the directory) rewrites its snapshot: its disk is
    // now a host file outside, its vsock socket a file to be replaced.
    let victim_socket = daemon.dir.join("outside/not-a-socket");
    std::fs::write(&victim_socket, b"keep me").unwrap();
    let snapshot = daemon.state_dir.join(format!("vms/{id}/jail/snapshots/s"));
    let state_path = snapshot.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["machine"]["disks"][0]["path"] = json!(outside);
    state["machine"]["vsock"]["socket"] = json!(victim_socket);
    write_state(&snapshot, &state);

    let restored = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        Some(json!({"restore": "s"})),
    );
    assert_eq!(restored["state"], "running", "{restored}");
    let pid = daemon.pid(&id);
    assert_confined(&daemon, &id, pid);
    assert!(holds(pid, &ours), "{:?}", open_files(pid));
    assert!(!holds(pid, &outside), "{:?}", open_files(pid));
    assert_eq!(std::fs::read(&victim_socket).unwrap(), b"keep me");
    assert_eq!(&std::fs::read(&outside).unwrap()[..6], b"victim");

    // A snapshot of another shape is refused with the reason.
    state["machine"]["rng"] = json!(true);
    write_state(&snapshot, &state);
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"force": true})),
    );
    let refused = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        Some(json!({"restore": "s"})),
    );
    assert!(!refused.status.is_success(), "{}", refused.text);
    assert!(
        refused.text.contains("does not fit") && refused.text.contains("entropy"),
        "{}",
        refused.text
    );
}

#[test]
fn a_link_swapped_under_a_disk_never_reaches_a_vmm() {
    let daemon = Daemon::start();
    let path = daemon.images.join("swap.img");
    let inside = disk(&daemon.images.join("real.img"), "real");
    let outside = disk(&daemon.dir.join("outside/victim.img"), "victim");
    std::fs::copy(&inside, &path).unwrap();
    let created = daemon.ok(
        Method::POST,
        "/v1/vms",
        Some(
            json!({"name": "swap", "kernel": daemon.counting_guest(), "memory_mib": 32,
                    "disks": [{"path": path}]}),
        ),
    );
    let id = created["id"].as_str().unwrap().to_string();

    // Flips `path` between a regular file and a link to the outside file.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, path, outside, inside) =
            (stop.clone(), path.clone(), outside.clone(), inside.clone());
        std::thread::spawn(move || {
            let staged_link = path.with_extension("link");
            let staged_file = path.with_extension("file");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::remove_file(&staged_link);
                std::os::unix::fs::symlink(&outside, &staged_link).unwrap();
                std::fs::rename(&staged_link, &path).unwrap();
                std::thread::sleep(Duration::from_millis(1));
                let _ = std::fs::remove_file(&staged_file);
                std::fs::hard_link(&inside, &staged_file).unwrap();
                std::fs::rename(&staged_file, &path).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let rounds = 60;
    let (mut started, mut refused) = (0, 0);
    for _ in 0..rounds {
        let answer = daemon.call(None, Method::POST, &format!("/v1/vms/{id}/start"), None);
        if answer.status.is_success() {
            started += 1;
            let pid = daemon.pid(&id);
            assert!(
                !holds(pid, &outside),
                "round {started}: {:?}",
                open_files(pid)
            );
            daemon.ok(
                Method::POST,
                &format!("/v1/vms/{id}/stop"),
                Some(json!({"force": true})),
            );
        } else {
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
            refused += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    eprintln!("{rounds} starts under a swapping link: {started} started, {refused} refused");
    assert_eq!(started + refused, rounds);
    assert_eq!(&std::fs::read(&outside).unwrap()[..6], b"victim");
}

#[test]
fn a_disk_belongs_to_its_project_and_has_one_writer() {
    let daemon = Daemon::start();
    let alpha = daemon.token("alpha", "operator");
    let beta = daemon.token("beta", "operator");
    let kernel = daemon.counting_guest();
    let shared = disk(&daemon.images.join("alpha.img"), "alpha");
    let spec = |name: &str, readonly: bool| {
        json!({"name": name, "kernel": kernel, "memory_mib": 32,
               "disks": [{"path": shared, "readonly": readonly}]})
    };
    let first = daemon.call(
        Some(&alpha),
        Method::POST,
        "/v1/vms",
        Some(spec("a1", false)),
    );
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let first = first.body["id"].as_str().unwrap().to_string();
    let started = daemon.call(
        Some(&alpha),
        Method::POST,
        &format!("/v1/vms/{first}/start"),
        None,
    );
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);

    // Another project cannot name it, by its path or by another name.
    let hard_link = daemon.images.join("also-alpha.img");
    std::fs::hard_link(&shared, &hard_link).unwrap();
    for path in [shared.clone(), hard_link] {
        let mut theirs = spec("b1", false);
        theirs["disks"][0]["path"] = json!(path);
        let refused = daemon.call(Some(&beta), Method::POST, "/v1/vms", Some(theirs));
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.text);
        assert_eq!(
            refused.body["error"]["field"], "disks[0].path",
            "{}",
            refused.text
        );
        assert!(refused.text.contains("another project"), "{}", refused.text);
    }

    // In its own project, a second VM cannot open it while the first writes it.
    let mut waiting = Vec::new();
    for (name, readonly) in [("a2", false), ("a3", true)] {
        let second = daemon.call(
            Some(&alpha),
            Method::POST,
            "/v1/vms",
            Some(spec(name, readonly)),
        );
        assert_eq!(second.status, StatusCode::CREATED, "{}", second.text);
        let second = second.body["id"].as_str().unwrap().to_string();
        let refused = daemon.call(
            Some(&alpha),
            Method::POST,
            &format!("/v1/vms/{second}/start"),
            None,
        );
        assert!(!refused.status.is_success(), "{}", refused.text);
        assert!(refused.text.contains("in use"), "{}", refused.text);
        assert_eq!(daemon.vm(&second)["state"], "stopped");
        waiting.push(second);
    }
    // Once the writer stops, the disk is free again.
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{first}/stop"),
        Some(json!({"force": true})),
    );
    let a3 = &waiting[1];
    let started = daemon.call(
        Some(&alpha),
        Method::POST,
        &format!("/v1/vms/{a3}/start"),
        None,
    );
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
}

#[test]
fn a_failed_migration_reveals_nothing_and_leaves_the_source_running() {
    let daemon = Daemon::start();
    let source = daemon.running_vm("source");
    let pid = daemon.pid(&source);
    // Something that is not a Bulkhead destination answers at the address.
    let impostor = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = impostor.local_addr().unwrap().port();
    let banner = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut stream, _)) = impostor.accept() {
            let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2 secret-banner\r\n");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let failed = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{source}/migrate"),
        Some(json!({"uri": format!("tcp:127.0.0.1:{port}")})),
    );
    banner.join().unwrap();
    assert!(!failed.status.is_success(), "{}", failed.text);
    assert!(
        failed.text.contains("keeps running here"),
        "{}",
        failed.text
    );
    for revealing in ["SSH", "secret-banner", "HELLO", "frame", "refused"] {
        assert!(
            !failed.text.contains(revealing),
            "{revealing}: {}",
            failed.text
        );
    }
    // A name instead of an address is refused before anything is tried.
    let named = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{source}/migrate"),
        Some(json!({"uri": format!("tcp:localhost:{port}")})),
    );
    assert_eq!(named.status, StatusCode::BAD_REQUEST, "{}", named.text);
    assert_eq!(named.body["error"]["field"], "uri", "{}", named.text);
    // Same process, still running.
    let vm = daemon.vm(&source);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(daemon.pid(&source), pid);
    let client = daemon.client(None);
    let mut console = daemon.block_on(client.console(&source, false)).unwrap();
    count_above(&daemon, &mut console, -1);
}

/// How a VMM ended is what it wrote to its exit-report descriptor, typed;
/// nothing in its log (where a guest's doings show up) can say otherwise.
#[test]
fn how_a_vmm_ended_comes_from_its_report_never_from_its_log() {
    let daemon = Daemon::start();
    let victim = daemon.running_vm("forged-log");
    let dir = daemon.state_dir.join("vms").join(&victim);
    let pid = daemon.pid(&victim);
    // The report's file is outside the VMM's root: it holds only a descriptor.
    let report = dir.join("exit-report.json");
    assert!(holds(pid, &report), "{:?}", open_files(pid));
    assert_eq!(std::fs::metadata(&report).unwrap().len(), 0);
    // A line that reads like the old JSON report, in the log...
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("vmm.log"))
        .unwrap();
    std::io::Write::write_all(
        &mut log,
        b"{\"exit\":\"guest powered off\",\"clean\":true}\n",
    )
    .unwrap();
    drop(log);
    // ...does not turn a killed VMM into a clean stop.
    // SAFETY: signals the VMM this test's daemon started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let crashed = daemon.wait_state(&victim, "crashed");
    assert!(
        crashed["last_exit"].as_str().unwrap().contains("signal"),
        "{crashed}"
    );

    // A VMM that ends as asked says so in its report.
    daemon.ok(Method::POST, &format!("/v1/vms/{victim}/start"), None);
    let stopped = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{victim}/stop"),
        Some(json!({"timeout_secs": 1})),
    );
    assert_eq!(stopped["last_exit"], "stopped by the host", "{stopped}");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(written, json!({"version": 1, "exit": "stopped"}));
}

/// The daemon's VMMs are the VMM program, which links none of the daemon's
/// code (an API server in every VM's process is attack surface and memory).
#[test]
fn each_vm_runs_in_the_vmm_program_without_the_daemons_code() {
    let daemon = Daemon::start();
    let id = daemon.running_vm("lean");
    let exe = std::fs::read_link(format!("/proc/{}/exe", daemon.pid(&id))).unwrap();
    assert_eq!(
        exe.file_name().unwrap(),
        "bulkhead-vmm",
        "{}",
        exe.display()
    );
    // It has no `serve` to run.
    let output = Command::new(&exe).arg("serve").output().unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unrecognized subcommand"),
        "{output:?}"
    );
}

/// A destination takes only the source it was told to expect, and waits only
/// so long: another peer is dropped unheard, and at the deadline the VM stops.
#[test]
fn an_incoming_vm_takes_only_its_expected_source_until_its_deadline() {
    use std::io::{Read, Write};
    // A source on another host needs migration TLS.
    let ca = Authority::new("expects");
    let daemon = Daemon::start_with_migration_tls(&ca);
    let id = daemon.define_vm("expects", &daemon.counting_guest());
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    // No source named: refused, naming the field.
    let unnamed = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        Some(json!({"incoming": uri})),
    );
    assert_eq!(unnamed.status, StatusCode::BAD_REQUEST, "{}", unnamed.text);
    assert_eq!(
        unnamed.body["error"]["field"], "incoming_from",
        "{}",
        unnamed.text
    );
    // Expecting a host that is not this one (TEST-NET-1; nothing is sent there).
    let started = Instant::now();
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        Some(json!({"incoming": uri, "incoming_from": "192.0.2.1", "incoming_timeout_secs": 4})),
    );
    let address = uri.strip_prefix("tcp:").unwrap();
    let mut intruder = std::net::TcpStream::connect(address).unwrap();
    intruder
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = intruder.write_all(b"anything at all");
    // Dropped without a word: no REFUSE frame, just the end of the stream.
    let mut answer = Vec::new();
    let _ = intruder.read_to_end(&mut answer);
    assert!(answer.is_empty(), "the intruder was answered: {answer:?}");
    assert_eq!(daemon.vm(&id)["state"], "starting");
    let stopped = daemon.wait_state(&id, "stopped");
    assert!(started.elapsed() >= Duration::from_secs(4));
    let why = stopped["last_exit"].as_str().unwrap();
    assert!(
        why.contains("expected source before the deadline"),
        "{stopped}"
    );
}

/// Without migration TLS a daemon migrates on loopback only: another host is
/// refused before anything is sent, naming what is missing.
#[test]
fn without_migration_tls_migrations_stay_on_loopback() {
    let daemon = Daemon::start();
    let source = daemon.running_vm("plain");
    // TEST-NET-1: nothing is sent there.
    let refused = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{source}/migrate"),
        Some(json!({"uri": "tcp:192.0.2.1:4444"})),
    );
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.text);
    assert_eq!(refused.body["error"]["field"], "uri", "{}", refused.text);
    assert!(
        refused.text.contains("--migration-tls-cert"),
        "{}",
        refused.text
    );
    let id = &daemon.define_vm("plain-in", &daemon.counting_guest());
    let refused = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        Some(json!({"incoming": format!("tcp:127.0.0.1:{}", free_port()), "incoming_from": "192.0.2.1"})),
    );
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.text);
    assert_eq!(
        refused.body["error"]["field"], "incoming_from",
        "{}",
        refused.text
    );
    assert_eq!(daemon.vm(id)["state"], "stopped");
    assert_eq!(daemon.vm(&source)["state"], "running");
}

/// Waits until something listens on 127.0.0.1:`port` (without connecting:
/// a destination takes one connection only).
fn wait_until_bound(port: u16, waiting: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
        assert!(
            waiting.try_wait().unwrap().is_none(),
            "the destination ended"
        );
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With migration TLS, a migration between daemons is mutual TLS: it goes
/// through between hosts of one CA, a source refuses a destination of
/// another CA (and runs on), and a destination refuses a source that shows
/// no certificate or one of another CA.
#[test]
fn migrations_between_daemons_are_mutual_tls() {
    let (ca, stranger) = (Authority::new("ours"), Authority::new("theirs"));
    let daemon = Daemon::start_with_migration_tls(&ca);
    let source = daemon.running_vm("tls-source");
    let pid = daemon.pid(&source);

    // A destination whose certificate another CA signed.
    let port = free_port();
    let (cert, key) = stranger.issue();
    let mut impostor = Command::new(BIN)
        .args(["run", "--incoming", &format!("tcp:127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until_bound(port, &mut impostor);
    let failed = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{source}/migrate"),
        Some(json!({"uri": format!("tcp:127.0.0.1:{port}")})),
    );
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert!(!failed.status.is_success(), "{}", failed.text);
    assert_eq!(daemon.vm(&source)["state"], "running");
    assert_eq!(daemon.pid(&source), pid);

    // Sources a destination of this daemon must refuse.
    let destination = daemon.define_vm("tls-dest", &daemon.counting_guest());
    let kernel = daemon.counting_guest();
    let (their_cert, their_key) = stranger.issue();
    let ca_file = ca.ca_file();
    let trusting = [
        "--tls-ca",
        ca_file.to_str().unwrap(),
        "--tls-server-name",
        "127.0.0.1",
    ];
    let strangers = [
        "--tls-cert",
        their_cert.to_str().unwrap(),
        "--tls-key",
        their_key.to_str().unwrap(),
    ];
    for (who, credentials) in [
        ("no certificate", &[][..]),
        ("another CA's", &strangers[..]),
    ] {
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        daemon.ok(
            Method::POST,
            &format!("/v1/vms/{destination}/start"),
            Some(json!({"incoming": uri, "incoming_from": "127.0.0.1"})),
        );
        let mut peer = Peer::start(&daemon.dir, &kernel, None);
        let options: Vec<&str> = trusting.iter().chain(credentials).copied().collect();
        let (migrated, text) = peer.migrate_with(&uri, &options);
        assert!(!migrated, "a source with {who} got in: {text}");
        assert!(peer.running(), "{who}: the peer stopped");
        let stopped = daemon.wait_state(&destination, "stopped");
        let why = stopped["last_exit"].as_str().unwrap_or_default();
        assert!(why.contains("TLS"), "{who}: {stopped}");
        drop(peer);
    }

    // Between two hosts of the CA (this daemon plays both): through.
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{destination}/start"),
        Some(json!({"incoming": uri, "incoming_from": "127.0.0.1"})),
    );
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{source}/migrate"),
        Some(json!({"uri": uri})),
    );
    daemon.wait_state(&source, "stopped");
    daemon.wait_state(&destination, "running");
    let client = daemon.client(None);
    let mut console = daemon
        .block_on(client.console(&destination, false))
        .unwrap();
    count_above(&daemon, &mut console, -1);
}
