//! One vCPU thread: the KVM_RUN loop and the dispatch of its exits.

use crate::arch::x86_64::emulator::{reported_instruction, InstructionEmulator};
use crate::arch::x86_64::hypercall;
use crate::arch::x86_64::state::VcpuState;
use crate::devices::{lock, Bus};
use crate::exit::{ExitSignal, VmExit};
use crate::memory::GuestRam;
use crate::pause::PauseGate;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// KVM_INTERNAL_ERROR_EMULATION: KVM's emulator could not run the instruction.
const INTERNAL_ERROR_EMULATION: u32 = 1;
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;
/// How often every vCPU checks whether the guest halted it for good.
const HALT_WATCH_PERIOD: Duration = Duration::from_millis(500);
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// The LAPIC's spurious interrupt vector register and its "APIC software
/// enabled" bit.
const LAPIC_SVR_OFFSET: usize = 0xf0;
const LAPIC_SVR_ENABLED: u32 = 1 << 8;

/// Whether a vCPU in this state never runs again: halted (KVM_MP_STATE_HALTED:
/// not a vCPU waiting for INIT/SIPI, which is UNINITIALIZED or
/// INIT_RECEIVED) with interrupts off and its local APIC software-disabled,
/// as Linux leaves every CPU at the end of a halt or of a power-off without
/// ACPI (`stop_this_cpu`). Only an NMI or INIT, which nothing sends once
/// every vCPU is in this state, could wake it.
pub fn halted_for_good(mp_state: u32, rflags: u64, lapic_svr: u32) -> bool {
    mp_state == kvm_bindings::KVM_MP_STATE_HALTED
        && rflags & RFLAGS_IF == 0
        && lapic_svr & LAPIC_SVR_ENABLED == 0
}

/// Which vCPUs are halted for good; when all are, the guest has ended.
pub struct HaltedVcpus(Mutex<Vec<bool>>);

impl HaltedVcpus {
    pub fn new(vcpus: usize) -> Self {
        HaltedVcpus(Mutex::new(vec![false; vcpus]))
    }

    /// Records whether vCPU `id` is halted for good; returns whether every
    /// vCPU now is.
    pub fn mark(&self, id: usize, halted: bool) -> bool {
        let mut marks = lock(&self.0);
        if let Some(mark) = marks.get_mut(id) {
            *mark = halted;
        }
        halted && marks.iter().all(|&m| m)
    }
}

/// How long an application processor waits before asking KVM again whether
/// it has been started (this host's KVM returns EAGAIN instead of blocking).
const WAIT_FOR_SIPI_POLL: Duration = Duration::from_millis(1);

/// Everything the vCPU threads share.
pub struct VcpuShared {
    pub vm: Arc<VmFd>,
    pub memory: GuestRam,
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    /// Where vCPUs park when the VM is paused.
    pub pause: Arc<PauseGate>,
    /// vCPU states asked for while parked (snapshots, migration).
    pub captures: Captures,
    /// The running vCPU threads, for knocking them out of KVM_RUN.
    pub threads: VcpuThreads,
    /// The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Vec<u32>,
    /// Share of time (percent) each vCPU is held out of the guest, so a
    /// migration's copy can catch up with what the guest dirties.
    pub throttle_percent: AtomicU32,
    /// Each vCPU's counters as of its last publication (a few times a
    /// second), for the host's monitoring while the VM runs.
    pub live_reports: Mutex<std::collections::BTreeMap<usize, VcpuReport>>,
    /// vCPUs the guest halted for good (see [`halted_for_good`]).
    pub halted: HaltedVcpus,
}

/// How often a running vCPU publishes its counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// The pthreads of running vCPUs, so a pause can signal them. A thread
/// removes itself before it ends, so a signal never targets a dead thread.
#[derive(Default)]
pub struct VcpuThreads(Mutex<Vec<libc::pthread_t>>);

impl VcpuThreads {
    fn register(&self) {
        // SAFETY: pthread_self has no preconditions.
        lock(&self.0).push(unsafe { libc::pthread_self() });
    }

    fn unregister(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        lock(&self.0).retain(|&t| t != me);
    }

    /// Sends `signal` to every running vCPU thread.
    pub fn kick(&self, signal: i32) {
        for &thread in lock(&self.0).iter() {
            // SAFETY: the thread is registered, hence alive: it unregisters
            // under this lock before it returns.
            unsafe { libc::pthread_kill(thread, signal) };
        }
    }
}

/// vCPU states collected from parked vCPU threads.
pub struct Captures {
    slots: Mutex<CaptureSlots>,
    filled: Condvar,
}

