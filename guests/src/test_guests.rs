//! One guest per VM exit path and per instruction the VMM finishes for KVM.
//!
//! A guest that checks something prints `PASS <name>` and powers off, or
//! `FAIL <name>: <what> (got 0x...)` and powers off; the exit-path guests end
//! the VM in the way their name says.

use iced_x86::code_asm::*;

use crate::program::{Program, Result, SCRATCH};

/// Every test guest, by name.
pub const TEST_GUESTS: &[&str] = &[
    "port_io",
    "mmio",
    "hlt_timer",
    "reset",
    "triple_fault",
    "panic",
    "spin",
    "halt",
    "echo",
    "int3",
    "popcnt",
    "lzcnt",
    "tzcnt",
    "xgetbv",
    "clac_stac",
    "cmpxchg16b",
    "fxsave_fxrstor",
    "xsave_xrstor",
    "ldmxcsr_stmxcsr",
    "fwait",
    "rdrand",
    "unhandled",
];

/// The guest called `name`, or None if there is no such guest.
pub fn test_guest(name: &str) -> Option<Result<Vec<u8>>> {
    let build: fn() -> Result<Vec<u8>> = match name {
        "port_io" => port_io,
        "mmio" => mmio,
        "hlt_timer" => hlt_timer,
        "reset" => reset,
        "triple_fault" => triple_fault,
        "panic" => panic,
        "spin" => spin,
        "halt" => halt,
        "echo" => echo,
        "int3" => int3,
        "popcnt" => popcnt,
        "lzcnt" => lzcnt,
        "tzcnt" => tzcnt,
        "xgetbv" => xgetbv,
        "clac_stac" => clac_stac,
        "cmpxchg16b" => cmpxchg16b,
        "fxsave_fxrstor" => fxsave_fxrstor,
        "xsave_xrstor" => xsave_xrstor,
        "ldmxcsr_stmxcsr" => ldmxcsr_stmxcsr,
        "fwait" => fwait,
        "rdrand" => rdrand,
        "unhandled" => unhandled,
        _ => return None,
    };
    Some(build())
}

/// An address whose 8-byte operand crosses from one page into the next.
const PAGE_CROSSING: u64 = SCRATCH + 0x1ffc;

/// `iterations` rounds of a two-instruction loop, then power-off. With
/// `port_exit` each round reads the UART scratch register (a port-I/O exit
/// the VMM handles); without, it runs a `nop` instead: the difference between
/// the two is the cost of the exit round trip.
pub fn port_io_loop(iterations: u32, port_exit: bool) -> Result<Vec<u8>> {
    let mut p = Program::new("port_io_loop")?;
    let mut again = p.a.create_label();
    p.a.mov(ecx, iterations)?;
    p.a.mov(dx, 0x3ffu32)?;
    p.a.set_label(&mut again)?;
    if port_exit {
        p.a.in_(al, dx)?;
    } else {
        p.a.nop()?;
    }
    p.a.dec(ecx)?;
    p.a.jnz(again)?;
    p.power_off()?;
    p.finish()
}

fn port_io() -> Result<Vec<u8>> {
    let mut p = Program::new("port_io")?;
    // 8-bit out and in: the UART scratch register.
    p.a.mov(dx, 0x3ffu32)?;
    p.a.mov(al, 0x5au32)?;
    p.a.out(dx, al)?;
    p.a.xor(eax, eax)?;
    p.a.in_(al, dx)?;
    p.expect(rax, 0x5a, "UART scratch register")?;
    // 32-bit out and in: PCI configuration of the host bridge (1b36:0008).
    p.pci_config_read(0, 0)?;
    p.a.mov(eax, eax)?;
    p.expect(rax, 0x0008_1b36, "host bridge vendor:device")?;
    // A port nothing answers reads as all ones.
    p.a.mov(dx, 0x2f8u32)?;
    p.a.xor(eax, eax)?;
    p.a.in_(al, dx)?;
    p.expect(rax, 0xff, "unclaimed port")?;
    p.pass()?;
    p.finish()
}

fn mmio() -> Result<Vec<u8>> {
    let mut p = Program::new("mmio")?;
    p.find_pvpanic()?;
    p.a.movzx(eax, byte_ptr(rbx))?;
    p.expect(rax, 3, "pvpanic capabilities (panicked | crash loaded)")?;
    p.pass()?;
    p.finish()
}

