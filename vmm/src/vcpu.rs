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

    /// Called by a parked vCPU: hands over its state, read by `capture`,
    /// if it is asked for and not handed over yet.
    fn serve(&self, id: usize, capture: impl FnOnce() -> Result<VcpuState, String>) {
        let mut slots = lock(&self.slots);
        if !slots.wanted || slots.states.get(id).is_none_or(Option::is_some) {
            return;
        }
        slots.states[id] = Some(capture());
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

/// How often the vCPU's timer knocks it out of KVM_RUN: often enough for the
/// halt watch, the hypercall rescue and the RIP sampler, whichever are on.
fn watch_period(rescue_hypercalls: bool, sample_rip_every: Option<Duration>) -> Duration {
    let mut period = HALT_WATCH_PERIOD;
    if rescue_hypercalls {
        period = period.min(HYPERCALL_CHECK_PERIOD);
    }
    if let Some(sample) = sample_rip_every {
        period = period.min(sample);
    }
    period
}

/// How long a throttled vCPU stays out of the guest after it `ran`, so the
/// guest runs `100 - percent` percent of the time; `percent` is capped at 99
/// (a vCPU is never held out for good).
fn throttle_pause(ran: Duration, percent: u32) -> Duration {
    let percent = percent.min(99);
    ran * percent / (100 - percent)
}

/// One vCPU's part in noticing that the guest halted for good: its mark in
/// [`HaltedVcpus`] is set while a periodic check finds it halted for good and
/// cleared as soon as it runs again.
#[derive(Default)]
struct HaltWatch {
    marked: bool,
}

impl HaltWatch {
    /// KVM_RUN returned an exit: the vCPU ran, so it is not halted.
    fn ran(&mut self, id: usize, all: &HaltedVcpus) {
        if self.marked {
            self.marked = false;
            all.mark(id, false);
        }
    }

    /// A periodic check found the vCPU `halted` for good or not; true when
    /// every vCPU now is (the guest has ended).
    fn checked(&mut self, id: usize, halted: bool, all: &HaltedVcpus) -> bool {
        if halted || self.marked {
            self.marked = halted;
            return all.mark(id, halted);
        }
        false
    }
}

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

#[derive(Debug, PartialEq, Eq)]
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
        let period = watch_period(self.rescue_hypercalls, self.sample_rip_every);
        let _watch_timer = ThreadTimer::start(kick_signal, period)
            .inspect_err(|e| tracing::warn!(vcpu = self.id, "no vCPU watch timer: {e}"))
            .ok();
        let mut next_sample = Instant::now();
        let mut next_halt_check = Instant::now() + HALT_WATCH_PERIOD;
        let mut halt_watch = HaltWatch::default();
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
            let throttle = shared.throttle_percent.load(Ordering::Relaxed);
            if throttle > 0 {
                std::thread::sleep(throttle_pause(returned - throttle_served, throttle));
                throttle_served = Instant::now();
                last_return = throttle_served;
            } else {
                throttle_served = returned;
            }
            if result.is_ok() {
                // It ran (it exited for I/O or another reason): woken.
                halt_watch.ran(self.id, &shared.halted);
            }
            let step = match result {
                Ok(exit) => handle_exit(
                    self.id,
                    exit,
                    &shared.pio,
                    &shared.mmio,
                    &mut self.report.exits,
                ),
                Err(e) if e.errno() == libc::EINTR => {
                    self.report.exits.interrupted += 1;
                    if self.rescue_hypercalls {
                        self.rescue_hypercall(shared);
                    }
                    if returned >= next_halt_check {
                        next_halt_check = returned + HALT_WATCH_PERIOD;
                        let halted = self.halted_for_good();
                        if halt_watch.checked(self.id, halted, &shared.halted) {
                            shared.exit.request(VmExit::Halted);
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
            shared.captures.serve(id, || {
                VcpuState::capture(fd, &shared.msr_indices).map_err(|e| format!("vCPU {id}: {e}"))
            })
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

/// What vCPU `vcpu` does about one KVM exit: port and MMIO accesses go to
/// the buses, and the exit is counted or ends the VM with its reason.
fn handle_exit(
    vcpu: usize,
    exit: VcpuExit<'_>,
    pio: &Bus,
    mmio: &Bus,
    counts: &mut ExitCounts,
) -> Step {
    match exit {
        VcpuExit::IoOut(port, data) => {
            counts.io_out += 1;
            if !pio.write(u64::from(port), data) {
                tracing::trace!(port, ?data, "write to an unclaimed port");
            }
            Step::Continue
        }
        VcpuExit::IoIn(port, data) => {
            counts.io_in += 1;
            pio.read(u64::from(port), data);
            Step::Continue
        }
        VcpuExit::MmioRead(address, data) => {
            counts.mmio_read += 1;
            mmio.read(address, data);
            Step::Continue
        }
        VcpuExit::MmioWrite(address, data) => {
            counts.mmio_write += 1;
            if !mmio.write(address, data) {
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

    /// A real-time signal no other test uses, blocked by the threads that
    /// take it (a real-time signal's default action ends the process).
    fn test_signal(offset: i32) -> (i32, libc::sigset_t) {
        let signal = libc::SIGRTMIN() + offset;
        // SAFETY: plain signal-set calls on a zeroed set we own.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            set
        };
        (signal, set)
    }

    /// Blocks the signals of `set` in this thread.
    fn block(set: &libc::sigset_t) {
        // SAFETY: changes only this thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) };
    }

    /// Waits up to `limit` for a signal of `set` sent to this thread.
    fn took_signal(set: &libc::sigset_t, limit: Duration) -> bool {
        let timeout = libc::timespec {
            tv_sec: limit.as_secs() as _,
            tv_nsec: limit.subsec_nanos() as _,
        };
        // SAFETY: `set` and `timeout` are valid for the call.
        unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) >= 0 }
    }

    #[test]
    fn a_kick_reaches_every_registered_thread_and_a_thread_that_left_is_forgotten() {
        let (signal, set) = test_signal(6);
        let threads = Arc::new(VcpuThreads::default());
        let (report, reports) = std::sync::mpsc::channel();
        let (go_on, go) = std::sync::mpsc::channel::<()>();
        let go = Arc::new(Mutex::new(go));
        let workers: Vec<_> = [false, true]
            .into_iter()
            .map(|stays| {
                let (threads, report, go) = (threads.clone(), report.clone(), go.clone());
                std::thread::spawn(move || {
                    block(&set);
                    threads.register();
                    report.send(("ready", stays)).unwrap();
                    let kicked = took_signal(&set, Duration::from_secs(10));
                    report
                        .send((if kicked { "kicked" } else { "missed" }, stays))
                        .unwrap();
                    if !stays {
                        threads.unregister();
                        return;
                    }
                    lock(&go).recv().unwrap();
                    let kicked = took_signal(&set, Duration::from_secs(10));
                    report
                        .send((if kicked { "kicked" } else { "missed" }, stays))
                        .unwrap();
                    threads.unregister();
                })
            })
            .collect();
        let next = || reports.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!([next().0, next().0], ["ready", "ready"]);
        threads.kick(signal);
        let mut first = [next(), next()];
        first.sort();
        assert_eq!(first, [("kicked", false), ("kicked", true)]);
        // The thread that left is not signalled again (it is gone).
        let mut workers = workers.into_iter();
        workers.next().unwrap().join().unwrap();
        assert_eq!(lock(&threads.0).len(), 1);
        threads.kick(signal);
        go_on.send(()).unwrap();
        assert_eq!(next(), ("kicked", true));
        workers.next().unwrap().join().unwrap();
        assert!(lock(&threads.0).is_empty());
    }

    #[test]
    fn a_thread_timer_signals_its_thread_each_period_until_dropped() {
        let (signal, set) = test_signal(7);
        std::thread::spawn(move || {
            block(&set);
            let timer = ThreadTimer::start(signal, Duration::from_millis(20)).unwrap();
            for tick in 0..5 {
                assert!(
                    took_signal(&set, Duration::from_secs(5)),
                    "tick {tick} did not come"
                );
            }
            drop(timer);
            // One may have been sent just before the drop.
            took_signal(&set, Duration::from_millis(50));
            assert!(
                !took_signal(&set, Duration::from_millis(200)),
                "the timer went on after it was dropped"
            );
        })
        .join()
        .unwrap();
    }

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

    /// Records writes and answers reads with its offset, on one bus range.
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl crate::devices::BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn bus_with(start: u64, len: u64) -> (Bus, Arc<Mutex<Recorder>>) {
        let device = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::default();
        bus.insert(start, len, device.clone()).unwrap();
        (bus, device)
    }

    const UART: u64 = 0x3f8;
    const MMIO: u64 = 0xd000_0000;

    #[test]
    fn port_and_mmio_exits_reach_the_buses_and_are_counted() {
        let (pio, port_device) = bus_with(UART, 8);
        let (mmio, mmio_device) = bus_with(MMIO, 0x1000);
        let mut counts = ExitCounts::default();
        macro_rules! run {
            ($exit:expr) => {
                handle_exit(0, $exit, &pio, &mmio, &mut counts)
            };
        }
        assert_eq!(
            run!(VcpuExit::IoOut(UART as u16 + 1, &[0x41])),
            Step::Continue
        );
        // Unclaimed: ignored, still counted.
        assert_eq!(run!(VcpuExit::IoOut(0x80, &[0x42])), Step::Continue);
        let mut byte = [0u8; 1];
        assert_eq!(
            run!(VcpuExit::IoIn(UART as u16 + 5, &mut byte)),
            Step::Continue
        );
        assert_eq!(byte, [5]);
        let mut word = [0u8; 2];
        assert_eq!(run!(VcpuExit::IoIn(0x71, &mut word)), Step::Continue);
        assert_eq!(word, [0xff, 0xff], "an unclaimed port reads all ones");
        let mut dword = [0u8; 4];
        assert_eq!(
            run!(VcpuExit::MmioRead(MMIO + 0x10, &mut dword)),
            Step::Continue
        );
        assert_eq!(dword, [0x10; 4]);
        assert_eq!(
            run!(VcpuExit::MmioRead(0xfee0_0000, &mut dword)),
            Step::Continue
        );
        assert_eq!(dword, [0xff; 4]);
        assert_eq!(
            run!(VcpuExit::MmioWrite(MMIO + 0x20, &[1, 2, 3, 4])),
            Step::Continue
        );
        assert_eq!(run!(VcpuExit::MmioWrite(0x1000, &[9])), Step::Continue);
        assert_eq!(run!(VcpuExit::MmioWrite(0x1001, &[9])), Step::Continue);
        assert_eq!(run!(VcpuExit::Hlt), Step::Continue);
        assert_eq!(run!(VcpuExit::Intr), Step::Continue);
        assert_eq!(
            counts,
            ExitCounts {
                io_in: 2,
                io_out: 2,
                mmio_read: 2,
                mmio_write: 3,
                emulation: 0,
                halt: 1,
                interrupted: 1,
                other: 0,
            }
        );
        assert_eq!(lock(&port_device).0, vec![(1, vec![0x41])]);
        assert_eq!(lock(&mmio_device).0, vec![(0x20, vec![1, 2, 3, 4])]);
    }

    #[test]
    fn exits_that_end_the_vm_say_why() {
        let (pio, mmio) = (Bus::default(), Bus::default());
        let mut counts = ExitCounts::default();
        macro_rules! run {
            ($exit:expr) => {
                handle_exit(3, $exit, &pio, &mmio, &mut counts)
            };
        }
        let stop = |exit: VmExit| Step::Stop(exit);
        assert_eq!(
            run!(VcpuExit::Shutdown),
            stop(VmExit::TripleFault { vcpu: 3 })
        );
        assert_eq!(run!(VcpuExit::SystemEvent(1, &[])), stop(VmExit::PowerOff));
        assert_eq!(run!(VcpuExit::SystemEvent(2, &[])), stop(VmExit::Reset));
        assert_eq!(
            run!(VcpuExit::SystemEvent(3, &[0])),
            stop(VmExit::GuestPanic)
        );
        assert_eq!(
            run!(VcpuExit::SystemEvent(4, &[])),
            stop(VmExit::Fatal("vCPU 3: unknown KVM system event 4".into()))
        );
        // Finished by the instruction emulator, or fatal: decided later.
        assert_eq!(run!(VcpuExit::InternalError), Step::InternalError);
        assert_eq!(
            run!(VcpuExit::FailEntry(0x8000_0021, 2)),
            stop(VmExit::Fatal(
                "vCPU 3: KVM could not enter the guest (hardware reason 0x80000021 on host CPU 2)"
                    .into()
            ))
        );
        assert_eq!(counts, ExitCounts::default(), "none of these is counted");
        // An exit nothing expects is counted and fatal.
        let Step::Stop(VmExit::Fatal(reason)) = run!(VcpuExit::Unknown) else {
            panic!("an unexpected exit must stop the VM");
        };
        assert_eq!(reason, "vCPU 3: unexpected KVM exit Unknown");
        assert_eq!(
            run!(VcpuExit::Nmi),
            Step::Stop(VmExit::Fatal("vCPU 3: unexpected KVM exit Nmi".into()))
        );
        assert_eq!(
            counts,
            ExitCounts {
                other: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_throttled_vcpu_runs_its_share_of_the_time() {
        let ran = Duration::from_millis(10);
        assert_eq!(throttle_pause(ran, 0), Duration::ZERO);
        assert_eq!(throttle_pause(ran, 50), ran);
        assert_eq!(throttle_pause(ran, 20), Duration::from_micros(2500));
        assert_eq!(throttle_pause(ran, 75), Duration::from_millis(30));
        assert_eq!(throttle_pause(ran, 99), Duration::from_millis(990));
        // Never held out for good, and no division by zero.
        assert_eq!(throttle_pause(ran, 100), Duration::from_millis(990));
        assert_eq!(throttle_pause(ran, u32::MAX), Duration::from_millis(990));
        // The guest's share of wall time is 100 - percent.
        for percent in 1..=99 {
            let pause = throttle_pause(ran, percent);
            let share = ran.as_secs_f64() / (ran + pause).as_secs_f64();
            let wanted = f64::from(100 - percent) / 100.0;
            assert!((share - wanted).abs() < 1e-6, "{percent}%: {share}");
        }
    }

    #[test]
    fn the_watch_timer_serves_the_most_frequent_watcher() {
        let ms = Duration::from_millis;
        assert_eq!(watch_period(false, None), HALT_WATCH_PERIOD);
        assert_eq!(HALT_WATCH_PERIOD, ms(500));
        assert_eq!(watch_period(true, None), HYPERCALL_CHECK_PERIOD);
        assert_eq!(HYPERCALL_CHECK_PERIOD, ms(20));
        assert_eq!(watch_period(false, Some(ms(5))), ms(5));
        assert_eq!(watch_period(false, Some(ms(2000))), ms(500));
        assert_eq!(watch_period(true, Some(ms(100))), ms(20));
        assert_eq!(watch_period(true, Some(ms(1))), ms(1));
    }

    #[test]
    fn a_vcpu_counts_as_halted_only_until_it_runs_again() {
        let all = HaltedVcpus::new(2);
        let (mut zero, mut one) = (HaltWatch::default(), HaltWatch::default());
        assert!(!zero.checked(0, true, &all), "vCPU 1 still runs");
        // vCPU 0 ran (an exit): its mark goes.
        zero.ran(0, &all);
        assert!(!one.checked(1, true, &all), "vCPU 0's mark was cleared");
        assert!(zero.checked(0, true, &all), "both halted for good");
        // A check that finds a marked vCPU running clears its mark.
        assert!(!zero.checked(0, false, &all));
        assert!(!one.checked(1, true, &all));
        // A vCPU that was never marked leaves the others' marks alone.
        assert!(zero.checked(0, true, &all));
        let mut other = HaltWatch::default();
        other.ran(0, &all);
        assert!(!other.checked(0, false, &all));
        assert!(one.checked(1, true, &all), "vCPU 0's mark is still there");
    }

    fn state(rip: u64) -> Result<VcpuState, String> {
        Ok(VcpuState {
            cpuid: Vec::new(),
            regs: kvm_bindings::kvm_regs {
                rip,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            events: Default::default(),
            mp_state: Default::default(),
            debug_regs: Default::default(),
        })
    }

    fn rips(states: Vec<VcpuState>) -> Vec<u64> {
        states.iter().map(|s| s.regs.rip).collect()
    }

    #[test]
    fn vcpu_states_are_handed_over_once_when_asked_in_vcpu_order() {
        let never = || -> Result<VcpuState, String> { panic!("read without being asked") };
        let captures = Captures::new(2);
        captures.serve(0, never);
        captures.request();
        captures.serve(1, || state(0x11));
        // Once per request; ids beyond the VM's are ignored.
        captures.serve(1, never);
        captures.serve(2, never);
        let short = Duration::from_millis(10);
        assert_eq!(
            captures.collect(short).unwrap_err(),
            "a vCPU did not hand over its state in time"
        );
        // A timed-out request is over.
        captures.serve(0, never);
        // A new request starts afresh.
        captures.request();
        captures.serve(1, || state(0x21));
        captures.serve(0, || state(0x20));
        assert_eq!(rips(captures.collect(short).unwrap()), [0x20, 0x21]);
        captures.serve(0, never);
        // One vCPU's failure fails the capture.
        captures.request();
        captures.serve(0, || state(0x30));
        captures.serve(1, || Err("vCPU 1: no".into()));
        assert_eq!(captures.collect(short).unwrap_err(), "vCPU 1: no");
        // The collector waits for states handed over from other threads.
        let captures = Arc::new(captures);
        captures.request();
        let servers: Vec<_> = (0..2)
            .map(|id| {
                let captures = captures.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    captures.serve(id, || state(0x40 + id as u64));
                })
            })
            .collect();
        assert_eq!(
            rips(captures.collect(Duration::from_secs(10)).unwrap()),
            [0x40, 0x41]
        );
        servers.into_iter().for_each(|s| s.join().unwrap());
    }

    #[test]
    fn exit_counts_are_named_by_their_reason() {
        let counts = ExitCounts {
            io_in: 1,
            io_out: 2,
            mmio_read: 3,
            mmio_write: 4,
            emulation: 5,
            halt: 6,
            interrupted: 7,
            other: 8,
        };
        assert_eq!(
            counts.by_reason(),
            [
                ("io_in", 1),
                ("io_out", 2),
                ("mmio_read", 3),
                ("mmio_write", 4),
                ("emulation", 5),
                ("halt", 6),
                ("interrupted", 7),
                ("other", 8),
            ]
        );
    }
}
