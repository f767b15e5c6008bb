//! The host daemon end to end: real VMMs (sandboxed, in cgroups) running the
//! counting guest, driven through the REST API and the CLI.

mod boundary;
mod conformance;
mod linux;
mod support;

use hyper::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};
use support::{count_above, read_until, status_field, Daemon};

#[test]
fn a_vm_lives_its_whole_life_through_the_api() {
    let daemon = Daemon::start();
    let id = daemon.running_vm("life");
    let vm = daemon.vm(&id);
    assert_eq!(vm["live"]["state"], "running", "{vm}");
    let pid = daemon.pid(&id);
    assert_eq!(vm["live"]["pid"], pid);

    // Two readers see the same console; the guest counts.
    let client = daemon.client(None);
    let mut first = daemon.block_on(client.console(&id, false)).unwrap();
    let mut second = daemon.block_on(client.console(&id, false)).unwrap();
    let a = count_above(&daemon, &mut first, -1);
    let b = count_above(&daemon, &mut second, a);
    assert!(b > a);
    // One writer at a time.
    let writer = daemon.block_on(client.console(&id, true)).unwrap();
    let refused = daemon.block_on(client.console(&id, true)).err().unwrap();
    assert!(
        refused.to_string().contains("already has a writer"),
        "{refused}"
    );
    drop(writer);
    // The daemon frees the writer's place once it sees the connection go.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match daemon.block_on(client.console(&id, true)) {
            Ok(writer) => break drop(writer),
            Err(e) if Instant::now() < deadline => {
                assert!(e.to_string().contains("already has a writer"), "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the writer's place was never freed: {e}"),
        }
    }

    // Pause freezes the guest; resume lets it go on.
    assert_eq!(
        daemon.ok(Method::POST, &format!("/v1/vms/{id}/pause"), None)["state"],
        "paused"
    );
    assert_eq!(daemon.vm(&id)["live"]["state"], "paused");
    let again = daemon.call(None, Method::POST, &format!("/v1/vms/{id}/pause"), None);
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text);
    assert_eq!(
        daemon.ok(Method::POST, &format!("/v1/vms/{id}/resume"), None)["state"],
        "running"
    );
    count_above(&daemon, &mut first, b);

    // Snapshot into the VM's own directory.
    let snapshot = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/snapshot"),
        Some(json!({"name": "s1"})),
    );
    assert!(
        snapshot["memory_bytes"].as_u64().unwrap_or(0) > 0
            && snapshot["memory_pages_written"].as_u64().unwrap_or(0) > 0,
        "{snapshot}"
    );
    assert!(daemon
        .state_dir
        .join(format!("vms/{id}/jail/snapshots/s1/manifest.json"))
        .exists());
    let twice = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{id}/snapshot"),
        Some(json!({"name": "s1"})),
    );
    assert_eq!(twice.status, StatusCode::CONFLICT);

    // Illegal transitions are 409 and change nothing.
    let start = daemon.call(None, Method::POST, &format!("/v1/vms/{id}/start"), None);
    assert_eq!(start.status, StatusCode::CONFLICT, "{}", start.text);
    assert!(start.error_message().contains("running"), "{}", start.text);
    let delete = daemon.call(None, Method::DELETE, &format!("/v1/vms/{id}"), None);
    assert_eq!(delete.status, StatusCode::CONFLICT);

    // Stop: this guest ignores the shutdown request, so after the timeout
    // the VMM stops it; the record says so.
    let stopped = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"timeout_secs": 1})),
    );
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["last_exit"], "stopped by the host", "{stopped}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(daemon.vm(&id).get("live").is_none());
    // It starts again, and a forced stop kills it.
    daemon.ok(Method::POST, &format!("/v1/vms/{id}/start"), None);
    let forced = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"force": true})),
    );
    assert_eq!(forced["state"], "stopped");

    let deleted = daemon.call(None, Method::DELETE, &format!("/v1/vms/{id}"), None);
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        daemon
            .call(None, Method::GET, &format!("/v1/vms/{id}"), None)
            .status,
        StatusCode::NOT_FOUND
    );
    assert!(!daemon.state_dir.join(format!("vms/{id}")).exists());

    // Every mutating call is in the audit log, with who and the outcome.
    let audit = daemon.ok(Method::GET, "/v1/audit?limit=1000", None);
    let entries = audit.as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["action"] == "POST /v1/vms/{id}/start"
            && e["status"] == 409
            && e["target"] == id.as_str()));
    assert!(entries.iter().any(|e| e["action"] == "DELETE /v1/vms/{id}"
        && e["status"] == 204
        && e["who"] == "local:uid=0"));
}

