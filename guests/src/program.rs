//! A small layer over iced-x86's code assembler for writing guests: serial
//! output, numbers, checks, an IDT, power-off, and the ELF wrapper.
//!
//! Guests start in 64-bit long mode at CPL0 with the VMM's identity-mapped
//! page tables, a stack, and `rsi` pointing at the Linux zero page (the same
//! state a Linux kernel's 64-bit entry gets). On hosts whose KVM emulates
//! kernel code every instruction here costs about a microsecond, so guests
//! stay short.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use crate::elf;

/// Where guests are loaded (the usual kernel load address).
pub const LOAD_ADDRESS: u64 = 0x10_0000;
/// Scratch memory the guests use for data (inside the smallest VM's RAM).
pub const SCRATCH: u64 = 0x30_0000;
/// The guest's own IDT, when it installs one.
const IDT_BASE: u64 = 0x31_0000;
/// Where an IDT descriptor (limit, base) is written for `lidt`.
const IDT_DESCRIPTOR: u64 = IDT_BASE - 16;

const COM1: u16 = 0x3f8;
const POWER_OFF_PORT: u16 = 0x604;
/// PM1a control: SLP_EN (bit 13) with SLP_TYP 5 (bits 10-12), the S5
/// (soft-off) sleep type the VMM's DSDT names.
const SLEEP_S5: u16 = (1 << 13) | (5 << 10);
/// Device 1b36:0011 as read from PCI config offset 0 (device id in the high half).
const PVPANIC_PCI_ID: u64 = 0x0011_1b36;

pub type Result<T> = std::result::Result<T, IcedError>;

pub struct Program {
    pub a: CodeAssembler,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    print_routine: CodeLabel,
    decimal_routine: CodeLabel,
    hex_routine: CodeLabel,
    name: &'static str,
}

impl Program {
    /// A program whose PASS/FAIL lines carry `name`.
    pub fn new(name: &'static str) -> Result<Self> {
        let mut a = CodeAssembler::new(64)?;
        let print_routine = a.create_label();
        let decimal_routine = a.create_label();
        let hex_routine = a.create_label();
        Ok(Self {
            a,
            strings: Vec::new(),
            print_routine,
            decimal_routine,
            hex_routine,
            name,
        })
    }

    /// Writes `text` to COM1. Keeps every register but `rflags`.
    pub fn print(&mut self, text: &str) -> Result<()> {
        assert!(!text.is_empty());
        let label = self.a.create_label();
        self.strings.push((label, text.as_bytes().to_vec()));
        self.a.push(rsi)?;
        self.a.push(rcx)?;
        self.a.lea(rsi, ptr(label))?;
        self.a.mov(ecx, text.len() as u32)?;
        self.a.call(self.print_routine)?;
        self.a.pop(rcx)?;
        self.a.pop(rsi)
    }

    /// Embeds `bytes` in the image; the label is their address.
    pub fn data(&mut self, bytes: Vec<u8>) -> CodeLabel {
        let label = self.a.create_label();
        self.strings.push((label, bytes));
        label
    }

    /// Embeds `bytes` in the image and emits code that copies them to `to`
    /// (prepared descriptor tables, rings, packets).
    pub fn copy_data_to(&mut self, bytes: Vec<u8>, to: u64) -> Result<()> {
        let len = bytes.len() as u32;
        let label = self.data(bytes);
        self.a.lea(rsi, ptr(label))?;
        self.a.mov(rdi, to)?;
        self.a.mov(ecx, len)?;
        self.a.rep().movsb()
    }

    /// Writes `rax` in decimal to COM1. Keeps every register but `rflags`.
    pub fn print_rax_decimal(&mut self) -> Result<()> {
        self.a.call(self.decimal_routine)
    }

    /// Writes `rax` as 16 hex digits to COM1. Keeps every register but `rflags`.
    pub fn print_rax_hex(&mut self) -> Result<()> {
        self.a.call(self.hex_routine)
    }

    /// Fails the guest (a FAIL line naming `what` and the value, then power
    /// off) unless `register == expected`. Uses r11.
    pub fn expect(&mut self, register: AsmRegister64, expected: u64, what: &str) -> Result<()> {
        let mut equal = self.a.create_label();
        self.a.mov(r11, expected)?;
        self.a.cmp(register, r11)?;
        self.a.je(equal)?;
        self.a.mov(rax, register)?;
        self.fail_with_rax(what)?;
        self.a.set_label(&mut equal)?;
        self.a.nop()
    }

