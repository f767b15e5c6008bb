//! Checking a descriptor chain before a device acts on it.
//!
//! The guest writes descriptor tables, so every chain is hostile until proven
//! otherwise: [`ParsedChain::parse`] walks it once, checks every buffer lies in
//! guest memory, that device-readable buffers come before device-writable
//! ones, that the chain ends (no loop, not longer than its table) and that its
//! size is within the device's limit. Devices then move bytes with
//! virtio-queue's [`Reader`] and [`Writer`] over the same chain (volatile
//! copies that mark written pages dirty for migration) or with I/O vectors
//! from vm-memory's volatile slices, so nothing outside guest memory is read
//! or written.
//!
//! A reader or writer is built only when a device asks for one (the data
//! paths that use I/O vectors need neither): it walks the guest's descriptor
//! table again, and a guest may rewrite it in between from another vCPU.
//! That cannot reach outside guest memory (both check every buffer), and the
//! size limit is checked again on what it will actually touch; a guest that
//! races only gets its own request refused or garbled.

use crate::memory::GuestRam;
use std::io::{Read, Write};
use std::num::Wrapping;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::{AtomicBitmap, Bitmap, BS};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {addr:#x}+{len:#x} is not in guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain does not end: it loops, is longer than its table, or names a descriptor outside it")]
    Unterminated,
    #[error("the chain is empty (its head index is outside the descriptor table)")]
    Empty,
    #[error("the chain carries more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the descriptor table changed while the device read it")]
    Changed,
}

/// One buffer of a chain, known to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Reads a chain's device-readable bytes in order.
pub type ChainReader<'m> = Reader<'m, BS<'m, AtomicBitmap>>;
/// Fills a chain's device-writable bytes in order, marking them dirty.
pub type ChainWriter<'m> = Writer<'m, BS<'m, AtomicBitmap>>;

/// A descriptor chain whose buffers were checked.
#[derive(Clone)]
pub struct ParsedChain<'m> {
    pub head: u16,
    pub readable: Vec<Buffer>,
    pub writable: Vec<Buffer>,
    memory: &'m GuestRam,
    chain: DescriptorChain<&'m GuestRam>,
    max_bytes: u64,
}

impl std::fmt::Debug for ParsedChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedChain")
            .field("head", &self.head)
            .field("readable", &self.readable)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

