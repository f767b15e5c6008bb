//! `cargo xtask mutants [FILE]...`: mutation testing of the files that take
//! hostile input or decide access. cargo-mutants changes one line of such a
//! file at a time (an `==` into `!=`, a `<` into `<=`, a body into `Ok(())`,
//! ...) and runs the tests of the file's crate that need no KVM (the lib
//! tests; for `host`, all of its tests: they run the daemon's side against
//! a stand-in VMM); a change no test notices is a check the tests do not
//! hold. Each guarded file must have at least
//! [`MIN_CAUGHT_PERCENT`] of its buildable mutants caught.
//!
//! Slow (a build per mutant), so not part of `cargo xtask test`. The
//! mutants are built in a copy of the tree under the temporary directory;
//! the report is in `target/mutants/mutants.out/` (`missed.txt` lists the
//! changes no test noticed).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workspace_root;

/// The guarded files, each with the package whose lib tests must notice a
/// change to it.
pub const GUARDED: &[(&str, &str)] = &[
    ("host", "host/src/spec.rs"),
    ("host", "host/src/auth.rs"),
    ("host", "host/src/manager.rs"),
    ("host", "host/src/api/mod.rs"),
    ("host", "host/src/api/vms.rs"),
    ("host", "host/src/api/admin.rs"),
    ("host", "host/src/api/observe.rs"),
    ("host", "host/src/api/console.rs"),
    ("host", "host/src/api/openapi.rs"),
    ("vmm", "vmm/src/config.rs"),
    ("vmm", "vmm/src/migration/protocol.rs"),
    ("vmm", "vmm/src/devices/rate_limiter.rs"),
    ("vmm", "vmm/src/snapshot.rs"),
    ("vmm", "vmm/src/devices/virtio/chain.rs"),
];

/// The least share of a file's viable mutants (caught, or timed out, out of
/// caught, timed out and missed) its tests must catch.
pub const MIN_CAUGHT_PERCENT: f64 = 90.0;

/// Seconds a mutant's tests may run before it counts as a timeout (caught:
/// a change that hangs the tests is noticed).
const TEST_TIMEOUT_SECONDS: u32 = 120;

const USAGE: &str = "usage: cargo xtask mutants [FILE]... (default: every guarded file)";

/// What cargo-mutants found for one file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub caught: u32,
    pub missed: u32,
    pub timeout: u32,
    pub unviable: u32,
}

impl Tally {
    /// Caught (timeouts included) out of the mutants that built; None when
    /// none did.
    pub fn percent(&self) -> Option<f64> {
        let noticed = self.caught + self.timeout;
        let viable = noticed + self.missed;
        (viable > 0).then(|| f64::from(noticed) * 100.0 / f64::from(viable))
    }

    pub fn passes(&self) -> bool {
        self.percent().is_some_and(|p| p >= MIN_CAUGHT_PERCENT)
    }
}

