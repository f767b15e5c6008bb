//! virtio-balloon inflate, deflate, statistics and free-page reports from
//! hostile descriptor chains.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config::BalloonConfig;
use vmm::devices::virtio::{balloon::Balloon, testing::fuzz_device};

fuzz_target!(|input: &[u8]| {
    let config = BalloonConfig {
        target_mib: 1,
        deflate_on_oom: true,
        free_page_reporting: true,
    };
    fuzz_device(&mut Balloon::new(&config).unwrap(), input);
});
