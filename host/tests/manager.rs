//! The manager's decisions, without KVM: each VM runs in the stand-in VMM
//! (`support/fake_vmm.rs`), which speaks the real protocols (launch plan and
//! descriptors, control socket, exit report, signals) and behaves as its
//! spec's command line says. Processes, signals, the host's cgroups, the
//! store and the exit reports are all real: the tests run as root, as the
//! daemon does.

mod support;

use host::cgroup::Cgroups;
use host::events::Event;
use host::manager::{Manager, ManagerError};
use host::model::{VmRecord, VmState};
use host::store::Store;
use host::vmm_process::{self, Origin, VmPaths};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{host_cgroups, open, spec, FAKE_VMM};
use testkit::TempDir;
const PROJECT: &str = "p";

/// A daemon's manager over a state directory of its own, whose VMMs are
/// fakes.
struct Host {
    dir: TempDir,
    manager: Arc<Manager>,
    events: tokio::sync::broadcast::Receiver<Event>,
}

impl Host {
    fn new() -> Host {
        let dir = TempDir::new("manager");
        let (manager, bus) = open(&dir);
        let events = bus.subscribe();
        Host {
            dir,
            manager,
            events,
        }
    }

    /// VM `id`'s cgroup directories (the CPU's first).
    fn cgroups(&self, id: &str) -> Vec<PathBuf> {
        match host_cgroups() {
            Cgroups::V2 { root } => vec![root.join(id)],
            Cgroups::V1 { cpu, memory } => vec![cpu.join(id), memory.join(id)],
            Cgroups::Unavailable => unreachable!(),
        }
    }

    fn has_no_cgroup(&self, id: &str) -> bool {
        self.cgroups(id).iter().all(|dir| !dir.exists())
    }

    /// Defines a VM whose fake VMM behaves as `behaviour` says.
    fn define(&self, name: &str, behaviour: &str) -> VmRecord {
        self.manager.create(PROJECT, spec(name, behaviour)).unwrap()
    }

    fn started(&self, name: &str, behaviour: &str) -> VmRecord {
        let record = self.define(name, behaviour);
        let started = self.manager.start(&record.id, Origin::Boot).unwrap();
        assert_eq!(started.state, VmState::Running, "{started:?}");
        started
    }

    /// Waits (up to 20 s) until VM `id`'s record satisfies `done`.
    fn wait_for(&self, id: &str, done: impl Fn(&VmRecord) -> bool) -> VmRecord {
        wait_for(&self.manager, id, done)
    }

    /// The states VM `id` went through, as its events said, so far.
    fn states_of(&mut self, id: &str) -> Vec<String> {
        let mut states = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            if event.vm == id {
                states.push(event.state);
            }
        }
        states
    }
}

/// Polls `probe` every 20 ms until it gives a value; fails naming `what`
/// after `limit`.
fn poll<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 20 s) until VM `id`'s record satisfies `done`.
fn wait_for(manager: &Manager, id: &str, done: impl Fn(&VmRecord) -> bool) -> VmRecord {
    poll(&format!("VM {id}"), Duration::from_secs(20), || {
        Some(manager.get(id).unwrap()).filter(|record| done(record))
    })
}

fn alive(pid: u32) -> bool {
    // Not a zombie either: a reaped or never-waited child is no VMM.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim()
            .starts_with('Z')
    })
}

