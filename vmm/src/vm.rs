//! Building a VM from its configuration and running its vCPUs.

use crate::arch::x86_64::layout::{
    self, ports, PCI_MMIO_SIZE, PCI_MMIO_START, PVPANIC_BAR_ADDRESS,
};
use crate::arch::x86_64::{acpi, boot, cpu, mptable, paging};
use crate::config::{ConfigError, KernelSource, VmConfig};
use crate::devices::event_loop::{DeviceEventLoop, Subscriber};
use crate::devices::legacy::cmos::Cmos;
use crate::devices::legacy::post::{monotonic_ns, PostCodes, PostPort};
use crate::devices::legacy::power::{AcpiSleepControl, PowerControl};
use crate::devices::legacy::reset::{ResetLine, I8042};
use crate::devices::legacy::serial::{SerialOutput, SerialPort};
use crate::devices::pci::{pvpanic::PvPanic, HostBridge, PciConfigPorts, PciMmioWindow, PciRoot};
use crate::devices::virtio::balloon::BalloonHandle;
use crate::devices::virtio::{self, mmio::MmioTransport, Interrupt, VirtioDevice};
use crate::devices::{lock, Bus, BusError};
use crate::exit::{ExitSignal, VmExit};
use crate::host::KvmFlavour;
use crate::vcpu::{Vcpu, VcpuReport, VcpuShared};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use std::fs::File;
use std::io::Cursor;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
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
        source: vm_memory::mmap::FromRangesError,
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
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A VM whose memory, devices and vCPUs are ready, not yet running.
pub struct Vm {
    _kvm: Kvm,
    vcpus: Vec<Vcpu>,
    shared: Arc<VcpuShared>,
    serial: Arc<Mutex<SerialPort>>,
    post: Arc<PostCodes>,
    virtio: Vec<VirtioSlot>,
    device_loop: Option<DeviceEventLoop>,
    balloon: Option<BalloonHandle>,
    /// The command line the guest was given, host options included.
    pub cmdline: String,
    pub entry: &'static str,
    pub flavour: KvmFlavour,
}

impl Vm {
    /// Creates the VM: validates the config, allocates memory, loads the
    /// kernel, writes the boot tables and sets up devices and vCPUs.
    pub fn new(config: &VmConfig, serial_output: SerialOutput) -> Result<Vm, VmError> {
        config.validate(crate::host::total_memory_bytes())?;
        let kvm = open_kvm(&config.kvm_device)?;
        let flavour = KvmFlavour::detect();
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;

        let memory = GuestMemoryMmap::from_ranges(&boot::ram_regions(config.memory_bytes()))
            .map_err(|source| VmError::Memory {
                mib: config.memory_mib,
                source,
            })?;
        if config.prefault_memory {
            prefault(&memory);
        }
        for (slot, region) in memory.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let table = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which the
            // VM keeps (in `shared`) for as long as the VM fd exists.
            unsafe { vm_fd.set_user_memory_region(table) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

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

        let mut cmdline = config.cmdline.clone();
        if config.host_cmdline_options {
            let extra = flavour.guest_cmdline_options();
            if !extra.is_empty() {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(extra);
            }
        }
        let (virtio, balloon) = create_virtio_devices(config, &vm_fd, &memory)?;
        for slot in &virtio {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&slot.cmdline_option());
        }
        let kernel = load_kernel(&memory, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => {
                let name = path.display().to_string();
                let mut file = File::open(path).map_err(|source| VmError::InitrdFile {
                    path: name.clone(),
                    source,
                })?;
                Some(
                    boot::load_initrd(&memory, &kernel, &mut file)
                        .map_err(|source| VmError::Initrd { path: name, source })?,
                )
            }
            None => None,
        };
        boot::write_cmdline(&memory, &cmdline)?;
        mptable::write(&memory, config.cpus)?;
        let acpi_rsdp = acpi::write(&memory, config.cpus)?;
        boot::write_boot_info(
            &memory,
            &kernel,
            config.memory_bytes(),
            cmdline.len() + 1,
            initrd,
            acpi_rsdp,
        )?;
        paging::write_identity_tables(&memory).map_err(VmError::PageTables)?;

        let exit = Arc::new(ExitSignal::new().map_err(VmError::EventFd)?);
        let post = Arc::new(PostCodes::default());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, layout::irq::COM1)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(SerialPort::new(serial_irq, serial_output)));
        let (pio, mut mmio) = platform_buses(&exit, &post, &serial)?;
        let device_loop = if virtio.is_empty() {
            None
        } else {
            let mut device_loop = DeviceEventLoop::new(exit.clone()).map_err(VmError::EventLoop)?;
            for slot in &virtio {
                mmio.insert(slot.base, virtio::mmio::WINDOW_SIZE, slot.transport.clone())?;
                device_loop.add(slot.transport.clone() as Subscriber);
            }
            Some(device_loop)
        };
        let vm_fd = Arc::new(vm_fd);
        let shared = Arc::new(VcpuShared {
            vm: vm_fd.clone(),
            memory,
            pio,
            mmio,
            exit,
        });

        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for id in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = cpu::cpuid_for(&base_cpuid, id, config.cpus, flavour.hidden_kvm_features());
            cpu::configure_common(&fd, usize::from(id), &cpuid)?;
            if id == 0 {
                cpu::configure_boot_cpu(&fd, &shared.memory, kernel.entry)?;
            }
            vcpus.push(Vcpu::new(
                usize::from(id),
                fd,
                flavour == KvmFlavour::Pvm,
                config.sample_rip_every,
            ));
        }

        Ok(Vm {
            _kvm: kvm,
            vcpus,
            shared,
            serial,
            post,
            virtio,
            device_loop,
            balloon,
            cmdline,
            entry: kernel.entry.describe(),
            flavour,
        })
    }

    /// The console UART, for feeding it input.
    pub fn serial(&self) -> Arc<Mutex<SerialPort>> {
        self.serial.clone()
    }

    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.shared.exit.clone()
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
            let shared = self.shared.clone();
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

