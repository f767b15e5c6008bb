//! A guest that drives virtio-blk itself: the smallest driver that can
//! measure the device (sequential or random reads or writes, a batch of
//! requests per notification), for benchmarks.
//!
//! The disk is the first virtio-mmio device (vda at 0xd000_0000). The guest
//! sets up one queue (`virtio::init_device`), then for each batch writes
//! the sectors into prepared request headers, publishes the heads, notifies,
//! and spins on the used index. It checks the last status byte, prints
//! `PASS virtio_blk` and powers off.

use iced_x86::code_asm::*;

use crate::program::{Program, Result};
use crate::virtio::{init_device, notify, put_descriptor, wait_used_index, F_NEXT, F_WRITE};

const QUEUE: u64 = 0x40_0000;
const AVAIL: u64 = QUEUE + 0x1000;
const HEADERS: u64 = QUEUE + 0x3000;
const STATUSES: u64 = QUEUE + 0x3800;
const BUFFERS: u64 = 0x50_0000;
const QUEUE_SIZE: u16 = 64;
const SECTOR: u64 = 512;

/// What the guest asks of the disk.
#[derive(Clone, Copy, Debug)]
pub struct BlockWorkload {
    /// Requests in all (rounded down to whole batches).
    pub requests: u32,
    /// Bytes per request, a multiple of 512.
    pub request_bytes: u32,
    pub write: bool,
    pub random: bool,
    /// Requests in flight per notification (at most 21: three descriptors each).
    pub batch: u16,
    /// The disk's size in sectors, a power of two.
    pub disk_sectors: u64,
}

/// The descriptor table and request headers the guest copies into place.
fn prepared_queue(w: &BlockWorkload) -> (Vec<u8>, Vec<u8>) {
    let mut table = vec![0u8; usize::from(QUEUE_SIZE) * 16];
    let mut headers = vec![0u8; usize::from(w.batch) * 16];
    for i in 0..u64::from(w.batch) {
        let (head, data, status) = (3 * i, 3 * i + 1, 3 * i + 2);
        let mut put = |index: u64, addr: u64, len: u32, flags: u16, next: u64| {
            put_descriptor(&mut table, index as usize, addr, len, flags, next as u16)
        };
        put(head, HEADERS + 16 * i, 16, F_NEXT, data);
        let data_flags = if w.write { F_NEXT } else { F_NEXT | F_WRITE };
        put(
            data,
            BUFFERS + u64::from(w.request_bytes) * i,
            w.request_bytes,
            data_flags,
            status,
        );
        put(status, STATUSES + i, 1, F_WRITE, 0);
        let kind: u32 = if w.write { 1 } else { 0 };
        headers[i as usize * 16..i as usize * 16 + 4].copy_from_slice(&kind.to_le_bytes());
    }
    (table, headers)
}

pub fn block_workload(w: BlockWorkload) -> Result<Vec<u8>> {
    assert!(w.batch > 0 && u64::from(w.batch) * 3 <= u64::from(QUEUE_SIZE));
    assert!(w.disk_sectors.is_power_of_two() && u64::from(w.request_bytes) % SECTOR == 0);
    let sectors_per_request = u64::from(w.request_bytes) / SECTOR;
    let slots = w.disk_sectors / sectors_per_request;
    let mut p = Program::new("virtio_blk")?;
    let (table, headers) = prepared_queue(&w);
    p.copy_data_to(table, QUEUE)?;
    p.copy_data_to(headers, HEADERS)?;

    init_device(&mut p, QUEUE_SIZE, &[QUEUE])?;

    // r12: batches left; r13: sector state; r14: avail index; r15: LCG multiplier.
    p.a.mov(r12d, w.requests / u32::from(w.batch))?;
    p.a.xor(r13, r13)?;
    p.a.xor(r14, r14)?;
    p.a.mov(r15, 6_364_136_223_846_793_005u64)?;
    let mut batch = p.a.create_label();
    let mut done = p.a.create_label();
    p.a.test(r12d, r12d)?;
    p.a.jz(done)?;
    p.a.set_label(&mut batch)?;
    for i in 0..u64::from(w.batch) {
        // The next sector: sequential, or a random whole request slot.
        if w.random {
            p.a.imul_2(r13, r15)?;
            p.a.add(r13, 1_442_695_040_888_963_407i64 as i32)?;
            p.a.mov(rax, r13)?;
            p.a.shr(rax, 33)?;
            p.a.and(rax, (slots - 1) as i32)?;
            p.a.imul_3(rax, rax, sectors_per_request as i32)?;
        } else {
            p.a.mov(rax, r13)?;
            p.a.and(rax, (w.disk_sectors - 1) as i32)?;
            p.a.add(r13, sectors_per_request as i32)?;
        }
        p.a.mov(qword_ptr(HEADERS + 16 * i + 8), rax)?;
        // avail.ring[(idx + i) % size] = head 3i
        p.a.lea(ecx, ptr(r14 + i as i32))?;
        p.a.and(ecx, i32::from(QUEUE_SIZE - 1))?;
        p.a.mov(word_ptr(rcx * 2 + (AVAIL + 4) as i32), (3 * i) as u32)?;
    }
    p.a.add(r14d, u32::from(w.batch))?;
    p.a.mov(word_ptr(AVAIL + 2), r14w)?;
    notify(&mut p, 0)?;
    wait_used_index(&mut p, QUEUE, r14w)?;
    p.a.dec(r12d)?;
    p.a.jnz(batch)?;
    p.a.set_label(&mut done)?;
    p.a.movzx(eax, byte_ptr(STATUSES))?;
    p.expect(rax, 0, "status of the last request")?;
    p.pass()?;
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepares_three_descriptors_per_request() {
        let (table, headers) = prepared_queue(&BlockWorkload {
            requests: 4,
            request_bytes: 4096,
            write: false,
            random: true,
            batch: 2,
            disk_sectors: 1 << 17,
        });
        // Request 1's data descriptor: buffer 1, 4 KiB, NEXT | WRITE, next 5.
        let d = &table[4 * 16..5 * 16];
        assert_eq!(
            u64::from_le_bytes(d[0..8].try_into().unwrap()),
            BUFFERS + 4096
        );
        assert_eq!(u32::from_le_bytes(d[8..12].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(d[12..14].try_into().unwrap()), 3);
        assert_eq!(u16::from_le_bytes(d[14..16].try_into().unwrap()), 5);
        assert_eq!(headers.len(), 32);
        assert!(block_workload(BlockWorkload {
            requests: 4,
            request_bytes: 4096,
            write: false,
            random: true,
            batch: 2,
            disk_sectors: 1 << 17
        })
        .is_ok());
    }
}
