//! A Linux guest through the daemon: sandboxed VMM with a disk and a NIC,
//! the guest answering pings, its device counters in the metrics, and a
//! graceful stop the guest kernel itself carries out (Ctrl-Alt-Del makes it
//! reboot; the VM ends on the reset).

use crate::support::{read_until, Daemon};
use hyper::Method;
use serde_json::json;
use testkit::image;
use testkit::Namespace;

const TAP: &str = "bhd0";
const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";

/// Whether the guest answers pings from the namespace's side of its TAP.
fn guest_answers_pings(namespace: &Namespace) -> bool {
    namespace
        .exec("ping")
        .args(["-c", "3", "-i", "0.3", "-W", "5", GUEST_IP])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn linux_runs_under_the_daemon_and_shuts_down_when_asked() {
    let (kernel, rootfs) = (image("vmlinux"), image("rootfs.ext4"));
    let namespace = Namespace::new();
    let daemon = Daemon::start_in(namespace.name());
    let kernel_copy = daemon.images.join("vmlinux");
    let root = daemon.images.join("root.ext4");
    std::fs::copy(&kernel, &kernel_copy).unwrap();
    std::fs::copy(&rootfs, &root).unwrap();
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4 \
         ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
    );
    // One vCPU: on this host's kvm_pvm a two-vCPU Linux guest stalls now and
    // then under load (seen 2026-12-01 with the binaries of before and after
    // the descriptor launch; docs/host-kvm.md). SMP is tested by the Linux
    // boot tests and by the hardware-KVM lane.
    let spec = json!({
        "name": "linux", "kernel": kernel_copy, "cmdline": cmdline, "cpus": 1, "memory_mib": 256,
        "disks": [{"path": root}], "nics": [{"tap": TAP}],
    });
    let created = daemon.ok(Method::POST, "/v1/vms", Some(spec));
    let id = created["id"].as_str().unwrap().to_string();
    daemon.ok(Method::POST, &format!("/v1/vms/{id}/start"), None);
    // The VMM made the TAP in the daemon's namespace; the host side gets an address.
    namespace.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    namespace.ip(&["link", "set", TAP, "up"]);

    let client = daemon.client(None);
    let mut console = daemon.block_on(client.console(&id, false)).unwrap();
    read_until(&daemon, &mut console, "Run /sbin/init as init process");
    assert!(
        guest_answers_pings(&namespace),
        "the guest does not answer pings"
    );

    let metrics = daemon.call(None, Method::GET, "/metrics", None).text;
    for counter in [
        "device=\"vda\",counter=\"requests\"",
        "device=\"eth0\",counter=\"rx_frames\"",
    ] {
        let line = metrics
            .lines()
            .find(|line| line.contains(counter))
            .unwrap_or_else(|| panic!("no {counter} in the metrics"));
        assert!(!line.ends_with(" 0"), "{line}");
    }

    // A graceful stop: the kernel reboots on Ctrl-Alt-Del by itself.
    let stopped = daemon.ok(
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(json!({"timeout_secs": 120})),
    );
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["last_exit"], "guest reset", "{stopped}");
    read_until(&daemon, &mut console, "reboot: Restarting system");
}
