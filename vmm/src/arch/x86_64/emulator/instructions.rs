//! What each emulated instruction does (SDM vol. 2), including the exceptions it raises.
//! Handlers change the local copies in [`Context`] and guest memory; `Context::commit`
//! writes the registers back.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use vm_memory::GuestMemory;

use super::mmu::{self, Access};
use super::xsave::{self, Format, SaveForm};
use super::{Completion, Context, Decoded, Exception, Step, VcpuState};
use super::{CR0_EM, CR0_MP, CR0_NE, CR0_PE, CR0_TS, CR4_OSFXSR, CR4_OSXSAVE, MSR_IA32_XSS};
use super::{RFLAGS_AC, RFLAGS_ARITH, RFLAGS_CF, RFLAGS_OF, RFLAGS_ZF};
use super::{VECTOR_BP, VECTOR_DB, VECTOR_MF, VECTOR_NM, VECTOR_OF};

pub(crate) fn execute<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    decoded: &Decoded,
) -> Step<Completion> {
    let instruction = &decoded.instruction;
    let mnemonic = instruction.mnemonic();
    if instruction.has_lock_prefix()
        && !matches!(mnemonic, Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b)
    {
        return Err(Exception::invalid_opcode().into());
    }
    match mnemonic {
        Mnemonic::Int3 => Ok(Completion::Trap(Exception::without_code(VECTOR_BP))),
        Mnemonic::Int1 => Ok(Completion::Trap(Exception::without_code(VECTOR_DB))),
        Mnemonic::Into if cx.regs.rflags & RFLAGS_OF != 0 => {
            Ok(Completion::Trap(Exception::without_code(VECTOR_OF)))
        }
        Mnemonic::Into => Ok(Completion::Next),
        Mnemonic::Popcnt | Mnemonic::Lzcnt | Mnemonic::Tzcnt | Mnemonic::Bsf | Mnemonic::Bsr => {
            bit_count(cx, instruction)
        }
        Mnemonic::Xgetbv => xgetbv(cx),
        Mnemonic::Xsetbv => xsetbv(cx),
        Mnemonic::Clac | Mnemonic::Stac => set_alignment_check(cx, mnemonic == Mnemonic::Stac),
        Mnemonic::Wait => fwait(cx),
        Mnemonic::Ldmxcsr | Mnemonic::Vldmxcsr => {
            ldmxcsr(cx, instruction, mnemonic == Mnemonic::Vldmxcsr)
        }
        Mnemonic::Stmxcsr | Mnemonic::Vstmxcsr => {
            stmxcsr(cx, instruction, mnemonic == Mnemonic::Vstmxcsr)
        }
        Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b => compare_exchange_wide(cx, instruction),
        Mnemonic::Fxsave | Mnemonic::Fxsave64 => fxsave(cx, instruction),
        Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => fxrstor(cx, instruction),
        Mnemonic::Xsave | Mnemonic::Xsave64 => xsave(cx, instruction, SaveKind::Standard),
        Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => xsave(cx, instruction, SaveKind::Optimized),
        Mnemonic::Xsavec | Mnemonic::Xsavec64 => xsave(cx, instruction, SaveKind::Compacted),
        Mnemonic::Xsaves | Mnemonic::Xsaves64 => xsave(cx, instruction, SaveKind::Supervisor),
        Mnemonic::Xrstor | Mnemonic::Xrstor64 => xrstor(cx, instruction, false),
        Mnemonic::Xrstors | Mnemonic::Xrstors64 => xrstor(cx, instruction, true),
        Mnemonic::Rdrand | Mnemonic::Rdseed => random(cx, instruction),
        _ => Err(cx.unsupported("Bulkhead's instruction emulator does not implement it")),
    }
}

fn width_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// The source operand (register or memory) of a two-operand instruction, `bytes` wide.
fn source_operand<V: VcpuState, M: GuestMemory>(
    cx: &Context<V, M>,
    instruction: &Instruction,
    bytes: usize,
) -> Step<u64> {
    match instruction.op1_kind() {
        OpKind::Register => Ok(cx.gpr(instruction.op1_register())),
        OpKind::Memory => {
            let address = cx.operand_address(instruction, 1, bytes)?;
            cx.read_u64(address, bytes)
        }
        _ => Err(cx.unsupported("unexpected source operand")),
    }
}

