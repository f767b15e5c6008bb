//! The instruction emulator target: one vCPU's state, the instruction bytes KVM
//! reported and the start of guest RAM, all from the fuzzer's bytes; then
//! `InstructionEmulator::handle` on them, and checks of what it did.
//!
//! Whatever the input, `handle` must not panic, and what it did must hold
//! together:
//! - **Which bytes, how long**: the instruction is the reported bytes if they
//!   decode, else the bytes at CS:RIP, each found by a reference page walk
//!   written here from the SDM (addresses only: rights are the emulator's to
//!   check) over RAM as the input left it. A completed instruction or a trap
//!   moves RIP past exactly as many bytes as iced-x86's decoder says that
//!   instruction has, wrapping within IP's width.
//! - **Which instructions**: only the ones the emulator implements complete;
//!   INT1/INT3 never complete (they trap), INTO only with OF clear.
//! - **Results**, against small models written from the SDM here: POPCNT,
//!   LZCNT, TZCNT, BSF and BSR with a register source (result and the flags
//!   the SDM defines), XGETBV, XSETBV (XCR0 becomes EDX:EAX), CLAC and STAC.
//! - **What else changes**: a completed instruction changes no general
//!   register beyond its destinations, no RFLAGS bit beyond the arithmetic
//!   ones and AC, clears RF and leaves the segment and control registers alone.
//! - **Exceptions**: a fault changes no register and no FPU/SSE state; only
//!   INT1, INT3 and INTO trap; the injected event has an error code exactly
//!   when the SDM gives the vector one; a #PF sets CR2 and nothing else in the
//!   special registers, and its error code's U/S bit is CPL 3.
//! - **Errors** (the VM would stop) leave the vCPU untouched.
//!
//! Memory errors in any of it are AddressSanitizer's to report.

use std::cell::{Cell, RefCell};

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcr, kvm_xcrs, kvm_xsave,
};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::emulator::{EmulationError, InstructionEmulator, Outcome, VcpuState};
use vmm::memory::GuestRam;

/// Guest RAM: 64 KiB from address 0, of which the input fills the start.
pub const RAM_SIZE: usize = 64 << 10;
/// The longest x86 instruction.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// Input flags.
pub const FLAG_USER: u8 = 1 << 0;
/// IA32_XSS reads as unknown to KVM.
pub const FLAG_NO_XSS: u8 = 1 << 1;
/// KVM reports no XCRs (a CPU without XSAVE).
pub const FLAG_NO_XCRS: u8 = 1 << 2;

const MSR_IA32_XSS: u32 = 0xda0;

pub const RFLAGS_FIXED: u64 = 1 << 1;
const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
pub const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;
const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_ARITH: u64 = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

/// The operating mode the vCPU starts from (before the input's flips), and the
/// paging structures the seeds build for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Real,
    Protected16,
    /// Flat 32-bit protected mode, paging off.
    Protected32,
    /// 32-bit paging with 4 MiB pages (CR4.PSE).
    Paging32,
    Pae,
    /// 64-bit mode, 4-level paging.
    Long,
    /// 64-bit mode, 5-level paging.
    Long5,
    /// Compatibility mode: IA-32e paging, 32-bit code segment.
    Compat,
}

pub const MODES: [Mode; 8] = [
    Mode::Real,
    Mode::Protected16,
    Mode::Protected32,
    Mode::Paging32,
    Mode::Pae,
    Mode::Long,
    Mode::Long5,
    Mode::Compat,
];

struct ModeState {
    cr0: u64,
    cr4: u64,
    efer: u64,
    cs_long: bool,
    cs_32: bool,
}

impl Mode {
    fn state(self) -> ModeState {
        // PE MP ET NE; with paging also WP and PG.
        const PROTECTED: u64 = 0x33;
        const PAGED: u64 = 0x8005_0033;
        // OSFXSR OSXMMEXCPT OSXSAVE.
        const SSE: u64 = 0x0004_0600;
        const PSE: u64 = 1 << 4;
        const PAE: u64 = 1 << 5;
        const LA57: u64 = 1 << 12;
        const SMEP_SMAP: u64 = 0x0030_0000;
        // NXE; for IA-32e also LMA LME SCE.
        const NXE: u64 = 0x800;
        const LONG_EFER: u64 = 0xd01;
        let (cr0, cr4, efer, cs_long, cs_32) = match self {
            Mode::Real => (0x10, 0, 0, false, false),
            Mode::Protected16 => (PROTECTED, SSE, 0, false, false),
            Mode::Protected32 => (PROTECTED, SSE, 0, false, true),
            Mode::Paging32 => (PAGED, SSE | PSE, 0, false, true),
            Mode::Pae => (PAGED, SSE | PAE, NXE, false, true),
            Mode::Long => (PAGED, SSE | PAE | SMEP_SMAP, LONG_EFER, true, false),
            Mode::Long5 => (PAGED, SSE | PAE | SMEP_SMAP | LA57, LONG_EFER, true, false),
            Mode::Compat => (PAGED, SSE | PAE | SMEP_SMAP, LONG_EFER, false, true),
        };
        ModeState {
            cr0,
            cr4,
            efer,
            cs_long,
            cs_32,
        }
    }
}

