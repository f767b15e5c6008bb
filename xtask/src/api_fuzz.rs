//! `cargo xtask api-fuzz`: property-based tests of the host API from its own
//! OpenAPI document, with schemathesis (from PyPI, cached in a venv).
//!
//! A daemon runs inside a network namespace of its own (VMs the fuzzer
//! defines may ask for TAP devices: they are made there, never on the
//! host); schemathesis runs in the same namespace against its loopback
//! listener. The run fails on any 5xx answer or if the daemon dies.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cache, process, workspace_root};

const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Examples per operation (and phase).
const MAX_EXAMPLES: &str = "40";

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
        let mut command = namespace.command(&schemathesis);
        command
            .current_dir(&dir)
            .arg("run")
            .arg(root.join("host/openapi.json"))
            .args(["--url", &format!("http://127.0.0.1:{port}")])
            .args([
                "--header",
                &format!("Authorization: Bearer {}", token.trim()),
            ])
            .args(["--checks", "not_a_server_error"])
            .args(["--max-examples", MAX_EXAMPLES, "--seed", "20261123"])
            // The fuzzer must not revoke its own token, connect VMs to
            // addresses it makes up, or hold streams open.
            .args(["--exclude-path", "/v1/tokens/{id}"])
            .args(["--exclude-path", "/v1/vms/{id}/migrate"])
            .args(["--exclude-path", "/v1/vms/{id}/console"])
            .args(["--exclude-path", "/v1/events"]);
        process::run(&mut command)?;
        if let Some(status) = daemon.try_wait()? {
            bail!("the daemon died during the property tests ({status})");
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
