//! Intel MultiProcessor Specification (1.4) tables, so the guest finds its
//! CPUs and the IOAPIC without ACPI.

use super::layout::{APIC_START, IOAPIC_START};
use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// Where guests look for the floating pointer: the first KiB of the EBDA.
pub const FLOATING_POINTER_START: u64 = 0x9fc00;
/// The configuration table lives just below the EBDA, in memory the e820 map
/// reserves (see `boot::e820_map`).
pub const CONFIG_TABLE_START: u64 = 0x9f000;
/// Everything from here to 1 MiB is reserved in the e820 map.
pub const RESERVED_LOW_START: u64 = CONFIG_TABLE_START;

/// APIC IDs are 8 bits and the IOAPIC takes the ID after the last CPU; the
/// configuration table must fit between its start and the floating pointer.
pub const MAX_CPUS: u8 = 128;

const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
const ISA_IRQS: u8 = 16;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_BUS_ID: u8 = 0;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; the MP table supports 1 to {MAX_CPUS}")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// Builds the MP configuration table (header and entries) for `cpus` CPUs.
pub fn config_table(cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[0, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU and APIC present
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[1, ISA_BUS_ID, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    // ISA interrupts go to the IOAPIC pin of the same number, matching KVM's
    // default GSI routing for the in-kernel IOAPIC.
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[3, 0, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
    }
    // LINT0 is ExtINT (the 8259), LINT1 is NMI, as on every PC.
    entries.extend_from_slice(&[4, 3, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    let entry_count = u16::from(cpus) + 1 + 1 + u16::from(ISA_IRQS) + 2;

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"BULKHEAD");
    table.extend_from_slice(b"000000000001");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    debug_assert_eq!(
        table.len(),
        HEADER_LEN
            + usize::from(cpus) * PROCESSOR_ENTRY_LEN
            + (usize::from(entry_count) - usize::from(cpus)) * SMALL_ENTRY_LEN
    );
    table[7] = checksum(&table);
    Ok(table)
}

/// The 16-byte MP floating pointer structure pointing at the config table.
pub fn floating_pointer(config_table_address: u32) -> [u8; 16] {
    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&config_table_address.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec revision 1.4
    fp[10] = checksum(&fp);
    fp
}

/// Writes the floating pointer and the configuration table for `cpus` CPUs.
pub fn write(mem: &GuestRam, cpus: u8) -> Result<(), MpTableError> {
    let table = config_table(cpus)?;
    debug_assert!(CONFIG_TABLE_START + table.len() as u64 <= FLOATING_POINTER_START);
    mem.write_slice(&table, GuestAddress(CONFIG_TABLE_START))?;
    mem.write_slice(
        &floating_pointer(CONFIG_TABLE_START as u32),
        GuestAddress(FLOATING_POINTER_START),
    )?;
    // The BIOS data area's EBDA segment pointer, where Linux starts its search.
    mem.write_obj((FLOATING_POINTER_START >> 4) as u16, GuestAddress(0x40e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero_and_count_entries() {
        let table = config_table(4).unwrap();
        assert_eq!(sum(&table), 0);
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(
            u16::from_le_bytes([table[4], table[5]]) as usize,
            table.len()
        );
        // 4 processors, 1 bus, 1 IOAPIC, 16 interrupts, 2 local interrupts.
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 24);
        assert_eq!(table.len(), 44 + 4 * 20 + 20 * 8);
        let fp = floating_pointer(0x9f000);
        assert_eq!(sum(&fp), 0);
        assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()), 0x9f000);
    }

    #[test]
    fn processor_entries_name_the_bootstrap_cpu_and_apic_ids() {
        let table = config_table(3).unwrap();
        for cpu in 0..3usize {
            let entry = &table[44 + cpu * 20..44 + (cpu + 1) * 20];
            assert_eq!(entry[0], 0, "processor entry type");
            assert_eq!(entry[1] as usize, cpu, "APIC id");
            assert_eq!(entry[3], if cpu == 0 { 3 } else { 1 });
        }
        let ioapic = &table[44 + 3 * 20 + 8..44 + 3 * 20 + 16];
        assert_eq!(ioapic[0..2], [2, 3]);
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            0xfec0_0000
        );
    }

    #[test]
    fn largest_table_fits_below_the_floating_pointer() {
        let table = config_table(MAX_CPUS).unwrap();
        assert!(CONFIG_TABLE_START + table.len() as u64 <= FLOATING_POINTER_START);
        assert!(config_table(0).is_err());
        assert!(config_table(MAX_CPUS + 1).is_err());
    }

    #[test]
    fn written_tables_are_found_through_the_bios_data_area() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let ebda_segment: u16 = mem.read_obj(GuestAddress(0x40e)).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(u64::from(ebda_segment) << 4))
            .unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        let mut sig = [0u8; 4];
        mem.read_slice(
            &mut sig,
            GuestAddress(u64::from(u32::from_le_bytes(fp[4..8].try_into().unwrap()))),
        )
        .unwrap();
        assert_eq!(&sig, b"PCMP");
    }
}
