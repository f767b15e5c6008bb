//! Linux's own virtio drivers against Bulkhead's devices, through the
//! `bulkhead` command as a user runs it: one guest boot (minutes of emulated
//! kernel code on kvm_pvm hosts), then every check against that guest.
//!
//! The guest is kernel-only here (its user space cannot make system calls on
//! kvm_pvm hosts, docs/host-kvm.md), so each proof is the kernel's own:
//! - block: ext4 root on vda mounted rw, /sbin/init executed from it, and the
//!   mount count and time it wrote visible to `dumpe2fs -h` on the host;
//! - net: inside a network namespace this test creates (TAP and VMM in it,
//!   deleted at the end), the kernel configures eth0 from `ip=`, answers the
//!   host's pings, resets a TCP connection, and sends its log with netconsole;
//! - entropy: the kernel's hwrng reads virtio-rng (bytes served counted);
//! - vsock: the driver reads the guest CID, and the kernel's vsock stack
//!   answers a host connection to a port with no listener with a reset;
//! - balloon: `bulkhead ctl` lowers the target, the guest inflates, the VMM's
//!   resident set falls by at least 80% of it; raising it gives it back.

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{device, rss_kib, run, wait_status, Guest, Namespace};
use testkit::image;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const TAP: &str = "bhtap0";
const NETCONSOLE_PORT: u16 = 6666;
const GUEST_MIB: u64 = 256;
const BALLOON_MIB: u64 = 64;
const GUEST_CID: u64 = 7;

