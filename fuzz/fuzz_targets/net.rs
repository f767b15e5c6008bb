//! virtio-net transmit and receive from hostile descriptor chains, on a real
//! TAP device in a network namespace of the fuzzer's own (root needed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};
use vmm::config::NicSpec;
use vmm::devices::virtio::{net::Net, testing::fuzz_device};

fn device() -> &'static Mutex<Net> {
    static NET: OnceLock<Mutex<Net>> = OnceLock::new();
    NET.get_or_init(|| {
        // SAFETY: moves this (single-threaded) fuzzer into a fresh network
        // namespace, so its TAP and every frame it sends stay there.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare needs root"
        );
        let config = NicSpec {
            tap: "fuzz0".into(),
            mac: None,
            rate_limit: Default::default(),
        };
        let tap = vmm::devices::virtio::net::tap::Tap::open(&config.tap).unwrap();
        Mutex::new(Net::new(&config, tap, "eth0").unwrap())
    })
}

fuzz_target!(|input: &[u8]| {
    let mut net = device().lock().unwrap();
    fuzz_device(&mut *net, input);
});
