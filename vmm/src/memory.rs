//! Guest RAM as the VMM holds it.
//!
//! Every region carries a dirty bitmap (one bit per 4 KiB page) that
//! vm-memory sets whenever the VMM itself writes guest memory: virtio rings
//! and buffers, boot tables. KVM's dirty log covers what vCPUs write; live
//! migration needs both.

use vm_memory::bitmap::AtomicBitmap;

/// Guest RAM: anonymous memory at boot, or a private mapping of a snapshot's
/// memory file after a restore.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Copies guest RAM out `chunk` bytes at a time, regions back to back, and
/// hands each piece to `f` with its offset in that image (a snapshot's memory
/// file, a checksum).
pub fn for_each_chunk<E: From<vm_memory::GuestMemoryError>>(
    memory: &GuestRam,
    chunk: usize,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let mut buffer = vec![0u8; chunk];
    let mut image_offset = 0u64;
    for region in memory.iter() {
        let len = region.len() as usize;
        let mut done = 0usize;
        while done < len {
            let n = chunk.min(len - done);
            let piece = &mut buffer[..n];
            memory.read_slice(piece, region.start_addr().unchecked_add(done as u64))?;
            f(image_offset + done as u64, piece)?;
            done += n;
        }
        image_offset += len as u64;
    }
    Ok(())
}
