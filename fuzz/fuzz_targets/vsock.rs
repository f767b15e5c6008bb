//! virtio-vsock packets from hostile descriptor chains (the device's Unix
//! socket is real, in a temporary folder).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};
use vmm::config::VsockSpec;
use vmm::devices::virtio::{testing::fuzz_device, vsock::Vsock};

fn device() -> &'static Mutex<Vsock> {
    static VSOCK: OnceLock<Mutex<Vsock>> = OnceLock::new();
    VSOCK.get_or_init(|| {
        let socket =
            std::env::temp_dir().join(format!("bulkhead-fuzz-vsock-{}", std::process::id()));
        let config = VsockSpec {
            cid: 3,
            socket: Some(socket),
        };
        Mutex::new(Vsock::new(&config, Vsock::bind(&config).unwrap()).unwrap())
    })
}

fuzz_target!(|input: &[u8]| {
    let mut vsock = device().lock().unwrap();
    fuzz_device(&mut *vsock, input);
});
