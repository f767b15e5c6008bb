//! Bulkhead's VMM library: one virtual machine on KVM.

pub mod arch;
