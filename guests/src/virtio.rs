//! What every virtio driver in these guests shares: bringing up the first
//! virtio-mmio device (at 0xd000_0000) with VERSION_1 only, and notifying.

use iced_x86::code_asm::*;

use crate::program::{Program, Result};

pub const DEVICE: u64 = 0xd000_0000;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// Device initialisation (virtio 1.2, 3.1.1) through the virtio-mmio
/// registers, with queue `i` of `size` entries at `bases[i]` (descriptor
/// table there, available ring at +0x1000, used ring at +0x2000); leaves the
/// device base in `rbx`.
pub fn init_device(p: &mut Program, size: u16, bases: &[u64]) -> Result<()> {
    p.a.mov(rbx, DEVICE)?;
    let reg = |offset: u32| dword_ptr(rbx + offset);
    p.a.mov(reg(0x70), 0u32)?; // reset
    p.a.mov(reg(0x70), 1u32)?; // ACKNOWLEDGE
    p.a.mov(reg(0x70), 3u32)?; // DRIVER
    p.a.mov(reg(0x24), 1u32)?; // driver features, high half
    p.a.mov(reg(0x20), 1u32)?; // VERSION_1
    p.a.mov(reg(0x24), 0u32)?;
    p.a.mov(reg(0x20), 0u32)?;
    p.a.mov(reg(0x70), 0xbu32)?; // FEATURES_OK
    p.a.mov(eax, reg(0x70))?;
    p.a.and(eax, 8)?;
    p.expect(rax, 8, "FEATURES_OK accepted")?;
    for (index, &base) in bases.iter().enumerate() {
        p.a.mov(reg(0x30), index as u32)?;
        p.a.mov(reg(0x38), u32::from(size))?;
        p.a.mov(reg(0x80), base as u32)?;
        p.a.mov(reg(0x84), 0u32)?;
        p.a.mov(reg(0x90), (base + 0x1000) as u32)?;
        p.a.mov(reg(0x94), 0u32)?;
        p.a.mov(reg(0xa0), (base + 0x2000) as u32)?;
        p.a.mov(reg(0xa4), 0u32)?;
        p.a.mov(reg(0x44), 1u32)?; // ready
    }
    p.a.mov(reg(0x70), 0xfu32) // DRIVER_OK
}

/// Writes descriptor `index` into a descriptor table image.
pub fn put_descriptor(table: &mut [u8], index: usize, addr: u64, len: u32, flags: u16, next: u16) {
    let at = index * 16;
    table[at..at + 8].copy_from_slice(&addr.to_le_bytes());
    table[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
    table[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
    table[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
}

/// A descriptor table with one single-buffer descriptor per `(addr, len,
/// flags)`, followed (at +0x1000) by an available ring offering them all:
/// receive buffers posted before the device starts.
pub fn posted_buffers(buffers: &[(u64, u32, u16)]) -> Vec<u8> {
    let mut area = vec![0u8; 0x1000 + 4 + 2 * buffers.len()];
    for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
        put_descriptor(&mut area, i, addr, len, flags, 0);
        area[0x1004 + 2 * i..0x1006 + 2 * i].copy_from_slice(&(i as u16).to_le_bytes());
    }
    area[0x1002..0x1004].copy_from_slice(&(buffers.len() as u16).to_le_bytes());
    area
}

/// Spins until the used index of the queue at `base` equals `index`.
pub fn wait_used_index(p: &mut Program, base: u64, index: AsmRegister16) -> Result<()> {
    let mut again = p.a.create_label();
    p.a.set_label(&mut again)?;
    p.a.movzx(eax, word_ptr(base + 0x2002))?;
    p.a.cmp(ax, index)?;
    p.a.jne(again)
}

/// Notifies queue `index` (device base in `rbx`).
pub fn notify(p: &mut Program, index: u32) -> Result<()> {
    p.a.mov(dword_ptr(rbx + 0x50), index)
}
