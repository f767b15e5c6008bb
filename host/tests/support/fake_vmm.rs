//! A stand-in for `bulkhead run --launch-fd 3` in the host crate's tests:
//! it speaks the VMM's side of every protocol the daemon uses (the launch
//! plan and its descriptors, the control socket, the exit report, SIGTERM),
//! with no KVM and no guest, so the daemon's decisions can be tested on any
//! machine. It behaves as its machine's command line says:
//!
//! - `fake.fail-at-start`: reports a fatal error and exits 1 before
//!   answering on its control socket (a VMM that cannot start its VM);
//! - `fake.exit-at-start[=CODE]`: reports a power-off and exits with CODE
//!   (0) at once (a guest that ends before anyone looks);
//! - `fake.no-control`: never answers on its control socket;
//! - `fake.control-after-ms=N`: answers only after N ms;
//! - `fake.old-vmm`: refuses `shutdown`, as a VMM from before it did;
//! - `fake.ignore-shutdown`: answers `shutdown` and `ctrl_alt_del` but its
//!   "guest" never acts on them (otherwise it powers off or resets);
//! - `fake.ignore-sigterm`: SIGTERM does nothing (otherwise the VMM stops
//!   the VM and reports `stopped`);
//! - `fake.migrate-ok`: a migration succeeds (otherwise the VMM refuses it
//!   with a reason naming a secret the daemon must not pass on);
//! - `fake.panic-after-ms=N`: the "guest" panics after N ms;
//! - `fake.refuse-pause`: refuses `pause`, and goes on running;
//! - `fake.end-on-pause`: ends (as if its guest powered off) when asked to
//!   pause, as a VMM does: its control socket goes at once, unanswered, its
//!   process a second later.
//!
//! Its status reports memory, one device and one vCPU with counters, the
//! device's name full of what a metrics label must escape; it has a thread
//! named `vcpu0`. Its console socket greets each client with
//! `fake console\n` and echoes back what a client types.
//!
//! An incoming migration is one TCP connection on the listener the daemon
//! bound, read to its end; only then does the control socket answer. Every
//! fake ends itself after two minutes, whatever happens to its test.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm::control::{LiveState, Request, Response, ShutdownMethod, Status};
use vmm::exit::VmExit;
use vmm::launch::{ExitReport, LaunchOrigin, LaunchPlan};

/// What the daemon must never pass on to a client (see `fake.migrate-ok`).
const SECRET_REFUSAL: &str = "fake: the peer at that address answered SECRET-DETAIL";
const LIFETIME: Duration = Duration::from_secs(120);
/// A device name as a hostile VMM might report it.
const HOSTILE_DEVICE_NAME: &str = "net\"0\\\n";

struct Fake {
    plan: LaunchPlan,
    report: Mutex<std::fs::File>,
    paused: Mutex<bool>,
}

impl Fake {
    fn has(&self, word: &str) -> bool {
        self.plan
            .machine
            .kernel_cmdline()
            .split_whitespace()
            .any(|w| w == word || w.split_once('=').is_some_and(|(key, _)| key == word))
    }

    fn value(&self, word: &str) -> Option<u64> {
        self.plan
            .machine
            .kernel_cmdline()
            .split_whitespace()
            .find_map(|w| w.strip_prefix(word)?.strip_prefix('=')?.parse().ok())
    }

    /// Writes the exit report, removes the control socket as a VMM does,
    /// and exits.
    fn end(&self, exit: VmExit, code: i32) -> ! {
        let report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        let mut file = report.try_clone().expect("report descriptor");
        ExitReport::new(exit).write_to(&mut file).expect("report");
        let _ = std::fs::remove_file(&self.plan.control);
        std::process::exit(code);
    }

