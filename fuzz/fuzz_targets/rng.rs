//! virtio-rng requests from hostile descriptor chains.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::{rng::Rng, testing::fuzz_device};

fuzz_target!(|input: &[u8]| {
    fuzz_device(&mut Rng::new(), input);
});
