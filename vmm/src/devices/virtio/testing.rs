//! A virtqueue in a small guest memory, filled the way a driver would, for
//! unit tests, fuzz targets and benchmarks that drive devices without a guest.

use super::{DetachedEvents, Interrupt, VirtioDevice};
use crate::memory::GuestRam;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// A queue in guest memory that tests fill the way a driver would.
pub struct TestQueue {
    pub memory: GuestRam,
    pub queue: Queue,
    pub size: u16,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_avail: u16,
}

pub const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
/// Data buffers for tests live from here.
pub const DATA: u64 = 0x10000;
pub const MEMORY_SIZE: u64 = 0x100000;

/// A ready queue at the rings `TestQueue::new` fills, for a device to own.
pub fn device_queue() -> Queue {
    device_queue_at(DESC_TABLE)
}

/// A ready queue whose rings start at `base` (as `TestQueue::at`).
pub fn device_queue_at(base: u64) -> Queue {
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(base as u32), Some(0));
    queue.set_avail_ring_address(Some((base + AVAIL_RING - DESC_TABLE) as u32), Some(0));
    queue.set_used_ring_address(Some((base + USED_RING - DESC_TABLE) as u32), Some(0));
    queue.set_ready(true);
    queue
}

impl Default for TestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl TestQueue {
    pub fn new() -> Self {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap();
        TestQueue::at(memory, DESC_TABLE)
    }

    /// A second (third, ...) queue in the same memory, its rings from `base`
    /// (0x4000 apart from others; data stays at `DATA` and above).
    pub fn at(memory: GuestRam, base: u64) -> Self {
        let queue = device_queue_at(base);
        assert!(queue.is_valid(&memory));
        TestQueue {
            memory,
            queue,
            size: QUEUE_SIZE,
            desc_table: GuestAddress(base),
            avail: GuestAddress(base + AVAIL_RING - DESC_TABLE),
            used: GuestAddress(base + USED_RING - DESC_TABLE),
            next_avail: 0,
        }
    }

    /// Writes descriptor `index` of the main table.
    pub fn set_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_descriptor(self.desc_table, index, addr, len, flags, next);
    }

    pub fn write_descriptor(
        &self,
        table: GuestAddress,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let descriptor = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.memory
            .write_obj(descriptor, table.unchecked_add(u64::from(index) * 16))
            .unwrap();
    }

    /// Builds a chain from (addr, len, writable) at descriptors 0..n and offers it.
    pub fn offer_chain(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        self.offer_chain_at(0, buffers)
    }

    /// Builds a chain at descriptors `first..first + n` and offers it, so
    /// several chains can be outstanding at once.
    pub fn offer_chain_at(&mut self, first: u16, buffers: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= F_NEXT;
            }
            self.set_descriptor(index, addr, len, flags, index + 1);
        }
        self.offer_head(first)
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn offer_head(&mut self, head: u16) -> u16 {
        let slot = u64::from(self.next_avail % self.size);
        self.memory
            .write_obj(head, self.avail.unchecked_add(4 + slot * 2))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.memory
            .write_obj(self.next_avail, self.avail.unchecked_add(2))
            .unwrap();
        head
    }

    /// Sets the avail index without adding entries (a lying driver).
    pub fn set_avail_index(&self, index: u16) {
        self.memory
            .write_obj(index, self.avail.unchecked_add(2))
            .unwrap();
    }

    pub fn used_index(&self) -> u16 {
        self.memory.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// (head, len) of used element `slot`.
    pub fn used_element(&self, slot: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + u64::from(slot % self.size) * 8);
        (
            self.memory.read_obj(at).unwrap(),
            self.memory.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }
}