/// Arms the LAPIC one-shot timer, halts, and checks the timer interrupt woke it.
fn hlt_timer() -> Result<Vec<u8>> {
    const LAPIC: u64 = 0xfee0_0000;
    const VECTOR: u8 = 0x40;
    let mut p = Program::new("hlt_timer")?;
    let mut handler = p.a.create_label();
    let mut halted = p.a.create_label();
    p.install_idt()?;
    p.set_gate(VECTOR, handler)?;
    p.a.xor(r15, r15)?;
    p.a.mov(rdi, LAPIC)?;
    p.a.mov(dword_ptr(rdi + 0xf0), 0x1ffu32)?; // spurious vector register: enable
    p.a.mov(dword_ptr(rdi + 0x3e0), 0xbu32)?; // divide by 1
    p.a.mov(dword_ptr(rdi + 0x320), u32::from(VECTOR))?; // LVT timer: one-shot
    p.a.mov(dword_ptr(rdi + 0x380), 100_000u32)?; // initial count
    p.a.sti()?;
    p.a.set_label(&mut halted)?;
    p.a.hlt()?;
    p.a.test(r15, r15)?;
    p.a.jz(halted)?;
    p.a.cli()?;
    p.expect(r15, 1, "timer interrupts")?;
    p.pass()?;

    p.a.set_label(&mut handler)?;
    p.a.inc(r15)?;
    p.a.mov(rdi, LAPIC)?;
    p.a.mov(dword_ptr(rdi + 0xb0), 0u32)?; // EOI
    p.a.iretq()?;
    p.finish()
}

fn reset() -> Result<Vec<u8>> {
    let mut p = Program::new("reset")?;
    p.print("resetting through the i8042\r\n")?;
    p.a.mov(al, 0xfeu32)?;
    p.a.out(0x64, al)?;
    p.a.hlt()?;
    p.finish()
}

/// No usable IDT, then an exception: #UD, #DF, shutdown.
fn triple_fault() -> Result<Vec<u8>> {
    let mut p = Program::new("triple_fault")?;
    p.install_idt()?;
    p.load_idt(0)?;
    p.a.ud2()?;
    p.finish()
}

fn panic() -> Result<Vec<u8>> {
    let mut p = Program::new("panic")?;
    p.find_pvpanic()?;
    p.print("reporting a panic through pvpanic\r\n")?;
    p.a.mov(byte_ptr(rbx), 1u32)?;
    p.a.hlt()?;
    p.finish()
}

fn spin() -> Result<Vec<u8>> {
    let mut p = Program::new("spin")?;
    let mut forever = p.a.create_label();
    p.print("spinning\r\n")?;
    p.a.set_label(&mut forever)?;
    p.a.pause()?;
    p.a.jmp(forever)?;
    p.finish()
}

/// Halts for good, as Linux ends a halt: interrupts off, LAPIC left
/// software-disabled (as reset leaves it), `hlt`.
fn halt() -> Result<Vec<u8>> {
    let mut p = Program::new("halt")?;
    let mut forever = p.a.create_label();
    p.print("halting\r\n")?;
    p.a.cli()?;
    p.a.set_label(&mut forever)?;
    p.a.hlt()?;
    p.a.jmp(forever)?;
    p.finish()
}

/// Echoes what arrives on the serial port until a line ends, then powers
/// off: the console input path (terminal or pipe to the UART).
fn echo() -> Result<Vec<u8>> {
    const LINE_STATUS: u32 = 0x3fd;
    const DATA_READY: u32 = 1;
    let mut p = Program::new("echo")?;
    let mut wait = p.a.create_label();
    let mut end = p.a.create_label();
    p.print("echo: ready\r\n")?;
    p.a.set_label(&mut wait)?;
    p.a.mov(dx, LINE_STATUS)?;
    p.a.in_(al, dx)?;
    p.a.test(al, DATA_READY as i32)?;
    p.a.jz(wait)?;
    p.a.mov(dx, 0x3f8u32)?;
    p.a.in_(al, dx)?;
    p.a.cmp(al, b'\r' as i32)?;
    p.a.je(end)?;
    p.a.cmp(al, b'\n' as i32)?;
    p.a.je(end)?;
    p.a.out(dx, al)?;
    p.a.jmp(wait)?;
    p.a.set_label(&mut end)?;
    p.print("\r\necho: line ended\r\n")?;
    p.power_off()?;
    p.finish()
}

