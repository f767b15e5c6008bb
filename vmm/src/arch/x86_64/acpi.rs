//! ACPI tables: how guests without an MP-table parser (Debian's stock
//! kernels have no CONFIG_X86_MPPARSE) find their CPUs, the IOAPIC, and how
//! to reset and power off.
//!
//! RSDP → XSDT → { FADT → DSDT, FACS; MADT }. The platform is a full ACPI
//! PC (not "hardware-reduced", which makes Linux drop its legacy PIC and
//! with it every ISA IRQ): an SCI on IRQ 9, the PM1a event and control
//! blocks at ports 0x600-0x605 (`devices/legacy/power.rs`), a fixed-feature
//! power button, a FACS, and a reset register (the i8042 command port). No
//! PM timer and no GPE blocks (both optional).

use crate::memory::GuestRam;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{irq, ports, ACPI_MAX_SIZE, ACPI_START, APIC_START, IOAPIC_START};

const OEM_ID: [u8; 6] = *b"BLKHD ";
const OEM_TABLE_ID: [u8; 8] = *b"BULKHEAD";
const OEM_REVISION: u32 = 1;

/// The sleep type the DSDT's \_S5 names; the VMM powers off when the guest
/// writes it with SLP_EN to PM1a control.
pub const S5_SLEEP_TYPE: u8 = 5;

/// FADT IAPC_BOOT_ARCH bits (ACPI 6.5, 5.2.9.3).
pub const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
pub const BOOT_ARCH_8042: u16 = 1 << 1;
pub const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// MADT flags: the PC's dual 8259s are present (ACPI 6.5, 5.2.12).
pub const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// Interrupt source override flags: active high (01), level triggered (11).
pub const MPS_ACTIVE_HIGH_LEVEL: u16 = 0x000d;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables take {0} bytes, more than the {ACPI_MAX_SIZE} reserved for them")]
    TooLarge(u64),
    #[error("cannot write ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the DSDT describes it (`LNRO0005`, which Linux's
/// virtio_mmio driver matches): distribution kernels are built without
/// `virtio_mmio.device=` command-line support and find the devices only here.
pub struct MmioDevice {
    pub base: u64,
    pub irq: u32,
}

/// Each virtio-mmio device's register window.
const MMIO_DEVICE_SIZE: u32 = 0x1000;

