//! Finishes guest instructions that KVM's instruction emulator gave up on.
//!
//! On hosts whose KVM runs guest CPL0 code in its software emulator (see
//! shared/host-kvm.md), instructions that emulator lacks end `KVM_RUN` with
//! `KVM_EXIT_INTERNAL_ERROR`/`KVM_INTERNAL_ERROR_EMULATION`. The vCPU loop hands such
//! exits to [`InstructionEmulator::handle`], which decodes the instruction with
//! `iced-x86`, performs it on the vCPU's registers and on guest memory (through the
//! guest's own page tables, `mmu`), and either completes it (RIP advanced) or injects
//! the exception the CPU would have raised. Anything it does not implement comes back
//! as [`EmulationError::Unsupported`]: the VM must stop rather than guess.

mod instructions;
mod mmu;
mod xsave;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use iced_x86::{
    Decoder, DecoderError, DecoderOptions, Formatter, Instruction, IntelFormatter, Register,
};
use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemory;

use mmu::{Access, Chunk, Paging};
use xsave::XsaveLayout;

/// The longest x86 instruction.
const MAX_INSTRUCTION_LEN: usize = 15;

pub(crate) const RFLAGS_CF: u64 = 1 << 0;
pub(crate) const RFLAGS_PF: u64 = 1 << 2;
pub(crate) const RFLAGS_AF: u64 = 1 << 4;
pub(crate) const RFLAGS_ZF: u64 = 1 << 6;
pub(crate) const RFLAGS_SF: u64 = 1 << 7;
pub(crate) const RFLAGS_OF: u64 = 1 << 11;
pub(crate) const RFLAGS_RF: u64 = 1 << 16;
pub(crate) const RFLAGS_VM: u64 = 1 << 17;
pub(crate) const RFLAGS_AC: u64 = 1 << 18;
/// The six arithmetic status flags.
pub(crate) const RFLAGS_ARITH: u64 =
    RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;

pub(crate) const CR0_PE: u64 = 1 << 0;
pub(crate) const CR0_MP: u64 = 1 << 1;
pub(crate) const CR0_EM: u64 = 1 << 2;
pub(crate) const CR0_TS: u64 = 1 << 3;
pub(crate) const CR0_NE: u64 = 1 << 5;
pub(crate) const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PSE: u64 = 1 << 4;
pub(crate) const CR4_PAE: u64 = 1 << 5;
pub(crate) const CR4_OSFXSR: u64 = 1 << 9;
pub(crate) const CR4_LA57: u64 = 1 << 12;
pub(crate) const CR4_OSXSAVE: u64 = 1 << 18;
pub(crate) const CR4_SMEP: u64 = 1 << 20;
pub(crate) const CR4_SMAP: u64 = 1 << 21;
pub(crate) const EFER_LMA: u64 = 1 << 10;
pub(crate) const EFER_NXE: u64 = 1 << 11;

pub(crate) const MSR_IA32_XSS: u32 = 0xda0;

/// Access to one vCPU's architectural state. Implemented for [`kvm_ioctls::VcpuFd`] and,
/// in the unit tests, by a plain in-memory struct.
pub trait VcpuState {
    fn regs(&self) -> Result<kvm_regs, EmulationError>;
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), EmulationError>;
    fn sregs(&self) -> Result<kvm_sregs, EmulationError>;
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), EmulationError>;
    /// KVM_GET_XSAVE: the standard (non-compacted) 4 KiB layout.
    fn xsave(&self) -> Result<kvm_xsave, EmulationError>;
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), EmulationError>;
    fn xcrs(&self) -> Result<kvm_xcrs, EmulationError>;
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), EmulationError>;
    fn vcpu_events(&self) -> Result<kvm_vcpu_events, EmulationError>;
    fn set_vcpu_events(&self, ev: &kvm_vcpu_events) -> Result<(), EmulationError>;
    /// One MSR, or `None` when KVM does not know it for this vCPU.
    fn read_msr(&self, index: u32) -> Result<Option<u64>, EmulationError>;
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> EmulationError {
    move |source| EmulationError::Kvm { what, source }
}