/// `int3` is a trap: the #BP handler sees the address after it.
fn int3() -> Result<Vec<u8>> {
    let mut p = Program::new("int3")?;
    let mut handler = p.a.create_label();
    let mut after = p.a.create_label();
    p.install_idt()?;
    p.set_gate(3, handler)?;
    p.a.xor(r15, r15)?;
    p.a.int3()?;
    p.a.set_label(&mut after)?;
    p.a.lea(rax, ptr(after))?;
    p.a.cmp(r15, rax)?;
    p.expect_zf("#BP handler's return address")?;
    p.pass()?;

    p.a.set_label(&mut handler)?;
    p.a.mov(r15, qword_ptr(rsp))?;
    p.a.iretq()?;
    p.finish()
}

/// Stores `value` at the page-crossing address and leaves the address in rdi.
fn store_across_pages(p: &mut Program, value: u64) -> Result<()> {
    p.a.mov(rdi, PAGE_CROSSING)?;
    p.a.mov(rax, value)?;
    p.a.mov(qword_ptr(rdi), rax)
}

fn popcnt() -> Result<Vec<u8>> {
    let mut p = Program::new("popcnt")?;
    p.a.mov(rbx, 0xf0f0_0000_0000_00ffu64)?;
    p.a.popcnt(rax, rbx)?;
    p.expect(rax, 16, "popcnt rax, rbx")?;
    store_across_pages(&mut p, 0x8000_0000_0000_0001)?;
    p.a.popcnt(rax, qword_ptr(rdi))?;
    p.expect(rax, 2, "popcnt of a page-crossing operand")?;
    p.a.xor(ebx, ebx)?;
    p.a.popcnt(rax, rbx)?;
    p.expect_zf("ZF after popcnt of 0")?;
    p.pass()?;
    p.finish()
}

fn lzcnt() -> Result<Vec<u8>> {
    let mut p = Program::new("lzcnt")?;
    p.a.mov(rbx, 0x0000_0f00_0000_0000u64)?;
    p.a.lzcnt(rax, rbx)?;
    p.expect(rax, 20, "lzcnt rax, rbx")?;
    store_across_pages(&mut p, 1)?;
    p.a.lzcnt(rax, qword_ptr(rdi))?;
    p.expect(rax, 63, "lzcnt of a page-crossing operand")?;
    p.a.xor(ebx, ebx)?;
    p.a.lzcnt(eax, ebx)?;
    p.expect(rax, 32, "lzcnt eax, 0")?;
    p.pass()?;
    p.finish()
}

fn tzcnt() -> Result<Vec<u8>> {
    let mut p = Program::new("tzcnt")?;
    p.a.mov(rbx, 0x100u64)?;
    p.a.tzcnt(rax, rbx)?;
    p.expect(rax, 8, "tzcnt rax, rbx")?;
    store_across_pages(&mut p, 0x8000_0000_0000_0000)?;
    p.a.tzcnt(rax, qword_ptr(rdi))?;
    p.expect(rax, 63, "tzcnt of a page-crossing operand")?;
    p.a.xor(ebx, ebx)?;
    p.a.tzcnt(rax, rbx)?;
    p.expect(rax, 64, "tzcnt rax, 0")?;
    p.pass()?;
    p.finish()
}

/// XCR0 has x87 state always enabled.
fn xgetbv() -> Result<Vec<u8>> {
    let mut p = Program::new("xgetbv")?;
    p.enable_sse(true)?;
    p.a.xor(ecx, ecx)?;
    p.a.xgetbv()?;
    p.a.and(eax, 1)?;
    p.expect(rax, 1, "XCR0.x87")?;
    p.pass()?;
    p.finish()
}