#[test]
fn a_console_writer_types_and_every_reader_sees_the_guest_answer() {
    use tokio::io::AsyncWriteExt;
    let daemon = Daemon::start();
    let id = daemon.start_vm("echo", &daemon.echo_guest());
    let client = daemon.client(None);
    let mut reader = daemon.block_on(client.console(&id, false)).unwrap();
    // The backlog brings what the guest printed before anyone attached.
    read_until(&daemon, &mut reader, guests::CONSOLE_ECHO_READY);
    let mut writer = daemon.block_on(client.console(&id, true)).unwrap();
    daemon
        .block_on(writer.write_all(b"hello from the host"))
        .unwrap();
    read_until(&daemon, &mut reader, "hello from the host");
    read_until(&daemon, &mut writer, "hello from the host");
    // A reader's keystrokes go nowhere.
    daemon.block_on(reader.write_all(b"ignored")).unwrap();
    daemon.block_on(writer.write_all(b"-again")).unwrap();
    let seen = read_until(&daemon, &mut reader, "-again");
    assert!(!seen.contains("ignored"), "{seen:?}");
    // A viewer may read but not write.
    let viewer = daemon.token("default", "viewer");
    let viewer_client = daemon.client(Some(&viewer));
    assert!(daemon.block_on(viewer_client.console(&id, false)).is_ok());
    let refused = daemon
        .block_on(viewer_client.console(&id, true))
        .err()
        .unwrap();
    assert!(refused.to_string().contains("403"), "{refused}");
}

#[test]
fn the_cli_drives_the_daemon_with_tables_and_json() {
    let daemon = Daemon::start();
    let kernel = daemon.counting_guest();
    let (ok, text) = daemon.cli(&[
        "vm",
        "create",
        "cli-vm",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32",
        "--start",
        "--output",
        "json",
    ]);
    assert!(ok, "{text}");
    let created: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(created["state"], "running");
    let (ok, table) = daemon.cli(&["vm", "ls"]);
    assert!(
        ok && table.contains("cli-vm") && table.contains("running"),
        "{table}"
    );
    for action in ["pause", "resume"] {
        let (ok, text) = daemon.cli(&["vm", action, "cli-vm"]);
        assert!(ok, "{action}: {text}");
    }
    let (ok, text) = daemon.cli(&["vm", "start", "cli-vm"]);
    assert!(!ok && text.contains("409"), "{text}");
    let (ok, text) = daemon.cli(&["vm", "stop", "cli-vm", "--timeout", "1"]);
    assert!(ok, "{text}");
    let (ok, text) = daemon.cli(&["vm", "show", "cli-vm", "--output", "json"]);
    assert!(ok && text.contains("\"stopped\""), "{text}");
    let (ok, text) = daemon.cli(&["vm", "rm", "cli-vm"]);
    assert!(ok, "{text}");
    let (ok, text) = daemon.cli(&["vm", "ls", "--output", "json"]);
    assert!(ok && text.trim() == "[]", "{text}");

    // The embedded guest runs to its end: the VM is recorded as stopped.
    let (ok, text) = daemon.cli(&["vm", "create", "embedded", "--start", "--output", "json"]);
    assert!(ok, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let vm = daemon.wait_state(&id, "stopped");
    assert_eq!(vm["last_exit"], "guest powered off", "{vm}");
}

#[test]
fn bad_requests_get_the_right_status_and_name_the_field() {
    let daemon = Daemon::start();
    let kernel = daemon.counting_guest();
    let post = |body: serde_json::Value| daemon.call(None, Method::POST, "/v1/vms", Some(body));
    let cases = [
        (json!({"name": "a", "cpus": "two"}), "cpus"),
        (json!({"name": "a", "memory_mib": 1}), "memory_mib"),
        (json!({"name": "Not Valid"}), "name"),
        (json!({"name": "a", "kernel": "/etc/passwd"}), "kernel"),
        (
            json!({"name": "a", "kernel": kernel, "disks": [{"path": "/nope"}]}),
            "disks[0].path",
        ),
        (
            json!({"name": "a", "nics": [{"tap": "x", "mac": "zz"}]}),
            "nics[0].mac",
        ),
        (json!({"name": "a", "colour": "blue"}), "body"),
        (json!({"name": "a", "vsock": {"cid": 1}}), "vsock.cid"),
        (json!([1, 2]), "body"),
    ];
    for (body, field) in cases {
        let answer = post(body.clone());
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            answer.text
        );
        assert_eq!(answer.body["error"]["code"], "invalid_request");
        let named = answer.body["error"]["field"].as_str().unwrap_or_default();
        assert!(
            named == field || (field == "body" && !named.is_empty()),
            "{body}: field {named:?}, want {field}"
        );
    }
    // Not JSON at all.
    let raw = daemon.block_on(async {
        let stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        let request = hyper::Request::post("/v1/vms")
            .header("host", "x")
            .body(http_body_util::Full::new(axum_bytes("{\"name\":")))
            .unwrap();
        support::collect(support::send(stream, request).await).await
    });
    assert_eq!(raw.0, StatusCode::BAD_REQUEST, "{}", raw.1);

    // Nothing was half-created.
    assert_eq!(daemon.ok(Method::GET, "/v1/vms", None), json!([]));
    assert_eq!(
        std::fs::read_dir(daemon.state_dir.join("vms"))
            .unwrap()
            .count(),
        0
    );

    // 401: unknown or malformed tokens, on any endpoint.
    for token in [
        "bh_000000000000_00000000000000000000000000000000",
        "garbage",
    ] {
        let answer = daemon.call(Some(token), Method::GET, "/v1/vms", None);
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text);
    }
    // 403: a viewer cannot change anything; an operator cannot make tokens.
    let viewer = daemon.token("default", "viewer");
    let answer = daemon.call(
        Some(&viewer),
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "v"})),
    );
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text);
    let operator = daemon.token("default", "operator");
    let answer = daemon.call(
        Some(&operator),
        Method::POST,
        "/v1/tokens",
        Some(json!({"name": "x", "role": "admin"})),
    );
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    // 404: unknown VMs and endpoints.
    for path in [
        "/v1/vms/0123456789abcdef",
        "/v1/vms/..%2F..%2Fetc",
        "/v1/nothing",
    ] {
        assert_eq!(
            daemon.call(None, Method::GET, path, None).status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    // A duplicate name is a conflict, and leaves one VM.
    daemon.ok(Method::POST, "/v1/vms", Some(json!({"name": "dup"})));
    assert_eq!(post(json!({"name": "dup"})).status, StatusCode::CONFLICT);
    assert_eq!(
        daemon
            .ok(Method::GET, "/v1/vms", None)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Refused calls are audited too.
    let audit = daemon.ok(Method::GET, "/v1/audit?limit=1000", None);
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["status"] == 403 && e["who"].as_str().unwrap().contains("default-viewer")));
    let anonymous = daemon.call(
        Some("garbage"),
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "x"})),
    );
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let audit = daemon.ok(Method::GET, "/v1/audit?limit=1000", None);
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["status"] == 401 && e["who"] == "anonymous"));
}

