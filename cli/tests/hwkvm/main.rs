//! Tests that need guest user space: the hardware-KVM lane.
//!
//! Each test is `#[ignore]`d in a plain `cargo test`: on a software KVM like
//! `kvm_pvm` a guest's first system call faults (docs/host-kvm.md).
//! `cargo xtask hwkvm` (part of `cargo xtask test`) runs them with
//! `--include-ignored`, directly on a host with hardware KVM, else inside an
//! L1 VM whose `kvm_amd` runs on QEMU's emulated SVM (xtask/src/hwkvm.rs).
//!
//! Guests boot a busybox user space (images/userspace) whose shell is on the
//! serial console: the tests type commands into `bulkhead run`'s stdin and
//! read the answers from its stdout.

mod balloon_oom;
mod support;
mod vsock_reset;

use std::time::Duration;
use support::{cmdline, Kernel, TempDir, Vm};

const EXIT_LIMIT: Duration = Duration::from_secs(60);

/// The console both ways on the project kernel: a shell answers, reboot from
/// user space ends `bulkhead run` with status 0.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn project_kernel_shell_on_the_console_and_reboot() {
    let dir = TempDir::new("hwkvm-shell");
    let mut vm = Vm::boot(Kernel::Project, &["--cpus".into(), "2".into()], dir.path());
    assert_eq!(vm.sh("echo $((6 * 7))").trim(), "42");
    let (status, output) = vm.shell("ls /nonexistent");
    assert_ne!(status, 0, "{output}");
    vm.type_text("reboot\n");
    let (status, report) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", vm.describe());
    assert_eq!(report["exit"], "guest reset", "{report}");
    assert!(
        vm.console().contains("bulkhead-guest: shutting down"),
        "the guest's own shutdown did not run\n{}",
        vm.describe()
    );
}

/// A stock distribution kernel with ACPI and a plain command line: user
/// space can write to the serial console (IRQ 4 works), and `poweroff`
/// ends `bulkhead run` with status 0.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn stock_kernel_console_and_poweroff_with_acpi() {
    let dir = TempDir::new("hwkvm-stock-acpi");
    let mut vm = Vm::boot(Kernel::Stock, &[], dir.path());
    assert_eq!(vm.sh("echo $((6 * 7))").trim(), "42");
    let serial = vm.sh("cat /proc/tty/driver/serial");
    assert!(serial.contains("irq:4"), "{serial}");
    // COM1 as ACPI describes it (PNP0501), and the ISA interrupts Linux kept.
    let pnp = vm.sh("cat /sys/bus/pnp/devices/*/id");
    assert!(pnp.contains("PNP0501"), "{pnp}");
    let interrupts = vm.sh("cat /proc/interrupts");
    assert!(
        interrupts
            .lines()
            .any(|line| line.contains("4-edge") && line.ends_with("ttyS0")),
        "{interrupts}"
    );
    assert!(interrupts.contains("acpi"), "no SCI: {interrupts}");
    vm.type_text("poweroff\n");
    let (status, report) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", vm.describe());
    assert_eq!(report["exit"], "guest powered off", "{report}");
}

/// Without ACPI (MP table) a stock kernel's power-off is a halt of every
/// CPU: that too ends `bulkhead run` with status 0.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn stock_kernel_poweroff_without_acpi() {
    let dir = TempDir::new("hwkvm-stock-noacpi");
    let mut extra = cmdline("acpi=off");
    extra.extend(["--cpus".into(), "2".into()]);
    let mut vm = Vm::boot(Kernel::Stock, &extra, dir.path());
    vm.type_text("poweroff\n");
    let (status, report) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", vm.describe());
    assert!(
        vm.console().contains("bulkhead-guest: shutting down"),
        "{}",
        vm.describe()
    );
    eprintln!("exit: {}", report["exit"]);
}

/// SMP: user space sees every vCPU and runs on each.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn smp_user_space_runs_on_every_cpu() {
    let dir = TempDir::new("hwkvm-smp");
    // Two, as many as L1 has: a nested guest with more vCPUs than L1 has
    // CPUs made L1's kvm_amd lock up under QEMU TCG.
    let mut vm = Vm::boot(Kernel::Project, &["--cpus".into(), "2".into()], dir.path());
    assert_eq!(vm.sh("nproc").trim(), "2");
    for cpu in 0..2 {
        // Field 39 of /proc/self/stat: the CPU the process last ran on.
        let ran_on = vm.sh(&format!(
            "taskset -c {cpu} sh -c 'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; cut -d\" \" -f39 /proc/self/stat'"
        ));
        assert_eq!(ran_on.trim(), cpu.to_string(), "work pinned to CPU {cpu}");
    }
    // The host's graceful request: this kernel has no ACPI, so the keyboard's
    // Ctrl-Alt-Del, on which busybox init reboots after its shutdown.
    let answer = vm.ctl(&["shutdown"]);
    assert!(answer.contains("ctrl_alt_del"), "{answer}");
    let (status, report) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", vm.describe());
    assert_eq!(report["exit"], "guest reset", "{report}");
    assert!(
        vm.console().contains("bulkhead-guest: shutting down"),
        "{}",
        vm.describe()
    );
}