impl VcpuState for VcpuFd {
    fn regs(&self) -> Result<kvm_regs, EmulationError> {
        self.get_regs().map_err(kvm_error("KVM_GET_REGS"))
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), EmulationError> {
        VcpuFd::set_regs(self, regs).map_err(kvm_error("KVM_SET_REGS"))
    }
    fn sregs(&self) -> Result<kvm_sregs, EmulationError> {
        self.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), EmulationError> {
        VcpuFd::set_sregs(self, sregs).map_err(kvm_error("KVM_SET_SREGS"))
    }
    fn xsave(&self) -> Result<kvm_xsave, EmulationError> {
        self.get_xsave().map_err(kvm_error("KVM_GET_XSAVE"))
    }
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), EmulationError> {
        // SAFETY: KVM_SET_XSAVE copies the vCPU's uabi XSAVE size from `xsave`, which is a
        // whole 4 KiB kvm_xsave. That size exceeds 4 KiB only when the VMM process has
        // requested dynamic XSTATE features (AMX) with arch_prctl, which Bulkhead never does.
        unsafe { VcpuFd::set_xsave(self, xsave) }.map_err(kvm_error("KVM_SET_XSAVE"))
    }
    fn xcrs(&self) -> Result<kvm_xcrs, EmulationError> {
        self.get_xcrs().map_err(kvm_error("KVM_GET_XCRS"))
    }
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), EmulationError> {
        VcpuFd::set_xcrs(self, xcrs).map_err(kvm_error("KVM_SET_XCRS"))
    }
    fn vcpu_events(&self) -> Result<kvm_vcpu_events, EmulationError> {
        self.get_vcpu_events()
            .map_err(kvm_error("KVM_GET_VCPU_EVENTS"))
    }
    fn set_vcpu_events(&self, ev: &kvm_vcpu_events) -> Result<(), EmulationError> {
        VcpuFd::set_vcpu_events(self, ev).map_err(kvm_error("KVM_SET_VCPU_EVENTS"))
    }
    fn read_msr(&self, index: u32) -> Result<Option<u64>, EmulationError> {
        let entry = kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut msrs = Msrs::from_entries(&[entry])
            .map_err(|e| EmulationError::MsrBuffer(format!("{e:?}")))?;
        let read = self
            .get_msrs(&mut msrs)
            .map_err(kvm_error("KVM_GET_MSRS"))?;
        Ok((read == 1).then(|| msrs.as_slice()[0].data))
    }
}

/// What [`InstructionEmulator::handle`] did with the instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction completed; RIP points past it.
    Completed,
    /// The instruction raised an exception, now injected into the vCPU. For faults RIP
    /// still points at the instruction; for traps (`int3`, `int1`, `into`) past it.
    ExceptionInjected { vector: u8 },
}

#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build a KVM MSR buffer: {0}")]
    MsrBuffer(String),
    #[error(
        "cannot emulate {} ({}) at guest RIP {rip:#x}: {reason}",
        quoted_disassembly(.disassembly),
        hex_bytes(.bytes)
    )]
    Unsupported {
        rip: u64,
        bytes: Vec<u8>,
        disassembly: Option<String>,
        reason: &'static str,
    },
    #[error("guest-physical range {gpa:#x}+{len:#x} is not guest RAM")]
    GuestPhysical { gpa: u64, len: usize },
    #[error("the guest page tables for linear address {linear:#x} kept changing during the walk")]
    PageTableContention { linear: u64 },
}

fn quoted_disassembly(disassembly: &Option<String>) -> String {
    match disassembly {
        Some(text) => format!("\"{text}\""),
        None => "an undecodable instruction".to_string(),
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, byte) in bytes.iter().enumerate() {
        let separator = if i == 0 { "" } else { " " };
        let _ = write!(out, "{separator}{byte:02x}");
    }
    out
}

/// The instruction bytes KVM reported with an emulation-failure exit, if `run` holds one
/// that carries them (`KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`).
pub fn reported_instruction(run: &kvm_run) -> Option<Vec<u8>> {
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: exit_reason says the union holds the internal-error member; the
    // emulation_failure view is its documented layout for suberror 1, and both are plain
    // integers and byte arrays for which every bit pattern is valid.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    if failure.suberror != KVM_INTERNAL_ERROR_EMULATION
        || failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0
    {
        return None;
    }
    // SAFETY: as above; insn_size and insn_bytes are u8 fields of a plain-data struct.
    let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    let len = usize::from(insn.insn_size).min(insn.insn_bytes.len());
    Some(insn.insn_bytes[..len].to_vec())
}

