//! Pause, snapshot, restore and live migration through the `bulkhead`
//! binary, with a tiny guest that keeps changing its memory and counting on
//! its console (`guests::memory_writer`).

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::migration::protocol::VERSION;

const WAIT: Duration = Duration::from_secs(60);

fn work_dir() -> PathBuf {
    testkit::process_dir().to_path_buf()
}

fn unique(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    work_dir().join(format!("{name}-{n}"))
}

fn writer_guest(writer: guests::MemoryWriter) -> PathBuf {
    let path = unique("writer.elf");
    std::fs::write(&path, guests::memory_writer(writer).unwrap()).unwrap();
    path
}

/// A `bulkhead run` process whose console output is collected as it comes.
struct Vmm {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    control: PathBuf,
    /// The threads reading its stdout and stderr.
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Reads `from` into a buffer until it closes; the thread ends then.
fn collect(
    mut from: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let writer = sink.clone();
    let reader = std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = from.read(&mut buffer) {
            if n == 0 {
                break;
            }
            writer.lock().unwrap().extend_from_slice(&buffer[..n]);
        }
    });
    (sink, reader)
}

/// A failed assertion must not leave a guest spinning on the machine.
impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    fn start(args: &[&std::ffi::OsStr]) -> Vmm {
        Vmm::start_in(None, args)
    }

    /// A VMM in network namespace `netns` (where its TAPs are).
    fn start_in(netns: Option<&support::Namespace>, args: &[&std::ffi::OsStr]) -> Vmm {
        let control = unique("control.sock");
        let mut command = match netns {
            Some(netns) => netns.exec(env!("CARGO_BIN_EXE_bulkhead")),
            None => Command::new(env!("CARGO_BIN_EXE_bulkhead")),
        };
        command
            .arg("run")
            .args(args)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        support::dies_with_test(&mut command);
        let mut child = command.spawn().unwrap();
        let (output, stdout_reader) = collect(child.stdout.take().unwrap());
        let (stderr, stderr_reader) = collect(child.stderr.take().unwrap());
        Vmm {
            child,
            output,
            stderr,
            control,
            readers: vec![stdout_reader, stderr_reader],
        }
    }

    fn boot(guest: &Path, memory_mib: u64) -> Vmm {
        let memory = memory_mib.to_string();
        Vmm::start(&[
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--memory".as_ref(),
            memory.as_ref(),
        ])
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// The last complete count the guest printed.
    fn count(&self) -> Option<u64> {
        let output = self.output();
        let complete = &output[..output.rfind('\n')?];
        complete.rsplit('\n').next()?.trim().parse().ok()
    }

    fn wait_for_count(&self, at_least: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(count) = self.count().filter(|&c| c >= at_least) {
                return count;
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not count to {at_least}: {:?}\n{}",
                self.count(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for_control(&self) {
        let deadline = Instant::now() + WAIT;
        while !self.control.exists() {
            assert!(
                Instant::now() < deadline,
                "no control socket:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ctl(&self, args: &[&str]) -> (bool, String) {
        self.wait_for_control();
        let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("ctl")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    }

    fn ctl_ok(&self, args: &[&str]) -> serde_json::Value {
        let (ok, text) = self.ctl(args);
        assert!(
            ok,
            "bulkhead ctl {args:?} failed: {text}\nVMM stderr:\n{}",
            self.stderr()
        );
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    fn state(&self) -> String {
        self.ctl_ok(&["status"])["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn wait_exit(mut self) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                return (status, self.output(), self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "the VMM did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.drain();
        self.output()
    }

    /// Waits until everything the ended VMM wrote has been read.
    fn drain(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// The counts in console output, dropping a partial first line (a restored
/// or migrated-in guest may resume in the middle of printing a number).
fn counts(output: &str, skip_first_partial: bool) -> Vec<u64> {
    let mut lines: Vec<&str> = output.split('\n').collect();
    lines.pop(); // after the last newline: incomplete
    if skip_first_partial && !lines.is_empty() {
        lines.remove(0);
    }
    lines
        .iter()
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a count: {l:?}"))
        })
        .collect()
}

fn assert_consecutive(counts: &[u64], what: &str) {
    for pair in counts.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{what}: gap or repeat in {counts:?}");
    }
}

#[test]
fn pause_resume_snapshot_and_two_independent_restores() {
    let guest = writer_guest(guests::MemoryWriter::default());
    let source = Vmm::boot(&guest, 64);
    source.wait_for_count(5);
    assert_eq!(source.state(), "running");

    source.ctl_ok(&["pause"]);
    assert_eq!(source.state(), "paused");
    let paused_at = source.count().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        source.count(),
        Some(paused_at),
        "a paused guest went on counting"
    );
    source.ctl_ok(&["resume"]);
    source.wait_for_count(paused_at + 3);

    let snapshot = unique("snapshot");
    let answer = source.ctl_ok(&["snapshot", snapshot.to_str().unwrap()]);
    assert!(answer["snapshot"]["memory_pages_written"].as_u64().unwrap() >= 1024);
    assert_eq!(source.state(), "running", "a snapshot resumes a running VM");
    // A second snapshot to the same place is refused; the first is intact.
    let (ok, text) = source.ctl(&["snapshot", snapshot.to_str().unwrap()]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let source_output = source.kill();

    let restore = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--restore".as_ref(), snapshot.as_os_str()];
        args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
        Vmm::start(&args)
    };
    let first = restore(&[]);
    let second = restore(&["--verify-memory"]);
    first.wait_for_count(1);
    second.wait_for_count(1);
    let (a, b) = (first.count().unwrap(), second.count().unwrap());
    first.wait_for_count(a + 20);
    second.wait_for_count(b + 20);
    let (first_output, second_output) = (first.kill(), second.kill());
    let first_counts = counts(&first_output, true);
    let second_counts = counts(&second_output, true);
    assert_consecutive(&first_counts, "first clone");
    assert_consecutive(&second_counts, "second clone");
    // Both clones go on from the same point, which the source had reached.
    assert_eq!(first_counts[0], second_counts[0]);
    let before = counts(&source_output, false);
    assert!(
        before.contains(&(first_counts[0] - 1)),
        "the clones resumed at {}, the source never printed {}",
        first_counts[0],
        first_counts[0] - 1
    );
    // The memory file is untouched by the clones' writes.
    let third = restore(&["--verify-memory"]);
    third.wait_for_count(1);
    third.kill();
}

/// A destination: `bulkhead run --incoming URI`.
fn destination(uri: &str, extra: &[&std::ffi::OsStr]) -> Vmm {
    let mut args: Vec<&std::ffi::OsStr> = vec!["--incoming".as_ref(), uri.as_ref()];
    args.extend_from_slice(extra);
    Vmm::start(&args)
}

/// The address a destination bound (it prints it: tcp port 0 becomes a port).
fn bound_uri(destination: &Vmm) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let stderr = destination.stderr();
        // Complete lines only: the address may not have arrived yet.
        let complete = &stderr[..stderr.rfind('\n').unwrap_or(0)];
        if let Some(line) = complete.lines().find_map(|l| {
            l.strip_prefix("bulkhead: waiting for a migration on ")
                .map(str::to_string)
        }) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "destination not listening:\n{}",
            destination.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Migrates `source` to `destination` and checks the switch-over: the source
/// ends cleanly, the destination runs on, and the count on the two consoles
/// together has no gap and no repeat.
fn migrate_and_check(
    source: Vmm,
    destination: Vmm,
    uri: &str,
    extra: &[&str],
) -> serde_json::Value {
    let before = source.wait_for_count(10);
    let mut args = vec!["migrate", uri, "--verify-memory"];
    args.extend_from_slice(extra);
    let answer = source.ctl_ok(&args);
    let migration = &answer["migration"];
    assert!(migration["memory_crc"].is_u64(), "{answer}");
    assert_downtime_within_limit(&answer, extra);
    let (status, source_output, source_stderr) = source.wait_exit();
    assert!(
        status.success(),
        "the source did not end cleanly: {source_stderr}"
    );
    assert!(source_stderr.contains("migrated"), "{source_stderr}");
    destination.wait_for_count(before + 30);
    assert_eq!(destination.state(), "running");
    let combined = source_output + &destination.kill();
    let all = counts(&combined, false);
    assert_consecutive(&all, "source then destination");
    answer
}

/// What the downtime may exceed the limit by: the stop-and-copy is sized
/// from the link's measured rate, but the vCPUs' and devices' state, the
/// switch-over handshake and a noisy host come on top (measured here: a few
/// ms to 17 ms against the default 300). The benchmark keeps the precise
/// figures; this holds the promise.
const DOWNTIME_MARGIN_MS: f64 = 500.0;

/// The migration's downtime is within its limit (`--downtime-ms` in
/// `extra`, else the default 300 ms) plus [`DOWNTIME_MARGIN_MS`].
fn assert_downtime_within_limit(answer: &serde_json::Value, extra: &[&str]) {
    let limit: f64 = extra
        .iter()
        .position(|arg| *arg == "--downtime-ms")
        .map_or(300.0, |at| extra[at + 1].parse().unwrap());
    let downtime = answer["migration"]["downtime_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no downtime in {answer}"));
    assert!(
        downtime > 0.0 && downtime <= limit + DOWNTIME_MARGIN_MS,
        "downtime {downtime} ms, limit {limit} ms + {DOWNTIME_MARGIN_MS} ms: {answer}"
    );
}

#[test]
fn live_migration_over_a_unix_socket_and_over_tcp() {
    let guest = writer_guest(guests::MemoryWriter {
        region_pages: 4096,
        ..Default::default()
    });
    let socket = unique("migration.sock");
    let uri = format!("unix:{}", socket.display());
    let answer = migrate_and_check(Vmm::boot(&guest, 128), destination(&uri, &[]), &uri, &[]);
    eprintln!("unix: {answer}");
    // The destination's memory hash matched the source's at switch-over (it
    // refuses to resume otherwise), and it said so.

    let target = destination("tcp:127.0.0.1:0", &[]);
    let uri = bound_uri(&target);
    let answer = migrate_and_check(Vmm::boot(&guest, 128), target, &uri, &[]);
    eprintln!("tcp: {answer}");
}

/// A guest dirtying 32 MiB as fast as it can: more than 8 MiB/s can copy.
fn busy_source() -> Vmm {
    let guest = writer_guest(guests::MemoryWriter {
        region_pages: 8192,
        ..Default::default()
    });
    let source = Vmm::boot(&guest, 128);
    source.wait_for_count(3);
    source
}

/// `ctl migrate URI --bandwidth-mib 8` of `source`, in the background.
fn slow_migration(source: &Vmm, uri: &str) -> std::thread::JoinHandle<std::process::Output> {
    let control = source.control.clone();
    let uri = uri.to_string();
    std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("ctl")
            .arg(control)
            .args(["migrate", &uri, "--bandwidth-mib", "8"])
            .output()
            .unwrap()
    })
}

#[test]
fn migration_progress_is_visible_while_it_runs() {
    let source = busy_source();
    assert!(source.ctl_ok(&["status"]).get("migration").is_none());
    let socket = unique("progress.sock");
    let uri = format!("unix:{}", socket.display());
    let target = destination(&uri, &[]);
    bound_uri(&target);
    // 32 MiB written by the guest at 8 MiB/s: a few seconds of copying.
    let migrating = slow_migration(&source, &uri);
    let progress = |source: &Vmm| source.ctl_ok(&["status"])["migration"].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let now = progress(&source);
        if now["pages_sent"].as_u64().unwrap_or(0) > 0 {
            break now;
        }
        assert!(Instant::now() < deadline, "no progress shown: {now}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(first["phase"], "copying", "{first}");
    assert_eq!(first["round"], 1, "{first}");
    std::thread::sleep(Duration::from_millis(500));
    let later = progress(&source);
    assert!(
        later["pages_sent"].as_u64() > first["pages_sent"].as_u64()
            && later["elapsed_ms"].as_u64() > first["elapsed_ms"].as_u64(),
        "{first} then {later}"
    );
    // The guest dirties its region faster than 8 MiB/s: this migration is
    // ended by its destination going away, and its progress with it.
    let _ = target.kill();
    let output = migrating.join().unwrap();
    assert!(!output.status.success());
    assert_eq!(source.state(), "running");
    assert!(source.ctl_ok(&["status"]).get("migration").is_none());
}

/// `ctl status` says `busy` while a migration holds the VM (its
/// `migration` progress alongside), and `running` again once the migration
/// has failed (README, "Pause, snapshots, migration").
#[test]
fn status_says_busy_during_a_migration_and_running_after_it_failed() {
    let source = busy_source();
    assert_eq!(source.state(), "running");
    let socket = unique("busy.sock");
    let uri = format!("unix:{}", socket.display());
    let target = destination(&uri, &[]);
    bound_uri(&target);
    // 32 MiB the guest keeps dirtying, at 8 MiB/s: seconds of copying.
    let migrating = slow_migration(&source, &uri);
    let deadline = Instant::now() + Duration::from_secs(20);
    let during = loop {
        let status = source.ctl_ok(&["status"]);
        if status["migration"]["pages_sent"].as_u64().unwrap_or(0) > 0 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never showed: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(during["state"], "busy", "{during}");
    // Still busy a moment later, while the copy goes on.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(source.state(), "busy");
    let _ = target.kill();
    let output = migrating.join().unwrap();
    assert!(!output.status.success());
    let after = source.ctl_ok(&["status"]);
    assert_eq!(after["state"], "running", "{after}");
    assert!(after.get("migration").is_none(), "{after}");
    let count = source.wait_for_count(0);
    source.wait_for_count(count + 5);
}

/// MiB/s `source` dirties, from the rounds of `pages_per_round` it counts
/// in a second.
fn dirty_rate(source: &Vmm, pages_per_round: u32) -> f64 {
    let before = source.wait_for_count(0);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let after = source.wait_for_count(0);
    (after - before) as f64 * f64::from(pages_per_round) / 256.0 / started.elapsed().as_secs_f64()
}

/// The README's promise: when the guest dirties memory faster than the link
/// copies it, vCPUs are throttled (up to 95 % of their time) until the copy
/// converges. Throttling shares out time, so it can only bring a guest down
/// to 5 % of its flat-out rate F: the link is set to F / 6 (measured here
/// first), faster than a guest throttled 95 % dirties, 6 times slower than
/// one running free, and the sweep to what the link copies in about 1.5 s,
/// against a 50 ms downtime limit. Without throttling every round finds the
/// whole sweep dirty again and the migration gives up after 60 s; with it,
/// the copy must converge within that, with a throttle above 0, its downtime
/// within the limit plus the usual margin, and the count going on at the
/// destination.
#[test]
fn a_guest_dirtying_faster_than_a_capped_link_is_throttled_until_the_migration_converges() {
    const PAGES_PER_ROUND: u32 = 16;
    let probe = Vmm::boot(
        &writer_guest(guests::MemoryWriter {
            region_pages: PAGES_PER_ROUND,
            sweep_pages: Some(8 * 256),
            ..Default::default()
        }),
        64,
    );
    probe.wait_for_count(100);
    let flat_out = dirty_rate(&probe, PAGES_PER_ROUND);
    drop(probe);
    let link_mib_s = ((flat_out / 6.0) as u64).max(1);
    let sweep_mib = (link_mib_s * 3 / 2).clamp(8, 96);
    eprintln!(
        "the guest dirties {flat_out:.0} MiB/s running free: link {link_mib_s} MiB/s, sweep {sweep_mib} MiB"
    );
    let guest = writer_guest(guests::MemoryWriter {
        region_pages: PAGES_PER_ROUND,
        sweep_pages: Some(sweep_mib as u32 * 256),
        ..Default::default()
    });
    let source = Vmm::boot(&guest, 128);
    let socket = unique("throttled.sock");
    let uri = format!("unix:{}", socket.display());
    let target = destination(&uri, &[]);
    bound_uri(&target);
    let started = Instant::now();
    let link = link_mib_s.to_string();
    let answer = migrate_and_check(
        source,
        target,
        &uri,
        &[
            "--bandwidth-mib",
            &link,
            "--downtime-ms",
            "50",
            "--give-up-after",
            "60",
        ],
    );
    eprintln!("throttled migration in {:?}: {answer}", started.elapsed());
    let migration = &answer["migration"];
    let throttle = migration["max_throttle_percent"].as_u64().unwrap();
    assert!(throttle > 0 && throttle <= 95, "{answer}");
    assert!(migration["rounds"].as_u64().unwrap() > 2, "{answer}");
}

#[test]
fn live_migration_over_tls() {
    let names = vec!["bulkhead-destination".to_string()];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (unique("cert.pem"), unique("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let guest = writer_guest(guests::MemoryWriter::default());
    let tls = [
        "--tls-cert".as_ref(),
        cert_path.as_os_str(),
        "--tls-key".as_ref(),
        key_path.as_os_str(),
    ];

    // A source that does not trust the destination's certificate stops at
    // the handshake and runs on.
    let source = Vmm::boot(&guest, 64);
    let target = destination("tcp:127.0.0.1:0", &tls);
    let uri = bound_uri(&target);
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["someone-else".to_string()])
        .unwrap()
        .self_signed(&other_key)
        .unwrap();
    let other_path = unique("other.pem");
    std::fs::write(&other_path, other.pem()).unwrap();
    let (ok, text) = source.ctl(&[
        "migrate",
        &uri,
        "--tls-ca",
        other_path.to_str().unwrap(),
        "--tls-server-name",
        "bulkhead-destination",
    ]);
    assert!(!ok && text.contains("TLS"), "{text}");
    let count = source.wait_for_count(0);
    source.wait_for_count(count + 5);
    assert_eq!(source.state(), "running");
    let _ = target.kill();

    // A destination that authenticates its sources (mutual TLS) refuses
    // one without a certificate; the source runs on.
    let mutual = [
        &tls[..],
        &["--tls-client-ca".as_ref(), cert_path.as_os_str()],
    ]
    .concat();
    let trusting = [
        "--tls-ca",
        cert_path.to_str().unwrap(),
        "--tls-server-name",
        "bulkhead-destination",
    ];
    let target = destination("tcp:127.0.0.1:0", &mutual);
    let uri = bound_uri(&target);
    let (ok, text) = source.ctl(&[&["migrate", uri.as_str()][..], &trusting].concat());
    assert!(!ok, "{text}");
    let count = source.wait_for_count(0);
    source.wait_for_count(count + 5);
    assert_eq!(source.state(), "running");
    let _ = target.kill();

    // With its certificate it goes through.
    let target = destination("tcp:127.0.0.1:0", &mutual);
    let uri = bound_uri(&target);
    let identity = [
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ];
    migrate_and_check(source, target, &uri, &[&trusting[..], &identity].concat());
}

/// Forwards a migration stream from `listen` to `to`, frame by frame from
/// the source, and cuts both directions when `cut(tag, index)` says so.
fn cutting_proxy(listen: &Path, to: PathBuf, cut: impl Fn(u8, usize) -> bool + Send + 'static) {
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (mut from_source, _) = listener.accept().unwrap();
        let mut to_destination = UnixStream::connect(&to).unwrap();
        let mut back_from = to_destination.try_clone().unwrap();
        let mut back_to = from_source.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
        });
        let mut index = 0;
        loop {
            let mut header = [0u8; 5];
            if from_source.read_exact(&mut header).is_err() {
                break;
            }
            let len = u32::from_le_bytes(header[1..].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; len];
            if from_source.read_exact(&mut payload).is_err() {
                break;
            }
            if cut(header[0], index) {
                break;
            }
            if to_destination.write_all(&header).is_err()
                || to_destination.write_all(&payload).is_err()
            {
                break;
            }
            index += 1;
        }
        let _ = from_source.shutdown(std::net::Shutdown::Both);
        let _ = to_destination.shutdown(std::net::Shutdown::Both);
    });
}

const PAGES: u8 = 4;
const STATE: u8 = 5;

/// After a failed migration the source runs on as if nothing happened: it
/// keeps counting without a gap, says why it failed, and can still migrate.
fn assert_unharmed(source: &Vmm, failure: &str, expected: &str) {
    assert!(
        failure.contains(expected),
        "expected {expected:?} in: {failure}"
    );
    let count = source.wait_for_count(0);
    source.wait_for_count(count + 10);
    assert_eq!(source.state(), "running");
    assert_consecutive(
        &counts(&source.output(), false),
        "source after a failed migration",
    );
}

#[test]
fn failed_migrations_leave_the_source_running() {
    let source = busy_source();

    // Nobody listens.
    let (ok, text) = source.ctl(&[
        "migrate",
        &format!("unix:{}", unique("nobody.sock").display()),
    ]);
    assert!(!ok);
    assert_unharmed(&source, &text, "cannot reach");

    // Handshake: a destination speaking another protocol version refuses.
    let fake = unique("fake-destination.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    let refuser = std::thread::spawn(move || {
        use std::io::Write;
        let (mut stream, _) = listener.accept().unwrap();
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).unwrap();
        let mut hello = vec![0u8; u32::from_le_bytes(header[1..].try_into().unwrap()) as usize];
        stream.read_exact(&mut hello).unwrap();
        let why = format!(
            "bulkhead-migration version {VERSION} offered, this Bulkhead takes version {}",
            VERSION + 1
        );
        let why = why.as_bytes();
        stream.write_all(&[3]).unwrap();
        stream.write_all(&(why.len() as u32).to_le_bytes()).unwrap();
        stream.write_all(why).unwrap();
        String::from_utf8(hello).unwrap()
    });
    let (ok, text) = source.ctl(&["migrate", &format!("unix:{}", fake.display())]);
    assert!(!ok);
    let hello = refuser.join().unwrap();
    assert!(hello.contains(&format!("\"version\":{VERSION}")), "{hello}");
    assert_unharmed(
        &source,
        &text,
        &format!("refused the migration: bulkhead-migration version {VERSION} offered"),
    );

    // Pre-copy: the destination is killed while memory is being copied.
    let socket = unique("killed.sock");
    let uri = format!("unix:{}", socket.display());
    let target = destination(&uri, &[]);
    bound_uri(&target);
    let migrating = slow_migration(&source, &uri);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = target.kill();
    let output = migrating.join().unwrap();
    assert!(!output.status.success());
    assert_unharmed(
        &source,
        &String::from_utf8_lossy(&output.stderr),
        "migration failed",
    );

    // Pre-copy: the connection is cut after some pages.
    type Cut = Box<dyn Fn(u8, usize) -> bool + Send>;
    let cuts: [(&str, Cut); 2] = [
        (
            "pre-copy",
            Box::new(|tag: u8, index: usize| tag == PAGES && index > 20),
        ),
        // Stop-and-copy: the state never arrives; the destination must not run.
        ("switch-over", Box::new(|tag: u8, _: usize| tag == STATE)),
    ];
    for (what, cut) in cuts {
        let real = unique("real.sock");
        let proxy = unique("proxy.sock");
        let target = destination(&format!("unix:{}", real.display()), &[]);
        bound_uri(&target);
        cutting_proxy(&proxy, real, cut);
        let (ok, text) = source.ctl(&["migrate", &format!("unix:{}", proxy.display())]);
        assert!(!ok, "{what}: {text}");
        assert_unharmed(&source, &text, "migration failed");
        let (status, output, stderr) = target.wait_exit();
        assert!(
            !status.success(),
            "{what}: the destination claims success: {stderr}"
        );
        assert!(
            output.is_empty(),
            "{what}: the guest ran at the destination: {output}"
        );
    }

    // A guest dirtying faster than the link: the migration gives up cleanly.
    let socket = unique("slow.sock");
    let uri = format!("unix:{}", socket.display());
    let target = destination(&uri, &[]);
    bound_uri(&target);
    let (ok, text) = source.ctl(&[
        "migrate",
        &uri,
        "--bandwidth-mib",
        "4",
        "--give-up-after",
        "3",
        "--downtime-ms",
        "5",
    ]);
    assert!(!ok);
    assert_unharmed(&source, &text, "did not finish within 3 s");
    let _ = target.kill();

    // And after all that it still migrates.
    let socket = unique("final.sock");
    let uri = format!("unix:{}", socket.display());
    let target = destination(&uri, &[]);
    bound_uri(&target);
    migrate_and_check(source, target, &uri, &[]);
}

