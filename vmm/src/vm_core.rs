//! The running VM's core: what the host holds of a VM while it runs, and
//! the small types around it. `vm.rs` builds it; pause, snapshot
//! (`lifecycle.rs`), the control socket (`control.rs`) and migration
//! (`migration/`) work on it. It depends on none of them.

use crate::config::VmSpec;
use crate::devices::legacy::cmos::Cmos;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::power::Pm1;
use crate::devices::legacy::serial::SerialPort;
use crate::devices::lock;
use crate::devices::pci::PciRoot;
use crate::devices::virtio::balloon::BalloonHandle;
use crate::devices::virtio::mmio::MmioTransport;
use crate::migration::progress::MigrationProgress;
use crate::vcpu::VcpuShared;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// What the host holds of a VM while it runs: the parts pause, snapshot and
/// migration work on (`lifecycle.rs`, `control.rs`, `migration/`).
/// Built by `vm.rs`; it names nothing of them, so nothing here goes round
/// in a circle.
pub struct VmCore {
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) board: Board,
    pub(crate) virtio: Vec<VirtioSlot>,
    pub(crate) balloon: Option<BalloonHandle>,
    /// Written to make the device thread look at a pause request.
    pub(crate) device_kick: Option<EventFd>,
    /// Its TAP devices (duplicates of the NICs' descriptors, in machine
    /// order): a same-host migration hands them to the destination.
    pub(crate) taps: Vec<std::fs::File>,
    pub(crate) machine: VmSpec,
    /// Held by every operation on the running VM, so they never overlap.
    pub(crate) run_state: Mutex<RunState>,
    /// How far an outgoing migration is, while one runs (the status shows it).
    pub(crate) migration: Mutex<Option<MigrationProgress>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// What a running VMM is doing, as its status says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveState {
    Running,
    Paused,
    /// An operation (a snapshot, a migration) holds the VM.
    Busy,
    /// The VM is ending.
    Stopping,
}

/// A virtio-mmio device and where the guest finds it.
#[derive(Clone)]
pub(crate) struct VirtioSlot {
    /// The device's id in the machine (`VmSpec::device_ids`): what its
    /// saved state is keyed by.
    pub id: String,
    pub base: u64,
    pub irq: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl VirtioSlot {
    /// How a kernel without ACPI learns of the device
    /// (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES); ACPI kernels find it in the DSDT.
    pub(crate) fn cmdline_option(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

impl crate::persist::Component for VirtioSlot {
    fn id(&self) -> &str {
        &self.id
    }

    /// The machine names the device, and its state was always saved.
    fn required(&self) -> bool {
        true
    }

    fn save(&self) -> Result<serde_json::Value, String> {
        serde_json::to_value(lock(&self.transport).save()).map_err(|e| e.to_string())
    }

    fn restore(&self, state: serde_json::Value) -> Result<(), String> {
        let state: crate::devices::virtio::mmio::TransportState =
            serde_json::from_value(state).map_err(|e| e.to_string())?;
        lock(&self.transport).restore(&state)
    }
}

/// The devices of the board, each behind its lock: the VM's parts with
/// saved state besides its virtio devices.
#[derive(Clone)]
pub(crate) struct Board {
    pub serial: Arc<Mutex<SerialPort>>,
    /// The keyboard controller, for the host's Ctrl-Alt-Del.
    pub keyboard: Arc<Mutex<I8042>>,
    pub cmos: Arc<Mutex<Cmos>>,
    /// The ACPI PM1 block, for the host's power button.
    pub pm1: Arc<Mutex<Pm1>>,
    pub pci: Arc<Mutex<PciRoot>>,
}

impl Board {
    /// Every part of a VM with this board and these virtio devices that
    /// saves its state: what capture and restore loop over.
    pub(crate) fn components<'a>(
        &'a self,
        virtio: &'a [VirtioSlot],
    ) -> Vec<&'a dyn crate::persist::Component> {
        let board: [&dyn crate::persist::Component; 5] = [
            &*self.serial,
            &*self.keyboard,
            &*self.cmos,
            &*self.pm1,
            &*self.pci,
        ];
        board
            .into_iter()
            .chain(
                virtio
                    .iter()
                    .map(|slot| slot as &dyn crate::persist::Component),
            )
            .collect()
    }
}

/// Signal used to knock vCPU threads out of KVM_RUN.
pub(crate) fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// What a device did, by counter name.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceReport {
    pub name: String,
    pub state: DeviceState,
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// Where a virtio device is with its driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Waiting for its driver.
    Waiting,
    Active,
    /// The driver broke the rules; the device waits for a reset.
    NeedsReset,
}

pub(crate) fn device_reports(slots: &[VirtioSlot]) -> Vec<DeviceReport> {
    slots
        .iter()
        .map(|slot| {
            let transport = lock(&slot.transport);
            DeviceReport {
                name: transport.device().name(),
                state: match (transport.is_activated(), transport.device().is_broken()) {
                    (false, _) => DeviceState::Waiting,
                    (true, false) => DeviceState::Active,
                    (true, true) => DeviceState::NeedsReset,
                },
                counters: transport
                    .device()
                    .counters()
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect(),
            }
        })
        .collect()
}