/// Per-vCPU instruction emulator with counters.
pub struct InstructionEmulator {
    counts: BTreeMap<String, u64>,
    cpu: CpuModel,
}

/// The CPU facts the emulator needs, as CPUID reports them (the guest sees the host's
/// CPUID on these machines).
#[derive(Clone, Debug)]
pub(crate) struct CpuModel {
    pub xsave: XsaveLayout,
    /// MAXPHYADDR: physical-address bits above it are reserved in page-table entries.
    pub phys_addr_bits: u8,
    pub rdrand: bool,
    pub rdseed: bool,
}

impl CpuModel {
    fn host() -> Self {
        let extended_max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
        let phys_addr_bits = if extended_max >= 0x8000_0008 {
            (core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff) as u8
        } else {
            36
        };
        CpuModel {
            xsave: XsaveLayout::from_host(),
            phys_addr_bits: phys_addr_bits.clamp(32, 52),
            rdrand: std::arch::is_x86_feature_detected!("rdrand"),
            rdseed: std::arch::is_x86_feature_detected!("rdseed"),
        }
    }
}

impl Default for InstructionEmulator {
    fn default() -> Self {
        Self::new()
    }
}

impl InstructionEmulator {
    pub fn new() -> Self {
        Self::with_cpu(CpuModel::host())
    }

    pub(crate) fn with_cpu(cpu: CpuModel) -> Self {
        InstructionEmulator {
            counts: BTreeMap::new(),
            cpu,
        }
    }

    /// Called on KVM_EXIT_INTERNAL_ERROR/emulation. `reported` = the instruction bytes KVM
    /// gave (may be empty or cut short: then they are fetched from guest memory at CS:RIP
    /// through the guest page tables).
    pub fn handle<M: GuestMemory>(
        &mut self,
        vcpu: &impl VcpuState,
        mem: &M,
        reported: &[u8],
    ) -> Result<Outcome, EmulationError> {
        let mut cx = Context::new(vcpu, mem, &self.cpu)?;
        let decoded = match cx.decode(reported) {
            Ok(decoded) => decoded,
            Err(Stop::Exception(exception)) => return cx.inject(exception),
            Err(Stop::Error(error)) => return Err(error),
        };
        let result =
            instructions::execute(&mut cx, &decoded).and_then(|completion| cx.commit(completion));
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(Stop::Exception(exception)) => cx.inject(exception)?,
            Err(Stop::Error(error)) => return Err(error),
        };
        let mnemonic = format!("{:?}", decoded.instruction.mnemonic()).to_lowercase();
        tracing::trace!(%mnemonic, rip = cx.regs.rip, ?outcome, "emulated instruction");
        *self.counts.entry(mnemonic).or_insert(0) += 1;
        Ok(outcome)
    }

    /// Handled instruction counts by mnemonic (lowercase, e.g. "popcnt"), for the
    /// end-of-run report.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }
}

/// An exception the emulated instruction raises in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// For #PF: the faulting linear address, for CR2.
    pub page_fault_address: Option<u64>,
}

pub(crate) const VECTOR_DB: u8 = 1;
pub(crate) const VECTOR_BP: u8 = 3;
pub(crate) const VECTOR_OF: u8 = 4;
pub(crate) const VECTOR_UD: u8 = 6;
pub(crate) const VECTOR_NM: u8 = 7;
pub(crate) const VECTOR_SS: u8 = 12;
pub(crate) const VECTOR_GP: u8 = 13;
pub(crate) const VECTOR_PF: u8 = 14;
pub(crate) const VECTOR_MF: u8 = 16;

