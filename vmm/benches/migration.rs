//! Snapshot and migration figures (`cargo bench -p vmm --bench migration`):
//! - snapshot create time and restore time (reading the snapshot to the
//!   restored guest's first instruction, seen as its first POST-code write)
//!   for 256 MiB and 1 GiB guests whose memory the guest filled;
//! - live migration over a Unix socket on this host: total time and
//!   downtime (last guest instruction on the source to the first on the
//!   destination) for a guest that has stopped writing memory and for one
//!   dirtying 100 MiB/s.
//!
//! Machines are noisy: compare figures from one run with each other.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::devices::legacy::post::monotonic_ns;
use vmm::migration::{MigrateOptions, MigrationReport};
use vmm::vm::RestoreOptions;
use vmm::{KernelSource, RunningVm, Vm, VmConfig};

const RESTORES: usize = 7;

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !String::from_utf8_lossy(&self.0.lock().unwrap()).contains(text) {
            assert!(
                Instant::now() < deadline,
                "the guest never printed {text:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A guest that writes every page above 4 MiB `rounds` times (so the
/// snapshot has real data to write), then either spins on POST-code writes
/// or keeps dirtying at its pace.
fn writer(memory_mib: u64, writer: guests::MemoryWriter) -> (RunningVm, Console) {
    let mut config = VmConfig::new(KernelSource::Bytes {
        name: "memory writer".into(),
        image: guests::memory_writer(writer).unwrap().into(),
    });
    config.machine.cmdline = Some(String::new());
    config.machine.memory_mib = memory_mib;
    let console = Console::default();
    let vm = Vm::new(&config, Box::new(console.clone())).unwrap();
    (vm.start().unwrap(), console)
}

fn all_pages_above_4_mib(memory_mib: u64) -> u32 {
    ((memory_mib - 4) * 256) as u32
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn snapshot_and_restore(memory_mib: u64, dir: &std::path::Path) {
    let (running, console) = writer(
        memory_mib,
        guests::MemoryWriter {
            region_pages: all_pages_above_4_mib(memory_mib),
            rounds: Some(1),
            ..Default::default()
        },
    );
    console.wait_for("0\n");
    let control = running.control();
    let path = dir.join(format!("snapshot-{memory_mib}"));
    let started = Instant::now();
    let info = control.snapshot(&path).unwrap();
    let create = started.elapsed();
    running.stop();
    running.wait();

    let mut restores = Vec::new();
    for _ in 0..RESTORES {
        let started_ns = monotonic_ns();
        let snapshot = vmm::snapshot::read(&path).unwrap();
        let vm = Vm::restore(
            &snapshot,
            &RestoreOptions::default(),
            Box::new(std::io::sink()),
        )
        .unwrap();
        let running = vm.start().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            if let Some(ns) = running.first_post_code_ns() {
                break ns;
            }
            assert!(Instant::now() < deadline, "the restored guest never ran");
            std::thread::sleep(Duration::from_micros(100));
        };
        restores.push((first - started_ns) as f64 / 1e6);
        running.stop();
        running.wait();
    }
    println!(
        "snapshot {memory_mib:>5} MiB: create {:7.1} ms ({} MiB of pages written), restore to first guest instruction {:6.2} ms (median of {RESTORES}, min {:.2})",
        create.as_secs_f64() * 1e3,
        info.memory_pages_written / 256,
        median(restores.clone()),
        restores.iter().copied().fold(f64::MAX, f64::min)
    );
}

/// The host TSC's frequency, which the guest's TSC runs at.
fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let read = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), read());
    std::thread::sleep(Duration::from_millis(200));
    (read() - c0) as f64 / t0.elapsed().as_secs_f64()
}

fn migrate(source: &RunningVm, socket: &std::path::Path, downtime_ms: u64) -> MigrationReport {
    migrate_with(source, socket, downtime_ms, None).unwrap()
}