/// Debian's stock kernel on an ext4 root (its initramfs loads the modules and
/// switches root), shut down by the host through the ACPI power button: the
/// guest's own shutdown runs, a file it wrote is on the host, fsck is clean.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn stock_kernel_on_an_ext4_root_and_the_acpi_power_button() {
    let dir = TempDir::new("hwkvm-stock-root");
    let root = dir.join("root.ext4");
    std::fs::copy(support::image("busybox-root.ext4"), &root).unwrap();
    let mut extra = cmdline("bulkhead.root=/dev/vda");
    extra.extend(["--disk".into(), format!("path={}", root.display())]);
    let mut vm = Vm::boot(Kernel::Stock, &extra, dir.path());
    let mounts = vm.sh("cat /proc/mounts");
    assert!(mounts.contains("/dev/vda / ext4 rw"), "{mounts}");
    vm.sh("echo from-the-stock-kernel > /root/stock && sync");
    let answer = vm.ctl(&["shutdown"]);
    assert!(answer.contains("acpi_power_button"), "{answer}");
    let (status, report) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", vm.describe());
    assert_eq!(report["exit"], "guest powered off", "{report}");
    let console = vm.console();
    assert!(
        console.contains("bulkhead-guest: power button pressed"),
        "{console}"
    );
    assert!(
        console.contains("bulkhead-guest: shutting down"),
        "{console}"
    );
    support::run(std::process::Command::new("e2fsck").arg("-fn").arg(&root));
    let file = support::run(
        std::process::Command::new("debugfs")
            .args(["-R", "cat /root/stock"])
            .arg(&root),
    );
    assert!(file.contains("from-the-stock-kernel"), "{file}");
}

/// A guest kernel panic ends the VM with a non-zero status, reported
/// through pvpanic.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn a_guest_panic_ends_the_vm_through_pvpanic() {
    let dir = TempDir::new("hwkvm-panic");
    let mut vm = Vm::boot(Kernel::Project, &[], dir.path());
    vm.type_text("echo c > /proc/sysrq-trigger\n");
    let (status, report) = vm.wait_exit(EXIT_LIMIT);
    assert_eq!(status.code(), Some(1), "{}", vm.describe());
    assert_eq!(
        report["exit"], "guest kernel panicked (reported through pvpanic)",
        "{report}"
    );
}

/// virtio-blk under user space: an ext4 root written with fsync is on the
/// host after power-off (and fsck-clean), a read-only disk refuses writes
/// with EROFS, discards and fstrim punch holes in the host files.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn virtio_blk_from_user_space() {
    let dir = TempDir::new("hwkvm-blk");
    let root = dir.join("root.ext4");
    std::fs::copy(support::image("busybox-root.ext4"), &root).unwrap();
    let scratch = dir.join("scratch.img");
    std::fs::write(&scratch, vec![0xa5u8; 16 << 20]).unwrap();
    let read_only = dir.join("read-only.ext4");
    std::fs::copy(support::image("busybox-root.ext4"), &read_only).unwrap();
    let read_only_before = std::fs::read(&read_only).unwrap();
    let mut args = Kernel::Project.args();
    args.truncate(2); // the kernel only: the root is the disk
    args.extend(cmdline("root=/dev/vda rw rootfstype=ext4"));
    for disk in [
        format!("path={}", root.display()),
        format!("path={}", scratch.display()),
        format!("path={},readonly", read_only.display()),
    ] {
        args.extend(["--disk".into(), disk]);
    }
    let mut vm = Vm::start(&args, dir.path());
    vm.wait_for("bulkhead-guest: up", support::BOOT_LIMIT);
    vm.wait_for_shell();

    let mounts = vm.sh("cat /proc/mounts");
    assert!(mounts.contains("/dev/root / ext4 rw"), "{mounts}");
    vm.sh("echo written-by-the-guest > /root/note && dd if=/root/note of=/root/copy conv=fsync 2>/dev/null");

    assert_eq!(vm.sh("blockdev --getro /dev/vdc").trim(), "1");
    // Linux refuses writes to a read-only block device with EPERM, and
    // mounts its file system read-only: writing there gives EROFS.
    let (status, output) = vm.shell("dd if=/dev/zero of=/dev/vdc bs=4096 count=1");
    assert_ne!(
        status, 0,
        "a write to the read-only disk succeeded: {output}"
    );
    assert!(output.contains("Operation not permitted"), "{output}");
    vm.sh("mount -t ext4 /dev/vdc /mnt");
    assert!(vm.sh("cat /proc/mounts").contains("/dev/vdc /mnt ext4 ro"));
    let (status, output) = vm.shell("touch /mnt/new-file");
    assert_ne!(status, 0, "{output}");
    assert!(output.contains("Read-only file system"), "{output}");
    vm.sh("umount /mnt");

    let before = support::allocated_bytes(&scratch);
    vm.sh("blkdiscard /dev/vdb");
    let after = support::allocated_bytes(&scratch);
    assert!(
        before >= 16 << 20 && after <= 1 << 20,
        "blkdiscard left {after} of {before} bytes allocated"
    );

    vm.sh("dd if=/dev/urandom of=/root/big bs=1M count=8 conv=fsync 2>/dev/null && rm /root/big && sync");
    let before = support::allocated_bytes(&root);
    let trimmed = vm.sh("fstrim -v /");
    let after = support::allocated_bytes(&root);
    assert!(
        after + (6 << 20) <= before,
        "fstrim ({trimmed}) freed {} bytes of the host file",
        before.saturating_sub(after)
    );

    vm.type_text("reboot\n");
    let (status, _) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", vm.describe());
    assert!(
        std::fs::read(&read_only).unwrap() == read_only_before,
        "the read-only disk changed"
    );
    let note = support::run(
        std::process::Command::new("debugfs")
            .args(["-R", "cat /root/copy"])
            .arg(&root),
    );
    assert!(note.contains("written-by-the-guest"), "{note}");
    support::run(std::process::Command::new("e2fsck").arg("-fn").arg(&root));
}