impl Exception {
    pub fn without_code(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
            page_fault_address: None,
        }
    }
    pub fn with_zero_code(vector: u8) -> Self {
        Exception {
            vector,
            error_code: Some(0),
            page_fault_address: None,
        }
    }
    pub fn general_protection() -> Self {
        Self::with_zero_code(VECTOR_GP)
    }
    pub fn invalid_opcode() -> Self {
        Self::without_code(VECTOR_UD)
    }
    pub fn page_fault(linear: u64, error_code: u32) -> Self {
        Exception {
            vector: VECTOR_PF,
            error_code: Some(error_code),
            page_fault_address: Some(linear),
        }
    }
}

/// Why an instruction did not run to completion: a guest exception, or a VMM error.
#[derive(Debug)]
pub(crate) enum Stop {
    Exception(Exception),
    Error(EmulationError),
}

impl From<Exception> for Stop {
    fn from(exception: Exception) -> Self {
        Stop::Exception(exception)
    }
}

impl From<EmulationError> for Stop {
    fn from(error: EmulationError) -> Self {
        Stop::Error(error)
    }
}

pub(crate) type Step<T> = Result<T, Stop>;

/// How a handled instruction ends.
#[derive(Debug)]
pub(crate) enum Completion {
    /// RIP moves past the instruction.
    Next,
    /// RIP moves past the instruction, then this trap-class exception is delivered.
    Trap(Exception),
}

pub(crate) struct Decoded {
    pub instruction: Instruction,
    pub bytes: Vec<u8>,
}

/// One handle() call: the vCPU's state as read at the exit, and what the instruction
/// changes, written back by `commit`.
pub(crate) struct Context<'a, V: VcpuState, M: GuestMemory> {
    pub vcpu: &'a V,
    pub mem: &'a M,
    pub cpu: &'a CpuModel,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// Code size of CS: 16, 32 or 64.
    pub bitness: u32,
    pub cpl: u8,
    /// The vCPU's XSAVE area as bytes, loaded on first use.
    xsave_area: Option<Box<[u8; xsave::KVM_AREA_SIZE]>>,
    xsave_dirty: bool,
    /// XCR0, read from KVM on first use.
    xcr0: Option<u64>,
    /// The instruction being emulated, for Unsupported reports.
    current: Option<(u64, Vec<u8>, String)>,
}

