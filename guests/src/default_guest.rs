//! The guest `bulkhead run` boots when no kernel is given.

use iced_x86::code_asm::*;

use crate::program::{Program, Result};

/// The first line the default guest prints.
pub const BANNER: &str = "Bulkhead embedded guest: up in 64-bit long mode";

/// Offsets in the Linux zero page (`struct boot_params`) the guest reads.
const ZERO_PAGE_E820_ENTRIES: i32 = 0x1e8;
const ZERO_PAGE_E820_TABLE: i32 = 0x2d0;
const E820_ENTRY_SIZE: i32 = 20;
const E820_RAM: u32 = 1;
/// The MP floating pointer lives in the EBDA's first KiB.
const EBDA_START: u64 = 0x9_fc00;
const EBDA_END: u64 = 0xa_0000;
const MP_SIGNATURE: u32 = u32::from_le_bytes(*b"_MP_");

/// Prints the banner, the CPUs (from the MP table) and the memory (from the
/// e820 map) it was given, does a port-I/O round trip (UART scratch
/// register) and an MMIO read (the pvpanic register), and powers off.
pub fn default_guest() -> Result<Vec<u8>> {
    let mut p = Program::new("default")?;
    // The very first instruction is a POST-code write: the VMM timestamps it.
    p.a.out(0x80, al)?;
    p.a.mov(r12, rsi)?; // zero page
    p.print(&format!("{BANNER}\r\n"))?;

    count_cpus(&mut p)?;
    p.print("cpus: ")?;
    p.print_rax_decimal()?;

    sum_memory(&mut p)?;
    p.print(", memory: ")?;
    p.print_rax_decimal()?;
    p.print(" MiB\r\n")?;

    // Port I/O: the UART scratch register reads back what was written.
    p.a.mov(dx, 0x3ffu32)?;
    p.a.mov(al, 0xa5u32)?;
    p.a.out(dx, al)?;
    p.a.xor(eax, eax)?;
    p.a.in_(al, dx)?;
    p.expect(rax, 0xa5, "UART scratch register")?;
    p.print("port I/O: UART scratch register read back 0xa5\r\n")?;

    // MMIO: pvpanic's register reports the events it supports.
    p.find_pvpanic()?;
    p.a.movzx(eax, byte_ptr(rbx))?;
    p.print("MMIO: pvpanic register reads ")?;
    p.print_rax_decimal()?;
    p.print("\r\npowering off\r\n")?;
    p.power_off()?;
    p.finish()
}

/// rax = number of enabled processor entries in the MP table (0 without one).
fn count_cpus(p: &mut Program) -> Result<()> {
    let a = &mut p.a;
    let mut scan = a.create_label();
    let mut found = a.create_label();
    let mut entry = a.create_label();
    let mut not_processor = a.create_label();
    let mut disabled = a.create_label();
    let mut done = a.create_label();
    a.xor(eax, eax)?;
    a.mov(rdi, EBDA_START)?;
    a.set_label(&mut scan)?;
    a.cmp(dword_ptr(rdi), MP_SIGNATURE as i32)?;
    a.je(found)?;
    a.add(rdi, 16)?;
    a.mov(rcx, EBDA_END)?;
    a.cmp(rdi, rcx)?;
    a.jb(scan)?;
    a.jmp(done)?;

    a.set_label(&mut found)?;
    a.mov(ebx, dword_ptr(rdi + 4))?; // configuration table
    a.movzx(ecx, word_ptr(rbx + 0x22))?; // entry count
    a.lea(rdi, ptr(rbx + 0x2c))?; // first entry
    a.set_label(&mut entry)?;
    a.test(ecx, ecx)?;
    a.jz(done)?;
    a.dec(ecx)?;
    a.cmp(byte_ptr(rdi), 0)?; // type 0: processor, 20 bytes; others 8
    a.jne(not_processor)?;
    a.test(byte_ptr(rdi + 3), 1)?; // CPU flags: enabled
    a.jz(disabled)?;
    a.inc(eax)?;
    a.set_label(&mut disabled)?;
    a.add(rdi, 20)?;
    a.jmp(entry)?;
    a.set_label(&mut not_processor)?;
    a.add(rdi, 8)?;
    a.jmp(entry)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// rax = RAM in the e820 map, in MiB rounded up (the map leaves out the
/// legacy hole below 1 MiB).
fn sum_memory(p: &mut Program) -> Result<()> {
    let a = &mut p.a;
    let mut entry = a.create_label();
    let mut not_ram = a.create_label();
    let mut done = a.create_label();
    a.xor(eax, eax)?;
    a.movzx(ecx, byte_ptr(r12 + ZERO_PAGE_E820_ENTRIES))?;
    a.lea(rdi, ptr(r12 + ZERO_PAGE_E820_TABLE))?;
    a.set_label(&mut entry)?;
    a.test(ecx, ecx)?;
    a.jz(done)?;
    a.dec(ecx)?;
    a.cmp(dword_ptr(rdi + 16), E820_RAM as i32)?;
    a.jne(not_ram)?;
    a.add(rax, qword_ptr(rdi + 8))?;
    a.set_label(&mut not_ram)?;
    a.add(rdi, E820_ENTRY_SIZE)?;
    a.jmp(entry)?;
    a.set_label(&mut done)?;
    a.add(rax, 0xf_ffff)?;
    a.shr(rax, 20)
}
