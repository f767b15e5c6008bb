//! Identity page tables for the boot CPU.

use super::layout::{PDPT_START, PD_START, PML4_START};
use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_2M: u64 = 1 << 7;
/// Gigabytes identity-mapped at boot: all RAM below the MMIO gap and the gap
/// itself (LAPIC, IOAPIC, device MMIO). 2 MiB pages, because this host's KVM
/// faults on 1 GiB guest pages.
pub const IDENTITY_MAPPED_GIB: u64 = 4;

/// Writes PML4 → PDPT → 4 page directories mapping [0, 4 GiB) onto itself.
pub fn write_identity_tables(mem: &GuestRam) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(PDPT_START | PRESENT | WRITABLE, GuestAddress(PML4_START))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let directory = PD_START + gib * 0x1000;
        mem.write_obj(
            directory | PRESENT | WRITABLE,
            GuestAddress(PDPT_START + gib * 8),
        )?;
        for entry in 0..512u64 {
            let physical = (gib << 30) | (entry << 21);
            mem.write_obj(
                physical | PRESENT | WRITABLE | PAGE_SIZE_2M,
                GuestAddress(directory + entry * 8),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(mem: &GuestRam, linear: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(PML4_START + ((linear >> 39) & 511) * 8))
            .unwrap();
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((linear >> 30) & 511) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((linear >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & (PRESENT | PAGE_SIZE_2M), PRESENT | PAGE_SIZE_2M);
        (pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (linear & 0x1f_ffff)
    }

    #[test]
    fn low_four_gib_map_onto_themselves() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_tables(&mem).unwrap();
        for address in [
            0u64,
            0x1234,
            0x20_0000,
            0x3fff_ffff,
            0xc000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, address), address, "{address:#x}");
        }
        // Nothing above 4 GiB is mapped.
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        let fifth: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + 4 * 8))
            .unwrap();
        assert_eq!(fifth, 0);
    }
}
