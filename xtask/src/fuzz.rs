//! `cargo xtask fuzz [SECONDS]`: every fuzz target in `fuzz/` for a bounded
//! time (cargo-fuzz and libFuzzer; installed from crates.io if missing).
//!
//! cargo-fuzz needs a few unstable compiler flags; RUSTC_BOOTSTRAP lets the
//! machine's one stable toolchain accept them, and `-s none` leaves out the
//! sanitizers that only nightly ships.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{process, workspace_root};

/// The targets in fuzz/Cargo.toml: one per device, each parsing the
/// descriptor chains a hostile driver can write.
pub const TARGETS: &[&str] = &["block", "net", "rng", "balloon", "vsock"];
pub const DEFAULT_SECONDS: u32 = 30;

pub fn main(args: &[String]) -> Result<()> {
    let seconds = match args {
        [] => DEFAULT_SECONDS,
        [seconds] => seconds
            .parse()
            .context("usage: cargo xtask fuzz [SECONDS per target]")?,
        _ => bail!("usage: cargo xtask fuzz [SECONDS per target]"),
    };
    run(seconds)
}

pub fn run(seconds: u32) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let installed = Command::new(&cargo)
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !installed {
        eprintln!("xtask: installing cargo-fuzz from crates.io");
        process::run(Command::new(&cargo).args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = workspace_root().join("fuzz");
    // Built first, so that a target that does not compile is not reported
    // as one that found a failure.
    process::run(
        Command::new(&cargo)
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "build", "--sanitizer", "none"]),
    )
    .context("the fuzz targets do not build")?;
    for target in TARGETS {
        process::run(
            Command::new(&cargo)
                .current_dir(&fuzz_dir)
                .env("RUSTC_BOOTSTRAP", "1")
                .args(["fuzz", "run", "--sanitizer", "none", target, "--"])
                .arg(format!("-max_total_time={seconds}"))
                .arg("-print_final_stats=1"),
        )
        .with_context(|| {
            format!("fuzz target {target} found a failure (see fuzz/artifacts/{target})")
        })?;
    }
    Ok(())
}