#[test]
fn damaged_snapshots_are_refused_with_the_reason() {
    let guest = writer_guest(guests::MemoryWriter {
        region_pages: 65536,
        ..Default::default()
    });
    let source = Vmm::boot(&guest, 512);
    source.wait_for_count(1);

    // Killed while writing: nothing appears at the snapshot's path.
    let interrupted = unique("interrupted");
    let writing = {
        let control = source.control.clone();
        let path = interrupted.clone();
        std::thread::spawn(move || {
            Command::new(env!("CARGO_BIN_EXE_bulkhead"))
                .arg("ctl")
                .arg(control)
                .arg("snapshot")
                .arg(path)
                .output()
                .unwrap()
        })
    };
    // Kill the VMM once the snapshot is being written (its staging directory exists).
    let staging_prefix = format!(
        ".{}.partial-",
        interrupted.file_name().unwrap().to_string_lossy()
    );
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_dir(work_dir()).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(&staging_prefix)
    }) {
        assert!(Instant::now() < deadline, "the snapshot never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let good = unique("good");
    let _ = source.kill();
    let _ = writing.join();
    assert!(
        !interrupted.exists(),
        "a snapshot killed half-way left {}",
        interrupted.display()
    );
    let restore_error = |dir: &Path| {
        let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("run")
            .arg("--restore")
            .arg(dir)
            .output()
            .unwrap();
        assert!(!output.status.success());
        assert!(output.stdout.is_empty(), "a guest ran from a bad snapshot");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(restore_error(&interrupted).contains("not a complete Bulkhead snapshot"));

    let source = Vmm::boot(&writer_guest(guests::MemoryWriter::default()), 64);
    source.wait_for_count(3);
    source.ctl_ok(&["snapshot", good.to_str().unwrap()]);
    let _ = source.kill();
    let damaged = |name: &str, damage: &dyn Fn(&Path)| {
        let copy = unique(name);
        std::fs::create_dir(&copy).unwrap();
        for file in ["manifest.json", "state.json", "memory"] {
            std::fs::copy(good.join(file), copy.join(file)).unwrap();
        }
        damage(&copy);
        restore_error(&copy)
    };
    let error = damaged("corrupt-state", &|dir| {
        let mut state = std::fs::read(dir.join("state.json")).unwrap();
        let middle = state.len() / 2;
        state[middle] ^= 0x20;
        std::fs::write(dir.join("state.json"), state).unwrap();
    });
    assert!(error.contains("corrupted"), "{error}");
    let error = damaged("truncated-state", &|dir| {
        let state = std::fs::read(dir.join("state.json")).unwrap();
        std::fs::write(dir.join("state.json"), &state[..state.len() - 100]).unwrap();
    });
    assert!(error.contains("truncated"), "{error}");
    let error = damaged("truncated-memory", &|dir| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory"))
            .unwrap();
        file.set_len(32 << 20).unwrap();
    });
    assert!(
        error.contains("memory") && error.contains("truncated"),
        "{error}"
    );
    let error = damaged("future-version", &|dir| {
        let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        std::fs::write(
            dir.join("manifest.json"),
            manifest.replace(
                &format!("\"version\": {}", vmm::snapshot::VERSION),
                "\"version\": 7",
            ),
        )
        .unwrap();
    });
    assert!(error.contains("version 7"), "{error}");
    // Memory corruption is only found when asked to read it all.
    let copy = unique("corrupt-memory");
    std::fs::create_dir(&copy).unwrap();
    for file in ["manifest.json", "state.json", "memory"] {
        std::fs::copy(good.join(file), copy.join(file)).unwrap();
    }
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(copy.join("memory"))
            .unwrap();
        file.write_all_at(b"garbage", 5 << 20).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--verify-memory", "--restore"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("corrupted"));
    // The original is still good.
    let restored = Vmm::start(&["--restore".as_ref(), good.as_os_str()]);
    restored.wait_for_count(1);
    restored.kill();
}

/// A source speaking another protocol version is refused by the
/// destination, which says why on both ends and runs nothing.
#[test]
fn a_destination_refuses_another_protocol_version() {
    use std::io::Write;
    let socket = unique("versions.sock");
    let target = destination(&format!("unix:{}", socket.display()), &[]);
    bound_uri(&target);
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let hello = br#"{"format":"bulkhead-migration","version":99,"machine":{"kernel":"k","cmdline":"","cpus":1,"memory_mib":64,"disks":[],"nets":[],"rng":false,"balloon":null,"vsock":null}}"#;
    stream.write_all(&[1]).unwrap();
    stream
        .write_all(&(hello.len() as u32).to_le_bytes())
        .unwrap();
    stream.write_all(hello).unwrap();
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 3, "expected REFUSE");
    let mut why = vec![0u8; u32::from_le_bytes(header[1..].try_into().unwrap()) as usize];
    stream.read_exact(&mut why).unwrap();
    let why = String::from_utf8(why).unwrap();
    assert!(why.contains("version 99 offered"), "{why}");
    let (status, output, stderr) = target.wait_exit();
    assert!(!status.success());
    assert!(output.is_empty());
    assert!(stderr.contains("refused the source"), "{stderr}");
}

