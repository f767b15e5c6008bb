//! The sending side of a live migration.

use super::dirty::{self, DirtyLog};
use super::protocol::{
    self, read_frame, write_frame, write_json, Final, Hello, Resumed, Stream, Tag,
};
use super::transport::Connection;
use super::{
    transport, MigrateOptions, MigrationError, MigrationPhase, MigrationProgress, MigrationReport,
    DEFAULT_DOWNTIME, DEFAULT_GIVE_UP,
};
use crate::config::VmSpec;
use crate::devices::legacy::post::monotonic_ns;
use crate::devices::lock;
use crate::exit::VmExit;
use crate::memory::GuestRam;
use crate::snapshot::{is_zero, SavedVm};
use crate::vm_core::{kick_signal, RunState, VmCore};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PAGE: usize = 4096;
/// Pages per PAGES frame at most (1 MiB of memory).
const PAGES_PER_FRAME: usize = 256;
/// Rounds that fail to shrink the dirty set before vCPUs are throttled more.
const ROUNDS_BEFORE_THROTTLE: u32 = 1;
const THROTTLE_STEP: u32 = 20;
const MAX_THROTTLE: u32 = 95;
/// How often throttled vCPUs are knocked out of KVM_RUN to serve their penalty.
const THROTTLE_KICK: Duration = Duration::from_millis(5);

/// What the sending side of the stream needs of the VM it migrates: its
/// RAM, a log of the pages written to it, a throttle on its vCPUs, a pause
/// and its state. `VmCore` is the real one; the unit tests drive a fake
/// over an in-memory stream.
pub(crate) trait Source {
    fn machine(&self) -> &VmSpec;
    fn memory(&self) -> &GuestRam;
    /// Passes what the destination asked for (TAPs, the memfd of guest
    /// RAM) over the Unix socket.
    fn hand_over(
        &self,
        socket: Option<&UnixStream>,
        accept: &protocol::Accept,
    ) -> Result<(), MigrationError>;
    /// Turns dirty-page logging on, until the log is dropped.
    fn dirty_log(&self) -> Result<Box<dyn DirtyPages + '_>, MigrationError>;
    /// Holds vCPUs back this share of their time (0: not at all).
    fn set_throttle(&self, percent: u32);
    /// Parks the vCPUs and the device thread for the stop-and-copy.
    fn park(&self) -> Result<(), MigrationError>;
    /// Everything but guest RAM, from parked threads.
    fn capture(&self) -> Result<SavedVm, MigrationError>;
    /// Where the status reads the migration's progress.
    fn progress(&self) -> &Mutex<Option<MigrationProgress>>;
}

/// A running dirty-page log (`DirtyLog` for a VM).
pub(crate) trait DirtyPages {
    /// The pages written since the last call, one bitmap per region (bit i
    /// of word w is page 64·w + i), and clears them.
    fn take(&self) -> Result<Vec<Vec<u64>>, MigrationError>;
}

impl DirtyPages for DirtyLog<'_> {
    fn take(&self) -> Result<Vec<Vec<u64>>, MigrationError> {
        DirtyLog::take(self)
    }
}

impl Source for VmCore {
    fn machine(&self) -> &VmSpec {
        &self.machine
    }

    fn memory(&self) -> &GuestRam {
        &self.shared.memory
    }

    fn hand_over(
        &self,
        socket: Option<&UnixStream>,
        accept: &protocol::Accept,
    ) -> Result<(), MigrationError> {
        VmCore::hand_over(self, socket, accept)
    }

    fn dirty_log(&self) -> Result<Box<dyn DirtyPages + '_>, MigrationError> {
        Ok(Box::new(DirtyLog::start(
            &self.shared.vm,
            &self.shared.memory,
        )?))
    }

    fn set_throttle(&self, percent: u32) {
        self.shared
            .throttle_percent
            .store(percent, Ordering::Relaxed);
    }

    fn park(&self) -> Result<(), MigrationError> {
        Ok(self.park_threads()?)
    }

    fn capture(&self) -> Result<SavedVm, MigrationError> {
        Ok(VmCore::capture(self)?)
    }

    fn progress(&self) -> &Mutex<Option<MigrationProgress>> {
        &self.migration
    }
}