fn axum_bytes(text: &'static str) -> hyper::body::Bytes {
    hyper::body::Bytes::from_static(text.as_bytes())
}

#[test]
fn a_token_sees_and_touches_only_its_own_project() {
    let daemon = Daemon::start();
    let alpha = daemon.token("alpha", "admin");
    let beta = daemon.token("beta", "operator");
    let kernel = daemon.counting_guest();
    // A VM of beta's, running.
    let created = daemon.call(
        Some(&beta),
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "secret", "kernel": kernel, "memory_mib": 32})),
    );
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(created.body["project"], "beta");
    let started = daemon.call(
        Some(&beta),
        Method::POST,
        &format!("/v1/vms/{id}/start"),
        None,
    );
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);

    // Alpha's admin cannot see it anywhere or touch it in any way.
    let list = daemon.call(Some(&alpha), Method::GET, "/v1/vms", None);
    assert_eq!(list.body, json!([]));
    for (method, path, body) in [
        (Method::GET, format!("/v1/vms/{id}"), None),
        (Method::DELETE, format!("/v1/vms/{id}?force=true"), None),
        (Method::POST, format!("/v1/vms/{id}/start"), None),
        (
            Method::POST,
            format!("/v1/vms/{id}/stop"),
            Some(json!({"force": true})),
        ),
        (Method::POST, format!("/v1/vms/{id}/pause"), None),
        (Method::POST, format!("/v1/vms/{id}/resume"), None),
        (
            Method::POST,
            format!("/v1/vms/{id}/snapshot"),
            Some(json!({"name": "x"})),
        ),
    ] {
        let answer = daemon.call(Some(&alpha), method.clone(), &path, body);
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            answer.text
        );
        // Exactly what an id that does not exist gets.
        assert_eq!(answer.body["error"]["message"], format!("no VM {id}"));
    }
    let console = daemon.block_on(daemon.client(Some(&alpha)).console(&id, false));
    assert!(console.err().unwrap().to_string().contains("404"));
    // Nor create in beta, nor make beta tokens, nor read beta's audit.
    let answer = daemon.call(
        Some(&alpha),
        Method::POST,
        "/v1/vms?project=beta",
        Some(json!({"name": "x"})),
    );
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let answer = daemon.call(
        Some(&alpha),
        Method::POST,
        "/v1/tokens",
        Some(json!({"name": "x", "role": "admin", "project": "beta"})),
    );
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let audit = daemon.call(Some(&alpha), Method::GET, "/v1/audit?limit=1000", None);
    assert!(
        audit
            .body
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["project"] != "beta"),
        "{}",
        audit.text
    );
    let tokens = daemon.call(Some(&alpha), Method::GET, "/v1/tokens", None);
    assert!(tokens
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["project"] == "alpha"));
    // No stored hash leaves the daemon: every listed token's is empty.
    assert!(
        tokens
            .body
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("secret_sha256").is_none_or(|hash| hash == "")),
        "{}",
        tokens.text
    );
    // Metrics and events name none of beta's VMs.
    let metrics = daemon.call(Some(&alpha), Method::GET, "/metrics", None);
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(!metrics.text.contains(&id), "{}", metrics.text);
    // Beta still runs, untouched.
    assert_eq!(daemon.vm(&id)["state"], "running");
    let own = daemon.call(Some(&beta), Method::GET, &format!("/v1/vms/{id}"), None);
    assert_eq!(own.status, StatusCode::OK);

    // Alpha's event stream carries alpha's changes and none of beta's.
    let events = daemon.block_on(async {
        let stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        let request = hyper::Request::get("/v1/events")
            .header("host", "x")
            .header("authorization", format!("Bearer {alpha}"))
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .unwrap();
        support::send(stream, request).await
    });
    let stopped = daemon.call(
        Some(&beta),
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"force": true})),
    );
    assert_eq!(stopped.status, StatusCode::OK);
    let mine = daemon.call(
        Some(&alpha),
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "mine"})),
    );
    assert_eq!(mine.status, StatusCode::CREATED);
    let seen = support::read_events_until(&daemon, events.into_body(), "\"mine\"");
    assert!(!seen.contains(&id) && !seen.contains("beta"), "{seen}");
}