/// The snapshot of each format version that every later Bulkhead must
/// restore: written once by the Bulkhead of its time (`write_the_snapshot_fixture`),
/// checked in, never rewritten. Memory is gzipped (the guest's 4 MiB are
/// mostly zeros). Version 3's has devices (an rng and a balloon) for its
/// state keyed by device id; version 4's has those and two vCPUs, for its
/// vCPUs keyed by id.
fn fixture(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/snapshot-v{version}"))
}

#[test]
#[ignore = "writes the checked-in fixture of a new format version; run by hand once"]
fn write_the_snapshot_fixture() {
    let fixture = fixture(vmm::snapshot::VERSION);
    assert!(
        !fixture.exists(),
        "{} exists: a fixture is never rewritten",
        fixture.display()
    );
    let guest = writer_guest(guests::MemoryWriter {
        region_pages: 64,
        ..Default::default()
    });
    let source = Vmm::start(&[
        "--kernel".as_ref(),
        guest.as_os_str(),
        "--memory".as_ref(),
        "4".as_ref(),
        "--cpus".as_ref(),
        "2".as_ref(),
        "--rng".as_ref(),
        "--balloon=target_mib=1,deflate_on_oom".as_ref(),
    ]);
    source.wait_for_count(5);
    let snapshot = unique("fixture");
    // Paused, so what it printed ends where the snapshot is.
    source.ctl_ok(&["pause"]);
    source.ctl_ok(&["snapshot", snapshot.to_str().unwrap()]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let printed = counts(&source.kill(), false);
    std::fs::create_dir_all(&fixture).unwrap();
    for name in ["state.json", "manifest.json"] {
        std::fs::copy(snapshot.join(name), fixture.join(name)).unwrap();
    }
    let memory = std::fs::read(snapshot.join("memory")).unwrap();
    let mut gzip = flate2::write::GzEncoder::new(
        std::fs::File::create(fixture.join("memory.gz")).unwrap(),
        flate2::Compression::best(),
    );
    std::io::Write::write_all(&mut gzip, &memory).unwrap();
    gzip.finish().unwrap();
    // What the guest had printed by then: the restored one goes on from there.
    std::fs::write(
        fixture.join("printed-before.json"),
        serde_json::to_string(&printed).unwrap(),
    )
    .unwrap();
}

/// Restores the checked-in fixture of `version` and checks the guest goes on
/// from where it was.
fn the_checked_in_snapshot_restores(version: u32) {
    let fixture = fixture(version);
    let snapshot = unique(&format!("fixture-v{version}"));
    std::fs::create_dir_all(&snapshot).unwrap();
    for name in ["state.json", "manifest.json"] {
        std::fs::copy(fixture.join(name), snapshot.join(name)).unwrap();
    }
    let mut memory = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(fixture.join("memory.gz")).unwrap())
        .read_to_end(&mut memory)
        .unwrap();
    std::fs::write(snapshot.join("memory"), memory).unwrap();
    let printed: Vec<u64> = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("printed-before.json")).unwrap(),
    )
    .unwrap();

    let restored = Vmm::start(&[
        "--restore".as_ref(),
        snapshot.as_os_str(),
        "--verify-memory".as_ref(),
    ]);
    restored.wait_for_count(1);
    let first = restored.count().unwrap();
    restored.wait_for_count(first + 5);
    let after = counts(&restored.kill(), true);
    assert_consecutive(&after, "the restored fixture");
    // It goes on from where the guest was when the fixture was written.
    let last_printed = *printed.last().unwrap();
    assert!(
        after[0] >= last_printed && after[0] <= last_printed + 2,
        "resumed at {}, the fixture's guest had printed up to {last_printed}",
        after[0]
    );
}