/// A virtio-mmio device and where the guest finds it.
#[derive(Clone)]
struct VirtioSlot {
    base: u64,
    irq: u32,
    transport: Arc<Mutex<MmioTransport>>,
}

impl VirtioSlot {
    /// How Linux learns of the device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
    fn cmdline_option(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// Builds the configured virtio devices, each behind a virtio-mmio window
/// with an irqfd for its interrupt and ioeventfds for its queues.
fn create_virtio_devices(
    config: &VmConfig,
    vm_fd: &VmFd,
    memory: &GuestMemoryMmap,
) -> Result<(Vec<VirtioSlot>, Option<BalloonHandle>), VmError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        devices.push(Box::new(virtio::block::Block::new(
            disk,
            &disk_name(index),
        )?));
    }
    for (index, net) in config.nets.iter().enumerate() {
        devices.push(Box::new(virtio::net::Net::new(
            net,
            &format!("eth{index}"),
        )?));
    }
    if config.rng {
        devices.push(Box::new(virtio::rng::Rng::new()));
    }
    if let Some(vsock) = &config.vsock {
        devices.push(Box::new(virtio::vsock::Vsock::new(vsock)?));
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
    let mut slots = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
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
            base,
            irq,
            transport: Arc::new(Mutex::new(transport)),
        });
    }
    Ok((slots, balloon_handle))
}

/// Makes the host commit every guest page now rather than on first touch.
fn prefault(memory: &GuestMemoryMmap) {
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

fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
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
    memory: &GuestMemoryMmap,
    source: &KernelSource,
) -> Result<boot::LoadedKernel, VmError> {
    let path = source.name();
    let result = match source {
        KernelSource::File(file) => {
            let mut image = File::open(file).map_err(|e| VmError::KernelFile {
                path: path.clone(),
                source: e,
            })?;
            boot::load_kernel(memory, &mut image)
        }
        KernelSource::Bytes { image, .. } => {
            boot::load_kernel(memory, &mut Cursor::new(&image[..]))
        }
    };
    result.map_err(|source| VmError::Kernel { path, source })
}

