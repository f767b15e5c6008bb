//! A guest that idles until the console has input and echoes it back: it
//! halts with the UART's receive interrupt as its only wake-up, so an idle VM
//! costs the host no CPU time. Delete pressed on its keyboard (the host's
//! Ctrl-Alt-Del) makes it power off, as a shutdown request should. The host
//! daemon's tests and benchmark run it.

use iced_x86::code_asm::*;

use crate::program::{Program, Result};

/// What the guest prints once it waits for input.
pub const CONSOLE_ECHO_READY: &str = "Bulkhead echo guest: ready";

const PIC1_COMMAND: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_COMMAND: u16 = 0xa0;
const PIC2_DATA: u16 = 0xa1;
/// The 8259s' vectors start here (above the CPU's exceptions).
const PIC_VECTOR_BASE: u8 = 0x20;
const COM1_IRQ: u8 = 4;
const KEYBOARD_IRQ: u8 = 1;
const COM1: u16 = 0x3f8;
const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;
/// Delete's make code in scan code set 1 (the controller translates) and 2.
const DELETE_SET1: u8 = 0x53;
const DELETE_SET2: u8 = 0x71;

fn outb(a: &mut CodeAssembler, port: u16, value: u8) -> Result<()> {
    a.mov(dx, u32::from(port))?;
    a.mov(al, u32::from(value))?;
    a.out(dx, al)
}

pub fn console_echo() -> Result<Vec<u8>> {
    let mut p = Program::new("console_echo")?;
    let mut handler = p.a.create_label();
    let mut wait = p.a.create_label();
    let mut drain = p.a.create_label();
    let mut keyboard = p.a.create_label();
    let mut power_off = p.a.create_label();
    p.a.out(0x80, al)?;
    p.install_idt()?;
    p.set_gate(PIC_VECTOR_BASE + COM1_IRQ, handler)?;
    p.set_gate(PIC_VECTOR_BASE + KEYBOARD_IRQ, handler)?;
    let a = &mut p.a;
    // The 8259 pair: edge triggered, vectors 0x20-0x2f, only COM1's and
    // the keyboard's IRQs open.
    for (command, data, vector, cascade, mask) in [
        (
            PIC1_COMMAND,
            PIC1_DATA,
            PIC_VECTOR_BASE,
            0x04,
            !((1u8 << COM1_IRQ) | (1u8 << KEYBOARD_IRQ)),
        ),
        (PIC2_COMMAND, PIC2_DATA, PIC_VECTOR_BASE + 8, 0x02, 0xff),
    ] {
        outb(a, command, 0x11)?;
        outb(a, data, vector)?;
        outb(a, data, cascade)?;
        outb(a, data, 0x01)?;
        outb(a, data, mask)?;
    }
    // UART: interrupt on received data; OUT2 gates the IRQ line on a PC.
    outb(a, COM1 + 1, 0x01)?;
    outb(a, COM1 + 4, 0x0b)?;
    p.print(&format!("{CONSOLE_ECHO_READY}\r\n"))?;

    let a = &mut p.a;
    a.set_label(&mut wait)?;
    // `sti; hlt` cannot lose an interrupt: sti takes effect after hlt starts.
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.set_label(&mut drain)?;
    a.mov(dx, u32::from(COM1 + 5))?;
    a.in_(al, dx)?;
    a.test(al, 1)?;
    a.jz(keyboard)?;
    a.mov(dx, u32::from(COM1))?;
    a.in_(al, dx)?;
    a.out(dx, al)?;
    a.jmp(drain)?;
    // Then every byte the keyboard sent.
    a.set_label(&mut keyboard)?;
    a.in_(al, I8042_STATUS as u32)?;
    a.test(al, 1)?;
    a.jz(wait)?;
    a.in_(al, I8042_DATA as u32)?;
    a.cmp(al, u32::from(DELETE_SET1))?;
    a.je(power_off)?;
    a.cmp(al, u32::from(DELETE_SET2))?;
    a.je(power_off)?;
    a.jmp(keyboard)?;

    a.set_label(&mut power_off)?;
    p.print("shutdown requested: powering off\r\n")?;
    p.power_off()?;

    let a = &mut p.a;
    a.set_label(&mut handler)?;
    a.push(rax)?;
    a.mov(al, 0x20u32)?;
    a.out(i32::from(PIC1_COMMAND), al)?;
    a.pop(rax)?;
    a.iretq()?;
    p.finish()
}
