//! Live migration: moving a running VM to another Bulkhead process over TCP
//! or a Unix socket, optionally inside TLS.
//!
//! The source copies guest RAM while the guest runs, then copies again what
//! the guest dirtied meanwhile (KVM's dirty log for vCPU writes, vm-memory's
//! bitmap for the VMM's own), round after round, until what is left can be
//! sent within the downtime limit. It then pauses the VM, sends the last
//! pages and the device and vCPU state, and waits for the destination to say
//! it resumed. Any failure before that answer leaves the source running as
//! if nothing happened. See `protocol.rs` for the stream.

mod dirty;
pub mod hand_over;
pub mod progress;
pub mod protocol;
mod source;
#[cfg(test)]
mod testing;
mod transport;

pub mod destination;

pub use destination::{accept, accept_on, Incoming};
pub use progress::{MigrationPhase, MigrationProgress};
pub use transport::{read_ca, read_pem, Endpoint, Listener, TlsClient, TlsIdentity, TlsServer};

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// QEMU's default: the longest the guest may stand still at switch-over.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);
/// How long a migration may keep failing to converge before it gives up.
pub const DEFAULT_GIVE_UP: Duration = Duration::from_secs(120);

/// What the source is asked to do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateOptions {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub uri: String,
    /// Longest allowed pause at switch-over, in ms (default 300).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Cap on the stream, in MiB/s (default: as fast as the link goes).
    #[serde(default)]
    pub bandwidth_mib: Option<u64>,
    /// Give up after this many seconds without converging (default 120).
    #[serde(default)]
    pub give_up_after_s: Option<u64>,
    /// Compare a checksum of all guest RAM on both sides at switch-over.
    #[serde(default)]
    pub verify_memory: bool,
    #[serde(default)]
    pub tls: Option<TlsClient>,
}

/// What a finished (or failed) migration did, as the source saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationReport {
    pub total_ms: f64,
    /// Last guest instruction on the source to the first on the destination
    /// (both clocks are the same on one host); otherwise the source's pause
    /// until the destination's answer, an upper bound.
    pub downtime_ms: f64,
    pub downtime_measured_on_one_clock: bool,
    pub rounds: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    pub last_round_pages: u64,
    /// The highest share of time vCPUs were held back so the copy converges.
    pub max_throttle_percent: u32,
    pub memory_crc: Option<u32>,
    /// The destination took the guest's RAM over (same host, a memfd): no
    /// page was copied.
    #[serde(default)]
    pub memory_handed_over: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("bad migration URI {0:?}: expected tcp:IP:PORT (an address, not a name) or unix:PATH")]
    Uri(String),
    #[error("cannot reach {uri}: {source}")]
    Connect { uri: String, source: std::io::Error },
    #[error("cannot listen on {uri}: {source}")]
    Listen { uri: String, source: std::io::Error },
    #[error("cannot set up the connection: {0}")]
    Socket(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("the destination could not resume the VM: {0}")]
    DestinationFailed(String),
    #[error("the guest dirties memory faster than the link can copy it: gave up after {seconds} s ({rounds} rounds, vCPUs throttled to {throttle}%, {dirty_mib} MiB still dirty, link {link_mib_s:.0} MiB/s)")]
    NoConvergence {
        seconds: u64,
        rounds: u32,
        throttle: u32,
        dirty_mib: u64,
        link_mib_s: f64,
    },
    #[error("the copy did not finish within {seconds} s (round {rounds}, vCPUs throttled to {throttle}%, {sent_mib} MiB sent at {link_mib_s:.1} MiB/s)")]
    TooSlow {
        seconds: u64,
        rounds: u32,
        throttle: u32,
        sent_mib: u64,
        link_mib_s: f64,
    },
    #[error(transparent)]
    Lifecycle(#[from] crate::lifecycle::LifecycleError),
    #[error("KVM dirty log: {0}")]
    DirtyLog(String),
    #[error("cannot read guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("guest memory differs after the copy: source CRC {source_crc:#010x}, destination {destination:#010x}")]
    MemoryMismatch { source_crc: u32, destination: u32 },
    #[error("incoming migration: {0}")]
    Incoming(String),
    #[error("cannot build the VM: {0}")]
    Vm(Box<crate::vm::VmError>),
}

impl From<crate::vm::VmError> for MigrationError {
    fn from(e: crate::vm::VmError) -> Self {
        MigrationError::Vm(Box::new(e))
    }
}

/// CRC-32 of all guest RAM, region after region.
pub fn memory_crc(memory: &crate::memory::GuestRam) -> Result<u32, MigrationError> {
    let mut crc = crc32fast::Hasher::new();
    crate::memory::for_each_chunk(memory, 1 << 20, |_, chunk| {
        crc.update(chunk);
        Ok::<(), MigrationError>(())
    })?;
    Ok(crc.finalize())
}
