//! Bulkhead's VMM library: one virtual machine on KVM.
//!
//! [`Vm::new`] builds a VM from a [`VmConfig`]; [`Vm::start`] runs its vCPUs;
//! [`RunningVm::wait`] returns how it ended.

pub mod arch;
pub mod backing;
pub mod config;
pub mod console_socket;
pub mod control;
pub mod descriptors;
pub mod devices;
pub mod exit;
pub mod host;
pub mod launch;
pub mod lifecycle;
pub mod memory;
pub mod memory_usage;
pub mod migration;
pub mod pause;
pub mod persist;
pub mod sandbox;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vm_core;

pub use config::{KernelSource, VmConfig};
pub use exit::VmExit;
pub use vm::{RunningVm, Vm, VmError, VmReport};
