//! A Linux guest snapshotted, restored and live-migrated while the host pings
//! it without pause: after each step the guest kernel answers from the new
//! process, its ext4 root still mounted. One boot, reused through the steps.
//!
//! The guest is kernel-only on kvm_pvm hosts (docs/host-kvm.md): its network
//! stack answering pings and its disk staying attached and error-free are
//! the kernel's own proof that it survived.

mod support;

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{device, run, Guest, Namespace};
use testkit::image;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const HOST_IP: &str = "10.78.0.1";
const GUEST_IP: &str = "10.78.0.2";
const TAP: &str = "bhmig0";
/// Pings are sent this often, so a lost reply is this much downtime.
const PING_INTERVAL_MS: u64 = 50;

/// `ping` running in the namespace for the whole test; the replies it got.
struct Pinger {
    child: Child,
    replies: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl Pinger {
    fn start(namespace: &Namespace) -> Pinger {
        let mut child = namespace
            .exec("ping")
            .args([
                "-n",
                "-i",
                &format!("0.{PING_INTERVAL_MS:03}"),
                "-W",
                "1",
                GUEST_IP,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ping");
        let replies = Arc::new(Mutex::new(Vec::new()));
        let sink = replies.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let seq = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("icmp_seq="))
                    .and_then(|s| s.parse().ok());
                if let (Some(seq), true) = (seq, line.contains("bytes from")) {
                    sink.lock().unwrap().push((Instant::now(), seq));
                }
            }
        });
        Pinger { child, replies }
    }

    fn last_seq(&self) -> Option<u64> {
        self.replies.lock().unwrap().last().map(|&(_, seq)| seq)
    }

    /// Waits for `count` replies after `after`; returns the replies lost in
    /// between (pings sent while the guest could not answer).
    fn wait_answers(&self, after: Instant, count: usize, what: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let replies = self.replies.lock().unwrap().clone();
            let later: Vec<u64> = replies
                .iter()
                .filter(|(t, _)| *t > after)
                .map(|&(_, s)| s)
                .collect();
            if later.len() >= count {
                let before = replies
                    .iter()
                    .rev()
                    .find(|(t, _)| *t <= after)
                    .map_or(0, |&(_, s)| s);
                return later[0].saturating_sub(before + 1);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the guest stopped answering pings ({} replies in total)",
                replies.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The disk is attached to the running driver and the kernel reported no
/// I/O or filesystem error.
fn assert_root_mounted(guest: &Guest, what: &str) {
    let status = guest.status();
    assert_eq!(
        device(&status, "vda").as_object().map(|_| ()),
        Some(()),
        "{what}: {status}"
    );
    let vda = status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "vda")
        .unwrap();
    assert_eq!(vda["state"], "active", "{what}: {status}");
    let console = guest.console();
    for error in [
        "EXT4-fs error",
        "I/O error",
        "Buffer I/O error",
        "virtio_blk: bad",
    ] {
        assert!(
            !console.contains(error),
            "{what}: {error} on the console:\n{console}"
        );
    }
}

#[test]
fn linux_keeps_answering_through_snapshot_restore_and_migration() {
    let (kernel, rootfs) = (image("vmlinux"), image("rootfs.ext4"));
    let temp = testkit::TempDir::new("linux-migration");
    let dir = temp.path();
    let root = dir.join("root.ext4");
    std::fs::copy(&rootfs, &root).unwrap();
    let namespace = Namespace::new();
    // A persistent multi-queue TAP with the host's address: it outlives each
    // VMM process, and source and destination can both attach to it.
    run(Command::new("ip").args([
        "-n",
        namespace.name(),
        "tuntap",
        "add",
        "dev",
        TAP,
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
    ]));
    run(Command::new("ip").args([
        "-n",
        namespace.name(),
        "addr",
        "add",
        &format!("{HOST_IP}/24"),
        "dev",
        TAP,
    ]));
    run(Command::new("ip").args(["-n", namespace.name(), "link", "set", TAP, "up"]));

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4 \
         ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
    );
    let mut args: Vec<OsString> = vec!["--kernel".into(), kernel.into()];
    for arg in [
        "--cpus",
        "2",
        "--memory",
        "256",
        "--cmdline",
        &cmdline,
        "--disk",
        &format!("path={},id=root", root.display()),
        "--net",
        &format!("tap={TAP}"),
    ] {
        args.push(arg.into());
    }
    let mut first = Guest::spawn(&namespace, &args, dir.join("first.sock"));
    assert!(
        first.wait_for_console("Run /sbin/init as init process", BOOT_LIMIT),
        "no init from the root disk:\n{}",
        first.console()
    );
    let pinger = Pinger::start(&namespace);
    pinger.wait_answers(Instant::now() - Duration::from_secs(1), 5, "after boot");
    assert_root_mounted(&first, "after boot");

    // Snapshot while the guest runs: it answers on through it.
    let snapshot = dir.join("snapshot");
    let taken = Instant::now();
    let answer = first.ctl(&["snapshot", snapshot.to_str().unwrap()]);
    let lost = pinger.wait_answers(taken, 5, "after the snapshot");
    eprintln!(
        "snapshot: {lost} replies lost ({} ms each): {answer}",
        PING_INTERVAL_MS
    );
    let seq_at_snapshot = pinger.last_seq().unwrap();

    // The first process ends; a new one restores the snapshot.
    let (status, report) = first.stop();
    assert!(status.success(), "{report}");
    let restored_at = Instant::now();
    let mut second = Guest::spawn(
        &namespace,
        &[OsString::from("--restore"), snapshot.into()],
        dir.join("second.sock"),
    );
    second.wait_for_control(Duration::from_secs(30));
    let lost = pinger.wait_answers(restored_at, 10, "after the restore");
    eprintln!(
        "restore: {lost} replies lost between the old process's end and the new one's answers"
    );
    assert!(pinger.last_seq().unwrap() > seq_at_snapshot);
    assert_root_mounted(&second, "after the restore");

    // Live migration to a third process over a Unix socket.
    let incoming = dir.join("incoming.sock");
    let uri = format!("unix:{}", incoming.display());
    let mut third = Guest::spawn(
        &namespace,
        &[OsString::from("--incoming"), OsString::from(&uri)],
        dir.join("third.sock"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !incoming.exists() {
        assert!(
            Instant::now() < deadline,
            "destination not listening: {}",
            third.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let migrated_at = Instant::now();
    let answer = second.ctl(&["migrate", &uri, "--verify-memory"]);
    let report: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let lost = pinger.wait_answers(migrated_at, 10, "after the migration");
    eprintln!(
        "migration: {lost} replies lost ({} ms each); VMM-measured downtime {} ms: {answer}",
        PING_INTERVAL_MS, report["migration"]["downtime_ms"]
    );
    // The promise: downtime within the default limit (300 ms). Held with
    // stated margins (the benchmark keeps the precise figures): 500 ms on
    // the VMM's own measure; 2 s on what the network saw, which adds the
    // TAP's hand-over and a kernel-only guest slow under kvm_pvm.
    let downtime = report["migration"]["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0 && downtime <= 300.0 + 500.0, "{answer}");
    assert!(
        lost * PING_INTERVAL_MS <= 300 + 2000,
        "{lost} replies lost in the migration: {answer}"
    );
    let (status, _) = second.stop_when_exited();
    assert!(status.success());
    third.wait_for_control(Duration::from_secs(30));
    assert_root_mounted(&third, "after the migration");
    let replies_before = pinger.replies.lock().unwrap().len();
    pinger.wait_answers(Instant::now(), 5, "from the destination alone");
    assert!(pinger.replies.lock().unwrap().len() > replies_before);

    drop(pinger);
    let (status, report) = third.stop();
    assert!(status.success(), "{report}");
    // The filesystem the guest kept mounted through all of it is consistent.
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}