    fn status(&self) -> Status {
        let paused = *self.paused.lock().unwrap();
        Status {
            state: if paused {
                LiveState::Paused
            } else {
                LiveState::Running
            },
            pid: std::process::id(),
            cpus: self.plan.machine.cpus,
            memory_mib: self.plan.machine.memory_mib,
            memory: vmm::memory_usage::MemoryUsage {
                process_rss_kib: 300,
                guest_resident_kib: 200,
                vmm_overhead_kib: 100,
            },
            balloon: None,
            devices: vec![vmm::vm_core::DeviceReport {
                name: HOSTILE_DEVICE_NAME.into(),
                state: vmm::vm_core::DeviceState::Active,
                counters: [("rx_bytes".to_string(), 7)].into(),
            }],
            vcpus: vec![vmm::vcpu::VcpuReport {
                exits: vmm::vcpu::ExitCounts {
                    io_out: 3,
                    ..Default::default()
                },
                emulated: [("rdmsr".to_string(), 2)].into(),
                ..Default::default()
            }],
            migration: None,
        }
    }

    fn answer(self: &Arc<Self>, request: Request) -> Response {
        let done = Response::Done { ok: true };
        match request {
            Request::Status => Response::Status {
                ok: true,
                status: self.status(),
            },
            Request::Pause if self.has("fake.refuse-pause") => {
                refusal("fake: told to refuse pause".into())
            }
            Request::Pause => {
                *self.paused.lock().unwrap() = true;
                done
            }
            Request::Resume => {
                *self.paused.lock().unwrap() = false;
                done
            }
            Request::Shutdown if self.has("fake.old-vmm") => {
                refusal("unknown variant `shutdown`".into())
            }
            Request::Shutdown => {
                self.guest_acts(VmExit::PowerOff);
                Response::Shutdown {
                    ok: true,
                    method: ShutdownMethod::CtrlAltDel,
                }
            }
            Request::CtrlAltDel => {
                self.guest_acts(VmExit::Reset);
                done
            }
            Request::Snapshot { path } => {
                // The path as the sandboxed VMM sees it: its jail is its root.
                let inside = Path::new(".").join(path.strip_prefix("/").unwrap_or(&path));
                match std::fs::create_dir(&inside)
                    .and_then(|()| std::fs::write(inside.join("manifest.json"), "{}"))
                {
                    Ok(()) => Response::Snapshot {
                        ok: true,
                        snapshot: vmm::snapshot::SnapshotInfo {
                            path,
                            memory_bytes: self.plan.machine.memory_mib << 20,
                            memory_pages_written: 0,
                            state_bytes: 2,
                        },
                        pause_ms: 0.0,
                    },
                    Err(e) => refusal(format!("fake: cannot write {}: {e}", inside.display())),
                }
            }
            Request::Migrate(_) if self.has("fake.migrate-ok") => {
                let fake = self.clone();
                after(Duration::from_millis(20), move || {
                    fake.end(VmExit::Migrated, 0)
                });
                Response::Migrated {
                    ok: true,
                    migration: serde_json::from_value(serde_json::json!({
                        "total_ms": 1.0, "downtime_ms": 1.0,
                        "downtime_measured_on_one_clock": true, "rounds": 1,
                        "pages_sent": 0, "bytes_sent": 0, "last_round_pages": 0,
                        "max_throttle_percent": 0, "memory_crc": null,
                        "memory_handed_over": false
                    }))
                    .expect("a migration report"),
                }
            }
            Request::Migrate(_) => refusal(SECRET_REFUSAL.into()),
            Request::Balloon { .. } | Request::PowerButton => {
                refusal("fake: no such device".into())
            }
        }
    }

    /// The guest acts on a shutdown request, unless told not to.
    fn guest_acts(self: &Arc<Self>, exit: VmExit) {
        if !self.has("fake.ignore-shutdown") {
            let fake = self.clone();
            after(Duration::from_millis(20), move || fake.end(exit, 0));
        }
    }
}

fn refusal(error: String) -> Response {
    Response::Error { ok: false, error }
}

fn after(delay: Duration, then: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        then();
    });
}

/// The serial console: a greeting, then an echo of what comes in.
fn serve_console(listener: UnixListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.write_all(b"fake console\n");
                let mut echo = stream.try_clone().expect("a second handle");
                let _ = std::io::copy(&mut stream, &mut echo);
            });
        }
    });
}

