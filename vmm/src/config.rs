//! What a VM is made of, as given by the user, validated before anything is built.

pub use crate::devices::rate_limiter::RateLimit;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the kernel image comes from.
#[derive(Clone, Debug)]
pub enum KernelSource {
    File(PathBuf),
    /// An image held in memory (the embedded default guest, test guests).
    Bytes {
        name: String,
        image: std::sync::Arc<[u8]>,
    },
}

impl KernelSource {
    pub fn name(&self) -> String {
        match self {
            KernelSource::File(path) => path.display().to_string(),
            KernelSource::Bytes { name, .. } => name.clone(),
        }
    }
}

/// A virtio-blk disk backed by a host file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// What the guest reads as the disk's serial (GET_ID), at most 20 bytes;
    /// the file name when not given.
    pub id: Option<String>,
    pub rate_limit: RateLimit,
}

/// A virtio-net interface backed by a host TAP device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The TAP device, created if it does not exist.
    pub tap: String,
    /// The guest's MAC address; a random locally administered one if None.
    pub mac: Option<[u8; 6]>,
    /// Applied to each direction (receive and transmit) separately.
    pub rate_limit: RateLimit,
}

/// A virtio-balloon device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct BalloonConfig {
    /// The balloon size asked of the guest at boot.
    pub target_mib: u64,
    /// Let the guest take pages back from the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Let the guest report free pages, which the host then drops.
    pub free_page_reporting: bool,
}

/// A virtio-vsock device and the host side of its sockets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The Unix socket host programs connect to; guest connections to host
    /// port P go to a listener at `<socket>_P`.
    pub socket: PathBuf,
}

/// A VM to boot: the machine, and what this process needs to start it
/// (the kernel's bytes, where KVM is, diagnostics).
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    /// The machine, the one description snapshots and migrations carry
    /// too. Its `cmdline` is the user's here: host and device options are
    /// appended when the VM is built; `kernel` is taken from `kernel`.
    pub machine: MachineConfig,
    /// Append the options this host's KVM needs to the command line.
    pub host_cmdline_options: bool,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Log each vCPU's RIP this often (diagnosing where a guest stalls).
    pub sample_rip_every: Option<std::time::Duration>,
    /// Touch all guest memory at start, so the host commits it up front.
    pub prefault_memory: bool,
}

/// The machine a running VM is, as a snapshot or migration carries it: what
/// a new process needs to rebuild the same VM around its saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// The kernel it booted (for information: a restored VM does not load it).
    pub kernel: String,
    /// The command line the kernel was given, host and device options included.
    pub cmdline: String,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Guest RAM in a sealed memfd mapped shared, which a same-host
    /// migration hands over instead of copying (absent: anonymous memory).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_memory: bool,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub rng: bool,
    pub balloon: Option<BalloonConfig>,
    pub vsock: Option<VsockConfig>,
}

impl MachineConfig {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Each virtio device's id, in the order of their slots: `vda`, `vdb`,
    /// ... for disks, `eth0`, ... for NICs, then `rng`, `vsock`, `balloon`.
    /// Saved device state is keyed by these, so a later release may order
    /// the slots differently and still restore an older snapshot.
    pub fn device_ids(&self) -> Vec<String> {
        let disks = (0..self.disks.len()).map(disk_name);
        let nets = (0..self.nets.len()).map(net_name);
        let others = [
            self.rng.then_some("rng"),
            self.vsock.is_some().then_some("vsock"),
            self.balloon.is_some().then_some("balloon"),
        ];
        disks
            .chain(nets)
            .chain(others.into_iter().flatten().map(String::from))
            .collect()
    }
}

/// The name Linux gives the disk at `index`: vda, vdb, ..., vdz, vdaa, ...
pub fn disk_name(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        suffix.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8(suffix).unwrap_or_default())
}

/// The guest's name for NIC `index` (`eth0`, ...): its device id.
pub fn net_name(index: usize) -> String {
    format!("eth{index}")
}

/// Smallest guest: the kernel is loaded at 1 MiB, and the boot structures
/// live below it.
pub const MIN_MEMORY_MIB: u64 = 2;
/// Command line used for Linux kernels when none is given.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {max}, not {given}")]
    Cpus { given: u64, max: u8 },
    #[error("--memory must be at least {MIN_MEMORY_MIB} MiB, not {0} MiB")]
    MemoryTooSmall(u64),
    #[error("--memory {requested} MiB is more than this host's {host} MiB of RAM")]
    MemoryTooLarge { requested: u64, host: u64 },
}

impl VmConfig {
    pub fn new(kernel: KernelSource) -> Self {
        VmConfig {
            machine: MachineConfig {
                kernel: kernel.name(),
                cmdline: DEFAULT_LINUX_CMDLINE.to_string(),
                cpus: 1,
                memory_mib: 128,
                shared_memory: false,
                disks: Vec::new(),
                nets: Vec::new(),
                rng: false,
                balloon: None,
                vsock: None,
            },
            kernel,
            initrd: None,
            host_cmdline_options: true,
            kvm_device: PathBuf::from("/dev/kvm"),
            sample_rip_every: None,
            prefault_memory: false,
        }
    }

