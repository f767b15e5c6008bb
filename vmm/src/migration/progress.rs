//! An outgoing migration's progress, as the running VM's status shows it
//! (a leaf: the VM's core holds one while a migration runs).

use serde::{Deserialize, Serialize};

/// How far an outgoing migration is, as the source sees it while it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationProgress {
    pub phase: MigrationPhase,
    /// 1 is the copy of all memory; later rounds copy what the guest dirtied.
    pub round: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Pages the guest dirtied during the last finished round.
    pub dirty_pages: u64,
    pub throttle_percent: u32,
    pub elapsed_ms: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Waiting for the destination to accept.
    #[default]
    Connecting,
    /// Copying memory while the guest runs.
    Copying,
    /// The guest is paused; the last pages and the state are being sent.
    StopAndCopy,
    /// Everything is sent; waiting for the destination to run the guest.
    WaitingForDestination,
}