struct CaptureSlots {
    wanted: bool,
    states: Vec<Option<Result<VcpuState, String>>>,
}

impl Captures {
    pub fn new(vcpus: usize) -> Self {
        Captures {
            slots: Mutex::new(CaptureSlots {
                wanted: false,
                states: (0..vcpus).map(|_| None).collect(),
            }),
            filled: Condvar::new(),
        }
    }

    /// Asks parked vCPUs for their state (they must be woken to see it).
    pub fn request(&self) {
        let mut slots = lock(&self.slots);
        slots.wanted = true;
        slots.states.iter_mut().for_each(|s| *s = None);
    }

    /// Waits for every vCPU's state, in vCPU order.
    pub fn collect(&self, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let deadline = Instant::now() + timeout;
        let mut slots = lock(&self.slots);
        while slots.states.iter().any(Option::is_none) {
            let now = Instant::now();
            if now >= deadline {
                slots.wanted = false;
                return Err("a vCPU did not hand over its state in time".into());
            }
            slots = match self.filled.wait_timeout(slots, deadline - now) {
                Ok((slots, _)) => slots,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        slots.wanted = false;
        slots
            .states
            .iter_mut()
            .map(|s| s.take().unwrap_or(Err(String::new())))
            .collect()
    }

    /// Called by a parked vCPU: hands over its state if it is asked for.
    fn serve(&self, id: usize, fd: &VcpuFd, msr_indices: &[u32]) {
        let mut slots = lock(&self.slots);
        if !slots.wanted || slots.states.get(id).is_none_or(Option::is_some) {
            return;
        }
        let state = VcpuState::capture(fd, msr_indices).map_err(|e| format!("vCPU {id}: {e}"));
        slots.states[id] = Some(state);
        self.filled.notify_all();
    }
}

/// Exit counts by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitCounts {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub emulation: u64,
    pub halt: u64,
    pub interrupted: u64,
    pub other: u64,
}

impl ExitCounts {
    /// Each count with its reason, as the status names them.
    pub fn by_reason(&self) -> [(&'static str, u64); 8] {
        [
            ("io_in", self.io_in),
            ("io_out", self.io_out),
            ("mmio_read", self.mmio_read),
            ("mmio_write", self.mmio_write),
            ("emulation", self.emulation),
            ("halt", self.halt),
            ("interrupted", self.interrupted),
            ("other", self.other),
        ]
    }
}

/// What one vCPU did, reported when the VM ends.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuReport {
    pub id: usize,
    pub exits: ExitCounts,
    /// Instructions the VMM finished for KVM, by mnemonic.
    pub emulated: BTreeMap<String, u64>,
    /// Wall time inside KVM_RUN.
    pub in_kvm_ns: u64,
    /// Wall time in the VMM between KVM_RUN calls, while the vCPU was running
    /// (time an AP waits for its start-up IPI is not counted).
    pub in_vmm_ns: u64,
    /// Hypercalls the VMM completed because KVM did not.
    pub hypercalls: u64,
    /// Guest RIP when the vCPU stopped: where it was stuck, if the VM was
    /// stopped from outside.
    pub final_rip: Option<u64>,
}

pub struct Vcpu {
    pub id: usize,
    fd: VcpuFd,
    emulator: InstructionEmulator,
    report: VcpuReport,
    /// Whether to watch for hypercalls KVM never finishes (PVM hosts).
    rescue_hypercalls: bool,
    /// Log the guest RIP this often (a sampler for finding where a guest stalls).
    sample_rip_every: Option<Duration>,
}

/// How often a vCPU is knocked out of KVM_RUN to check for a stuck hypercall.
const HYPERCALL_CHECK_PERIOD: Duration = Duration::from_millis(20);

/// A POSIX timer that sends the vCPU kick signal to one thread periodically.
struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    fn start(signal: i32, period: Duration) -> std::io::Result<ThreadTimer> {
        // SAFETY: sigevent is plain data; zero is a valid starting point.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = signal;
        // The system call, not glibc's `gettid`: in a static build linked
        // with full LTO that symbol ends up an unresolved weak one (null), and
        // calling it crashed every vCPU thread.
        // SAFETY: gettid takes no arguments and cannot fail.
        event.sigev_notify_thread_id = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let interval = libc::timespec {
            tv_sec: period.as_secs() as _,
            tv_nsec: period.subsec_nanos() as _,
        };
        let spec = libc::itimerspec {
            it_interval: interval,
            it_value: interval,
        };
        // SAFETY: `timer` was just created; `spec` is valid.
        if unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            let error = std::io::Error::last_os_error();
            // SAFETY: deletes the timer created above.
            unsafe { libc::timer_delete(timer) };
            return Err(error);
        }
        Ok(ThreadTimer(timer))
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: the timer was created by `start` and is deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

enum Step {
    Continue,
    /// KVM_EXIT_INTERNAL_ERROR: finished by the instruction emulator, or fatal.
    InternalError,
    WaitForStart,
    Stop(VmExit),
}

impl Vcpu {
    pub fn new(
        id: usize,
        fd: VcpuFd,
        rescue_hypercalls: bool,
        sample_rip_every: Option<Duration>,
    ) -> Self {
        Vcpu {
            id,
            fd,
            emulator: InstructionEmulator::new(),
            report: VcpuReport {
                id,
                ..Default::default()
            },
            rescue_hypercalls,
            sample_rip_every,
        }
    }