#[test]
fn each_vmm_is_sandboxed_limited_and_a_crash_stays_its_own() {
    let daemon = Daemon::start();
    let victim = daemon.running_vm("victim");
    let bystander = daemon.running_vm("bystander");
    let record = daemon.vm(&victim);
    let pid = daemon.pid(&victim);

    // The VMM's file system is its own directory.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let mut visible: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    visible.sort();
    assert_eq!(visible, ["console.sock", "control.sock"]);
    assert!(!root.join("etc/passwd").exists());
    // Its own uid, no capabilities, a seccomp filter.
    let uid = record["uid"].as_u64().unwrap().to_string();
    // Real, effective, saved and file-system uid: all four its own.
    let uids: Vec<String> = status_field(pid, "Uid")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(uids, [uid.clone(), uid.clone(), uid.clone(), uid]);
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_ne!(daemon.vm(&bystander)["uid"], record["uid"]);
    // Its cgroups (v1 or v2) hold it, with its limits: its vCPUs plus half
    // a CPU, its memory plus 256 MiB (this host has v1; v2's values are
    // unit-tested in host/src/cgroup.rs).
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroups.contains(&format!("bulkhead/{victim}")), "{cgroups}");
    let spec = &record["spec"];
    let cpus = spec["cpus"].as_u64().unwrap();
    let memory = (spec["memory_mib"].as_u64().unwrap() + 256) << 20;
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    };
    match host::cgroup::Cgroups::detect() {
        host::cgroup::Cgroups::V1 {
            cpu,
            memory: memory_root,
        } => {
            let quota = read(cpu.join(&victim).join("cpu.cfs_quota_us"));
            let period = read(cpu.join(&victim).join("cpu.cfs_period_us"));
            assert_eq!(
                (quota, period),
                (format!("{}", cpus * 100_000 + 50_000), "100000".into())
            );
            assert_eq!(
                read(memory_root.join(&victim).join("memory.limit_in_bytes")),
                memory.to_string()
            );
        }
        host::cgroup::Cgroups::V2 { root } => {
            assert_eq!(
                read(root.join(&victim).join("cpu.max")),
                format!("{} 100000", cpus * 100_000 + 50_000)
            );
            assert_eq!(
                read(root.join(&victim).join("memory.max")),
                memory.to_string()
            );
        }
        host::cgroup::Cgroups::Unavailable => {
            panic!("the VMM is in a cgroup the daemon cannot see")
        }
    }

    // A VMM that dies is reported; the daemon and the other VM go on.
    // SAFETY: signals the VMM this test's daemon started.
    unsafe { libc::kill(pid as i32, libc::SIGABRT) };
    let crashed = daemon.wait_state(&victim, "crashed");
    assert!(
        crashed["last_exit"].as_str().unwrap().contains("signal"),
        "{crashed}"
    );
    assert_eq!(daemon.vm(&bystander)["live"]["state"], "running");
    assert!(!cgroups_remain(&victim));
    // A crashed VM can be started again.
    daemon.ok(Method::POST, &format!("/v1/vms/{victim}/start"), None);
}

