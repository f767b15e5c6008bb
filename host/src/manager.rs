//! The VM manager: lifecycle operations on the host's VMs, with the store as
//! the record of what should be and the VMM processes as what is.
//!
//! Operations are synchronous (the API runs them on blocking threads); one
//! operation at a time per VM. Each process has a watcher thread, the only
//! place that records how a VMM ended.

use crate::cgroup::Cgroups;
use crate::events::{Event, EventBus};
use crate::model::{random_hex, unix_now, VmRecord, VmState};
use crate::spec::{SpecError, Validate, VmSpec};
use crate::store::{Store, StoreError};
use crate::vmm_process::{self, Origin, VmPaths};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmm::control::Request;

/// How long a VMM may take to stop its VM when told to (SIGTERM).
const HOST_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new VMM may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub state_dir: PathBuf,
    /// Directories whose files specs may name (kernels, initrds, disks).
    pub allowed_dirs: Vec<PathBuf>,
    /// The `bulkhead` binary that runs each VMM.
    pub vmm_binary: PathBuf,
    /// The KVM device each VMM gets open (`/dev/kvm`).
    pub kvm_device: PathBuf,
    /// Where each VMM's limits are set ([`Cgroups::detect`] for the host's).
    pub cgroups: Cgroups,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    Invalid(#[from] SpecError),
    #[error("no VM {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Store(StoreError),
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken { .. } => ManagerError::Conflict(e.to_string()),
            StoreError::NotFound => ManagerError::NotFound(String::new()),
            other => ManagerError::Store(other),
        }
    }
}

type Result<T> = std::result::Result<T, ManagerError>;

pub struct Manager {
    config: ManagerConfig,
    store: Store,
    cgroups: Cgroups,
    events: EventBus,
    /// One operation at a time per VM.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Signalled whenever a VMM's end is recorded.
    exits: (Mutex<()>, Condvar),
}