/// virtio-net under user space, in a network namespace of the test's own:
/// the guest pings the host side of its TAP, moves TCP streams both ways with
/// busybox nc, and a NIC with a bandwidth cap holds it.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn virtio_net_from_user_space() {
    support::in_new_network_namespace(|| {
        use std::io::Write;
        use std::net::{TcpListener, TcpStream};
        const STREAM: usize = 8 << 20;
        const CAP: u64 = 1 << 20;
        let dir = TempDir::new("hwkvm-net");
        let mut extra = vec![
            "--net".to_string(),
            "tap=bhfast0".into(),
            "--net".into(),
            format!("tap=bhslow0,bps={CAP}"),
        ];
        extra.extend(["--memory".into(), "256".into()]);
        let mut vm = Vm::boot(Kernel::Project, &extra, dir.path());
        for (tap, subnet) in [("bhfast0", "10.77.1"), ("bhslow0", "10.77.2")] {
            support::run(std::process::Command::new("ip").args([
                "addr",
                "add",
                &format!("{subnet}.1/24"),
                "dev",
                tap,
            ]));
        }
        vm.sh("ip addr add 10.77.1.2/24 dev eth0 && ip link set eth0 up && ip addr add 10.77.2.2/24 dev eth1 && ip link set eth1 up");
        // Checksum and TSO offloads agreed (feature bits 0, 1, 7, 11).
        let features = vm.sh("cut -c1,2,8,12 /sys/class/net/eth0/device/features");
        assert_eq!(features.trim(), "1111", "virtio-net offloads");
        let ping = vm.sh("ping -c 3 -W 10 10.77.1.1");
        assert!(ping.contains("3 packets received"), "{ping}");

        // Guest → host.
        let receiver = support::receive_stream(TcpListener::bind("10.77.1.1:5001").unwrap());
        vm.sh(&format!(
            "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc 10.77.1.1 5001",
            STREAM / 65536
        ));
        let (received, _) = receiver.wait(support::COMMAND_LIMIT, "guest → host stream");
        assert_eq!(received, STREAM as u64);

        // Host → guest.
        vm.sh("(nc -l -p 5002 < /dev/null | wc -c > /tmp/partial; mv /tmp/partial /tmp/received) & sleep 1");
        let guest = "10.77.1.2:5002".parse().unwrap();
        let mut stream = TcpStream::connect_timeout(&guest, support::COMMAND_LIMIT)
            .unwrap_or_else(|e| panic!("host → guest connection: {e}"));
        stream
            .set_write_timeout(Some(support::COMMAND_LIMIT))
            .unwrap();
        stream
            .write_all(&vec![7u8; STREAM])
            .unwrap_or_else(|e| panic!("host → guest stream stalled: {e}"));
        drop(stream);
        let mut received = String::new();
        for _ in 0..100 {
            received = vm.sh("cat /tmp/received 2>/dev/null; true");
            if !received.trim().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(received.trim(), STREAM.to_string());

        // Through the capped NIC: at most the rate times the time, plus one
        // burst (a second's worth).
        let receiver = support::receive_stream(TcpListener::bind("10.77.2.1:5003").unwrap());
        let capped = 4 * CAP;
        vm.shell_with_limit(
            &format!(
                "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc 10.77.2.1 5003",
                capped / 65536
            ),
            Duration::from_secs(120),
        );
        let (bytes, took) = receiver.wait(support::COMMAND_LIMIT, "capped guest → host stream");
        assert_eq!(bytes, capped);
        let allowed = CAP as f64 * took.as_secs_f64() + CAP as f64;
        assert!(
            bytes as f64 <= allowed * 1.05,
            "{bytes} bytes in {took:?} through a NIC capped at {CAP} B/s"
        );
        eprintln!("capped NIC: {bytes} bytes in {took:?}");
        vm.type_text("reboot -f\n");
        let (status, _) = vm.wait_exit(EXIT_LIMIT);
        assert!(status.success(), "{status}");
    });
}

