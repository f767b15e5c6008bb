//! `bulkhead run`: one VM in this process, its console on this terminal.

use crate::console::{spawn_stdin_pump, RawTerminal};
use crate::OutputFormat;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use vmm::{KernelSource, Vm, VmConfig, VmExit, VmReport};

/// The guest booted when no --kernel is given, built from `guests/` by build.rs.
static DEFAULT_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/default-guest.elf"));

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    machine: crate::machine_flags::MachineFlags,
    /// Commit all guest memory on the host at start instead of on first touch.
    #[arg(long)]
    prefault: bool,
    /// Serve a control socket for this VM at PATH (`bulkhead ctl PATH ...`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Do not append the guest options this host's KVM needs to the command line.
    #[arg(long)]
    no_host_options: bool,
    /// Log every vCPU's instruction pointer this often, in ms (to find where a guest stalls).
    #[arg(long, value_name = "MS")]
    sample_rip_ms: Option<u64>,
    /// Boot the VM this JSON file describes: the VM spec `POST /v1/vms`
    /// takes (name, kernel, initrd, cmdline, cpus, memory_mib, shared_memory, disks, nics,
    /// vsock, rng, balloon), checked by the same rules and turned into a
    /// machine by the same code as the daemon's. The machine flags build the
    /// same machine; they cannot be mixed with a file.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "shared_memory", "disk", "net", "balloon",
        "vsock", "rng"])]
    config: Option<PathBuf>,
    /// Resume the VM saved in snapshot directory DIR (`bulkhead ctl PATH
    /// snapshot DIR`) instead of booting one; its memory is mapped from the
    /// snapshot copy-on-write.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "config", "kernel", "initrd", "cmdline", "cpus", "memory", "shared_memory", "disk", "net", "balloon",
        "vsock", "rng", "prefault", "no_host_options"])]
    restore: Option<PathBuf>,
    /// Wait for a live migration at URI (tcp:IP:PORT or unix:PATH) and run
    /// the VM that arrives (`bulkhead ctl PATH migrate URI` on the source).
    #[arg(long, value_name = "URI", conflicts_with_all = [
        "restore", "config", "kernel", "initrd", "cmdline", "cpus", "memory", "shared_memory", "disk", "net",
        "balloon", "vsock", "rng", "prefault", "no_host_options"])]
    incoming: Option<String>,
    /// With --incoming: serve TLS with this PEM certificate (chain).
    #[arg(long, value_name = "PEM", requires_all = ["incoming", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// With --incoming: the PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires_all = ["incoming", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// With --tls-cert: mutual TLS, accept only a source whose certificate
    /// chains to the CA certificate(s) in this PEM file.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// With --restore: read the whole memory file first and check its
    /// checksum (slower; a restore otherwise checks sizes and the state's checksum).
    #[arg(long, requires = "restore")]
    verify_memory: bool,
    /// Serve the serial console on a Unix socket at PATH instead of this
    /// terminal: each client gets recent output, then everything new; what a
    /// client sends is typed into the console.
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Confine the VMM once the VM is built: the current directory becomes
    /// its whole file system, it runs as this uid and gid with no
    /// capabilities, and a seccomp filter limits its system calls.
    #[arg(long, value_name = "uid=N,gid=N", value_parser = crate::device_options::parse_sandbox)]
    sandbox: Option<vmm::sandbox::SandboxConfig>,
    /// Test aid: once sandboxed, make a system call the filter forbids.
    #[arg(long, hide = true, requires = "sandbox")]
    sandbox_selftest: bool,
    /// Take the machine and every host resource from the daemon: a launch
    /// plan with open descriptors on this inherited Unix socket. The VMM
    /// then opens no host path and confines itself before it reads a
    /// snapshot or a migration stream.
    #[arg(long, value_name = "FD", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "shared_memory", "disk", "net", "balloon",
        "vsock", "rng", "prefault", "no_host_options", "restore", "incoming", "config",
        "control", "console_socket", "sandbox", "kvm_device"])]
    launch_fd: Option<i32>,
    /// How to print the end-of-run report (on stderr; stdout is the console).
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    if let Some(fd) = args.launch_fd {
        return run_launched(fd, &args);
    }
    if args.sandbox.is_some() {
        // A mount namespace can only be entered while there is one thread.
        vmm::sandbox::isolate_mounts()?;
    }
    // Before any thread starts, so that every thread inherits the mask.
    let stop_signals = crate::console::block_stop_signals();
    let console = args
        .console_socket
        .as_ref()
        .map(|_| vmm::console_socket::ConsoleHub::new());
    let serial_output = || match &console {
        Some(hub) => hub.writer(),
        None => Box::new(std::io::stdout()),
    };
    let options = vmm::vm::RestoreOptions {
        kvm_device: args.kvm_device.clone(),
        sample_rip_every: args.sample_rip_ms.map(std::time::Duration::from_millis),
    };
    if let Some(uri) = &args.incoming {
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(vmm::migration::TlsServer {
                identity: vmm::migration::TlsIdentity::read(cert, key)?,
                client_ca_pem: args
                    .tls_client_ca
                    .as_deref()
                    .map(vmm::migration::read_pem)
                    .transpose()?,
            }),
            _ => None,
        };
        let incoming = vmm::migration::accept(uri, tls).context("cannot wait for a migration")?;
        eprintln!("bulkhead: waiting for a migration on {}", incoming.uri());
        let arrived = incoming
            .receive(&options, serial_output())
            .context("incoming migration failed")?;
        eprintln!("bulkhead: migration received, resuming");
        let services = serve_sockets(&arrived.vm, console.as_ref(), &args)?;
        let running = arrived.start().context("incoming migration failed")?;
        return supervise(running, services, stop_signals, &args).map(|(code, _)| code);
    }
    let vm = if let Some(dir) = &args.restore {
        let snapshot = vmm::snapshot::read(dir).context("cannot restore")?;
        if args.verify_memory {
            snapshot.verify_memory().context("cannot restore")?;
        }
        Vm::restore(&snapshot, &options, serial_output())
            .with_context(|| format!("cannot restore {}", dir.display()))?
    } else {
        let config = match &args.config {
            Some(file) => config_file_boot_config(file, &args)?,
            None => boot_config(&args)?,
        };
        Vm::new(&config, serial_output()).context("cannot create the VM")?
    };
    tracing::info!(cmdline = %vm.cmdline, entry = vm.entry, "starting");
    let services = serve_sockets(&vm, console.as_ref(), &args)?;
    let running = vm.start().context("cannot start the VM")?;
    supervise(running, services, stop_signals, &args).map(|(code, _)| code)
}