impl<'m> ParsedChain<'m> {
    /// Walks `chain`, refusing it if any buffer is outside `memory`, the
    /// directions are out of order, it does not end, or it carries more than
    /// `max_bytes`.
    pub fn parse(
        chain: DescriptorChain<&'m GuestRam>,
        memory: &'m GuestRam,
        max_bytes: u64,
    ) -> Result<ParsedChain<'m>, ChainError> {
        let head = chain.head_index();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut total = Wrapping(0u64);
        let mut last_has_next = None;
        for descriptor in chain.clone() {
            last_has_next = Some(descriptor.has_next());
            let buffer = Buffer {
                addr: descriptor.addr(),
                len: descriptor.len(),
            };
            let access = if descriptor.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !memory.check_range(buffer.addr, buffer.len as usize, access) {
                return Err(ChainError::OutsideMemory {
                    addr: buffer.addr.0,
                    len: buffer.len,
                });
            }
            total += u64::from(buffer.len);
            if total.0 > max_bytes {
                return Err(ChainError::TooLarge { limit: max_bytes });
            }
            if descriptor.is_write_only() {
                writable.push(buffer);
            } else if writable.is_empty() {
                readable.push(buffer);
            } else {
                return Err(ChainError::ReadableAfterWritable);
            }
        }
        // The iterator stops early, without saying why, when a descriptor
        // cannot be read, its `next` is outside the table, or the chain ran
        // for as many descriptors as the table has (a loop).
        match last_has_next {
            None => return Err(ChainError::Empty),
            Some(true) => return Err(ChainError::Unterminated),
            Some(false) => {}
        }
        Ok(ParsedChain {
            head,
            readable,
            writable,
            memory,
            chain,
            max_bytes,
        })
    }

    /// The device-readable bytes, from the first.
    pub fn reader(&self) -> Result<ChainReader<'m>, ChainError> {
        let reader =
            Reader::new(self.memory, self.chain.clone()).map_err(|_| ChainError::Changed)?;
        self.within_limit(reader.available_bytes())?;
        Ok(reader)
    }

    /// The device-writable bytes, from the first.
    pub fn writer(&self) -> Result<ChainWriter<'m>, ChainError> {
        let writer =
            Writer::new(self.memory, self.chain.clone()).map_err(|_| ChainError::Changed)?;
        self.within_limit(writer.available_bytes())?;
        Ok(writer)
    }

    fn within_limit(&self, bytes: usize) -> Result<(), ChainError> {
        if bytes as u64 > self.max_bytes {
            return Err(ChainError::TooLarge {
                limit: self.max_bytes,
            });
        }
        Ok(())
    }

    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Copies readable bytes from `offset` into `data`; returns how many fit.
    pub fn read_at(&self, offset: u64, data: &mut [u8]) -> usize {
        let Ok(mut reader) = self.reader() else {
            return 0;
        };
        let Ok(mut tail) = reader.split_at(clamp(offset)) else {
            return 0;
        };
        read_fully(&mut tail, data)
    }

    /// Copies `data` into the writable buffers from `offset`; returns how many fit.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> usize {
        let Ok(mut writer) = self.writer() else {
            return 0;
        };
        let Ok(mut tail) = writer.split_at(clamp(offset)) else {
            return 0;
        };
        tail.write(data).unwrap_or(0)
    }

    /// I/O vectors over `len` readable bytes from `offset`, for one vectored
    /// system call that reads guest memory (writev, pwritev).
    pub fn readable_iovecs(&self, offset: u64, len: u64) -> Vec<libc::iovec> {
        iovecs(self.memory, &self.readable, offset, len, false)
    }

    /// I/O vectors over `len` writable bytes from `offset`, for one vectored
    /// system call that fills guest memory (readv, preadv). The pages are
    /// marked dirty for migration.
    pub fn writable_iovecs(&self, offset: u64, len: u64) -> Vec<libc::iovec> {
        iovecs(self.memory, &self.writable, offset, len, true)
    }
}

/// An offset past any chain (chains are far below `usize::MAX` bytes).
fn clamp(offset: u64) -> usize {
    usize::try_from(offset).unwrap_or(usize::MAX)
}