pub fn main(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a.starts_with('-')) {
        bail!("{USAGE}");
    }
    let files: Vec<(&str, &str)> = if args.is_empty() {
        GUARDED.to_vec()
    } else {
        args.iter()
            .map(|wanted| {
                GUARDED
                    .iter()
                    .copied()
                    .find(|(_, file)| file == wanted)
                    .with_context(|| format!("{wanted} is not a guarded file\n{USAGE}"))
            })
            .collect::<Result<_>>()?
    };
    let root = workspace_root();
    let mut packages: Vec<&str> = files.iter().map(|(package, _)| *package).collect();
    packages.sort_unstable();
    packages.dedup();
    let mut tallies = BTreeMap::new();
    let mut reports = Vec::new();
    for package in packages {
        let output = root.join("target/mutants").join(package);
        std::fs::create_dir_all(&output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(&cargo);
        command
            .current_dir(&root)
            .arg("mutants")
            .arg("--no-shuffle")
            .arg(format!("--timeout={TEST_TIMEOUT_SECONDS}"))
            .arg("--output")
            .arg(&output)
            .arg(format!("--package={package}"));
        if package != "host" {
            // Only the lib tests, built and run: the crate's other tests
            // boot guests on KVM.
            command.arg("--cargo-arg=--lib");
        }
        for (_, file) in files.iter().filter(|(p, _)| *p == package) {
            command.arg(format!("--file={file}"));
        }
        eprintln!("$ {command:?}");
        let status = command
            .status()
            .context("cannot start cargo mutants (install it: cargo install cargo-mutants)")?;
        // 2: some mutants missed, 3: some timed out; judged below. Anything
        // else but success (a failing baseline, a bad option) is an error.
        if !matches!(status.code(), Some(0 | 2 | 3)) {
            bail!("cargo mutants failed for {package} ({status})");
        }
        let outcomes_path = output.join("mutants.out/outcomes.json");
        let outcomes = std::fs::read(&outcomes_path)
            .with_context(|| format!("cannot read {}", outcomes_path.display()))?;
        tallies.extend(tally(&serde_json::from_slice(&outcomes)?)?);
        reports.push(output.join("mutants.out/missed.txt").display().to_string());
    }
    let mut failed = Vec::new();
    println!(
        "{:<36} {:>6} {:>6} {:>7} {:>8} {:>7}",
        "file", "caught", "missed", "timeout", "unviable", "caught%"
    );
    for (_, file) in &files {
        let t = tallies.get(*file).copied().unwrap_or_default();
        let percent = t
            .percent()
            .map_or_else(|| "-".to_string(), |p| format!("{p:.1}"));
        println!(
            "{file:<36} {:>6} {:>6} {:>7} {:>8} {percent:>7}",
            t.caught, t.missed, t.timeout, t.unviable
        );
        if !t.passes() {
            failed.push(*file);
        }
    }
    if !failed.is_empty() {
        bail!(
            "under {MIN_CAUGHT_PERCENT}% of mutants caught in {} (see {})",
            failed.join(", "),
            reports.join(", ")
        );
    }
    Ok(())
}

/// Counts each file's outcomes in cargo-mutants' `outcomes.json`.
pub fn tally(outcomes: &serde_json::Value) -> Result<BTreeMap<String, Tally>> {
    let list = outcomes["outcomes"]
        .as_array()
        .context("outcomes.json: no outcome list")?;
    let mut tallies = BTreeMap::<String, Tally>::new();
    for outcome in list {
        // The baseline (the tree unchanged) has no file.
        let Some(file) = outcome["scenario"]["Mutant"]["file"].as_str() else {
            continue;
        };
        let tally = tallies.entry(file.to_string()).or_default();
        match outcome["summary"].as_str() {
            Some("CaughtMutant") => tally.caught += 1,
            Some("MissedMutant") => tally.missed += 1,
            Some("Timeout") => tally.timeout += 1,
            Some("Unviable") => tally.unviable += 1,
            other => bail!("outcomes.json: {file}: unknown outcome {other:?}"),
        }
    }
    Ok(tallies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_per_file_and_timeouts_count_as_caught() {
        fn mutant(file: &str, summary: &str) -> serde_json::Value {
            let scenario = serde_json::json!({"Mutant": {"file": file}});
            serde_json::json!({"scenario": scenario, "summary": summary})
        }
        let outcomes = serde_json::json!({"outcomes": [
            {"scenario": "Baseline", "summary": "Success"},
            mutant("a.rs", "CaughtMutant"),
            mutant("a.rs", "CaughtMutant"),
            mutant("a.rs", "MissedMutant"),
            mutant("a.rs", "Timeout"),
            mutant("a.rs", "Unviable"),
            mutant("b.rs", "Unviable"),
        ]});
        let tallies = tally(&outcomes).unwrap();
        let a = tallies["a.rs"];
        assert_eq!(
            a,
            Tally {
                caught: 2,
                missed: 1,
                timeout: 1,
                unviable: 1
            }
        );
        assert_eq!(a.percent(), Some(75.0));
        assert!(!a.passes());
        // Nothing viable proves nothing.
        assert_eq!(tallies["b.rs"].percent(), None);
        assert!(!tallies["b.rs"].passes());
        let edge = Tally {
            caught: 9,
            missed: 1,
            ..Tally::default()
        };
        assert!(edge.passes());
        assert!(tally(&serde_json::json!({"outcomes": [mutant("a.rs", "Odd")]})).is_err());
    }

    #[test]
    fn every_guarded_file_exists_once() {
        let root = workspace_root();
        for (i, (package, file)) in GUARDED.iter().enumerate() {
            assert!(root.join(file).is_file(), "{file}");
            assert!(file.starts_with(&format!("{package}/")), "{file}");
            assert!(
                GUARDED[..i].iter().all(|(_, other)| other != file),
                "{file}"
            );
        }
    }
}