/// A VMM started by the daemon: everything from the launch plan and its
/// descriptors, confined before anything a tenant or peer wrote is read.
fn run_launched(fd: i32, args: &RunArgs) -> anyhow::Result<i32> {
    // A mount namespace can only be entered while there is one thread.
    vmm::sandbox::isolate_mounts()?;
    let stop_signals = crate::console::block_stop_signals();
    let (plan, descriptors) =
        vmm::launch::receive_from_fd(fd).context("cannot take the launch plan")?;
    let mut descriptors = descriptors.into_iter();
    let kvm = descriptors
        .next()
        .context("the KVM descriptor is missing")?;
    let mut report = std::fs::File::from(
        descriptors
            .next()
            .context("the exit report descriptor is missing")?,
    );
    // From here on, how this VMM ends is the daemon's to read in `report`.
    let (code, exit) = match run_launched_vm(plan, kvm, descriptors, stop_signals, args) {
        Ok(ended) => ended,
        Err(error) => {
            eprintln!("bulkhead: error: {error:#}");
            (1, VmExit::Fatal(format!("{error:#}")))
        }
    };
    vmm::launch::ExitReport::new(exit)
        .write_to(&mut report)
        .context("cannot write the exit report")?;
    Ok(code)
}

/// Builds, restores or receives the launched VM and runs it to its end.
fn run_launched_vm(
    plan: vmm::launch::LaunchPlan,
    kvm: std::os::fd::OwnedFd,
    mut descriptors: std::vec::IntoIter<std::os::fd::OwnedFd>,
    stop_signals: libc::sigset_t,
    args: &RunArgs,
) -> anyhow::Result<(i32, VmExit)> {
    use vmm::launch::LaunchOrigin;
    let mut next = || descriptors.next().context("a descriptor is missing");
    let kvm = vmm::vm::kvm_from_descriptor(kvm).context("the KVM descriptor")?;
    let boot = plan.origin == LaunchOrigin::Boot;
    let kernel = match boot && plan.boot.kernel {
        true => Some(std::fs::File::from(next()?)),
        false => None,
    };
    let initrd = match boot && plan.boot.initrd {
        true => Some(std::fs::File::from(next()?)),
        false => None,
    };
    let devices = vmm::backing::DeviceBackings::from_descriptors(&plan.machine, &mut descriptors)
        .context("cannot take the devices' host resources")?;
    let listener = match plan.origin {
        LaunchOrigin::Incoming(_) => Some(
            vmm::migration::Listener::from_descriptor(
                descriptors
                    .next()
                    .context("the migration listener is missing")?,
            )
            .context("the migration listener")?,
        ),
        _ => None,
    };
    vmm::sandbox::confine(plan.sandbox)?;

    let console = vmm::console_socket::ConsoleHub::new();
    let options = vmm::vm::RestoreOptions {
        kvm_device: "/dev/kvm".into(),
        sample_rip_every: args.sample_rip_ms.map(std::time::Duration::from_millis),
    };
    let vm = match &plan.origin {
        LaunchOrigin::Boot => {
            let config = launched_boot_config(&plan, args);
            let backings = vmm::vm::Backings {
                kvm,
                kernel,
                initrd,
                devices,
            };
            Vm::build(&config, backings, console.writer()).context("cannot create the VM")?
        }
        LaunchOrigin::Restore { snapshot } => {
            let dir = std::path::Path::new("snapshots").join(snapshot);
            let read = vmm::snapshot::read(&dir).context("cannot restore")?;
            Vm::restore_onto(
                &read,
                &plan.machine,
                kvm,
                devices,
                &options,
                console.writer(),
            )
            .with_context(|| format!("cannot restore snapshot {snapshot}"))?
        }
        LaunchOrigin::Incoming(expected) => {
            let listener = listener.context("the migration listener is missing")?;
            let incoming = vmm::migration::accept_on(listener, expected.tls.clone()).expecting(
                expected.source,
                std::time::Duration::from_secs(expected.timeout_secs),
            );
            eprintln!("bulkhead: waiting for a migration on {}", incoming.uri());
            let arrived = incoming
                .receive_onto(
                    plan.machine.clone(),
                    kvm,
                    devices,
                    &options,
                    console.writer(),
                )
                .context("incoming migration failed")?;
            eprintln!("bulkhead: migration received, resuming");
            let services = serve_launched_sockets(&arrived.vm, &console, &plan)?;
            let running = arrived.start().context("incoming migration failed")?;
            return supervise(running, services, stop_signals, args);
        }
    };
    tracing::info!(cmdline = %vm.cmdline, entry = vm.entry, "starting");
    let services = serve_launched_sockets(&vm, &console, &plan)?;
    let running = vm.start().context("cannot start the VM")?;
    supervise(running, services, stop_signals, args)
}

