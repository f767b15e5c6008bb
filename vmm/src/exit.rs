//! Why a VM stopped, and the one-shot signal vCPUs and devices use to stop it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

/// The reason a VM stopped. The first reason reported wins.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmExit {
    /// The guest powered off (ACPI PM1a control, S5).
    PowerOff,
    /// The guest reset itself (i8042 reset line or a KVM system-event reset).
    Reset,
    /// The guest kernel reported a panic through pvpanic.
    GuestPanic,
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: usize },
    /// Stopped from the host side (Ctrl-A x on the console, or a signal).
    Stopped,
    /// Every vCPU halted with interrupts off and its local APIC disabled:
    /// how Linux ends a halt, or a power-off it has no ACPI for.
    Halted,
    /// Live-migrated away: the guest runs on in another process.
    Migrated,
    /// Something the VMM cannot continue from.
    Fatal(String),
}

impl VmExit {
    /// Whether the guest ended normally: a power-off, reset or host stop.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            VmExit::PowerOff | VmExit::Reset | VmExit::Halted | VmExit::Stopped | VmExit::Migrated
        )
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::GuestPanic => write!(f, "guest kernel panicked (reported through pvpanic)"),
            VmExit::TripleFault { vcpu } => {
                write!(f, "triple fault on vCPU {vcpu} (KVM_EXIT_SHUTDOWN)")
            }
            VmExit::Halted => write!(f, "guest halted: every vCPU stopped with interrupts off"),
            VmExit::Stopped => write!(f, "stopped by the host"),
            VmExit::Migrated => write!(f, "migrated: the guest runs on at the destination"),
            VmExit::Fatal(reason) => write!(f, "{reason}"),
        }
    }
}

/// Collects the first exit request and wakes whoever waits on `event`.
pub struct ExitSignal {
    requested: AtomicBool,
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            requested: AtomicBool::new(false),
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn request(&self, reason: VmExit) {
        let mut slot = crate::devices::lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
            self.requested.store(true, Ordering::Release);
            // A full counter still wakes the waiter, so the error is irrelevant.
            let _ = self.event.write(1);
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<VmExit> {
        crate::devices::lock(&self.reason).clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_waiter() {
        let signal = ExitSignal::new().unwrap();
        assert!(!signal.is_requested());
        signal.request(VmExit::GuestPanic);
        signal.request(VmExit::PowerOff);
        assert!(signal.is_requested());
        assert_eq!(signal.reason(), Some(VmExit::GuestPanic));
        assert_eq!(signal.event().read().unwrap(), 1);
        assert!(!VmExit::GuestPanic.is_clean());
        assert!(VmExit::Reset.is_clean());
        assert!(VmExit::Halted.is_clean());
    }
}