/// Reads until `data` is full or the chain ends; returns how many bytes came.
pub fn read_fully(reader: &mut ChainReader<'_>, data: &mut [u8]) -> usize {
    let mut done = 0;
    while done < data.len() {
        match reader.read(&mut data[done..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    done
}

/// The pieces of `buffers` that cover `len` bytes from `offset`.
fn segments(buffers: &[Buffer], offset: u64, len: u64) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    let mut skip = offset;
    let mut left = len;
    for buffer in buffers {
        if left == 0 {
            break;
        }
        let buffer_len = u64::from(buffer.len);
        if skip >= buffer_len {
            skip -= buffer_len;
            continue;
        }
        let take = (buffer_len - skip).min(left);
        out.push((GuestAddress(buffer.addr.0 + skip), take as usize));
        left -= take;
        skip = 0;
    }
    out
}

fn iovecs(
    memory: &GuestRam,
    buffers: &[Buffer],
    offset: u64,
    len: u64,
    for_writing: bool,
) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    for (addr, len) in segments(buffers, offset, len) {
        // Buffers were checked at parse time; `get_slices` splits at memory
        // region boundaries.
        let Ok(slices) = memory.get_slices(addr, len, Permissions::ReadWrite) else {
            break;
        };
        for slice in slices.flatten() {
            if for_writing {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;
    use virtio_queue::QueueOwnedT;
    use vm_memory::Bytes;

    impl TestQueue {
        fn parse_next(&mut self, max_bytes: u64) -> Result<ParsedChain<'_>, ChainError> {
            let chain = self
                .queue
                .iter(&self.memory)
                .unwrap()
                .next()
                .expect("a chain");
            ParsedChain::parse(chain, &self.memory, max_bytes)
        }

        /// Why the next chain is refused (None: it is not).
        fn refusal(&mut self, max_bytes: u64) -> Option<ChainError> {
            self.parse_next(max_bytes).err()
        }
    }

    #[test]
    fn splits_a_chain_into_readable_then_writable_buffers() {
        let mut q = TestQueue::new();
        q.offer_chain(&[
            (DATA, 16, false),
            (DATA + 0x100, 8, false),
            (DATA + 0x200, 1, true),
        ]);
        let chain = q.parse_next(1 << 20).unwrap();
        assert_eq!(chain.head, 0);
        assert_eq!(chain.readable.len(), 2);
        assert_eq!(chain.readable_len(), 24);
        assert_eq!(chain.writable_len(), 1);
    }

    #[test]
    fn refuses_buffers_outside_guest_memory() {
        let mut q = TestQueue::new();
        q.offer_chain(&[(MEMORY_SIZE - 8, 16, false)]);
        assert_eq!(
            q.refusal(1 << 20),
            Some(ChainError::OutsideMemory {
                addr: MEMORY_SIZE - 8,
                len: 16
            })
        );
        q.offer_chain(&[(u64::MAX - 3, 8, true)]);
        assert!(matches!(
            q.refusal(1 << 20),
            Some(ChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn refuses_a_readable_buffer_after_a_writable_one() {
        let mut q = TestQueue::new();
        q.offer_chain(&[(DATA, 16, true), (DATA + 0x100, 8, false)]);
        assert_eq!(q.refusal(1 << 20), Some(ChainError::ReadableAfterWritable));
    }

    #[test]
    fn refuses_loops_and_chains_running_off_the_table() {
        let mut q = TestQueue::new();
        // 0 -> 1 -> 0 -> ...
        q.set_descriptor(0, DATA, 8, F_NEXT, 1);
        q.set_descriptor(1, DATA, 8, F_NEXT, 0);
        q.offer_head(0);
        assert_eq!(q.refusal(1 << 20), Some(ChainError::Unterminated));
        // next index outside the table
        q.set_descriptor(0, DATA, 8, F_NEXT, QUEUE_SIZE + 3);
        q.offer_head(0);
        assert_eq!(q.refusal(1 << 20), Some(ChainError::Unterminated));
        // head outside the table
        q.offer_head(QUEUE_SIZE);
        assert_eq!(q.refusal(1 << 20), Some(ChainError::Empty));
    }

    #[test]
    fn refuses_chains_over_the_size_limit_even_when_lengths_wrap() {
        let mut q = TestQueue::new();
        q.offer_chain(&[(DATA, 4096, false), (DATA, 4096, false)]);
        assert_eq!(q.refusal(6000), Some(ChainError::TooLarge { limit: 6000 }));
    }

    #[test]
    fn follows_an_indirect_table_and_refuses_nested_ones() {
        let mut q = TestQueue::new();
        let table = GuestAddress(DATA + 0x1000);
        q.write_descriptor(table, 0, DATA, 32, F_NEXT, 1);
        q.write_descriptor(table, 1, DATA + 0x100, 4, F_WRITE, 0);
        q.set_descriptor(0, table.0, 32, F_INDIRECT, 0);
        q.offer_head(0);
        let chain = q.parse_next(1 << 20).unwrap();
        assert_eq!((chain.readable_len(), chain.writable_len()), (32, 4));
        // An indirect descriptor inside an indirect table ends the walk early.
        q.write_descriptor(table, 1, table.0, 32, F_INDIRECT | F_NEXT, 0);
        q.write_descriptor(table, 0, DATA, 32, F_NEXT, 1);
        q.offer_head(0);
        assert_eq!(q.refusal(1 << 20), Some(ChainError::Unterminated));
    }

    #[test]
    fn reads_and_writes_across_buffer_boundaries() {
        let mut q = TestQueue::new();
        q.offer_chain(&[
            (DATA, 3, false),
            (DATA + 0x100, 5, false),
            (DATA + 0x200, 2, true),
            (DATA + 0x300, 6, true),
        ]);
        let memory = q.memory.clone();
        memory.write_slice(&[1, 2, 3], GuestAddress(DATA)).unwrap();
        memory
            .write_slice(&[4, 5, 6, 7, 8], GuestAddress(DATA + 0x100))
            .unwrap();
        let chain = q.parse_next(1 << 20).unwrap();
        let mut data = [0u8; 4];
        assert_eq!(chain.read_at(2, &mut data), 4);
        assert_eq!(data, [3, 4, 5, 6]);
        let mut tail = [0u8; 8];
        assert_eq!(chain.read_at(6, &mut tail), 2);
        assert_eq!(chain.read_at(9, &mut tail), 0);
        assert_eq!(chain.write_at(1, &[9, 9, 9, 9]), 4);
        assert_eq!(chain.write_at(8, &[9]), 0);
        let mut written = [0u8; 2];
        memory
            .read_slice(&mut written, GuestAddress(DATA + 0x200))
            .unwrap();
        assert_eq!(written, [0, 9]);
        memory
            .read_slice(&mut written, GuestAddress(DATA + 0x300))
            .unwrap();
        assert_eq!(written, [9, 9]);
        let iovecs = chain.writable_iovecs(1, 7);
        assert_eq!(
            iovecs.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
            vec![1, 6]
        );
    }

    /// What a device writes into the guest must be copied again by a live
    /// migration: the writer and the writable I/O vectors mark its pages dirty,
    /// the readable side does not.
    #[test]
    fn device_writes_mark_guest_pages_dirty() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let page_dirty = |memory: &GuestRam, addr: u64| {
            let region = memory.find_region(GuestAddress(addr)).unwrap();
            region.bitmap().dirty_at(addr as usize)
        };
        let mut q = TestQueue::new();
        q.offer_chain(&[
            (DATA, 16, false),
            (DATA + 0x1000, 8, true),
            (DATA + 0x2000, 8, true),
        ]);
        let memory = q.memory.clone();
        let chain = q.parse_next(1 << 20).unwrap();
        let mut header = [0u8; 16];
        assert_eq!(read_fully(&mut chain.reader().unwrap(), &mut header), 16);
        assert!(!page_dirty(&memory, DATA));
        assert_eq!(chain.writer().unwrap().write(&[7; 4]).unwrap(), 4);
        assert!(page_dirty(&memory, DATA + 0x1000));
        assert!(!page_dirty(&memory, DATA + 0x2000));
        chain.writable_iovecs(8, 8);
        assert!(page_dirty(&memory, DATA + 0x2000));
    }

    /// A guest that rewrites its descriptor table after the checks (from
    /// another vCPU) gets a reader or writer refused, never one past the
    /// limit or outside guest memory.
    #[test]
    fn a_table_rewritten_after_the_checks_is_refused_when_read_again() {
        let mut q = TestQueue::new();
        q.offer_chain(&[(DATA, 16, false), (DATA + 0x100, 16, true)]);
        let memory = q.memory.clone();
        let chain = q.queue.iter(&memory).unwrap().next().unwrap();
        let parsed = ParsedChain::parse(chain, &memory, 64).unwrap();
        assert!(parsed.reader().is_ok() && parsed.writer().is_ok());
        let rewrite = |index, addr, len, flags| q.set_descriptor(index, addr, len, flags, 1);
        rewrite(0, DATA, 4096, F_NEXT);
        assert_eq!(
            parsed.reader().err(),
            Some(ChainError::TooLarge { limit: 64 })
        );
        assert_eq!(parsed.read_at(0, &mut [0; 8]), 0);
        rewrite(0, DATA, 16, F_NEXT);
        rewrite(1, MEMORY_SIZE - 4, 16, F_WRITE);
        assert_eq!(parsed.writer().err(), Some(ChainError::Changed));
        assert_eq!(parsed.write_at(0, &[1]), 0);
    }
}
