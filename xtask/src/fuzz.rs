//! `cargo xtask fuzz [SECONDS]`: every fuzz target in `fuzz/` for a bounded
//! time (cargo-fuzz and libFuzzer; installed from crates.io if missing), then
//! a table of what each run did.
//!
//! The targets are built with AddressSanitizer (`--sanitizer address`), so an
//! out-of-bounds access or use-after-free in the code under test stops the run
//! with an "ERROR: AddressSanitizer" report instead of going unnoticed. The
//! stable toolchain ships the runtime (`librustc-stable_rt.asan.a`); the
//! sanitizer flag is unstable, and cargo-fuzz's coverage flags too, so
//! RUSTC_BOOTSTRAP lets the stable compiler take them (CI has no nightly).
//! The workspace's `.cargo/config.toml` links binaries statically
//! (`+crt-static`), which ASan cannot work with; it does not reach these
//! builds, because cargo-fuzz passes its flags in RUSTFLAGS, and RUSTFLAGS
//! replaces every `rustflags` of the config files. So that a change there
//! cannot silently drop the sanitizer, each built target is checked to
//! contain ASan's runtime before it runs.
//!
//! Each run starts from `fuzz/seeds/<target>/` (kept in the repository; see
//! `fuzz/src/seeds.rs` for the command that writes them), given to libFuzzer
//! as a second corpus directory after `fuzz/corpus/<target>/`, the writable
//! one (gitignored: fresh in CI, kept between local runs). The fuzz crate's
//! unit tests run first: they fail when the seeds on disk are not what its
//! encodings write, or when the emulator target's checks cannot fail.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{process, workspace_root};

/// The targets in fuzz/Cargo.toml: one per virtio device, each parsing the
/// descriptor chains a hostile driver can write, and the x86 instruction
/// emulator on hostile vCPU state and guest memory.
pub const TARGETS: &[&str] = &["block", "net", "rng", "balloon", "vsock", "emulator"];
pub const DEFAULT_SECONDS: u32 = 30;
const SANITIZER: &str = "address";
/// Where cargo-fuzz puts the targets (it builds for the host; Bulkhead is
/// x86-64 only).
const TARGET_DIR: &str = "target/x86_64-unknown-linux-gnu/release";
const SEED_COMMAND: &str = "cargo test --lib write_seeds -- --ignored (in fuzz/)";

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
    for target in TARGETS {
        let seeds = fuzz_dir.join("seeds").join(target);
        let count = std::fs::read_dir(&seeds).map_or(0, |entries| entries.count());
        if count == 0 {
            bail!(
                "{} has no seeds: write them with {SEED_COMMAND}",
                seeds.display()
            );
        }
    }
    // The fuzz crate's own tests: the seeds on disk are what its encodings
    // write today, and the emulator target's checks do fail on wrong results.
    process::run(
        Command::new(&cargo)
            .current_dir(&fuzz_dir)
            .args(["test", "--lib", "--quiet"]),
    )
    .context("the fuzz crate's tests fail")?;
    // Built first, so that a target that does not compile is not reported
    // as one that found a failure.
    process::run(
        Command::new(&cargo)
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "build", "--sanitizer", SANITIZER]),
    )
    .context("the fuzz targets do not build")?;
    for target in TARGETS {
        check_sanitized(&fuzz_dir.join(TARGET_DIR).join(target))?;
    }
    let mut figures = Vec::new();
    for target in TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let mut command = Command::new(&cargo);
        command
            .current_dir(&fuzz_dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "--sanitizer", SANITIZER, target])
            .arg(&corpus)
            .arg(Path::new("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1");
        match run_fuzzer(&mut command, target) {
            Ok(figure) => figures.push(figure),
            Err(error) => {
                print_table(&figures, seconds);
                return Err(error.context(format!(
                    "fuzz target {target} found a failure (see fuzz/artifacts/{target})"
                )));
            }
        }
    }
    print_table(&figures, seconds);
    Ok(())
}

/// Fails unless `binary` holds AddressSanitizer's runtime.
fn check_sanitized(binary: &Path) -> Result<()> {
    let bytes =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let marker = b"__asan_report_load";
    if !bytes.windows(marker.len()).any(|window| window == marker) {
        bail!(
            "{} was built without AddressSanitizer (did rustflags from a config file replace cargo-fuzz's?)",
            binary.display()
        );
    }
    Ok(())
}