/// vsock under user space: the guest connects to a host listener, and
/// accepts a host connection; data both ways.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn vsock_from_user_space() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = TempDir::new("hwkvm-vsock");
    let socket = dir.join("vsock.sock");
    let extra = vec![
        "--vsock".to_string(),
        format!("cid=3,socket={}", socket.display()),
    ];
    let mut vm = Vm::boot(Kernel::Project, &extra, dir.path());

    let listener = UnixListener::bind(format!("{}_5000", socket.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream)
            .write_all(format!("host got: {}", line).as_bytes())
            .unwrap();
        line
    });
    let reply = vm.sh("bulkhead-guest-tool vsock-connect 5000 hello-from-guest");
    assert_eq!(host.join().unwrap().trim(), "hello-from-guest");
    assert!(
        reply.contains("vsock reply: host got: hello-from-guest"),
        "{reply}"
    );

    vm.start_detached("bulkhead-guest-tool vsock-serve 6000");
    vm.wait_for("vsock listening on 6000", support::COMMAND_LIMIT);
    let stream = UnixStream::connect(&socket).unwrap();
    (&stream).write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line}");
    (&stream).write_all(b"hello-from-host\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "guest got: hello-from-host");
    vm.wait_for("vsock served: hello-from-host", support::COMMAND_LIMIT);
    vm.type_text("reboot -f\n");
    let (status, _) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}");
}

/// The entropy device reads in user space; the balloon takes memory from
/// the guest (MemTotal falls) and gives it back.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn rng_and_balloon_from_user_space() {
    let dir = TempDir::new("hwkvm-rng-balloon");
    let extra = vec![
        "--rng".to_string(),
        "--balloon".into(),
        "--memory".into(),
        "256".into(),
    ];
    let mut vm = Vm::boot(Kernel::Project, &extra, dir.path());
    assert!(vm
        .sh("cat /sys/class/misc/hw_random/rng_current")
        .contains("virtio_rng"));
    assert_eq!(
        vm.sh("dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c")
            .trim(),
        "64"
    );

    let mem_total_kib = |vm: &mut Vm| -> u64 {
        // A kernel message may come first on the output's line (seen: the
        // clocksource watchdog's): read the number after the label.
        let output = vm.sh("grep MemTotal /proc/meminfo");
        output
            .split("MemTotal:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("MemTotal in {output:?}"))
    };
    let full = mem_total_kib(&mut vm);
    vm.ctl(&["balloon", "64"]);
    let mut now = full;
    for _ in 0..100 {
        now = mem_total_kib(&mut vm);
        if full - now >= 60 << 10 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        full - now >= 60 << 10,
        "MemTotal {full} → {now} KiB after a 64 MiB balloon"
    );
    vm.ctl(&["balloon", "0"]);
    for _ in 0..100 {
        now = mem_total_kib(&mut vm);
        if now == full {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        now, full,
        "the deflated balloon did not give the memory back"
    );
    vm.type_text("reboot -f\n");
    let (status, _) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}");
}

/// The first count a new process printed continues the one before: after at
/// most one line that may have been in flight when the old one stopped.
fn assert_continues(before: &[u64], after: &[u64], what: &str) {
    let last = *before.last().expect("counted before");
    let first = *after.first().expect("counted after");
    assert!(
        first > last && first <= last + 2,
        "{what}: counted to {last}, then went on at {first}"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: a gap or repeat in {after:?}"
    );
}