    /// Fails the guest unless the last comparison was "equal" (ZF set).
    pub fn expect_zf(&mut self, what: &str) -> Result<()> {
        let mut ok = self.a.create_label();
        self.a.je(ok)?;
        self.a.xor(eax, eax)?;
        self.fail_with_rax(what)?;
        self.a.set_label(&mut ok)?;
        self.a.nop()
    }

    /// Prints "FAIL name: what (got 0x<rax>)" and powers off.
    pub fn fail_with_rax(&mut self, what: &str) -> Result<()> {
        self.print(&format!("FAIL {}: {what} (got 0x", self.name))?;
        self.print_rax_hex()?;
        self.print(")\r\n")?;
        self.power_off()
    }

    /// Prints "PASS name" and powers off.
    pub fn pass(&mut self) -> Result<()> {
        self.print(&format!("PASS {}\r\n", self.name))?;
        self.power_off()
    }

    /// Asks the VMM to power off (PM1a control, SLP_EN with the S5 sleep
    /// type); never returns.
    pub fn power_off(&mut self) -> Result<()> {
        let mut forever = self.a.create_label();
        self.a.mov(dx, POWER_OFF_PORT as u32)?;
        self.a.mov(ax, SLEEP_S5 as u32)?;
        self.a.out(dx, ax)?;
        self.a.set_label(&mut forever)?;
        self.a.hlt()?;
        self.a.jmp(forever)
    }

    /// Makes SSE usable (CR0.MP, no CR0.EM/TS; CR4.OSFXSR, OSXMMEXCPT) and,
    /// with `xsave`, CR4.OSXSAVE.
    pub fn enable_sse(&mut self, xsave: bool) -> Result<()> {
        self.a.mov(rax, cr0)?;
        self.a.and(rax, !((1u64 << 2) | (1 << 3)) as i32)?;
        self.a.or(rax, 1 << 1)?;
        self.a.mov(cr0, rax)?;
        self.a.mov(rax, cr4)?;
        let mut bits = (1 << 9) | (1 << 10);
        if xsave {
            bits |= 1 << 18;
        }
        self.a.or(rax, bits)?;
        self.a.mov(cr4, rax)
    }

    /// Installs an empty IDT of the guest's own (all vectors not present).
    pub fn install_idt(&mut self) -> Result<()> {
        self.a.mov(rdi, IDT_BASE)?;
        self.a.xor(eax, eax)?;
        self.a.mov(ecx, 4096u32)?;
        self.a.rep().stosb()?;
        self.load_idt(4095)
    }

    /// `lidt` with the guest IDT's base and `limit` (0 makes every exception
    /// fatal: the way to a triple fault).
    pub fn load_idt(&mut self, limit: u16) -> Result<()> {
        self.a.mov(rdi, IDT_DESCRIPTOR)?;
        self.a.mov(word_ptr(rdi), limit as u32)?;
        self.a.mov(rax, IDT_BASE)?;
        self.a.mov(qword_ptr(rdi + 2), rax)?;
        self.a.lidt(ptr(rdi))
    }

    /// Points IDT `vector` at `handler` (a 64-bit interrupt gate, DPL 0).
    pub fn set_gate(&mut self, vector: u8, handler: CodeLabel) -> Result<()> {
        self.a.mov(rdi, IDT_BASE + u64::from(vector) * 16)?;
        self.a.lea(rax, ptr(handler))?;
        self.a.mov(word_ptr(rdi), ax)?;
        self.a.mov(word_ptr(rdi + 2), cs)?;
        self.a.mov(word_ptr(rdi + 4), 0x8e00u32)?;
        self.a.shr(rax, 16)?;
        self.a.mov(word_ptr(rdi + 6), ax)?;
        self.a.shr(rax, 16)?;
        self.a.mov(dword_ptr(rdi + 8), eax)?;
        self.a.mov(dword_ptr(rdi + 12), 0u32)
    }

