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
    /// Whether the data itself is checked: each sector the guest writes
    /// holds its own number in its first 8 bytes (the rest zero), and each
    /// sector it reads must (the test fills the disk so). Off in benchmarks.
    pub check_data: bool,
}

/// The LCG the guest walks random request slots with (Knuth's MMIX
/// multiplier; the increment as the guest's sign-extended 32-bit immediate).
const LCG_MULTIPLIER: u64 = 6_364_136_223_846_793_005;
const LCG_INCREMENT: i32 = 1_442_695_040_888_963_407i64 as i32;

impl BlockWorkload {
    /// The first sector of each request, in the order the guest sends them:
    /// what a test compares the disk's contents with.
    pub fn request_sectors(&self) -> Vec<u64> {
        let sectors_per_request = u64::from(self.request_bytes) / SECTOR;
        let slots = self.disk_sectors / sectors_per_request;
        let requests = u64::from(self.requests / u32::from(self.batch) * u32::from(self.batch));
        let mut state = 0u64;
        (0..requests)
            .map(|_| {
                if self.random {
                    state = state
                        .wrapping_mul(LCG_MULTIPLIER)
                        .wrapping_add(i64::from(LCG_INCREMENT) as u64);
                    ((state >> 33) & (slots - 1)) * sectors_per_request
                } else {
                    let sector = state & (self.disk_sectors - 1);
                    state += sectors_per_request;
                    sector
                }
            })
            .collect()
    }
}

/// A sector's contents when `check_data` is on: its number, then zeros.
pub fn numbered_sector(sector: u64) -> [u8; SECTOR as usize] {
    let mut bytes = [0u8; SECTOR as usize];
    bytes[..8].copy_from_slice(&sector.to_le_bytes());
    bytes
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
    p.a.mov(r15, LCG_MULTIPLIER)?;
    let mut batch = p.a.create_label();
    let mut done = p.a.create_label();
    p.a.test(r12d, r12d)?;
    p.a.jz(done)?;
    p.a.set_label(&mut batch)?;
    for i in 0..u64::from(w.batch) {
        // The next sector: sequential, or a random whole request slot.
        if w.random {
            p.a.imul_2(r13, r15)?;
            p.a.add(r13, LCG_INCREMENT)?;
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
        if w.check_data && w.write {
            // Each sector of the buffer: its number, then zeros.
            for k in 0..sectors_per_request {
                let at = BUFFERS + i * u64::from(w.request_bytes) + k * SECTOR;
                p.a.lea(rdx, ptr(rax + k as i32))?;
                p.a.mov(qword_ptr(at), rdx)?;
            }
        }
        // avail.ring[(idx + i) % size] = head 3i
        p.a.lea(ecx, ptr(r14 + i as i32))?;
        p.a.and(ecx, i32::from(QUEUE_SIZE - 1))?;
        p.a.mov(word_ptr(rcx * 2 + (AVAIL + 4) as i32), (3 * i) as u32)?;
    }
    p.a.add(r14d, u32::from(w.batch))?;
    p.a.mov(word_ptr(AVAIL + 2), r14w)?;
    notify(&mut p, 0)?;
    wait_used_index(&mut p, QUEUE, r14w)?;
    if w.check_data && !w.write {
        // Each sector read came from where it was asked: its first and
        // last sectors hold their numbers.
        for i in 0..u64::from(w.batch) {
            for k in [0, sectors_per_request - 1] {
                let at = BUFFERS + i * u64::from(w.request_bytes) + k * SECTOR;
                p.a.mov(rax, qword_ptr(at))?;
                p.a.sub(rax, qword_ptr(HEADERS + 16 * i + 8))?;
                p.a.sub(rax, k as i32)?;
                p.expect(rax, 0, "a read sector's number minus the sector asked for")?;
            }
        }
    }
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
            check_data: false,
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
            disk_sectors: 1 << 17,
            check_data: true,
        })
        .is_ok());
    }

    #[test]
    fn sequential_requests_walk_the_disk_and_wrap() {
        let sectors = BlockWorkload {
            requests: 5,
            request_bytes: 4096,
            write: true,
            random: false,
            batch: 1,
            disk_sectors: 32,
            check_data: true,
        }
        .request_sectors();
        assert_eq!(sectors, [0, 8, 16, 24, 0]);
    }

    #[test]
    fn random_requests_are_whole_slots_inside_the_disk_in_whole_batches() {
        let workload = BlockWorkload {
            requests: 35,
            request_bytes: 4096,
            write: true,
            random: true,
            batch: 8,
            disk_sectors: 1 << 14,
            check_data: true,
        };
        let sectors = workload.request_sectors();
        assert_eq!(sectors.len(), 32);
        assert!(sectors.iter().all(|s| s % 8 == 0 && *s < 1 << 14));
        // The first: state = increment (sign-extended), slot = state >> 33.
        let first = ((i64::from(LCG_INCREMENT) as u64) >> 33) & ((1 << 11) - 1);
        assert_eq!(sectors[0], first * 8);
        let distinct: std::collections::BTreeSet<_> = sectors.iter().collect();
        assert!(distinct.len() > 16, "{sectors:?}");
    }

    #[test]
    fn a_numbered_sector_holds_its_number_then_zeros() {
        let bytes = numbered_sector(0x0102_0304_0506_0708);
        assert_eq!(bytes[..8], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert!(bytes[8..].iter().all(|&b| b == 0));
    }
}
