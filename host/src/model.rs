//! What the daemon records about each VM.

use crate::spec::VmSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a VM is in its life. `starting`, `stopping` and `deleting` are
/// written before the daemon acts, so a daemon killed in the middle finds
/// out what it was doing when it restarts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, no VMM process.
    Stopped,
    Starting,
    Running,
    Paused,
    Stopping,
    /// The VMM ended without being asked to (see `last_exit`).
    Crashed,
    Deleting,
}

impl VmState {
    /// Whether a VMM process is meant to exist.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
            VmState::Deleting => "deleting",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VmRecord {
    /// Assigned by the daemon; 16 hex digits.
    pub id: String,
    pub project: String,
    pub spec: VmSpec,
    pub state: VmState,
    /// The unprivileged uid (and gid) the VMM runs as; unique per VM.
    pub uid: u32,
    /// Unix time, seconds.
    pub created_at: u64,
    /// The VMM's process while one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How the last VMM process ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    let mut filled = 0;
    while filled < bytes {
        // SAFETY: writes at most the remaining length into our buffer.
        let n = unsafe { libc::getrandom(buffer[filled..].as_mut_ptr().cast(), bytes - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}
