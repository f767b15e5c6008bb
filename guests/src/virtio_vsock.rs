//! A guest that speaks virtio-vsock itself, for the data-path test: it
//! connects to host port `HOST_PORT`, sends "hello" and expects "world";
//! then it accepts the host's connection to its port `GUEST_PORT`, answers
//! "pong", and prints `PASS virtio_vsock`.
//!
//! The vsock device is the first virtio-mmio device. Four receive buffers
//! are posted up front; packets to send are prepared in the image.

use iced_x86::code_asm::*;

use crate::program::{Program, Result};
use crate::virtio::{init_device, notify, posted_buffers, put_descriptor, F_WRITE};

pub const HOST_PORT: u32 = 5000;
pub const GUEST_PORT: u32 = 2000;
const RX_QUEUE: u64 = 0x40_0000;
const TX_QUEUE: u64 = 0x44_0000;
const EVENT_QUEUE: u64 = 0x48_0000;
const RX_BUFFERS: u64 = 0x50_0000;
const TX_PACKETS: u64 = 0x52_0000;
const BUFFER: u64 = 0x100;
const QUEUE_SIZE: u16 = 16;
const HEADER: usize = 44;
const GUEST_LOCAL_PORT: u32 = 1000;

mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RW: u16 = 5;
}

fn header(cid: u64, src_port: u32, dst_port: u32, op: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; HEADER];
    h[0..8].copy_from_slice(&cid.to_le_bytes());
    h[8..16].copy_from_slice(&2u64.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&(64u32 << 10).to_le_bytes()); // buf_alloc
    h.extend_from_slice(payload);
    h
}

/// Descriptor tables and rings for rx (four posted buffers) and tx (four
/// packets), and the packets themselves, as one blob per area.
fn prepared(cid: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let rx_buffers: Vec<(u64, u32, u16)> = (0..4)
        .map(|i| (RX_BUFFERS + BUFFER * i, BUFFER as u32, F_WRITE))
        .collect();
    let rx = posted_buffers(&rx_buffers);
    let packets = [
        header(cid, GUEST_LOCAL_PORT, HOST_PORT, op::REQUEST, b""),
        header(cid, GUEST_LOCAL_PORT, HOST_PORT, op::RW, b"hello"),
        // Their destination port (the host's) is filled in at run time.
        header(cid, GUEST_PORT, 0, op::RESPONSE, b""),
        header(cid, GUEST_PORT, 0, op::RW, b"pong"),
    ];
    let mut tx = vec![0u8; QUEUE_SIZE as usize * 16];
    let mut data = vec![0u8; 4 * BUFFER as usize];
    for (i, packet) in packets.iter().enumerate() {
        put_descriptor(
            &mut tx,
            i,
            TX_PACKETS + BUFFER * i as u64,
            packet.len() as u32,
            0,
            0,
        );
        data[i * BUFFER as usize..i * BUFFER as usize + packet.len()].copy_from_slice(packet);
    }
    (rx, tx, data)
}

pub fn vsock_workload(cid: u64) -> Result<Vec<u8>> {
    let mut p = Program::new("virtio_vsock")?;
    let (rx, tx, data) = prepared(cid);
    p.copy_data_to(rx, RX_QUEUE)?;
    p.copy_data_to(tx, TX_QUEUE)?;
    p.copy_data_to(data, TX_PACKETS)?;
    init_device(&mut p, QUEUE_SIZE, &[RX_QUEUE, TX_QUEUE, EVENT_QUEUE])?;
    let rx_used = RX_QUEUE + 0x2002;
    let tx_avail = TX_QUEUE + 0x1000;
    // Publishes tx packet `index` (its descriptor is `index`) as avail entry `index`.
    let send = |p: &mut Program, index: u32| -> Result<()> {
        p.a.mov(word_ptr(tx_avail + 4 + 2 * u64::from(index)), index)?;
        p.a.mov(word_ptr(tx_avail + 2), index + 1)?;
        notify(p, 1)
    };
    // Spins until the device has filled `count` receive buffers.
    let wait_rx = |p: &mut Program, count: u32| -> Result<()> {
        let mut again = p.a.create_label();
        p.a.set_label(&mut again)?;
        p.a.movzx(eax, word_ptr(rx_used))?;
        p.a.cmp(eax, count)?;
        p.a.jb(again)
    };
    let rx_field = |buffer: u64, offset: u64| RX_BUFFERS + BUFFER * buffer + offset;

    // Guest -> host: connect, check the answer, send "hello".
    send(&mut p, 0)?;
    wait_rx(&mut p, 1)?;
    p.a.movzx(eax, word_ptr(rx_field(0, 30)))?;
    p.expect(
        rax,
        u64::from(op::RESPONSE),
        "answer to our connection request",
    )?;
    send(&mut p, 1)?;
    // The host answers "world" and connects to our port; the two
    // connections are independent, so the packets may come in either order.
    wait_rx(&mut p, 3)?;
    let mut ordered = p.a.create_label();
    p.a.mov(r8, rx_field(1, 0))?;
    p.a.mov(r9, rx_field(2, 0))?;
    p.a.movzx(eax, word_ptr(r8 + 30))?;
    p.a.cmp(eax, u32::from(op::REQUEST))?;
    p.a.jne(ordered)?;
    p.a.xchg(r8, r9)?;
    p.a.set_label(&mut ordered)?;
    p.a.movzx(eax, word_ptr(r8 + 30))?;
    p.expect(rax, u64::from(op::RW), "data packet from the host")?;
    p.a.mov(eax, dword_ptr(r8 + 24))?;
    p.expect(rax, 5, "length of the host's data")?;
    p.a.mov(eax, dword_ptr(r8 + HEADER as i32))?;
    p.expect(
        rax,
        u64::from(u32::from_le_bytes(*b"worl")),
        "the host's data",
    )?;

    // Host -> guest: the request for our port; answer, then send "pong".
    p.a.movzx(eax, word_ptr(r9 + 30))?;
    p.expect(rax, u64::from(op::REQUEST), "the host's connection request")?;
    p.a.mov(eax, dword_ptr(r9 + 20))?;
    p.expect(rax, u64::from(GUEST_PORT), "the port the host connects to")?;
    p.a.mov(eax, dword_ptr(r9 + 16))?; // the host's port
    p.a.mov(dword_ptr(TX_PACKETS + 2 * BUFFER + 20), eax)?;
    p.a.mov(dword_ptr(TX_PACKETS + 3 * BUFFER + 20), eax)?;
    send(&mut p, 2)?;
    send(&mut p, 3)?;
    // Wait until the device took both packets.
    let mut sent = p.a.create_label();
    p.a.set_label(&mut sent)?;
    p.a.movzx(eax, word_ptr(TX_QUEUE + 0x2002))?;
    p.a.cmp(eax, 4)?;
    p.a.jb(sent)?;
    p.pass()?;
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepares_posted_buffers_and_packets() {
        let (rx, tx, data) = prepared(9);
        assert_eq!(u16::from_le_bytes([rx[0x1002], rx[0x1003]]), 4);
        assert_eq!(
            u32::from_le_bytes(tx[16 + 8..16 + 12].try_into().unwrap()),
            44 + 5
        );
        assert_eq!(&data[0x100 + 44..0x100 + 49], b"hello");
        assert_eq!(u64::from_le_bytes(data[0..8].try_into().unwrap()), 9);
        assert!(vsock_workload(9).is_ok());
    }
}