/// RFLAGS.AC after stac and clac.
fn clac_stac() -> Result<Vec<u8>> {
    const AC: u64 = 1 << 18;
    let mut p = Program::new("clac_stac")?;
    p.a.stac()?;
    p.a.pushfq()?;
    p.a.pop(rax)?;
    p.a.and(eax, AC as i32)?;
    p.expect(rax, AC, "RFLAGS.AC after stac")?;
    p.a.clac()?;
    p.a.pushfq()?;
    p.a.pop(rax)?;
    p.a.and(eax, AC as i32)?;
    p.expect(rax, 0, "RFLAGS.AC after clac")?;
    p.pass()?;
    p.finish()
}

fn cmpxchg16b() -> Result<Vec<u8>> {
    let mut p = Program::new("cmpxchg16b")?;
    p.a.mov(rdi, SCRATCH + 0x100)?;
    p.a.mov(rax, 0x1111u64)?;
    p.a.mov(qword_ptr(rdi), rax)?;
    p.a.mov(rdx, 0x2222u64)?;
    p.a.mov(qword_ptr(rdi + 8), rdx)?;
    p.a.mov(rbx, 0x3333u64)?;
    p.a.mov(rcx, 0x4444u64)?;
    // Equal: stores rcx:rbx, ZF set.
    p.a.lock().cmpxchg16b(xmmword_ptr(rdi))?;
    p.expect_zf("ZF after a matching cmpxchg16b")?;
    p.a.mov(rax, qword_ptr(rdi))?;
    p.expect(rax, 0x3333, "low qword stored")?;
    p.a.mov(rax, qword_ptr(rdi + 8))?;
    p.expect(rax, 0x4444, "high qword stored")?;
    // Not equal: loads memory into rdx:rax, ZF clear.
    p.a.xor(eax, eax)?;
    p.a.xor(edx, edx)?;
    p.a.lock().cmpxchg16b(xmmword_ptr(rdi))?;
    let mut not_equal = p.a.create_label();
    p.a.jne(not_equal)?;
    p.fail_with_rax("ZF after a mismatching cmpxchg16b")?;
    p.a.set_label(&mut not_equal)?;
    p.expect(rax, 0x3333, "low qword loaded")?;
    p.expect(rdx, 0x4444, "high qword loaded")?;
    p.pass()?;
    p.finish()
}

const XMM0_PATTERN: u64 = 0x0123_4567_89ab_cdef;
/// Offsets in the legacy (FXSAVE) area.
const FX_MXCSR: i32 = 24;
const FX_XMM0: i32 = 160;

/// Zeroes `len` bytes at rdi (keeps rdi).
fn zero(p: &mut Program, len: u32) -> Result<()> {
    p.a.push(rdi)?;
    p.a.xor(eax, eax)?;
    p.a.mov(ecx, len)?;
    p.a.rep().stosb()?;
    p.a.pop(rdi)
}

/// fxrstor from one area, fxsave to another, and xmm0 and MXCSR survive.
fn fxsave_fxrstor() -> Result<Vec<u8>> {
    let mut p = Program::new("fxsave_fxrstor")?;
    p.enable_sse(false)?;
    p.a.mov(rdi, SCRATCH + 0x1000)?;
    zero(&mut p, 512)?;
    p.a.mov(dword_ptr(rdi + FX_MXCSR), 0x1f80u32)?;
    p.a.mov(rax, XMM0_PATTERN)?;
    p.a.mov(qword_ptr(rdi + FX_XMM0), rax)?;
    p.a.fxrstor64(ptr(rdi))?;
    p.a.mov(rdi, SCRATCH + 0x3000)?;
    zero(&mut p, 512)?;
    p.a.fxsave64(ptr(rdi))?;
    p.a.mov(rax, qword_ptr(rdi + FX_XMM0))?;
    p.expect(rax, XMM0_PATTERN, "xmm0 after fxrstor/fxsave")?;
    p.a.mov(eax, dword_ptr(rdi + FX_MXCSR))?;
    p.expect(rax, 0x1f80, "MXCSR after fxrstor/fxsave")?;
    p.pass()?;
    p.finish()
}