/// What one bounded run did, from libFuzzer's last status line and its
/// `-print_final_stats` lines.
#[derive(Debug, Default, PartialEq)]
struct Figures {
    target: String,
    runs: Option<u64>,
    execs_per_second: Option<u64>,
    /// `cov:`: coverage edges (inline 8-bit counters) reached.
    edges: Option<u64>,
    /// `ft:`: libFuzzer's finer features (edges with hit counts, comparisons).
    features: Option<u64>,
    /// `corp:`: inputs in the corpus at the end.
    corpus: Option<u64>,
    new_units: Option<u64>,
    peak_rss_mb: Option<u64>,
}

impl Figures {
    fn parse(&mut self, line: &str) {
        let number = |text: &str| text.trim().parse::<u64>().ok();
        if let Some((name, value)) = line.rsplit_once(':').filter(|_| line.starts_with("stat::")) {
            let value = number(value);
            match name {
                "stat::number_of_executed_units" => self.runs = value,
                "stat::average_exec_per_sec" => self.execs_per_second = value,
                "stat::new_units_added" => self.new_units = value,
                "stat::peak_rss_mb" => self.peak_rss_mb = value,
                _ => {}
            }
            return;
        }
        // "#1234\tNEW    cov: 567 ft: 890 corp: 12/3456b lim: ... exec/s: ..."
        if !line.starts_with('#') || !line.contains(" cov: ") {
            return;
        }
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            let value = || {
                words
                    .clone()
                    .next()
                    .map(|v| v.split('/').next().unwrap_or(v))
            };
            match word {
                "cov:" => self.edges = value().and_then(number),
                "ft:" => self.features = value().and_then(number),
                "corp:" => self.corpus = value().and_then(number),
                _ => {}
            }
        }
    }
}

/// Runs a fuzzer, showing its output as it comes (libFuzzer writes to
/// stderr) and reading its figures from it.
fn run_fuzzer(command: &mut Command, target: &str) -> Result<Figures> {
    let line = format!("{command:?}");
    eprintln!("$ {line}");
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {line}"))?;
    let mut figures = Figures {
        target: target.to_string(),
        ..Default::default()
    };
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut reader = BufReader::new(stderr);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        let n = reader
            .read_until(b'\n', &mut buffer)
            .context("reading the fuzzer's output")?;
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buffer);
        let text = text.trim_end();
        eprintln!("{text}");
        figures.parse(text);
    }
    let status = child.wait().context("waiting for the fuzzer")?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(figures)
}

fn print_table(figures: &[Figures], seconds: u32) {
    if figures.is_empty() {
        return;
    }
    let show = |value: Option<u64>| value.map_or("?".to_string(), |v| v.to_string());
    eprintln!();
    eprintln!("fuzz summary: {seconds} s per target, AddressSanitizer; edges = libFuzzer's cov:");
    eprintln!(
        "{:<10} {:>10} {:>8} {:>7} {:>9} {:>7} {:>5} {:>8}",
        "target", "runs", "exec/s", "edges", "features", "corpus", "new", "rss MB"
    );
    for f in figures {
        eprintln!(
            "{:<10} {:>10} {:>8} {:>7} {:>9} {:>7} {:>5} {:>8}",
            f.target,
            show(f.runs),
            show(f.execs_per_second),
            show(f.edges),
            show(f.features),
            show(f.corpus),
            show(f.new_units),
            show(f.peak_rss_mb)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_come_from_the_last_status_line_and_the_final_stats() {
        let mut figures = Figures::default();
        for line in [
            "INFO: Loaded 1 modules   (302 inline 8-bit counters): 302 [0x1, 0x2),",
            "#2\tINITED cov: 240 ft: 250 corp: 5/1234b exec/s: 0 rss: 36Mb",
            "#8192\tpulse  cov: 247 ft: 261 corp: 6/13b lim: 4 exec/s: 4096 rss: 37Mb",
            "#9000\tDONE   cov: 251 ft: 270 corp: 7/2Kb lim: 4 exec/s: 600 rss: 37Mb",
            "Done 9000 runs in 15 second(s)",
            "stat::number_of_executed_units: 9000",
            "stat::average_exec_per_sec:     600",
            "stat::new_units_added:          3",
            "stat::slowest_unit_time_sec:    0",
            "stat::peak_rss_mb:              37",
        ] {
            figures.parse(line);
        }
        assert_eq!(
            figures,
            Figures {
                target: String::new(),
                runs: Some(9000),
                execs_per_second: Some(600),
                edges: Some(251),
                features: Some(270),
                corpus: Some(7),
                new_units: Some(3),
                peak_rss_mb: Some(37),
            }
        );
    }
}