    /// Completes the hypercall the vCPU is stuck on, if it is.
    fn rescue_hypercall(&mut self, shared: &VcpuShared) {
        if let Some(regs) = hypercall::stuck_on_hypercall(&self.fd, &shared.memory) {
            let number = regs.rax;
            match self.fd.set_regs(&hypercall::complete(&shared.vm, regs)) {
                Ok(()) => self.report.hypercalls += 1,
                Err(e) => tracing::warn!(vcpu = self.id, number, "cannot complete hypercall: {e}"),
            }
        }
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs until the VM is asked to stop; reports why this vCPU stopped it, if it did.
    pub fn run(mut self, shared: &VcpuShared, kick_signal: i32) -> VcpuReport {
        // Lives as long as this loop; the signal it sends only interrupts
        // KVM_RUN (a halted vCPU sleeps inside it: only a signal gets it out).
        let mut period = HALT_WATCH_PERIOD;
        if self.rescue_hypercalls {
            period = period.min(HYPERCALL_CHECK_PERIOD);
        }
        if let Some(sample) = self.sample_rip_every {
            period = period.min(sample);
        }
        let _watch_timer = ThreadTimer::start(kick_signal, period)
            .inspect_err(|e| tracing::warn!(vcpu = self.id, "no vCPU watch timer: {e}"))
            .ok();
        let mut next_sample = Instant::now();
        let mut next_halt_check = Instant::now() + HALT_WATCH_PERIOD;
        let mut marked_halted = false;
        let mut last_return = Instant::now();
        let mut throttle_served = Instant::now();
        let mut next_publish = Instant::now();
        shared.threads.register();
        while !shared.exit.is_requested() {
            if shared.pause.is_requested() {
                self.publish(shared);
                self.park(shared);
                last_return = Instant::now();
                continue;
            }
            let entered = Instant::now();
            self.report.in_vmm_ns += (entered - last_return).as_nanos() as u64;
            let result = self.fd.run();
            let returned = Instant::now();
            self.report.in_kvm_ns += (returned - entered).as_nanos() as u64;
            last_return = returned;
            let throttle = shared.throttle_percent.load(Ordering::Relaxed).min(99);
            if throttle > 0 {
                // Sleep so that the guest ran `100 - throttle` percent of the time.
                let ran = returned - throttle_served;
                std::thread::sleep(ran * throttle / (100 - throttle));
                throttle_served = Instant::now();
                last_return = throttle_served;
            } else {
                throttle_served = returned;
            }
            if marked_halted && result.is_ok() {
                // It ran (it exited for I/O or another reason): woken.
                marked_halted = false;
                shared.halted.mark(self.id, false);
            }
            let step = match result {
                Ok(exit) => handle_exit(self.id, exit, shared, &mut self.report.exits),
                Err(e) if e.errno() == libc::EINTR => {
                    self.report.exits.interrupted += 1;
                    if self.rescue_hypercalls {
                        self.rescue_hypercall(shared);
                    }
                    if returned >= next_halt_check {
                        next_halt_check = returned + HALT_WATCH_PERIOD;
                        let halted = self.halted_for_good();
                        if halted || marked_halted {
                            marked_halted = halted;
                            if shared.halted.mark(self.id, halted) {
                                shared.exit.request(VmExit::Halted);
                            }
                        }
                    }
                    if let Some(every) = self.sample_rip_every.filter(|_| returned >= next_sample) {
                        next_sample = returned + every;
                        if let Ok(regs) = self.fd.get_regs() {
                            tracing::info!(
                                vcpu = self.id,
                                rip = format_args!("{:#x}", regs.rip),
                                "RIP sample"
                            );
                        }
                    }
                    Step::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => Step::WaitForStart,
                Err(e) => Step::Stop(VmExit::Fatal(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.id
                ))),
            };
            let step = match step {
                Step::InternalError => self.internal_error(shared),
                other => other,
            };
            if returned >= next_publish {
                next_publish = returned + PUBLISH_EVERY;
                self.publish(shared);
            }
            match step {
                Step::Continue | Step::InternalError => {}
                Step::WaitForStart => {
                    std::thread::sleep(WAIT_FOR_SIPI_POLL);
                    last_return = Instant::now();
                }
                Step::Stop(reason) => {
                    if matches!(reason, VmExit::TripleFault { .. }) {
                        self.log_state_after_triple_fault();
                    }
                    shared.exit.request(reason);
                    break;
                }
            }
        }
        shared.threads.unregister();
        self.report.emulated = self.emulator.counts().clone();
        self.report.final_rip = self.fd.get_regs().ok().map(|regs| regs.rip);
        self.report
    }

    /// Logs what KVM still holds of a vCPU that triple-faulted: on Intel the
    /// state it faulted in; on AMD, KVM has already put the vCPU through INIT
    /// (the VMCB is undefined after a shutdown), which the log says.
    fn log_state_after_triple_fault(&self) {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return;
        };
        let after_init = regs.rip == 0xfff0 && sregs.cs.base == 0xffff_0000;
        let events = self.fd.get_vcpu_events().ok();
        tracing::error!(
            vcpu = self.id,
            state = if after_init { "reset by KVM (AMD): not the faulting state" } else { "at the fault" },
            rip = format_args!("{:#x}", regs.rip),
            rsp = format_args!("{:#x}", regs.rsp),
            rflags = format_args!("{:#x}", regs.rflags),
            cr0 = format_args!("{:#x}", sregs.cr0),
            cr2 = format_args!("{:#x}", sregs.cr2),
            cr3 = format_args!("{:#x}", sregs.cr3),
            cr4 = format_args!("{:#x}", sregs.cr4),
            efer = format_args!("{:#x}", sregs.efer),
            cs = format_args!("{:#x}/{:#x}", sregs.cs.selector, sregs.cs.base),
            idt = format_args!("{:#x}+{:#x}", sregs.idt.base, sregs.idt.limit),
            gdt = format_args!("{:#x}+{:#x}", sregs.gdt.base, sregs.gdt.limit),
            pending_exception = ?events.map(|e| (e.exception.injected, e.exception.nr, e.exception.error_code)),
            "vCPU state after the triple fault"
        );
    }

