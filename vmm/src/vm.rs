//! Building a VM from its configuration and running its vCPUs.

use crate::arch::x86_64::layout::{
    self, ports, PCI_MMIO_SIZE, PCI_MMIO_START, PVPANIC_BAR_ADDRESS,
};
use crate::arch::x86_64::{acpi, boot, cpu, mptable, paging};
use crate::backing::DeviceBackings;
use crate::config::{ConfigError, KernelSource, VmConfig, VmSpec};
use crate::devices::event_loop::{DeviceEventLoop, Subscriber};
use crate::devices::legacy::cmos::Cmos;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::post::{monotonic_ns, PostCodes, PostPort};
use crate::devices::legacy::power::{Pm1, SciLine, PM1_BLOCK_LEN};
use crate::devices::legacy::serial::{SerialOutput, SerialPort};
use crate::devices::pci::{pvpanic::PvPanic, HostBridge, PciConfigPorts, PciMmioWindow, PciRoot};
use crate::devices::virtio::balloon::BalloonHandle;
use crate::devices::virtio::{self, mmio::MmioTransport, Interrupt, VirtioDevice};
use crate::devices::{lock, Bus, BusError};
use crate::exit::{ExitSignal, VmExit};
use crate::host::KvmFlavour;
use crate::memory::GuestRam;
use crate::pause::PauseGate;
use crate::snapshot::SavedVm;
use crate::vcpu::{Captures, HaltedVcpus, Vcpu, VcpuReport, VcpuShared, VcpuThreads};
use crate::vm_core::{device_reports, kick_signal, Board, RunState, VirtioSlot, VmCore};
pub use crate::vm_core::{DeviceReport, DeviceState};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use std::fs::File;
use std::io::Cursor;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

