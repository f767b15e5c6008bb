//! Benchmarks of the VMM on this host's KVM, printed side by side from one
//! run (ratios matter; machines are noisy):
//! `cargo test --release -p bulkhead --test figures -- --ignored --nocapture`.

use std::path::Path;
use std::process::Command;

/// `memory` of the JSON report of one embedded-guest run of `program run`.
fn embedded_run_memory(program: &Path) -> serde_json::Value {
    let output = Command::new(program)
        .args(["run", "--output", "json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    report["memory"].clone()
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

#[test]
#[ignore = "a benchmark: cargo test --release -p bulkhead --test figures -- --ignored --nocapture"]
fn vmm_resident_overhead() {
    let bulkhead = Path::new(env!("CARGO_BIN_EXE_bulkhead"));
    let vmm = Path::new(env!("CARGO_BIN_EXE_bulkhead-vmm"));
    // The whole command line alone, with no VMM program beside it: the VM
    // runs in the process that also holds the daemon's code.
    let alone = std::env::temp_dir().join(format!("bulkhead-figures-{}", std::process::id()));
    std::fs::create_dir_all(&alone).unwrap();
    let whole = alone.join("bulkhead");
    std::fs::copy(bulkhead, &whole).unwrap();
    let overhead = |program: &Path| {
        median(
            (0..5)
                .map(|_| {
                    embedded_run_memory(program)["vmm_overhead_kib"]
                        .as_u64()
                        .unwrap()
                })
                .collect(),
        )
    };
    let (lean, via_run, whole_binary) = (overhead(vmm), overhead(bulkhead), overhead(&whole));
    let size = |path: &Path| std::fs::metadata(path).unwrap().len() >> 10;
    println!("VMM resident overhead, embedded guest (median of 5, KiB):");
    println!(
        "  bulkhead-vmm run:                {lean} ({} KiB binary)",
        size(vmm)
    );
    println!("  bulkhead run (execs bulkhead-vmm): {via_run}");
    println!(
        "  bulkhead run in-process:         {whole_binary} ({} KiB binary)",
        size(&whole)
    );
    println!(
        "  lean / in-process:               {:.2}",
        lean as f64 / whole_binary as f64
    );
    let _ = std::fs::remove_dir_all(&alone);
}