    /// Whether this vCPU, just out of KVM_RUN, is halted for good.
    fn halted_for_good(&self) -> bool {
        let Ok(mp_state) = self.fd.get_mp_state() else {
            return false;
        };
        if mp_state.mp_state != kvm_bindings::KVM_MP_STATE_HALTED {
            return false;
        }
        let (Ok(regs), Ok(lapic)) = (self.fd.get_regs(), self.fd.get_lapic()) else {
            return false;
        };
        let svr = &lapic.regs[LAPIC_SVR_OFFSET..LAPIC_SVR_OFFSET + 4];
        let svr = u32::from_le_bytes([svr[0] as u8, svr[1] as u8, svr[2] as u8, svr[3] as u8]);
        halted_for_good(mp_state.mp_state, regs.rflags, svr)
    }

    fn publish(&mut self, shared: &VcpuShared) {
        self.report.emulated = self.emulator.counts().clone();
        lock(&shared.live_reports).insert(self.id, self.report.clone());
    }

    /// Waits out a pause. Before parking, KVM finishes the I/O the vCPU last
    /// exited for (an `in` gets its value into RAX), so the state read while
    /// parked is one the vCPU can resume from anywhere.
    fn park(&mut self, shared: &VcpuShared) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => tracing::warn!(vcpu = self.id, "completing I/O before a pause: {e}"),
            Ok(exit) => tracing::warn!(
                vcpu = self.id,
                "KVM ran the vCPU despite immediate_exit: {exit:?}"
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
        let (id, fd) = (self.id, &self.fd);
        shared.pause.park(&shared.exit, || {
            shared.captures.serve(id, fd, &shared.msr_indices)
        });
    }

    /// An emulation failure is finished here; any other internal error is fatal.
    fn internal_error(&mut self, shared: &VcpuShared) -> Step {
        let run = self.fd.get_kvm_run();
        // SAFETY: `internal` is the active union member after a
        // KVM_EXIT_INTERNAL_ERROR exit, which is what brought us here.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        if suberror != INTERNAL_ERROR_EMULATION {
            return Step::Stop(VmExit::Fatal(format!(
                "vCPU {}: KVM internal error, suberror {suberror}",
                self.id
            )));
        }
        let reported = reported_instruction(run).unwrap_or_default();
        self.report.exits.emulation += 1;
        match self.emulator.handle(&self.fd, &shared.memory, &reported) {
            Ok(_) => Step::Continue,
            Err(e) => Step::Stop(VmExit::Fatal(format!("vCPU {}: {e}", self.id))),
        }
    }
}