/// One input, field by field in the order it is encoded (little-endian; a
/// short input reads as zeros from where it ends, and what follows the fixed
/// part is guest RAM from address 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Input {
    /// Index into [`MODES`], modulo 8.
    pub mode: u8,
    /// `FLAG_*`.
    pub flags: u8,
    /// What KVM reported (at most 15 bytes; may be empty or cut short).
    pub reported: Vec<u8>,
    pub rip: u64,
    pub rflags: u64,
    /// RAX RCX RDX RBX RSP RBP RSI RDI R8-R15.
    pub gprs: [u64; 16],
    /// XORed into the mode's CR0, CR4 and EFER: odd combinations too.
    pub cr0_flip: u64,
    pub cr3: u64,
    pub cr4_flip: u64,
    pub efer_flip: u64,
    /// ES CS SS DS FS GS.
    pub segment_bases: [u64; 6],
    pub xcr0: u64,
    pub xss: u64,
    pub fcw: u16,
    pub fsw: u16,
    pub mxcsr: u32,
    pub mxcsr_mask: u32,
    pub xstate_bv: u64,
    /// Guest RAM from address 0 (the rest is zeros).
    pub memory: Vec<u8>,
}

/// Reads fields from the front of the fuzzer's bytes; zeros past their end.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

impl Input {
    pub fn decode(data: &[u8]) -> Input {
        let mut fields = Fields(data);
        let mode = fields.u8();
        let flags = fields.u8();
        let reported_len = usize::from(fields.u8()).min(MAX_INSTRUCTION_LEN);
        let reported = fields.bytes::<MAX_INSTRUCTION_LEN>()[..reported_len].to_vec();
        let rip = fields.u64();
        let rflags = fields.u64();
        let gprs = std::array::from_fn(|_| fields.u64());
        let cr0_flip = fields.u64();
        let cr3 = fields.u64();
        let cr4_flip = fields.u64();
        let efer_flip = fields.u64();
        let segment_bases = std::array::from_fn(|_| fields.u64());
        let xcr0 = fields.u64();
        let xss = fields.u64();
        let fcw = fields.u16();
        let fsw = fields.u16();
        let mxcsr = fields.u32();
        let mxcsr_mask = fields.u32();
        let xstate_bv = fields.u64();
        let memory = fields.0[..fields.0.len().min(RAM_SIZE)].to_vec();
        Input {
            mode,
            flags,
            reported,
            rip,
            rflags,
            gprs,
            cr0_flip,
            cr3,
            cr4_flip,
            efer_flip,
            segment_bases,
            xcr0,
            xss,
            fcw,
            fsw,
            mxcsr,
            mxcsr_mask,
            xstate_bv,
            memory,
        }
    }

    /// The bytes `decode` reads back as `self`.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.reported.len() <= MAX_INSTRUCTION_LEN && self.memory.len() <= RAM_SIZE);
        let mut out = vec![self.mode, self.flags, self.reported.len() as u8];
        let mut reported = [0u8; MAX_INSTRUCTION_LEN];
        reported[..self.reported.len()].copy_from_slice(&self.reported);
        out.extend_from_slice(&reported);
        let words = [self.rip, self.rflags]
            .into_iter()
            .chain(self.gprs)
            .chain([self.cr0_flip, self.cr3, self.cr4_flip, self.efer_flip])
            .chain(self.segment_bases)
            .chain([self.xcr0, self.xss]);
        for word in words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.fcw.to_le_bytes());
        out.extend_from_slice(&self.fsw.to_le_bytes());
        out.extend_from_slice(&self.mxcsr.to_le_bytes());
        out.extend_from_slice(&self.mxcsr_mask.to_le_bytes());
        out.extend_from_slice(&self.xstate_bv.to_le_bytes());
        out.extend_from_slice(&self.memory);
        out
    }

    pub fn mode(&self) -> Mode {
        MODES[usize::from(self.mode % 8)]
    }

    fn regs(&self) -> kvm_regs {
        let g = self.gprs;
        kvm_regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.rip,
            rflags: self.rflags,
        }
    }

    fn sregs(&self) -> kvm_sregs {
        let state = self.mode().state();
        let dpl = if self.flags & FLAG_USER != 0 { 3 } else { 0 };
        let segment = |index: usize, selector: u16, type_: u8, code: bool| kvm_segment {
            base: self.segment_bases[index],
            limit: 0xffff_ffff,
            selector: selector | u16::from(dpl),
            type_,
            present: 1,
            dpl,
            db: u8::from(if code {
                state.cs_32
            } else {
                state.cr0 & CR0_PE != 0
            }),
            s: 1,
            l: u8::from(code && state.cs_long),
            g: 1,
            ..Default::default()
        };
        kvm_sregs {
            es: segment(0, 0x18, 0x3, false),
            cs: segment(1, 0x10, 0xb, true),
            ss: segment(2, 0x18, 0x3, false),
            ds: segment(3, 0x18, 0x3, false),
            fs: segment(4, 0x18, 0x3, false),
            gs: segment(5, 0x18, 0x3, false),
            cr0: state.cr0 ^ self.cr0_flip,
            cr3: self.cr3,
            cr4: state.cr4 ^ self.cr4_flip,
            efer: state.efer ^ self.efer_flip,
            ..Default::default()
        }
    }

    /// The 4 KiB KVM_GET_XSAVE area: the x87/SSE control words and XSTATE_BV
    /// from the input, the registers zero.
    fn xsave_area(&self) -> [u32; 1024] {
        let mut bytes = [0u8; 4096];
        bytes[0..2].copy_from_slice(&self.fcw.to_le_bytes());
        bytes[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
        bytes[28..32].copy_from_slice(&self.mxcsr_mask.to_le_bytes());
        bytes[512..520].copy_from_slice(&self.xstate_bv.to_le_bytes());
        std::array::from_fn(|i| {
            u32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ])
        })
    }

    fn guest_ram(&self) -> GuestRam {
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).expect("guest RAM");
        ram.write_slice(&self.memory, GuestAddress(0))
            .expect("the image fits in RAM");
        ram
    }

    /// Byte `gpa` of RAM as the input left it (None outside RAM).
    fn ram_byte(&self, gpa: u64) -> Option<u8> {
        let index = usize::try_from(gpa).ok().filter(|&i| i < RAM_SIZE)?;
        Some(self.memory.get(index).copied().unwrap_or(0))
    }
}

