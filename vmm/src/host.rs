//! What kind of KVM this host has, and what guests need because of it.

use std::path::Path;

/// The flavour of KVM behind /dev/kvm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavour {
    /// VMX or SVM hardware virtualization.
    Hardware,
    /// The pagetable-based software KVM (`kvm_pvm`): guest kernel code runs in
    /// KVM's instruction emulator, and the hypercall instruction hangs.
    Pvm,
}

impl KvmFlavour {
    /// This host's KVM, looked at once (a sandboxed VMM cannot look later).
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<KvmFlavour> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| Self::detect_in(Path::new("/sys/module")))
    }

    fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            KvmFlavour::Pvm
        } else {
            KvmFlavour::Hardware
        }
    }

    /// Kernel command-line options a Linux guest needs on this host.
    ///
    /// On PVM: keep kvm-clock (the guest's only reliable clock here) but turn
    /// off the paravirtual paths that issue hypercalls (spinlock kicks, async
    /// page faults, steal time), and keep the kernel away from instructions
    /// KVM's emulator lacks (XSAVE, POPCNT, CMPXCHG16B, SMAP, FSGSBASE,
    /// INVPCID) so they need not trap to the VMM on hot paths. SSSE3 is hidden
    /// too: with it, stock kernels mix the RNG's entropy pool with an SSSE3
    /// BLAKE2s (movd, pshufb, ...) that neither KVM's emulator nor the VMM's
    /// implements; without it they use the portable C version. The lockup
    /// detectors are off: here kernel code runs a thousand times slower than
    /// the wall clock they measure against, and their reports (stack dumps
    /// over the emulated UART) only slow the guest further. The crypto
    /// self-tests are skipped: stock kernels test RSA with private-key
    /// operations when the first certificate is loaded, which at emulation
    /// speed overruns the kernel's own 60 s wait (the certificate then fails
    /// to load with -ETIMEDOUT) and starves the rest of boot; without them a
    /// stock kernel reaches /init here in about 9 minutes instead of not at all.
    pub fn guest_cmdline_options(self) -> &'static str {
        match self {
            KvmFlavour::Hardware => "",
            KvmFlavour::Pvm => {
                "nopvspin no-kvmapf no-steal-acc nowatchdog cryptomgr.notests noxsave clearcpuid=151,141,308,288,298,137"
            }
        }
    }

    /// KVM paravirtual CPUID features to hide from guests on this host.
    pub fn hidden_kvm_features(self) -> u32 {
        match self {
            KvmFlavour::Hardware => 0,
            KvmFlavour::Pvm => crate::arch::x86_64::cpu::KVM_FEATURES_USING_HYPERCALLS,
        }
    }
}

/// Total RAM of the host in bytes, from /proc/meminfo.
/// The host's memory, read once (a sandboxed VMM cannot read it later).
pub fn total_memory_bytes() -> Option<u64> {
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(|| {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        parse_mem_total(&meminfo)
    })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_from_its_module() {
        let dir = std::env::temp_dir().join(format!("bulkhead-host-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Hardware);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(KvmFlavour::Pvm.guest_cmdline_options().contains("noxsave"));
        assert_eq!(KvmFlavour::Hardware.guest_cmdline_options(), "");
    }

    #[test]
    fn reads_mem_total() {
        assert_eq!(
            parse_mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24576000 * 1024)
        );
        assert_eq!(parse_mem_total("nothing"), None);
    }
}
