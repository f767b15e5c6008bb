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
            // from_str_radix alone would take a sign ("+1").
            (part.len() == 2 && part.bytes().all(|b| b.is_ascii_hexdigit()))
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
    fn a_kernel_source_names_its_file_or_its_image() {
        let file = KernelSource::File("/images/vmlinux".into());
        assert_eq!(file.path(), Some(PathBuf::from("/images/vmlinux")));
        assert_eq!(file.name(), "/images/vmlinux");
        let bytes = KernelSource::Bytes {
            name: "embedded guest".into(),
            image: std::sync::Arc::from(&b"elf"[..]),
        };
        assert_eq!(bytes.path(), None);
        assert_eq!(bytes.name(), "embedded guest");
    }

    /// An unlimited device's `rate_limit` is left out of the JSON; a
    /// limited one's is written.
    #[test]
    fn only_a_set_rate_limit_is_written() {
        let mut disk = DiskSpec {
            path: "/d".into(),
            ..Default::default()
        };
        let mut nic = NicSpec {
            tap: "t0".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&disk).unwrap(),
            serde_json::json!({"path": "/d", "readonly": false})
        );
        assert_eq!(
            serde_json::to_value(&nic).unwrap(),
            serde_json::json!({"tap": "t0"})
        );
        let limit = RateLimit {
            ops_per_sec: Some(5),
            ..Default::default()
        };
        disk.rate_limit = limit;
        nic.rate_limit = limit;
        assert_eq!(
            serde_json::to_value(&disk).unwrap()["rate_limit"],
            serde_json::json!({"ops_per_sec": 5})
        );
        assert_eq!(
            serde_json::to_value(&nic).unwrap()["rate_limit"],
            serde_json::json!({"ops_per_sec": 5})
        );
    }

    #[test]
    fn the_vsock_socket_is_the_one_given_or_vsock_sock() {
        let mut vsock = VsockSpec {
            cid: 3,
            socket: None,
        };
        assert_eq!(vsock.socket_path(), PathBuf::from("vsock.sock"));
        vsock.socket = Some("/run/v.sock".into());
        assert_eq!(vsock.socket_path(), PathBuf::from("/run/v.sock"));
    }

    #[test]
    fn a_spec_given_only_a_name_has_every_default() {
        let spec: VmSpec = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert_eq!((spec.cpus, spec.memory_mib), (1, 128));
        assert_eq!(spec, VmSpec::named("a"));
        assert_eq!(spec.memory_bytes(), 128 << 20);
        assert!(spec.device_ids().is_empty());
        assert_eq!(spec.kernel_cmdline(), DEFAULT_LINUX_CMDLINE);
        assert_eq!(DEFAULT_LINUX_CMDLINE, "console=ttyS0 reboot=k panic=-1");
    }

    #[test]
    fn options_are_appended_to_the_cmdline_with_one_space() {
        let appended = |cmdline: Option<&str>, options: &str| {
            let mut spec = VmSpec {
                cmdline: cmdline.map(String::from),
                ..VmSpec::named("a")
            };
            spec.add_to_cmdline(options);
            spec.cmdline.unwrap()
        };
        assert_eq!(
            appended(None, "pci=off"),
            "console=ttyS0 reboot=k panic=-1 pci=off"
        );
        assert_eq!(appended(Some("quiet"), "pci=off"), "quiet pci=off");
        assert_eq!(appended(Some("quiet"), " pci=off"), "quiet pci=off");
        assert_eq!(appended(Some("quiet"), ""), "quiet");
        assert_eq!(appended(Some(""), "pci=off"), "pci=off");
        assert_eq!(appended(Some(""), ""), "");
        let spec = VmSpec {
            cmdline: Some("root=/dev/vda".into()),
            ..VmSpec::named("a")
        };
        assert_eq!(spec.kernel_cmdline(), "root=/dev/vda");
    }

    #[test]
    fn disks_past_the_alphabet_take_more_letters() {
        assert_eq!(disk_name(0), "vda");
        assert_eq!(disk_name(25), "vdz");
        assert_eq!(disk_name(26), "vdaa");
        assert_eq!(disk_name(51), "vdaz");
        assert_eq!(disk_name(52), "vdba");
        assert_eq!(disk_name(701), "vdzz");
        assert_eq!(disk_name(702), "vdaaa");
        assert_eq!(net_name(0), "eth0");
        assert_eq!(net_name(11), "eth11");
    }

    #[test]
    fn cpus_are_1_to_max_cpus_inclusive() {
        let max = crate::arch::x86_64::mptable::MAX_CPUS;
        let mut config = VmConfig::new(KernelSource::File("k".into()));
        for cpus in [1, max] {
            config.machine.cpus = cpus;
            assert_eq!(config.validate(None), Ok(()), "{cpus}");
        }
        for cpus in [0, max + 1, u8::MAX] {
            config.machine.cpus = cpus;
            assert_eq!(
                config.validate(None),
                Err(ConfigError::Cpus {
                    given: u64::from(cpus),
                    max
                })
            );
        }
    }

    #[test]
    fn memory_is_at_least_the_minimum_and_at_most_the_hosts() {
        let mut config = VmConfig::new(KernelSource::File("k".into()));
        config.machine.memory_mib = MIN_MEMORY_MIB;
        assert_eq!(config.validate(None), Ok(()));
        assert_eq!(config.memory_bytes(), MIN_MEMORY_MIB << 20);
        config.machine.memory_mib = MIN_MEMORY_MIB - 1;
        assert_eq!(
            config.validate(None),
            Err(ConfigError::MemoryTooSmall(MIN_MEMORY_MIB - 1))
        );
        // All of the host's memory, counted in whole MiB, and no more.
        let host = (1 << 30) + 5;
        config.machine.memory_mib = 1024;
        assert_eq!(config.validate(Some(host)), Ok(()));
        config.machine.memory_mib = 1025;
        assert_eq!(
            config.validate(Some(host)),
            Err(ConfigError::MemoryTooLarge {
                requested: 1025,
                host: 1024
            })
        );
        // No host figure: no upper bound here.
        assert_eq!(config.validate(None), Ok(()));
    }

    #[test]
    fn a_config_of_a_machine_keeps_the_machine_and_takes_the_kernel_given() {
        let machine = VmSpec {
            kernel: Some("/old/vmlinux".into()),
            cpus: 3,
            rng: true,
            ..VmSpec::named("web")
        };
        let config = VmConfig::of_machine(KernelSource::File("/new/vmlinux".into()), &machine);
        assert_eq!(
            config.machine,
            VmSpec {
                kernel: Some("/new/vmlinux".into()),
                ..machine.clone()
            }
        );
        assert_eq!(config.kernel.path(), Some("/new/vmlinux".into()));
        assert!(config.host_cmdline_options);
        assert_eq!(config.kvm_device, PathBuf::from("/dev/kvm"));
        let embedded = VmConfig::of_machine(
            KernelSource::Bytes {
                name: "embedded guest".into(),
                image: std::sync::Arc::from(&b"elf"[..]),
            },
            &machine,
        );
        assert_eq!(embedded.machine.kernel, None);
    }

    #[test]
    fn a_disk_id_may_hold_spaces_but_no_control_characters() {
        assert_eq!(check_disk_id("data 1"), Ok(()));
        assert_eq!(check_disk_id("~!"), Ok(()));
        assert_eq!(
            check_disk_id(&"x".repeat(21)),
            Err(format!(
                "id '{}' must be 1 to 20 bytes long",
                "x".repeat(21)
            ))
        );
        assert_eq!(
            check_disk_id("a\nb"),
            Err("id 'a\nb' must be printable ASCII".into())
        );
        assert_eq!(
            check_disk_id("\x7f"),
            Err("id '\x7f' must be printable ASCII".into())
        );
    }

    #[test]
    fn a_mac_address_is_six_two_digit_hex_bytes() {
        assert_eq!(
            parse_mac("02:AB:cd:00:00:ff"),
            Ok([2, 0xab, 0xcd, 0, 0, 0xff])
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:00:00:00:00:001",
            "02:00:00:00:00:1",
            "02:00:00:00:00:0g",
            "02-00-00-00-00-01",
            "02:00:00:00:00:+1",
        ] {
            assert_eq!(
                parse_mac(bad),
                Err(format!(
                    "'{bad}' is not a MAC address like 02:00:00:00:00:01"
                ))
            );
        }
    }

    #[test]
    fn a_multicast_mac_is_refused() {
        for multicast in [
            "01:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "03:00:00:00:00:01",
        ] {
            assert_eq!(
                parse_mac(multicast),
                Err(format!("'{multicast}' is a multicast address"))
            );
        }
        assert_eq!(parse_mac("00:00:00:00:00:00"), Ok([0; 6]));
        assert_eq!(parse_mac("fe:00:00:00:00:01"), Ok([0xfe, 0, 0, 0, 0, 1]));
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