/// Sends guest pages, paced to the bandwidth cap, and counts them.
struct PageSender<'a> {
    stream: &'a mut dyn Stream,
    memory: &'a GuestRam,
    buffer: Vec<u8>,
    pages_sent: u64,
    bytes_sent: u64,
    cap_bytes_per_s: Option<f64>,
    started: Instant,
    /// A migration still copying at this point gives up.
    give_up_at: Instant,
    rounds: u32,
    throttle: u32,
    /// Where the status reads the migration's progress.
    progress: &'a Mutex<Option<MigrationProgress>>,
}

impl PageSender<'_> {
    fn send_run(&mut self, address: GuestAddress, pages: usize) -> Result<(), MigrationError> {
        if Instant::now() > self.give_up_at {
            let seconds = self.started.elapsed().as_secs_f64();
            return Err(MigrationError::TooSlow {
                seconds: seconds as u64,
                rounds: self.rounds,
                throttle: self.throttle,
                sent_mib: self.bytes_sent >> 20,
                link_mib_s: self.bytes_sent as f64 / seconds / f64::from(1 << 20),
            });
        }
        let len = pages * PAGE;
        self.buffer.resize(len, 0);
        self.memory.read_slice(&mut self.buffer, address)?;
        write_frame(
            self.stream,
            Tag::Pages,
            &[&address.0.to_le_bytes(), &self.buffer],
        )?;
        self.pages_sent += pages as u64;
        self.bytes_sent += (len + 13) as u64;
        if let Some(progress) = lock(self.progress).as_mut() {
            progress.pages_sent = self.pages_sent;
            progress.bytes_sent = self.bytes_sent;
            progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
        }
        if let Some(cap) = self.cap_bytes_per_s {
            let due = Duration::from_secs_f64(self.bytes_sent as f64 / cap);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// The first round: every page that is not zero (the destination's
    /// fresh memory is zero already).
    fn send_all(&mut self) -> Result<(), MigrationError> {
        let mut page = vec![0u8; PAGE];
        let regions: Vec<(GuestAddress, usize)> = self
            .memory
            .iter()
            .map(|r| (r.start_addr(), r.len() as usize / PAGE))
            .collect();
        for (start, pages) in regions {
            let mut run: Option<(usize, usize)> = None;
            for index in 0..pages {
                let address = start.unchecked_add((index * PAGE) as u64);
                self.memory.read_slice(&mut page, address)?;
                let zero = is_zero(&page);
                run = match (run, zero) {
                    (Some((first, n)), false) if n < PAGES_PER_FRAME => Some((first, n + 1)),
                    (Some((first, n)), _) => {
                        self.send_run(start.unchecked_add((first * PAGE) as u64), n)?;
                        (!zero).then_some((index, 1))
                    }
                    (None, false) => Some((index, 1)),
                    (None, true) => None,
                };
            }
            if let Some((first, n)) = run {
                self.send_run(start.unchecked_add((first * PAGE) as u64), n)?;
            }
        }
        Ok(())
    }

    fn send_dirty(&mut self, maps: &[Vec<u64>]) -> Result<(), MigrationError> {
        let regions: Vec<(GuestAddress, usize)> = self
            .memory
            .iter()
            .map(|r| (r.start_addr(), r.len() as usize / PAGE))
            .collect();
        for ((start, pages), map) in regions.into_iter().zip(maps) {
            for (first, count) in dirty::runs(map, pages) {
                let mut done = 0;
                while done < count {
                    let n = PAGES_PER_FRAME.min(count - done);
                    self.send_run(start.unchecked_add(((first + done) * PAGE) as u64), n)?;
                    done += n;
                }
            }
        }
        Ok(())
    }
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Whether a round's `dirty_pages` shrank the dirty set enough (by a tenth)
/// to count as progress over the `smallest` seen so far (none: the first).
fn made_progress(dirty_pages: u64, smallest: Option<u64>) -> bool {
    smallest.is_none_or(|smallest| dirty_pages < smallest - smallest / 10)
}

fn merge(into: &mut [Vec<u64>], from: Vec<Vec<u64>>) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

impl VmCore {
    /// Migrates this VM to the destination at `options.uri`. On success the
    /// VM here has ended (its exit is `Migrated`); on failure it runs on (or
    /// stays paused, if it was) and the error says why.
    pub fn migrate(&self, options: &MigrateOptions) -> Result<MigrationReport, MigrationError> {
        let mut state = lock(&self.run_state);
        let was_paused = *state == RunState::Paused;
        let mut parked = was_paused;
        let throttle_done = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            // Keeps throttled vCPUs coming out of KVM_RUN to sleep their share.
            scope.spawn(|| {
                while !throttle_done.load(Ordering::Acquire) {
                    if self.shared.throttle_percent.load(Ordering::Relaxed) > 0 {
                        self.shared.threads.kick(kick_signal());
                    }
                    std::thread::sleep(THROTTLE_KICK);
                }
            });
            // However the migration ends, a panic included, the kicker
            // stops: the scope waits for it before it returns or unwinds.
            let _stop_kicker = StopOnDrop(&throttle_done);
            *lock(&self.migration) = Some(MigrationProgress::default());
            let result = self.migrate_inner(options, &mut parked);
            *lock(&self.migration) = None;
            self.shared.throttle_percent.store(0, Ordering::Relaxed);
            result
        });
        match &result {
            Ok(_) => {
                // The destination runs the guest now: this copy must never run again.
                self.shared.exit.request(VmExit::Migrated);
            }
            Err(e) => {
                tracing::warn!("migration failed, the VM goes on here: {e}");
                if parked && !was_paused {
                    self.release_threads();
                }
                *state = if was_paused {
                    RunState::Paused
                } else {
                    RunState::Running
                };
            }
        }
        result
    }

    fn migrate_inner(
        &self,
        options: &MigrateOptions,
        parked: &mut bool,
    ) -> Result<MigrationReport, MigrationError> {
        let started = Instant::now();
        let connection = transport::connect(&options.uri, options.tls.as_ref())?;
        send(self, connection, options, started, parked)
    }

    /// Passes what the destination asked for over the Unix socket: the TAP
    /// descriptors, then the memfd of guest RAM.
    fn hand_over(
        &self,
        socket: Option<&std::os::unix::net::UnixStream>,
        accept: &protocol::Accept,
    ) -> Result<(), MigrationError> {
        let asked = |what: &str| {
            protocol::ProtocolError::Malformed(Tag::Accept, format!("{what} asked for"))
        };
        let socket =
            socket.ok_or_else(|| asked("descriptors over a stream that cannot carry them"))?;
        if accept.taps {
            let names: Vec<String> = self
                .machine
                .nics
                .iter()
                .map(|net| net.tap.clone())
                .collect();
            super::hand_over::send_taps(socket, &names, &self.taps)?;
        }
        if accept.memory {
            let file = crate::memory::shared_file(&self.shared.memory)
                .ok_or_else(|| asked("the memory of a VM whose RAM is not a memfd"))?;
            super::hand_over::send_memory(socket, file, self.machine.memory_bytes())?;
        }
        Ok(())
    }
}

