//! Initial state of each vCPU: CPUID, MSRs, FPU, LAPIC LINT pins, and for the
//! boot CPU the registers and segments of the kernel's entry protocol.

use super::boot::EntryPoint;
use super::gdt::{self, CodeMode};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use crate::memory::GuestRam;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITE_BACK: u64 = 6;

/// KVM paravirtual feature bits (CPUID 0x40000001 EAX) whose guest side uses the
/// hypercall instruction. On hosts where `vmcall` hangs they are hidden.
pub const KVM_FEATURES_USING_HYPERCALLS: u32 = (1 << 7) // PV_UNHALT (spinlock kick)
    | (1 << 11) // PV_SEND_IPI
    | (1 << 13) // PV_SCHED_YIELD
    | (1 << 16); // MIGRATION_CONTROL (KVM_HC_MAP_GPA_RANGE)
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot set up vCPU {vcpu}: {what} failed: {source}")]
    Kvm {
        vcpu: usize,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the boot GDT: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What a vCPU's CPUID should say about the topology, per vCPU.
pub fn cpuid_for(base: &CpuId, vcpu: u8, cpus: u8, hidden_kvm_features: u32) -> CpuId {
    let mut cpuid = base.clone();
    let cpu_bits = (u32::from(cpus).next_power_of_two().trailing_zeros()).max(1);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // APIC ID, logical processor count, CLFLUSH line size (8 × 8 bytes).
                entry.ebx = (u32::from(vcpu) << 24) | (u32::from(cpus) << 16) | (8 << 8);
                if cpus > 1 {
                    entry.edx |= 1 << 28; // HTT: more than one logical processor
                }
                entry.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => {
                // Extended topology: every vCPU is a core of one socket.
                entry.edx = u32::from(vcpu);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8; // SMT level
                    }
                    1 => {
                        entry.eax = cpu_bits;
                        entry.ebx = u32::from(cpus);
                        entry.ecx = (2 << 8) | 1; // core level
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            KVM_CPUID_FEATURES => entry.eax &= !hidden_kvm_features,
            _ => {}
        }
    }
    cpuid
}

/// Sets CPUID, MSRs, FPU and LAPIC LINT pins on any vCPU.
pub fn configure_common(fd: &VcpuFd, vcpu: usize, cpuid: &CpuId) -> Result<(), CpuError> {
    let kvm = |what: &'static str| move |source| CpuError::Kvm { vcpu, what, source };
    fd.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).expect("fewer MSRs than KVM_MAX_MSR_ENTRIES");
    let written = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != entries.len() {
        // Not fatal: a guest reprograms these. Name the first MSR KVM refused.
        tracing::debug!(
            vcpu,
            msr = format_args!("{:#x}", entries[written].index),
            "KVM refused an MSR"
        );
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    set_lint_pins(fd).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

/// LINT0 delivers ExtINT (the 8259), LINT1 NMI, as firmware leaves them.
fn set_lint_pins(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x700;
    const DELIVERY_NMI: u32 = 0x400;
    let mut lapic = fd.get_lapic()?;
    for (register, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[register + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[register + i] = *b as _;
        }
    }
    fd.set_lapic(&lapic)
}

/// Puts the boot CPU at the kernel's entry point in the mode it expects.
pub fn configure_boot_cpu(fd: &VcpuFd, mem: &GuestRam, entry: EntryPoint) -> Result<(), CpuError> {
    let kvm = |what: &'static str| {
        move |source| CpuError::Kvm {
            vcpu: 0,
            what,
            source,
        }
    };
    let mode = match entry {
        EntryPoint::Linux64(_) => CodeMode::Long64,
        EntryPoint::Pvh(_) => CodeMode::Protected32,
    };
    let table = gdt::boot_gdt(mode);
    for (i, descriptor) in table.iter().enumerate() {
        mem.write_obj(*descriptor, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    boot_sregs(&mut sregs, &table, mode);
    fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64(address) => {
            regs.rip = address.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryPoint::Pvh(address) => {
            regs.rip = address.0;
            regs.rbx = PVH_INFO_START;
        }
    }
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

/// Segment and control registers for entry: flat segments from the boot GDT,
/// then either long mode with the identity page tables, or 32-bit protected
/// mode without paging (PVH).
pub fn boot_sregs(sregs: &mut kvm_sregs, table: &[u64; 5], mode: CodeMode) {
    let code = gdt::segment_from_descriptor(gdt::CODE_SELECTOR, table[2]);
    let data = gdt::segment_from_descriptor(gdt::DATA_SELECTOR, table[3]);
    let tss = gdt::segment_from_descriptor(gdt::TSS_SELECTOR, table[4]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if mode == CodeMode::Long64 {
        sregs.cr3 = PML4_START;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn long_mode_entry_turns_on_paging_and_uses_the_64_bit_code_segment() {
        let mut sregs = kvm_sregs::default();
        boot_sregs(
            &mut sregs,
            &gdt::boot_gdt(CodeMode::Long64),
            CodeMode::Long64,
        );
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cr3, sregs.cr4 & CR4_PAE), (PML4_START, CR4_PAE));
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db), (0x10, 1, 0));
        assert_eq!((sregs.ss.selector, sregs.tr.selector), (0x18, 0x20));
        assert_eq!(sregs.gdt.limit, 39);
    }

    #[test]
    fn pvh_entry_is_flat_32_bit_protected_mode_without_paging() {
        let mut sregs = kvm_sregs::default();
        boot_sregs(
            &mut sregs,
            &gdt::boot_gdt(CodeMode::Protected32),
            CodeMode::Protected32,
        );
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer, 0);
        assert_eq!(
            (sregs.cs.l, sregs.cs.db, sregs.cs.limit),
            (0, 1, 0xffff_ffff)
        );
    }

    #[test]
    fn cpuid_names_each_vcpu_and_hides_hypercall_features() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xdead_beef,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: KVM_CPUID_FEATURES,
                eax: 0xffff_ffff,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let cpuid = cpuid_for(&base, 2, 3, KVM_FEATURES_USING_HYPERCALLS);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!((e[1].edx, e[2].edx, e[2].eax, e[2].ebx), (2, 2, 2, 3));
        assert_eq!(e[3].eax & (1 << 11), 0, "PV_SEND_IPI hidden");
        assert_ne!(e[3].eax & 1, 0, "kvm-clock kept");
    }
}