impl Manager {
    /// Opens the store and takes charge of the VMs it lists: running VMMs are
    /// adopted, half-done operations are finished.
    pub fn open(config: ManagerConfig, events: EventBus) -> anyhow::Result<Arc<Manager>> {
        std::fs::create_dir_all(config.state_dir.join("vms"))?;
        let store = Store::open(&config.state_dir.join("state.redb"))?;
        let cgroups = config.cgroups.clone();
        tracing::info!(limits = cgroups.describe(), "VM resource limits");
        let manager = Arc::new(Manager {
            config,
            store,
            cgroups,
            events,
            locks: Mutex::new(HashMap::new()),
            exits: (Mutex::new(()), Condvar::new()),
        });
        manager.recover()?;
        Ok(manager)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    pub fn paths(&self, id: &str) -> VmPaths {
        VmPaths::new(&self.config.state_dir, id)
    }

    fn lock(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn record(&self, id: &str) -> Result<VmRecord> {
        self.store
            .vm(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))
    }

    fn set_state(
        &self,
        id: &str,
        state: VmState,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord> {
        let record = self.store.update_vm(id, |record| {
            record.state = state;
            change(record);
        })?;
        self.events.publish(Event::state(&record));
        Ok(record)
    }

    pub fn list(&self) -> Result<Vec<VmRecord>> {
        Ok(self.store.vms()?)
    }

    pub fn get(&self, id: &str) -> Result<VmRecord> {
        self.record(id)
    }

    pub fn create(&self, project: &str, spec: VmSpec) -> Result<VmRecord> {
        spec.validate(&self.config.allowed_dirs)?;
        self.check_disks_are_the_projects(project, None, &spec)?;
        let record = VmRecord {
            id: random_hex(8),
            project: project.to_string(),
            spec,
            state: VmState::Stopped,
            uid: self.store.allocate_uid()?,
            created_at: unix_now(),
            pid: None,
            last_exit: None,
        };
        self.store.create_vm(&record)?;
        self.events.publish(Event::state(&record));
        Ok(record)
    }

    /// A disk belongs to the project whose VM names it first: another
    /// project's VM may not name the same file (by any path).
    fn check_disks_are_the_projects(
        &self,
        project: &str,
        this_vm: Option<&str>,
        spec: &VmSpec,
    ) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        // By any path: links and '..' followed, only to compare identities.
        let identify = |_: &str, path: &std::path::Path| {
            std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
        };
        let others: Vec<VmRecord> = self
            .list()?
            .into_iter()
            .filter(|r| r.project != project && Some(r.id.as_str()) != this_vm)
            .collect();
        for (index, disk) in spec.disks.iter().enumerate() {
            let field = format!("disks[{index}].path");
            let Some(ours) = identify(&field, &disk.path) else {
                continue;
            };
            let taken = others.iter().any(|other| {
                other
                    .spec
                    .disks
                    .iter()
                    .any(|theirs| identify(&field, &theirs.path) == Some(ours))
            });
            if taken {
                return Err(SpecError {
                    field,
                    message: format!("{} belongs to another project", disk.path.display()),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Starts VM `id`'s VMM: a boot, a restore of one of its snapshots, or
    /// (returning while it waits, in `starting`) the destination of a live
    /// migration.
    pub fn start(self: &Arc<Self>, id: &str, origin: Origin) -> Result<VmRecord> {
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.record(id)?;
        if !matches!(record.state, VmState::Stopped | VmState::Crashed) {
            return Err(ManagerError::Conflict(format!(
                "VM {id} is {}; only a stopped or crashed VM can be started",
                record.state.name()
            )));
        }
        // The spec's files may have changed since it was defined.
        record.spec.validate(&self.config.allowed_dirs)?;
        self.check_disks_are_the_projects(&record.project, Some(id), &record.spec)?;
        if let Origin::Restore(name) = &origin {
            if !self
                .paths(id)
                .snapshots
                .join(name)
                .join("manifest.json")
                .exists()
            {
                return Err(SpecError {
                    field: "restore".into(),
                    message: format!("VM {id} has no snapshot {name}"),
                }
                .into());
            }
        }
        self.set_state(id, VmState::Starting, |r| r.last_exit = None)?;
        match self.launch(&record, &origin) {
            Ok(record) => Ok(record),
            Err(e) => {
                self.cgroups.remove(id);
                let _ = self.set_state(id, VmState::Stopped, |r| {
                    r.pid = None;
                    r.last_exit = Some(e.to_string());
                });
                Err(e)
            }
        }
    }

    fn launch(self: &Arc<Self>, record: &VmRecord, origin: &Origin) -> Result<VmRecord> {
        let id = &record.id;
        let paths = self.paths(id);
        let cgroup = self
            .cgroups
            .create(id, record.spec.cpus, record.spec.memory_mib)
            .map_err(|e| ManagerError::Failed(format!("cannot set up the VM's cgroup: {e}")))?;
        vmm_process::prepare_directories(&paths, record.uid)
            .map_err(|e| ManagerError::Failed(format!("cannot prepare the VM's directory: {e}")))?;
        let launch = vmm_process::prepare(
            &record.spec,
            record.uid,
            origin,
            &paths,
            &self.config.allowed_dirs,
            &self.config.kvm_device,
        )
        .map_err(|e| match e {
            crate::resources::ResourceError::Io { .. } => ManagerError::Failed(e.to_string()),
            other => ManagerError::from(resource_spec_error(other)),
        })?;
        let mut child =
            vmm_process::launch(&self.config.vmm_binary, id, &paths, launch, cgroup.as_ref())
                .map_err(|e| ManagerError::Failed(format!("cannot start the VMM: {e}")))?;
        let pid = child.id();
        self.store.update_vm(id, |r| r.pid = Some(pid))?;
        if matches!(origin, Origin::Incoming { .. }) {
            return self.await_migration(id, child, &paths);
        }
        // Wait for the control socket to answer, or the process to end.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // A short-lived guest may run to its end before we look.
                let report = vmm_process::reported_exit(&paths);
                if let Some(report) = report.as_ref().filter(|r| r.clean && status.success()) {
                    self.cgroups.remove(id);
                    return self.set_state(id, VmState::Stopped, |r| {
                        r.pid = None;
                        r.last_exit = Some(report.exit.clone());
                    });
                }
                let why = match report {
                    Some(report) => report.exit,
                    None => vmm_process::log_tail(&paths, 3),
                };
                return Err(ManagerError::Failed(format!(
                    "the VMM ended while starting ({status}): {why}"
                )));
            }
            if vmm::control::status(&paths.control).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ManagerError::Failed(format!(
                    "the VMM did not answer within {START_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let record = self.set_state(id, VmState::Running, |r| r.pid = Some(pid))?;
        let manager = self.clone();
        let watched = id.clone();
        std::thread::Builder::new()
            .name(format!("watch-{id}"))
            .spawn(move || {
                let status = child.wait().ok();
                manager.vmm_ended(&watched, status);
            })
            .map_err(|e| ManagerError::Failed(format!("cannot watch the VMM: {e}")))?;
        Ok(record)
    }

    /// Returns once the VMM listens for the migration; a thread then marks the
    /// VM running when it arrives (or records the failure).
    fn await_migration(
        self: &Arc<Self>,
        id: &str,
        mut child: std::process::Child,
        paths: &VmPaths,
    ) -> Result<VmRecord> {
        // The daemon bound the listener itself: the VMM is reachable as soon
        // as it exists. A VMM that cannot take its plan ends at once.
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(Some(status)) = child.try_wait() {
            let why = match vmm_process::reported_exit(paths) {
                Some(report) => report.exit,
                None => vmm_process::log_tail(paths, 3),
            };
            return Err(ManagerError::Failed(format!(
                "the VMM ended before listening ({status}): {why}"
            )));
        }
        let manager = self.clone();
        let watched = id.to_string();
        let control = paths.control.clone();
        std::thread::Builder::new()
            .name(format!("watch-{id}"))
            .spawn(move || {
                loop {
                    if let Ok(Some(status)) = child.try_wait() {
                        manager.vmm_ended(&watched, Some(status));
                        return;
                    }
                    let answered = vmm::control::status(&control).is_ok();
                    if answered {
                        let _ = manager.set_state(&watched, VmState::Running, |_| {});
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let status = child.wait().ok();
                manager.vmm_ended(&watched, status);
            })
            .map_err(|e| ManagerError::Failed(format!("cannot watch the VMM: {e}")))?;
        self.record(id)
    }

    /// Live-migrates VM `id` to a VMM waiting at `options.uri` (a VM started
    /// with an incoming origin, here or on another host). On success this
    /// VM's process ends and the VM is recorded as stopped ("migrated").
    pub fn migrate(
        &self,
        id: &str,
        options: vmm::migration::MigrateOptions,
    ) -> Result<serde_json::Value> {
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.record(id)?;
        if !matches!(record.state, VmState::Running | VmState::Paused) {
            return Err(ManagerError::Conflict(format!(
                "VM {id} is {}; only a running or paused VM can migrate",
                record.state.name()
            )));
        }
        let uri = options.uri.clone();
        let migration = match vmm::control::migrate(&self.paths(id).control, options) {
            Ok(migration) => migration,
            Err(e) => {
                // The operator's log says why; the client learns only that it
                // failed, not what answered at an address it chose.
                tracing::warn!(vm = id, uri, "migration failed: {e}");
                return Err(ManagerError::Failed(format!(
                    "the migration to {uri} did not complete; VM {id} keeps running here"
                )));
            }
        };
        // The source VMM ends once the destination runs the guest.
        self.wait_until_ended(id, Duration::from_secs(30))?;
        Ok(serde_json::to_value(migration).unwrap_or_default())
    }

    /// Records how VM `id`'s VMM ended (called once per process).
    fn vmm_ended(&self, id: &str, status: Option<std::process::ExitStatus>) {
        let paths = self.paths(id);
        let reported = vmm_process::reported_exit(&paths);
        let stopping = self
            .store
            .vm(id)
            .ok()
            .flatten()
            .is_some_and(|record| record.state == VmState::Stopping);
        let how = match (&reported, status) {
            (Some(report), _) => report.exit.clone(),
            (None, _) if stopping => "stopped by the host (VMM killed)".to_string(),
            (None, Some(status)) => {
                let tail = vmm_process::log_tail(&paths, 1);
                if tail.is_empty() {
                    format!("VMM {status}")
                } else {
                    format!("VMM {status}: {tail}")
                }
            }
            (None, None) => "VMM ended without a report".to_string(),
        };
        let clean = match status {
            Some(status) => status.success(),
            None => reported.as_ref().is_some_and(|report| report.clean),
        };
        self.cgroups.remove(id);
        let _ = self.store.update_vm(id, |record| {
            record.pid = None;
            record.last_exit = Some(how.clone());
            record.state = match record.state {
                VmState::Deleting => VmState::Deleting,
                VmState::Stopping => VmState::Stopped,
                // Ended before its guest ran (an incoming migration that
                // never came): a start that failed, not a crash.
                VmState::Starting => VmState::Stopped,
                _ if clean => VmState::Stopped,
                _ => VmState::Crashed,
            };
        });
        if let Ok(Some(record)) = self.store.vm(id) {
            tracing::info!(vm = id, state = record.state.name(), exit = %how, "VMM ended");
            self.events.publish(Event::state(&record));
        }
        // Taken after the store changed: a waiter checks the store holding
        // it, so it either sees the change or is waiting when notified.
        let (lock, condvar) = &self.exits;
        drop(lock.lock().unwrap_or_else(|e| e.into_inner()));
        condvar.notify_all();
    }

    /// Waits until VM `id` has no process, up to `limit`.
    fn wait_until_ended(&self, id: &str, limit: Duration) -> Result<bool> {
        let deadline = Instant::now() + limit;
        let (lock, condvar) = &self.exits;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // The pid goes when the end is recorded, with the new state.
            if self.record(id)?.pid.is_none() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            guard = condvar
                .wait_timeout(guard, (deadline - now).min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops VM `id`: the guest is asked to shut down (the ACPI power button
    /// if it listens to it, else Ctrl-Alt-Del) and given
    /// `timeout`; then the VMM stops the VM itself (SIGTERM); then it is
    /// killed. With `force` it is killed at once.
    pub fn stop(&self, id: &str, force: bool, timeout: Duration) -> Result<VmRecord> {
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.record(id)?;
        if !matches!(
            record.state,
            VmState::Running | VmState::Paused | VmState::Stopping
        ) {
            return Err(ManagerError::Conflict(format!(
                "VM {id} is {}; only a running or paused VM can be stopped",
                record.state.name()
            )));
        }
        self.set_state(id, VmState::Stopping, |_| {})?;
        self.end_process(&record, force, timeout)?;
        self.record(id)
    }

    fn end_process(&self, record: &VmRecord, force: bool, timeout: Duration) -> Result<()> {
        let Some(pid) = record
            .pid
            .filter(|&pid| vmm_process::is_vm_process(pid, &record.id))
        else {
            // No process (it ended while nobody watched): record that.
            // (A delete holds the VM's lock: this is a stop's doing.)
            self.cgroups.remove(&record.id);
            self.store.update_vm(&record.id, |r| {
                r.pid = None;
                r.state = VmState::Stopped;
            })?;
            return Ok(());
        };
        if !force {
            // Ask the guest first: the ACPI power button when the guest
            // listens to it, else Ctrl-Alt-Del, which a guest shuts down or
            // reboots on by itself (the VM ends either way). A VMM from
            // before `shutdown` existed (adopted) gets Ctrl-Alt-Del.
            let control = &self.paths(&record.id).control;
            let ask = |request: &Request| vmm::control::call(control, request).is_ok();
            let asked = ask(&Request::Shutdown) || ask(&Request::CtrlAltDel);
            if asked && self.wait_until_ended(&record.id, timeout)? {
                return Ok(());
            }
            // Then the VMM stops the VM itself, then it is killed.
            tracing::info!(vm = %record.id, "the guest did not shut down within {timeout:?}; stopping it");
            vmm_process::signal(pid, libc::SIGTERM);
            if self.wait_until_ended(&record.id, HOST_STOP_TIMEOUT)? {
                return Ok(());
            }
            tracing::warn!(vm = %record.id, "VMM did not stop; killing it");
        }
        vmm_process::signal(pid, libc::SIGKILL);
        if !self.wait_until_ended(&record.id, Duration::from_secs(10))? {
            return Err(ManagerError::Failed(format!(
                "VMM {pid} of VM {} did not end after SIGKILL",
                record.id
            )));
        }
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<VmRecord> {
        self.control_transition(id, VmState::Running, Request::Pause, VmState::Paused)
    }

    pub fn resume(&self, id: &str) -> Result<VmRecord> {
        self.control_transition(id, VmState::Paused, Request::Resume, VmState::Running)
    }

    fn control_transition(
        &self,
        id: &str,
        from: VmState,
        request: Request,
        to: VmState,
    ) -> Result<VmRecord> {
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.record(id)?;
        if record.state != from {
            return Err(ManagerError::Conflict(format!(
                "VM {id} is {}, not {}",
                record.state.name(),
                from.name()
            )));
        }
        self.control(id, &request)?;
        self.set_state(id, to, |_| {})
    }

    /// Sends a request to VM `id`'s VMM; its typed answer, or why not.
    fn control(&self, id: &str, request: &Request) -> Result<vmm::control::Response> {
        vmm::control::call(&self.paths(id).control, request).map_err(|e| control_error(id, e))
    }

    /// The VMM's own view: memory, devices, state. None without a process.
    pub fn live_status(&self, id: &str) -> Option<vmm::control::Status> {
        let record = self.store.vm(id).ok()??;
        if !record.state.has_process() {
            return None;
        }
        vmm::control::status(&self.paths(id).control).ok()
    }

    /// Writes a snapshot of VM `id` into its snapshots directory as `name`.
    pub fn snapshot(&self, id: &str, name: &str) -> Result<serde_json::Value> {
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.record(id)?;
        if !matches!(record.state, VmState::Running | VmState::Paused) {
            return Err(ManagerError::Conflict(format!(
                "VM {id} is {}; only a running or paused VM can be snapshotted",
                record.state.name()
            )));
        }
        let paths = self.paths(id);
        if paths.snapshots.join(name).exists() {
            return Err(ManagerError::Conflict(format!("snapshot {name} exists")));
        }
        // The path as the sandboxed VMM sees it: its jail is its root.
        std::fs::create_dir_all(&paths.snapshots)
            .and_then(|()| {
                std::os::unix::fs::chown(&paths.snapshots, Some(record.uid), Some(record.uid))
            })
            .map_err(|e| {
                ManagerError::Failed(format!("cannot prepare the snapshot directory: {e}"))
            })?;
        let (snapshot, _pause_ms) =
            vmm::control::snapshot(&paths.control, &Path::new("/snapshots").join(name))
                .map_err(|e| control_error(id, e))?;
        Ok(serde_json::to_value(snapshot).unwrap_or_default())
    }

    /// Deletes VM `id`; a VM with a process needs `force`, which kills it.
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let lock = self.lock(id);
        let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.record(id)?;
        if record.state.has_process() && !force {
            return Err(ManagerError::Conflict(format!(
                "VM {id} is {}; stop it first or delete with force",
                record.state.name()
            )));
        }
        let record = self.set_state(id, VmState::Deleting, |_| {})?;
        self.finish_delete(&record)
    }

    fn finish_delete(&self, record: &VmRecord) -> Result<()> {
        if let Some(pid) = record
            .pid
            .filter(|&pid| vmm_process::is_vm_process(pid, &record.id))
            .or_else(|| vmm_process::find_process(&record.id))
        {
            vmm_process::signal(pid, libc::SIGKILL);
            vmm_process::wait_for_exit(pid);
        }
        self.cgroups.remove(&record.id);
        let dir = self.paths(&record.id).dir;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| {
                ManagerError::Failed(format!("cannot remove {}: {e}", dir.display()))
            })?;
        }
        self.store.delete_vm(&record.id)?;
        let mut gone = record.clone();
        gone.state = VmState::Deleting;
        self.events.publish(Event::deleted(&gone));
        Ok(())
    }

    /// After a daemon restart: adopts VMMs that still run, records those that
    /// ended, finishes deletes.
    fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        for record in self.store.vms()? {
            let id = record.id.clone();
            if record.state == VmState::Deleting {
                tracing::info!(vm = %id, "finishing a delete the daemon was killed in");
                if let Err(e) = self.finish_delete(&record) {
                    tracing::error!(vm = %id, "cannot finish deleting: {e}");
                }
                continue;
            }
            let pid = record
                .pid
                .filter(|&pid| vmm_process::is_vm_process(pid, &id))
                .or_else(|| vmm_process::find_process(&id));
            let Some(pid) = pid else {
                if record.state.has_process() {
                    let report = vmm_process::reported_exit(&self.paths(&id));
                    let clean = report.as_ref().is_some_and(|report| report.clean);
                    let how = report.map(|report| report.exit).unwrap_or_else(|| {
                        "the VMM ended while the daemon was down, without a report".into()
                    });
                    let state = match record.state {
                        VmState::Stopping | VmState::Starting => VmState::Stopped,
                        _ if clean => VmState::Stopped,
                        _ => VmState::Crashed,
                    };
                    self.cgroups.remove(&id);
                    self.set_state(&id, state, |r| {
                        r.pid = None;
                        r.last_exit = Some(how);
                    })?;
                }
                continue;
            };
            // A VMM runs: adopt it, with the state it reports.
            let status = self.wait_for_control(&id, Duration::from_secs(10));
            let state = match status.as_ref().map(|s| s.state) {
                Some(vmm::control::LiveState::Paused) => VmState::Paused,
                Some(_) => VmState::Running,
                None => {
                    tracing::warn!(vm = %id, pid, "VMM does not answer; killing it");
                    vmm_process::signal(pid, libc::SIGKILL);
                    vmm_process::wait_for_exit(pid);
                    self.cgroups.remove(&id);
                    self.set_state(&id, VmState::Crashed, |r| {
                        r.pid = None;
                        r.last_exit = Some("VMM did not answer after a daemon restart".into());
                    })?;
                    continue;
                }
            };
            let state = if record.state == VmState::Stopping {
                VmState::Stopping
            } else {
                state
            };
            tracing::info!(vm = %id, pid, state = state.name(), "adopted a running VMM");
            self.set_state(&id, state, |r| r.pid = Some(pid))?;
            if state == VmState::Stopping {
                vmm_process::signal(pid, libc::SIGTERM);
            }
            let manager = self.clone();
            std::thread::Builder::new()
                .name(format!("watch-{id}"))
                .spawn(move || {
                    vmm_process::wait_for_exit(pid);
                    manager.vmm_ended(&id, None);
                })?;
        }
        Ok(())
    }

    fn wait_for_control(&self, id: &str, limit: Duration) -> Option<vmm::control::Status> {
        let deadline = Instant::now() + limit;
        let path = self.paths(id).control;
        loop {
            if let Ok(status) = vmm::control::status(&path) {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A control request that failed, as the daemon reports it: the VMM's own
/// refusal as it gave it, anything else as not answering.
fn control_error(id: &str, error: vmm::control::CallError) -> ManagerError {
    match error {
        vmm::control::CallError::Refused(reason) => ManagerError::Failed(reason),
        other => ManagerError::Failed(format!("VM {id}'s VMM: {other}")),
    }
}

/// A resource the spec names that cannot be used, as the spec field it is.
fn resource_spec_error(error: crate::resources::ResourceError) -> SpecError {
    use crate::resources::ResourceError;
    let field = match &error {
        ResourceError::Outside { field, .. }
        | ResourceError::Open { field, .. }
        | ResourceError::NotAFile { field, .. }
        | ResourceError::InUse { field, .. } => field.clone(),
        ResourceError::Tap(_) => "nics".into(),
        ResourceError::Io { .. } => "spec".into(),
    };
    SpecError {
        field,
        message: error.to_string(),
    }
}