fn migrate_with(
    source: &RunningVm,
    socket: &std::path::Path,
    downtime_ms: u64,
    bandwidth_mib: Option<u64>,
) -> Result<MigrationReport, vmm::migration::MigrationError> {
    let uri = format!("unix:{}", socket.display());
    let incoming = vmm::migration::accept(&uri, None).unwrap();
    let destination = std::thread::spawn(move || {
        let Ok(arrived) = incoming.receive(&RestoreOptions::default(), Box::new(std::io::sink()))
        else {
            return;
        };
        let running = arrived.start().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        running.stop();
        running.wait();
    });
    let report = source.control().migrate(&MigrateOptions {
        uri,
        downtime_ms: Some(downtime_ms),
        bandwidth_mib,
        give_up_after_s: Some(60),
        ..Default::default()
    });
    destination.join().unwrap();
    report
}

/// MiB/s the guest dirties, from the rounds it counts in one second.
fn dirty_rate(console: &Console, pages_per_round: u32) -> f64 {
    let lines = || {
        console
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    };
    let before = lines();
    std::thread::sleep(Duration::from_secs(1));
    (lines() - before) as f64 * f64::from(pages_per_round) / 256.0
}

fn print_migration(what: &str, report: &MigrationReport) {
    println!(
        "migration {what}: total {:7.1} ms, downtime {:6.2} ms{}, {} rounds, {} MiB sent, last round {} pages, throttle max {}%",
        report.total_ms,
        report.downtime_ms,
        if report.downtime_measured_on_one_clock { "" } else { " (upper bound)" },
        report.rounds,
        report.bytes_sent >> 20,
        report.last_round_pages,
        report.max_throttle_percent
    );
}

fn main() {
    println!(
        "bulkhead snapshot and migration figures (host KVM: {:?})",
        vmm::host::KvmFlavour::detect()
    );
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-migration-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for memory_mib in [256, 1024] {
        snapshot_and_restore(memory_mib, &dir);
    }

    // Idle: 256 MiB written once, then nothing dirtied.
    let (running, console) = writer(
        256,
        guests::MemoryWriter {
            region_pages: all_pages_above_4_mib(256),
            rounds: Some(1),
            ..Default::default()
        },
    );
    console.wait_for("0\n");
    let report = migrate(&running, &dir.join("idle.sock"), 50);
    running.wait();
    print_migration("256 MiB idle            ", &report);

    // Dirtying 100 MiB/s: 200 rounds a second, each writing the next 512 KiB
    // of a 128 MiB sweep.
    let rounds_per_second = 200.0;
    let (running, console) = writer(
        256,
        guests::MemoryWriter {
            region_pages: 128,
            sweep_pages: Some(128 * 256),
            round_tsc_ticks: (tsc_hz() / rounds_per_second) as u64,
            ..Default::default()
        },
    );
    console.wait_for("\n20\n");
    println!(
        "  (the guest dirties {:.0} MiB/s)",
        dirty_rate(&console, 128)
    );
    let report = migrate(&running, &dir.join("busy.sock"), 50);
    running.wait();
    print_migration("256 MiB dirtying 100 MiB/s", &report);

    // The same rate over a 32 MiB sweep and a link capped below it: vCPUs
    // are throttled until the copy converges.
    let (running, console) = writer(
        256,
        guests::MemoryWriter {
            region_pages: 128,
            sweep_pages: Some(32 * 256),
            round_tsc_ticks: (tsc_hz() / rounds_per_second) as u64,
            ..Default::default()
        },
    );
    console.wait_for("\n20\n");
    match migrate_with(&running, &dir.join("capped.sock"), 50, Some(40)) {
        Ok(report) => {
            running.wait();
            print_migration("dirtying 100 MiB/s, 40 MiB/s link", &report);
        }
        Err(e) => {
            println!("migration dirtying 100 MiB/s, 40 MiB/s link: {e}");
            running.stop();
            running.wait();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
