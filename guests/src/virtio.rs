//! What every virtio driver in these guests shares: bringing up the first
//! virtio-mmio device (at 0xd000_0000) with VERSION_1 only, and notifying.

use iced_x86::code_asm::*;

use crate::program::{Program, Result};

pub const DEVICE: u64 = 0xd000_0000;

/// A split virtqueue whose descriptor table is at `base`, available ring at
/// `base + 0x1000` and used ring at `base + 0x2000`.
pub struct VirtQueue {
    pub index: u32,
    pub size: u16,
    pub base: u64,
}

/// Device initialisation (virtio 1.2, 3.1.1) through the virtio-mmio
/// registers; leaves the device base in `rbx`.
pub fn init_device(p: &mut Program, queues: &[VirtQueue]) -> Result<()> {
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
    for queue in queues {
        p.a.mov(reg(0x30), queue.index)?;
        p.a.mov(reg(0x38), u32::from(queue.size))?;
        p.a.mov(reg(0x80), queue.base as u32)?;
        p.a.mov(reg(0x84), 0u32)?;
        p.a.mov(reg(0x90), (queue.base + 0x1000) as u32)?;
        p.a.mov(reg(0x94), 0u32)?;
        p.a.mov(reg(0xa0), (queue.base + 0x2000) as u32)?;
        p.a.mov(reg(0xa4), 0u32)?;
        p.a.mov(reg(0x44), 1u32)?; // ready
    }
    p.a.mov(reg(0x70), 0xfu32) // DRIVER_OK
}

/// Notifies queue `index` (device base in `rbx`).
pub fn notify(p: &mut Program, index: u32) -> Result<()> {
    p.a.mov(dword_ptr(rbx + 0x50), index)
}
