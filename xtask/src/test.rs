//! `cargo xtask test`: the README's test command and what CI runs.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::{images, process, workspace_root};

/// Which tests run: this host's own (`host`: checks, unit and integration
/// tests, API property tests, fuzzing), the hardware-KVM lane, or both.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lane {
    All,
    Host,
    HardwareKvm,
}

fn parse_lane(args: &[String]) -> Result<Lane> {
    match args {
        [] => Ok(Lane::All),
        [flag, lane] if flag == "--lane" => match lane.as_str() {
            "all" => Ok(Lane::All),
            "host" => Ok(Lane::Host),
            "hwkvm" => Ok(Lane::HardwareKvm),
            other => bail!("unknown lane {other}: all, host or hwkvm"),
        },
        _ => bail!("usage: cargo xtask test [--lane all|host|hwkvm]"),
    }
}

pub fn main(args: &[String]) -> Result<()> {
    let lane = parse_lane(args)?;
    if lane == Lane::HardwareKvm {
        return crate::hwkvm::run(&[]);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = workspace_root();
    let started = Instant::now();
    let step = |name: &str| {
        eprintln!(
            "\n=== xtask test: {name} ({}s) ===",
            started.elapsed().as_secs()
        )
    };

    step("guest images");
    images::main(&[])?;

    step("cargo fmt --check");
    process::run(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]),
    )?;

    step("cargo clippy -D warnings");
    process::run(Command::new(&cargo).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    // The fuzz crate is outside the workspace: checked here too, so that a
    // change it does not follow fails in minutes, not at the suite's end.
    step("fuzz crate: cargo fmt --check, cargo clippy -D warnings");
    let fuzz_dir = root.join("fuzz");
    process::run(
        Command::new(&cargo)
            .current_dir(&fuzz_dir)
            .args(["fmt", "--check"]),
    )?;
    process::run(Command::new(&cargo).current_dir(&fuzz_dir).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    // The lane before the host's own tests: run after them in CI it failed
    // 3 times of 3; run alone it passed every time (why is not known; see
    // docs/host-kvm.md).
    if lane == Lane::All {
        step("hardware-KVM lane (tests with guest user space)");
        crate::hwkvm::run(&[])?;
    }

    step("cargo test");
    // Tests that boot Linux need the images: with this set they fail instead
    // of skipping when the images are missing.
    process::run(
        Command::new(&cargo)
            .current_dir(&root)
            .env("BULKHEAD_IMAGES", images::images_dir())
            .env("BULKHEAD_REQUIRE_IMAGES", "1")
            .args(["test", "--workspace", "--release"]),
    )?;

    step("host API property tests (schemathesis)");
    crate::api_fuzz::run(&root)?;

    step("fuzz targets (bounded)");
    crate::fuzz::run(crate::fuzz::DEFAULT_SECONDS)?;

    eprintln!(
        "\n=== xtask test: all passed in {}s ===",
        started.elapsed().as_secs()
    );
    Ok(())
}
