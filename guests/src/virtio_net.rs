//! Guests that move Ethernet frames through virtio-net themselves, for the
//! packet-rate benchmark. Transmit: batches of frames per notification, spinning on
//! the used index, then `PASS virtio_net` and power-off.
//!
//! The NIC is the first virtio-mmio device. Frames are broadcast with a
//! local experimental EtherType (0x88b5), which the host stack drops.

use iced_x86::code_asm::*;

use crate::program::{Program, Result};
use crate::virtio::{
    init_device, notify, posted_buffers, put_descriptor, wait_used_index, F_WRITE,
};

const RX_QUEUE: u64 = 0x40_0000;
const TX_QUEUE: u64 = 0x44_0000;
const TX_AVAIL: u64 = TX_QUEUE + 0x1000;
const FRAMES: u64 = 0x50_0000;
const QUEUE_SIZE: u16 = 64;
/// The virtio-net header in front of every frame (VERSION_1: 12 bytes).
const VNET_HEADER: u32 = 12;

#[derive(Clone, Copy, Debug)]
pub struct NetWorkload {
    pub frames: u32,
    /// Ethernet frame length without the virtio-net header (60..=1514).
    pub frame_bytes: u32,
    /// Frames per notification (at most 64).
    pub batch: u16,
}

/// The transmit descriptor table (one readable descriptor per frame) and
/// the frames with their (all-zero) virtio-net headers.
fn prepared(w: &NetWorkload) -> (Vec<u8>, Vec<u8>) {
    let stride = u64::from(VNET_HEADER + w.frame_bytes).next_multiple_of(64);
    let mut table = vec![0u8; usize::from(QUEUE_SIZE) * 16];
    let mut frames = vec![0u8; (stride * u64::from(w.batch)) as usize];
    for i in 0..u64::from(w.batch) {
        put_descriptor(
            &mut table,
            i as usize,
            FRAMES + stride * i,
            VNET_HEADER + w.frame_bytes,
            0,
            0,
        );
        let frame = (stride * i) as usize + VNET_HEADER as usize;
        frames[frame..frame + 6].copy_from_slice(&[0xff; 6]);
        frames[frame + 6..frame + 12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frames[frame + 12..frame + 14].copy_from_slice(&[0x88, 0xb5]);
    }
    (table, frames)
}

pub fn net_workload(w: NetWorkload) -> Result<Vec<u8>> {
    assert!(w.batch > 0 && w.batch <= QUEUE_SIZE && (60..=1514).contains(&w.frame_bytes));
    let mut p = Program::new("virtio_net")?;
    let (table, frames) = prepared(&w);
    p.copy_data_to(table, TX_QUEUE)?;
    p.copy_data_to(frames, FRAMES)?;
    init_device(&mut p, QUEUE_SIZE, &[RX_QUEUE, TX_QUEUE])?;
    // r12: batches left; r14: avail index.
    p.a.mov(r12d, w.frames / u32::from(w.batch))?;
    p.a.xor(r14, r14)?;
    let mut batch = p.a.create_label();
    let mut done = p.a.create_label();
    p.a.test(r12d, r12d)?;
    p.a.jz(done)?;
    p.a.set_label(&mut batch)?;
    for i in 0..u32::from(w.batch) {
        p.a.lea(ecx, ptr(r14 + i as i32))?;
        p.a.and(ecx, i32::from(QUEUE_SIZE - 1))?;
        p.a.mov(word_ptr(rcx * 2 + (TX_AVAIL + 4) as i32), i)?;
    }
    p.a.add(r14d, u32::from(w.batch))?;
    p.a.mov(word_ptr(TX_AVAIL + 2), r14w)?;
    notify(&mut p, 1)?;
    wait_used_index(&mut p, TX_QUEUE, r14w)?;
    p.a.dec(r12d)?;
    p.a.jnz(batch)?;
    p.a.set_label(&mut done)?;
    p.pass()?;
    p.finish()
}

/// Receive buffers for the receive workload: one per queue entry.
const RX_BUFFERS: u64 = 0x60_0000;
const RX_BUFFER_BYTES: u64 = 2048;
const RX_AVAIL: u64 = RX_QUEUE + 0x1000;
const RX_USED: u64 = RX_QUEUE + 0x2000;

/// Every receive descriptor (one 2 KiB writable buffer each) and the
/// available ring offering all of them.
fn prepared_receive() -> Vec<u8> {
    let buffers: Vec<(u64, u32, u16)> = (0..u64::from(QUEUE_SIZE))
        .map(|i| {
            (
                RX_BUFFERS + RX_BUFFER_BYTES * i,
                RX_BUFFER_BYTES as u32,
                F_WRITE,
            )
        })
        .collect();
    posted_buffers(&buffers)
}

/// A guest that receives `frames` frames (whatever the host sends), giving
/// each buffer back as soon as it is used and notifying every 16, then
/// prints `PASS virtio_net` and powers off.
pub fn net_receive_workload(frames: u32) -> Result<Vec<u8>> {
    const REFILL_EVERY: u32 = 16;
    let mut p = Program::new("virtio_net")?;
    p.copy_data_to(prepared_receive(), RX_QUEUE)?;
    init_device(&mut p, QUEUE_SIZE, &[RX_QUEUE, TX_QUEUE])?;
    // r13: frames left; r14: used entries consumed.
    p.a.mov(r13d, frames)?;
    p.a.xor(r14, r14)?;
    let mut wait = p.a.create_label();
    let mut no_notify = p.a.create_label();
    let mut done = p.a.create_label();
    p.a.test(r13d, r13d)?;
    p.a.jz(done)?;
    p.a.set_label(&mut wait)?;
    p.a.movzx(eax, word_ptr(RX_USED + 2))?;
    p.a.cmp(ax, r14w)?;
    p.a.je(wait)?;
    // The used entry's buffer goes back into the same available slot.
    p.a.mov(ecx, r14d)?;
    p.a.and(ecx, i32::from(QUEUE_SIZE - 1))?;
    p.a.mov(eax, dword_ptr(rcx * 8 + (RX_USED + 4) as i32))?;
    p.a.mov(word_ptr(rcx * 2 + (RX_AVAIL + 4) as i32), ax)?;
    p.a.inc(r14d)?;
    p.a.lea(edx, ptr(r14 + i32::from(QUEUE_SIZE)))?;
    p.a.mov(word_ptr(RX_AVAIL + 2), dx)?;
    p.a.test(r14d, REFILL_EVERY - 1)?;
    p.a.jnz(no_notify)?;
    notify(&mut p, 0)?;
    p.a.set_label(&mut no_notify)?;
    p.a.dec(r13d)?;
    p.a.jnz(wait)?;
    p.a.set_label(&mut done)?;
    p.pass()?;
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_readable_descriptor_per_frame() {
        let w = NetWorkload {
            frames: 8,
            frame_bytes: 60,
            batch: 4,
        };
        let (table, frames) = prepared(&w);
        assert_eq!(
            u64::from_le_bytes(table[16..24].try_into().unwrap()),
            FRAMES + 128
        );
        assert_eq!(u32::from_le_bytes(table[24..28].try_into().unwrap()), 72);
        assert_eq!(u16::from_le_bytes(table[28..30].try_into().unwrap()), 0);
        assert_eq!(&frames[128 + 12 + 12..128 + 12 + 14], &[0x88, 0xb5]);
        assert!(net_workload(w).is_ok());
    }

    #[test]
    fn offers_every_receive_buffer_up_front() {
        let area = prepared_receive();
        assert_eq!(u16::from_le_bytes([area[0x1002], area[0x1003]]), QUEUE_SIZE);
        assert_eq!(
            u64::from_le_bytes(area[16..24].try_into().unwrap()),
            RX_BUFFERS + 2048
        );
        assert_eq!(u16::from_le_bytes([area[0x1004 + 6], area[0x1004 + 7]]), 3);
        assert!(net_receive_workload(10).is_ok());
    }
}