/// xsetbv XCR0 = x87|SSE, xrstor xmm0 from one area, xsave it into an area
/// that crosses a page boundary.
fn xsave_xrstor() -> Result<Vec<u8>> {
    const XSTATE_BV: i32 = 512;
    let mut p = Program::new("xsave_xrstor")?;
    p.enable_sse(true)?;
    p.a.xor(ecx, ecx)?;
    p.a.mov(eax, 3u32)?;
    p.a.xor(edx, edx)?;
    p.a.xsetbv()?;
    p.a.xor(ecx, ecx)?;
    p.a.xgetbv()?;
    p.expect(rax, 3, "XCR0 after xsetbv")?;

    p.a.mov(rdi, SCRATCH + 0x1000)?;
    zero(&mut p, 1024)?;
    p.a.mov(dword_ptr(rdi + FX_MXCSR), 0x1f80u32)?;
    p.a.mov(rax, XMM0_PATTERN)?;
    p.a.mov(qword_ptr(rdi + FX_XMM0), rax)?;
    p.a.mov(qword_ptr(rdi + XSTATE_BV), 3i32)?;
    p.a.mov(eax, 3u32)?;
    p.a.xor(edx, edx)?;
    p.a.xrstor64(ptr(rdi))?;

    // 64-byte aligned, 0x100 bytes before a page boundary.
    p.a.mov(rdi, SCRATCH + 0x2f00)?;
    zero(&mut p, 1024)?;
    p.a.mov(eax, 3u32)?;
    p.a.xor(edx, edx)?;
    p.a.xsave64(ptr(rdi))?;
    p.a.mov(rax, qword_ptr(rdi + FX_XMM0))?;
    p.expect(rax, XMM0_PATTERN, "xmm0 after xrstor/xsave")?;
    p.a.mov(rax, qword_ptr(rdi + XSTATE_BV))?;
    p.a.and(eax, 2)?;
    p.expect(rax, 2, "XSTATE_BV.SSE after xsave")?;
    p.pass()?;
    p.finish()
}

fn ldmxcsr_stmxcsr() -> Result<Vec<u8>> {
    let mut p = Program::new("ldmxcsr_stmxcsr")?;
    p.enable_sse(false)?;
    p.a.mov(rdi, SCRATCH)?;
    p.a.mov(dword_ptr(rdi), 0x1fa0u32)?; // default | precision flag
    p.a.mov(dword_ptr(rdi + 4), 0u32)?;
    p.a.ldmxcsr(dword_ptr(rdi))?;
    p.a.stmxcsr(dword_ptr(rdi + 4))?;
    p.a.mov(eax, dword_ptr(rdi + 4))?;
    p.expect(rax, 0x1fa0, "MXCSR read back")?;
    p.pass()?;
    p.finish()
}

/// With no x87 exception pending, fwait is a no-op.
fn fwait() -> Result<Vec<u8>> {
    let mut p = Program::new("fwait")?;
    p.enable_sse(false)?;
    p.a.mov(rbx, 0x77u64)?;
    p.a.wait()?; // fwait
    p.expect(rbx, 0x77, "rbx across fwait")?;
    p.pass()?;
    p.finish()
}

/// rdrand sets CF when it returns a number; two draws differ.
fn rdrand() -> Result<Vec<u8>> {
    let mut p = Program::new("rdrand")?;
    let mut first = p.a.create_label();
    let mut second = p.a.create_label();
    p.a.set_label(&mut first)?;
    p.a.rdrand(rbx)?;
    p.a.jnc(first)?;
    p.a.set_label(&mut second)?;
    p.a.rdrand(rcx)?;
    p.a.jnc(second)?;
    p.a.cmp(rbx, rcx)?;
    let mut differ = p.a.create_label();
    p.a.jne(differ)?;
    p.a.mov(rax, rbx)?;
    p.fail_with_rax("two rdrand draws are equal")?;
    p.a.set_label(&mut differ)?;
    p.pass()?;
    p.finish()
}

/// An instruction neither KVM's emulator nor the VMM's handles at CPL0
/// (`aesenc xmm0, xmm1`): the VM must stop naming its bytes and RIP.
fn unhandled() -> Result<Vec<u8>> {
    let mut p = Program::new("unhandled")?;
    p.enable_sse(false)?;
    p.a.aesenc(xmm0, xmm1)?;
    p.print("FAIL unhandled: aesenc ran\r\n")?;
    p.power_off()?;
    p.finish()
}