#[test]
fn linux_drivers_use_block_net_vsock_rng_and_balloon() {
    let (kernel, rootfs) = (image("vmlinux"), image("rootfs.ext4"));
    let temp = testkit::TempDir::new("linux-devices");
    let dir = temp.path();
    let root = dir.join("root.ext4");
    std::fs::copy(&rootfs, &root).unwrap();
    let control = dir.join("control.sock");
    let vsock = dir.join("vsock.sock");
    let namespace = Namespace::new();

    // The host end of netconsole, listening before the guest boots.
    let netconsole = Arc::new(Mutex::new(String::new()));
    let listening = Arc::new(AtomicBool::new(true));
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let listener = {
        let (netconsole, listening) = (netconsole.clone(), listening.clone());
        namespace.on_thread(move || {
            // The address appears on the TAP only once the VMM created it.
            let socket = UdpSocket::bind(("0.0.0.0", NETCONSOLE_PORT)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            bound_tx.send(()).unwrap();
            let mut buffer = [0u8; 2048];
            while listening.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buffer) {
                    netconsole
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            }
        })
    };
    bound_rx.recv().unwrap();

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4 \
         ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off \
         netconsole=@{GUEST_IP}/eth0,{NETCONSOLE_PORT}@{HOST_IP}/"
    );
    let mut args: Vec<std::ffi::OsString> = vec!["--kernel".into(), kernel.clone().into()];
    for arg in [
        "--memory",
        &GUEST_MIB.to_string(),
        "--prefault",
        "--cmdline",
        &cmdline,
        "--disk",
        &format!("path={},id=root", root.display()),
        "--net",
        &format!("tap={TAP}"),
        "--rng",
        "--balloon",
        "--vsock",
        &format!("cid={GUEST_CID},socket={}", vsock.display()),
    ] {
        args.push(arg.into());
    }
    let mut guest = Guest::spawn(&namespace, &args, control);

    // The VMM created the TAP: give the host its address in the namespace.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !guest.control.exists() {
        assert!(
            Instant::now() < deadline,
            "no control socket: {}",
            guest.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    run(Command::new("ip").args([
        "-n",
        namespace.name(),
        "addr",
        "add",
        &format!("{HOST_IP}/24"),
        "dev",
        TAP,
    ]));

    assert!(
        guest.wait_for_console("Run /sbin/init as init process", BOOT_LIMIT),
        "no init from the root disk:\n{}",
        guest.console()
    );
    let console = guest.console();

    // Block: root mounted read-write from vda, its superblock written.
    assert!(console.contains("virtio_blk virtio0: [vda]"), "{console}");
    assert!(
        console.contains("VFS: Mounted root (ext4 filesystem) on device 254:0"),
        "{console}"
    );
    let superblock = run(Command::new("dumpe2fs").arg("-h").arg(&root));
    assert!(
        superblock
            .lines()
            .any(|l| l.starts_with("Mount count:") && l.ends_with(" 1")),
        "{superblock}"
    );
    assert!(
        superblock
            .lines()
            .any(|l| l.starts_with("Last mount time:") && !l.ends_with("n/a")),
        "{superblock}"
    );

    // Net: the kernel's IP stack answers through virtio-net and the TAP.
    assert!(console.contains(&format!("ipaddr={GUEST_IP}")), "{console}");
    let ping = namespace
        .exec("ping")
        .args(["-c", "3", "-W", "10", GUEST_IP])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let refused = namespace
        .on_thread(|| {
            let address: SocketAddr = format!("{GUEST_IP}:7").parse().unwrap();
            TcpStream::connect_timeout(&address, Duration::from_secs(30)).map(|_| ())
        })
        .join()
        .unwrap();
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the guest kernel should answer a TCP SYN to a closed port with a reset"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !netconsole.lock().unwrap().contains("Run /sbin/init") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let logged = netconsole.lock().unwrap().clone();
    assert!(
        logged.contains("Run /sbin/init"),
        "netconsole sent: {logged:?}"
    );

    // Entropy: the kernel's hwrng read virtio-rng when it registered.
    let status = guest.status();
    assert!(
        device(&status, "rng")["bytes_served"].as_u64().unwrap() > 0,
        "{status}"
    );
    let eth0 = device(&status, "eth0");
    assert!(
        eth0["tx_frames"].as_u64().unwrap() > 0 && eth0["rx_frames"].as_u64().unwrap() > 0,
        "{status}"
    );

    // vsock: the driver read the guest's CID at probe; a host program's
    // connection to a guest port nobody listens on reaches the guest kernel's
    // vsock stack, which refuses it with a reset (the host sees the stream close).
    let mut host = std::os::unix::net::UnixStream::connect(&vsock).unwrap();
    std::io::Write::write_all(&mut host, b"CONNECT 1234\n").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = String::new();
    let read = host.read_to_string(&mut answer);
    assert!(
        matches!(read, Ok(0)),
        "expected the guest to refuse: {read:?} {answer:?}"
    );
    let status = guest.status();
    let vsock_counters = device(&status, "vsock");
    assert!(
        vsock_counters["cid_reads"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert_eq!(vsock_counters["resets_received"], 1, "{status}");

    // Balloon: statistics arrive; inflating returns memory to the host.
    let before = wait_status(&guest, Duration::from_secs(30), |s| {
        s["balloon"]["stats"]["free_memory"].as_u64().is_some()
    });
    // A figure (printed, not held to anything here): what the VMM itself
    // holds beside guest RAM with Linux and five devices running.
    println!(
        "figure: VMM resident overhead, Linux with disk, net, rng, balloon and vsock: {} KiB",
        before["memory"]["vmm_overhead_kib"]
    );
    let free_before = before["balloon"]["stats"]["free_memory"]
        .as_u64()
        .unwrap_or_else(|| panic!("no balloon statistics: {before}"));
    guest.ctl(&["balloon", &BALLOON_MIB.to_string()]);
    let inflated = wait_status(&guest, Duration::from_secs(300), |s| {
        s["balloon"]["actual_mib"] == BALLOON_MIB
    });
    assert_eq!(inflated["balloon"]["actual_mib"], BALLOON_MIB, "{inflated}");
    let dropped_kib = rss_kib(&before).saturating_sub(rss_kib(&inflated));
    assert!(
        dropped_kib >= BALLOON_MIB * 1024 * 8 / 10,
        "RSS fell by {dropped_kib} KiB for a {BALLOON_MIB} MiB balloon: before {before}, after {inflated}"
    );
    guest.ctl(&["balloon", "0"]);
    let deflated = wait_status(&guest, Duration::from_secs(300), |s| {
        s["balloon"]["actual_mib"] == 0
            && s["balloon"]["stats"]["free_memory"]
                .as_u64()
                .is_some_and(|free| free + (8 << 20) >= free_before)
    });
    assert_eq!(deflated["balloon"]["actual_mib"], 0, "{deflated}");
    assert!(
        deflated["balloon"]["deflated_pages"].as_u64().unwrap() >= BALLOON_MIB * 256,
        "{deflated}"
    );
    let free_after = deflated["balloon"]["stats"]["free_memory"]
        .as_u64()
        .unwrap();
    assert!(
        free_after + (8 << 20) >= free_before,
        "guest free memory {free_before} -> {free_after}"
    );

    listening.store(false, Ordering::Relaxed);
    listener.join().unwrap();
    let (status, report) = guest.stop();
    assert!(status.success(), "bulkhead ended {status}: {report}");
    assert_eq!(report["exit"], "stopped by the host", "{report}");
}
