//! Project automation, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `images`: installs the Debian packages the guest images need and builds
//!   them into a cache keyed by the hash of their inputs, then publishes them
//!   to `target/images/` with a `manifest.json`.
//! - `fuzz`: every fuzz target (devices, instruction emulator) for a bounded time.
//! - `mutants`: mutation testing of the files that take hostile input.
//! - `test`: images, then `cargo fmt --check`, `cargo clippy -D warnings`,
//!   the whole test suite and the fuzz targets. This is what `.ci/run` calls.

mod api_fuzz;
mod apt;
mod cache;
mod cpio;
mod fuzz;
mod hwkvm;
mod images;
mod kernel;
mod mutants;
mod process;
mod stock_kernel;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  images [--output json]   build the guest images into target/images (cached)
  fuzz [SECONDS]           run every fuzz target for SECONDS each (default 30)
  mutants [FILE]...        mutation testing of the files that take hostile input (cargo-mutants; slow)
  api-fuzz                 property tests of the host API from its OpenAPI document (schemathesis)
  hwkvm [FILTER]...        the hardware-KVM lane: tests with guest user space (in an L1 VM under QEMU when this host's KVM is not hardware)
  test [--lane all|host|hwkvm]
                           images, fmt, clippy, every test, the hardware-KVM lane, API property tests and a bounded fuzz run (what CI runs)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("images") => images::main(&args[1..]),
        Some("test") => test::main(&args[1..]),
        Some("fuzz") => fuzz::main(&args[1..]),
        Some("api-fuzz") => api_fuzz::main(&args[1..]),
        Some("hwkvm") => hwkvm::main(&args[1..]),
        Some("mutants") => mutants::main(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask lives one folder below it.
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}
