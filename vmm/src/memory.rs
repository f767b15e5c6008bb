//! Guest RAM as the VMM holds it.
//!
//! Every region carries a dirty bitmap (one bit per 4 KiB page) that
//! vm-memory sets whenever the VMM itself writes guest memory: virtio rings
//! and buffers, boot tables. KVM's dirty log covers what vCPUs write; live
//! migration needs both.

use vm_memory::bitmap::AtomicBitmap;

/// Guest RAM: anonymous memory at boot, or a private mapping of a snapshot's
/// memory file after a restore.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;
