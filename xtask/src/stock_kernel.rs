//! Debian's stock kernel (`linux-image-amd64`): the L2 guest kernel of the
//! hardware-KVM lane, and the L1 kernel that provides that lane's KVM.
//!
//! The package is downloaded (`apt-get download`, nothing installed) and only
//! its bzImage and the modules the lane loads are kept, each module with
//! everything it depends on (read from its `.modinfo`), so a folder of plain
//! `.ko` files can be loaded in order with busybox `insmod`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{apt, process};

pub const META_PACKAGE: &str = "linux-image-amd64";

/// Modules a guest of the stock kernel loads from its initramfs: virtio
/// over MMIO and its devices, ext4, the ACPI power button and the input
/// events busybox's acpid reads, pvpanic.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
    "virtio_balloon",
    "pvpanic_pci",
    // ext4 asks for crc32c at mount time (a soft dependency `depends=`
    // does not name).
    "crc32c_generic",
    "ext4",
    "button",
    "evdev",
];

/// Modules L1 loads: KVM on AMD's SVM (which QEMU's `-cpu max` emulates) and
/// TAP devices.
pub const L1_MODULES: &[&str] = &["kvm_amd", "tun"];

/// The package `linux-image-amd64` points at now, and its version.
pub fn package() -> Result<(String, String)> {
    apt::kernel_package_of(META_PACKAGE)
}

/// Fills `out` with `vmlinuz` and `modules/NAME.ko` for the closure of
/// [`GUEST_MODULES`] and [`L1_MODULES`].
pub fn build(package: &str, out: &Path) -> Result<()> {
    let unpacked = download_kernel_package(package, out)?;
    let available = index_modules(&unpacked.join("lib/modules"))?;
    let modules = out.join("modules");
    fs::create_dir_all(&modules)?;
    let wanted: Vec<&str> = GUEST_MODULES.iter().chain(L1_MODULES).copied().collect();
    for name in closure(&available, &wanted)? {
        fs::copy(&available[&name].path, modules.join(format!("{name}.ko")))?;
    }
    fs::remove_dir_all(&unpacked)?;
    Ok(())
}

/// Downloads a kernel package (`apt-get download`: nothing installed),
/// unpacks it into `out/unpacked` (returned; the caller removes it) and
/// copies its bzImage to `out/vmlinuz`.
pub fn download_kernel_package(package: &str, out: &Path) -> Result<PathBuf> {
    let download = out.join("download");
    fs::create_dir_all(&download)?;
    process::run(
        Command::new("apt-get")
            .current_dir(&download)
            .args(["download", "-q", package]),
    )?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let unpacked = out.join("unpacked");
    process::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    fs::remove_dir_all(&download)?;
    let vmlinuz = fs::read_dir(unpacked.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no /boot/vmlinuz-*"))?;
    fs::copy(&vmlinuz, out.join("vmlinuz"))?;
    Ok(unpacked)
}

/// A module file and the modules it depends on.
pub struct Module {
    pub path: PathBuf,
    pub depends: Vec<String>,
}

/// Module names use `_` where file names may use `-`.
fn module_name(file_stem: &str) -> String {
    file_stem.replace('-', "_")
}

/// Every `.ko` under `dir`, by module name.
pub fn index_modules(dir: &Path) -> Result<BTreeMap<String, Module>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "ko") {
                let bytes = fs::read(&path)?;
                let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                found.insert(
                    module_name(&stem),
                    Module {
                        depends: modinfo_depends(&bytes),
                        path,
                    },
                );
            }
        }
    }
    Ok(found)
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-terminated
/// `key=value` strings).
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &ko[start + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(module_name)
        .collect()
}

/// `wanted` and everything they depend on, each after its dependencies.
pub fn closure(available: &BTreeMap<String, Module>, wanted: &[&str]) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        available: &BTreeMap<String, Module>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            bail!("module dependency cycle through {name}");
        }
        let module = available
            .get(name)
            .with_context(|| format!("no module {name} in the kernel package"))?;
        for dependency in &module.depends {
            visit(dependency, available, done, visiting, order)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    let (mut done, mut visiting) = (BTreeSet::new(), BTreeSet::new());
    for name in wanted {
        visit(name, available, &mut done, &mut visiting, &mut order)?;
    }
    Ok(order)
}

/// The load order of `wanted` among the modules kept in `dir` (from [`build`]).
pub fn load_order(dir: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    closure(&index_modules(dir)?, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=kvm,irqbypass\0retpoline=Y\0";
        assert_eq!(modinfo_depends(ko), ["kvm", "irqbypass"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
    }

    #[test]
    fn closure_puts_dependencies_first_once() {
        let module = |depends: &[&str]| Module {
            path: PathBuf::new(),
            depends: depends.iter().map(|s| s.to_string()).collect(),
        };
        let available = BTreeMap::from([
            ("kvm_amd".to_string(), module(&["kvm", "ccp"])),
            ("kvm".to_string(), module(&["irqbypass"])),
            ("ccp".to_string(), module(&[])),
            ("irqbypass".to_string(), module(&[])),
            ("tun".to_string(), module(&[])),
        ]);
        assert_eq!(
            closure(&available, &["kvm_amd", "tun", "kvm"]).unwrap(),
            ["irqbypass", "kvm", "ccp", "kvm_amd", "tun"]
        );
        let error = closure(&available, &["missing"]).unwrap_err().to_string();
        assert!(error.contains("no module missing"), "{error}");
    }
}