/// How often the emulator wrote each part of the vCPU's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub regs: u32,
    pub sregs: u32,
    pub xsave: u32,
    pub xcrs: u32,
    pub events: u32,
}

/// A vCPU whose state lives here: what KVM's ioctls would read and write.
pub struct FuzzVcpu {
    pub regs: Cell<kvm_regs>,
    pub sregs: Cell<kvm_sregs>,
    pub xsave: RefCell<[u32; 1024]>,
    pub xcrs: Cell<kvm_xcrs>,
    pub events: Cell<kvm_vcpu_events>,
    xss: Option<u64>,
    pub writes: Cell<Writes>,
}

impl FuzzVcpu {
    pub fn new(input: &Input) -> FuzzVcpu {
        let mut xcrs = kvm_xcrs::default();
        if input.flags & FLAG_NO_XCRS == 0 {
            xcrs.nr_xcrs = 1;
            xcrs.xcrs[0] = kvm_xcr {
                xcr: 0,
                reserved: 0,
                value: input.xcr0,
            };
        }
        FuzzVcpu {
            regs: Cell::new(input.regs()),
            sregs: Cell::new(input.sregs()),
            xsave: RefCell::new(input.xsave_area()),
            xcrs: Cell::new(xcrs),
            events: Cell::new(kvm_vcpu_events::default()),
            xss: (input.flags & FLAG_NO_XSS == 0).then_some(input.xss),
            writes: Cell::new(Writes::default()),
        }
    }

    fn wrote(&self, which: impl FnOnce(&mut Writes)) {
        let mut writes = self.writes.get();
        which(&mut writes);
        self.writes.set(writes);
    }
}

impl VcpuState for FuzzVcpu {
    fn regs(&self) -> Result<kvm_regs, EmulationError> {
        Ok(self.regs.get())
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), EmulationError> {
        self.wrote(|w| w.regs += 1);
        self.regs.set(*regs);
        Ok(())
    }
    fn sregs(&self) -> Result<kvm_sregs, EmulationError> {
        Ok(self.sregs.get())
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), EmulationError> {
        self.wrote(|w| w.sregs += 1);
        self.sregs.set(*sregs);
        Ok(())
    }
    fn xsave(&self) -> Result<kvm_xsave, EmulationError> {
        let mut xsave = kvm_xsave::default();
        xsave.region = *self.xsave.borrow();
        Ok(xsave)
    }
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), EmulationError> {
        self.wrote(|w| w.xsave += 1);
        *self.xsave.borrow_mut() = xsave.region;
        Ok(())
    }
    fn xcrs(&self) -> Result<kvm_xcrs, EmulationError> {
        Ok(self.xcrs.get())
    }
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), EmulationError> {
        self.wrote(|w| w.xcrs += 1);
        self.xcrs.set(*xcrs);
        Ok(())
    }
    fn vcpu_events(&self) -> Result<kvm_vcpu_events, EmulationError> {
        Ok(self.events.get())
    }
    fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<(), EmulationError> {
        self.wrote(|w| w.events += 1);
        self.events.set(*events);
        Ok(())
    }
    fn read_msr(&self, index: u32) -> Result<Option<u64>, EmulationError> {
        Ok(if index == MSR_IA32_XSS {
            self.xss
        } else {
            None
        })
    }
}

