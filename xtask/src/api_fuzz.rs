//! `cargo xtask api-fuzz`: property-based tests of the host API from its own
//! OpenAPI document, with schemathesis (from PyPI, cached in a venv).
//!
//! A daemon runs inside a network namespace of its own (VMs the fuzzer
//! defines may ask for TAP devices: they are made there, never on the
//! host); schemathesis runs in the same namespace against its loopback
//! listener. Every check schemathesis has runs (all enabled in its config
//! file rather than by `--checks all`, which would override the two
//! per-operation exceptions in CONFIG): no 5xx,
//! each status, content type, header and body the one the document lists
//! for it, invalid data refused and valid data taken, auth enforced, a
//! deleted VM gone and a created one there. All four phases run: examples,
//! coverage, fuzzing, and the stateful phase, which follows the document's
//! OpenAPI links (define a VM, then start, pause, snapshot, stop, delete it;
//! create a token, then revoke it; in a pass of its own, so that it never
//! learns, and revokes, its own token's id). The run fails on any failed check, if
//! the daemon dies, or if the fuzzer's own token stopped working (the rest
//! of the run would have tested only 401s).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cache, process, workspace_root};

const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Examples per operation (and phase); the stateful phase's scenarios are
/// set in CONFIG. Both passes take about a minute on two cores.
const MAX_EXAMPLES: &str = "100";

/// schemathesis.toml: every check schemathesis has, on (as `--checks all`,
/// which on the command line would override the exceptions below); the
/// only ones turned off, each for one operation and a reason the document
/// cannot express.
const CONFIG: &str = r#"
[checks]
enabled = true

# Scenarios of the stateful phase: more than the other phases' examples, as
# most VM specs it makes up are refused (see below) and a link is only
# followed from a VM it defined.
[phases.stateful.generation]
max-examples = 300

# POST /v1/vms: a VmSpec that fits the schema still names host files
# (kernel, initrd, disks) that must exist inside the daemon's allowed
# directories; the fuzzer's made-up paths do not, and the daemon answers 400
# naming the field. No schema can say "an existing file", so valid-looking
# specs are not required to be taken here (the VMs it does define, with the
# embedded guest, feed the stateful phase).
[[operations]]
include-operation-id = "create"
checks.positive_data_acceptance.enabled = false

# POST /v1/vms/{id}/start: `restore` must name a snapshot the VM has, and
# `incoming` an address this host may migrate from (loopback without
# migration TLS), `incoming_from` going with `incoming`: facts of the host's
# state, not of the body's shape.
[[operations]]
include-operation-id = "start"
checks.positive_data_acceptance.enabled = false
"#;

/// The venv with schemathesis, made once per cache. Its scripts name their
/// interpreter by absolute path, so it is built in place and marked complete
/// last; an unmarked venv is rebuilt.
fn schemathesis() -> Result<std::path::PathBuf> {
    let venv = cache::root().join(format!("venv-{}", SCHEMATHESIS.replace("==", "-")));
    let binary = venv.join("bin/schemathesis");
    let complete = venv.join(".complete");
    if complete.exists() {
        return Ok(binary);
    }
    let _ = std::fs::remove_dir_all(&venv);
    if process::run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).is_err() {
        crate::apt::ensure_installed(&["python3-venv"])?;
        let _ = std::fs::remove_dir_all(&venv);
        process::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    process::run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        SCHEMATHESIS,
    ]))?;
    std::fs::write(&complete, SCHEMATHESIS)?;
    Ok(binary)
}

struct Namespace(String);

impl Namespace {
    fn new() -> Result<Namespace> {
        let name = format!("bulkhead-api-fuzz-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        process::run(Command::new("ip").args(["netns", "add", &name]))?;
        process::run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        Ok(Namespace(name))
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0]).arg(program);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The status of `GET /v1/tokens` with `token`, over the daemon's socket.
fn status_with_token(socket: &Path, token: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /v1/tokens HTTP/1.1\r\nHost: bulkhead\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.split(' ').nth(1).unwrap_or("none").to_string())
}

