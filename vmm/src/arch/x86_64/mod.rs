//! x86-64: memory layout, boot protocol, CPU set-up and the instruction emulator.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod emulator;
pub mod gdt;
pub mod hypercall;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod state;