fn handle_exit(
    vcpu: usize,
    exit: VcpuExit<'_>,
    shared: &VcpuShared,
    counts: &mut ExitCounts,
) -> Step {
    match exit {
        VcpuExit::IoOut(port, data) => {
            counts.io_out += 1;
            if !shared.pio.write(u64::from(port), data) {
                tracing::trace!(port, ?data, "write to an unclaimed port");
            }
            Step::Continue
        }
        VcpuExit::IoIn(port, data) => {
            counts.io_in += 1;
            shared.pio.read(u64::from(port), data);
            Step::Continue
        }
        VcpuExit::MmioRead(address, data) => {
            counts.mmio_read += 1;
            shared.mmio.read(address, data);
            Step::Continue
        }
        VcpuExit::MmioWrite(address, data) => {
            counts.mmio_write += 1;
            if !shared.mmio.write(address, data) {
                tracing::debug!(address = format_args!("{address:#x}"), "write to unclaimed MMIO");
            }
            Step::Continue
        }
        VcpuExit::Hlt => {
            // Only seen without an in-kernel LAPIC; the LAPIC wakes the vCPU otherwise.
            counts.halt += 1;
            Step::Continue
        }
        VcpuExit::Shutdown => Step::Stop(VmExit::TripleFault { vcpu }),
        VcpuExit::SystemEvent(kind, _) => Step::Stop(match kind {
            SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
            SYSTEM_EVENT_RESET => VmExit::Reset,
            SYSTEM_EVENT_CRASH => VmExit::GuestPanic,
            other => VmExit::Fatal(format!("vCPU {vcpu}: unknown KVM system event {other}")),
        }),
        VcpuExit::InternalError => Step::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Step::Stop(VmExit::Fatal(format!(
            "vCPU {vcpu}: KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
        ))),
        VcpuExit::Intr => {
            counts.interrupted += 1;
            Step::Continue
        }
        other => {
            counts.other += 1;
            Step::Stop(VmExit::Fatal(format!("vCPU {vcpu}: unexpected KVM exit {other:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{
        KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
        KVM_MP_STATE_UNINITIALIZED,
    };

    /// RFLAGS with only the reserved bit 1: interrupts off.
    const IF_OFF: u64 = 0x2;
    const IF_ON: u64 = 0x2 | RFLAGS_IF;
    /// The LAPIC's reset SVR (software-disabled), and Linux's enabled one.
    const SVR_DISABLED: u32 = 0xff;
    const SVR_ENABLED: u32 = 0x1ff;

    #[test]
    fn only_a_halt_with_interrupts_off_and_the_lapic_disabled_is_for_good() {
        assert!(halted_for_good(KVM_MP_STATE_HALTED, IF_OFF, SVR_DISABLED));
        // `sti; hlt`: an idle guest waiting for an interrupt.
        assert!(!halted_for_good(KVM_MP_STATE_HALTED, IF_ON, SVR_DISABLED));
        assert!(!halted_for_good(KVM_MP_STATE_HALTED, IF_ON, SVR_ENABLED));
        // `cli; hlt` with the LAPIC on: its LVTs may still deliver an NMI.
        assert!(!halted_for_good(KVM_MP_STATE_HALTED, IF_OFF, SVR_ENABLED));
        // Running, or an application processor waiting for INIT/SIPI.
        for state in [
            KVM_MP_STATE_RUNNABLE,
            KVM_MP_STATE_UNINITIALIZED,
            KVM_MP_STATE_INIT_RECEIVED,
        ] {
            assert!(!halted_for_good(state, IF_OFF, SVR_DISABLED), "{state}");
        }
    }

    #[test]
    fn the_guest_ends_when_every_vcpu_is_halted_for_good() {
        let halted = HaltedVcpus::new(3);
        assert!(!halted.mark(0, true));
        assert!(!halted.mark(2, true));
        assert!(!halted.mark(1, false), "not halted: nothing ends");
        // vCPU 0 ran again: its mark is cleared.
        assert!(!halted.mark(0, false));
        assert!(!halted.mark(1, true));
        assert!(halted.mark(0, true));
        // Out of range ids are ignored.
        assert!(!halted.mark(7, false));
    }
}