/// POPCNT, LZCNT, TZCNT, BSF, BSR.
fn bit_count<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
) -> Step<Completion> {
    let destination = instruction.op0_register();
    let bits = (destination.size() * 8) as u32;
    let source = source_operand(cx, instruction, destination.size())? & width_mask(bits);
    let zero = source == 0;
    // Count of leading zeros within the operand width.
    let leading = source.leading_zeros() - (64 - bits);
    match instruction.mnemonic() {
        Mnemonic::Popcnt => {
            cx.set_gpr(destination, u64::from(source.count_ones()));
            cx.set_flags(RFLAGS_ARITH, if zero { RFLAGS_ZF } else { 0 });
        }
        Mnemonic::Lzcnt | Mnemonic::Tzcnt => {
            let count = if instruction.mnemonic() == Mnemonic::Lzcnt {
                leading.min(bits)
            } else {
                source.trailing_zeros().min(bits)
            };
            cx.set_gpr(destination, u64::from(count));
            // CF: source was zero; ZF: result is zero. OF, SF, PF, AF are undefined: kept.
            let flags = if zero { RFLAGS_CF } else { 0 } | if count == 0 { RFLAGS_ZF } else { 0 };
            cx.set_flags(RFLAGS_CF | RFLAGS_ZF, flags);
        }
        _ if zero => {
            // BSF/BSR of zero: ZF set, destination unchanged (as AMD documents).
            cx.set_flags(RFLAGS_ZF, RFLAGS_ZF);
        }
        Mnemonic::Bsf => {
            cx.set_gpr(destination, u64::from(source.trailing_zeros()));
            cx.set_flags(RFLAGS_ZF, 0);
        }
        _ => {
            cx.set_gpr(destination, u64::from(bits - 1 - leading));
            cx.set_flags(RFLAGS_ZF, 0);
        }
    }
    Ok(Completion::Next)
}

fn require_osxsave<V: VcpuState, M: GuestMemory>(cx: &Context<V, M>) -> Step<()> {
    if cx.sregs.cr4 & CR4_OSXSAVE == 0 {
        return Err(Exception::invalid_opcode().into());
    }
    Ok(())
}

fn xgetbv<V: VcpuState, M: GuestMemory>(cx: &mut Context<V, M>) -> Step<Completion> {
    require_osxsave(cx)?;
    let xcr0 = cx.xcr0()?;
    let value = match cx.regs.rcx as u32 {
        0 => xcr0,
        1 if cx.cpu.xsave.xgetbv1 => {
            let state = cx.xsave_area()?;
            xcr0 & xsave::in_use(&state[..], xcr0)
        }
        _ => return Err(Exception::general_protection().into()),
    };
    cx.set_gpr(Register::EAX, value);
    cx.set_gpr(Register::EDX, value >> 32);
    Ok(Completion::Next)
}

/// Whether XCR0 may be set to `value` (SDM vol. 1, 13.3).
fn valid_xcr0(value: u64, supported: u64) -> bool {
    const MPX: u64 = 0b11 << 3;
    const AVX512: u64 = 0b111 << 5;
    const AMX: u64 = 0b11 << 17;
    let all_or_none = |group: u64| value & group == 0 || value & group == group;
    value & xsave::XFEATURE_X87 != 0
        && value & !supported == 0
        && (value & xsave::XFEATURE_AVX == 0 || value & xsave::XFEATURE_SSE != 0)
        && all_or_none(MPX)
        && all_or_none(AVX512)
        && (value & AVX512 == 0 || value & xsave::XFEATURE_AVX != 0)
        && all_or_none(AMX)
}

fn xsetbv<V: VcpuState, M: GuestMemory>(cx: &mut Context<V, M>) -> Step<Completion> {
    require_osxsave(cx)?;
    let value = cx.edx_eax();
    if cx.cpl != 0 || cx.regs.rcx as u32 != 0 || !valid_xcr0(value, cx.cpu.xsave.xcr0_supported) {
        return Err(Exception::general_protection().into());
    }
    let mut xcrs = cx.xcrs()?;
    let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    match xcrs.xcrs[..count].iter().position(|xcr| xcr.xcr == 0) {
        Some(index) => xcrs.xcrs[index].value = value,
        None if count < xcrs.xcrs.len() => {
            xcrs.xcrs[count].xcr = 0;
            xcrs.xcrs[count].value = value;
            xcrs.nr_xcrs = count as u32 + 1;
        }
        None => return Err(cx.unsupported("KVM reports no room for XCR0")),
    }
    cx.vcpu.set_xcrs(&xcrs)?;
    Ok(Completion::Next)
}

