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
    /// The file, for a machine to record (None: an image in memory).
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            KernelSource::File(path) => Some(path.clone()),
            KernelSource::Bytes { .. } => None,
        }
    }

    pub fn name(&self) -> String {
        match self {
            KernelSource::File(path) => path.display().to_string(),
            KernelSource::Bytes { name, .. } => name.clone(),
        }
    }
}

/// A virtio-blk disk backed by a host file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// A raw disk image.
    #[cfg_attr(feature = "schema", schema(value_type = String))]
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// What the guest reads as the disk's serial (virtio-blk GET_ID): 1 to
    /// 20 bytes of printable ASCII; the file's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(example = "data-1"))]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "is_unlimited")]
    pub rate_limit: RateLimit,
}

/// A virtio-net interface backed by a host TAP device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The host TAP device (created if missing), up to 15 characters.
    #[cfg_attr(feature = "schema", schema(example = "tap-web1"))]
    pub tap: String,
    /// A unicast MAC address; random when absent (and then kept: a
    /// snapshot or migration carries the one the guest was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(example = "02:00:00:00:00:01"))]
    pub mac: Option<String>,
    /// Applied to each direction (receive and transmit) separately.
    #[serde(default, skip_serializing_if = "is_unlimited")]
    pub rate_limit: RateLimit,
}

fn is_unlimited(limit: &RateLimit) -> bool {
    *limit == RateLimit::default()
}

/// A virtio-vsock device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// The guest's context id (3 or more).
    #[cfg_attr(feature = "schema", schema(minimum = 3))]
    pub cid: u32,
    /// The Unix socket host programs connect to; guest connections to host
    /// port P go to a listener at `<socket>_P`. Only `bulkhead run` takes
    /// one: the daemon refuses it and places the socket in the VM's
    /// directory (`vsock.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(value_type = Option<String>))]
    pub socket: Option<PathBuf>,
}

impl VsockSpec {
    /// Where the VMM binds the host side (relative to its directory when
    /// none was given).
    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| "vsock.sock".into())
    }
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

/// A VM to boot: the machine, and what this process needs to start it
/// (the kernel's bytes, where KVM is, diagnostics).
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: KernelSource,
    /// The machine, the one description snapshots and migrations carry
    /// too. Its `cmdline` is the user's: host and device options are
    /// appended when the VM is built; `kernel` is taken from `kernel`.
    pub machine: VmSpec,
    /// Append the options this host's KVM needs to the command line.
    pub host_cmdline_options: bool,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Log each vCPU's RIP this often (diagnosing where a guest stalls).
    pub sample_rip_every: Option<std::time::Duration>,
    /// Touch all guest memory at start, so the host commits it up front.
    pub prefault_memory: bool,
}

/// A VM definition: the one description of a machine that the API, the
/// daemon's store, `bulkhead run --config FILE` (and its flags, which build
/// the same value), snapshots and migrations all carry. Paths are host paths
/// inside the daemon's allowed storage directories, which the daemon opens
/// for the VMM; with no kernel, the VM boots Bulkhead's embedded guest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique within the project: lower-case letters, digits and '-', 1 to 63.
    #[cfg_attr(
        feature = "schema",
        schema(example = "web-1", pattern = "^[a-z0-9][a-z0-9-]{0,62}$")
    )]
    pub name: String,
    /// An ELF vmlinux or bzImage; the embedded guest when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schema(value_type = Option<String>, example = "/var/lib/bulkhead/images/vmlinux")
    )]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(value_type = Option<String>))]
    pub initrd: Option<PathBuf>,
    /// The kernel's command line (the VMM appends the options its devices
    /// and this host's KVM need); `console=ttyS0 reboot=k panic=-1` for a
    /// Linux kernel when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(example = "console=ttyS0 root=/dev/vda"))]
    pub cmdline: Option<String>,
    #[serde(default = "default_cpus")]
    #[cfg_attr(feature = "schema", schema(minimum = 1, maximum = 128, default = 1))]
    pub cpus: u8,
    #[serde(default = "default_memory_mib")]
    #[cfg_attr(
        feature = "schema",
        schema(minimum = 16, maximum = 1048576, default = 128)
    )]
    pub memory_mib: u64,
    /// Guest RAM in a sealed memfd mapped shared (as Cloud Hypervisor's
    /// `shared=on`): a same-host migration hands it over instead of copying it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_memory: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSpec>,
    /// A virtio-rng entropy device (the guest's hwrng, fed from the host's getrandom).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rng: bool,
    /// A virtio-balloon device: the host can ask the guest for memory back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
}

fn default_cpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    128
}

impl VmSpec {
    /// The command line to boot with, before the VMM appends its options.
    pub fn kernel_cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_LINUX_CMDLINE)
    }

    /// Appends `options` to the command line (the default one if none was given).
    pub fn add_to_cmdline(&mut self, options: &str) {
        let mut cmdline = self.kernel_cmdline().to_string();
        if !cmdline.is_empty() && !options.is_empty() && !options.starts_with(' ') {
            cmdline.push(' ');
        }
        cmdline.push_str(options);
        self.cmdline = Some(cmdline);
    }

    /// A machine named `name` with every default: one vCPU, 128 MiB, the
    /// embedded guest, no devices.
    pub fn named(name: &str) -> VmSpec {
        VmSpec {
            name: name.to_string(),
            kernel: None,
            initrd: None,
            cmdline: None,
            cpus: default_cpus(),
            memory_mib: default_memory_mib(),
            shared_memory: false,
            disks: Vec::new(),
            nics: Vec::new(),
            vsock: None,
            rng: false,
            balloon: None,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Each virtio device's id, in the order of their slots: `vda`, `vdb`,
    /// ... for disks, `eth0`, ... for NICs, then `rng`, `vsock`, `balloon`.
    /// Saved device state is keyed by these, so a later release may order
    /// the slots differently and still restore an older snapshot.
    pub fn device_ids(&self) -> Vec<String> {
        let disks = (0..self.disks.len()).map(disk_name);
        let nets = (0..self.nics.len()).map(net_name);
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
            machine: VmSpec {
                kernel: kernel.path(),
                ..VmSpec::named("run")
            },
            kernel,
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
    pub fn of_machine(kernel: KernelSource, machine: &VmSpec) -> Self {
        VmConfig {
            machine: VmSpec {
                kernel: kernel.path(),
                ..machine.clone()
            },
            ..VmConfig::new(kernel)
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
        let disk = DiskSpec {
            path: "d".into(),
            ..Default::default()
        };
        let nic = NicSpec {
            tap: "t".into(),
            ..Default::default()
        };
        let machine = VmSpec {
            disks: vec![disk; 28],
            nics: vec![nic.clone(), nic],
            rng: true,
            balloon: Some(BalloonConfig::default()),
            vsock: Some(VsockSpec {
                cid: 3,
                socket: None,
            }),
            ..VmSpec::named("m")
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