/// Drives the sending side of the stream for `vm` over `connection`:
/// HELLO, what the destination asks handed over, the pre-copy rounds, the
/// stop-and-copy, the state, and the destination's answer. `parked` says
/// whether the vCPUs are parked, and is set when this parks them.
pub(crate) fn send(
    vm: &dyn Source,
    connection: Connection,
    options: &MigrateOptions,
    started: Instant,
    parked: &mut bool,
) -> Result<MigrationReport, MigrationError> {
    let downtime_limit = options
        .downtime_ms
        .map_or(DEFAULT_DOWNTIME, Duration::from_millis);
    let give_up = options
        .give_up_after_s
        .map_or(DEFAULT_GIVE_UP, Duration::from_secs);
    let mut stream = connection.stream;
    let stream: &mut dyn Stream = stream.as_mut();
    let memory = vm.memory();
    write_json(
        stream,
        Tag::Hello,
        &Hello {
            format: protocol::FORMAT.into(),
            version: protocol::VERSION,
            machine: vm.machine().clone(),
            memory_to_hand_over: crate::memory::shared_file(memory).is_some(),
        },
    )?;
    stream.flush().map_err(protocol::ProtocolError::from)?;
    let mut payload = Vec::new();
    let accept: protocol::Accept = match read_frame(stream, &mut payload)? {
        // An older destination's ACCEPT is `{}`.
        Tag::Accept => protocol::decode(Tag::Accept, &payload)?,
        Tag::Refuse | Tag::Abort => return Err(MigrationError::Refused(protocol::text(&payload))),
        other => {
            return Err(protocol::ProtocolError::Unexpected {
                expected: "ACCEPT",
                got: other,
            }
            .into())
        }
    };
    if accept.taps || accept.memory {
        vm.hand_over(connection.unix.as_ref(), &accept)?;
    }

    // Handed over, the destination maps the pages the guest runs on:
    // nothing is copied, and nothing needs tracking.
    let log = if accept.memory {
        None
    } else {
        Some(vm.dirty_log()?)
    };
    let mut sender = PageSender {
        stream,
        memory,
        buffer: Vec::with_capacity(PAGES_PER_FRAME * PAGE),
        pages_sent: 0,
        bytes_sent: 0,
        cap_bytes_per_s: options.bandwidth_mib.map(|m| (m.max(1) << 20) as f64),
        started: Instant::now(),
        give_up_at: started + give_up,
        rounds: 0,
        throttle: 0,
        progress: vm.progress(),
    };
    let mut report = MigrationReport {
        memory_handed_over: accept.memory,
        ..MigrationReport::default()
    };
    let mut pending = match &log {
        Some(log) => pre_copy(
            vm,
            log.as_ref(),
            &mut sender,
            &mut report,
            started,
            (downtime_limit, give_up),
            *parked,
        )?,
        None => Vec::new(),
    };
    // The last pages are sent whatever the time: the guest is paused by then.
    sender.give_up_at = Instant::now() + Duration::from_secs(3600);

    // Stop and copy.
    let paused_ns = monotonic_ns();
    if !*parked {
        vm.park()?;
        *parked = true;
    }
    set_progress(vm, started, &|p| p.phase = MigrationPhase::StopAndCopy);
    if let Some(log) = &log {
        merge(&mut pending, log.take()?);
        report.last_round_pages = dirty::count(&pending);
        sender.send_dirty(&pending)?;
    }
    let saved = vm.capture()?;
    let memory_crc = if options.verify_memory {
        Some(super::memory_crc(memory)?)
    } else {
        None
    };
    report.pages_sent = sender.pages_sent;
    report.bytes_sent = sender.bytes_sent;
    drop(log);
    write_json(stream, Tag::State, &Final { saved, memory_crc })?;
    stream.flush().map_err(protocol::ProtocolError::from)?;
    set_progress(vm, started, &|p| {
        p.phase = MigrationPhase::WaitingForDestination
    });
    let resumed: Resumed = match read_frame(stream, &mut payload)? {
        Tag::Resumed => protocol::decode(Tag::Resumed, &payload)?,
        Tag::Failed | Tag::Abort => {
            return Err(MigrationError::DestinationFailed(protocol::text(&payload)))
        }
        other => {
            return Err(protocol::ProtocolError::Unexpected {
                expected: "RESUMED",
                got: other,
            }
            .into())
        }
    };
    let answered_ns = monotonic_ns();
    report.downtime_measured_on_one_clock =
        resumed.boot_id == protocol::boot_id() && resumed.started_ns >= paused_ns;
    let downtime_ns = if report.downtime_measured_on_one_clock {
        resumed.started_ns - paused_ns
    } else {
        answered_ns - paused_ns
    };
    report.downtime_ms = downtime_ns as f64 / 1e6;
    report.memory_crc = memory_crc;
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

fn set_progress(vm: &dyn Source, started: Instant, change: &dyn Fn(&mut MigrationProgress)) {
    if let Some(progress) = lock(vm.progress()).as_mut() {
        change(progress);
        progress.elapsed_ms = started.elapsed().as_millis() as u64;
    }
}

/// Copies memory while the guest runs, round after round of what it
/// dirtied, until what is left can be sent within the downtime limit
/// (vCPUs throttled when rounds stop shrinking). Returns the pages
/// dirty at the end, for the stop-and-copy.
fn pre_copy(
    vm: &dyn Source,
    log: &dyn DirtyPages,
    sender: &mut PageSender,
    report: &mut MigrationReport,
    started: Instant,
    (downtime_limit, give_up): (Duration, Duration),
    parked: bool,
) -> Result<Vec<Vec<u64>>, MigrationError> {
    set_progress(vm, started, &|p| {
        p.phase = MigrationPhase::Copying;
        p.round = 1;
    });
    let mut round_started = Instant::now();
    let mut round_bytes_start = 0;
    sender.send_all()?;
    report.rounds = 1;
    let mut smallest_dirty = None;
    let mut rounds_without_progress = 0;
    loop {
        let maps = log.take()?;
        let dirty_pages = dirty::count(&maps);
        let elapsed = round_started.elapsed().as_secs_f64().max(1e-6);
        let link = (sender.bytes_sent - round_bytes_start) as f64 / elapsed;
        let link = if link > 0.0 { link } else { f64::MAX };
        let expected = Duration::from_secs_f64((dirty_pages as usize * PAGE) as f64 / link);
        tracing::debug!(
            round = report.rounds,
            dirty_pages,
            ?expected,
            "migration round"
        );
        set_progress(vm, started, &|p| p.dirty_pages = dirty_pages);
        if expected <= downtime_limit || parked {
            return Ok(maps);
        }
        if started.elapsed() > give_up {
            return Err(MigrationError::NoConvergence {
                seconds: give_up.as_secs(),
                rounds: report.rounds,
                throttle: report.max_throttle_percent,
                dirty_mib: (dirty_pages * PAGE as u64) >> 20,
                link_mib_s: link / f64::from(1 << 20),
            });
        }
        if made_progress(dirty_pages, smallest_dirty) {
            smallest_dirty = Some(dirty_pages);
            rounds_without_progress = 0;
        } else {
            rounds_without_progress += 1;
        }
        if rounds_without_progress >= ROUNDS_BEFORE_THROTTLE {
            let throttle = (sender.throttle + THROTTLE_STEP).min(MAX_THROTTLE);
            vm.set_throttle(throttle);
            report.max_throttle_percent = throttle;
            sender.throttle = throttle;
            rounds_without_progress = 0;
            tracing::info!(throttle, "migration not converging: throttling vCPUs");
        }
        round_started = Instant::now();
        round_bytes_start = sender.bytes_sent;
        sender.rounds = report.rounds;
        report.rounds += 1;
        let (round, throttle) = (report.rounds, report.max_throttle_percent);
        set_progress(vm, started, &|p| {
            p.round = round;
            p.throttle_percent = throttle;
        });
        sender.send_dirty(&maps)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_round_is_progress_and_later_ones_must_shrink_by_a_tenth() {
        assert!(made_progress(u64::MAX, None));
        assert!(made_progress(0, None));
        assert!(made_progress(89, Some(100)));
        assert!(!made_progress(90, Some(100)));
        assert!(!made_progress(100, Some(100)));
        assert!(!made_progress(0, Some(0)));
        // No overflow at the top of the range (a debug build panicked here).
        assert!(made_progress(u64::MAX / 2, Some(u64::MAX)));
        assert!(!made_progress(u64::MAX, Some(u64::MAX)));
    }

    #[test]
    fn the_kicker_flag_is_set_on_unwind_too() {
        let flag = AtomicBool::new(false);
        let unwound = std::panic::catch_unwind(|| {
            let _stop = StopOnDrop(&flag);
            panic!("a migration bug");
        });
        assert!(unwound.is_err());
        assert!(flag.load(Ordering::Acquire));
    }

    use super::super::destination::{receive_guest, Received};
    use super::super::protocol::ProtocolError;
    use super::super::testing::{self, contents, write_pages, FakeVm, Guest};
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;

    /// A destination that takes the guest (the real receiving side, over
    /// the in-memory stream) and says it resumed it, as `Arrived::start`
    /// does. Returns what arrived.
    fn resuming_destination(mut stream: UnixStream) -> JoinHandle<Received> {
        std::thread::spawn(move || {
            let received = receive_guest(&mut stream, None, None).unwrap();
            let resumed = Resumed {
                started_ns: monotonic_ns(),
                boot_id: protocol::boot_id(),
                memory_crc: received.memory_crc,
            };
            write_json(&mut stream, Tag::Resumed, &resumed).unwrap();
            received
        })
    }

    /// Runs the source side for `vm` to the end.
    fn migrate(
        vm: &FakeVm,
        connection: Connection,
        options: &MigrateOptions,
    ) -> Result<MigrationReport, MigrationError> {
        let mut parked = false;
        let result = send(vm, connection, options, Instant::now(), &mut parked);
        assert_eq!(parked, vm.parked.load(Ordering::SeqCst));
        result
    }

    fn options(downtime_ms: u64, give_up_after_s: u64) -> MigrateOptions {
        MigrateOptions {
            uri: "unix:/in-memory".into(),
            downtime_ms: Some(downtime_ms),
            give_up_after_s: Some(give_up_after_s),
            verify_memory: true,
            ..MigrateOptions::default()
        }
    }

    /// The guest writes pages the first round already sent, fewer each run
    /// (so every round is progress and nothing is throttled), then stops;
    /// until it is parked it writes a last few. Every byte arrives: the
    /// first round's, each round's re-sent pages, and the last ones.
    #[test]
    fn a_whole_migration_delivers_every_byte_including_pages_dirtied_in_later_rounds() {
        // Run 1 writes 16 pages, run 2 8, run 3 4, run 4 none (converged);
        // run 5, until the guest is parked, 3 more.
        let guest: Guest = Box::new(|memory, run, _| {
            let pages = match run {
                1 => 0..16,
                2 => 100..108,
                3 => 4..8,
                5 => 1000..1003,
                _ => 0..0,
            };
            write_pages(memory, pages, run);
        });
        let vm = FakeVm::new(8, 64, guest);
        let (connection, stream) = FakeVm::pair();
        let destination = resuming_destination(stream);
        // A zero downtime limit: only a round that dirtied nothing ends the copy.
        let report = migrate(&vm, connection, &options(0, 30)).unwrap();
        let arrived = destination.join().unwrap();

        assert_eq!(vm.runs(), 5);
        assert_eq!(contents(&arrived.memory), contents(&vm.memory));
        assert_eq!(arrived.last.saved.machine, vm.machine);
        assert_eq!(arrived.memory_crc, report.memory_crc);
        assert_eq!(report.rounds, 4, "{report:?}");
        assert_eq!(report.last_round_pages, 3, "{report:?}");
        assert_eq!(report.pages_sent, 64 + 16 + 8 + 4 + 3, "{report:?}");
        assert_eq!(report.max_throttle_percent, 0, "{report:?}");
        assert!(vm.throttles.lock().unwrap().is_empty());
        assert!(!report.memory_handed_over);
        // The pages were re-sent with what the guest wrote last.
        let mut page = vec![0u8; 4096];
        arrived
            .memory
            .read_slice(&mut page, GuestAddress(5 * 4096))
            .unwrap();
        assert_eq!(page, testing::pattern(5, 3));
    }

    /// A guest that dirties 10 pages a run at full speed, proportionally
    /// fewer when held back (none at 95 %): with a zero downtime limit the
    /// copy converges only by throttling, step by step up to 95 %.
    #[test]
    fn a_guest_dirtying_faster_than_the_copy_is_throttled_until_it_converges() {
        let guest: Guest = Box::new(|memory, run, throttle| {
            let pages = u64::from(10 * (100 - throttle) / 100);
            write_pages(memory, 200..200 + pages, run);
        });
        let vm = FakeVm::new(4, 16, guest);
        let (connection, stream) = FakeVm::pair();
        let destination = resuming_destination(stream);
        let report = migrate(&vm, connection, &options(0, 10)).unwrap();
        let arrived = destination.join().unwrap();
        assert_eq!(contents(&arrived.memory), contents(&vm.memory));
        assert_eq!(report.max_throttle_percent, MAX_THROTTLE, "{report:?}");
        assert_eq!(*vm.throttles.lock().unwrap(), [20, 40, 60, 80, 95]);
        assert_eq!(report.last_round_pages, 0, "{report:?}");
        // The status showed the throttle while it ran.
        let progress = vm.progress.lock().unwrap().clone().unwrap();
        assert_eq!(progress.throttle_percent, MAX_THROTTLE);
        assert_eq!(progress.phase, MigrationPhase::WaitingForDestination);
        assert_eq!(progress.round, report.rounds);
    }

    /// A guest that dirties as much however it is held back never lets the
    /// copy converge: the migration gives up after `give_up_after_s` with
    /// the documented error, the vCPUs throttled to the most allowed, and
    /// the VM never paused; the destination sees the stream end.
    #[test]
    fn a_guest_that_dirties_despite_the_throttle_makes_the_migration_give_up() {
        let guest: Guest = Box::new(|memory, run, _| {
            write_pages(memory, 200..210, run);
            std::thread::sleep(Duration::from_millis(2));
        });
        let vm = FakeVm::new(4, 16, guest);
        let (connection, mut stream) = FakeVm::pair();
        let destination = std::thread::spawn(move || receive_guest(&mut stream, None, None));
        let started = Instant::now();
        let error = migrate(&vm, connection, &options(0, 1)).unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(
                error,
                MigrationError::NoConvergence {
                    seconds: 1,
                    throttle: MAX_THROTTLE,
                    ..
                }
            ),
            "{error}"
        );
        assert!(
            error.to_string().starts_with(
                "the guest dirties memory faster than the link can copy it: gave up after 1 s"
            ),
            "{error}"
        );
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(10),
            "{took:?}"
        );
        assert!(!vm.parked.load(Ordering::SeqCst), "the VM was paused");
        assert!(matches!(
            destination.join().unwrap(),
            Err(MigrationError::Protocol(ProtocolError::Closed))
        ));
    }

    /// A destination of its own: reads HELLO, then does what `then` says.
    fn scripted_destination(
        mut stream: UnixStream,
        then: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> JoinHandle<Hello> {
        std::thread::spawn(move || {
            let mut payload = Vec::new();
            assert_eq!(read_frame(&mut stream, &mut payload).unwrap(), Tag::Hello);
            let hello: Hello = protocol::decode(Tag::Hello, &payload).unwrap();
            then(&mut stream);
            hello
        })
    }

    fn unharmed(vm: &FakeVm) {
        assert!(!vm.parked.load(Ordering::SeqCst), "the VM was paused");
        assert!(vm.throttles.lock().unwrap().is_empty());
    }

    #[test]
    fn a_destination_that_refuses_is_reported_with_its_reason() {
        let vm = FakeVm::new(4, 16, Box::new(|_, _, _| ()));
        let (connection, stream) = FakeVm::pair();
        let destination = scripted_destination(stream, |stream| {
            write_frame(stream, Tag::Refuse, &[b"no room\nhere"]).unwrap();
        });
        let error = migrate(&vm, connection, &options(300, 30)).unwrap_err();
        let hello = destination.join().unwrap();
        assert_eq!(
            (hello.format.as_str(), hello.version),
            (protocol::FORMAT, protocol::VERSION)
        );
        assert_eq!(hello.machine, vm.machine);
        assert!(!hello.memory_to_hand_over);
        assert!(
            matches!(&error, MigrationError::Refused(why) if why == "no room here"),
            "{error}"
        );
        unharmed(&vm);
    }

    #[test]
    fn garbage_instead_of_accept_fails_the_migration() {
        for (reply, expected) in [
            (&[0xffu8, 0, 0, 0, 0][..], "unknown frame tag 255"),
            (
                &[Tag::Resumed as u8, 0, 0, 0, 0][..],
                "expected ACCEPT, got a Resumed frame",
            ),
            (
                &[Tag::Accept as u8, 1, 0, 0, 0, b'['][..],
                "bad Accept frame",
            ),
            (
                &[Tag::Accept as u8, 0xff, 0xff, 0xff, 0xff][..],
                "larger than any valid one",
            ),
        ] {
            let vm = FakeVm::new(4, 16, Box::new(|_, _, _| ()));
            let (connection, stream) = FakeVm::pair();
            let destination = scripted_destination(stream, move |stream| {
                std::io::Write::write_all(stream, reply).unwrap();
            });
            let error = migrate(&vm, connection, &options(300, 30)).unwrap_err();
            destination.join().unwrap();
            assert!(error.to_string().contains(expected), "{expected}: {error}");
            unharmed(&vm);
        }
    }

    /// The destination goes away while the first round is being copied.
    #[test]
    fn a_destination_that_closes_mid_copy_fails_the_migration_before_the_pause() {
        let vm = FakeVm::new(16, 4096, Box::new(|_, _, _| ()));
        let (connection, stream) = FakeVm::pair();
        let destination = scripted_destination(stream, |stream| {
            write_json(stream, Tag::Accept, &protocol::Accept::default()).unwrap();
            let mut payload = Vec::new();
            assert_eq!(read_frame(stream, &mut payload).unwrap(), Tag::Pages);
            stream.shutdown(std::net::Shutdown::Both).unwrap();
        });
        let error = migrate(&vm, connection, &options(300, 30)).unwrap_err();
        destination.join().unwrap();
        assert!(
            matches!(
                &error,
                MigrationError::Protocol(ProtocolError::Io(e))
                    if e.kind() == std::io::ErrorKind::BrokenPipe
            ),
            "{error}"
        );
        unharmed(&vm);
    }

    /// The destination takes everything, then cannot resume the guest.
    #[test]
    fn a_destination_that_fails_at_switch_over_is_reported_with_its_reason() {
        let vm = FakeVm::new(4, 16, Box::new(|_, _, _| ()));
        let (connection, mut stream) = FakeVm::pair();
        let destination = std::thread::spawn(move || {
            receive_guest(&mut stream, None, None).unwrap();
            write_frame(&mut stream, Tag::Failed, &[b"cannot build the VM"]).unwrap();
        });
        let error = migrate(&vm, connection, &options(300, 30)).unwrap_err();
        destination.join().unwrap();
        assert!(
            matches!(&error, MigrationError::DestinationFailed(why) if why == "cannot build the VM"),
            "{error}"
        );
        // Paused for the switch-over: `VmCore::migrate` resumes it.
        assert!(vm.parked.load(Ordering::SeqCst));
    }

    /// The destination closes after the state, without an answer.
    #[test]
    fn a_destination_that_closes_at_switch_over_fails_the_migration() {
        let vm = FakeVm::new(4, 16, Box::new(|_, _, _| ()));
        let (connection, mut stream) = FakeVm::pair();
        let destination = std::thread::spawn(move || {
            receive_guest(&mut stream, None, None).unwrap();
        });
        let error = migrate(&vm, connection, &options(300, 30)).unwrap_err();
        destination.join().unwrap();
        assert!(
            matches!(&error, MigrationError::Protocol(ProtocolError::Closed)),
            "{error}"
        );
    }

    /// Capped at 1 MiB/s, 2 MiB of pages take at least about 2 s to go.
    #[test]
    fn the_bandwidth_cap_paces_the_copy() {
        let vm = FakeVm::new(4, 512, Box::new(|_, _, _| ()));
        let (connection, stream) = FakeVm::pair();
        let destination = resuming_destination(stream);
        let started = Instant::now();
        let report = migrate(
            &vm,
            connection,
            &MigrateOptions {
                bandwidth_mib: Some(1),
                ..options(300, 30)
            },
        )
        .unwrap();
        let took = started.elapsed();
        let arrived = destination.join().unwrap();
        assert_eq!(contents(&arrived.memory), contents(&vm.memory));
        assert_eq!(report.pages_sent, 512);
        assert!(took >= Duration::from_millis(1900), "{took:?}");
    }
}