pub fn main(args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask api-fuzz");
    }
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    process::run(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "bulkhead",
    ]))?;
    run(&root)
}

/// Runs the property tests against the release binary already built.
pub fn run(root: &Path) -> Result<()> {
    let schemathesis = schemathesis()?;
    let bulkhead = root.join("target/x86_64-unknown-linux-gnu/release/bulkhead");
    let dir = std::env::temp_dir().join(format!("bulkhead-api-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let namespace = Namespace::new()?;
    let socket = dir.join("api.sock");
    let port = 18_080;
    let mut daemon = namespace
        .command(&bulkhead)
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log"))?)
        .spawn()
        .context("cannot start the daemon")?;
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline {
                bail!("the daemon did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let token = process::output(
            Command::new(&bulkhead)
                .args([
                    "token",
                    "create",
                    "fuzz",
                    "--role",
                    "admin",
                    "--project",
                    "fuzz",
                ])
                .env("BULKHEAD_SOCKET", &socket),
        )?;
        std::fs::write(dir.join("schemathesis.toml"), CONFIG)?;
        let passes: [(&str, &[&str]); 2] = [
            (
                "every operation but token revocation",
                &[
                    // Not fuzzed, covered by cli/tests/daemon/conformance.rs
                    // against the same document: a migration streams a
                    // running VM's memory to an address the fuzzer would make
                    // up, and the console (an HTTP upgrade) and the event
                    // stream (SSE) hold their connection open, which
                    // schemathesis' client cannot end.
                    "--exclude-path",
                    "/v1/vms/{id}/migrate",
                    "--exclude-path",
                    "/v1/vms/{id}/console",
                    "--exclude-path",
                    "/v1/events",
                    // In the next pass: here GET /v1/tokens would show the
                    // fuzzer its own token's id, and it revokes it.
                    "--exclude-operation-id",
                    "delete_token",
                ],
            ),
            (
                // Tokens it creates, revoked through the link from their
                // creation: it never sees its own token's id.
                "token creation and revocation",
                &[
                    "--include-operation-id",
                    "create_token",
                    "--include-operation-id",
                    "delete_token",
                ],
            ),
        ];
        for (what, filter) in passes {
            eprintln!("api-fuzz: {what}");
            let mut command = namespace.command(&schemathesis);
            command
                .current_dir(&dir)
                .arg("--config-file")
                .arg(dir.join("schemathesis.toml"))
                .arg("run")
                .arg(root.join("host/openapi.json"))
                .args(["--url", &format!("http://127.0.0.1:{port}")])
                .args([
                    "--header",
                    &format!("Authorization: Bearer {}", token.trim()),
                ])
                .args(["--phases", "examples,coverage,fuzzing,stateful"])
                .args(["--max-examples", MAX_EXAMPLES, "--seed", "20261123"])
                .args(filter);
            let started = Instant::now();
            let outcome = process::run(&mut command);
            eprintln!("api-fuzz: {what}: {:.0} s", started.elapsed().as_secs_f64());
            if let Some(status) = daemon.try_wait()? {
                bail!("the daemon died during the property tests ({status})");
            }
            outcome?;
            // Had it revoked its own token, it would have tested 401s only.
            let status = status_with_token(&socket, token.trim())?;
            if status != "200" {
                bail!("the fuzzer's own token no longer works ({status}): it revoked it");
            }
        }
        Ok(())
    })();
    // Delete whatever the fuzzer defined (ending its VMMs), then the daemon.
    if let Ok(list) = process::output(
        Command::new(&bulkhead)
            .args(["vm", "ls", "--output", "json"])
            .env("BULKHEAD_SOCKET", &socket),
    ) {
        let vms: serde_json::Value = serde_json::from_str(&list).unwrap_or_default();
        for vm in vms.as_array().into_iter().flatten() {
            if let Some(id) = vm["id"].as_str() {
                let _ = Command::new(&bulkhead)
                    .args(["vm", "rm", "--force", id])
                    .env("BULKHEAD_SOCKET", &socket)
                    .output();
            }
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    if result.is_err() {
        eprintln!(
            "daemon log:\n{}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(namespace);
    result
}