    /// Checks the numbers against what the VMM and this host can give.
    pub fn validate(&self, host_memory_bytes: Option<u64>) -> Result<(), ConfigError> {
        let max = crate::arch::x86_64::mptable::MAX_CPUS;
        let machine = &self.machine;
        if machine.cpus == 0 || machine.cpus > max {
            return Err(ConfigError::Cpus {
                given: u64::from(machine.cpus),
                max,
            });
        }
        if machine.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(machine.memory_mib));
        }
        if let Some(host) = host_memory_bytes {
            let host_mib = host >> 20;
            if machine.memory_mib > host_mib {
                return Err(ConfigError::MemoryTooLarge {
                    requested: machine.memory_mib,
                    host: host_mib,
                });
            }
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.machine.memory_bytes()
    }

    /// A VM to boot `kernel` as `machine` (its command line the user's: the
    /// VMM appends host and device options); process options at defaults.
    pub fn of_machine(kernel: KernelSource, machine: &MachineConfig) -> Self {
        VmConfig {
            machine: MachineConfig {
                kernel: kernel.name(),
                ..machine.clone()
            },
            ..VmConfig::new(kernel)
        }
    }

    /// This VM as a snapshot describes it; `cmdline` is the final one.
    pub fn machine(&self, cmdline: &str) -> MachineConfig {
        MachineConfig {
            kernel: self.kernel.name(),
            cmdline: cmdline.to_string(),
            ..self.machine.clone()
        }
    }
}

/// The longest disk id (virtio-blk's GET_ID answer holds 20 bytes).
pub const MAX_DISK_ID_BYTES: usize = 20;

/// Whether `id` can be a disk's id: 1 to 20 bytes of printable ASCII.
pub fn check_disk_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DISK_ID_BYTES {
        return Err(format!(
            "id '{id}' must be 1 to {MAX_DISK_ID_BYTES} bytes long"
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!("id '{id}' must be printable ASCII"));
    }
    Ok(())
}

/// A MAC address as `02:00:00:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A unicast MAC address written as `02:00:00:00:00:01`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("'{text}' is not a MAC address like 02:00:00:00:00:01");
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| {
            (part.len() == 2)
                .then(|| u8::from_str_radix(part, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
    if mac[0] & 1 != 0 {
        return Err(format!("'{text}' is a multicast address"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_address_reads_back_as_written() {
        let mac = [2, 0, 0xab, 0, 0x10, 1];
        assert_eq!(format_mac(&mac), "02:00:ab:00:10:01");
        assert_eq!(parse_mac(&format_mac(&mac)), Ok(mac));
    }

    #[test]
    fn disk_ids_are_short_printable_ascii() {
        assert!(check_disk_id("data-1").is_ok());
        assert!(check_disk_id(&"x".repeat(20)).is_ok());
        assert!(check_disk_id(&"x".repeat(21)).is_err());
        assert!(check_disk_id("").is_err());
        assert!(check_disk_id("tab\there").is_err());
        assert!(check_disk_id("é").is_err());
    }

    #[test]
    fn device_ids_follow_the_slots_and_name_each_device() {
        let disk = DiskConfig {
            path: "d".into(),
            read_only: false,
            id: None,
            rate_limit: RateLimit::default(),
        };
        let net = NetConfig {
            tap: "t".into(),
            mac: None,
            rate_limit: RateLimit::default(),
        };
        let machine = MachineConfig {
            kernel: "k".into(),
            cmdline: String::new(),
            cpus: 1,
            memory_mib: 64,
            shared_memory: false,
            disks: vec![disk; 28],
            nets: vec![net.clone(), net],
            rng: true,
            balloon: Some(BalloonConfig::default()),
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "v".into(),
            }),
        };
        let ids = machine.device_ids();
        assert_eq!(ids[..2], ["vda", "vdb"]);
        assert_eq!(ids[25..28], ["vdz", "vdaa", "vdab"]);
        assert_eq!(ids[28..], ["eth0", "eth1", "rng", "vsock", "balloon"]);
    }

    #[test]
    fn rejects_zero_and_oversized_resources() {
        let mut config = VmConfig::new(KernelSource::File("k".into()));
        assert_eq!(config.validate(Some(1 << 30)), Ok(()));
        config.machine.cpus = 0;
        assert!(matches!(
            config.validate(None),
            Err(ConfigError::Cpus { given: 0, .. })
        ));
        config.machine.cpus = 1;
        config.machine.memory_mib = 0;
        assert_eq!(config.validate(None), Err(ConfigError::MemoryTooSmall(0)));
        config.machine.memory_mib = 2048;
        assert_eq!(
            config.validate(Some(1 << 30)),
            Err(ConfigError::MemoryTooLarge {
                requested: 2048,
                host: 1024
            })
        );
    }
}
