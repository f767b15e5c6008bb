//! The architectural state of vCPUs and of KVM's in-kernel devices, read out
//! for snapshots and migration and written back on restore.
//!
//! KVM's own structures are kept as they are (kvm-bindings serialises them
//! byte for byte); what surrounds them is named, so a snapshot's state file
//! says what it holds.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct StateError {
    pub what: &'static str,
    pub source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { what, source }
}

/// Reads one KVM structure, refusing a blob of any other size: kvm-bindings
/// alone pads a short one with zeros, and a snapshot or a migration peer
/// may send anything (a truncated register blob would restore as RIP 0).
fn exact<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let bytes: Vec<u8> = Vec::deserialize(deserializer)?;
    from_exact_bytes(&bytes)
}

fn from_exact_bytes<T: serde::de::DeserializeOwned, E: serde::de::Error>(
    bytes: &[u8],
) -> Result<T, E> {
    let size = std::mem::size_of::<T>();
    if bytes.len() != size {
        let name = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        return Err(E::custom(format!(
            "{name} is {} bytes, it must be {size}",
            bytes.len()
        )));
    }
    T::deserialize(serde::de::value::BytesDeserializer::<E>::new(bytes))
}

/// [`exact`] for each element of a list.
fn exact_each<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let blobs: Vec<Vec<u8>> = Vec::deserialize(deserializer)?;
    blobs.iter().map(|bytes| from_exact_bytes(bytes)).collect()
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(deserialize_with = "exact_each")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    #[serde(deserialize_with = "exact")]
    pub regs: kvm_regs,
    #[serde(deserialize_with = "exact")]
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy FPU area is part of it).
    #[serde(deserialize_with = "exact")]
    pub xsave: kvm_xsave,
    #[serde(deserialize_with = "exact")]
    pub xcrs: kvm_xcrs,
    #[serde(deserialize_with = "exact")]
    pub lapic: kvm_lapic_state,
    #[serde(deserialize_with = "exact_each")]
    pub msrs: Vec<kvm_msr_entry>,
    #[serde(deserialize_with = "exact")]
    pub events: kvm_vcpu_events,
    #[serde(deserialize_with = "exact")]
    pub mp_state: kvm_mp_state,
    #[serde(deserialize_with = "exact")]
    pub debug_regs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VcpuState {{ rip: {:#x}, .. }}", self.regs.rip)
    }
}

/// Reads `indices` in one call; an MSR the host refuses to read is dropped
/// (KVM stops at the first one it cannot read and says how many it read).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut wanted: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if read == wanted.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        tracing::debug!(
            msr = format_args!("{:#x}", wanted[read]),
            "MSR not readable, left out"
        );
        wanted.remove(read);
    }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running. Any I/O it exited for
    /// must already be completed (see `Vcpu::complete_pending_io`).
    pub fn capture(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
        Ok(VcpuState {
            cpuid: fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            debug_regs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Writes the state into a freshly created vCPU. The order matters: CPUID
    /// before anything it gates, segment registers (with the APIC base)
    /// before the LAPIC, MSRs before pending events.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| StateError {
            what: "building the CPUID table",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: the buffer is a kvm_xsave read from KVM, of the size the
        // legacy KVM_SET_XSAVE expects.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| StateError {
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let written = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if written != self.msrs.len() {
            return Err(StateError {
                what: "KVM_SET_MSRS (an MSR was refused)",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

/// KVM's in-kernel devices and clock: the PICs, the IOAPIC, the PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    #[serde(deserialize_with = "exact")]
    pub pic_master: kvm_irqchip,
    #[serde(deserialize_with = "exact")]
    pub pic_slave: kvm_irqchip,
    #[serde(deserialize_with = "exact")]
    pub ioapic: kvm_irqchip,
    #[serde(deserialize_with = "exact")]
    pub pit: kvm_pit_state2,
    #[serde(deserialize_with = "exact")]
    pub clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    pub fn capture(vm: &VmFd) -> Result<VmState, StateError> {
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into a VM whose irqchip and PIT exist.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        // KVM_GET_CLOCK reports flags (TSC_STABLE, REALTIME...) that
        // KVM_SET_CLOCK refuses or reads differently: set the clock value only.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu_json() -> serde_json::Value {
        let state = VcpuState {
            cpuid: vec![kvm_cpuid_entry2::default()],
            regs: kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            lapic: Default::default(),
            msrs: vec![kvm_msr_entry::default()],
            events: Default::default(),
            mp_state: Default::default(),
            debug_regs: Default::default(),
        };
        serde_json::to_value(&state).unwrap()
    }

    #[test]
    fn a_whole_state_reads_back() {
        let state: VcpuState = serde_json::from_value(vcpu_json()).unwrap();
        assert_eq!(state.regs.rip, 0x1234);
    }

    #[test]
    fn a_blob_of_the_wrong_size_is_refused_naming_it() {
        for (field, nested) in [
            ("regs", false),
            ("sregs", false),
            ("lapic", false),
            ("cpuid", true),
            ("msrs", true),
        ] {
            for change in [-1i32, 1] {
                let mut json = vcpu_json();
                let blob = match nested {
                    true => &mut json[field][0],
                    false => &mut json[field],
                };
                let bytes = blob.as_array_mut().unwrap();
                if change < 0 {
                    bytes.pop();
                } else {
                    bytes.push(0.into());
                }
                let error = serde_json::from_value::<VcpuState>(json)
                    .err()
                    .unwrap_or_else(|| panic!("{field} {change:+} bytes was taken"));
                assert!(
                    error.to_string().contains("bytes, it must be"),
                    "{field}: {error}"
                );
            }
        }
    }
}
