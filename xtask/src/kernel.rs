//! The guest kernel: Debian's `linux-source` with `images/kernel/bulkhead.config`.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{apt, process};

pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// An unpacked kernel source tree, kept between runs so rebuilds are incremental.
pub fn source_tree(cache: &Path) -> Result<PathBuf> {
    let version = apt::installed_version(SOURCE_PACKAGE)
        .with_context(|| format!("{SOURCE_PACKAGE} is not installed"))?;
    let tree = cache.join("build").join(format!("linux-{version}"));
    if tree.join("Makefile").is_file() {
        return Ok(tree);
    }
    let unpack = cache.join("build").join(format!(".unpack-{version}"));
    if unpack.exists() {
        fs::remove_dir_all(&unpack)?;
    }
    fs::create_dir_all(&unpack)?;
    eprintln!("xtask: unpacking {SOURCE_TARBALL}");
    process::run(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .arg("-C")
            .arg(&unpack),
    )?;
    fs::rename(unpack.join("linux-source-6.1"), &tree)
        .with_context(|| format!("move the unpacked source to {}", tree.display()))?;
    fs::remove_dir_all(&unpack)?;
    Ok(tree)
}

/// Builds `vmlinux` and `bzImage` into `out` from the fragment.
pub fn build(tree: &Path, fragment: &Path, out: &Path) -> Result<()> {
    make(tree, &["tinyconfig"])?;
    process::run(
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(tree)
            .args(["-m", ".config"])
            .arg(fragment)
            .stdout(Stdio::null()),
    )?;
    make(tree, &["olddefconfig"])?;
    verify_config(
        &fs::read_to_string(fragment)?,
        &fs::read_to_string(tree.join(".config"))?,
    )?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    make_with_progress(tree, &[&format!("-j{jobs}"), "vmlinux", "bzImage"])?;
    fs::copy(tree.join("vmlinux"), out.join("vmlinux"))?;
    fs::copy(tree.join("arch/x86/boot/bzImage"), out.join("bzImage"))?;
    fs::copy(tree.join(".config"), out.join("config"))?;
    Ok(())
}

fn make(tree: &Path, args: &[&str]) -> Result<()> {
    process::output(Command::new("make").current_dir(tree).args(args)).map(drop)
}

/// `make` with its output in a log file and a progress line now and then; the
/// log's tail is shown when it fails.
fn make_with_progress(tree: &Path, args: &[&str]) -> Result<()> {
    let log_path = tree.join("bulkhead-build.log");
    let mut log = fs::File::create(&log_path)?;
    eprintln!(
        "xtask: make {} (log: {})",
        args.join(" "),
        log_path.display()
    );
    let mut child = Command::new("make")
        .current_dir(tree)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start make")?;
    let stderr = child.stderr.take().expect("piped");
    let stderr_lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut compiled = 0usize;
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        writeln!(log, "{line}")?;
        if line.trim_start().starts_with("CC") {
            compiled += 1;
        }
        if last_report.elapsed() > Duration::from_secs(20) {
            eprintln!(
                "xtask: kernel: {compiled} files compiled, {}s",
                started.elapsed().as_secs()
            );
            last_report = Instant::now();
        }
    }
    let status = child.wait()?;
    let errors = stderr_lines.join().unwrap_or_default();
    for line in &errors {
        writeln!(log, "{line}")?;
    }
    if !status.success() {
        let tail = errors[errors.len().saturating_sub(20)..].join("\n");
        bail!(
            "kernel build failed ({status}); last messages:\n{tail}\nfull log: {}",
            log_path.display()
        );
    }
    eprintln!(
        "xtask: kernel built in {}s ({compiled} files compiled)",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// Every setting of the fragment must be in the final config: Kconfig drops
/// options whose dependencies are missing without a word (`CONFIG_BLOCK`
/// missing silently removes virtio-blk and ext4).
fn verify_config(fragment: &str, config: &str) -> Result<()> {
    let have: std::collections::HashSet<&str> = config.lines().map(str::trim).collect();
    let dropped: Vec<&str> = fragment
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("CONFIG_") || line.ends_with(" is not set"))
        .filter(|line| !have.contains(line))
        .collect();
    if !dropped.is_empty() {
        bail!(
            "the kernel config lost these fragment settings (missing dependencies?): {}",
            dropped.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_settings_are_named() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n";
        let config = "CONFIG_A=y\n# CONFIG_C is not set\n";
        let error = verify_config(fragment, config).unwrap_err().to_string();
        assert!(error.contains("CONFIG_B=y"), "{error}");
        assert!(!error.contains("CONFIG_A"), "{error}");
        verify_config(fragment, "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n").unwrap();
    }
}