const KVM_API_VERSION: i32 = 12;
/// Where KVM may put the TSS and identity-map pages it needs for real mode on
/// Intel hosts: just below the IOAPIC, inside the MMIO gap.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {source} (is KVM available, and may this user use it?)")]
    OpenKvm {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("{path} is not a KVM device (KVM_GET_API_VERSION answered {version}, Bulkhead needs {KVM_API_VERSION})")]
    NotKvm { path: String, version: i32 },
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Memory {
        mib: u64,
        source: crate::memory::MemoryError,
    },
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path}: {source}")]
    Kernel {
        path: String,
        source: boot::BootError,
    },
    #[error("cannot open initrd {path}: {source}")]
    InitrdFile {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd {path}: {source}")]
    Initrd {
        path: String,
        source: boot::BootError,
    },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("cannot write boot page tables: {0}")]
    PageTables(vm_memory::GuestMemoryError),
    #[error("device set-up: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot keep a copy of a TAP descriptor: {0}")]
    TapCopy(std::io::Error),
    #[error(transparent)]
    Disk(#[from] virtio::block::BlockError),
    #[error(transparent)]
    Tap(#[from] virtio::net::tap::TapError),
    #[error(transparent)]
    Vsock(#[from] virtio::vsock::VsockError),
    #[error("too many devices: at most {0} virtio devices fit the interrupt lines")]
    TooManyDevices(usize),
    #[error("device event loop: {0}")]
    EventLoop(std::io::Error),
    #[error("the saved state does not fit this VM: {0}")]
    State(String),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Backing(#[from] crate::backing::BackingError),
}

/// Everything on the host a new VM is built on, open before it is built.
pub struct Backings {
    pub kvm: Kvm,
    /// The kernel image; None for a [`KernelSource::Bytes`] kernel.
    pub kernel: Option<File>,
    pub initrd: Option<File>,
    pub devices: DeviceBackings,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A VM whose memory, devices and vCPUs are ready, not yet running.
pub struct Vm {
    _kvm: Kvm,
    vcpus: Vec<Vcpu>,
    pub(crate) core: Arc<VmCore>,
    post: Arc<PostCodes>,
    device_loop: Option<DeviceEventLoop>,
    /// The command line the guest was given, host options included.
    pub cmdline: String,
    pub entry: &'static str,
    pub flavour: KvmFlavour,
}

/// How a restored or migrated-in VM is started (what is not in its state).
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub kvm_device: std::path::PathBuf,
    pub sample_rip_every: Option<Duration>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            kvm_device: "/dev/kvm".into(),
            sample_rip_every: None,
        }
    }
}

/// A KVM VM with memory, interrupt controllers and devices, before vCPUs.
struct Hardware {
    vm_fd: Arc<VmFd>,
    shared: Arc<VcpuShared>,
    board: Board,
    virtio: Vec<VirtioSlot>,
    balloon: Option<BalloonHandle>,
    post: Arc<PostCodes>,
    taps: Vec<std::fs::File>,
    device_loop: Option<DeviceEventLoop>,
    device_kick: Option<EventFd>,
}

impl Hardware {
    /// Creates the KVM VM around `memory` and builds the machine's devices,
    /// put in the `saved` state when there is one.
    fn create(
        kvm: &Kvm,
        machine: &VmSpec,
        backings: DeviceBackings,
        memory: GuestRam,
        serial_output: SerialOutput,
        saved: Option<&SavedVm>,
    ) -> Result<Hardware, VmError> {
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        set_memory_slots(&vm_fd, &memory, false)?;
        // Intel hosts need these before the irqchip; other hosts may refuse them.
        if let Err(e) = vm_fd.set_tss_address(KVM_TSS_ADDRESS) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        if let Err(e) = vm_fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
            tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
        }
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        // No KVM_PIT_SPEAKER_DUMMY: Linux calibrates the TSC against PIT
        // channel 2, gated and read back through port 0x61.
        vm_fd
            .create_pit2(kvm_pit_config::default())
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let vm_fd = Arc::new(vm_fd);

        let taps = backings
            .taps
            .iter()
            .map(|tap| tap.file().try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(VmError::TapCopy)?;
        let (virtio, balloon) = create_virtio_devices(machine, backings, &vm_fd, &memory)?;
        let exit = Arc::new(ExitSignal::new().map_err(VmError::EventFd)?);
        let post = Arc::new(PostCodes::default());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, layout::irq::COM1)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(SerialPort::new(serial_irq, serial_output)));
        let cmos = Arc::new(Mutex::new(Cmos::default()));
        let keyboard_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&keyboard_irq, layout::irq::KEYBOARD)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let keyboard = Arc::new(Mutex::new(I8042::new(exit.clone(), keyboard_irq)));
        let pm1 = Arc::new(Mutex::new(Pm1::new(exit.clone(), sci_line(vm_fd.clone()))));
        let (pio, mut mmio, pci) = platform_buses(&exit, &post, &serial, &cmos, &keyboard, &pm1)?;
        let board = Board {
            serial,
            keyboard,
            cmos,
            pm1,
            pci,
        };
        // Built as at power-on, then each device takes the state saved
        // under its id (before the device thread or a vCPU sees it).
        if let Some(saved) = saved {
            crate::persist::restore_all(&board.components(&virtio), saved.devices.clone())
                .map_err(VmError::State)?;
        }
        let pause = Arc::new(PauseGate::default());
        let mut device_loop = None;
        let mut device_kick = None;
        if !virtio.is_empty() {
            let mut event_loop = DeviceEventLoop::new(exit.clone()).map_err(VmError::EventLoop)?;
            for slot in &virtio {
                mmio.insert(slot.base, virtio::mmio::WINDOW_SIZE, slot.transport.clone())?;
                event_loop.add(slot.transport.clone() as Subscriber);
            }
            device_kick = Some(
                event_loop
                    .watch_pauses(pause.clone())
                    .map_err(VmError::EventLoop)?,
            );
            device_loop = Some(event_loop);
        }
        let msr_indices = kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let shared = Arc::new(VcpuShared {
            vm: vm_fd.clone(),
            memory,
            pio,
            mmio,
            exit,
            pause,
            captures: Captures::new(usize::from(machine.cpus)),
            halted: HaltedVcpus::new(usize::from(machine.cpus)),
            throttle_percent: std::sync::atomic::AtomicU32::new(0),
            live_reports: Default::default(),
            threads: VcpuThreads::default(),
            msr_indices,
        });
        Ok(Hardware {
            vm_fd,
            shared,
            board,
            virtio,
            balloon,
            post,
            taps,
            device_loop,
            device_kick,
        })
    }

    fn into_vm(
        self,
        kvm: Kvm,
        vcpus: Vec<Vcpu>,
        machine: VmSpec,
        cmdline: String,
        entry: &'static str,
        flavour: KvmFlavour,
    ) -> Vm {
        Vm {
            _kvm: kvm,
            vcpus,
            cmdline,
            core: Arc::new(VmCore {
                shared: self.shared,
                board: self.board,
                virtio: self.virtio,
                balloon: self.balloon,
                device_kick: self.device_kick,
                taps: self.taps,
                machine,
                run_state: Mutex::new(RunState::Running),
                migration: Mutex::new(None),
            }),
            post: self.post,
            device_loop: self.device_loop,
            entry,
            flavour,
        }
    }
}