/// CLAC/STAC: supervisor only.
fn set_alignment_check<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    set: bool,
) -> Step<Completion> {
    if cx.cpl != 0 {
        return Err(Exception::invalid_opcode().into());
    }
    cx.set_flags(RFLAGS_AC, if set { RFLAGS_AC } else { 0 });
    Ok(Completion::Next)
}

/// FWAIT: raises #MF if the x87 FPU has an unmasked exception pending.
fn fwait<V: VcpuState, M: GuestMemory>(cx: &mut Context<V, M>) -> Step<Completion> {
    if cx.sregs.cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
        return Err(Exception::without_code(VECTOR_NM).into());
    }
    let state = cx.xsave_area()?;
    let (status, control) = (xsave::fsw(&state[..]), xsave::fcw(&state[..]));
    // Exception flags IE..PE (bits 0-5) not masked by the matching FCW bits.
    if status & !control & 0x3f == 0 {
        return Ok(Completion::Next);
    }
    if cx.sregs.cr0 & CR0_NE == 0 {
        return Err(cx.unsupported("x87 error reporting through FERR# (CR0.NE=0) is not emulated"));
    }
    Err(Exception::without_code(VECTOR_MF).into())
}

/// The #UD/#NM checks of SSE state instructions; `vex` for the AVX encodings.
fn require_sse<V: VcpuState, M: GuestMemory>(cx: &mut Context<V, M>, vex: bool) -> Step<()> {
    let cr0 = cx.sregs.cr0;
    let usable = if vex {
        let enabled = xsave::XFEATURE_SSE | xsave::XFEATURE_AVX;
        cr0 & CR0_PE != 0 && cx.sregs.cr4 & CR4_OSXSAVE != 0 && cx.xcr0()? & enabled == enabled
    } else {
        cr0 & CR0_EM == 0 && cx.sregs.cr4 & CR4_OSFXSR != 0
    };
    if !usable {
        return Err(Exception::invalid_opcode().into());
    }
    if cr0 & CR0_TS != 0 {
        return Err(Exception::without_code(VECTOR_NM).into());
    }
    Ok(())
}

fn ldmxcsr<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
    vex: bool,
) -> Step<Completion> {
    require_sse(cx, vex)?;
    let address = cx.operand_address(instruction, 0, 4)?;
    let value = cx.read_u64(address, 4)? as u32;
    let state = cx.xsave_area()?;
    if !xsave::mxcsr_allowed(&state[..], value) {
        return Err(Exception::general_protection().into());
    }
    xsave::set_mxcsr(&mut state[..], value);
    cx.xsave_area_changed();
    Ok(Completion::Next)
}

fn stmxcsr<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
    vex: bool,
) -> Step<Completion> {
    require_sse(cx, vex)?;
    let address = cx.operand_address(instruction, 0, 4)?;
    let value = xsave::mxcsr(&cx.xsave_area()?[..]);
    cx.write(address, &value.to_le_bytes())?;
    Ok(Completion::Next)
}

/// CMPXCHG8B/CMPXCHG16B. The exchange is one host atomic operation whenever the operand
/// is naturally aligned in one piece of host memory, which CMPXCHG16B's alignment rule
/// guarantees; only a misaligned CMPXCHG8B may fall back to a plain read and write.
fn compare_exchange_wide<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
) -> Step<Completion> {
    let wide = instruction.mnemonic() == Mnemonic::Cmpxchg16b;
    let width = if wide { 16 } else { 8 };
    let address = cx.operand_address(instruction, 0, width)?;
    if wide && !address.is_multiple_of(16) {
        return Err(Exception::general_protection().into());
    }
    let (expected, new) = if wide {
        (
            (u128::from(cx.regs.rdx) << 64) | u128::from(cx.regs.rax),
            (u128::from(cx.regs.rcx) << 64) | u128::from(cx.regs.rbx),
        )
    } else {
        let pair =
            |high: u64, low: u64| u128::from(((high & 0xffff_ffff) << 32) | (low & 0xffff_ffff));
        (
            pair(cx.regs.rdx, cx.regs.rax),
            pair(cx.regs.rcx, cx.regs.rbx),
        )
    };
    // A locked compare-exchange is a write access even when the comparison fails.
    let chunks = cx.translate(address, width, Access::Write)?;
    let atomic = match chunks.as_slice() {
        [only] => mmu::compare_exchange_phys(cx.mem, only.gpa, width, expected, new)?,
        _ => None,
    };
    let previous = match atomic {
        Some(previous) => previous,
        None => {
            let mut current = [0u8; 16];
            mmu::read_chunks(cx.mem, &chunks, &mut current[..width])?;
            let current = u128::from_le_bytes(current);
            if current == expected {
                mmu::write_chunks(cx.mem, &chunks, &new.to_le_bytes()[..width])?;
            }
            current
        }
    };
    if previous == expected {
        cx.set_flags(RFLAGS_ZF, RFLAGS_ZF);
    } else {
        cx.set_flags(RFLAGS_ZF, 0);
        if wide {
            cx.regs.rax = previous as u64;
            cx.regs.rdx = (previous >> 64) as u64;
        } else {
            cx.set_gpr(Register::EAX, previous as u64);
            cx.set_gpr(Register::EDX, (previous >> 32) as u64);
        }
    }
    Ok(Completion::Next)
}