/// Builds the tables for `cpus` CPUs (APIC IDs 0..cpus; the IOAPIC takes
/// the next ID, as in the MP table) and writes them at [`ACPI_START`].
/// Returns the RSDP's address, for the zero page and PVH start info.
pub fn write(
    mem: &GuestRam,
    cpus: u8,
    mmio_devices: &[MmioDevice],
) -> Result<GuestAddress, AcpiError> {
    let mut writer = TableWriter {
        next: ACPI_START + 64, // RSDP first, 36 bytes, padded
        bytes: Vec::new(),
    };

    // First, so that it is 64-byte aligned as the FACS must be.
    let facs = writer.place(&FACS::new());
    let dsdt = writer.place(&dsdt(mmio_devices));
    let fadt = writer.place(&fadt(dsdt, facs));
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

/// The FADT of a full ACPI platform. ACPI is always enabled (SMI_CMD 0,
/// SCI_EN reads 1); the PM1a blocks are named both in the ACPI 1.0 fields
/// and the X_ GAS fields, with matching lengths (ACPICA warns otherwise).
fn fadt(dsdt: u64, facs: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // Set: no sleep button. PwrButton stays clear: the power button is
        // the fixed-feature one (PM1 PWRBTN_STS/EN).
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.sci_int = (irq::SCI as u16).into();
    fadt.pm1a_evt_blk = u32::from(ports::PM1A_EVENT).into();
    fadt.pm1_evt_len = 4;
    fadt.x_pm1a_evt_blk = io_port_register(ports::PM1A_EVENT, 32, AccessSize::WordAccess);
    fadt.pm1a_cnt_blk = u32::from(ports::PM1A_CONTROL).into();
    fadt.pm1_cnt_len = 2;
    fadt.x_pm1a_cnt_blk = io_port_register(ports::PM1A_CONTROL, 16, AccessSize::WordAccess);
    fadt.iapc_boot_arch = (BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA).into();
    fadt.reset_reg = io_port_register(ports::I8042_COMMAND, 8, AccessSize::ByteAccess);
    fadt.reset_value = 0xfe;
    fadt.finalize()
}

/// An I/O port register of `bits` bits.
fn io_port_register(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
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

/// The DSDT: the S5 sleep type, COM1 where an ACPI kernel looks for serial
/// ports (8250_pnp), and every virtio-mmio device (`LNRO0005`). The PCI bus is
/// found by probing.
fn dsdt(mmio_devices: &[MmioDevice]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let com1_ports = aml::IO::new(ports::COM1, ports::COM1, 1, 8);
    let com1_interrupt = aml::Interrupt::new(true, true, false, false, irq::COM1);
    let com1_resources = aml::ResourceTemplate::new(vec![&com1_ports, &com1_interrupt]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_names = [
        aml::Name::new("_HID".into(), &com1_hid),
        aml::Name::new("_UID".into(), &aml::ONE),
        aml::Name::new("_CRS".into(), &com1_resources),
    ];
    let com1 = aml::Device::new(
        "COM1".into(),
        com1_names.iter().map(|n| n as &dyn Aml).collect(),
    );

    // Each virtio-mmio window and its edge-triggered, active-high ISA line.
    let windows: Vec<(aml::Memory32Fixed, aml::Interrupt, u8)> = mmio_devices
        .iter()
        .zip(0u8..)
        .map(|(device, index)| {
            (
                aml::Memory32Fixed::new(true, device.base as u32, MMIO_DEVICE_SIZE),
                aml::Interrupt::new(true, true, false, false, device.irq),
                index,
            )
        })
        .collect();
    let resources: Vec<aml::ResourceTemplate> = windows
        .iter()
        .map(|(window, interrupt, _)| aml::ResourceTemplate::new(vec![window, interrupt]))
        .collect();
    let hid: &'static str = "LNRO0005";
    let names: Vec<[aml::Name; 3]> = windows
        .iter()
        .zip(&resources)
        .map(|((_, _, index), resources)| {
            [
                aml::Name::new("_HID".into(), &hid),
                aml::Name::new("_UID".into(), index),
                aml::Name::new("_CRS".into(), resources),
            ]
        })
        .collect();
    let devices: Vec<aml::Device> = names
        .iter()
        .zip(0u8..)
        .map(|(names, index)| {
            aml::Device::new(
                format!("VR{index:02X}").as_str().into(),
                names.iter().map(|n| n as &dyn Aml).collect(),
            )
        })
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);
    for byte in body {
        dsdt.append(byte);
    }
    dsdt
}

/// MADT structure type 2 (ACPI 6.5, 5.2.12.5): ISA IRQ `source` is GSI `gsi`.
fn interrupt_source_override(source: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut entry = [0u8; 10];
    entry[0] = 2; // type
    entry[1] = 10; // length
    entry[2] = 0; // bus: ISA
    entry[3] = source;
    entry[4..8].copy_from_slice(&gsi.to_le_bytes());
    entry[8..10].copy_from_slice(&flags.to_le_bytes());
    entry
}

fn madt(cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut structures = Vec::new();
    for id in 0..cpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut structures);
    }
    // ISA IRQs map to the IOAPIC pin of the same number, matching KVM's
    // default GSI routing and the MP table (the in-kernel PIT is on GSI 0:
    // no IRQ 0 override). Only the SCI's polarity and trigger differ from
    // the ISA default (edge, active high).
    IoApic::new(cpus, IOAPIC_START as u32, 0).to_aml_bytes(&mut structures);
    structures.extend_from_slice(&interrupt_source_override(
        irq::SCI as u8,
        irq::SCI,
        MPS_ACTIVE_HIGH_LEVEL,
    ));
    madt.append_slice(&structures);
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

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// (address space, bit width, bit offset, access size, address) of the
    /// generic address structure at `at`.
    fn gas_at(bytes: &[u8], at: usize) -> (u8, u8, u8, u8, u64) {
        let g = &bytes[at..at + 12];
        (g[0], g[1], g[2], g[3], u64_at(g, 4))
    }

    /// The tables of a 3-CPU VM: (FADT, DSDT, FACS address and bytes, MADT).
    fn tables() -> (Vec<u8>, Vec<u8>, u64, Vec<u8>, Vec<u8>) {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let devices = [
            MmioDevice {
                base: 0xd000_0000,
                irq: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                irq: 6,
            },
        ];
        let rsdp_address = write(&mem, 3, &devices).unwrap();
        let rsdp = read(&mem, rsdp_address.raw_value(), 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));

        let xsdt = table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries.len(), 2);

        let fadt = table(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let dsdt = table(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let facs_address = u64_at(&fadt, 132);
        let facs = table(&mem, facs_address);
        let madt = table(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        (fadt, dsdt, facs_address, facs, madt)
    }

    #[test]
    fn the_fadt_describes_a_full_acpi_platform() {
        let (fadt, dsdt, facs_address, facs, _) = tables();
        let flags = u32_at(&fadt, 112);
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(flags & (1 << 4), 0, "fixed-feature power button");
        assert_ne!(flags & (1 << 5), 0, "no sleep button");
        assert_eq!(u16_at(&fadt, 46), 9, "SCI_INT");
        assert_eq!(u32_at(&fadt, 48), 0, "SMI_CMD: ACPI always enabled");
        assert_eq!((fadt[52], fadt[53]), (0, 0), "ACPI_ENABLE/DISABLE");
        // PM1a event block: legacy address and length, and the X_ GAS.
        assert_eq!(u32_at(&fadt, 56), 0x600);
        assert_eq!(fadt[88], 4, "PM1_EVT_LEN");
        assert_eq!(gas_at(&fadt, 148), (1, 32, 0, 2, 0x600));
        // PM1a control block.
        assert_eq!(u32_at(&fadt, 64), 0x604);
        assert_eq!(fadt[89], 2, "PM1_CNT_LEN");
        assert_eq!(gas_at(&fadt, 172), (1, 16, 0, 2, 0x604));
        // No PM1b, PM2, PM timer or GPE blocks: addresses and lengths zero.
        for at in [60, 68, 72, 76, 80, 84] {
            assert_eq!(u32_at(&fadt, at), 0, "legacy block at FADT offset {at}");
        }
        assert_eq!(&fadt[90..94], &[0, 0, 0, 0], "PM2/PM timer/GPE lengths");
        for at in [160, 184, 196, 208, 220, 232, 244, 256] {
            assert_eq!(gas_at(&fadt, at).4, 0, "X_ block at FADT offset {at}");
        }
        assert_eq!(u16_at(&fadt, 109), 0b111, "legacy devices, 8042, no VGA");
        assert_eq!(gas_at(&fadt, 116), (1, 8, 0, 1, 0x64), "reset register");
        assert_eq!(fadt[128], 0xfe, "reset value");
        // The FACS: 64-byte aligned, as the FADT's X_FIRMWARE_CTRL says.
        assert_eq!(u32_at(&fadt, 36), 0, "only the 64-bit FACS address");
        assert_eq!(facs_address % 64, 0);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(facs.len(), 64);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        // COM1: _HID PNP0501 (EISA id 0x0105d041), I/O 0x3f8 (8 ports) and
        // the edge-triggered, active-high interrupt 4.
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"COM1"));
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(contains(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        assert!(contains(&[
            0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00
        ]));
        // Two virtio-mmio devices: LNRO0005, a 4 KiB read-write window at
        // their base, their own edge-triggered line.
        assert!(contains(b"VR00") && contains(b"VR01") && !contains(b"VR02"));
        assert!(contains(b"\x0dLNRO0005\0"));
        for (base, irq) in [(0xd000_0000u32, 5u8), (0xd000_1000, 6)] {
            let mut window = vec![0x86, 0x09, 0x00, 0x01];
            window.extend(base.to_le_bytes());
            window.extend(0x1000u32.to_le_bytes());
            assert!(contains(&window), "window at {base:#x}");
            assert!(contains(&[
                0x89, 0x06, 0x00, 0x03, 0x01, irq, 0x00, 0x00, 0x00
            ]));
        }
    }

    #[test]
    fn the_madt_has_pcat_compat_cpus_the_ioapic_and_the_sci_override() {
        let (_, _, _, _, madt) = tables();
        assert_eq!(u64::from(u32_at(&madt, 36)), APIC_START);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        // Three local APICs (type 0, 8 bytes) with IDs 0..3.
        let structures = &madt[44..];
        for id in 0..3u8 {
            let entry = &structures[usize::from(id) * 8..][..8];
            assert_eq!((entry[0], entry[1], entry[3], entry[4]), (0, 8, id, 1));
        }
        // The IOAPIC (type 1, 12 bytes): ID 3, GSI base 0.
        let ioapic = &structures[24..36];
        assert_eq!((ioapic[0], ioapic[1], ioapic[2]), (1, 12, 3));
        assert_eq!(u64::from(u32_at(ioapic, 4)), IOAPIC_START);
        assert_eq!(u32_at(ioapic, 8), 0);
        // One override (type 2, 10 bytes): ISA IRQ 9 → GSI 9, level, active high.
        let over = &structures[36..];
        assert_eq!(over.len(), 10, "no other override (none for IRQ 0)");
        assert_eq!((over[0], over[1], over[2], over[3]), (2, 10, 0, 9));
        assert_eq!(u32_at(over, 4), 9);
        assert_eq!(u16_at(over, 8), 0x000d);
    }

    #[test]
    fn the_most_cpus_fit() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let devices: Vec<MmioDevice> = irq::VIRTIO
            .iter()
            .zip(0..)
            .map(|(&irq, index)| MmioDevice {
                base: 0xd000_0000 + index * 0x1000,
                irq,
            })
            .collect();
        write(&mem, super::super::mptable::MAX_CPUS, &devices).unwrap();
    }
}
