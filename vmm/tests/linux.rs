//! Real Linux kernels under the VMM: the project's guest kernel and Debian's
//! stock cloud kernel (images from `cargo xtask images`).
//!
//! On kvm_pvm hosts guest user space cannot make system calls, so the proof
//! is the kernel's own: it brings up every CPU, runs every initcall, starts
//! the syscall-free /init and stays up (docs/host-kvm.md).

mod common;

use std::time::Duration;

use common::run_until;
use testkit::image;
use vmm::config::{BalloonConfig, DiskSpec};
use vmm::{KernelSource, VmConfig, VmExit};

const REACHED_INIT: &str = "Run /init as init process";
/// Boots are minutes of emulated kernel code on kvm_pvm hosts.
const BOOT_LIMIT: Duration = Duration::from_secs(900);

fn linux_config(kernel: std::path::PathBuf, cpus: u8) -> VmConfig {
    let mut config = VmConfig::new(KernelSource::File(kernel));
    config.machine.cpus = cpus;
    config.machine.memory_mib = 256;
    config
}

/// Boots `kernel` with the syscall-free initramfs on 2 vCPUs and checks
/// that it brings up both, reaches /init and stays up 5 s more (the init
/// loops forever), with no panic.
fn boots_to_init_on_two_cpus(kernel: &str, memory_mib: u64, limit: Duration) {
    let (kernel, initrd) = (image(kernel), image("initramfs.cpio.gz"));
    let mut config = linux_config(kernel, 2);
    config.machine.initrd = Some(initrd);
    config.machine.memory_mib = memory_mib;
    let (outcome, reached) = run_until(
        &config,
        limit,
        |out| out.contains(REACHED_INIT),
        Duration::from_secs(5),
    );
    let output = &outcome.output;
    let final_rips: Vec<String> = outcome
        .report
        .vcpus
        .iter()
        .map(|vcpu| format!("vCPU {} at {:#x?}", vcpu.id, vcpu.final_rip))
        .collect();
    assert!(
        reached,
        "no '{REACHED_INIT}'; exit: {}; {}; console:\n{output}",
        outcome.report.exit,
        final_rips.join(", ")
    );
    assert!(
        output.contains("smp: Brought up 1 node, 2 CPUs"),
        "{output}"
    );
    assert!(!output.contains("Kernel panic"), "{output}");
    assert_eq!(outcome.report.exit, VmExit::Stopped, "{output}");
    for vcpu in &outcome.report.vcpus {
        assert!(vcpu.in_kvm_ns > 0, "vCPU {} never ran", vcpu.id);
    }
    eprintln!("{}", serde_json::to_string(&outcome.report).unwrap());
}

#[test]
fn project_kernel_brings_up_two_cpus_and_runs_init() {
    boots_to_init_on_two_cpus("vmlinux", 256, BOOT_LIMIT);
}

/// Debian's stock cloud kernel, unmodified and with no command-line help
/// beyond what the VMM adds for this host: it finds its CPUs through ACPI
/// (it has no MP-table parser) and reaches /init.
#[test]
fn stock_cloud_kernel_brings_up_two_cpus_and_runs_init() {
    boots_to_init_on_two_cpus("cloud-vmlinux", 512, Duration::from_secs(2400));
}

/// A read-only virtio-blk root with a missing init: Linux's own virtio_blk
/// driver reports the disk read-only (the kernel falls back to a read-only
/// mount although `rw` was asked for), and the panic that follows ends the VM
/// non-zero through pvpanic. The disk file is left untouched.
///
/// The same boot proves free-page reporting: guest memory is committed up
/// front, the balloon driver reports the free pages while the kernel waits
/// for its root (`rootdelay`), and the host drops them.
#[test]
fn read_only_root_is_mounted_read_only_and_a_missing_init_panics_through_pvpanic() {
    let (kernel, rootfs) = (image("vmlinux"), image("rootfs.ext4"));
    let dir = testkit::TempDir::new("ro-root");
    let disk = dir.path().join("root.ext4");
    std::fs::copy(&rootfs, &disk).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let mut config = linux_config(kernel, 1);
    config
        .machine
        .add_to_cmdline(" root=/dev/vda rw rootfstype=ext4 init=/missing rootdelay=5");
    config.machine.disks.push(DiskSpec {
        path: disk.clone(),
        readonly: true,
        id: None,
        rate_limit: Default::default(),
    });
    config.prefault_memory = true;
    config.machine.balloon = Some(BalloonConfig {
        free_page_reporting: true,
        ..Default::default()
    });
    let (outcome, _) = run_until(&config, BOOT_LIMIT, |_| false, Duration::ZERO);
    let output = &outcome.output;
    assert_eq!(
        outcome.report.exit,
        VmExit::GuestPanic,
        "console:\n{output}"
    );
    assert!(
        output.contains("VFS: Mounted root (ext4 filesystem) readonly on device 254:0"),
        "{output}"
    );
    assert!(
        output.contains("Kernel panic") && output.contains("Requested init /missing failed"),
        "{output}"
    );
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the read-only disk changed"
    );

    let balloon = outcome
        .report
        .devices
        .iter()
        .find(|d| d.name == "balloon")
        .expect("a balloon");
    let reported_mib = balloon.counters["reported_bytes"] >> 20;
    let guest_mib = config.machine.memory_mib;
    let resident_mib = outcome.report.memory.guest_resident_kib >> 10;
    assert!(
        reported_mib >= guest_mib / 2 && resident_mib <= guest_mib / 2,
        "{reported_mib} MiB reported free, {resident_mib} of {guest_mib} MiB still resident"
    );
}

/// The bzImage boot path (linux-loader's bzImage loader, the 64-bit entry
/// 0x200 past the protected-mode code): the kernel's own decompressor runs
/// and hands over to the kernel, which prints its first message.
#[test]
fn project_bzimage_decompresses_and_starts_the_kernel() {
    let kernel = image("bzImage");
    let mut config = linux_config(kernel, 1);
    // The decompressor writes to the serial port only with earlyprintk.
    config.machine.add_to_cmdline(" earlyprintk=serial,ttyS0");
    let (outcome, reached) = run_until(
        &config,
        BOOT_LIMIT,
        |out| out.contains("Linux version"),
        Duration::ZERO,
    );
    let output = &outcome.output;
    assert!(reached, "exit: {}; console:\n{output}", outcome.report.exit);
    assert!(
        output.contains("Decompressing Linux... Parsing ELF... done."),
        "{output}"
    );
}

// Guest user space (busybox) is tested in the hardware-KVM lane:
// cli/tests/hwkvm/ (`cargo xtask hwkvm`).