fn launched_boot_config(plan: &vmm::launch::LaunchPlan, args: &RunArgs) -> VmConfig {
    let machine = &plan.machine;
    let kernel = kernel_source(
        plan.boot
            .kernel
            .then(|| machine.kernel.clone().unwrap_or_else(|| "kernel".into())),
    );
    let mut config = VmConfig::of_machine(kernel, machine);
    config.prefault_memory = plan.boot.prefault_memory;
    config.host_cmdline_options = plan.boot.host_cmdline_options;
    config.sample_rip_every = args.sample_rip_ms.map(std::time::Duration::from_millis);
    config
}

/// The control and console sockets, bound inside the confined VMM's root.
fn serve_launched_sockets(
    vm: &Vm,
    console: &vmm::console_socket::ConsoleHub,
    plan: &vmm::launch::LaunchPlan,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let control = vmm::control::serve(&plan.control, vm.control())?;
    let console = console
        .serve(&plan.console, vm.serial(), vm.exit_signal())
        .context("cannot serve the console")?;
    Ok(vec![control, console])
}

/// Binds the control and console sockets, then (with --sandbox) confines the
/// process: everything the VM needs is open by now and the guest has not run.
fn serve_sockets(
    vm: &Vm,
    console: Option<&vmm::console_socket::ConsoleHub>,
    args: &RunArgs,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    if let Some(path) = &args.control {
        threads.push(vmm::control::serve(path, vm.control())?);
    }
    if let (Some(hub), Some(path)) = (console, &args.console_socket) {
        let thread = hub
            .serve(path, vm.serial(), vm.exit_signal())
            .with_context(|| format!("cannot serve the console at {}", path.display()))?;
        threads.push(thread);
    }
    if let Some(sandbox) = args.sandbox {
        vmm::sandbox::confine(sandbox)?;
        if args.sandbox_selftest {
            let call = vmm::sandbox::seccomp::FORBIDDEN_EXAMPLES[0];
            eprintln!("bulkhead: sandbox self-test: making forbidden system call {call}");
            // SAFETY: the filter kills the process before the call runs; the
            // arguments are never looked at.
            unsafe { libc::syscall(call, 0, 0, 0) };
            anyhow::bail!("sandbox self-test: forbidden system call {call} was allowed");
        }
    }
    Ok(threads)
}