thread_local! {
    /// One emulator for the whole run: building one reads the host's CPUID,
    /// which is slow under a hypervisor.
    static EMULATOR: RefCell<InstructionEmulator> = RefCell::new(InstructionEmulator::new());
}

/// The fuzz target: emulates the input's instruction and checks the result.
pub fn run(data: &[u8]) {
    let _ = emulate(data);
}

/// Emulates the input's instruction, checks what the emulator did (panics on a
/// broken rule) and returns its outcome.
pub fn emulate(data: &[u8]) -> Result<Outcome, EmulationError> {
    let input = Input::decode(data);
    let ram = input.guest_ram();
    let vcpu = FuzzVcpu::new(&input);
    let result =
        EMULATOR.with(|emulator| emulator.borrow_mut().handle(&vcpu, &ram, &input.reported));
    check(&input, &vcpu, &result);
    result
}

/// Code size of CS (SDM vol. 3, 5.2.1): 16 in real and virtual-8086 mode, 64
/// in 64-bit mode (IA-32e with CS.L), else CS.D picks 32 or 16.
fn bitness(regs: &kvm_regs, sregs: &kvm_sregs) -> u32 {
    if sregs.cr0 & CR0_PE == 0 || regs.rflags & RFLAGS_VM != 0 {
        16
    } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

/// CPL as KVM keeps it: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL.
fn cpl(regs: &kvm_regs, sregs: &kvm_sregs) -> u8 {
    if sregs.cr0 & CR0_PE == 0 {
        0
    } else if regs.rflags & RFLAGS_VM != 0 {
        3
    } else {
        sregs.ss.dpl & 3
    }
}

fn ip_mask(bitness: u32) -> u64 {
    match bitness {
        64 => u64::MAX,
        32 => u64::from(u32::MAX),
        _ => u64::from(u16::MAX),
    }
}

fn decode_complete(bitness: u32, rip: u64, bytes: &[u8]) -> Option<Instruction> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    (decoder.last_error() == DecoderError::None && !instruction.is_invalid()).then_some(instruction)
}