    /// Reads a dword of PCI configuration space (mechanism #1, ports
    /// 0xcf8/0xcfc) of bus 0 `device` function 0 into eax.
    pub fn pci_config_read(&mut self, device: u8, offset: u8) -> Result<()> {
        let address = 0x8000_0000u32 | (u32::from(device) << 11) | u32::from(offset);
        self.a.mov(dx, 0xcf8u32)?;
        self.a.mov(eax, address)?;
        self.a.out(dx, eax)?;
        self.a.mov(dx, 0xcfcu32)?;
        self.a.in_(eax, dx)
    }

    /// Finds the pvpanic PCI device (1b36:0011, device 1), enables its memory
    /// decoding and leaves the address of its MMIO register in rbx; fails the
    /// guest if it is not there.
    pub fn find_pvpanic(&mut self) -> Result<()> {
        self.pci_config_read(1, 0)?;
        self.a.mov(ebx, eax)?;
        self.expect(rbx, PVPANIC_PCI_ID, "pvpanic PCI vendor:device")?;
        // Command register: memory space enable.
        self.a.mov(dx, 0xcf8u32)?;
        self.a.mov(eax, 0x8000_0804u32)?;
        self.a.out(dx, eax)?;
        self.a.mov(dx, 0xcfcu32)?;
        self.a.mov(ax, 0x2u32)?;
        self.a.out(dx, ax)?;
        self.pci_config_read(1, 0x10)?;
        self.a.and(eax, 0xffff_fff0u32 as i32)?;
        self.a.mov(ebx, eax)
    }

    /// Emits the shared routines and data, and wraps the code in an ELF.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.emit_routines()?;
        for (mut label, bytes) in std::mem::take(&mut self.strings) {
            self.a.set_label(&mut label)?;
            self.a.db(&bytes)?;
        }
        let code = self.a.assemble(LOAD_ADDRESS + elf::HEADERS_SIZE)?;
        Ok(elf::executable(LOAD_ADDRESS, &code, 0))
    }

    fn emit_routines(&mut self) -> Result<()> {
        let a = &mut self.a;
        // print: rsi = text, rcx = length (> 0)
        a.set_label(&mut self.print_routine)?;
        a.push(rax)?;
        a.push(rdx)?;
        a.mov(dx, COM1 as u32)?;
        let mut next = a.create_label();
        a.set_label(&mut next)?;
        a.lodsb()?;
        a.out(dx, al)?;
        a.dec(rcx)?;
        a.jnz(next)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.ret()?;

        // decimal: rax, digits built backwards on the stack
        a.set_label(&mut self.decimal_routine)?;
        for register in [rax, rbx, rcx, rdx, rsi] {
            a.push(register)?;
        }
        a.sub(rsp, 32)?;
        a.lea(rsi, ptr(rsp + 32))?;
        a.mov(ebx, 10u32)?;
        a.xor(ecx, ecx)?;
        let mut digit = a.create_label();
        a.set_label(&mut digit)?;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.add(dl, b'0' as i32)?;
        a.dec(rsi)?;
        a.mov(byte_ptr(rsi), dl)?;
        a.inc(rcx)?;
        a.test(rax, rax)?;
        a.jnz(digit)?;
        a.call(self.print_routine)?;
        a.add(rsp, 32)?;
        for register in [rsi, rdx, rcx, rbx, rax] {
            a.pop(register)?;
        }
        a.ret()?;

        // hex: rax, 16 digits
        a.set_label(&mut self.hex_routine)?;
        for register in [rax, rbx, rcx, rdx] {
            a.push(register)?;
        }
        a.mov(rbx, rax)?;
        a.mov(ecx, 16u32)?;
        a.mov(dx, COM1 as u32)?;
        let mut nibble = a.create_label();
        let mut decimal_digit = a.create_label();
        a.set_label(&mut nibble)?;
        a.rol(rbx, 4)?;
        a.mov(al, bl)?;
        a.and(al, 0xf)?;
        a.add(al, b'0' as i32)?;
        a.cmp(al, b'9' as i32)?;
        a.jbe(decimal_digit)?;
        a.add(al, (b'a' - b'9' - 1) as i32)?;
        a.set_label(&mut decimal_digit)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(nibble)?;
        for register in [rdx, rcx, rbx, rax] {
            a.pop(register)?;
        }
        a.ret()
    }
}
