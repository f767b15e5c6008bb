//! How much host memory the VMM process uses, and how much of it is guest RAM.

use crate::memory::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Resident memory of this process, split into guest RAM and the VMM's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryUsage {
    pub process_rss_kib: u64,
    /// Guest RAM pages resident on the host (what the guest touched).
    pub guest_resident_kib: u64,
    /// Everything else: the VMM's code, heap, stacks and page tables.
    pub vmm_overhead_kib: u64,
}

/// /proc/self/status, opened once: a sandboxed VMM no longer sees /proc,
/// but the descriptor it opened before still reads its own status.
static PROC_STATUS: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// Opens what [`measure`] reads, before a sandbox hides it.
pub fn prepare() {
    PROC_STATUS.get_or_init(|| std::fs::File::open("/proc/self/status").ok());
}

fn process_rss_kib() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    prepare();
    let file = PROC_STATUS.get()?.as_ref()?;
    let mut buffer = vec![0u8; 8192];
    let n = file.read_at(&mut buffer, 0).ok()?;
    let status = String::from_utf8_lossy(&buffer[..n]);
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Counts resident pages of every guest region with mincore(2).
fn guest_resident_kib(memory: &GuestRam) -> u64 {
    let page = 4096usize;
    let mut resident_pages = 0u64;
    let mut vector = Vec::new();
    for region in memory.iter() {
        let len = region.len() as usize;
        vector.resize(len.div_ceil(page), 0u8);
        // SAFETY: the region is a live page-aligned mapping of `len` bytes and
        // `vector` has one byte per page, as mincore requires.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vector.as_mut_ptr()) };
        if rc == 0 {
            resident_pages += vector.iter().filter(|&&b| b & 1 != 0).count() as u64;
        }
    }
    resident_pages * (page as u64 / 1024)
}

pub fn measure(memory: &GuestRam) -> MemoryUsage {
    let process = process_rss_kib().unwrap_or(0);
    let guest = guest_resident_kib(memory);
    MemoryUsage {
        process_rss_kib: process,
        guest_resident_kib: guest,
        vmm_overhead_kib: process.saturating_sub(guest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn touched_guest_pages_are_counted_as_guest_memory() {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let before = measure(&memory);
        for page in 0..256u64 {
            memory.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = measure(&memory);
        assert_eq!(after.guest_resident_kib - before.guest_resident_kib, 1024);
        assert!(after.process_rss_kib >= after.guest_resident_kib);
    }
}
