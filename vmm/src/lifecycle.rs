//! What the host does to a running VM: pause, resume, take its state, snapshot.
//! Live migration builds on these (`migration/`).

use crate::arch::x86_64::state::VmState;
use crate::devices::lock;
use crate::exit::ExitSignal;
use crate::pause::PauseGate;
use crate::snapshot::{SavedVm, SnapshotError, SnapshotInfo};
use crate::vm_core::{kick_signal, LiveState, RunState, VmCore};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long vCPUs and the device thread get to reach a pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often vCPUs still in KVM_RUN are signalled while a pause waits.
const KICK_PERIOD: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("the VM is stopping")]
    Stopping,
    #[error("the VM did not reach a pause within {0:?} (a vCPU or the device thread is stuck)")]
    PauseTimeout(Duration),
    #[error("the VM is not paused")]
    NotPaused,
    #[error("cannot read the VM's state: {0}")]
    Capture(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// The threads a pause waits for: every vCPU, and the device thread if
/// there is one.
fn parties(cpus: u8, device_thread: bool) -> usize {
    usize::from(cpus) + usize::from(device_thread)
}

/// Asks `parties` threads to park at `gate` and waits until they have: the
/// device thread is woken once (`wake_device`), vCPUs still in KVM_RUN are
/// kicked every [`KICK_PERIOD`] (`kick_vcpus`). Refused if the VM is
/// stopping; if it starts stopping meanwhile, or `timeout` passes, the
/// threads are let go again.
fn park_all(
    gate: &PauseGate,
    exit: &ExitSignal,
    parties: usize,
    timeout: Duration,
    wake_device: impl FnOnce(),
    mut kick_vcpus: impl FnMut(),
) -> Result<(), LifecycleError> {
    if exit.is_requested() {
        return Err(LifecycleError::Stopping);
    }
    gate.request();
    wake_device();
    let deadline = Instant::now() + timeout;
    loop {
        kick_vcpus();
        if gate.wait_parked(parties, KICK_PERIOD) {
            return Ok(());
        }
        if exit.is_requested() || Instant::now() >= deadline {
            gate.release();
            return Err(if exit.is_requested() {
                LifecycleError::Stopping
            } else {
                LifecycleError::PauseTimeout(timeout)
            });
        }
    }
}

/// Pauses a running VM with `park`; a paused one stays as it is.
fn pause_with(
    run_state: &Mutex<RunState>,
    park: impl FnOnce() -> Result<(), LifecycleError>,
) -> Result<(), LifecycleError> {
    let mut state = lock(run_state);
    if *state == RunState::Running {
        park()?;
        *state = RunState::Paused;
    }
    Ok(())
}

/// Resumes a paused VM with `release`; a running one stays as it is, a
/// stopping one is refused.
fn resume_with(
    run_state: &Mutex<RunState>,
    exit: &ExitSignal,
    release: impl FnOnce(),
) -> Result<(), LifecycleError> {
    let mut state = lock(run_state);
    if exit.is_requested() {
        return Err(LifecycleError::Stopping);
    }
    if *state == RunState::Paused {
        release();
        *state = RunState::Running;
    }
    Ok(())
}

/// What the status says the VM is doing.
fn live_state_of(run_state: &Mutex<RunState>, exit: &ExitSignal) -> LiveState {
    if exit.is_requested() {
        return LiveState::Stopping;
    }
    // An operation (a migration, a snapshot) holds the state while it runs.
    match run_state.try_lock().as_deref() {
        Ok(RunState::Running) => LiveState::Running,
        Ok(RunState::Paused) => LiveState::Paused,
        Err(_) => LiveState::Busy,
    }
}

/// Runs `work` with the VM's threads parked: a VM in `state` Running is
/// parked for it and released afterwards, whatever `work` returned; a
/// paused one stays paused.
fn while_parked<T>(
    state: RunState,
    park: impl FnOnce() -> Result<(), LifecycleError>,
    release: impl FnOnce(),
    work: impl FnOnce() -> Result<T, LifecycleError>,
) -> Result<T, LifecycleError> {
    let was_running = state == RunState::Running;
    if was_running {
        park()?;
    }
    let result = work();
    if was_running {
        release();
    }
    result
}

impl VmCore {
    /// Stops every vCPU and the device thread; they stay parked until
    /// [`VmCore::release_threads`]. The caller holds `run_state`.
    pub(crate) fn park_threads(&self) -> Result<(), LifecycleError> {
        let shared = &self.shared;
        park_all(
            &shared.pause,
            &shared.exit,
            parties(self.machine.cpus, self.device_kick.is_some()),
            PAUSE_TIMEOUT,
            || {
                if let Some(kick) = &self.device_kick {
                    let _ = kick.write(1);
                }
            },
            || shared.threads.kick(kick_signal()),
        )
    }

    pub(crate) fn release_threads(&self) {
        self.shared.pause.release();
    }

    pub fn pause(&self) -> Result<(), LifecycleError> {
        pause_with(&self.run_state, || self.park_threads())
    }

    pub fn resume(&self) -> Result<(), LifecycleError> {
        resume_with(&self.run_state, &self.shared.exit, || {
            self.release_threads()
        })
    }

    pub fn live_state(&self) -> LiveState {
        live_state_of(&self.run_state, &self.shared.exit)
    }

    /// Everything but guest RAM, read from parked threads.
    pub(crate) fn capture(&self) -> Result<SavedVm, LifecycleError> {
        if !self.shared.pause.is_requested() {
            return Err(LifecycleError::NotPaused);
        }
        self.shared.captures.request();
        self.shared.pause.wake_parked();
        let vcpus = self
            .shared
            .captures
            .collect(PAUSE_TIMEOUT)
            .map_err(LifecycleError::Capture)?;
        // Captured in id order; a machine has at most 255 vCPUs (`cpus: u8`).
        let vcpus = (0..=u8::MAX).zip(vcpus).collect();
        let vm = VmState::capture(&self.shared.vm)
            .map_err(|e| LifecycleError::Capture(e.to_string()))?;
        let devices = crate::persist::save_all(&self.board.components(&self.virtio))
            .map_err(LifecycleError::Capture)?;
        Ok(SavedVm {
            machine: self.machine.clone(),
            vm,
            vcpus,
            devices,
        })
    }

    /// Writes a snapshot to `dir`; a running VM is paused for it and then
    /// resumed, a paused one stays paused.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, LifecycleError> {
        let state = lock(&self.run_state);
        if dir.exists() {
            return Err(SnapshotError::Exists {
                path: dir.display().to_string(),
            }
            .into());
        }
        while_parked(
            *state,
            || self.park_threads(),
            || self.release_threads(),
            || {
                let saved = self.capture()?;
                Ok(crate::snapshot::write(dir, &saved, &self.shared.memory)?)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::VmExit;
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Threads that park at `gate` once it asks and they have been kicked
    /// `kicks_needed` times (a vCPU only notices a pause out of KVM_RUN).
    fn workers(
        count: usize,
        gate: &Arc<PauseGate>,
        exit: &Arc<ExitSignal>,
        kicks: &Arc<AtomicUsize>,
        kicks_needed: usize,
    ) -> Vec<std::thread::JoinHandle<()>> {
        (0..count)
            .map(|_| {
                let (gate, exit, kicks) = (gate.clone(), exit.clone(), kicks.clone());
                std::thread::spawn(move || {
                    while !exit.is_requested() {
                        if gate.is_requested() && kicks.load(Ordering::SeqCst) >= kicks_needed {
                            gate.park(&exit, || {});
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                })
            })
            .collect()
    }

    fn stop(exit: &ExitSignal, workers: Vec<std::thread::JoinHandle<()>>) {
        exit.request(VmExit::Stopped);
        workers.into_iter().for_each(|w| w.join().unwrap());
    }

    #[test]
    fn a_pause_kicks_the_vcpus_until_every_thread_has_parked() {
        let gate = Arc::new(PauseGate::default());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let kicks = Arc::new(AtomicUsize::new(0));
        let threads = workers(3, &gate, &exit, &kicks, 3);
        let device_wakes = AtomicUsize::new(0);
        let parked = park_all(
            &gate,
            &exit,
            3,
            Duration::from_secs(10),
            || {
                device_wakes.fetch_add(1, Ordering::SeqCst);
            },
            || {
                kicks.fetch_add(1, Ordering::SeqCst);
            },
        );
        assert!(parked.is_ok(), "{parked:?}");
        assert!(kicks.load(Ordering::SeqCst) >= 3);
        assert_eq!(device_wakes.load(Ordering::SeqCst), 1);
        // They stay parked until released.
        assert!(gate.is_requested());
        assert!(gate.wait_parked(3, Duration::ZERO));
        gate.release();
        stop(&exit, threads);
    }

    #[test]
    fn a_stopping_vm_is_not_paused() {
        let gate = PauseGate::default();
        let exit = ExitSignal::new().unwrap();
        exit.request(VmExit::Stopped);
        let result = park_all(
            &gate,
            &exit,
            1,
            Duration::from_secs(10),
            || panic!("woken"),
            || panic!("kicked"),
        );
        assert!(
            matches!(result, Err(LifecycleError::Stopping)),
            "{result:?}"
        );
        assert!(!gate.is_requested());
    }

    #[test]
    fn a_pause_that_a_thread_never_reaches_times_out_and_lets_the_others_go() {
        let gate = Arc::new(PauseGate::default());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let kicks = Arc::new(AtomicUsize::new(0));
        // One thread parks; a second party never comes.
        let threads = workers(1, &gate, &exit, &kicks, 0);
        let timeout = Duration::from_millis(100);
        let started = Instant::now();
        let result = park_all(&gate, &exit, 2, timeout, || {}, || {});
        let waited = started.elapsed();
        assert!(
            matches!(result, Err(LifecycleError::PauseTimeout(t)) if t == timeout),
            "{result:?}"
        );
        assert!(
            waited >= timeout && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(!gate.is_requested(), "the pause is called off");
        // The thread that had parked goes on.
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.wait_parked(1, Duration::ZERO) {
            assert!(Instant::now() < deadline, "still parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        stop(&exit, threads);
    }

    #[test]
    fn a_vm_that_starts_stopping_during_a_pause_lets_its_threads_go() {
        let gate = PauseGate::default();
        let exit = ExitSignal::new().unwrap();
        let mut kicks = 0;
        let started = Instant::now();
        let result = park_all(
            &gate,
            &exit,
            1,
            Duration::from_secs(10),
            || {},
            || {
                kicks += 1;
                if kicks == 3 {
                    exit.request(VmExit::Stopped);
                }
            },
        );
        assert!(
            matches!(result, Err(LifecycleError::Stopping)),
            "{result:?}"
        );
        assert_eq!(kicks, 3, "no kick after the stop was seen");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!gate.is_requested());
    }

    #[test]
    fn a_pause_waits_for_every_vcpu_and_the_device_thread() {
        assert_eq!(parties(1, false), 1);
        assert_eq!(parties(4, false), 4);
        assert_eq!(parties(2, true), 3);
        assert_eq!(parties(u8::MAX, true), 256);
    }

    #[test]
    fn pause_and_resume_move_between_running_and_paused() {
        let state = Mutex::new(RunState::Running);
        let exit = ExitSignal::new().unwrap();
        // A pause that fails leaves the VM running.
        let failed = pause_with(&state, || Err(LifecycleError::PauseTimeout(PAUSE_TIMEOUT)));
        assert!(matches!(failed, Err(LifecycleError::PauseTimeout(_))));
        assert_eq!(*lock(&state), RunState::Running);
        let parks = AtomicUsize::new(0);
        pause_with(&state, || {
            parks.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(*lock(&state), RunState::Paused);
        assert_eq!(parks.load(Ordering::SeqCst), 1);
        // Pausing a paused VM does nothing.
        pause_with(&state, || panic!("parked twice")).unwrap();
        assert_eq!(*lock(&state), RunState::Paused);
        let releases = AtomicUsize::new(0);
        resume_with(&state, &exit, || {
            releases.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        assert_eq!(*lock(&state), RunState::Running);
        assert_eq!(releases.load(Ordering::SeqCst), 1);
        // Resuming a running VM does nothing.
        resume_with(&state, &exit, || panic!("released twice")).unwrap();
        assert_eq!(*lock(&state), RunState::Running);
        // A stopping VM is not resumed.
        *lock(&state) = RunState::Paused;
        exit.request(VmExit::Stopped);
        let refused = resume_with(&state, &exit, || panic!("released while stopping"));
        assert!(matches!(refused, Err(LifecycleError::Stopping)));
        assert_eq!(*lock(&state), RunState::Paused);
    }

    #[test]
    fn the_status_says_busy_while_an_operation_holds_the_vm() {
        let state = Mutex::new(RunState::Running);
        let exit = ExitSignal::new().unwrap();
        assert_eq!(live_state_of(&state, &exit), LiveState::Running);
        *lock(&state) = RunState::Paused;
        assert_eq!(live_state_of(&state, &exit), LiveState::Paused);
        let held = lock(&state);
        assert_eq!(live_state_of(&state, &exit), LiveState::Busy);
        exit.request(VmExit::Stopped);
        assert_eq!(live_state_of(&state, &exit), LiveState::Stopping);
        drop(held);
        assert_eq!(live_state_of(&state, &exit), LiveState::Stopping);
    }

    #[test]
    fn a_running_vm_is_parked_for_a_snapshot_and_released_whatever_its_outcome() {
        let log = RefCell::new(Vec::new());
        let step = |name: &'static str| log.borrow_mut().push(name);
        let park = || {
            step("park");
            Ok(())
        };
        let release = || step("release");
        let ok = while_parked(RunState::Running, park, release, || {
            step("work");
            Ok(7)
        });
        assert_eq!(ok.unwrap(), 7);
        assert_eq!(log.take(), ["park", "work", "release"]);
        let failed: Result<(), _> = while_parked(RunState::Running, park, release, || {
            step("work");
            Err(LifecycleError::NotPaused)
        });
        assert!(matches!(failed, Err(LifecycleError::NotPaused)));
        assert_eq!(log.take(), ["park", "work", "release"]);
        // A paused VM stays paused.
        let ok = while_parked(RunState::Paused, park, release, || {
            step("work");
            Ok(())
        });
        assert!(ok.is_ok());
        assert_eq!(log.take(), ["work"]);
        // Nothing is written from a VM that did not park.
        let failed: Result<(), _> = while_parked(
            RunState::Running,
            || Err(LifecycleError::Stopping),
            release,
            || {
                step("work");
                Ok(())
            },
        );
        assert!(matches!(failed, Err(LifecycleError::Stopping)));
        assert!(log.take().is_empty());
    }
}