/// The VM a `--config` file describes: the API's VM spec, the machine
/// itself (a vsock socket without a path is `vsock.sock` here).
fn config_file_boot_config(file: &std::path::Path, args: &RunArgs) -> anyhow::Result<VmConfig> {
    let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let spec: host::spec::VmSpec = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a VM spec", file.display()))?;
    host::spec::Validate::validate_for_its_user(&spec)
        .with_context(|| format!("{}: invalid VM spec", file.display()))?;
    let mut config = VmConfig::of_machine(kernel_source(spec.kernel.clone()), &spec);
    config.kvm_device = args.kvm_device.clone();
    config.sample_rip_every = args.sample_rip_ms.map(std::time::Duration::from_millis);
    config.prefault_memory = args.prefault;
    config.host_cmdline_options = !args.no_host_options;
    Ok(config)
}

/// The kernel file, or the embedded guest without one.
fn kernel_source(file: Option<std::path::PathBuf>) -> KernelSource {
    match file {
        Some(path) => KernelSource::File(path),
        None => KernelSource::Bytes {
            name: "embedded guest".into(),
            image: DEFAULT_GUEST.into(),
        },
    }
}

fn boot_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let flags = &args.machine;
    let mut machine = flags.spec("run")?;
    if flags.cmdline.is_none() && flags.kernel.is_none() {
        // The embedded guest reads no command line.
        machine.cmdline = Some(String::new());
    }
    let mut config = VmConfig::of_machine(kernel_source(flags.kernel.clone()), &machine);
    config.kvm_device = args.kvm_device.clone();
    config.sample_rip_every = args.sample_rip_ms.map(std::time::Duration::from_millis);
    config.prefault_memory = args.prefault;
    config.host_cmdline_options = !args.no_host_options;
    Ok(config)
}

