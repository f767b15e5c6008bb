//! Tiny x86-64 guests, assembled in Rust with iced-x86 and wrapped in ELF:
//! the default guest `bulkhead run` embeds, and one test guest per VM exit
//! path and per instruction the VMM's emulator finishes.

mod console_echo;
mod default_guest;
mod elf;
mod memory_writer;
mod program;
mod test_guests;
mod virtio;
mod virtio_blk;
mod virtio_net;
mod virtio_vsock;

pub use console_echo::{console_echo, CONSOLE_ECHO_READY};
pub use default_guest::{default_guest, BANNER};
pub use memory_writer::{memory_writer, MemoryWriter};
pub use program::Result;
pub use test_guests::{port_io_loop, test_guest, TEST_GUESTS};
pub use virtio_blk::{block_workload, numbered_sector, BlockWorkload};
pub use virtio_net::{net_receive_workload, net_workload, NetWorkload};
pub use virtio_vsock::{
    vsock_workload, GUEST_PORT as VSOCK_GUEST_PORT, HOST_PORT as VSOCK_HOST_PORT,
};