/// Registers guest RAM with KVM, one slot per region; with `log_dirty`, KVM
/// records every page vCPUs write (KVM_GET_DIRTY_LOG).
pub(crate) fn set_memory_slots(
    vm_fd: &VmFd,
    memory: &GuestRam,
    log_dirty: bool,
) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let table = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the
        // VM keeps (in `shared`) for as long as the VM fd exists.
        unsafe { vm_fd.set_user_memory_region(table) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

pub(crate) fn check_machine(machine: &VmSpec) -> Result<(), VmError> {
    let max = crate::arch::x86_64::mptable::MAX_CPUS;
    if machine.cpus == 0 || machine.cpus > max {
        return Err(ConfigError::Cpus {
            given: u64::from(machine.cpus),
            max,
        }
        .into());
    }
    if machine.memory_mib < crate::config::MIN_MEMORY_MIB {
        return Err(ConfigError::MemoryTooSmall(machine.memory_mib).into());
    }
    if let Some(host) = crate::host::total_memory_bytes() {
        if machine.memory_mib > host >> 20 {
            return Err(ConfigError::MemoryTooLarge {
                requested: machine.memory_mib,
                host: host >> 20,
            }
            .into());
        }
    }
    Ok(())
}

impl Vm {
    /// Creates the VM: validates the config, allocates memory, loads the
    /// kernel, writes the boot tables and sets up devices and vCPUs.
    pub fn new(config: &VmConfig, serial_output: SerialOutput) -> Result<Vm, VmError> {
        config.validate(crate::host::total_memory_bytes())?;
        let backings = Backings {
            kvm: open_kvm(&config.kvm_device)?,
            kernel: match &config.kernel {
                KernelSource::File(path) => {
                    Some(File::open(path).map_err(|e| VmError::KernelFile {
                        path: path.display().to_string(),
                        source: e,
                    })?)
                }
                KernelSource::Bytes { .. } => None,
            },
            initrd: match &config.machine.initrd {
                Some(path) => Some(File::open(path).map_err(|source| VmError::InitrdFile {
                    path: path.display().to_string(),
                    source,
                })?),
                None => None,
            },
            devices: DeviceBackings::open(&config.machine)?,
        };
        Vm::build(config, backings, serial_output)
    }

    /// Creates the VM on host resources opened already (by the daemon).
    pub fn build(
        config: &VmConfig,
        backings: Backings,
        serial_output: SerialOutput,
    ) -> Result<Vm, VmError> {
        config.validate(crate::host::total_memory_bytes())?;
        let Backings {
            kvm,
            kernel: kernel_file,
            initrd: initrd_file,
            devices,
        } = backings;
        let flavour = KvmFlavour::detect();
        let memory = crate::memory::allocate(
            &boot::ram_regions(config.memory_bytes()),
            config.machine.shared_memory,
        )
        .map_err(|source| VmError::Memory {
            mib: config.machine.memory_mib,
            source,
        })?;
        if config.prefault_memory {
            prefault(&memory);
        }
        let mut cmdline = config.machine.kernel_cmdline().to_string();
        if config.host_cmdline_options {
            let extra = flavour.guest_cmdline_options();
            if !extra.is_empty() {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(extra);
            }
        }
        let hardware =
            Hardware::create(&kvm, &config.machine, devices, memory, serial_output, None)?;
        for slot in &hardware.virtio {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&slot.cmdline_option());
        }
        let memory = &hardware.shared.memory;
        let kernel = load_kernel(memory, &config.kernel, kernel_file)?;
        let initrd = match initrd_file {
            Some(mut file) => {
                let name = config
                    .machine
                    .initrd
                    .as_ref()
                    .map_or("initrd".into(), |path| path.display().to_string());
                Some(
                    boot::load_initrd(memory, &kernel, &mut file)
                        .map_err(|source| VmError::Initrd { path: name, source })?,
                )
            }
            None => None,
        };
        boot::write_cmdline(memory, &cmdline)?;
        mptable::write(memory, config.machine.cpus)?;
        let mmio_devices: Vec<acpi::MmioDevice> = hardware
            .virtio
            .iter()
            .map(|slot| acpi::MmioDevice {
                base: slot.base,
                irq: slot.irq,
            })
            .collect();
        let acpi_rsdp = acpi::write(memory, config.machine.cpus, &mmio_devices)?;
        boot::write_boot_info(
            memory,
            &kernel,
            config.memory_bytes(),
            cmdline.len() + 1,
            initrd,
            acpi_rsdp,
        )?;
        paging::write_identity_tables(memory).map_err(VmError::PageTables)?;

        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.machine.cpus));
        for id in 0..config.machine.cpus {
            let fd = hardware
                .vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = cpu::cpuid_for(
                &base_cpuid,
                id,
                config.machine.cpus,
                flavour.hidden_kvm_features(),
            );
            cpu::configure_common(&fd, usize::from(id), &cpuid)?;
            if id == 0 {
                cpu::configure_boot_cpu(&fd, memory, kernel.entry)?;
            }
            vcpus.push(Vcpu::new(
                usize::from(id),
                fd,
                flavour == KvmFlavour::Pvm,
                config.sample_rip_every,
            ));
        }
        let machine = config.machine.clone();
        Ok(hardware.into_vm(
            kvm,
            vcpus,
            machine,
            cmdline,
            kernel.entry.describe(),
            flavour,
        ))
    }

    /// Rebuilds a VM from a snapshot read by [`crate::snapshot::read`], its
    /// memory mapped from the snapshot's file.
    ///
    /// The devices' host files are those the snapshot names, opened with
    /// this process's rights (`bulkhead run --restore`); a VMM the daemon
    /// starts restores onto its own machine with [`Vm::restore_onto`].
    pub fn restore(
        snapshot: &crate::snapshot::LoadedSnapshot,
        options: &RestoreOptions,
        serial_output: SerialOutput,
    ) -> Result<Vm, VmError> {
        let machine = &snapshot.saved.machine;
        check_machine(machine)?;
        let memory = snapshot.map_memory(&boot::ram_regions(machine.memory_bytes()))?;
        Vm::from_saved_as_described(&snapshot.saved, memory, options, serial_output, None)
    }

    /// [`Vm::from_saved`] on the machine `saved` describes, its KVM device
    /// and host files opened here with this process's rights.
    /// `handed_taps`: the NICs' TAPs, handed over by a migration source on
    /// this host, instead of opening them by name.
    pub(crate) fn from_saved_as_described(
        saved: &SavedVm,
        memory: GuestRam,
        options: &RestoreOptions,
        serial_output: SerialOutput,
        handed_taps: Option<Vec<std::fs::File>>,
    ) -> Result<Vm, VmError> {
        let machine = &saved.machine;
        let kvm = open_kvm(&options.kvm_device)?;
        let devices = DeviceBackings::open_with_taps(machine, handed_taps)?;
        Vm::from_saved(saved, machine, kvm, devices, memory, options, serial_output)
    }

    /// Rebuilds a VM from a snapshot onto `machine` (this host's record of
    /// it) and its open `devices`: the snapshot gives guest state only.
    pub fn restore_onto(
        snapshot: &crate::snapshot::LoadedSnapshot,
        machine: &VmSpec,
        kvm: Kvm,
        devices: DeviceBackings,
        options: &RestoreOptions,
        serial_output: SerialOutput,
    ) -> Result<Vm, VmError> {
        let saved = &snapshot.saved.machine;
        crate::backing::check_same_shape("the snapshot", saved, machine)?;
        let machine = crate::backing::rebuilt_machine(saved, machine);
        check_machine(&machine)?;
        let memory = snapshot.map_memory(&boot::ram_regions(machine.memory_bytes()))?;
        Vm::from_saved(
            &snapshot.saved,
            &machine,
            kvm,
            devices,
            memory,
            options,
            serial_output,
        )
    }

    /// Builds a VM around guest RAM that already holds a guest, in the
    /// state `saved` describes (a restore or the end of a migration).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_saved(
        saved: &SavedVm,
        machine: &VmSpec,
        kvm: Kvm,
        devices: DeviceBackings,
        memory: GuestRam,
        options: &RestoreOptions,
        serial_output: SerialOutput,
    ) -> Result<Vm, VmError> {
        check_machine(machine)?;
        let expected: Vec<u8> = (0..machine.cpus).collect();
        let saved_ids: Vec<u8> = saved.vcpus.keys().copied().collect();
        if saved_ids != expected {
            return Err(VmError::State(format!(
                "the state has vCPUs {saved_ids:?}, the machine has {} (ids 0 to {})",
                machine.cpus,
                machine.cpus.saturating_sub(1)
            )));
        }
        let flavour = KvmFlavour::detect();
        let hardware =
            Hardware::create(&kvm, machine, devices, memory, serial_output, Some(saved))?;
        let mut vcpus = Vec::with_capacity(saved.vcpus.len());
        for (&id, state) in &saved.vcpus {
            let fd = hardware
                .vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            state
                .restore(&fd)
                .map_err(|e| VmError::State(format!("vCPU {id}: {e}")))?;
            vcpus.push(Vcpu::new(
                usize::from(id),
                fd,
                flavour == KvmFlavour::Pvm,
                options.sample_rip_every,
            ));
        }
        saved
            .vm
            .restore(&hardware.vm_fd)
            .map_err(|e| VmError::State(e.to_string()))?;
        // KVM's saved irqchip does not hold who drives a line: raise the SCI
        // again if an enabled event was pending.
        lock(&hardware.board.pm1).drive_sci();
        // Nor an edge a virtio device raised while it was restored (before
        // any vCPU existed): raise the pending ones again.
        for slot in &hardware.virtio {
            lock(&slot.transport).raise_pending_interrupt();
        }
        let cmdline = machine.kernel_cmdline().to_string();
        Ok(hardware.into_vm(kvm, vcpus, machine.clone(), cmdline, "restored", flavour))
    }

    /// The console UART, for feeding it input.
    pub fn serial(&self) -> Arc<Mutex<SerialPort>> {
        self.core.board.serial.clone()
    }

    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.core.shared.exit.clone()
    }

    /// Starts every thread, each parked before it runs any guest code,
    /// until the VM is resumed (`control().resume()`). A migration's
    /// destination tells its source only once nothing can fail any more,
    /// then resumes: the guest never runs in both places, not for an instant.
    pub fn start_paused(self) -> Result<RunningVm, VmError> {
        self.core.shared.pause.request();
        *crate::devices::lock(&self.core.run_state) = RunState::Paused;
        self.start()
    }

    /// Starts the device thread, then one thread per vCPU.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        install_kick_handler();
        let device_thread = match self.device_loop.take() {
            Some(device_loop) => Some(device_loop.spawn().map_err(VmError::Thread)?),
            None => None,
        };
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            let shared = self.core.shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id))
                .stack_size(256 << 10)
                .spawn(move || vcpu.run(&shared, kick_signal()))
                .map_err(VmError::Thread)?;
            threads.push(thread);
        }
        Ok(RunningVm {
            vm: self,
            threads,
            device_thread,
        })
    }
}