fn cgroups_remain(id: &str) -> bool {
    [
        "/sys/fs/cgroup/cpu/bulkhead",
        "/sys/fs/cgroup/memory/bulkhead",
        "/sys/fs/cgroup/bulkhead",
    ]
    .iter()
    .any(|dir| std::path::Path::new(dir).join(id).exists())
}

#[test]
fn a_killed_daemon_leaves_vms_running_and_its_successor_adopts_them() {
    let mut daemon = Daemon::start();
    let running = daemon.running_vm("keeps-running");
    let paused = daemon.running_vm("keeps-paused");
    daemon.ok(Method::POST, &format!("/v1/vms/{paused}/pause"), None);
    let ended = daemon.running_vm("ends-meanwhile");
    let pids = [
        daemon.pid(&running),
        daemon.pid(&paused),
        daemon.pid(&ended),
    ];

    daemon.kill9();
    // SAFETY: signals a VMM of this test.
    unsafe { libc::kill(pids[2] as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(std::path::Path::new(&format!("/proc/{}", pids[0])).exists());
    daemon.spawn();

    assert_eq!(daemon.vm(&running)["state"], "running");
    assert_eq!(daemon.pid(&running), pids[0]);
    assert_eq!(daemon.vm(&paused)["state"], "paused");
    assert_eq!(daemon.vm(&ended)["state"], "crashed");
    // The adopted VMMs are fully under control again.
    daemon.ok(Method::POST, &format!("/v1/vms/{paused}/resume"), None);
    let stopped = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{running}/stop"),
        Some(json!({"timeout_secs": 1})),
    );
    assert_eq!(stopped["state"], "stopped");
    // SAFETY: signals a VMM of this test.
    unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) };
    daemon.wait_state(&paused, "crashed");
}

/// Kills the daemon with -9 at many points during create, start and delete,
/// restarts it each time, and checks that its records match the processes.
/// The operations the kill -9 test interrupts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Operation {
    Create,
    Start,
    Delete,
}

impl Operation {
    /// Sends the operation from a thread of its own (the daemon may die
    /// before it answers); the thread returns the answer, or the error of a
    /// call the kill cut short.
    fn send(
        self,
        daemon: &Daemon,
        target: &str,
        kernel: &std::path::Path,
    ) -> std::thread::JoinHandle<anyhow::Result<host::client::Answer>> {
        let client = daemon.client(None);
        let (method, path, body) = match self {
            Operation::Create => (
                Method::POST,
                "/v1/vms".to_string(),
                Some(json!({"name": target, "kernel": kernel, "memory_mib": 32})),
            ),
            Operation::Start => (Method::POST, format!("/v1/vms/{target}/start"), None),
            Operation::Delete => (Method::DELETE, format!("/v1/vms/{target}?force=true"), None),
        };
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(client.call(method, &path, body.as_ref()))
        })
    }
}

/// kill -9 of the daemon in the middle of create, start and delete: after
/// a restart every record matches its process, and an operation the
/// daemon acknowledged before it died has taken effect. Kills land at
/// fractions of each operation's own measured duration, and the test
/// fails unless each operation was cut short (no answer) at least once:
/// a run whose kills all missed tested nothing.
#[test]
fn kill_9_during_create_start_and_delete_leaves_a_consistent_state() {
    let mut daemon = Daemon::start();
    let kernel = daemon.counting_guest();

    // Each operation's duration when nothing interrupts it.
    let timed = |daemon: &Daemon, operation: Operation, target: &str| {
        let started = Instant::now();
        let answer = operation
            .send(daemon, target, &kernel)
            .join()
            .unwrap()
            .unwrap();
        assert!(answer.status.is_success(), "{operation:?}: {}", answer.text);
        started.elapsed()
    };
    let create_time = timed(&daemon, Operation::Create, "timed");
    let id = daemon.ok(Method::GET, "/v1/vms", None)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let start_time = timed(&daemon, Operation::Start, &id);
    let delete_time = timed(&daemon, Operation::Delete, &id);
    eprintln!(
        "uninterrupted: create {create_time:?}, start {start_time:?}, delete {delete_time:?}"
    );

    let mut cut_short = Vec::new();
    for round in 0..12usize {
        let operation = [Operation::Create, Operation::Start, Operation::Delete][round % 3];
        let fraction = [0.1, 0.4, 0.7, 0.95][round / 3];
        // The operation's target: a new name, a stopped VM, a running one.
        let target = match operation {
            Operation::Create => format!("r{round}"),
            Operation::Start => daemon.define_vm(&format!("s{round}"), &kernel),
            Operation::Delete => {
                let id = daemon.define_vm(&format!("d{round}"), &kernel);
                daemon.ok(Method::POST, &format!("/v1/vms/{id}/start"), None);
                id
            }
        };
        let duration = match operation {
            Operation::Create => create_time,
            Operation::Start => start_time,
            Operation::Delete => delete_time,
        };
        let worker = operation.send(&daemon, &target, &kernel);
        std::thread::sleep(duration.mul_f64(fraction));
        daemon.kill9();
        let answer = worker.join().unwrap();
        daemon.spawn();
        check_consistent(&daemon);

        let acknowledged = answer.as_ref().is_ok_and(|a| a.status.is_success());
        if answer.is_err() {
            cut_short.push(operation);
        }
        eprintln!(
            "round {round}: {operation:?} killed at {fraction} of {duration:?}: {}",
            match &answer {
                Ok(answer) => format!("answered {}", answer.status),
                Err(error) => format!("cut short ({error})"),
            }
        );
        // What the daemon acknowledged survived its death.
        if acknowledged {
            let vms = daemon.ok(Method::GET, "/v1/vms", None);
            let found = vms
                .as_array()
                .unwrap()
                .iter()
                .find(|vm| vm["id"] == target.as_str() || vm["spec"]["name"] == target.as_str())
                .cloned();
            match operation {
                Operation::Create => assert!(found.is_some(), "acknowledged create lost: {vms}"),
                Operation::Start => assert_eq!(
                    found.as_ref().map(|vm| vm["state"].clone()),
                    Some(json!("running")),
                    "acknowledged start lost: {vms}"
                ),
                Operation::Delete => assert!(found.is_none(), "acknowledged delete undone: {vms}"),
            }
        }
    }
    for operation in [Operation::Create, Operation::Start, Operation::Delete] {
        assert!(
            cut_short.contains(&operation),
            "no kill landed in the middle of a {operation:?} (cut short: {cut_short:?}); \
             the test proved nothing for it"
        );
    }
}