fn serve(fake: &Arc<Fake>, listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let fake = fake.clone();
        std::thread::spawn(move || answer_one(&fake, stream));
    }
}

fn answer_one(fake: &Arc<Fake>, stream: UnixStream) {
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Pause) if fake.has("fake.end-on-pause") => {
            let _ = std::fs::remove_file(&fake.plan.control);
            let ended = fake.clone();
            after(Duration::from_secs(1), move || {
                ended.end(VmExit::PowerOff, 0)
            });
            return;
        }
        Ok(request) => fake.answer(request),
        Err(e) => refusal(format!("fake: bad request: {e}")),
    };
    let mut text = serde_json::to_string(&response).expect("an answer");
    text.push('\n');
    let _ = (&stream).write_all(text.as_bytes());
}

/// SIGTERM, taken by a thread of its own: blocked in the main thread
/// before any other exists, so every thread blocks it.
fn block_sigterm() -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a zeroed set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn watch_sigterm(fake: Arc<Fake>, set: libc::sigset_t) {
    if fake.has("fake.ignore-sigterm") {
        return;
    }
    std::thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: waits for a signal of a set we own.
        unsafe { libc::sigwait(&set, &mut signal) };
        fake.end(VmExit::Stopped, 0);
    });
}

fn main() {
    let sigterm = block_sigterm();
    after(LIFETIME, || std::process::exit(3));
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    assert_eq!(
        arguments,
        ["run", "--launch-fd", "3", "--output", "json"],
        "started as the daemon starts a VMM"
    );
    let (plan, descriptors) = vmm::launch::receive_from_fd(3).expect("a launch plan");
    let mut descriptors: Vec<Option<OwnedFd>> = descriptors.into_iter().map(Some).collect();
    let report = std::fs::File::from(descriptors[1].take().expect("the report descriptor"));
    let incoming = match plan.origin {
        LaunchOrigin::Incoming(_) => descriptors.last_mut().and_then(Option::take),
        _ => None,
    };
    let fake = Arc::new(Fake {
        plan,
        report: Mutex::new(report),
        paused: Mutex::new(false),
    });
    watch_sigterm(fake.clone(), sigterm);
    eprintln!("fake VMM {}: {:?}", std::process::id(), fake.plan.origin);
    if fake.has("fake.fail-at-start") {
        eprintln!("error: fake: told to fail at start");
        fake.end(VmExit::Fatal("fake: told to fail at start".into()), 1);
    }
    if fake.has("fake.exit-at-start") {
        let code = fake.value("fake.exit-at-start").unwrap_or(0);
        fake.end(VmExit::PowerOff, code as i32);
    }
    if let LaunchOrigin::Restore { snapshot } = &fake.plan.origin {
        let manifest = PathBuf::from("snapshots")
            .join(snapshot)
            .join("manifest.json");
        if !manifest.exists() {
            fake.end(VmExit::Fatal(format!("no {}", manifest.display())), 1);
        }
    }
    if let Some(listener) = incoming {
        let listener = std::net::TcpListener::from(listener);
        let (mut stream, _) = listener.accept().expect("a migration stream");
        let _ = std::io::copy(&mut stream, &mut std::io::sink());
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
    if let Some(ms) = fake.value("fake.panic-after-ms") {
        let ended = fake.clone();
        after(Duration::from_millis(ms), move || {
            ended.end(VmExit::GuestPanic, 1)
        });
    }
    if let Some(ms) = fake.value("fake.control-after-ms") {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if fake.has("fake.no-control") {
        loop {
            std::thread::park();
        }
    }
    std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(|| loop {
            std::thread::park();
        })
        .expect("a vCPU thread");
    serve_console(UnixListener::bind(&fake.plan.console).expect("the console socket"));
    let listener = UnixListener::bind(&fake.plan.control).expect("the control socket");
    serve(&fake, listener);
}
