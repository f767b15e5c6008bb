//! Which guest pages changed since the last look: KVM's dirty log for what
//! vCPUs wrote, vm-memory's bitmap for what the VMM wrote (virtio rings and
//! buffers).

use super::MigrationError;
use crate::memory::GuestRam;
use crate::vm::set_memory_slots;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Dirty-page logging on a VM's memory, switched off again when dropped.
pub struct DirtyLog<'a> {
    vm: &'a VmFd,
    memory: &'a GuestRam,
}

impl<'a> DirtyLog<'a> {
    /// Turns logging on; everything written from now on is reported.
    pub fn start(vm: &'a VmFd, memory: &'a GuestRam) -> Result<Self, MigrationError> {
        set_memory_slots(vm, memory, true).map_err(|e| MigrationError::DirtyLog(e.to_string()))?;
        let log = DirtyLog { vm, memory };
        log.take()?;
        Ok(log)
    }

    /// The pages written since the last call, one bitmap per region (bit i
    /// of word w is page 64·w + i), and clears them.
    pub fn take(&self) -> Result<Vec<Vec<u64>>, MigrationError> {
        let mut maps = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let mut map = self
                .vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| MigrationError::DirtyLog(format!("KVM_GET_DIRTY_LOG: {e}")))?;
            let by_vmm = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
            for (word, vmm_word) in map.iter_mut().zip(by_vmm) {
                *word |= vmm_word;
            }
            maps.push(map);
        }
        Ok(maps)
    }
}

impl Drop for DirtyLog<'_> {
    fn drop(&mut self) {
        if let Err(e) = set_memory_slots(self.vm, self.memory, false) {
            tracing::warn!("cannot turn dirty-page logging off: {e}");
        }
    }
}

pub fn count(maps: &[Vec<u64>]) -> u64 {
    maps.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// Runs of dirty pages in one region's bitmap: (first page, page count).
pub fn runs(map: &[u64], pages: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut page = 0;
    std::iter::from_fn(move || {
        let bit = |p: usize| map.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
        while page < pages && !bit(page) {
            // Skip clean words whole.
            if page % 64 == 0 && map.get(page / 64) == Some(&0) {
                page += 64;
            } else {
                page += 1;
            }
        }
        if page >= pages {
            return None;
        }
        let start = page;
        while page < pages && bit(page) {
            page += 1;
        }
        Some((start, page - start))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_runs_across_words() {
        let map = [0b1011u64 | 1 << 63, 0b1, 0, 1 << 5];
        let found: Vec<_> = runs(&map, 256).collect();
        assert_eq!(found, vec![(0, 2), (3, 1), (63, 2), (197, 1)]);
        // Bits past the region's end are ignored.
        assert_eq!(
            runs(&map, 64).collect::<Vec<_>>(),
            vec![(0, 2), (3, 1), (63, 1)]
        );
        assert_eq!(count(&[map.to_vec()]), 6);
    }
}