fn wait_for_counts(vm: &mut Vm, at_least: usize) -> Vec<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let counts = support::counts(&vm.console());
        if counts.len() >= at_least {
            return counts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not count to {at_least}\n{}",
            vm.describe()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Snapshot, restore, clone and live migration of a guest whose user space
/// counts on the console and appends each number to a file on its ext4 root
/// (fdatasync'd): the console goes on without a gap or repeat, and the file
/// holds 1..N exactly and is fsck-clean at the end of each life.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn snapshot_restore_clone_and_migration_keep_counting() {
    let dir = TempDir::new("hwkvm-counting");
    let root = dir.join("root.ext4");
    let life = |name: &str| life_dir(&dir, name);
    let original = start_counting(&counting_args(&root, &[]), &life("original"), 20);

    // Snapshot of a paused VM: the disk stays as the snapshot saw it.
    original.ctl(&["pause"]);
    std::thread::sleep(Duration::from_millis(500));
    let snapshot = dir.join("snapshot");
    original.ctl(&["snapshot", snapshot.to_str().unwrap()]);
    let at_snapshot = support::counts(&original.console());
    drop(original);
    let root_at_snapshot = dir.join("root-at-snapshot.ext4");
    std::fs::copy(&root, &root_at_snapshot).unwrap();

    let restore_args = || vec!["--restore".to_string(), snapshot.display().to_string()];
    let restored_dir = life("restored");
    let mut restored = Vm::start(&restore_args(), &restored_dir);
    let after_restore = wait_for_counts(&mut restored, 20);
    assert_continues(&at_snapshot, &after_restore, "restore");

    // Live migration to another process on this host.
    let (mut migrated, incoming) = incoming_on_this_host(&life("migrated"));
    restored.ctl(&["migrate", &incoming]);
    let (status, _) = restored.wait_exit(EXIT_LIMIT);
    assert!(
        status.success(),
        "the migrated source: {status}\n{}",
        restored.describe()
    );
    let before_migration = support::counts(&restored.console());
    let after_migration = wait_for_counts(&mut migrated, 20);
    assert_continues(&before_migration, &after_migration, "migration");

    stop_counting_and_check(&mut migrated, &root);

    // A clone: the same snapshot again, on the disk as it was then.
    std::fs::copy(&root_at_snapshot, &root).unwrap();
    let clone_dir = life("clone");
    let mut clone = Vm::start(&restore_args(), &clone_dir);
    let clone_counts = wait_for_counts(&mut clone, 10);
    assert_continues(&at_snapshot, &clone_counts, "clone");
    assert_eq!(
        clone_counts[0], after_restore[0],
        "two restores of one snapshot went on differently"
    );
    stop_counting_and_check(&mut clone, &root);
}

/// A fresh copy of the busybox root at `root`, and the arguments of a
/// one-vCPU, 256 MiB project-kernel Linux on it, with `extra`. One vCPU:
/// with two, the counting test intermittently left both of L1's CPUs in a
/// soft lockup inside kvm_amd (QEMU TCG's nested SVM), hanging the whole
/// lane; not understood yet. Two-vCPU snapshots and migration of Linux are
/// covered kernel-side in cli/tests/linux_migration.rs.
fn counting_args(root: &std::path::Path, extra: &[&str]) -> Vec<String> {
    std::fs::copy(support::image("busybox-root.ext4"), root).unwrap();
    let mut args = Kernel::Project.args();
    args.truncate(2);
    args.extend(cmdline("root=/dev/vda rw rootfstype=ext4"));
    args.extend(["--cpus".into(), "1".into(), "--memory".into(), "256".into()]);
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args.extend(["--disk".into(), format!("path={}", root.display())]);
    args
}

/// `dir/name`, made: where one life of a VM keeps its files.
fn life_dir(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(&path).unwrap();
    path
}

/// Boots Linux with `args` and starts the shell counting to /root/count;
/// returns once `counts` numbers are on the console.
fn start_counting(args: &[String], dir: &std::path::Path, counts: usize) -> Vm {
    let mut vm = Vm::start(args, dir);
    vm.wait_for("bulkhead-guest: up", support::BOOT_LIMIT);
    vm.wait_for_shell();
    vm.type_text("bulkhead-guest-tool count /root/count 100 &\n");
    wait_for_counts(&mut vm, counts);
    vm
}

/// A VMM waiting for a migration on a Unix socket in `dir`, and its URI.
fn incoming_on_this_host(dir: &std::path::Path) -> (Vm, String) {
    let socket = dir.join("migration.sock");
    let incoming = format!("unix:{}", socket.display());
    let vm = Vm::start(&["--incoming".into(), incoming.clone()], dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "{}", vm.describe());
        std::thread::sleep(Duration::from_millis(50));
    }
    (vm, incoming)
}

/// Stops the count, reboots (the VMM exits cleanly), and checks the count
/// file on `root` against the console.
fn stop_counting_and_check(vm: &mut Vm, root: &std::path::Path) {
    vm.type_text("kill %1; sleep 1; reboot\n");
    let (status, _) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", vm.describe());
    let last = *support::counts(&vm.console()).last().unwrap();
    check_count_file(root, last);
}