/// Every record's state matches its process, and no VMM runs without a record.
fn check_consistent(daemon: &Daemon) {
    let vms = daemon.ok(Method::GET, "/v1/vms", None);
    let vms = vms.as_array().unwrap();
    let mut names = std::collections::HashSet::new();
    for vm in vms {
        let id = vm["id"].as_str().unwrap();
        assert!(
            names.insert(vm["spec"]["name"].as_str().unwrap().to_string()),
            "duplicate {vm}"
        );
        let process = host::vmm_process::find_process(id);
        match vm["state"].as_str().unwrap() {
            "running" | "paused" => {
                let pid = process.unwrap_or_else(|| panic!("no VMM for {vm}"));
                assert_eq!(vm["pid"].as_u64(), Some(u64::from(pid)), "{vm}");
                assert!(daemon.vm(id)["live"].is_object(), "{vm}");
            }
            "stopped" | "crashed" => assert!(process.is_none(), "a VMM runs for {vm}"),
            other => panic!("VM left {other} after a restart: {vm}"),
        }
    }
    // VMMs without a record: a dir in vms/ means a record or a finished delete.
    for entry in std::fs::read_dir(daemon.state_dir.join("vms"))
        .unwrap()
        .flatten()
    {
        let id = entry.file_name().to_string_lossy().into_owned();
        if !vms.iter().any(|vm| vm["id"] == id.as_str()) {
            assert!(
                host::vmm_process::find_process(&id).is_none(),
                "VMM {id} runs without a record"
            );
        }
    }
}

