//! The host daemon's figures (`cargo bench -p bulkhead --bench host`):
//!
//! - API latency, p50 and p99, of list and describe with 100 VMs defined
//!   (and describe of a running VM, which asks its VMM);
//! - the time to create and start 50 VMs at once (the echo guest, which
//!   idles in `hlt`), with each start's latency;
//! - the daemon's resident memory, and each VMM's.
//!
//! Machines are noisy: compare figures from one run with each other.

use host::client::{Client, Endpoint};
use hyper::Method;
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEFINED: usize = 100;
const REQUESTS: usize = 1000;
const CONCURRENT_STARTS: usize = 50;

struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(self.dir.join("state/vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = host::vmm_process::find_process(&id) {
                // SAFETY: kills a VMM of this benchmark's daemon.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_daemon() -> Daemon {
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state/images")).unwrap();
    let socket = dir.join("api.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon { child, dir, socket }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "  {name:<40} p50 {:>8.3} ms   p99 {:>8.3} ms   ({} requests)",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.len()
    );
}

async fn timed(client: &Client, method: Method, path: &str, n: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let answer = client.call(method.clone(), path, None).await.unwrap();
        samples.push(started.elapsed());
        assert!(answer.status.is_success(), "{path}: {}", answer.text);
    }
    samples
}

fn main() {
    let daemon = start_daemon();
    let guest = daemon.dir.join("state/images/echo.elf");
    std::fs::write(&guest, guests::console_echo().unwrap()).unwrap();
    let client = Client {
        endpoint: Endpoint::Unix(daemon.socket.clone()),
        token: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    println!("bulkhead host daemon figures");
    runtime.block_on(async {
        // 100 VMs defined.
        let mut ids = Vec::new();
        for i in 0..DEFINED {
            let spec = json!({"name": format!("defined-{i}"), "kernel": guest, "memory_mib": 32});
            let vm = client.expect(Method::POST, "/v1/vms", Some(&spec)).await.unwrap();
            ids.push(vm["id"].as_str().unwrap().to_string());
        }
        println!("API latency, Unix socket, {DEFINED} VMs defined:");
        report("GET /v1/vms (list)", timed(&client, Method::GET, "/v1/vms", REQUESTS / 10).await);
        let describe = format!("/v1/vms/{}", ids[DEFINED / 2]);
        report("GET /v1/vms/{id} (describe, stopped)", timed(&client, Method::GET, &describe, REQUESTS).await);
        client.expect(Method::POST, &format!("{describe}/start"), None).await.unwrap();
        report("GET /v1/vms/{id} (describe, running)", timed(&client, Method::GET, &describe, REQUESTS).await);
        client
            .expect(Method::POST, &format!("{describe}/stop"), Some(&json!({"force": true})))
            .await
            .unwrap();
        for id in &ids {
            client.expect(Method::DELETE, &format!("/v1/vms/{id}"), None).await.unwrap();
        }

        // 50 created and started at once.
        let started = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENT_STARTS)
            .map(|i| {
                let client = client.clone();
                let guest = guest.clone();
                tokio::spawn(async move {
                    let began = Instant::now();
                    let spec = json!({"name": format!("burst-{i}"), "kernel": guest, "memory_mib": 32});
                    let vm = client.expect(Method::POST, "/v1/vms", Some(&spec)).await.unwrap();
                    let id = vm["id"].as_str().unwrap().to_string();
                    let vm = client
                        .expect(Method::POST, &format!("/v1/vms/{id}/start"), None)
                        .await
                        .unwrap();
                    assert_eq!(vm["state"], "running");
                    (vm["pid"].as_u64().unwrap() as u32, began.elapsed())
                })
            })
            .collect();
        let mut pids = Vec::new();
        let mut latencies = Vec::new();
        for task in tasks {
            let (pid, latency) = task.await.unwrap();
            pids.push(pid);
            latencies.push(latency);
        }
        let total = started.elapsed();
        println!("Create + start {CONCURRENT_STARTS} VMs at once (echo guest, 32 MiB, sandboxed, cgroups):");
        println!("  all running after {:.0} ms", total.as_secs_f64() * 1e3);
        report("create + start, each", latencies);
        // Let the guests reach their idle loop before measuring memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut rss: Vec<u64> = pids.iter().map(|&pid| rss_kib(pid)).collect();
        rss.sort_unstable();
        println!("Resident memory:");
        println!("  daemon, {CONCURRENT_STARTS} VMs running     {:>6} KiB", rss_kib(daemon.child.id()));
        println!(
            "  each VMM (min / median / max)    {} / {} / {} KiB",
            rss[0],
            rss[rss.len() / 2],
            rss[rss.len() - 1]
        );
    });
}