/// A live update: a Linux guest with user space whose RAM is a memfd
/// (`--shared-memory`) moves to a new VMM process on this host over a Unix
/// socket. The memory is handed over, not copied (no page sent), the shell's
/// count goes on without a gap or a repeat, and the disk is consistent.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn a_live_update_hands_a_running_linux_guest_over() {
    let dir = TempDir::new("hwkvm-live-update");
    let root = dir.join("root.ext4");
    let args = counting_args(&root, &["--shared-memory"]);
    let mut old = start_counting(&args, &life_dir(&dir, "old"), 10);
    let (mut new, incoming) = incoming_on_this_host(&life_dir(&dir, "new"));
    let answer = old.ctl(&["migrate", &incoming]);
    println!("hwkvm| live update: {answer}");
    let report: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(report["migration"]["memory_handed_over"], true, "{answer}");
    assert_eq!(report["migration"]["pages_sent"], 0, "{answer}");
    let (status, _) = old.wait_exit(EXIT_LIMIT);
    assert!(
        status.success(),
        "the old VMM: {status}\n{}",
        old.describe()
    );
    let before = support::counts(&old.console());
    let after = wait_for_counts(&mut new, 10);
    assert_continues(&before, &after, "live update");
    stop_counting_and_check(&mut new, &root);
}

/// The count file on the guest's disk holds 1..N with N at least `last_seen`,
/// and the file system is clean.
fn check_count_file(disk: &std::path::Path, last_seen: u64) {
    support::run(std::process::Command::new("e2fsck").arg("-fn").arg(disk));
    let text = support::run(
        std::process::Command::new("debugfs")
            .args(["-R", "cat /root/count"])
            .arg(disk),
    );
    let numbers: Vec<u64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(!numbers.is_empty(), "no counts on disk: {text}");
    for (index, n) in numbers.iter().enumerate() {
        assert_eq!(
            *n,
            index as u64 + 1,
            "the count file has a gap or repeat at line {}",
            index + 1
        );
    }
    assert!(
        *numbers.last().unwrap() >= last_seen,
        "the disk has up to {}, the console showed {last_seen}",
        numbers.last().unwrap()
    );
}