#[test]
fn metrics_events_and_the_openapi_document() {
    let daemon = Daemon::start();
    let token = daemon.token("default", "viewer");
    // Subscribe to events before the VM starts.
    let events = daemon.block_on(async {
        let stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        let request = hyper::Request::get("/v1/events")
            .header("host", "x")
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .unwrap();
        support::send(stream, request).await
    });
    assert_eq!(events.status(), StatusCode::OK);
    let id = daemon.running_vm("watched");
    let seen = support::read_events_until(&daemon, events.into_body(), "\"running\"");
    assert!(
        seen.contains("event: state") && seen.contains(&id) && seen.contains("\"starting\""),
        "{seen}"
    );

    // Metrics for the running VM (the vCPUs' figures appear once the VMM
    // has sampled them: a fraction of a second).
    let families = [
        "bulkhead_vms{state=\"running\"} 1",
        "bulkhead_vm_process_cpu_seconds_total{vm=\"",
        "bulkhead_vm_vcpu_seconds_total{vm=\"",
        "bulkhead_vm_resident_bytes{vm=\"",
        "bulkhead_vm_exits_total{vm=\"",
        "bulkhead_daemon_resident_bytes ",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = daemon.call(Some(&token), Method::GET, "/metrics", None);
        assert_eq!(metrics.status, StatusCode::OK);
        if families.iter().all(|f| metrics.text.contains(f)) || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for family in families {
        assert!(
            metrics.text.contains(family),
            "no {family} in\n{}",
            metrics.text
        );
    }
    // Without a token over... the Unix socket as root needs none; a bad one is refused.
    assert_eq!(
        daemon
            .call(Some("bh_x"), Method::GET, "/metrics", None)
            .status,
        StatusCode::UNAUTHORIZED
    );

    // The served document is the checked-in one.
    let served = daemon.call(None, Method::GET, "/v1/openapi.json", None);
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../host/openapi.json"))
            .unwrap();
    assert!(
        served.text == checked_in,
        "the served OpenAPI document differs from host/openapi.json"
    );
}

#[test]
fn the_api_is_served_over_tls_with_tokens_required() {
    let dir = testkit::TempDir::new("daemon-tls");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["bulkhead-host".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let daemon = Daemon::start_with(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ]);
    let log = daemon.log();
    let addr = log
        .lines()
        .find_map(|line| line.strip_prefix("bulkhead: serving on https://"))
        .unwrap_or_else(|| panic!("no https address in {log}"))
        .to_string();
    let token = daemon.token("default", "viewer");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let get = |token: Option<String>| {
        let connector = connector.clone();
        let addr = addr.clone();
        daemon.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("bulkhead-host").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let mut request = hyper::Request::get("/v1/vms").header("host", "bulkhead-host");
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            let request = request
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .unwrap();
            support::collect(support::send(tls, request).await).await
        })
    };
    // Over TCP nobody is local: no token, no answer.
    assert_eq!(get(None).0, StatusCode::UNAUTHORIZED);
    assert_eq!(get(Some(token.clone())), (StatusCode::OK, "[]".to_string()));

    // The CLI over https, trusting the CA it is given.
    let cli = |ca: &std::path::Path, token: Option<&str>| {
        let mut command = std::process::Command::new(support::BIN);
        command
            .args(["vm", "ls", "--output", "json", "--ca"])
            .arg(ca)
            .env("BULKHEAD_SOCKET", format!("https://{addr}"));
        if let Some(token) = token {
            command.env("BULKHEAD_TOKEN", token);
        }
        let output = command.output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    let (ok, text) = cli(&cert_path, Some(&token));
    assert!(ok && text.trim() == "[]", "{text}");
    let (ok, text) = cli(&cert_path, None);
    assert!(!ok && text.contains("401"), "{text}");
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&other_key)
        .unwrap();
    let other_path = dir.join("other.pem");
    std::fs::write(&other_path, other.pem()).unwrap();
    let (ok, text) = cli(&other_path, Some(&token));
    assert!(
        !ok && text.contains("TLS"),
        "a CA that did not sign the daemon's certificate: {text}"
    );
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let dir = testkit::TempDir::new("daemon-plain");
    let output = std::process::Command::new(support::BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--socket"])
        .arg(dir.join("s.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("needs --tls-cert and --tls-key"), "{text}");
}

#[test]
fn a_vm_restores_from_its_snapshot_and_migrates_live_to_another_vm() {
    let daemon = Daemon::start();
    let source = daemon.running_vm("source");
    let client = daemon.client(None);
    let mut console = daemon.block_on(client.console(&source, false)).unwrap();
    let before = count_above(&daemon, &mut console, -1);

    // Snapshot, stop, restore: the count goes on from where it was saved.
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{source}/snapshot"),
        Some(json!({"name": "saved"})),
    );
    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{source}/stop"),
        Some(json!({"force": true})),
    );
    let missing = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{source}/start"),
        Some(json!({"restore": "nope"})),
    );
    assert_eq!(missing.status, StatusCode::BAD_REQUEST, "{}", missing.text);
    assert_eq!(missing.body["error"]["field"], "restore");
    let restored = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{source}/start"),
        Some(json!({"restore": "saved"})),
    );
    assert_eq!(restored["state"], "running", "{restored}");
    let mut console = daemon.block_on(client.console(&source, false)).unwrap();
    let after_restore = count_above(&daemon, &mut console, before);
    assert!(after_restore > before);

    // A second VM waits for a migration; the first moves into it, running.
    let destination = daemon.define_vm("destination", &daemon.counting_guest());
    let uri = format!("tcp:127.0.0.1:{}", support::free_port());
    let bad = daemon.call(
        None,
        Method::POST,
        &format!("/v1/vms/{destination}/start"),
        Some(json!({"incoming": "unix:/tmp/x"})),
    );
    assert_eq!(bad.body["error"]["field"], "incoming", "{}", bad.text);
    let waiting = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{destination}/start"),
        Some(json!({"incoming": uri, "incoming_from": "127.0.0.1"})),
    );
    assert_eq!(waiting["state"], "starting", "{waiting}");
    let seen = count_above(&daemon, &mut console, after_restore);
    let report = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{source}/migrate"),
        Some(json!({"uri": uri, "verify_memory": true})),
    );
    assert!(report["downtime_ms"].as_f64().is_some(), "{report}");
    let gone = daemon.wait_state(&source, "stopped");
    assert!(
        gone["last_exit"].as_str().unwrap().starts_with("migrated"),
        "{gone}"
    );
    daemon.wait_state(&destination, "running");
    let mut moved = daemon
        .block_on(client.console(&destination, false))
        .unwrap();
    count_above(&daemon, &mut moved, seen);
}