/// A device activated on queues whose rings and buffers are `input`:
/// descriptor tables, ring indexes and buffer contents are all the fuzzer's.
/// Every queue is notified twice, then the device is reset. Nothing outside
/// the 1 MiB guest memory may be touched, and nothing may panic.
pub fn fuzz_device(device: &mut dyn VirtioDevice, input: &[u8]) {
    // Small rings packed at the start, so short inputs reach them: per queue
    // the descriptor table (256 bytes), available ring, used ring.
    const QUEUE_STRIDE: u64 = 0x400;
    let Some((&choice, contents)) = input.split_first() else {
        return;
    };
    let memory = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap();
    let n = contents.len().min(MEMORY_SIZE as usize);
    memory.write_slice(&contents[..n], GuestAddress(0)).unwrap();
    let queue_count = device.queue_max_sizes().len();
    let queues = (0..queue_count)
        .map(|i| {
            let base = i as u64 * QUEUE_STRIDE;
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.set_size(QUEUE_SIZE);
            queue.set_desc_table_address(Some(base as u32), Some(0));
            queue.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
            queue.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
            queue.set_event_idx(choice & 1 != 0);
            queue.set_ready(true);
            queue
        })
        .collect();
    // The first byte also picks which of the device's features the "driver" took.
    let features = super::features::COMMON
        | (device.device_features() & u64::from(choice >> 1).wrapping_mul(0x0101_0101_0101_0101));
    let activation = super::Activation {
        memory,
        queues,
        interrupt: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        features,
    };
    if device.activate(activation).is_err() {
        return;
    }
    for _ in 0..2 {
        for index in 0..queue_count {
            device.queue_notified(index, &mut DetachedEvents);
        }
    }
    device.reset();
}

/// Sends Ethernet frames of `frame_len` bytes out of the network interface
/// `interface` (a TAP: they reach whoever reads the TAP, the VMM) until
/// `stop` is set; returns how many were sent. The calling thread must be in
/// the interface's network namespace; needs CAP_NET_RAW.
pub fn inject_frames(
    interface: &str,
    frame_len: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = std::ffi::CString::new(interface).map_err(std::io::Error::other)?;
    // SAFETY: plain calls with checked results; the socket is owned below.
    let (index, fd) = unsafe {
        (
            libc::if_nametoindex(name.as_ptr()),
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0),
        )
    };
    if index == 0 || fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = index as i32;
    address.sll_halen = 6;
    address.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let mut frame = vec![0u8; frame_len.max(60)];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    let mut sent = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: sends our frame buffer to the address we filled in.
        let n = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n > 0 {
            sent += 1;
        } else {
            // A full TAP queue: let the reader catch up.
            std::thread::yield_now();
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;

    /// Why `TestQueue` exists beside virtio-queue's own mock driver:
    /// `MockSplitQueue` (0.18) places its used ring right after the first
    /// `size` *bytes* of the available ring's entries, which are 2 bytes each,
    /// so from the (size/2)-th offered chain on the driver overwrites the
    /// used ring's index. When this fails, upstream fixed the layout and
    /// `TestQueue` can be built on the mock instead.
    #[test]
    fn virtio_queue_mock_lays_its_used_ring_over_the_available_ring() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap();
        let mock = MockSplitQueue::create(&memory, GuestAddress(DESC_TABLE), QUEUE_SIZE);
        let avail_entries_end = mock.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE);
        assert!(mock.used_addr().0 < avail_entries_end);
    }

    /// The (address, length, device-writable) of the first chain's buffers.
    fn first_chain(queue: &mut Queue, memory: &GuestRam) -> Vec<(u64, u32, bool)> {
        let chain = queue.iter(memory).unwrap().next().unwrap();
        chain
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect()
    }

    /// Our driver and virtio-queue's agree on what a chain is: the same
    /// descriptors, offered by either, reach a device as the same buffers.
    #[test]
    fn test_queue_offers_chains_as_the_virtio_queue_mock_does() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap();
        let mock = MockSplitQueue::create(&memory, GuestAddress(DESC_TABLE), QUEUE_SIZE);
        let descriptors = [
            RawDescriptor::from(SplitDescriptor::new(DATA, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(DATA + 0x100, 8, F_WRITE, 0)),
        ];
        mock.build_desc_chain(&descriptors).unwrap();
        let mut from_mock: Queue = mock.create_queue().unwrap();
        let mock_chain = first_chain(&mut from_mock, &memory);

        let mut ours = TestQueue::new();
        ours.offer_chain(&[(DATA, 16, false), (DATA + 0x100, 8, true)]);
        let memory = ours.memory.clone();
        let our_chain = first_chain(&mut ours.queue, &memory);
        assert_eq!(our_chain, mock_chain);
        assert_eq!(our_chain, vec![(DATA, 16, false), (DATA + 0x100, 8, true)]);
    }
}
