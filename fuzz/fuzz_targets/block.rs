//! virtio-blk requests from hostile descriptor chains, on a real disk file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vmm::config::DiskSpec;
use vmm::devices::virtio::{block::Block, testing::fuzz_device};

fn disk() -> &'static DiskSpec {
    static DISK: OnceLock<DiskSpec> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("bulkhead-fuzz-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        DiskSpec {
            path,
            readonly: false,
            id: None,
            rate_limit: Default::default(),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let mut block = Block::new(disk(), Block::open_file(disk()).unwrap(), "vda").unwrap();
    fuzz_device(&mut block, input);
});
