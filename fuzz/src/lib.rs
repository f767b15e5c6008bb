//! What the fuzz targets share: the instruction emulator target's input format,
//! fake vCPU and reference checks (`emulator`), and the seed corpus writer
//! (`seeds`), which builds its inputs with the same encodings the targets
//! decode. Kept out of `fuzz_targets/` so that `cargo test` here can run the
//! seeds through the same code the fuzzer does.

pub mod emulator;
pub mod seeds;