fn wide_pointer_form(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        Mnemonic::Fxsave64
            | Mnemonic::Fxrstor64
            | Mnemonic::Xsave64
            | Mnemonic::Xsaveopt64
            | Mnemonic::Xsavec64
            | Mnemonic::Xsaves64
            | Mnemonic::Xrstor64
            | Mnemonic::Xrstors64
    )
}

fn format_of<V: VcpuState, M: GuestMemory>(
    cx: &Context<V, M>,
    instruction: &Instruction,
) -> Format {
    Format {
        long_mode: cx.long_mode(),
        wide_pointers: wide_pointer_form(instruction.mnemonic()),
    }
}

/// The checks FXSAVE/FXRSTOR make before touching memory; returns the area's address.
fn fxsave_area<V: VcpuState, M: GuestMemory>(
    cx: &Context<V, M>,
    instruction: &Instruction,
) -> Step<u64> {
    if cx.sregs.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(Exception::without_code(VECTOR_NM).into());
    }
    let address = cx.operand_address(instruction, 0, xsave::LEGACY_SIZE)?;
    if !address.is_multiple_of(16) {
        return Err(Exception::general_protection().into());
    }
    Ok(address)
}

fn fxsave<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
) -> Step<Completion> {
    let address = fxsave_area(cx, instruction)?;
    let format = format_of(cx, instruction);
    let spans = xsave::fxsave_spans(&cx.xsave_area()?[..], format);
    cx.write_spans(address, &spans)?;
    Ok(Completion::Next)
}

fn fxrstor<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
) -> Step<Completion> {
    let address = fxsave_area(cx, instruction)?;
    let format = format_of(cx, instruction);
    let mut image = [0u8; xsave::LEGACY_SIZE];
    cx.read(address, &mut image)?;
    xsave::fxrstor(&mut cx.xsave_area()?[..], &image, format)?;
    cx.xsave_area_changed();
    Ok(Completion::Next)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SaveKind {
    Standard,
    Optimized,
    Compacted,
    Supervisor,
}

/// The checks every XSAVE-family instruction makes; returns the area's address.
fn xsave_area<V: VcpuState, M: GuestMemory>(
    cx: &Context<V, M>,
    instruction: &Instruction,
    cpu_has_it: bool,
    supervisor: bool,
) -> Step<u64> {
    require_osxsave(cx)?;
    if !cpu_has_it {
        return Err(Exception::invalid_opcode().into());
    }
    if cx.sregs.cr0 & CR0_TS != 0 {
        return Err(Exception::without_code(VECTOR_NM).into());
    }
    if supervisor && cx.cpl != 0 {
        return Err(Exception::general_protection().into());
    }
    let address = cx.operand_address(instruction, 0, xsave::HEADER_OFFSET + xsave::HEADER_SIZE)?;
    if !address.is_multiple_of(64) {
        return Err(Exception::general_protection().into());
    }
    Ok(address)
}

/// XCR0, widened by the guest's IA32_XSS for the supervisor forms, and the requested-feature
/// bitmap EDX:EAX & that. Components beyond what KVM_GET_XSAVE holds are refused.
fn requested_features<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    supervisor: bool,
) -> Step<(u64, u64)> {
    let xcr0 = cx.xcr0()?;
    let xss = if supervisor {
        cx.vcpu.read_msr(MSR_IA32_XSS)?.unwrap_or(0)
    } else {
        0
    };
    let enabled = xcr0 | xss;
    let rfbm = cx.edx_eax() & enabled;
    if rfbm & xss != 0 {
        return Err(
            cx.unsupported("supervisor state components (IA32_XSS) are not in KVM's XSAVE area")
        );
    }
    if !cx.cpu.xsave.fits_kvm_area(rfbm) {
        return Err(
            cx.unsupported("a requested state component lies outside KVM's 4 KiB XSAVE area")
        );
    }
    Ok((enabled, rfbm))
}