/// Builds the configured virtio devices, each behind a virtio-mmio window
/// with an irqfd for its interrupt and ioeventfds for its queues.
fn create_virtio_devices(
    config: &VmSpec,
    backings: DeviceBackings,
    vm_fd: &VmFd,
    memory: &GuestRam,
) -> Result<(Vec<VirtioSlot>, Option<BalloonHandle>), VmError> {
    let DeviceBackings { disks, taps, vsock } = backings;
    if disks.len() != config.disks.len()
        || taps.len() != config.nics.len()
        || vsock.is_some() != config.vsock.is_some()
    {
        return Err(VmError::State(
            "the devices' host backings do not match the machine".into(),
        ));
    }
    // In the order of `VmSpec::device_ids`, which names each device.
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (index, (disk, file)) in config.disks.iter().zip(disks).enumerate() {
        devices.push(Box::new(virtio::block::Block::new(
            disk,
            file,
            &crate::config::disk_name(index),
        )?));
    }
    for (index, (net, tap)) in config.nics.iter().zip(taps).enumerate() {
        devices.push(Box::new(virtio::net::Net::new(
            net,
            tap,
            &crate::config::net_name(index),
        )?));
    }
    if config.rng {
        devices.push(Box::new(virtio::rng::Rng::new()));
    }
    if let (Some(vsock), Some(listener)) = (&config.vsock, vsock) {
        devices.push(Box::new(virtio::vsock::Vsock::new(vsock, listener)?));
    }
    let mut balloon_handle = None;
    if let Some(balloon_config) = &config.balloon {
        let balloon = virtio::balloon::Balloon::new(balloon_config).map_err(VmError::EventFd)?;
        balloon_handle = Some(balloon.handle());
        devices.push(Box::new(balloon));
    }
    if devices.len() > layout::irq::VIRTIO.len() {
        return Err(VmError::TooManyDevices(layout::irq::VIRTIO.len()));
    }
    let ids = config.device_ids();
    if ids.len() != devices.len() {
        return Err(VmError::State(format!(
            "{} device ids for {} devices",
            ids.len(),
            devices.len()
        )));
    }
    let mut slots = Vec::with_capacity(devices.len());
    for (index, (device, id)) in devices.into_iter().zip(ids).enumerate() {
        if device.name() != id {
            return Err(VmError::State(format!(
                "device {} in the slot of {id}",
                device.name()
            )));
        }
        let base = layout::VIRTIO_MMIO_START + index as u64 * virtio::mmio::WINDOW_SIZE;
        let irq = layout::irq::VIRTIO[index];
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&irqfd, irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let name = device.name();
        let transport = MmioTransport::new(device, memory.clone(), Interrupt::new(irqfd))
            .map_err(VmError::EventFd)?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(base + virtio::mmio::QUEUE_NOTIFY_OFFSET);
            // Without an ioeventfd the notify write exits to the VMM, and the
            // transport signals the queue itself: slower, still correct.
            if let Err(e) = vm_fd.register_ioevent(event, &notify, queue as u32) {
                tracing::warn!(
                    device = name,
                    queue,
                    "no ioeventfd for queue notifications: {e}"
                );
            }
        }
        slots.push(VirtioSlot {
            id,
            base,
            irq,
            transport: Arc::new(Mutex::new(transport)),
        });
    }
    Ok((slots, balloon_handle))
}

