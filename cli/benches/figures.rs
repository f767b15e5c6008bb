//! The figures issue #2 asks for, printed as a table (`cargo bench -p bulkhead`).
//!
//! - process start → first guest instruction, and → the embedded guest's banner
//!   (the `bulkhead` binary, median of runs);
//! - VMM resident memory beyond what the guest touched;
//! - the lean `bulkhead-vmm` to the first guest instruction: with flags, with
//!   flags and `--sandbox`, and with a launch plan and descriptors over its
//!   socket as the daemon starts it (resolution and opening included);
//! - the port-I/O exit round trip (a loop with an exit minus the same loop
//!   without, per iteration, median of runs; and the VMM's own handling time);
//! - same-host live migration (a Unix socket) of a guest whose memory is
//!   all written, copied and handed over (`--shared-memory`): downtime and
//!   total time, median of runs;
//! - with the images built: Linux time to first message and to /init, and the
//!   share of wall time spent in the VMM outside KVM_RUN.
//!
//! Machines are noisy: compare figures from one run with each other.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{KernelSource, Vm, VmConfig, VmExit};

const STARTUP_RUNS: usize = 21;
const LOOP_ITERATIONS: u32 = 20_000;
const LOOP_RUNS: usize = 7;

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    println!(
        "bulkhead figures (host KVM: {:?})",
        vmm::host::KvmFlavour::detect()
    );
    startup();
    startup_with_a_plan();
    port_io_round_trip();
    same_host_migration();
    linux_boot();
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes to the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn startup() {
    let binary = env!("CARGO_BIN_EXE_bulkhead");
    let mut first_instruction = Vec::new();
    let mut banner = Vec::new();
    let mut whole_run = Vec::new();
    let mut overhead_kib = Vec::new();
    for _ in 0..STARTUP_RUNS {
        let started = monotonic_ns();
        let mut child = Command::new(binary)
            .args(["run", "--output", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bulkhead");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let banner_ns = monotonic_ns();
        assert!(
            line.starts_with(guests::BANNER),
            "unexpected first line {line:?}"
        );
        let output = child.wait_with_output().unwrap();
        let ended = monotonic_ns();
        assert!(output.status.success());
        let report: serde_json::Value = serde_json::from_slice(&output.stderr).unwrap();
        let first = report["first_post_code_ns"].as_u64().unwrap();
        first_instruction.push((first - started) as f64 / 1e6);
        banner.push((banner_ns - started) as f64 / 1e6);
        whole_run.push((ended - started) as f64 / 1e6);
        overhead_kib.push(report["memory"]["vmm_overhead_kib"].as_f64().unwrap());
    }
    println!("  embedded guest, median of {STARTUP_RUNS} runs of `bulkhead run`:");
    println!(
        "    process start -> first guest instruction  {:8.2} ms",
        median(first_instruction)
    );
    println!(
        "    process start -> banner on stdout         {:8.2} ms",
        median(banner)
    );
    println!(
        "    process start -> exit (powered off)       {:8.2} ms",
        median(whole_run)
    );
    println!(
        "    VMM resident memory beyond the guest's    {:8.2} MiB",
        median(overhead_kib) / 1024.0
    );
}

fn loop_config(port_exit: bool) -> VmConfig {
    let image = guests::port_io_loop(LOOP_ITERATIONS, port_exit).unwrap();
    let mut config = VmConfig::new(KernelSource::Bytes {
        name: "port_io_loop".into(),
        image: image.into(),
    });
    config.machine.cmdline = Some(String::new());
    config.machine.memory_mib = 64;
    config
}

/// Wall time of one run of the loop guest, and the VMM's time per exit.
fn run_loop(config: &VmConfig) -> (f64, f64) {
    let vm = Vm::new(config, Box::new(std::io::sink())).unwrap();
    let started = Instant::now();
    let report = vm.start().unwrap().wait();
    let wall = started.elapsed().as_nanos() as f64;
    assert_eq!(report.exit, VmExit::PowerOff);
    let vcpu = &report.vcpus[0];
    let vmm_per_exit = vcpu.in_vmm_ns as f64 / vcpu.exits.io_in.max(1) as f64;
    (wall, vmm_per_exit)
}

fn port_io_round_trip() {
    let with_exit = loop_config(true);
    let without_exit = loop_config(false);
    let mut round_trip = Vec::new();
    let mut vmm_handling = Vec::new();
    for _ in 0..LOOP_RUNS {
        let (exit_wall, vmm_per_exit) = run_loop(&with_exit);
        let (plain_wall, _) = run_loop(&without_exit);
        round_trip.push((exit_wall - plain_wall) / f64::from(LOOP_ITERATIONS));
        vmm_handling.push(vmm_per_exit);
    }
    println!(
        "  port-I/O exit (UART scratch read), median of {LOOP_RUNS} runs x {LOOP_ITERATIONS}:"
    );
    println!(
        "    round trip (loop with exit - loop without) {:7.0} ns",
        median(round_trip)
    );
    println!(
        "    of which in the VMM, outside KVM_RUN       {:7.0} ns",
        median(vmm_handling)
    );
}

/// Serial output that remembers when the lines we wait for first appeared.
#[derive(Clone)]
struct Milestones {
    started: Instant,
    text: Arc<Mutex<String>>,
    seen: Arc<Mutex<Vec<(&'static str, Duration)>>>,
}

const FIRST_MESSAGE: &str = "Linux version";
const REACHED_INIT: &str = "Run /init as init process";

impl Write for Milestones {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut text = self.text.lock().unwrap();
        text.push_str(&String::from_utf8_lossy(buf));
        let mut seen = self.seen.lock().unwrap();
        for mark in [FIRST_MESSAGE, REACHED_INIT] {
            if !seen.iter().any(|(m, _)| *m == mark) && text.contains(mark) {
                seen.push((mark, self.started.elapsed()));
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn images_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"))
}

fn linux_boot() {
    let dir = images_dir();
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initramfs.cpio.gz"));
    if std::env::var_os("BULKHEAD_BENCH_SKIP_LINUX").is_some() || !kernel.is_file() {
        println!("  Linux: skipped (images not built, or BULKHEAD_BENCH_SKIP_LINUX set)");
        return;
    }
    let mut config = VmConfig::new(KernelSource::File(kernel));
    config.machine.initrd = Some(initrd);
    config.machine.cpus = 2;
    config.machine.memory_mib = 256;
    let milestones = Milestones {
        started: Instant::now(),
        text: Arc::default(),
        seen: Arc::default(),
    };
    let vm = Vm::new(&config, Box::new(milestones.clone())).unwrap();
    let running = vm.start().unwrap();
    let exit = running.exit_signal();
    let deadline = Instant::now() + Duration::from_secs(900);
    while !exit.is_requested() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if milestones.seen.lock().unwrap().len() == 2 {
            break;
        }
    }
    exit.request(VmExit::Stopped);
    let report = running.wait();
    let seen = milestones.seen.lock().unwrap().clone();
    let at = |mark: &str| {
        seen.iter()
            .find(|(m, _)| *m == mark)
            .map_or("not reached".to_string(), |(_, t)| {
                format!("{:8.2} s", t.as_secs_f64())
            })
    };
    let in_kvm: u64 = report.vcpus.iter().map(|v| v.in_kvm_ns).sum();
    let in_vmm: u64 = report.vcpus.iter().map(|v| v.in_vmm_ns).sum();
    let emulated: u64 = report.vcpus.iter().flat_map(|v| v.emulated.values()).sum();
    println!("  Linux (project kernel, 2 vCPUs, 256 MiB, idle /init):");
    println!(
        "    VM start -> first kernel message          {}",
        at(FIRST_MESSAGE)
    );
    println!(
        "    VM start -> Run /init                     {}",
        at(REACHED_INIT)
    );
    println!(
        "    time in the VMM outside KVM_RUN           {:8.3} % ({:.3} s of {:.1} s vCPU time)",
        100.0 * in_vmm as f64 / (in_kvm + in_vmm).max(1) as f64,
        in_vmm as f64 / 1e9,
        (in_kvm + in_vmm) as f64 / 1e9
    );
    println!("    instructions the VMM emulated             {emulated:8}");
}

const MIGRATION_RUNS: usize = 3;

/// A `bulkhead run` process with a control socket; its console is read
/// into a buffer.
struct Process {
    child: std::process::Child,
    control: PathBuf,
    console: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Process {
    fn start(args: &[&str], control: PathBuf) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("run")
            .args(args)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bulkhead");
        let read_into = |from: Box<dyn std::io::Read + Send>| {
            let sink = Arc::new(Mutex::new(String::new()));
            let writer = sink.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(from).lines().map_while(Result::ok) {
                    let mut text = writer.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                }
            });
            sink
        };
        let console = read_into(Box::new(child.stdout.take().unwrap()));
        let stderr = read_into(Box::new(child.stderr.take().unwrap()));
        Process {
            child,
            control,
            console,
            stderr,
        }
    }

    /// Waits until `done` holds for what it printed on `of` (60 s at most).
    fn wait_for(&self, of: &Mutex<String>, done: impl Fn(&str) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&of.lock().unwrap()) {
            assert!(
                Instant::now() < deadline,
                "{what}: not seen; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.control);
    }
}

/// One same-host migration of a `mib` MiB guest that wrote every page;
/// returns the source's report.
fn migrate_once(guest: &Path, mib: u64, shared: bool, rounds: u32) -> serde_json::Value {
    let dir = std::env::temp_dir();
    let id = format!("{}-{mib}-{shared}", std::process::id());
    let memory = mib.to_string();
    let mut args = vec!["--kernel", guest.to_str().unwrap(), "--memory", &memory];
    if shared {
        args.push("--shared-memory");
    }
    let source = Process::start(&args, dir.join(format!("bh-bench-src-{id}.sock")));
    let last = format!("\n{}\n", rounds - 1);
    source.wait_for(
        &source.console,
        |text| text.contains(&last),
        "the guest writing all its memory",
    );
    let socket = dir.join(format!("bh-bench-migration-{id}.sock"));
    let _ = std::fs::remove_file(&socket);
    let uri = format!("unix:{}", socket.display());
    let destination = Process::start(
        &["--incoming", &uri],
        dir.join(format!("bh-bench-dst-{id}.sock")),
    );
    destination.wait_for(
        &destination.stderr,
        |text| text.contains("waiting for a migration on"),
        "the destination listening",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .arg("ctl")
        .arg(&source.control)
        .args(["migrate", &uri])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let report = answer["migration"].clone();
    assert_eq!(report["memory_handed_over"], shared, "{answer}");
    let _ = std::fs::remove_file(&socket);
    report
}

fn same_host_migration() {
    println!("  same-host live migration (unix socket), guest with every page written, median of {MIGRATION_RUNS}:");
    for mib in [256u64, 1024] {
        // The writer sweeps all memory above its first 4 MiB once, then
        // only spins: the copy has every page to send, and converges.
        let pages = ((mib - 4) << 20) / 4096;
        let region_pages = 1024u32;
        let rounds = (pages / u64::from(region_pages)) as u32;
        let image = guests::memory_writer(guests::MemoryWriter {
            region_start: 4 << 20,
            region_pages,
            sweep_pages: Some(rounds * region_pages),
            round_tsc_ticks: 0,
            rounds: Some(rounds),
        })
        .unwrap();
        let guest =
            std::env::temp_dir().join(format!("bh-bench-writer-{}.elf", std::process::id()));
        std::fs::write(&guest, image).unwrap();
        let mut figures = Vec::new();
        for shared in [false, true] {
            let (mut downtime, mut total) = (Vec::new(), Vec::new());
            for _ in 0..MIGRATION_RUNS {
                let report = migrate_once(&guest, mib, shared, rounds);
                downtime.push(report["downtime_ms"].as_f64().unwrap());
                total.push(report["total_ms"].as_f64().unwrap());
            }
            let (downtime, total) = (median(downtime), median(total));
            println!(
                "    {mib:5} MiB {:11}  downtime {downtime:9.2} ms   total {total:9.2} ms",
                if shared { "handed over" } else { "copied" }
            );
            figures.push((downtime, total));
        }
        println!(
            "    {mib:5} MiB hand-over / copy: downtime {:.3}, total {:.3}",
            figures[1].0 / figures[0].0,
            figures[1].1 / figures[0].1
        );
        let _ = std::fs::remove_file(&guest);
    }
}

/// The first guest instruction of `bulkhead-vmm` with the embedded guest, in
/// ms after `started`, from its `--output json` report (the last line of
/// `report`).
fn first_instruction_ms(report: &str, started: u64) -> f64 {
    let last = report.lines().last().unwrap_or_default();
    let report: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|_| panic!("no report: {report}"));
    (report["first_post_code_ns"].as_u64().unwrap() - started) as f64 / 1e6
}

fn startup_with_a_plan() {
    if !nix_is_root() {
        println!("  start-up with a launch plan: skipped (needs root)");
        return;
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_bulkhead-vmm"));
    let state = std::env::temp_dir().join(format!("bh-bench-plan-{}", std::process::id()));
    let uid = 64_000 + std::process::id() % 1000;
    let (mut flags, mut sandboxed, mut planned) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..STARTUP_RUNS {
        let paths = host::vmm_process::VmPaths::new(&state, &format!("bench{run}"));
        host::vmm_process::prepare_directories(&paths, uid).unwrap();
        for (times, sandbox) in [(&mut flags, false), (&mut sandboxed, true)] {
            let mut command = Command::new(binary);
            command.args(["run", "--memory", "128", "--output", "json"]);
            if sandbox {
                command
                    .arg(format!("--sandbox=uid={uid},gid={uid}"))
                    .current_dir(&paths.jail);
            }
            let started = monotonic_ns();
            let output = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            times.push(first_instruction_ms(
                &String::from_utf8_lossy(&output.stderr),
                started,
            ));
        }
        let spec: host::spec::VmSpec =
            serde_json::from_value(serde_json::json!({"name": "bench", "memory_mib": 128}))
                .unwrap();
        let started = monotonic_ns();
        let launch = host::vmm_process::prepare(
            &spec,
            uid,
            &host::vmm_process::Origin::Boot,
            &paths,
            &[],
            std::path::Path::new("/dev/kvm"),
        )
        .unwrap();
        let mut child = host::vmm_process::launch(binary, "bench", &paths, launch, None).unwrap();
        assert!(child.wait().unwrap().success());
        planned.push(first_instruction_ms(
            &std::fs::read_to_string(&paths.log).unwrap(),
            started,
        ));
    }
    let _ = std::fs::remove_dir_all(&state);
    let (flags, sandboxed, planned) = (median(flags), median(sandboxed), median(planned));
    println!("  `bulkhead-vmm` to the first guest instruction, median of {STARTUP_RUNS}:");
    println!("    flags                                     {flags:8.2} ms");
    println!("    flags, --sandbox                          {sandboxed:8.2} ms");
    println!("    launch plan + descriptors (the daemon's)  {planned:8.2} ms");
    println!(
        "    plan / flags {:.3}, plan / sandboxed flags {:.3}",
        planned / flags,
        planned / sandboxed
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
