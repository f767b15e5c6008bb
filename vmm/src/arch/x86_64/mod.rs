//! x86-64: memory layout, boot protocol, CPU set-up and the instruction emulator.

pub mod layout;