/// Makes the host commit every guest page now rather than on first touch.
fn prefault(memory: &GuestRam) {
    const MADV_POPULATE_WRITE: i32 = 23;
    for region in memory.iter() {
        let (start, len) = (region.as_ptr(), region.len() as usize);
        // SAFETY: the range is one live anonymous mapping owned by `memory`;
        // populating it only allocates its pages.
        if unsafe { libc::madvise(start.cast(), len, MADV_POPULATE_WRITE) } == 0 {
            continue;
        }
        // Kernels before 5.14: touch one byte per page.
        for offset in (0..len).step_by(4096) {
            // SAFETY: `offset` is inside the mapping; guest memory is plain bytes.
            unsafe { std::ptr::write_volatile(start.add(offset), 0) };
        }
    }
}

/// The KVM device passed as a descriptor (by the daemon).
pub fn kvm_from_descriptor(fd: std::os::fd::OwnedFd) -> Result<Kvm, VmError> {
    use std::os::fd::IntoRawFd;
    let name = "the KVM descriptor".to_string();
    // KVM_GET_API_VERSION on anything but /dev/kvm fails or answers otherwise.
    // SAFETY: `fd` is owned by us; Kvm takes it over, and a file that is not
    // KVM only ever sees the API-version ioctl before it is refused.
    let kvm = unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(fd.into_raw_fd()) };
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        version => Err(VmError::NotKvm {
            path: name,
            version,
        }),
    }
}