/// The host daemon runs a Linux guest with user space: created and started
/// through the CLI, a command typed through the console attach answers, and
/// the graceful stop makes the guest shut itself down.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn the_daemon_runs_a_guest_with_user_space() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = TempDir::new("hwkvm-daemon");
    let socket = dir.join("api.sock");
    let images = support::image("stock-vmlinuz")
        .parent()
        .unwrap()
        .to_path_buf();
    let mut daemon = Command::new(support::bulkhead_bin());
    daemon
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--allow-dir")
        .arg(&images)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    support::dies_with_test(&mut daemon);
    let mut daemon = KillOnDrop(daemon.spawn().unwrap());
    let daemon_log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    support::collect(
        daemon.0.stderr.take().unwrap(),
        daemon_log.clone(),
        Some("daemon| "),
    );
    let cli = |args: &[&str]| {
        let mut command = Command::new(support::bulkhead_bin());
        command.env("BULKHEAD_SOCKET", &socket).args(args);
        command
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cli(&["vm", "ls"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon_log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    support::run(&mut cli(&[
        "vm",
        "create",
        "linux",
        "--kernel",
        support::image("stock-vmlinuz").to_str().unwrap(),
        "--initrd",
        support::image("stock-busybox.cpio.gz").to_str().unwrap(),
        "--memory",
        "256",
        "--start",
    ]));

    let mut console = cli(&["vm", "console", "linux", "--write"]);
    console
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    support::dies_with_test(&mut console);
    let mut console = KillOnDrop(console.spawn().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    support::collect(
        console.0.stdout.take().unwrap(),
        seen.clone(),
        Some("console| "),
    );
    let mut input = console.0.stdin.take().unwrap();
    let state_dir = dir.join("state");
    // `running`: the VM must not end first (a VM that ended will not print
    // it: say so at once, with why it ended).
    let wait_for = |text: &str, limit: Duration, running: bool| {
        let deadline = std::time::Instant::now() + limit;
        while !seen.lock().unwrap().contains(text) {
            let ended = match running {
                true => vm_exit_reports(&state_dir),
                false => String::new(),
            };
            assert!(
                ended.is_empty(),
                "the VM ended before the console showed '{text}': {ended}\n{}\n--- daemon ---\n{}\n--- VMM ---\n{}",
                seen.lock().unwrap(),
                daemon_log.lock().unwrap(),
                vmm_diagnostics(&state_dir)
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the console did not show '{text}':\n{}\n--- daemon ---\n{}\n--- VMM ---\n{}",
                seen.lock().unwrap(),
                daemon_log.lock().unwrap(),
                vmm_diagnostics(&state_dir)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("guest# ", support::BOOT_LIMIT, true);
    input.write_all(b"echo typed-$((6 * 7))\n").unwrap();
    wait_for("typed-42", support::COMMAND_LIMIT, true);

    support::run(&mut cli(&["vm", "stop", "linux", "--timeout", "60"]));
    wait_for(
        "bulkhead-guest: power button pressed",
        support::COMMAND_LIMIT,
        false,
    );
    wait_for(
        "bulkhead-guest: shutting down",
        support::COMMAND_LIMIT,
        false,
    );
    let shown = support::run(&mut cli(&["vm", "show", "linux", "--output", "json"]));
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["state"], "stopped", "{shown}");
    drop(input);
}

/// The exit reports the daemon's VMMs wrote (empty while every VM runs).
fn vm_exit_reports(state_dir: &std::path::Path) -> String {
    let Ok(vms) = std::fs::read_dir(state_dir.join("vms")) else {
        return String::new();
    };
    vms.flatten()
        .filter_map(|vm| std::fs::read_to_string(vm.path().join("exit-report.json")).ok())
        .filter(|report| !report.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the daemon's VMMs say of themselves: their logs, their live status
/// (vCPU exits, device counters) and where each of their threads waits.
fn vmm_diagnostics(state_dir: &std::path::Path) -> String {
    let mut text = String::new();
    let Ok(vms) = std::fs::read_dir(state_dir.join("vms")) else {
        return "no VM directories".into();
    };
    for vm in vms.flatten() {
        let dir = vm.path();
        text += &format!("{}:\n", dir.display());
        text += &std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
        let status = std::process::Command::new(support::bulkhead_bin())
            .arg("ctl")
            .arg(dir.join("jail/control.sock"))
            .arg("status")
            .output();
        if let Ok(status) = status {
            text += &String::from_utf8_lossy(&status.stdout);
            text += &String::from_utf8_lossy(&status.stderr);
        }
    }
    text += &support::kvm_shutdown_exits();
    text.push('\n');
    if let Ok(processes) = std::fs::read_dir("/proc") {
        for process in processes.flatten() {
            let cmdline = std::fs::read(process.path().join("cmdline")).unwrap_or_default();
            if !String::from_utf8_lossy(&cmdline).contains("--launch-fd") {
                continue;
            }
            let Ok(tasks) = std::fs::read_dir(process.path().join("task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let read = |name: &str| {
                    std::fs::read_to_string(task.path().join(name)).unwrap_or_default()
                };
                text += &format!(
                    "thread {} waits in {} ({})\n",
                    read("comm").trim(),
                    read("wchan").trim(),
                    read("stat").split_whitespace().nth(2).unwrap_or("?")
                );
            }
        }
    }
    text
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lane's figures, side by side in one L1 (absolute times under
/// emulation mean little; the ratios do). Not part of the lane's run:
/// `cargo xtask hwkvm figures --nocapture`.
#[test]
#[ignore = "a benchmark: cargo xtask hwkvm figures --nocapture"]
fn figures() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    use std::time::Instant;
    fn median(mut values: Vec<f64>) -> f64 {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }
    let dir = TempDir::new("hwkvm-figures");

    // Boot to the user-space shell's first words: Bulkhead and QEMU-KVM with
    // the same stock kernel and initramfs, 1 vCPU, 256 MiB.
    let boot_bulkhead = || {
        let started = Instant::now();
        let mut args = Kernel::Stock.args();
        args.extend(["--memory".into(), "256".into()]);
        let mut vm = Vm::start(&args, dir.path());
        vm.wait_for("bulkhead-guest: up", support::BOOT_LIMIT);
        started.elapsed().as_secs_f64()
    };
    let qemu = std::path::Path::new("/usr/bin/qemu-system-x86_64");
    let boot_qemu = || {
        let started = Instant::now();
        let mut command = Command::new(qemu);
        command
            .args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1"])
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(support::image("stock-vmlinuz"))
            .arg("-initrd")
            .arg(support::image("stock-busybox.cpio.gz"))
            .args(["-append", "console=ttyS0 reboot=k panic=-1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        support::dies_with_test(&mut command);
        let mut child = command.spawn().expect("qemu-system-x86_64");
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("bulkhead-guest: up") {
            let n = stdout.read(&mut buffer).unwrap();
            assert!(n > 0, "QEMU ended: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buffer[..n]);
        }
        let took = started.elapsed().as_secs_f64();
        let _ = child.kill();
        let _ = child.wait();
        took
    };
    // Each boot says how long it took: progress for whoever watches, and
    // the lane's sign of life (QEMU's console is read here, not shown).
    let timed = |what: &str, boot: &dyn Fn() -> f64| {
        (1..=3)
            .map(|i| {
                let took = boot();
                println!("figures: {what} boot {i} of 3: {took:.1} s");
                took
            })
            .collect::<Vec<_>>()
    };
    let bulkhead_boot = median(timed("Bulkhead", &boot_bulkhead));
    let qemu_boot = if qemu.exists() {
        Some(median(timed("QEMU-KVM", &boot_qemu)))
    } else {
        None
    };

    // The embedded guest: process start to exit.
    let embedded = median(
        (0..5)
            .map(|_| {
                let started = Instant::now();
                support::run(Command::new(support::bulkhead_bin()).arg("run"));
                started.elapsed().as_secs_f64()
            })
            .collect(),
    );

    // TCP guest → host over a TAP vs host loopback, and sequential disk
    // writes in the guest (raw virtio-blk) vs the same file from the host.
    let (guest_tcp, loopback_tcp, guest_disk, host_disk) =
        support::in_new_network_namespace(move || {
            const BYTES: usize = 64 << 20;
            let dir = TempDir::new("hwkvm-figures-io");
            let disk = dir.join("disk.img");
            std::fs::write(&disk, vec![0u8; BYTES + (1 << 20)]).unwrap();
            let extra = vec![
                "--net".to_string(),
                "tap=bhbench0".into(),
                "--disk".into(),
                format!("path={}", disk.display()),
                "--memory".into(),
                "256".into(),
            ];
            let mut vm = Vm::boot(Kernel::Project, &extra, dir.path());
            support::run(Command::new("ip").args([
                "addr",
                "add",
                "10.78.0.1/24",
                "dev",
                "bhbench0",
            ]));
            vm.sh("ip addr add 10.78.0.2/24 dev eth0 && ip link set eth0 up");
            let receive = |address: &str| {
                let listener = std::net::TcpListener::bind(address).unwrap();
                std::thread::spawn(move || {
                    let (mut stream, _) = listener.accept().unwrap();
                    let started = Instant::now();
                    let mut buffer = vec![0u8; 1 << 20];
                    let mut total = 0;
                    loop {
                        let n = stream.read(&mut buffer).unwrap();
                        if n == 0 {
                            break;
                        }
                        total += n;
                    }
                    total as f64 / started.elapsed().as_secs_f64() / 1e6
                })
            };
            let receiver = receive("10.78.0.1:5100");
            vm.shell_with_limit(
                &format!(
                    "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc 10.78.0.1 5100",
                    BYTES / 65536
                ),
                Duration::from_secs(300),
            );
            let guest_tcp = receiver.join().unwrap();
            let receiver = receive("127.0.0.1:5101");
            let mut stream = std::net::TcpStream::connect("127.0.0.1:5101").unwrap();
            let chunk = vec![0u8; 65536];
            for _ in 0..BYTES / 65536 {
                stream.write_all(&chunk).unwrap();
            }
            drop(stream);
            let loopback_tcp = receiver.join().unwrap();

            // busybox dd prints no timing: wall time around it (a console
            // round trip, milliseconds, is included for the guest).
            let write = format!(
                "dd if=/dev/zero of=/dev/vda bs=1M count={} conv=fsync 2>/dev/null",
                BYTES >> 20
            );
            let started = Instant::now();
            vm.sh(&write);
            let guest_disk = BYTES as f64 / started.elapsed().as_secs_f64() / 1e6;
            vm.type_text("reboot -f\n");
            let _ = vm.wait_exit(EXIT_LIMIT);
            let started = Instant::now();
            support::run(Command::new("sh").args([
                "-c",
                &format!(
                    "dd if=/dev/zero of={} bs=1M count={} conv=fsync,notrunc 2>/dev/null",
                    disk.display(),
                    BYTES >> 20
                ),
            ]));
            let host_disk = BYTES as f64 / started.elapsed().as_secs_f64() / 1e6;
            (guest_tcp, loopback_tcp, guest_disk, host_disk)
        });

    println!("figures (inside the lane's KVM; ratios matter):");
    match qemu_boot {
        Some(qemu_boot) => println!(
            "  boot to user space, stock kernel, 1 vCPU, 256 MiB (median of 3): bulkhead {bulkhead_boot:.2} s, qemu-kvm {qemu_boot:.2} s (ratio {:.2})",
            bulkhead_boot / qemu_boot
        ),
        None => println!(
            "  boot to user space, stock kernel (median of 3): bulkhead {bulkhead_boot:.2} s (no QEMU here)"
        ),
    }
    println!(
        "  embedded guest, process start to exit (median of 5): {:.1} ms",
        embedded * 1e3
    );
    println!(
        "  TCP guest → host: {guest_tcp:.0} MB/s; host loopback: {loopback_tcp:.0} MB/s (ratio {:.2})",
        guest_tcp / loopback_tcp
    );
    println!(
        "  sequential write, 64 MiB, fsync: guest (virtio-blk, raw file) {guest_disk:.0} MB/s; host, same file {host_disk:.0} MB/s (ratio {:.2})",
        guest_disk / host_disk
    );
}