/// Serves the terminal until the VM ends; returns the process's exit code
/// and why the VM ended.
fn supervise(
    running: vmm::RunningVm,
    services: Vec<std::thread::JoinHandle<()>>,
    stop_signals: libc::sigset_t,
    args: &RunArgs,
) -> anyhow::Result<(i32, VmExit)> {
    // The VM runs: what only starting it needed need not stay resident.
    vmm::memory_usage::trim_program_pages();
    // A launched VMM's console is its socket, as with --console-socket.
    let terminal = if args.console_socket.is_none() && args.launch_fd.is_none() {
        let terminal = RawTerminal::stdin();
        spawn_stdin_pump(running.serial(), running.exit_signal(), terminal.is_some());
        terminal
    } else {
        None
    };
    crate::console::spawn_signal_waiter(stop_signals, running.exit_signal());
    let report = running.wait();
    for thread in services {
        let _ = thread.join();
    }
    drop(terminal);
    print_report(&report, args.output)?;
    Ok((if report.exit.is_clean() { 0 } else { 1 }, report.exit))
}

fn print_report(report: &VmReport, format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(report)?;
            value["clean"] = report.exit.is_clean().into();
            eprintln!("{value}");
        }
        OutputFormat::Text => {
            for vcpu in &report.vcpus {
                if !vcpu.emulated.is_empty() {
                    let counts: Vec<String> = vcpu
                        .emulated
                        .iter()
                        .map(|(m, n)| format!("{m} {n}"))
                        .collect();
                    eprintln!("bulkhead: vCPU {} emulated: {}", vcpu.id, counts.join(", "));
                }
                // Stopped from outside: say where the guest was, to find stalls.
                if let (VmExit::Stopped, Some(rip)) = (&report.exit, vcpu.final_rip) {
                    eprintln!("bulkhead: vCPU {} stopped at RIP {rip:#x}", vcpu.id);
                }
            }
            for device in &report.devices {
                let counts: Vec<String> = device
                    .counters
                    .iter()
                    .map(|(name, value)| format!("{name} {value}"))
                    .collect();
                eprintln!("bulkhead: {}: {}", device.name, counts.join(", "));
            }
            eprintln!("bulkhead: {}", report.exit);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(flags: &[&str]) -> RunArgs {
        Command::try_parse_from([&["run"], flags].concat())
            .unwrap()
            .run
    }

    /// A `--config` file and the flags that say the same build the same
    /// machine: the flags are a shorthand, not a second description (of a
    /// machine named `run`).
    #[test]
    fn flags_and_a_config_file_build_the_same_machine() {
        let dir = std::env::temp_dir().join(format!("bulkhead-run-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.json");
        std::fs::write(
            &file,
            serde_json::json!({
                "name": "run", "kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0",
                "cpus": 2, "memory_mib": 64,
                "disks": [{"path": "/d", "readonly": true, "id": "data",
                           "rate_limit": {"bytes_per_sec": 1048576}}],
                "nics": [{"tap": "t0", "mac": "02:00:00:00:00:01",
                          "rate_limit": {"ops_per_sec": 1000}}],
                "vsock": {"cid": 5, "socket": "vsock.sock"}, "rng": true,
                "balloon": {"target_mib": 8, "deflate_on_oom": true}
            })
            .to_string(),
        )
        .unwrap();
        let from_file = config_file_boot_config(&file, &args(&[])).unwrap();
        let from_flags = boot_config(&args(&[
            "--kernel=/k",
            "--initrd=/i",
            "--cmdline=console=ttyS0",
            "--cpus=2",
            "--memory=64",
            "--disk=path=/d,ro,id=data,bps=1M",
            "--net=tap=t0,mac=02:00:00:00:00:01,iops=1000",
            "--vsock=cid=5,socket=vsock.sock",
            "--rng",
            "--balloon=target_mib=8,deflate_on_oom",
        ]))
        .unwrap();
        assert_eq!(from_file.machine, from_flags.machine);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