/// A copy of the fixture of `version` whose state is `change`d, its
/// manifest made to agree; returns `bulkhead run --restore`'s error.
fn restore_error_of_changed_fixture(
    version: u32,
    name: &str,
    change: &dyn Fn(&mut serde_json::Value),
) -> String {
    let fixture = fixture(version);
    let copy = unique(name);
    std::fs::create_dir_all(&copy).unwrap();
    let mut memory = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(fixture.join("memory.gz")).unwrap())
        .read_to_end(&mut memory)
        .unwrap();
    std::fs::write(copy.join("memory"), memory).unwrap();
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("state.json")).unwrap()).unwrap();
    change(&mut state);
    let bytes = serde_json::to_vec(&state).unwrap();
    std::fs::write(copy.join("state.json"), &bytes).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("manifest.json")).unwrap()).unwrap();
    for file in manifest["files"].as_array_mut().unwrap() {
        if file["name"] == "state.json" {
            file["crc32"] = serde_json::json!(crc32fast::hash(&bytes));
            file["bytes"] = serde_json::json!(bytes.len());
        }
    }
    std::fs::write(copy.join("manifest.json"), manifest.to_string()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--restore"])
        .arg(&copy)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{name}: restored");
    assert!(output.stdout.is_empty(), "{name}: a guest ran");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn device_state_is_keyed_by_device_id_and_typed() {
    let error = restore_error_of_changed_fixture(3, "renamed-device", &|state| {
        let rng = state["devices"]
            .as_object_mut()
            .unwrap()
            .remove("rng")
            .unwrap();
        state["devices"]["rng7"] = rng;
    });
    assert!(
        error.contains("\"rng7\"") && error.contains("does not have"),
        "{error}"
    );
    let error = restore_error_of_changed_fixture(3, "missing-device", &|state| {
        state["devices"].as_object_mut().unwrap().remove("balloon");
    });
    assert!(error.contains("nothing for device \"balloon\""), "{error}");
    // A balloon's state on the rng, and a balloon without its own.
    let error = restore_error_of_changed_fixture(3, "swapped-state", &|state| {
        let balloon = state["devices"]["balloon"]["device"].take();
        state["devices"]["rng"]["device"] = balloon;
    });
    assert!(
        error.contains("rng: a saved state of another device"),
        "{error}"
    );
    let error = restore_error_of_changed_fixture(3, "out-of-range", &|state| {
        state["devices"]["balloon"]["device"]["target_pages"] = serde_json::json!(-1);
    });
    // Each device decodes its own state, and the error names it.
    assert!(error.contains("does not fit this VM: balloon: "), "{error}");
    // A version 3 state in version 2's layout (a list) is not taken as one.
    let error = restore_error_of_changed_fixture(3, "listed", &|state| {
        let devices: Vec<_> = state["devices"]
            .as_object()
            .unwrap()
            .values()
            .cloned()
            .collect();
        state["devices"] = serde_json::Value::Array(devices);
    });
    assert!(error.contains("cannot decode"), "{error}");
}

#[test]
fn vcpu_state_is_keyed_by_vcpu_id() {
    let error = restore_error_of_changed_fixture(4, "renamed-vcpu", &|state| {
        let vcpu = state["vcpus"].as_object_mut().unwrap().remove("1").unwrap();
        state["vcpus"]["5"] = vcpu;
    });
    assert!(
        error.contains("the state has vCPUs [0, 5], the machine has 2"),
        "{error}"
    );
    let error = restore_error_of_changed_fixture(4, "missing-vcpu", &|state| {
        state["vcpus"].as_object_mut().unwrap().remove("0");
    });
    assert!(error.contains("the state has vCPUs [1]"), "{error}");
    let error = restore_error_of_changed_fixture(4, "vcpu-not-an-id", &|state| {
        let vcpu = state["vcpus"].as_object_mut().unwrap().remove("1").unwrap();
        state["vcpus"]["cpu1"] = vcpu;
    });
    assert!(error.contains("cannot decode"), "{error}");
    // A version 4 state in the older layout (a list) is not taken as one.
    let error = restore_error_of_changed_fixture(4, "listed-vcpus", &|state| {
        let vcpus: Vec<_> = state["vcpus"]
            .as_object()
            .unwrap()
            .values()
            .cloned()
            .collect();
        state["vcpus"] = serde_json::Value::Array(vcpus);
    });
    assert!(error.contains("cannot decode"), "{error}");
}

#[test]
fn the_checked_in_snapshot_of_format_version_2_restores() {
    the_checked_in_snapshot_restores(2);
}

#[test]
fn the_checked_in_snapshot_of_format_version_3_restores() {
    the_checked_in_snapshot_restores(3);
}

#[test]
fn the_checked_in_snapshot_of_format_version_4_restores() {
    the_checked_in_snapshot_restores(4);
}

#[test]
fn the_checked_in_snapshot_of_format_version_5_restores() {
    the_checked_in_snapshot_restores(5);
}

#[test]
fn the_checked_in_snapshot_of_format_version_6_restores() {
    the_checked_in_snapshot_restores(6);
}

/// A new format version comes with its fixture (and a test above).
#[test]
fn every_readable_format_version_has_a_fixture() {
    for version in vmm::snapshot::MIN_READABLE_VERSION..=vmm::snapshot::VERSION {
        assert!(
            fixture(version).join("state.json").exists(),
            "no fixture of snapshot format {version}: run write_the_snapshot_fixture"
        );
    }
}

/// A TAP the user made single-queue (`ip tuntap add dev NAME mode tap`, as
/// Firecracker's guide does) cannot be attached again while the source holds
/// it: over a Unix socket the source hands it over, and the destination runs
/// on the very same device.
#[test]
fn a_same_host_migration_hands_over_a_single_queue_tap() {
    let namespace = support::Namespace::new();
    let tap = "bh-single";
    support::run(Command::new("ip").args([
        "-n",
        namespace.name(),
        "tuntap",
        "add",
        "dev",
        tap,
        "mode",
        "tap",
    ]));
    let guest = writer_guest(guests::MemoryWriter::default());
    let net = format!("tap={tap}");
    let source = Vmm::start_in(
        Some(&namespace),
        &[
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--memory".as_ref(),
            "64".as_ref(),
            "--net".as_ref(),
            net.as_ref(),
        ],
    );
    let before = source.wait_for_count(10);
    let socket = unique("same-host.sock");
    let uri = format!("unix:{}", socket.display());
    let destination = Vmm::start_in(Some(&namespace), &["--incoming".as_ref(), uri.as_ref()]);
    bound_uri(&destination);
    let answer = source.ctl_ok(&["migrate", &uri]);
    assert!(answer["migration"].is_object(), "{answer}");
    let (status, source_output, source_stderr) = source.wait_exit();
    assert!(status.success(), "{source_stderr}");
    destination.wait_for_count(before + 30);
    assert_eq!(destination.state(), "running");
    // The destination holds the TAP, and it is the one the user made. (It
    // was opened in the source's mount namespace, a private one of `ip netns
    // exec`: seen from here its path is "/net/tun", not "/dev/net/tun".)
    let held: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", destination.child.id()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .collect();
    assert!(
        held.iter().any(|target| target.ends_with("net/tun")),
        "the destination holds no TAP: {held:?}"
    );
    let link =
        support::run(Command::new("ip").args(["-n", namespace.name(), "-d", "link", "show", tap]));
    assert!(!link.contains("multi_queue"), "{link}");
    let combined = source_output + &destination.kill();
    assert_consecutive(&counts(&combined, false), "source then destination");
}

/// A memory-writing guest (`region_pages` a round) with `mib` of RAM in a
/// memfd (`--shared-memory`).
fn shared_memory_writer(region_pages: u32, mib: &str) -> Vmm {
    let guest = writer_guest(guests::MemoryWriter {
        region_pages,
        ..Default::default()
    });
    Vmm::start(&[
        "--kernel".as_ref(),
        guest.as_os_str(),
        "--memory".as_ref(),
        mib.as_ref(),
        "--shared-memory".as_ref(),
    ])
}

/// Whether process `pid` holds guest RAM in a memfd (`--shared-memory`).
fn holds_guest_memfd(vmm: &Vmm) -> bool {
    std::fs::read_dir(format!("/proc/{}/fd", vmm.child.id()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .any(|target| {
            target
                .to_string_lossy()
                .starts_with("/memfd:bulkhead-guest-ram")
        })
}

/// Guest RAM in a memfd (`--shared-memory`) goes to a destination on the
/// same host as a descriptor: no page is copied, and the destination runs
/// on the very pages the source ran on (the memory checksums agree). Over
/// TCP the same machine is copied, and arrives in a memfd again, so the
/// next same-host migration can hand it over.
#[test]
fn a_same_host_migration_hands_over_shared_memory() {
    let source = shared_memory_writer(4096, "128");
    let before = source.wait_for_count(10);
    assert!(holds_guest_memfd(&source));

    let middle = destination("tcp:127.0.0.1:0", &[]);
    let uri = bound_uri(&middle);
    let copied = source.ctl_ok(&["migrate", &uri, "--verify-memory"]);
    assert_eq!(copied["migration"]["memory_handed_over"], false, "{copied}");
    assert!(copied["migration"]["pages_sent"].as_u64().unwrap() > 0);
    let (status, mut output, stderr) = source.wait_exit();
    assert!(status.success(), "{stderr}");
    let reached = middle.wait_for_count(before + 10);
    assert!(holds_guest_memfd(&middle));

    let socket = unique("hand-over.sock");
    let uri = format!("unix:{}", socket.display());
    let last = destination(&uri, &[]);
    bound_uri(&last);
    let handed = middle.ctl_ok(&["migrate", &uri, "--verify-memory"]);
    eprintln!("copied: {copied}\nhanded over: {handed}");
    assert_eq!(handed["migration"]["memory_handed_over"], true, "{handed}");
    assert_eq!(handed["migration"]["pages_sent"], 0, "{handed}");
    assert!(handed["migration"]["memory_crc"].is_u64(), "{handed}");
    let (status, middle_output, stderr) = middle.wait_exit();
    assert!(status.success(), "{stderr}");
    output += &middle_output;
    last.wait_for_count(reached + 30);
    assert_eq!(last.state(), "running");
    assert!(holds_guest_memfd(&last));
    output += &last.kill();
    assert_consecutive(&counts(&output, false), "source, copy, hand-over");
}

/// One frame of the migration stream: tag, little-endian length, payload.
fn read_frame(stream: &mut impl Read) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).unwrap();
    let len = u32::from_le_bytes(header[1..].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    (header[0], payload)
}

fn write_frame(stream: &mut impl std::io::Write, tag: u8, payload: &[u8]) {
    stream.write_all(&[tag]).unwrap();
    stream
        .write_all(&(payload.len() as u32).to_le_bytes())
        .unwrap();
    stream.write_all(payload).unwrap();
}

/// A destination that takes the guest's memory over and then fails at the
/// switch-over (it answers FAILED, or it just goes away): the source, told
/// nothing ran elsewhere, resumes the guest on that same memory, and the
/// count goes on without a gap or a repeat.
#[test]
fn a_failed_hand_over_leaves_the_guest_running_on_the_source() {
    const HELLO: u8 = 1;
    const ACCEPT: u8 = 2;
    const STATE: u8 = 5;
    const FAILED: u8 = 7;
    const MEMORY: u8 = 10;
    let source = shared_memory_writer(1024, "64");
    let mut reached = source.wait_for_count(10);
    for answers_failed in [true, false] {
        let socket = unique("failing-destination.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            assert_eq!(read_frame(&mut stream).0, HELLO);
            write_frame(&mut stream, ACCEPT, br#"{"taps":false,"memory":true}"#);
            // A plain read takes the bytes; the attached memfd is dropped.
            let (tag, payload) = read_frame(&mut stream);
            assert_eq!(tag, MEMORY, "{}", String::from_utf8_lossy(&payload));
            assert_eq!(read_frame(&mut stream).0, STATE);
            if answers_failed {
                write_frame(&mut stream, FAILED, b"injected failure");
            }
        });
        let uri = format!("unix:{}", socket.display());
        let (ok, text) = source.ctl(&["migrate", &uri]);
        peer.join().unwrap();
        assert!(
            !ok,
            "the migration to a failing destination succeeded: {text}"
        );
        if answers_failed {
            assert!(text.contains("injected failure"), "{text}");
        }
        assert_eq!(source.state(), "running", "{text}");
        reached = source.wait_for_count(reached + 20);
    }
    let output = source.kill();
    assert_consecutive(
        &counts(&output, false),
        "the source, after two failed hand-overs",
    );
}

/// A `--shared-memory` VM restored from a snapshot runs on a private
/// mapping of the snapshot's memory file, which is no memfd to hand over:
/// its next same-host migration copies the pages, and the VM arrives in a
/// memfd again.
#[test]
fn a_restored_shared_memory_vm_is_copied_and_arrives_in_a_memfd() {
    let source = shared_memory_writer(1024, "64");
    source.wait_for_count(5);
    let snapshot = unique("shared-snapshot");
    source.ctl_ok(&["pause"]);
    source.ctl_ok(&["snapshot", snapshot.to_str().unwrap()]);
    let mut output = source.kill();
    let restored = Vmm::start(&["--restore".as_ref(), snapshot.as_os_str()]);
    let reached = restored.wait_for_count(1);
    assert!(!holds_guest_memfd(&restored));
    let socket = unique("after-restore.sock");
    let uri = format!("unix:{}", socket.display());
    let destination = destination(&uri, &[]);
    bound_uri(&destination);
    let answer = restored.ctl_ok(&["migrate", &uri]);
    assert_eq!(answer["migration"]["memory_handed_over"], false, "{answer}");
    assert!(answer["migration"]["pages_sent"].as_u64().unwrap() > 0);
    let (status, restored_output, stderr) = restored.wait_exit();
    assert!(status.success(), "{stderr}");
    destination.wait_for_count(reached + 20);
    assert!(holds_guest_memfd(&destination));
    output += &restored_output;
    output += &destination.kill();
    assert_consecutive(&counts(&output, false), "source, restored, migrated");
}