/// The port and MMIO buses of the PC platform Bulkhead emulates.
fn platform_buses(
    exit: &Arc<ExitSignal>,
    post: &Arc<PostCodes>,
    serial: &Arc<Mutex<SerialPort>>,
) -> Result<(Bus, Bus), VmError> {
    let mut pio = Bus::default();
    pio.insert(u64::from(ports::COM1), 8, serial.clone())?;
    let i8042 = I8042(vm_superio::I8042Device::new(ResetLine(exit.clone())));
    pio.insert(u64::from(ports::I8042_DATA), 5, Arc::new(Mutex::new(i8042)))?;
    pio.insert(
        u64::from(ports::POST_CODE),
        1,
        Arc::new(Mutex::new(PostPort(post.clone()))),
    )?;
    pio.insert(
        u64::from(ports::PM1A_CONTROL),
        2,
        Arc::new(Mutex::new(PowerControl(exit.clone()))),
    )?;

    pio.insert(
        u64::from(ports::ACPI_SLEEP_CONTROL),
        1,
        Arc::new(Mutex::new(AcpiSleepControl(exit.clone()))),
    )?;
    pio.insert(
        u64::from(ports::CMOS),
        2,
        Arc::new(Mutex::new(Cmos::default())),
    )?;

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
        root,
        window_start: PCI_MMIO_START,
    };
    mmio.insert(PCI_MMIO_START, PCI_MMIO_SIZE, Arc::new(Mutex::new(window)))?;
    Ok((pio, mmio))
}

/// Signal used to knock vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

fn install_kick_handler() {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    // Registering the same no-op handler twice is harmless, so errors other
    // than "already registered" cannot happen here.
    let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
}

/// A VM whose vCPU threads are running.
pub struct RunningVm {
    vm: Vm,
    threads: Vec<JoinHandle<VcpuReport>>,
    device_thread: Option<JoinHandle<()>>,
}

/// What a device did, by counter name.
#[derive(Debug, serde::Serialize)]
pub struct DeviceReport {
    pub name: String,
    pub counters: std::collections::BTreeMap<String, u64>,
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
        self.vm.balloon.clone()
    }

    /// Host memory now: the process, and how much of it is guest RAM.
    pub fn memory_usage(&self) -> crate::memory_usage::MemoryUsage {
        crate::memory_usage::measure(&self.vm.shared.memory)
    }

    /// Each device's counters now.
    pub fn device_reports(&self) -> Vec<DeviceReport> {
        device_reports(&self.vm.virtio)
    }

    /// What the host can do to this VM while it runs (the control socket's
    /// and, later, the host API's way in).
    pub fn control(&self) -> crate::control::VmControl {
        let memory = self.vm.shared.memory.clone();
        let slots: Vec<VirtioSlot> = self.vm.virtio.iter().map(VirtioSlot::clone).collect();
        crate::control::VmControl {
            balloon: self.vm.balloon.clone(),
            memory_usage: Arc::new(move || crate::memory_usage::measure(&memory)),
            device_reports: Arc::new(move || device_reports(&slots)),
            exit: self.vm.shared.exit.clone(),
        }
    }

    /// Asks the VM to stop (as the host), without waiting.
    pub fn stop(&self) {
        self.vm.shared.exit.request(VmExit::Stopped);
    }

    /// Waits for the VM to end, then stops every vCPU and collects reports.
    pub fn wait(self) -> VmReport {
        let exit = self.vm.shared.exit.clone();
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
        let devices = device_reports(&self.vm.virtio);
        let ended_ns = monotonic_ns();
        // The serial output may be buffered by its writer.
        let _ = lock(&self.vm.serial).0.writer_mut().flush();
        VmReport {
            exit: self.vm.shared.exit.reason().unwrap_or(VmExit::Stopped),
            vcpus: reports,
            devices,
            first_post_code_ns: self.vm.post.first_write_ns(),
            ended_ns,
            memory: crate::memory_usage::measure(&self.vm.shared.memory),
        }
    }
}

fn device_reports(slots: &[VirtioSlot]) -> Vec<DeviceReport> {
    slots
        .iter()
        .map(|slot| {
            let transport = lock(&slot.transport);
            DeviceReport {
                name: transport.device().name(),
                counters: transport
                    .device()
                    .counters()
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect(),
            }
        })
        .collect()
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
            .map(|&i| super::disk_name(i))
            .collect();
        assert_eq!(
            names,
            ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]
        );
    }
}