#[test]
fn a_daemon_at_its_request_limit_answers_503_and_recovers() {
    let daemon = Daemon::start_with(&["--max-requests", "1"]);
    let id = daemon.running_vm("slow-to-stop");
    // This guest ignores the shutdown request: the stop holds the only slot
    // for its whole timeout.
    let socket = daemon.socket.clone();
    let path = format!("/v1/vms/{id}/stop");
    let stop = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = host::client::Client {
            endpoint: host::client::Endpoint::Unix(socket),
            token: None,
        };
        runtime
            .block_on(client.call(Method::POST, &path, Some(&json!({"timeout_secs": 3}))))
            .unwrap()
    });
    // A fixed wait for the stop to take the slot (it holds it for 3 s): a
    // probe would itself take the only slot and get the stop refused.
    std::thread::sleep(Duration::from_millis(500));
    let busy = daemon.call(None, Method::GET, "/v1/vms", None);
    assert_eq!(
        busy.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        busy.text
    );
    assert_eq!(busy.body["error"]["code"], "overloaded");
    let stopped = stop.join().unwrap();
    assert_eq!(stopped.status, StatusCode::OK, "{}", stopped.text);
    assert_eq!(
        daemon.ok(Method::GET, "/v1/vms", None)[0]["state"],
        "stopped"
    );
}

/// Every device option the VMM has is in the API: a disk's id and rate
/// limits, a NIC's rate limits (checked in the spec's unit tests), rng and a
/// balloon reach the running VMM and the machine its snapshot records.
#[test]
fn every_device_option_reaches_the_vmm_through_the_api() {
    let daemon = Daemon::start();
    let disk = daemon.images.join("options.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let created = daemon.ok(
        Method::POST,
        "/v1/vms",
        Some(json!({
            "name": "options", "kernel": daemon.counting_guest(), "memory_mib": 32,
            "disks": [{"path": disk, "id": "data-1",
                       "rate_limit": {"bytes_per_sec": 1048576, "ops_per_sec": 100}}],
            "rng": true,
            "balloon": {"target_mib": 4, "deflate_on_oom": true},
            "shared_memory": true
        })),
    );
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["spec"]["disks"][0]["id"], "data-1", "{created}");
    assert_eq!(created["spec"]["rng"], true, "{created}");
    // An option the VMM could not enforce is refused, naming it.
    let bad = daemon.call(
        None,
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "bad-options", "memory_mib": 32,
                    "balloon": {"target_mib": 64}})),
    );
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text);
    assert_eq!(
        bad.body["error"]["field"], "balloon.target_mib",
        "{}",
        bad.text
    );

    daemon.ok(Method::POST, &format!("/v1/vms/{id}/start"), None);
    let live = &daemon.vm(&id)["live"];
    let devices: Vec<&str> = live["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|device| device["name"].as_str())
        .collect();
    for device in ["vda", "rng", "balloon"] {
        assert!(devices.contains(&device), "{device} missing: {live}");
    }
    assert!(live["balloon"].is_object(), "{live}");
    // The sandboxed VMM made its guest RAM a memfd.
    let pid = live["pid"].as_u64().expect("the VMM's pid");
    let memfd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .any(|target| {
            target
                .to_string_lossy()
                .starts_with("/memfd:bulkhead-guest-ram")
        });
    assert!(memfd, "no guest memfd in VMM {pid}");

    daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/snapshot"),
        Some(json!({"name": "s"})),
    );
    let state = daemon
        .state_dir
        .join(format!("vms/{id}/jail/snapshots/s/state.json"));
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
    let machine = &state["machine"];
    assert_eq!(machine["disks"][0]["id"], "data-1", "{machine}");
    assert_eq!(
        machine["disks"][0]["rate_limit"],
        json!({"bytes_per_sec": 1048576, "ops_per_sec": 100}),
        "{machine}"
    );
    assert_eq!(machine["rng"], true, "{machine}");
    assert_eq!(machine["shared_memory"], true, "{machine}");
    assert_eq!(machine["balloon"]["target_mib"], 4, "{machine}");
    assert_eq!(machine["balloon"]["deflate_on_oom"], true, "{machine}");
}
