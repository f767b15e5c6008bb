//! The guest-physical memory map Bulkhead gives every x86-64 VM.
//!
//! This is the contract between the VMM and guests: tiny guests built in this
//! repository (`guests/`) rely on these addresses, so change them together.

/// Global descriptor table used for the boot CPU (null, null, code64 0x10, data 0x18, tss 0x20).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty interrupt descriptor table (limit 0) loaded at boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// Start of the PVH `hvm_start_info` structure (32-bit PVH entry).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries follow the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux `boot_params` ("zero page"); RSI points here on 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer handed to the boot CPU (grows down).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, one PDPT, four page directories of 2 MiB pages,
/// identity-mapping the low 4 GiB (RAM and the MMIO hole below 4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Extended BIOS data area; the MP floating pointer and table are written here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional (low) memory; 0xa0000..0x100000 is legacy VGA/ROM space.
pub const LOW_MEMORY_END: u64 = 0xa0000;
/// Kernels are loaded from 1 MiB up.
pub const HIMEM_START: u64 = 0x100000;
/// ACPI tables, RSDP first: inside the BIOS area a guest scans for the RSDP
/// (0xe0000-0xfffff), which the e820 map reserves.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_MAX_SIZE: u64 = 0x20000;

/// The hole below 4 GiB for device MMIO, LAPIC and IOAPIC. RAM that would fall
/// here is placed above 4 GiB instead.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Window for PCI BARs (32-bit), at the start of the MMIO gap.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// Window for virtio-mmio and other platform MMIO devices.
pub const PLATFORM_MMIO_START: u64 = 0xd000_0000;
/// virtio-mmio devices get consecutive 4 KiB windows from here.
pub const VIRTIO_MMIO_START: u64 = PLATFORM_MMIO_START;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Fixed I/O ports of the platform.
pub mod ports {
    /// i8042 data and command ports; writing 0xfe to the command port resets.
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    /// MC146818 CMOS real-time clock: index and data ports.
    pub const CMOS: u16 = 0x70;
    /// POST diagnostic port; the first write marks the first guest instruction.
    pub const POST_CODE: u16 = 0x80;
    /// COM1 16550 UART (IRQ 4).
    pub const COM1: u16 = 0x3f8;
    /// ACPI PM1a event block (FADT): PM1_STS at 0x600, PM1_EN at 0x602,
    /// 16 bits each.
    pub const PM1A_EVENT: u16 = 0x600;
    /// ACPI PM1a control register (16-bit). A write with SLP_EN (bit 13)
    /// and SLP_TYP 5 (bits 10-12, the DSDT's \_S5) powers the machine off.
    pub const PM1A_CONTROL: u16 = 0x604;
    /// PCI configuration mechanism #1.
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    pub const PCI_CONFIG_DATA: u16 = 0xcfc;
}

/// Interrupt lines on the IOAPIC / PIC.
pub mod irq {
    /// The i8042's keyboard line.
    pub const KEYBOARD: u32 = 1;
    pub const COM1: u32 = 4;
    /// The ACPI SCI (FADT SCI_INT; level-triggered, active high, as the
    /// MADT's interrupt source override says). Shared with the fourth
    /// virtio-mmio device.
    pub const SCI: u32 = 9;
    /// ISA lines free for virtio-mmio devices (edge-triggered, one per
    /// device), in the order they are handed out. Not 9: the SCI is level
    /// triggered and must not share its line with an edge-triggered device.
    pub const VIRTIO: &[u32] = &[5, 6, 7, 10, 11, 14, 15, 12, 3];
}

/// pvpanic is a PCI device (1b36:0011) at 00:01.0 whose BAR0 is one byte of MMIO
/// here; reading it returns the supported events, writing 1 reports a panic.
pub const PVPANIC_BAR_ADDRESS: u64 = PCI_MMIO_START;
