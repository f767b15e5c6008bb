//! The x86 instruction emulator on hostile vCPU state, instruction bytes and
//! guest memory (page tables included); the input format and the checks are
//! in `bulkhead_fuzz::emulator`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    bulkhead_fuzz::emulator::run(input);
});