fn conflict(result: Result<impl std::fmt::Debug, ManagerError>) -> String {
    match result {
        Err(ManagerError::Conflict(message)) => message,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn failed(result: Result<impl std::fmt::Debug, ManagerError>) -> String {
    match result {
        Err(ManagerError::Failed(message)) => message,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn a_started_vm_runs_in_its_own_marked_process_with_its_limits() {
    let mut host = Host::new();
    let record = host.started("web", "");
    let pid = record.pid.expect("a pid");
    assert!(vmm_process::is_vm_process(pid, &record.id));
    assert_eq!(vmm_process::find_process(&record.id), Some(pid));
    // Two vCPUs and half a CPU for the VMM's threads; guest + 256 MiB.
    let dirs = host.cgroups(&record.id);
    let read = |dir: &PathBuf, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .to_string()
    };
    let memory = ((64u64 + 256) << 20).to_string();
    match host_cgroups() {
        Cgroups::V2 { .. } => {
            assert_eq!(read(&dirs[0], "cpu.max"), "250000 100000");
            assert_eq!(read(&dirs[0], "memory.max"), memory);
        }
        _ => {
            assert_eq!(read(&dirs[0], "cpu.cfs_quota_us"), "250000");
            assert_eq!(read(&dirs[0], "cpu.cfs_period_us"), "100000");
            assert_eq!(read(&dirs[1], "memory.limit_in_bytes"), memory);
        }
    }
    for dir in &dirs {
        assert_eq!(read(dir, "cgroup.procs"), pid.to_string());
    }
    let live = host.manager.live_status(&record.id).expect("a live status");
    assert_eq!((live.pid, live.cpus, live.memory_mib), (pid, 2, 64));
    assert_eq!(
        host.states_of(&record.id),
        ["stopped", "starting", "running"]
    );
    // The jail is the VM's uid's, and only its.
    use std::os::unix::fs::MetadataExt;
    let jail = std::fs::metadata(host.manager.paths(&record.id).jail).unwrap();
    assert_eq!((jail.uid(), jail.mode() & 0o777), (record.uid, 0o700));
    host.manager.stop(&record.id, true, Duration::ZERO).unwrap();
    assert!(
        host.has_no_cgroup(&record.id),
        "the cgroup goes with the process"
    );
}

#[test]
fn only_a_stopped_or_crashed_vm_starts_and_pause_and_resume_reach_the_vmm() {
    let host = Host::new();
    let record = host.started("web", "");
    let id = &record.id;
    assert!(conflict(host.manager.start(id, Origin::Boot)).contains("is running"));
    assert!(conflict(host.manager.resume(id)).contains("not paused"));
    assert_eq!(host.manager.pause(id).unwrap().state, VmState::Paused);
    let live = host.manager.live_status(id).unwrap();
    assert_eq!(live.state, vmm::control::LiveState::Paused);
    assert!(conflict(host.manager.pause(id)).contains("not running"));
    assert_eq!(host.manager.resume(id).unwrap().state, VmState::Running);
    let live = host.manager.live_status(id).unwrap();
    assert_eq!(live.state, vmm::control::LiveState::Running);
    assert!(matches!(
        host.manager.start("nope", Origin::Boot),
        Err(ManagerError::NotFound(_))
    ));
    host.manager.stop(id, true, Duration::ZERO).unwrap();
    assert!(conflict(host.manager.pause(id)).contains("stopped"));
    assert!(conflict(host.manager.stop(id, false, Duration::ZERO)).contains("stopped"));
    assert!(host.manager.live_status(id).is_none());
}

#[test]
fn stop_asks_the_guest_first_and_it_powers_off() {
    let mut host = Host::new();
    let record = host.started("web", "");
    let asked = Instant::now();
    let stopped = host
        .manager
        .stop(&record.id, false, Duration::from_secs(20))
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(stopped.state, VmState::Stopped);
    assert_eq!(stopped.pid, None);
    assert_eq!(stopped.last_exit.as_deref(), Some("guest powered off"));
    assert!(!alive(record.pid.unwrap()));
    let states = host.states_of(&record.id);
    assert_eq!(states[states.len() - 2..], ["stopping", "stopped"]);
}

#[test]
fn a_guest_that_ignores_shutdown_is_stopped_by_its_vmm_after_the_timeout() {
    let host = Host::new();
    let record = host.started("web", "fake.ignore-shutdown");
    let asked = Instant::now();
    let stopped = host
        .manager
        .stop(&record.id, false, Duration::from_millis(700))
        .unwrap();
    let took = asked.elapsed();
    assert!(took >= Duration::from_millis(700), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // SIGTERM: the VMM stopped the VM itself and said so.
    assert_eq!(stopped.last_exit.as_deref(), Some("stopped by the host"));
    assert_eq!(stopped.state, VmState::Stopped);
}

#[test]
fn a_vmm_without_the_shutdown_request_is_sent_ctrl_alt_del() {
    let host = Host::new();
    let record = host.started("web", "fake.old-vmm");
    let stopped = host
        .manager
        .stop(&record.id, false, Duration::from_secs(20))
        .unwrap();
    assert_eq!(stopped.last_exit.as_deref(), Some("guest reset"));
}

#[test]
fn one_operation_at_a_time_per_vm() {
    let host = Host::new();
    let record = host.started("web", "fake.ignore-shutdown");
    let manager = host.manager.clone();
    let id = record.id.clone();
    let stopping =
        std::thread::spawn(move || manager.stop(&id, false, Duration::from_millis(1500)));
    std::thread::sleep(Duration::from_millis(300));
    // Waits for the stop to end, then finds the VM stopped (not stopping).
    let message = conflict(host.manager.pause(&record.id));
    assert!(message.contains("is stopped"), "{message}");
    assert_eq!(stopping.join().unwrap().unwrap().state, VmState::Stopped);
}

#[test]
fn stopping_a_vm_whose_vmm_is_already_gone_records_it_stopped() {
    let host = Host::new();
    let record = host.define("web", "");
    // As if its VMM ended unseen: a pid that is no VMM of this VM's.
    host.manager
        .store()
        .update_vm(&record.id, |r| {
            r.state = VmState::Running;
            r.pid = Some(1);
        })
        .unwrap();
    let stopped = host
        .manager
        .stop(&record.id, false, Duration::from_secs(1))
        .unwrap();
    assert_eq!((stopped.state, stopped.pid), (VmState::Stopped, None));
}

#[test]
fn a_vmm_that_never_answers_is_killed_and_the_start_fails() {
    let host = Host::new();
    let record = host.define("web", "fake.no-control");
    let message = failed(host.manager.start(&record.id, Origin::Boot));
    assert!(message.contains("did not answer within 30s"), "{message}");
    assert_eq!(vmm_process::find_process(&record.id), None);
    assert_eq!(
        host.manager.get(&record.id).unwrap().state,
        VmState::Stopped
    );
}

#[test]
fn a_vmm_that_exits_with_a_failure_at_start_is_a_failed_start() {
    let host = Host::new();
    // Its report says the guest powered off, but it exited 1.
    let record = host.define("web", "fake.exit-at-start=1");
    let message = failed(host.manager.start(&record.id, Origin::Boot));
    assert!(message.contains("exit status: 1"), "{message}");
    assert!(message.contains("guest powered off"), "{message}");
}

#[test]
fn a_vmm_that_ignores_sigterm_is_killed() {
    let host = Host::new();
    let record = host.started("web", "fake.ignore-shutdown fake.ignore-sigterm");
    let asked = Instant::now();
    let stopped = host
        .manager
        .stop(&record.id, false, Duration::from_millis(300))
        .unwrap();
    // The guest's timeout, then the VMM's 5 s, then SIGKILL.
    let took = asked.elapsed();
    assert!(took >= Duration::from_millis(5300), "{took:?}");
    assert_eq!(
        stopped.last_exit.as_deref(),
        Some("stopped by the host (VMM killed)")
    );
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(!alive(record.pid.unwrap()));
}

#[test]
fn force_kills_at_once() {
    let host = Host::new();
    let record = host.started("web", "fake.ignore-shutdown fake.ignore-sigterm");
    let asked = Instant::now();
    let stopped = host
        .manager
        .stop(&record.id, true, Duration::from_secs(60))
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert_eq!(
        stopped.last_exit.as_deref(),
        Some("stopped by the host (VMM killed)")
    );
}

#[test]
fn a_vmm_that_fails_to_start_leaves_the_vm_stopped_with_its_reason() {
    let mut host = Host::new();
    let record = host.define("web", "fake.fail-at-start");
    let message = failed(host.manager.start(&record.id, Origin::Boot));
    assert!(
        message.contains("the VMM ended while starting"),
        "{message}"
    );
    assert!(message.contains("told to fail at start"), "{message}");
    let record = host.manager.get(&record.id).unwrap();
    assert_eq!(record.state, VmState::Stopped);
    assert_eq!(record.pid, None);
    assert_eq!(record.last_exit.as_deref(), Some(message.as_str()));
    assert!(host.has_no_cgroup(&record.id));
    assert_eq!(
        host.states_of(&record.id),
        ["stopped", "starting", "stopped"]
    );
    // It can be started again, and a second failure says the same.
    assert_eq!(
        failed(host.manager.start(&record.id, Origin::Boot)),
        message
    );
}

#[test]
fn a_guest_that_ends_before_anyone_looks_is_a_clean_stop() {
    let host = Host::new();
    let record = host.define("web", "fake.exit-at-start");
    let started = host.manager.start(&record.id, Origin::Boot).unwrap();
    assert_eq!(started.state, VmState::Stopped);
    assert_eq!(started.last_exit.as_deref(), Some("guest powered off"));
    assert!(host.has_no_cgroup(&record.id));
}

#[test]
fn a_vmm_killed_from_outside_is_a_crash_and_a_guest_panic_too() {
    let host = Host::new();
    let record = host.started("killed", "");
    vmm_process::signal(record.pid.unwrap(), libc::SIGKILL);
    let crashed = host.wait_for(&record.id, |r| r.state == VmState::Crashed);
    let how = crashed.last_exit.unwrap();
    assert!(how.contains("signal: 9"), "{how}");
    assert_eq!(crashed.pid, None);
    assert!(host.has_no_cgroup(&record.id));
    // A crashed VM starts again.
    let again = host.manager.start(&record.id, Origin::Boot).unwrap();
    assert_eq!(again.state, VmState::Running);

    let record = host.started("panics", "fake.panic-after-ms=100");
    let crashed = host.wait_for(&record.id, |r| r.state == VmState::Crashed);
    assert_eq!(
        crashed.last_exit.as_deref(),
        Some("guest kernel panicked (reported through pvpanic)")
    );
    host.manager.stop(&again.id, true, Duration::ZERO).unwrap();
}

#[test]
fn a_guest_that_powers_off_by_itself_is_a_clean_stop() {
    let host = Host::new();
    let record = host.started("web", "");
    // Ctrl-Alt-Del straight to the VMM: the "guest" resets, the VM ends.
    let control = host.manager.paths(&record.id).control;
    vmm::control::call(&control, &vmm::control::Request::CtrlAltDel).unwrap();
    let stopped = host.wait_for(&record.id, |r| r.state == VmState::Stopped);
    assert_eq!(stopped.last_exit.as_deref(), Some("guest reset"));
}

#[test]
fn delete_needs_force_for_a_vm_with_a_process_and_leaves_nothing() {
    let mut host = Host::new();
    let record = host.started("web", "fake.ignore-sigterm");
    let id = &record.id;
    assert!(conflict(host.manager.delete(id, false)).contains("stop it first"));
    assert!(alive(record.pid.unwrap()));
    host.manager.delete(id, true).unwrap();
    assert!(!alive(record.pid.unwrap()));
    assert!(!host.manager.paths(id).dir.exists());
    assert!(host.has_no_cgroup(id));
    assert!(matches!(
        host.manager.get(id),
        Err(ManagerError::NotFound(_))
    ));
    // The killed process is not recorded as a crash on its way out.
    let states = host.states_of(id);
    let deleting = states.iter().position(|s| s == "deleting").unwrap();
    assert!(
        states[deleting..]
            .iter()
            .all(|s| s == "deleting" || s == "deleted"),
        "{states:?}"
    );
    assert_eq!(states.last().unwrap(), "deleted");
    // A stopped VM is deleted without force; its name is free again.
    let stopped = host.define("other", "");
    host.manager.delete(&stopped.id, false).unwrap();
    host.define("other", "");
}

#[test]
fn names_are_unique_within_a_project_and_disks_belong_to_one_project() {
    let host = Host::new();
    host.define("web", "");
    let taken = conflict(host.manager.create(PROJECT, spec("web", "")));
    assert!(taken.contains("web"), "{taken}");
    // Another project may use the name, not the disk.
    let disk = host.dir.join("images/disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let mut with_disk = spec("db", "");
    with_disk.disks = vec![serde_json::from_value(serde_json::json!({"path": disk})).unwrap()];
    host.manager.create(PROJECT, with_disk.clone()).unwrap();
    // The same project may name it again (read-only sharing, say).
    with_disk.name = "db-2".into();
    host.manager.create(PROJECT, with_disk.clone()).unwrap();
    host.manager.create("q", spec("web", "")).unwrap();
    match host.manager.create("q", with_disk) {
        Err(ManagerError::Invalid(error)) => {
            assert_eq!(error.field, "disks[0].path");
            assert!(error.message.contains("another project"), "{error:?}");
        }
        other => panic!("another project's disk was taken: {other:?}"),
    }
}

#[test]
fn a_vm_is_started_from_its_snapshot_and_only_from_an_existing_one() {
    let host = Host::new();
    let record = host.started("web", "");
    let id = &record.id;
    let snapshot = host.manager.snapshot(id, "first").unwrap();
    assert_eq!(snapshot["path"], "/snapshots/first");
    let manifest = host.manager.paths(id).snapshots.join("first/manifest.json");
    assert!(manifest.exists());
    assert!(conflict(host.manager.snapshot(id, "first")).contains("exists"));
    host.manager
        .stop(id, false, Duration::from_secs(10))
        .unwrap();
    assert!(conflict(host.manager.snapshot(id, "second")).contains("stopped"));
    match host.manager.start(id, Origin::Restore("none".into())) {
        Err(ManagerError::Invalid(error)) => {
            assert_eq!(error.field, "restore");
            assert!(error.message.contains("no snapshot none"), "{error:?}");
        }
        other => panic!("restored from nothing: {other:?}"),
    }
    assert_eq!(host.manager.get(id).unwrap().state, VmState::Stopped);
    // The fake ends at once unless its snapshot is there.
    let restored = host.manager.start(id, Origin::Restore("first".into()));
    assert_eq!(restored.unwrap().state, VmState::Running);
    host.manager.stop(id, true, Duration::ZERO).unwrap();
}

#[test]
fn a_failed_migration_says_only_that_it_failed_and_the_vm_runs_on() {
    let host = Host::new();
    let record = host.started("web", "");
    let options = serde_json::from_value(serde_json::json!({"uri": "tcp:127.0.0.1:9"})).unwrap();
    let message = failed(host.manager.migrate(&record.id, options));
    assert!(!message.contains("SECRET"), "{message}");
    assert!(message.contains("keeps running here"), "{message}");
    assert_eq!(
        host.manager.get(&record.id).unwrap().state,
        VmState::Running
    );
    assert!(alive(record.pid.unwrap()));
    host.manager.stop(&record.id, true, Duration::ZERO).unwrap();
}

#[test]
fn a_migrated_vm_is_stopped_here_and_a_stopped_one_does_not_migrate() {
    let host = Host::new();
    let record = host.started("web", "fake.migrate-ok");
    let options = || serde_json::from_value(serde_json::json!({"uri": "tcp:127.0.0.1:9"})).unwrap();
    let report = host.manager.migrate(&record.id, options()).unwrap();
    assert_eq!(report["rounds"], 1);
    let record = host.manager.get(&record.id).unwrap();
    assert_eq!(record.state, VmState::Stopped);
    assert_eq!(
        record.last_exit.as_deref(),
        Some("migrated: the guest runs on at the destination")
    );
    assert!(conflict(host.manager.migrate(&record.id, options())).contains("stopped"));
}

fn incoming(port: u16) -> Origin {
    Origin::Incoming {
        uri: format!("tcp:127.0.0.1:{port}"),
        from: vmm::launch::ExpectedSource {
            source: "127.0.0.1".parse().unwrap(),
            timeout_secs: 30,
            tls: None,
        },
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_incoming_migration_waits_starting_until_its_stream_arrived() {
    let host = Host::new();
    let record = host.define("web", "");
    let port = free_port();
    let waiting = host.manager.start(&record.id, incoming(port)).unwrap();
    assert_eq!(waiting.state, VmState::Starting);
    // The daemon bound the listener before the VMM existed.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        host.manager.get(&record.id).unwrap().state,
        VmState::Starting
    );
    drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    let running = host.wait_for(&record.id, |r| r.state == VmState::Running);
    host.manager
        .stop(&running.id, true, Duration::ZERO)
        .unwrap();

    // A destination that ends before its guest arrived: a start that
    // failed, not a crash.
    let waiting = host
        .manager
        .start(&record.id, incoming(free_port()))
        .unwrap();
    vmm_process::signal(waiting.pid.unwrap(), libc::SIGKILL);
    let ended = host.wait_for(&record.id, |r| r.pid.is_none());
    assert_eq!(ended.state, VmState::Stopped, "{ended:?}");

    // A VMM that cannot take its plan ends at once, and says so.
    // (Whether it ends within the 50 ms the daemon looks depends on the
    // machine's load: either way the VM is stopped with the VMM's reason.)
    let broken = host.define("broken", "fake.fail-at-start");
    match host.manager.start(&broken.id, incoming(free_port())) {
        Err(ManagerError::Failed(message)) => {
            assert!(message.contains("ended before listening"), "{message}")
        }
        Ok(record) => assert_eq!(record.state, VmState::Starting),
        Err(other) => panic!("{other:?}"),
    }
    let stopped = host.wait_for(&broken.id, |r| r.state == VmState::Stopped);
    let why = stopped.last_exit.unwrap();
    assert!(why.contains("told to fail at start"), "{why}");
}

/// A VMM started the way the daemon starts one, as if by a daemon that was
/// then killed: its record says `state` (and its pid).
fn orphan(dir: &TempDir, name: &str, behaviour: &str, state: VmState) -> VmRecord {
    let store = Store::open(&dir.join("state.redb")).unwrap();
    let id = host::model::random_hex(8);
    let paths = VmPaths::new(dir.path(), &id);
    let uid = store.allocate_uid().unwrap();
    std::fs::create_dir_all(&paths.dir).unwrap();
    vmm_process::prepare_directories(&paths, uid).unwrap();
    let spec = spec(name, behaviour);
    let launch = vmm_process::prepare(
        &spec,
        uid,
        &Origin::Boot,
        &paths,
        &[],
        std::path::Path::new("/dev/null"),
    )
    .unwrap();
    let child =
        vmm_process::launch(std::path::Path::new(FAKE_VMM), &id, &paths, launch, None).unwrap();
    let record = VmRecord {
        id,
        project: PROJECT.into(),
        spec,
        state,
        uid,
        created_at: 0,
        pid: Some(child.id()),
        last_exit: None,
    };
    store.create_vm(&record).unwrap();
    // Reaped by a thread, as the killed daemon's watcher would have.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    if !behaviour.contains("no-control") && !behaviour.contains("control-after") {
        poll("the orphan's answer", Duration::from_secs(10), || {
            vmm::control::status(&paths.control).ok()
        });
    }
    record
}

#[test]
fn a_restarted_daemon_adopts_the_vmms_that_answer_with_their_state() {
    let dir = TempDir::new("manager-restart");
    let running = orphan(&dir, "running", "", VmState::Running);
    let paused = orphan(&dir, "paused", "", VmState::Running);
    // Still starting up: given time to answer.
    let slow = orphan(&dir, "slow", "fake.control-after-ms=1500", VmState::Running);
    let paths = VmPaths::new(dir.path(), &paused.id);
    vmm::control::call(&paths.control, &vmm::control::Request::Pause).unwrap();
    let (manager, _events) = open(&dir);
    let adopted = manager.get(&running.id).unwrap();
    assert_eq!(
        (adopted.state, adopted.pid),
        (VmState::Running, running.pid)
    );
    // The VMM's word on its state, not the record's.
    assert_eq!(manager.get(&paused.id).unwrap().state, VmState::Paused);
    let slow = manager.get(&slow.id).unwrap();
    assert_eq!((slow.state, slow.pid.is_some()), (VmState::Running, true));
    manager.stop(&slow.id, true, Duration::ZERO).unwrap();
    // Adopted processes are watched like the daemon's own.
    vmm_process::signal(running.pid.unwrap(), libc::SIGKILL);
    wait_for(&manager, &running.id, |r| r.state == VmState::Crashed);
    let stopped = manager
        .stop(&paused.id, false, Duration::from_secs(10))
        .unwrap();
    assert_eq!(stopped.last_exit.as_deref(), Some("guest powered off"));
}

#[test]
fn a_restarted_daemon_finishes_a_stop_it_was_killed_in() {
    let dir = TempDir::new("manager-restart");
    let stopping = orphan(&dir, "stopping", "fake.ignore-shutdown", VmState::Stopping);
    let (manager, _events) = open(&dir);
    // Stopping all along, until stopped.
    let stopped = wait_for(&manager, &stopping.id, |record| {
        assert!(
            matches!(record.state, VmState::Stopped | VmState::Stopping),
            "{record:?}"
        );
        record.state == VmState::Stopped
    });
    assert_eq!(stopped.last_exit.as_deref(), Some("stopped by the host"));
}

#[test]
fn a_restarted_daemon_kills_a_vmm_that_does_not_answer() {
    let dir = TempDir::new("manager-restart");
    let mute = orphan(&dir, "mute", "fake.no-control", VmState::Running);
    let (manager, _events) = open(&dir);
    let record = manager.get(&mute.id).unwrap();
    assert_eq!(record.state, VmState::Crashed);
    assert_eq!(
        record.last_exit.as_deref(),
        Some("VMM did not answer after a daemon restart")
    );
    assert!(!alive(mute.pid.unwrap()));
}

#[test]
fn a_restarted_daemon_records_how_vmms_ended_while_it_was_down() {
    let dir = TempDir::new("manager-restart");
    let powered_off = orphan(&dir, "off", "", VmState::Running);
    let killed = orphan(&dir, "killed", "", VmState::Running);
    let starting = orphan(&dir, "starting", "", VmState::Starting);
    let control = |record: &VmRecord| VmPaths::new(dir.path(), &record.id).control;
    vmm::control::call(&control(&powered_off), &vmm::control::Request::Shutdown).unwrap();
    for record in [&killed, &starting] {
        vmm_process::signal(record.pid.unwrap(), libc::SIGKILL);
    }
    for record in [&powered_off, &killed, &starting] {
        poll("the VMM's end", Duration::from_secs(10), || {
            (!alive(record.pid.unwrap())).then_some(())
        });
    }
    let (manager, _events) = open(&dir);
    let off = manager.get(&powered_off.id).unwrap();
    assert_eq!(off.state, VmState::Stopped);
    assert_eq!(off.last_exit.as_deref(), Some("guest powered off"));
    let crashed = manager.get(&killed.id).unwrap();
    assert_eq!(crashed.state, VmState::Crashed);
    assert!(crashed.last_exit.unwrap().contains("without a report"));
    // Ended before its guest ran: a start that failed, not a crash.
    assert_eq!(manager.get(&starting.id).unwrap().state, VmState::Stopped);
    assert!([&off.pid, &manager.get(&killed.id).unwrap().pid]
        .iter()
        .all(|pid| pid.is_none()));
}

#[test]
fn a_restarted_daemon_finishes_a_delete_it_was_killed_in() {
    let dir = TempDir::new("manager-restart");
    let deleting = orphan(&dir, "going", "fake.ignore-sigterm", VmState::Deleting);
    let kept = orphan(&dir, "kept", "", VmState::Running);
    let (manager, _events) = open(&dir);
    assert!(matches!(
        manager.get(&deleting.id),
        Err(ManagerError::NotFound(_))
    ));
    assert!(!alive(deleting.pid.unwrap()));
    assert!(!VmPaths::new(dir.path(), &deleting.id).dir.exists());
    assert_eq!(manager.get(&kept.id).unwrap().state, VmState::Running);
    manager.delete(&kept.id, true).unwrap();
}
