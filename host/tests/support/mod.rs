//! What the host crate's tests share: a manager whose VMMs are the
//! stand-in VMM (`fake_vmm.rs`, the `bulkhead-fake-vmm` bin) over a state
//! directory of its own, on the host's real cgroups (the tests run as root,
//! as the daemon does).

use host::cgroup::Cgroups;
use host::events::EventBus;
use host::manager::{Manager, ManagerConfig};
use host::spec::VmSpec;
use std::sync::Arc;
use testkit::TempDir;

pub const FAKE_VMM: &str = env!("CARGO_BIN_EXE_bulkhead-fake-vmm");

pub fn config(dir: &TempDir) -> ManagerConfig {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    ManagerConfig {
        state_dir: dir.path().to_path_buf(),
        allowed_dirs: vec![dir.join("images")],
        vmm_binary: FAKE_VMM.into(),
        // Opened and passed on like the real device; the fake never uses it.
        kvm_device: "/dev/null".into(),
        cgroups: host_cgroups(),
    }
}

pub fn host_cgroups() -> Cgroups {
    let cgroups = Cgroups::detect();
    assert_ne!(
        cgroups,
        Cgroups::Unavailable,
        "these tests run as root on a host with cgroups, as the daemon does"
    );
    cgroups
}

/// The manager over `dir`, and the bus it publishes its events on.
pub fn open(dir: &TempDir) -> (Arc<Manager>, EventBus) {
    let bus = EventBus::default();
    (Manager::open(config(dir), bus.clone()).unwrap(), bus)
}

/// A VM whose fake VMM behaves as `behaviour` (its command line) says.
pub fn spec(name: &str, behaviour: &str) -> VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": name, "cpus": 2, "memory_mib": 64, "cmdline": behaviour
    }))
    .unwrap()
}
