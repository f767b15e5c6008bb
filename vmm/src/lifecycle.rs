//! What the host does to a running VM: pause, resume, take its state, snapshot.
//! Live migration builds on these (`migration/`).

use crate::arch::x86_64::state::VmState;
use crate::devices::lock;
use crate::snapshot::{SavedVm, SnapshotError, SnapshotInfo};
use crate::vm_core::{kick_signal, RunState, VmCore};
use std::path::Path;
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

impl VmCore {
    fn parties(&self) -> usize {
        usize::from(self.machine.cpus) + usize::from(self.device_kick.is_some())
    }

    /// Stops every vCPU and the device thread; they stay parked until
    /// [`VmCore::release_threads`]. The caller holds `run_state`.
    pub(crate) fn park_threads(&self) -> Result<(), LifecycleError> {
        let shared = &self.shared;
        if shared.exit.is_requested() {
            return Err(LifecycleError::Stopping);
        }
        shared.pause.request();
        if let Some(kick) = &self.device_kick {
            let _ = kick.write(1);
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            shared.threads.kick(kick_signal());
            if shared.pause.wait_parked(self.parties(), KICK_PERIOD) {
                return Ok(());
            }
            if shared.exit.is_requested() || Instant::now() >= deadline {
                shared.pause.release();
                return Err(if shared.exit.is_requested() {
                    LifecycleError::Stopping
                } else {
                    LifecycleError::PauseTimeout(PAUSE_TIMEOUT)
                });
            }
        }
    }

    pub(crate) fn release_threads(&self) {
        self.shared.pause.release();
    }

    pub fn pause(&self) -> Result<(), LifecycleError> {
        let mut state = lock(&self.run_state);
        if *state == RunState::Running {
            self.park_threads()?;
            *state = RunState::Paused;
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), LifecycleError> {
        let mut state = lock(&self.run_state);
        if self.shared.exit.is_requested() {
            return Err(LifecycleError::Stopping);
        }
        if *state == RunState::Paused {
            self.release_threads();
            *state = RunState::Running;
        }
        Ok(())
    }

    pub fn live_state(&self) -> crate::vm_core::LiveState {
        use crate::vm_core::LiveState;
        if self.shared.exit.is_requested() {
            return LiveState::Stopping;
        }
        // An operation (a migration, a snapshot) holds the state while it runs.
        match self.run_state.try_lock().as_deref() {
            Ok(RunState::Running) => LiveState::Running,
            Ok(RunState::Paused) => LiveState::Paused,
            Err(_) => LiveState::Busy,
        }
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
        let was_running = *state == RunState::Running;
        if was_running {
            self.park_threads()?;
        }
        let result = self
            .capture()
            .and_then(|saved| Ok(crate::snapshot::write(dir, &saved, &self.shared.memory)?));
        if was_running {
            self.release_threads();
        }
        result
    }
}
