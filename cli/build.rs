//! Assembles the default guest (guests crate) into OUT_DIR for `include_bytes!`,
//! and fingerprints the sources both programs are built from
//! (`BULKHEAD_BUILD`), so `bulkhead` never starts a `bulkhead-vmm` left over
//! from another build.

use std::path::Path;

/// FNV-1a, 64 bits.
fn mix(hash: &mut u64, bytes: impl IntoIterator<Item = u8>) {
    for byte in bytes {
        *hash ^= u64::from(byte);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

/// Every file under `path` (or `path` itself), names and contents, in name order.
fn fingerprint(path: &Path, hash: &mut u64) {
    if let Ok(entries) = std::fs::read_dir(path) {
        let mut paths: Vec<_> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths {
            fingerprint(&path, hash);
        }
    } else if let Ok(bytes) = std::fs::read(path) {
        mix(hash, path.to_string_lossy().bytes());
        mix(hash, bytes);
    }
}

fn main() {
    let out_dir = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let guest = guests::default_guest().expect("the default guest assembles");
    std::fs::write(
        std::path::Path::new(&out_dir).join("default-guest.elf"),
        guest,
    )
    .expect("write the default guest to OUT_DIR");

    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for path in [
        "src",
        "../vmm/src",
        "../host/src",
        "../guests/src",
        "../Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={path}");
        fingerprint(Path::new(path), &mut hash);
    }
    println!("cargo:rustc-env=BULKHEAD_BUILD={hash:016x}");
}
