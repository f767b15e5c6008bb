//! ACPI tables: how guests without an MP-table parser (Debian's stock
//! kernels have no CONFIG_X86_MPPARSE) find their CPUs, the IOAPIC, and how
//! to reset and power off.
//!
//! RSDP → XSDT → { FADT → DSDT, MADT }. The platform is "hardware-reduced"
//! ACPI: no SCI, PM timer or GPE blocks, only a sleep control register
//! (port 0x600) and a reset register (the i8042 command port).

use crate::memory::GuestRam;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{ports, ACPI_MAX_SIZE, ACPI_START, APIC_START, IOAPIC_START};

const OEM_ID: [u8; 6] = *b"BLKHD ";
const OEM_TABLE_ID: [u8; 8] = *b"BULKHEAD";
const OEM_REVISION: u32 = 1;

/// The sleep type the DSDT's \_S5 names; the VMM powers off when the guest
/// writes it with SLP_EN to the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register bits (ACPI 6.5, 4.8.3.7).
pub const SLEEP_TYPE_SHIFT: u8 = 2;
pub const SLEEP_ENABLE: u8 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables take {0} bytes, more than the {ACPI_MAX_SIZE} reserved for them")]
    TooLarge(u64),
    #[error("cannot write ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Builds the tables for `cpus` CPUs (APIC IDs 0..cpus; the IOAPIC takes
/// the next ID, as in the MP table) and writes them at [`ACPI_START`].
/// Returns the RSDP's address, for the zero page and PVH start info.
pub fn write(mem: &GuestRam, cpus: u8) -> Result<GuestAddress, AcpiError> {
    let mut writer = TableWriter {
        next: ACPI_START + 64, // RSDP first, 36 bytes, padded
        bytes: Vec::new(),
    };

    let dsdt = writer.place(&dsdt());
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.reset_reg = io_port_register(ports::I8042_COMMAND);
    fadt.reset_value = 0xfe;
    fadt.sleep_control_reg = io_port_register(ports::ACPI_SLEEP_CONTROL);
    fadt.sleep_status_reg = fadt.sleep_control_reg;
    let fadt = writer.place(&fadt.finalize());
    let madt = writer.place(&madt(cpus));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = writer.place(&xsdt);

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt).to_aml_bytes(&mut rsdp);

    let size = writer.next - ACPI_START;
    if size > ACPI_MAX_SIZE {
        return Err(AcpiError::TooLarge(size));
    }
    mem.write_slice(&rsdp, GuestAddress(ACPI_START))?;
    mem.write_slice(&writer.bytes, GuestAddress(ACPI_START + 64))?;
    Ok(GuestAddress(ACPI_START))
}

/// An 8-bit I/O port register.
fn io_port_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Lays tables out one after another, 16-byte aligned.
struct TableWriter {
    next: u64,
    bytes: Vec<u8>,
}

impl TableWriter {
    fn place(&mut self, table: &dyn Aml) -> u64 {
        let address = self.next;
        table.to_aml_bytes(&mut self.bytes);
        let padded = self.bytes.len().next_multiple_of(16);
        self.bytes.resize(padded, 0);
        self.next = ACPI_START + 64 + padded as u64;
        address
    }
}

/// The DSDT only names the S5 sleep type; devices are found by legacy
/// probing (UART), the PCI bus, and the kernel command line (virtio-mmio).
fn dsdt() -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    for byte in body {
        dsdt.append(byte);
    }
    dsdt
}

fn madt(cpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // ISA IRQs map to the IOAPIC pin of the same number (no overrides),
    // matching KVM's default GSI routing and the MP table.
    madt.add_structure(IoApic::new(cpus, IOAPIC_START as u32, 0));
    madt
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Address;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    fn read(mem: &GuestRam, address: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        mem.read_slice(&mut bytes, GuestAddress(address)).unwrap();
        bytes
    }

    /// A table at `address`, by its own length field.
    fn table(mem: &GuestRam, address: u64) -> Vec<u8> {
        let header = read(mem, address, 8);
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap());
        read(mem, address, len as usize)
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp_address = write(&mem, 3).unwrap();
        let rsdp = read(&mem, rsdp_address.raw_value(), 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));

        let xsdt_address = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_address);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);

        let fadt = table(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let dsdt_address = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table(&mem, dsdt_address);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));

        let madt = table(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Three local APICs (type 0, 8 bytes) with IDs 0..3, then the IOAPIC (type 1).
        let structures = &madt[44..];
        for id in 0..3u8 {
            let entry = &structures[usize::from(id) * 8..][..8];
            assert_eq!((entry[0], entry[1], entry[3], entry[4]), (0, 8, id, 1));
        }
        assert_eq!((structures[24], structures[26]), (1, 3));
        let ioapic = u32::from_le_bytes(structures[28..32].try_into().unwrap());
        assert_eq!(u64::from(ioapic), IOAPIC_START);
    }

    #[test]
    fn the_most_cpus_fit() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write(&mem, super::super::mptable::MAX_CPUS).unwrap();
    }
}
