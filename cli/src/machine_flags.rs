//! The machine flags `bulkhead run` and `bulkhead vm create` share: a
//! shorthand for the VM spec, parsed in one place into the one machine
//! description (`vmm::config::VmSpec`).

use clap::Args;
use std::path::PathBuf;
use vmm::config::{BalloonConfig, ConfigError, DiskSpec, NicSpec, VmSpec, VsockSpec};

#[derive(Args, Clone, Debug, Default)]
pub struct MachineFlags {
    /// Kernel image: an ELF vmlinux (its PVH entry is used when present) or
    /// a bzImage; the embedded guest when absent.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default for --kernel: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u64,
    /// Guest RAM in a sealed memfd mapped shared: a same-host migration
    /// (`ctl migrate unix:PATH`) hands it to the destination instead of
    /// copying it, for a live update of the VMM with the guest stopped only
    /// while its device and vCPU state crosses over.
    #[arg(long)]
    pub shared_memory: bool,
    /// A virtio-blk disk:
    /// path=FILE[,readonly][,id=NAME][,bps=N][,iops=N][,bps_burst=N][,iops_burst=N].
    /// Repeat for more; the guest sees them as vda, vdb, ... in this order.
    #[arg(long, value_name = "OPTIONS", value_parser = crate::device_options::parse_disk)]
    pub disk: Vec<DiskSpec>,
    /// A virtio-net interface on a host TAP device (created if missing):
    /// tap=NAME[,mac=MAC][,bps=N][,iops=N][,bps_burst=N][,iops_burst=N].
    /// Repeat for more; the guest sees eth0, eth1, ...
    #[arg(long, value_name = "OPTIONS", value_parser = crate::device_options::parse_net)]
    pub net: Vec<NicSpec>,
    /// A virtio-balloon device:
    /// [target_mib=N][,deflate_on_oom][,free_page_reporting].
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "",
          value_parser = crate::device_options::parse_balloon)]
    pub balloon: Option<BalloonConfig>,
    /// A virtio-vsock device: cid=N[,socket=PATH]. Host programs connect to
    /// PATH (`bulkhead run`: vsock.sock in the current directory when
    /// absent; the daemon places it itself) and send `CONNECT <port>`; guest
    /// connections to host port P go to a listener at PATH_P.
    #[arg(long, value_name = "OPTIONS", value_parser = crate::device_options::parse_vsock)]
    pub vsock: Option<VsockSpec>,
    /// A virtio-rng entropy device fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,
}

impl MachineFlags {
    /// The machine these flags describe, named `name`.
    pub fn spec(&self, name: &str) -> Result<VmSpec, ConfigError> {
        let cpus = u8::try_from(self.cpus).map_err(|_| ConfigError::Cpus {
            given: self.cpus,
            max: vmm::arch::x86_64::mptable::MAX_CPUS,
        })?;
        Ok(VmSpec {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus,
            memory_mib: self.memory,
            shared_memory: self.shared_memory,
            disks: self.disk.clone(),
            nics: self.net.clone(),
            vsock: self.vsock.clone(),
            rng: self.rng,
            balloon: self.balloon.clone(),
            ..VmSpec::named(name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        machine: MachineFlags,
    }

    fn spec(args: &[&str]) -> Result<VmSpec, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap();
        cli.machine.spec("m")
    }

    #[test]
    fn every_flag_lands_in_its_field_of_the_spec() {
        let spec = spec(&[
            "--kernel=/k",
            "--initrd=/i",
            "--cmdline=quiet",
            "--cpus=3",
            "--memory=96",
            "--shared-memory",
            "--disk=path=/d,ro",
            "--net=tap=t0",
            "--balloon=target_mib=4",
            "--vsock=cid=9",
            "--rng",
        ])
        .unwrap();
        assert_eq!(spec.name, "m");
        assert_eq!(spec.kernel, Some("/k".into()));
        assert_eq!(spec.initrd, Some("/i".into()));
        assert_eq!(spec.cmdline.as_deref(), Some("quiet"));
        assert_eq!((spec.cpus, spec.memory_mib), (3, 96));
        assert!(spec.shared_memory && spec.rng);
        assert!(spec.disks[0].readonly);
        assert_eq!(spec.nics[0].tap, "t0");
        assert_eq!(spec.balloon.unwrap().target_mib, 4);
        assert_eq!(spec.vsock.unwrap().cid, 9);
    }

    #[test]
    fn defaults_are_the_specs_and_too_many_cpus_are_refused() {
        assert_eq!(spec(&[]).unwrap(), VmSpec::named("m"));
        assert!(matches!(
            spec(&["--cpus=256"]),
            Err(ConfigError::Cpus { given: 256, .. })
        ));
    }
}