pub fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    let name = path.display().to_string();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::OpenKvm {
            path: name.clone(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        }
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| VmError::OpenKvm {
        path: name.clone(),
        source,
    })?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        version => Err(VmError::NotKvm {
            path: name,
            version,
        }),
    }
}

fn load_kernel(
    memory: &GuestRam,
    source: &KernelSource,
    file: Option<File>,
) -> Result<boot::LoadedKernel, VmError> {
    let path = source.name();
    let result = match (source, file) {
        (_, Some(mut image)) => boot::load_kernel(memory, &mut image),
        (KernelSource::Bytes { image, .. }, None) => {
            boot::load_kernel(memory, &mut Cursor::new(&image[..]))
        }
        (KernelSource::File(_), None) => {
            return Err(VmError::KernelFile {
                path,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }
    };
    result.map_err(|source| VmError::Kernel { path, source })
}

/// The port and MMIO buses of the PC platform Bulkhead emulates.
fn platform_buses(
    exit: &Arc<ExitSignal>,
    post: &Arc<PostCodes>,
    serial: &Arc<Mutex<SerialPort>>,
    cmos: &Arc<Mutex<Cmos>>,
    keyboard: &Arc<Mutex<I8042>>,
    pm1: &Arc<Mutex<Pm1>>,
) -> Result<(Bus, Bus, Arc<Mutex<PciRoot>>), VmError> {
    let mut pio = Bus::default();
    pio.insert(u64::from(ports::COM1), 8, serial.clone())?;
    pio.insert(u64::from(ports::I8042_DATA), 5, keyboard.clone())?;
    pio.insert(
        u64::from(ports::POST_CODE),
        1,
        Arc::new(Mutex::new(PostPort(post.clone()))),
    )?;
    pio.insert(u64::from(ports::PM1A_EVENT), PM1_BLOCK_LEN, pm1.clone())?;
    pio.insert(u64::from(ports::CMOS), 2, cmos.clone())?;

    let mut root = PciRoot::default();
    root.add(0, Box::new(HostBridge::new()));
    root.add(
        1,
        Box::new(PvPanic::new(PVPANIC_BAR_ADDRESS as u32, exit.clone())),
    );
    let root = Arc::new(Mutex::new(root));
    pio.insert(
        u64::from(ports::PCI_CONFIG_ADDRESS),
        8,
        Arc::new(Mutex::new(PciConfigPorts(root.clone()))),
    )?;
    let mut mmio = Bus::default();
    let window = PciMmioWindow {
        root: root.clone(),
        window_start: PCI_MMIO_START,
    };
    mmio.insert(PCI_MMIO_START, PCI_MMIO_SIZE, Arc::new(Mutex::new(window)))?;
    Ok((pio, mmio, root))
}

/// The SCI as KVM sees it: a level on its GSI (the PIC's IRQ 9 and the
/// IOAPIC's pin 9, identity-routed).
fn sci_line(vm_fd: Arc<VmFd>) -> SciLine {
    Box::new(move |level| {
        if let Err(e) = vm_fd.set_irq_line(layout::irq::SCI, level) {
            tracing::warn!(level, "KVM_IRQ_LINE for the ACPI SCI: {e}");
        }
    })
}

fn install_kick_handler() {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    // Registering the same no-op handler twice is harmless, so errors other
    // than "already registered" cannot happen here.
    let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
}

/// A VM whose vCPU threads are running.
pub struct RunningVm {
    pub(crate) vm: Vm,
    threads: Vec<JoinHandle<VcpuReport>>,
    device_thread: Option<JoinHandle<()>>,
}

/// How a VM ended and what its vCPUs did.
#[derive(Debug, serde::Serialize)]
pub struct VmReport {
    #[serde(serialize_with = "serialize_exit")]
    pub exit: VmExit,
    pub vcpus: Vec<VcpuReport>,
    pub devices: Vec<DeviceReport>,
    /// CLOCK_MONOTONIC ns of the guest's first POST-port write, if any.
    pub first_post_code_ns: Option<u64>,
    pub ended_ns: u64,
    /// Host memory at the end of the run, before guest memory is released.
    pub memory: crate::memory_usage::MemoryUsage,
}

fn serialize_exit<S: serde::Serializer>(exit: &VmExit, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&exit.to_string())
}

impl RunningVm {
    pub fn serial(&self) -> Arc<Mutex<SerialPort>> {
        self.vm.serial()
    }

    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.vm.exit_signal()
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The balloon's handle, when the VM has one.
    pub fn balloon(&self) -> Option<BalloonHandle> {
        self.vm.core.balloon.clone()
    }

    /// Host memory now: the process, and how much of it is guest RAM.
    pub fn memory_usage(&self) -> crate::memory_usage::MemoryUsage {
        crate::memory_usage::measure(&self.vm.core.shared.memory)
    }

    /// Each device's counters now.
    pub fn device_reports(&self) -> Vec<DeviceReport> {
        device_reports(&self.vm.core.virtio)
    }

    /// CLOCK_MONOTONIC ns of the guest's first POST-code write, if it made one.
    pub fn first_post_code_ns(&self) -> Option<u64> {
        self.vm.post.first_write_ns()
    }

    /// Asks the VM to stop (as the host), without waiting.
    pub fn stop(&self) {
        self.vm.core.shared.exit.request(VmExit::Stopped);
    }

    /// Waits for the VM to end, then stops every vCPU and collects reports.
    pub fn wait(self) -> VmReport {
        let exit = self.vm.core.shared.exit.clone();
        while !exit.is_requested() {
            let mut fds = [libc::pollfd {
                fd: exit_fd(&exit),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: polls one valid descriptor owned by `exit`.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
        }
        self.join()
    }

    fn join(self) -> VmReport {
        let mut reports = Vec::with_capacity(self.threads.len());
        for thread in self.threads {
            // A vCPU may be inside KVM_RUN: signal it until its loop sees the
            // exit request and returns.
            while !thread.is_finished() {
                // SAFETY: the thread is alive (not finished, not joined), so its
                // pthread handle is valid.
                unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
                std::thread::sleep(Duration::from_micros(200));
            }
            match thread.join() {
                Ok(report) => reports.push(report),
                Err(_) => tracing::error!("a vCPU thread panicked"),
            }
        }
        if let Some(thread) = self.device_thread {
            if thread.join().is_err() {
                tracing::error!("the device thread panicked");
            }
        }
        let core = &self.vm.core;
        let devices = device_reports(&core.virtio);
        let ended_ns = monotonic_ns();
        // The serial output may be buffered by its writer.
        let _ = lock(&core.board.serial).0.writer_mut().flush();
        VmReport {
            exit: core.shared.exit.reason().unwrap_or(VmExit::Stopped),
            vcpus: reports,
            devices,
            first_post_code_ns: self.vm.post.first_write_ns(),
            ended_ns,
            memory: crate::memory_usage::measure(&core.shared.memory),
        }
    }
}

fn exit_fd(exit: &ExitSignal) -> i32 {
    use std::os::fd::AsRawFd;
    exit.event().as_raw_fd()
}

use std::io::Write;

#[cfg(test)]
mod tests {
    #[test]
    fn disks_are_named_as_linux_names_them() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 701, 702]
            .iter()
            .map(|&i| crate::config::disk_name(i))
            .collect();
        assert_eq!(
            names,
            ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]
        );
    }
}
