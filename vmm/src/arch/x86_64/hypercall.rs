//! Finishing KVM hypercalls that this host's KVM never completes.
//!
//! On the software (PVM) KVM the `vmcall` instruction leaves the vCPU spinning
//! inside KVM_RUN. A periodic signal (see `vcpu.rs`) knocks the vCPU out; if it
//! is sitting on a hypercall instruction, the VMM does what KVM would have done
//! and moves the guest past it.

use crate::memory::GuestRam;
use kvm_bindings::{kvm_msi, kvm_regs};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

/// Hypercall numbers (include/uapi/linux/kvm_para.h).
pub const KVM_HC_VAPIC_POLL_IRQ: u64 = 1;
pub const KVM_HC_KICK_CPU: u64 = 5;
pub const KVM_HC_CLOCK_PAIRING: u64 = 9;
pub const KVM_HC_SEND_IPI: u64 = 10;
pub const KVM_HC_SCHED_YIELD: u64 = 11;
/// Error values hypercalls return in RAX.
const KVM_ENOSYS: i64 = 1000;
const KVM_EOPNOTSUPP: i64 = 95;

const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;

/// Whether the vCPU is stopped on a hypercall instruction; returns its registers.
pub fn stuck_on_hypercall(fd: &VcpuFd, memory: &GuestRam) -> Option<kvm_regs> {
    let regs = fd.get_regs().ok()?;
    let translation = fd.translate_gva(regs.rip).ok()?;
    if translation.valid == 0 {
        return None;
    }
    let mut bytes = [0u8; 3];
    memory
        .read_slice(&mut bytes, GuestAddress(translation.physical_address))
        .ok()?;
    (bytes == VMCALL || bytes == VMMCALL).then_some(regs)
}

/// Performs the hypercall in `regs` (number in RAX, arguments in RBX, RCX,
/// RDX, RSI) and returns the registers to resume with.
pub fn complete(vm: &VmFd, mut regs: kvm_regs) -> kvm_regs {
    let result: i64 = match regs.rax {
        KVM_HC_SEND_IPI => send_ipi(vm, regs.rbx, regs.rcx, regs.rdx, regs.rsi),
        // Yielding to another vCPU is only a hint; KICK_CPU wakes a vCPU halted
        // in a PV spinlock, which the guest does not use when PV_UNHALT is hidden.
        KVM_HC_SCHED_YIELD | KVM_HC_VAPIC_POLL_IRQ => 0,
        KVM_HC_CLOCK_PAIRING => -KVM_EOPNOTSUPP,
        _ => -KVM_ENOSYS,
    };
    regs.rax = result as u64;
    regs.rip = regs.rip.wrapping_add(VMCALL.len() as u64);
    regs
}

/// KVM_HC_SEND_IPI: `bitmap_low`/`bitmap_high` select APIC IDs from `min_apic_id`,
/// `icr` holds the vector and delivery mode. Returns how many IPIs were sent.
fn send_ipi(vm: &VmFd, bitmap_low: u64, bitmap_high: u64, min_apic_id: u64, icr: u64) -> i64 {
    let mut sent = 0;
    for (word, bitmap) in [bitmap_low, bitmap_high].into_iter().enumerate() {
        for bit in (0..64).filter(|b| bitmap & (1 << b) != 0) {
            let Some(apic_id) = min_apic_id.checked_add(word as u64 * 64 + bit) else {
                continue;
            };
            let msi = ipi_as_msi(apic_id, icr);
            if vm.signal_msi(msi).is_ok() {
                sent += 1;
            }
        }
    }
    sent
}

/// An IPI to one xAPIC ID expressed as the MSI that the LAPIC would accept.
fn ipi_as_msi(apic_id: u64, icr: u64) -> kvm_msi {
    let vector = (icr & 0xff) as u32;
    let delivery_mode = ((icr >> 8) & 0x7) as u32;
    kvm_msi {
        address_lo: MSI_ADDRESS_BASE | (((apic_id & 0xff) as u32) << 12),
        address_hi: 0,
        data: vector | (delivery_mode << 8),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipi_becomes_a_physical_destination_msi() {
        let msi = ipi_as_msi(3, 0x4fb); // NMI-less fixed delivery would be 0x0fb; 0x4 = NMI
        assert_eq!(msi.address_lo, 0xfee0_3000);
        assert_eq!(msi.data, 0x4fb);
        assert_eq!(ipi_as_msi(1, 0xec).data, 0xec);
    }
}