fn xsave<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
    kind: SaveKind,
) -> Step<Completion> {
    let layout = &cx.cpu.xsave;
    let cpu_has_it = match kind {
        SaveKind::Standard => true,
        SaveKind::Optimized => layout.xsaveopt,
        SaveKind::Compacted => layout.xsavec,
        SaveKind::Supervisor => layout.xsaves,
    };
    let supervisor = kind == SaveKind::Supervisor;
    let address = xsave_area(cx, instruction, cpu_has_it, supervisor)?;
    let (_, rfbm) = requested_features(cx, supervisor)?;
    let form = if matches!(kind, SaveKind::Standard | SaveKind::Optimized) {
        SaveForm::Standard
    } else {
        SaveForm::Compacted
    };
    let old_xstate_bv = match form {
        SaveForm::Standard => cx.read_u64(address.wrapping_add(xsave::HEADER_OFFSET as u64), 8)?,
        SaveForm::Compacted => 0,
    };
    let xcr0 = cx.xcr0()?;
    let format = format_of(cx, instruction);
    let cpu = cx.cpu;
    let state = cx.xsave_area()?;
    let in_use = xsave::in_use(&state[..], xcr0);
    let spans = xsave::save_spans(
        &cpu.xsave,
        &state[..],
        rfbm,
        in_use,
        form,
        format,
        old_xstate_bv,
    );
    cx.write_spans(address, &spans)?;
    Ok(Completion::Next)
}

fn xrstor<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
    supervisor: bool,
) -> Step<Completion> {
    let layout = &cx.cpu.xsave;
    let cpu_has_it = !supervisor || layout.xsaves;
    let address = xsave_area(cx, instruction, cpu_has_it, supervisor)?;
    let (enabled, rfbm) = requested_features(cx, supervisor)?;
    let mut header = [0u8; xsave::HEADER_SIZE];
    cx.read(
        address.wrapping_add(xsave::HEADER_OFFSET as u64),
        &mut header,
    )?;
    let compaction_supported = if supervisor {
        layout.xsaves
    } else {
        layout.xsavec
    };
    let Some(form) = xsave::restore_form(&header, enabled, compaction_supported, supervisor) else {
        return Err(Exception::general_protection().into());
    };
    let format = format_of(cx, instruction);
    let reader = cx.reader();
    let cpu = cx.cpu;
    let state = cx.xsave_area()?;
    let mut read = |offset: usize, buf: &mut [u8]| reader(address.wrapping_add(offset as u64), buf);
    xsave::restore(
        &cpu.xsave,
        &mut state[..],
        &header,
        rfbm,
        form,
        format,
        &mut read,
    )?;
    cx.xsave_area_changed();
    Ok(Completion::Next)
}

/// RDRAND/RDSEED, served by the host's own instruction.
fn random<V: VcpuState, M: GuestMemory>(
    cx: &mut Context<V, M>,
    instruction: &Instruction,
) -> Step<Completion> {
    let seed = instruction.mnemonic() == Mnemonic::Rdseed;
    let value = if seed && cx.cpu.rdseed {
        // SAFETY: CPUID says the host CPU has RDSEED.
        unsafe { host_rdseed() }
    } else if !seed && cx.cpu.rdrand {
        // SAFETY: CPUID says the host CPU has RDRAND.
        unsafe { host_rdrand() }
    } else {
        return Err(cx.unsupported("the host CPU lacks this instruction"));
    };
    // CF says whether a value was delivered; OF, SF, ZF, AF, PF are cleared.
    cx.set_gpr(instruction.op0_register(), value.unwrap_or(0));
    cx.set_flags(RFLAGS_ARITH, if value.is_some() { RFLAGS_CF } else { 0 });
    Ok(Completion::Next)
}

#[target_feature(enable = "rdrand")]
fn host_rdrand() -> Option<u64> {
    let mut value = 0u64;
    (core::arch::x86_64::_rdrand64_step(&mut value) == 1).then_some(value)
}

#[target_feature(enable = "rdseed")]
fn host_rdseed() -> Option<u64> {
    let mut value = 0u64;
    (core::arch::x86_64::_rdseed64_step(&mut value) == 1).then_some(value)
}