impl<'a, V: VcpuState, M: GuestMemory> Context<'a, V, M> {
    fn new(vcpu: &'a V, mem: &'a M, cpu: &'a CpuModel) -> Result<Self, EmulationError> {
        let regs = vcpu.regs()?;
        let sregs = vcpu.sregs()?;
        let protected = sregs.cr0 & CR0_PE != 0;
        let bitness = if !protected || regs.rflags & RFLAGS_VM != 0 {
            16
        } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
            64
        } else if sregs.cs.db != 0 {
            32
        } else {
            16
        };
        let cpl = if !protected {
            0
        } else if regs.rflags & RFLAGS_VM != 0 {
            3
        } else {
            sregs.ss.dpl & 3
        };
        Ok(Context {
            vcpu,
            mem,
            cpu,
            regs,
            sregs,
            bitness,
            cpl,
            xsave_area: None,
            xsave_dirty: false,
            xcr0: None,
            current: None,
        })
    }

    pub fn long_mode(&self) -> bool {
        self.bitness == 64
    }

    fn ip_mask(&self) -> u64 {
        match self.bitness {
            64 => u64::MAX,
            32 => u64::from(u32::MAX),
            _ => u64::from(u16::MAX),
        }
    }

    pub fn paging(&self) -> Paging {
        Paging {
            cr0: self.sregs.cr0,
            cr3: self.sregs.cr3,
            cr4: self.sregs.cr4,
            efer: self.sregs.efer,
            cpl: self.cpl,
            alignment_check: self.regs.rflags & RFLAGS_AC != 0,
            phys_addr_bits: self.cpu.phys_addr_bits,
        }
    }

    /// Linear addresses are 32 bits wide outside 64-bit mode.
    fn linear_mask(&self) -> u64 {
        if self.long_mode() {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        }
    }

    /// The Unsupported error for the instruction being emulated.
    pub fn unsupported(&self, reason: &'static str) -> Stop {
        let (rip, bytes, disassembly) = match &self.current {
            Some((rip, bytes, text)) => (*rip, bytes.clone(), Some(text.clone())),
            None => (self.regs.rip, Vec::new(), None),
        };
        EmulationError::Unsupported {
            rip,
            bytes,
            disassembly,
            reason,
        }
        .into()
    }

    fn decode(&mut self, reported: &[u8]) -> Step<Decoded> {
        let rip = self.regs.rip & self.ip_mask();
        if let DecodeAttempt::Complete(decoded) = decode_one(self.bitness, rip, reported) {
            return self.accept(rip, decoded);
        }
        let (fetched, fault_after_fetched) = self.fetch_code(rip)?;
        match (decode_one(self.bitness, rip, &fetched), fault_after_fetched) {
            (DecodeAttempt::Complete(decoded), _) => self.accept(rip, decoded),
            // The instruction runs into a page that cannot be fetched.
            (DecodeAttempt::NeedMoreBytes, Some(fault)) => Err(fault),
            _ => {
                let bytes = if fetched.is_empty() {
                    reported.to_vec()
                } else {
                    fetched
                };
                Err(EmulationError::Unsupported {
                    rip,
                    bytes,
                    disassembly: None,
                    reason: "the bytes do not decode",
                }
                .into())
            }
        }
    }

    fn accept(&mut self, rip: u64, decoded: Decoded) -> Step<Decoded> {
        let mut text = String::new();
        IntelFormatter::new().format(&decoded.instruction, &mut text);
        self.current = Some((rip, decoded.bytes.clone(), text));
        if self.regs.rflags & RFLAGS_VM != 0 {
            return Err(self.unsupported("virtual-8086 mode is not emulated"));
        }
        Ok(decoded)
    }

    /// Up to 15 code bytes at CS:RIP. A fault on the second page is returned rather than
    /// raised: it matters only if the instruction really extends into that page.
    fn fetch_code(&self, rip: u64) -> Step<(Vec<u8>, Option<Stop>)> {
        let base = if self.long_mode() {
            0
        } else {
            self.sregs.cs.base
        };
        let linear = base.wrapping_add(rip) & self.linear_mask();
        let first_len = (mmu::PAGE_SIZE - (linear & (mmu::PAGE_SIZE - 1)))
            .min(MAX_INSTRUCTION_LEN as u64) as usize;
        let paging = self.paging();
        let mut bytes = vec![0u8; MAX_INSTRUCTION_LEN];
        let first = mmu::translate(self.mem, &paging, linear, Access::Execute)?;
        mmu::read_phys(self.mem, first.gpa, &mut bytes[..first_len])?;
        if first_len == MAX_INSTRUCTION_LEN {
            return Ok((bytes, None));
        }
        let second_linear = linear.wrapping_add(first_len as u64) & self.linear_mask();
        let second = mmu::translate(self.mem, &paging, second_linear, Access::Execute)
            .and_then(|t| Ok(mmu::read_phys(self.mem, t.gpa, &mut bytes[first_len..])?));
        match second {
            Ok(()) => Ok((bytes, None)),
            Err(stop) => {
                bytes.truncate(first_len);
                Ok((bytes, Some(stop)))
            }
        }
    }

    pub fn gpr(&self, reg: Register) -> u64 {
        read_gpr(&self.regs, reg).unwrap_or(0)
    }

    /// Writes a general register with the CPU's width rules: 8- and 16-bit writes keep
    /// the other bits, 32-bit writes zero the upper half.
    pub fn set_gpr(&mut self, reg: Register, value: u64) {
        let high_byte = matches!(
            reg,
            Register::AH | Register::CH | Register::DH | Register::BH
        );
        let size = reg.size();
        if let Some(slot) = gpr_slot(&mut self.regs, reg.full_register()) {
            *slot = match size {
                1 if high_byte => (*slot & !0xff00) | ((value & 0xff) << 8),
                1 => (*slot & !0xff) | (value & 0xff),
                2 => (*slot & !0xffff) | (value & 0xffff),
                4 => value & u64::from(u32::MAX),
                _ => value,
            };
        }
    }

    /// EDX:EAX as one 64-bit value.
    pub fn edx_eax(&self) -> u64 {
        (self.regs.rdx << 32) | (self.regs.rax & u64::from(u32::MAX))
    }

    pub fn set_flags(&mut self, mask: u64, set: u64) {
        self.regs.rflags = (self.regs.rflags & !mask) | (set & mask);
    }

    /// The linear address of memory operand `operand`, checked to be canonical for an
    /// access of `len` bytes in 64-bit mode.
    pub fn operand_address(
        &self,
        instruction: &Instruction,
        operand: u32,
        len: usize,
    ) -> Step<u64> {
        let regs = self.regs;
        let sregs = self.sregs;
        let long = self.long_mode();
        let address = instruction.virtual_address(operand, 0, |reg, _, _| match reg {
            Register::ES | Register::CS | Register::SS | Register::DS if long => Some(0),
            Register::ES => Some(sregs.es.base),
            Register::CS => Some(sregs.cs.base),
            Register::SS => Some(sregs.ss.base),
            Register::DS => Some(sregs.ds.base),
            Register::FS => Some(sregs.fs.base),
            Register::GS => Some(sregs.gs.base),
            other => read_gpr(&regs, other),
        });
        let Some(address) = address else {
            return Err(
                self.unsupported("its memory operand uses registers the emulator cannot read")
            );
        };
        if !long {
            return Ok(address & u64::from(u32::MAX));
        }
        let la57 = self.sregs.cr4 & CR4_LA57 != 0;
        let last = address.wrapping_add(len.saturating_sub(1) as u64);
        if !mmu::is_canonical(address, la57) || !mmu::is_canonical(last, la57) {
            let vector = if instruction.memory_segment() == Register::SS {
                VECTOR_SS
            } else {
                VECTOR_GP
            };
            return Err(Exception::with_zero_code(vector).into());
        }
        Ok(address)
    }

    /// Translates `len` bytes at `linear` for `access`, raising #PF if any page fails.
    pub fn translate(&self, linear: u64, len: usize, access: Access) -> Step<Vec<Chunk>> {
        mmu::translate_range(
            self.mem,
            &self.paging(),
            linear,
            len,
            access,
            self.linear_mask(),
        )
    }

    pub fn read(&self, linear: u64, buf: &mut [u8]) -> Step<()> {
        self.reader()(linear, buf)
    }

    /// A reader of guest linear memory that does not borrow the context.
    pub fn reader(&self) -> impl Fn(u64, &mut [u8]) -> Step<()> + 'a {
        let (mem, paging, linear_mask) = (self.mem, self.paging(), self.linear_mask());
        move |linear, buf| {
            let chunks =
                mmu::translate_range(mem, &paging, linear, buf.len(), Access::Read, linear_mask)?;
            Ok(mmu::read_chunks(mem, &chunks, buf)?)
        }
    }

    pub fn read_u64(&self, linear: u64, len: usize) -> Step<u64> {
        let mut bytes = [0u8; 8];
        self.read(linear, &mut bytes[..len.min(8)])?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Writes several byte runs at offsets from `base`, all or none: every page is
    /// translated (and may fault) before the first byte is stored.
    pub fn write_spans(&self, base: u64, spans: &[xsave::Span]) -> Step<()> {
        let mut plans = Vec::with_capacity(spans.len());
        for span in spans {
            let linear = base.wrapping_add(span.offset as u64) & self.linear_mask();
            plans.push(self.translate(linear, span.bytes.len(), Access::Write)?);
        }
        for (chunks, span) in plans.iter().zip(spans) {
            mmu::write_chunks(self.mem, chunks, &span.bytes)?;
        }
        Ok(())
    }

    pub fn write(&self, linear: u64, bytes: &[u8]) -> Step<()> {
        self.write_spans(
            linear,
            &[xsave::Span {
                offset: 0,
                bytes: bytes.to_vec(),
            }],
        )
    }

    pub fn xcrs(&self) -> Step<kvm_xcrs> {
        Ok(self.vcpu.xcrs()?)
    }

    /// XCR0 (x87 alone if KVM reports no XCRs, as on a CPU without XSAVE).
    pub fn xcr0(&mut self) -> Step<u64> {
        if let Some(xcr0) = self.xcr0 {
            return Ok(xcr0);
        }
        let xcrs = self.xcrs()?;
        let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        let xcr0 = xcrs.xcrs[..count]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(xsave::XFEATURE_X87, |x| x.value);
        self.xcr0 = Some(xcr0);
        Ok(xcr0)
    }

    /// The vCPU's XSAVE area (standard format), fetched from KVM on first use.
    pub fn xsave_area(&mut self) -> Step<&mut [u8; xsave::KVM_AREA_SIZE]> {
        if self.xsave_area.is_none() {
            let kvm = self.vcpu.xsave()?;
            let mut bytes = Box::new([0u8; xsave::KVM_AREA_SIZE]);
            for (chunk, word) in bytes.chunks_exact_mut(4).zip(kvm.region.iter()) {
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            self.xsave_area = Some(bytes);
        }
        Ok(self
            .xsave_area
            .get_or_insert_with(|| Box::new([0; xsave::KVM_AREA_SIZE])))
    }

    /// Marks the XSAVE area changed, so `commit` writes it back to KVM.
    pub fn xsave_area_changed(&mut self) {
        self.xsave_dirty = true;
    }

    fn commit(&mut self, completion: Completion) -> Step<Outcome> {
        if self.xsave_dirty {
            if let Some(area) = &mut self.xsave_area {
                xsave::normalize_for_kvm(&mut area[..]);
                let mut kvm = kvm_xsave::default();
                for (word, chunk) in kvm.region.iter_mut().zip(area.chunks_exact(4)) {
                    *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                }
                self.vcpu.set_xsave(&kvm)?;
            }
        }
        let length = self
            .current
            .as_ref()
            .map_or(0, |(_, bytes, _)| bytes.len() as u64);
        let ip_mask = self.ip_mask();
        self.regs.rip = (self.regs.rip & !ip_mask) | (self.regs.rip.wrapping_add(length) & ip_mask);
        // A completed instruction clears RF, as on hardware.
        self.regs.rflags &= !RFLAGS_RF;
        self.vcpu.set_regs(&self.regs)?;
        match completion {
            Completion::Next => Ok(Outcome::Completed),
            Completion::Trap(exception) => Ok(self.inject(exception)?),
        }
    }

    /// Delivers `exception` to the guest through KVM_SET_VCPU_EVENTS (and CR2 for #PF).
    fn inject(&self, exception: Exception) -> Result<Outcome, EmulationError> {
        if let Some(address) = exception.page_fault_address {
            let mut sregs = self.sregs;
            sregs.cr2 = address;
            self.vcpu.set_sregs(&sregs)?;
        }
        let mut events = self.vcpu.vcpu_events()?;
        events.exception.injected = 1;
        events.exception.pending = 0;
        events.exception.nr = exception.vector;
        events.exception.has_error_code = u8::from(exception.error_code.is_some());
        events.exception.error_code = exception.error_code.unwrap_or(0);
        events.exception_has_payload = 0;
        events.exception_payload = 0;
        self.vcpu.set_vcpu_events(&events)?;
        Ok(Outcome::ExceptionInjected {
            vector: exception.vector,
        })
    }
}

enum DecodeAttempt {
    Complete(Decoded),
    NeedMoreBytes,
    Invalid,
}

fn decode_one(bitness: u32, rip: u64, bytes: &[u8]) -> DecodeAttempt {
    if bytes.is_empty() {
        return DecodeAttempt::NeedMoreBytes;
    }
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    match decoder.last_error() {
        DecoderError::None if !instruction.is_invalid() => {
            let bytes = bytes[..instruction.len().min(bytes.len())].to_vec();
            DecodeAttempt::Complete(Decoded { instruction, bytes })
        }
        DecoderError::NoMoreBytes => DecodeAttempt::NeedMoreBytes,
        _ => DecodeAttempt::Invalid,
    }
}

fn gpr_slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// The value of a general register of any width, or None for other registers.
fn read_gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    let mut copy = *regs;
    let full = *gpr_slot(&mut copy, reg.full_register())?;
    Some(match reg.size() {
        1 if matches!(
            reg,
            Register::AH | Register::CH | Register::DH | Register::BH
        ) =>
        {
            (full >> 8) & 0xff
        }
        1 => full & 0xff,
        2 => full & 0xffff,
        4 => full & u64::from(u32::MAX),
        _ => full,
    })
}