/// The guest-physical address of `linear` by the SDM's page walk (vol. 3,
/// 4.3-4.5) over RAM as the input left it, or None where an entry is not
/// present or not in RAM. Access rights, reserved bits and A/D bits are not
/// modelled: this is for bytes the emulator did fetch, to know which.
fn reference_translate(input: &Input, sregs: &kvm_sregs, linear: u64) -> Option<u64> {
    const PRESENT: u64 = 1;
    const LARGE: u64 = 1 << 7;
    const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
    const CR4_PSE: u64 = 1 << 4;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_LA57: u64 = 1 << 12;
    if sregs.cr0 & CR0_PG == 0 {
        return Some(linear);
    }
    let entry = |gpa: u64, size: u64| -> Option<u64> {
        let mut bytes = [0u8; 8];
        for (i, byte) in bytes.iter_mut().take(size as usize).enumerate() {
            *byte = input.ram_byte(gpa.checked_add(i as u64)?)?;
        }
        Some(u64::from_le_bytes(bytes)).filter(|e| e & PRESENT != 0)
    };
    let page = |entry: u64, shift: u32| {
        let size = 1u64 << shift;
        (entry & ADDRESS & !(size - 1)) | (linear & (size - 1))
    };
    if sregs.cr4 & CR4_PAE == 0 {
        // 32-bit paging: 4-byte entries; PS maps 4 MiB (with PSE-36 bits).
        let pde = entry((sregs.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4, 4)?;
        if pde & LARGE != 0 && sregs.cr4 & CR4_PSE != 0 {
            let high = ((pde >> 13) & 0xff) << 32;
            return Some((pde & 0xffc0_0000) | high | (linear & 0x3f_ffff));
        }
        let pte = entry((pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4, 4)?;
        return Some((pte & 0xffff_f000) | (linear & 0xfff));
    }
    let (mut table, shifts): (u64, &[u32]) = if sregs.efer & EFER_LMA == 0 {
        let pdpte = entry((sregs.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8, 8)?;
        (pdpte & ADDRESS, &[21, 12])
    } else if sregs.cr4 & CR4_LA57 != 0 {
        (sregs.cr3 & cr3_address_mask(), &[48, 39, 30, 21, 12])
    } else {
        (sregs.cr3 & cr3_address_mask(), &[39, 30, 21, 12])
    };
    for &shift in shifts {
        let entry = entry(table + ((linear >> shift) & 0x1ff) * 8, 8)?;
        if shift == 12 || (shift <= 30 && entry & LARGE != 0) {
            return Some(page(entry, shift));
        }
        table = entry & ADDRESS;
    }
    None
}

/// The address bits of a 64-bit CR3: from bit 12 up to MAXPHYADDR (SDM vol.
/// 3, 4.5.2; the bits above are reserved, and no CPU holds a CR3 with them
/// set: MOV to CR3 faults, KVM refuses it). MAXPHYADDR is the host's, as
/// the emulator takes it (the guest sees the host's CPUID). A fuzzer's CR3
/// with those bits set found the reference walking from beyond RAM where
/// the emulator, rightly, did not.
fn cr3_address_mask() -> u64 {
    let extended_max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    let bits = if extended_max >= 0x8000_0008 {
        core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    };
    ((1u64 << bits.clamp(32, 52)) - 1) & !0xfff
}

/// The instruction at CS:RIP as the emulator must have seen it: the reported
/// bytes if they decode (it trusts them), else the bytes in RAM at CS:RIP,
/// each found through the page tables. None if they do not decode.
fn reference_instruction(input: &Input, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<Instruction> {
    let bitness = bitness(regs, sregs);
    let rip = regs.rip & ip_mask(bitness);
    if let Some(instruction) = decode_complete(bitness, rip, &input.reported) {
        return Some(instruction);
    }
    // Linear addresses are 32 bits wide outside 64-bit mode, where CS's base
    // counts.
    let (base, linear_mask) = if bitness == 64 {
        (0, u64::MAX)
    } else {
        (sregs.cs.base, u64::from(u32::MAX))
    };
    let code: Vec<u8> = (0..MAX_INSTRUCTION_LEN as u64)
        .map_while(|i| {
            let linear = base.wrapping_add(rip).wrapping_add(i) & linear_mask;
            input.ram_byte(reference_translate(input, sregs, linear)?)
        })
        .collect();
    decode_complete(bitness, rip, &code)
}

/// RIP after an instruction of `len` bytes: IP wraps within the code size, the
/// bits above it are kept.
fn next_rip(rip: u64, len: usize, bitness: u32) -> u64 {
    let mask = ip_mask(bitness);
    (rip & !mask) | (rip.wrapping_add(len as u64) & mask)
}

/// What the emulator implements; anything else must not complete.
fn implemented(mnemonic: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        mnemonic,
        Int3 | Int1
            | Into
            | Popcnt
            | Lzcnt
            | Tzcnt
            | Bsf
            | Bsr
            | Xgetbv
            | Xsetbv
            | Clac
            | Stac
            | Wait
            | Ldmxcsr
            | Vldmxcsr
            | Stmxcsr
            | Vstmxcsr
            | Cmpxchg8b
            | Cmpxchg16b
            | Fxsave
            | Fxsave64
            | Fxrstor
            | Fxrstor64
            | Xsave
            | Xsave64
            | Xsaveopt
            | Xsaveopt64
            | Xsavec
            | Xsavec64
            | Xsaves
            | Xsaves64
            | Xrstor
            | Xrstor64
            | Xrstors
            | Xrstors64
            | Rdrand
            | Rdseed
    )
}

const GPRS: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

fn gprs(regs: &kvm_regs) -> [u64; 16] {
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ]
}

/// Index of `reg`'s full 64-bit register in `GPRS`.
fn gpr_index(reg: Register) -> Option<usize> {
    GPRS.iter().position(|&full| full == reg.full_register())
}

/// The value of a general register of any width (AH-BH are bits 15:8).
fn read_gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    let full = gprs(regs)[gpr_index(reg)?];
    Some(match reg {
        Register::AH | Register::CH | Register::DH | Register::BH => (full >> 8) & 0xff,
        _ if reg.size() == 8 => full,
        _ => full & ((1u64 << (reg.size() * 8)) - 1),
    })
}

/// `old` with `reg` written as the CPU does: 32-bit writes zero bits 63:32,
/// 16-bit writes keep the rest.
fn written_gpr(old: u64, reg: Register, value: u64) -> u64 {
    match reg.size() {
        8 => value,
        4 => value & u64::from(u32::MAX),
        2 => (old & !0xffff) | (value & 0xffff),
        _ => unreachable!("bit-count destinations are 16, 32 or 64 bits wide"),
    }
}

/// POPCNT/LZCNT/TZCNT/BSF/BSR of `source` (`bits` wide) by counting bit by bit:
/// the destination's new value (None: unchanged) and the flags the SDM
/// defines for it, as (mask, value).
fn bit_count_model(mnemonic: Mnemonic, source: u64, bits: u32) -> (Option<u64>, u64, u64) {
    let bit = |i: u32| source >> i & 1 == 1;
    let zf = |zero: bool| if zero { RFLAGS_ZF } else { 0 };
    let cf = |set: bool| if set { RFLAGS_CF } else { 0 };
    match mnemonic {
        Mnemonic::Popcnt => {
            let count = (0..bits).filter(|&i| bit(i)).count() as u64;
            (Some(count), RFLAGS_ARITH, zf(source == 0))
        }
        Mnemonic::Lzcnt => {
            let count = (0..bits).rev().take_while(|&i| !bit(i)).count() as u64;
            (
                Some(count),
                RFLAGS_CF | RFLAGS_ZF,
                cf(source == 0) | zf(count == 0),
            )
        }
        Mnemonic::Tzcnt => {
            let count = (0..bits).take_while(|&i| !bit(i)).count() as u64;
            (
                Some(count),
                RFLAGS_CF | RFLAGS_ZF,
                cf(source == 0) | zf(count == 0),
            )
        }
        // A zero source leaves the destination alone (AMD documents it; the
        // emulator follows).
        Mnemonic::Bsf | Mnemonic::Bsr if source == 0 => (None, RFLAGS_ZF, RFLAGS_ZF),
        Mnemonic::Bsf => ((0..bits).find(|&i| bit(i)).map(u64::from), RFLAGS_ZF, 0),
        Mnemonic::Bsr => (
            (0..bits).rev().find(|&i| bit(i)).map(u64::from),
            RFLAGS_ZF,
            0,
        ),
        _ => unreachable!(),
    }
}

/// Which general registers `instruction` may change when it completes.
fn destinations(instruction: &Instruction) -> Vec<usize> {
    match instruction.mnemonic() {
        Mnemonic::Popcnt
        | Mnemonic::Lzcnt
        | Mnemonic::Tzcnt
        | Mnemonic::Bsf
        | Mnemonic::Bsr
        | Mnemonic::Rdrand
        | Mnemonic::Rdseed => gpr_index(instruction.op0_register()).into_iter().collect(),
        Mnemonic::Xgetbv | Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b => vec![0, 2],
        _ => Vec::new(),
    }
}

/// Checks the rules in this module's documentation.
fn check(input: &Input, vcpu: &FuzzVcpu, result: &Result<Outcome, EmulationError>) {
    let (regs_before, sregs_before) = (input.regs(), input.sregs());
    let (regs, sregs) = (vcpu.regs.get(), vcpu.sregs.get());
    let writes = vcpu.writes.get();
    let bitness = bitness(&regs_before, &sregs_before);
    let instruction = reference_instruction(input, &regs_before, &sregs_before);
    let xsave_unchanged = *vcpu.xsave.borrow() == input.xsave_area();

    let outcome = match result {
        Ok(outcome) => *outcome,
        Err(EmulationError::Kvm { .. } | EmulationError::MsrBuffer(_)) => {
            panic!("the fake vCPU never fails, yet: {result:?}")
        }
        Err(_) => {
            assert_eq!(
                writes,
                Writes::default(),
                "an instruction the VM stops on changes nothing ({result:?})"
            );
            return;
        }
    };

    // Completed, or a trap (delivered after the instruction): RIP moved past it.
    let moved_on = match outcome {
        Outcome::Completed => true,
        Outcome::ExceptionInjected { vector } => {
            let events = vcpu.events.get();
            assert_eq!(writes.events, 1, "one event injected");
            assert_eq!(
                (events.exception.injected, events.exception.nr),
                (1, vector)
            );
            assert!(
                matches!(vector, 1 | 3 | 4 | 6 | 7 | 12 | 13 | 14 | 16),
                "vector {vector} is none the emulator raises"
            );
            // SDM vol. 3, table 6-1: #SS, #GP and #PF push an error code.
            let has_code = matches!(vector, 12..=14);
            assert_eq!(
                events.exception.has_error_code != 0,
                has_code,
                "error code for vector {vector}"
            );
            if vector == 14 {
                assert_eq!(writes.sregs, 1, "#PF sets CR2");
                let mut expected = sregs_before;
                expected.cr2 = sregs.cr2;
                assert_eq!(sregs, expected, "#PF changes CR2 only");
                let code = events.exception.error_code;
                assert_eq!(
                    code & !0x1f,
                    0,
                    "#PF error code {code:#x}: P W U RSVD I only"
                );
                let user = cpl(&regs_before, &sregs_before) == 3;
                assert_eq!(
                    code & 4 != 0,
                    user,
                    "#PF error code {code:#x}: U/S is CPL 3"
                );
            } else {
                assert_eq!(writes.sregs, 0, "only #PF touches the special registers");
            }
            let trap = writes.regs != 0;
            if trap {
                assert!(
                    matches!(vector, 1 | 3 | 4),
                    "vector {vector} is a fault: RIP must stay"
                );
                if let Some(instruction) = &instruction {
                    let expected = match instruction.mnemonic() {
                        Mnemonic::Int1 => 1,
                        Mnemonic::Int3 => 3,
                        Mnemonic::Into => 4,
                        other => panic!("{other:?} trapped with vector {vector}"),
                    };
                    assert_eq!(vector, expected);
                }
            } else {
                assert!(xsave_unchanged, "a fault changes no FPU/SSE state");
                assert_eq!(writes.xcrs, 0, "a fault changes no XCR");
            }
            trap
        }
    };
    if !moved_on {
        return;
    }

    assert_eq!(writes.regs, 1, "the registers are written back once");
    assert_eq!(
        regs.rflags & RFLAGS_RF,
        0,
        "a completed instruction clears RF"
    );
    assert_eq!(
        (regs.rflags ^ regs_before.rflags) & !(RFLAGS_ARITH | RFLAGS_AC | RFLAGS_RF),
        0,
        "only the arithmetic flags and AC change"
    );
    if outcome == Outcome::Completed {
        assert_eq!(writes.sregs, 0, "no special register changes");
        assert_eq!(writes.events, 0, "no event for a completed instruction");
    }
    let instruction = instruction.unwrap_or_else(|| {
        panic!("the emulator ran an instruction the reference cannot read at CS:RIP")
    });
    let mnemonic = instruction.mnemonic();
    assert_eq!(
        regs.rip,
        next_rip(regs_before.rip, instruction.len(), bitness),
        "RIP moves past the {}-byte {mnemonic:?}",
        instruction.len()
    );
    if outcome == Outcome::Completed {
        assert!(
            implemented(mnemonic),
            "{mnemonic:?} is not emulated, yet completed"
        );
        assert!(
            !matches!(mnemonic, Mnemonic::Int1 | Mnemonic::Int3),
            "{mnemonic:?} always traps"
        );
        assert!(
            mnemonic != Mnemonic::Into || regs_before.rflags & RFLAGS_OF == 0,
            "INTO with OF set traps"
        );
    }
    let allowed = destinations(&instruction);
    let (old, new) = (gprs(&regs_before), gprs(&regs));
    for (index, register) in GPRS.iter().enumerate() {
        assert!(
            old[index] == new[index] || allowed.contains(&index),
            "{mnemonic:?} changed {register:?}"
        );
    }
    if writes.xsave != 0 {
        assert!(
            matches!(
                mnemonic,
                Mnemonic::Ldmxcsr
                    | Mnemonic::Vldmxcsr
                    | Mnemonic::Fxrstor
                    | Mnemonic::Fxrstor64
                    | Mnemonic::Xrstor
                    | Mnemonic::Xrstor64
                    | Mnemonic::Xrstors
                    | Mnemonic::Xrstors64
            ),
            "{mnemonic:?} wrote the FPU/SSE state"
        );
    }
    check_result(&instruction, &regs_before, &regs, vcpu, writes);
}

/// The instructions whose results a few lines of SDM pseudo-code predict.
fn check_result(
    instruction: &Instruction,
    before: &kvm_regs,
    after: &kvm_regs,
    vcpu: &FuzzVcpu,
    writes: Writes,
) {
    let mnemonic = instruction.mnemonic();
    let flags_changed = (after.rflags ^ before.rflags) & (RFLAGS_ARITH | RFLAGS_AC);
    match mnemonic {
        Mnemonic::Popcnt | Mnemonic::Lzcnt | Mnemonic::Tzcnt | Mnemonic::Bsf | Mnemonic::Bsr
            if instruction.op1_kind() == OpKind::Register =>
        {
            let destination = instruction.op0_register();
            let bits = (destination.size() * 8) as u32;
            let source = read_gpr(before, instruction.op1_register()).expect("a general register");
            let (value, mask, flags) = bit_count_model(mnemonic, source, bits);
            let index = gpr_index(destination).expect("a general register");
            let old = gprs(before)[index];
            let expected = value.map_or(old, |value| written_gpr(old, destination, value));
            assert_eq!(
                gprs(after)[index],
                expected,
                "{mnemonic:?} of {source:#x} ({bits} bits) into {destination:?}"
            );
            assert_eq!(
                after.rflags & mask,
                flags,
                "{mnemonic:?} of {source:#x}: flags"
            );
        }
        Mnemonic::Xgetbv if before.rcx as u32 == 0 => {
            let xcrs = vcpu.xcrs.get();
            // No XCR reported: x87 only, as on a CPU without XSAVE.
            let xcr0 = if xcrs.nr_xcrs == 0 {
                1
            } else {
                xcrs.xcrs[0].value
            };
            assert_eq!(after.rax, xcr0 & u64::from(u32::MAX), "XGETBV: EAX");
            assert_eq!(after.rdx, xcr0 >> 32, "XGETBV: EDX");
            assert_eq!(flags_changed, 0, "XGETBV changes no flag");
        }
        Mnemonic::Xsetbv => {
            let xcrs = vcpu.xcrs.get();
            let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
            let xcr0 = xcrs.xcrs[..count].iter().find(|x| x.xcr == 0);
            let expected = (before.rdx << 32) | (before.rax & u64::from(u32::MAX));
            assert_eq!(writes.xcrs, 1, "XSETBV writes the XCRs");
            assert_eq!(
                xcr0.map(|x| x.value),
                Some(expected),
                "XSETBV: XCR0 = EDX:EAX"
            );
            assert_eq!(before.rcx as u32, 0, "XSETBV sets XCR0 only");
            assert_eq!(cpl(before, &vcpu.sregs.get()), 0, "XSETBV is privileged");
        }
        Mnemonic::Clac | Mnemonic::Stac => {
            let ac = if mnemonic == Mnemonic::Stac {
                RFLAGS_AC
            } else {
                0
            };
            assert_eq!(after.rflags & RFLAGS_AC, ac, "{mnemonic:?}: AC");
            assert_eq!(
                flags_changed & !RFLAGS_AC,
                0,
                "{mnemonic:?} changes AC only"
            );
        }
        _ => {}
    }
    if mnemonic != Mnemonic::Xsetbv {
        assert_eq!(writes.xcrs, 0, "{mnemonic:?} wrote an XCR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the fuzzer once failed on (fuzz/regressions/emulator): each
    /// runs, with every check, on every `cargo test`.
    #[test]
    fn past_failures_pass() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions/emulator");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            run(&std::fs::read(entry.unwrap().path()).unwrap());
            count += 1;
        }
        assert!(count > 0, "no inputs in {}", dir.display());
    }

    #[test]
    fn encoding_round_trips() {
        let input = Input {
            mode: 5,
            flags: FLAG_USER,
            reported: vec![0xf3, 0x48, 0x0f, 0xb8, 0xc3],
            rip: 0x4000_0020,
            rflags: RFLAGS_FIXED,
            gprs: std::array::from_fn(|i| i as u64 * 0x1111),
            cr3: 0x1000,
            xcr0: 7,
            mxcsr: 0x1f80,
            memory: vec![1, 2, 3],
            ..Default::default()
        };
        assert_eq!(Input::decode(&input.encode()), input);
    }

    #[test]
    fn short_inputs_read_as_zeros() {
        let input = Input::decode(&[5, 0, 20]);
        assert_eq!(input.mode(), Mode::Long);
        assert_eq!(input.reported, vec![0; MAX_INSTRUCTION_LEN]);
        assert!(input.memory.is_empty());
    }

    /// Whether `check` rejects what the emulator did with seed `name` once
    /// `tamper` has changed it: the checks can fail.
    fn caught(name: &str, tamper: impl Fn(&FuzzVcpu)) -> bool {
        let (_, input, _) = crate::seeds::emulator_seeds()
            .into_iter()
            .find(|(seed, _, _)| *seed == name)
            .unwrap();
        let ram = input.guest_ram();
        let vcpu = FuzzVcpu::new(&input);
        let result = InstructionEmulator::new().handle(&vcpu, &ram, &input.reported);
        check(&input, &vcpu, &result);
        tamper(&vcpu);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(&input, &vcpu, &result)
        }))
        .is_err()
    }

    fn edit_regs(vcpu: &FuzzVcpu, edit: impl Fn(&mut kvm_regs)) {
        let mut regs = vcpu.regs.get();
        edit(&mut regs);
        vcpu.regs.set(regs);
    }

    #[test]
    fn checks_catch_wrong_results() {
        // RIP one byte short, known from the reported bytes and from RAM.
        assert!(caught("popcnt-64", |v| edit_regs(v, |r| r.rip -= 1)));
        assert!(caught("bsr-real-fetched", |v| edit_regs(v, |r| r.rip -= 1)));
        // A count off by one; a flag the instruction defines.
        assert!(caught("popcnt-64", |v| edit_regs(v, |r| r.rax += 1)));
        assert!(caught("tzcnt-32-paging-fetched", |v| edit_regs(v, |r| {
            r.rflags ^= RFLAGS_CF
        })));
        // A register the instruction does not write.
        assert!(caught("xgetbv", |v| edit_regs(v, |r| r.rbx ^= 1)));
        // A fault that moved RIP; a #PF whose U/S bit lies.
        assert!(caught("clac-user", |v| {
            edit_regs(v, |r| r.rip += 3);
            v.wrote(|w| w.regs += 1);
        }));
        assert!(caught("page-fault", |v| {
            let mut events = v.events.get();
            events.exception.error_code |= 4;
            v.events.set(events);
        }));
    }

    #[test]
    fn bit_count_model_counts() {
        assert_eq!(bit_count_model(Mnemonic::Popcnt, 0xf0f1, 16).0, Some(9));
        assert_eq!(bit_count_model(Mnemonic::Lzcnt, 0x0100, 16).0, Some(7));
        assert_eq!(bit_count_model(Mnemonic::Lzcnt, 0, 32).0, Some(32));
        assert_eq!(bit_count_model(Mnemonic::Tzcnt, 0x0100, 64).0, Some(8));
        assert_eq!(bit_count_model(Mnemonic::Bsr, 0x0100, 64).0, Some(8));
        assert_eq!(bit_count_model(Mnemonic::Bsf, 0x0180, 64).0, Some(7));
        assert_eq!(bit_count_model(Mnemonic::Bsf, 0, 64).0, None);
    }
}
