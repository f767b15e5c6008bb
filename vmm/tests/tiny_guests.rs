//! Tiny guests of our own (the `guests` crate) on real KVM: one per VM exit
//! path, and one per instruction the VMM finishes for KVM's emulator.

mod common;

use std::time::Duration;

use common::{config_for, run_config, run_guest, Outcome};
use vmm::host::KvmFlavour;
use vmm::VmExit;

fn run_test_guest(name: &str) -> Outcome {
    let image = guests::test_guest(name)
        .expect("the guest exists")
        .expect("the guest assembles");
    run_guest(name, image)
}

/// The guest printed `PASS name` and powered off.
fn assert_passes(name: &str) -> Outcome {
    let outcome = run_test_guest(name);
    assert!(
        outcome.output.contains(&format!("PASS {name}")),
        "guest {name} did not pass; serial output:\n{}\nexit: {}",
        outcome.output,
        outcome.report.exit
    );
    assert_eq!(outcome.report.exit, VmExit::PowerOff);
    outcome
}

#[test]
fn default_guest_reports_cpus_and_memory_and_powers_off() {
    let mut config = config_for("default", guests::default_guest().unwrap());
    config.machine.cpus = 3;
    config.machine.memory_mib = 96;
    let outcome = run_config(&config, Duration::from_secs(20));
    assert_eq!(outcome.report.exit, VmExit::PowerOff, "{}", outcome.output);
    assert!(
        outcome.output.starts_with(guests::BANNER),
        "{}",
        outcome.output
    );
    assert!(
        outcome.output.contains("cpus: 3, memory: 96 MiB"),
        "{}",
        outcome.output
    );
    assert!(outcome.output.contains("MMIO: pvpanic register reads 3"));
    assert!(outcome.report.first_post_code_ns.is_some());
    let boot = &outcome.report.vcpus[0].exits;
    assert!(boot.mmio_read >= 1 && boot.io_in >= 1, "{boot:?}");
}

#[test]
fn port_io_exits() {
    let outcome = assert_passes("port_io");
    let exits = &outcome.report.vcpus[0].exits;
    assert!(exits.io_in >= 3 && exits.io_out >= 2, "{exits:?}");
}

#[test]
fn mmio_exit() {
    let outcome = assert_passes("mmio");
    assert!(outcome.report.vcpus[0].exits.mmio_read >= 1);
}

#[test]
fn hlt_wakes_on_the_lapic_timer() {
    assert_passes("hlt_timer");
}

#[test]
fn i8042_reset_ends_the_vm_as_a_reset() {
    let outcome = run_test_guest("reset");
    assert_eq!(outcome.report.exit, VmExit::Reset);
    assert!(outcome.report.exit.is_clean());
}

#[test]
fn triple_fault_ends_the_vm_unclean() {
    let outcome = run_test_guest("triple_fault");
    assert_eq!(outcome.report.exit, VmExit::TripleFault { vcpu: 0 });
    assert!(!outcome.report.exit.is_clean());
}

#[test]
fn pvpanic_ends_the_vm_as_a_guest_panic() {
    let outcome = run_test_guest("panic");
    assert_eq!(outcome.report.exit, VmExit::GuestPanic);
    assert!(!outcome.report.exit.is_clean());
}

#[test]
fn a_spinning_guest_is_stopped_by_the_host() {
    let image = guests::test_guest("spin").unwrap().unwrap();
    let outcome = run_config(&config_for("spin", image), Duration::from_millis(300));
    assert!(outcome.output.contains("spinning"));
    assert_eq!(outcome.report.exit, VmExit::Stopped);
}

#[test]
fn a_guest_halted_for_good_ends_the_vm_cleanly() {
    let image = guests::test_guest("halt").unwrap().unwrap();
    let outcome = run_config(&config_for("halt", image), Duration::from_secs(10));
    assert!(outcome.output.contains("halting"), "{}", outcome.output);
    assert_eq!(outcome.report.exit, VmExit::Halted);
    assert!(outcome.report.exit.is_clean());
}

#[test]
fn a_vcpu_waiting_for_its_start_up_ipi_is_not_halted() {
    // The boot CPU halts for good; the second never gets its INIT/SIPI.
    let image = guests::test_guest("halt").unwrap().unwrap();
    let mut config = config_for("halt", image);
    config.machine.cpus = 2;
    let outcome = run_config(&config, Duration::from_millis(1500));
    assert!(outcome.output.contains("halting"), "{}", outcome.output);
    assert_eq!(outcome.report.exit, VmExit::Stopped);
}

/// The host's graceful shutdown: a guest without ACPI never arms the power
/// button, so it gets Ctrl-Alt-Del (the echo guest powers off on it).
#[test]
fn shutdown_falls_back_to_ctrl_alt_del_when_the_power_button_is_not_armed() {
    use vmm::control::ShutdownMethod;
    let config = config_for("console_echo", guests::console_echo().unwrap());
    let capture = common::Capture::default();
    let vm = vmm::Vm::new(&config, Box::new(capture.clone())).expect("VM builds");
    let running = vm.start().expect("VM starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !capture.text().contains(guests::CONSOLE_ECHO_READY) {
        assert!(std::time::Instant::now() < deadline, "{}", capture.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let control = running.control();
    assert!(!control.power_button_armed());
    assert!(!control.press_power_button(), "pressed, nobody listens");
    assert!(!running.exit_signal().is_requested());
    assert_eq!(control.shutdown(), ShutdownMethod::CtrlAltDel);
    let exit = running.exit_signal();
    while !exit.is_requested() {
        assert!(std::time::Instant::now() < deadline, "{}", capture.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = running.wait();
    assert_eq!(report.exit, VmExit::PowerOff, "{}", capture.text());
}

/// Runs an instruction guest; on a kvm_pvm host the VMM must have finished
/// the instruction (KVM's emulator gives up on it there).
fn assert_instruction(name: &str, mnemonics: &[&str]) {
    let outcome = assert_passes(name);
    if KvmFlavour::detect() == KvmFlavour::Pvm {
        for mnemonic in mnemonics {
            assert!(
                outcome.emulated(mnemonic) >= 1,
                "{mnemonic} was not finished by the VMM: {:?}",
                outcome.report.vcpus[0].emulated
            );
        }
    }
}

#[test]
fn int3_is_a_breakpoint_trap() {
    assert_instruction("int3", &["int3"]);
}

#[test]
fn popcnt_including_a_page_crossing_operand() {
    assert_instruction("popcnt", &["popcnt"]);
}

#[test]
fn xgetbv() {
    assert_instruction("xgetbv", &["xgetbv"]);
}

#[test]
fn clac_and_stac() {
    assert_instruction("clac_stac", &["clac", "stac"]);
}

#[test]
fn lock_cmpxchg16b() {
    assert_instruction("cmpxchg16b", &["cmpxchg16b"]);
}

#[test]
fn xsave_family_including_a_page_crossing_area() {
    assert_instruction("xsave_xrstor", &["xgetbv", "xrstor64", "xsave64"]);
}

#[test]
fn ldmxcsr_and_stmxcsr() {
    assert_instruction("ldmxcsr_stmxcsr", &["ldmxcsr", "stmxcsr"]);
}

#[test]
fn fwait_without_pending_exception() {
    assert_instruction("fwait", &["wait"]);
}

/// KVM's emulator on kvm_pvm hosts implements fxsave/fxrstor and rdrand
/// itself; the VMM's versions are then unit-tested only.
#[test]
fn fxsave_and_fxrstor() {
    assert_passes("fxsave_fxrstor");
}

#[test]
fn rdrand() {
    assert_passes("rdrand");
}

/// KVM's emulator on kvm_pvm hosts runs `lzcnt`/`tzcnt` as `bsr`/`bsf`
/// (it ignores the F3 prefix) without exiting to the VMM, so the guest sees
/// wrong results the VMM cannot correct (docs/host-kvm.md). The test runs
/// where the CPU executes them: the hardware-KVM lane runs it (it runs this
/// binary's ignored tests too).
#[test]
#[ignore = "needs a CPU that runs lzcnt; kvm_pvm runs it as bsr. Run by the hardware-KVM lane"]
fn lzcnt_and_tzcnt() {
    assert_passes("lzcnt");
    assert_passes("tzcnt");
}

#[test]
fn an_instruction_nobody_emulates_stops_the_vm_naming_it() {
    let outcome = run_test_guest("unhandled");
    if KvmFlavour::detect() == KvmFlavour::Hardware {
        // The CPU runs aesenc itself: nothing is left for anyone to
        // emulate, and the guest goes on to say so and power off.
        assert!(outcome.output.contains("aesenc ran"), "{}", outcome.output);
        assert_eq!(outcome.report.exit, VmExit::PowerOff);
        return;
    }
    let VmExit::Fatal(reason) = &outcome.report.exit else {
        panic!("expected a fatal exit, got {}", outcome.report.exit);
    };
    assert!(reason.contains("66 0f 38 dc c1"), "{reason}");
    assert!(reason.contains("aesenc"), "{reason}");
    assert!(reason.contains("RIP 0x"), "{reason}");
}

/// A guest of our own drives virtio-blk through virtio-mmio, ioeventfd and
/// the device thread: random writes, each sector landing in the host file
/// where the guest sent it (and nowhere else); then random reads of a file
/// the test numbered, each sector coming back from where the guest asked
/// (the guest checks it).
#[test]
fn virtio_blk_serves_a_tiny_guest_driver() {
    const DISK_BYTES: u64 = 8 << 20;
    let dir = testkit::TempDir::new("tiny-blk");
    let disk = dir.path().join("disk.img");
    let file = std::fs::File::create(&disk).unwrap();
    file.set_len(DISK_BYTES).unwrap();
    for write in [true, false] {
        let workload = guests::BlockWorkload {
            requests: 32,
            request_bytes: 4096,
            write,
            random: true,
            batch: 8,
            disk_sectors: DISK_BYTES / 512,
            check_data: true,
        };
        if !write {
            let numbered: Vec<u8> = (0..DISK_BYTES / 512)
                .flat_map(guests::numbered_sector)
                .collect();
            std::fs::write(&disk, numbered).unwrap();
        }
        let mut config = config_for("virtio_blk", guests::block_workload(workload).unwrap());
        config.machine.disks.push(vmm::config::DiskSpec {
            path: disk.clone(),
            readonly: false,
            id: None,
            rate_limit: Default::default(),
        });
        let outcome = run_config(&config, Duration::from_secs(60));
        assert!(
            outcome.output.contains("PASS virtio_blk"),
            "{}\nexit: {}",
            outcome.output,
            outcome.report.exit
        );
        let counters = &outcome.report.devices[0].counters;
        assert_eq!(counters["requests"], 32, "{counters:?}");
        // 4 notifications went to KVM's ioeventfd, not to the VMM: only the
        // set-up register writes exit (about 20).
        let mmio_writes: u64 = outcome
            .report
            .vcpus
            .iter()
            .map(|v| v.exits.mmio_write)
            .sum();
        assert!(mmio_writes < 24, "{mmio_writes} MMIO write exits");
        let moved = if write {
            counters["bytes_written"]
        } else {
            counters["bytes_read"]
        };
        assert_eq!(moved, 32 * 4096, "{counters:?}");
        assert_eq!(counters["errors"], 0);
        let contents = std::fs::read(&disk).unwrap();
        if write {
            // Exactly the sectors the guest wrote hold their numbers; every
            // other sector is still zero.
            let written: std::collections::BTreeSet<u64> = workload
                .request_sectors()
                .iter()
                .flat_map(|&first| first..first + 8)
                .collect();
            for (sector, bytes) in contents.chunks(512).enumerate() {
                let sector = sector as u64;
                let expected = match written.contains(&sector) {
                    true => guests::numbered_sector(sector),
                    false => [0; 512],
                };
                assert!(
                    bytes == expected,
                    "sector {sector} holds {:?}",
                    &bytes[..16]
                );
            }
        } else {
            // Reads leave the file as it was.
            assert_eq!(contents.len() as u64, DISK_BYTES);
            assert_eq!(&contents[512 * 5..512 * 6], &guests::numbered_sector(5)[..]);
        }
    }
}

/// A guest of our own transmits frames through virtio-net to a TAP device in
/// a network namespace this test creates (it disappears with the thread).
#[test]
fn virtio_net_carries_a_tiny_guest_frames_to_the_tap() {
    let outcome = std::thread::spawn(|| {
        // SAFETY: unshare on this thread only; the VM's threads inherit it.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(unshared, 0, "needs root");
        let workload = guests::NetWorkload {
            frames: 64,
            frame_bytes: 60,
            batch: 16,
        };
        let mut config = config_for("virtio_net", guests::net_workload(workload).unwrap());
        config.machine.nics.push(vmm::config::NicSpec {
            tap: "tinynet0".into(),
            mac: None,
            rate_limit: Default::default(),
        });
        run_config(&config, Duration::from_secs(60))
    })
    .join()
    .unwrap();
    assert!(
        outcome.output.contains("PASS virtio_net"),
        "{}",
        outcome.output
    );
    let counters = &outcome.report.devices[0].counters;
    assert_eq!(counters["tx_frames"], 64, "{counters:?}");
    assert_eq!(counters["tx_bytes"], 64 * 60, "{counters:?}");
    assert_eq!(counters["tx_errors"], 0, "{counters:?}");
}

/// A guest of our own speaks virtio-vsock: its connection to a host port
/// reaches the Unix listener for that port, and a host program's
/// `CONNECT <port>` reaches the guest; data crosses both ways on both.
#[test]
fn virtio_vsock_carries_a_tiny_guest_connections_both_ways() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    const CID: u64 = 5;
    let dir = testkit::TempDir::new("tiny-vsock");
    let socket = dir.path().join("v.sock");
    let listener =
        UnixListener::bind(format!("{}_{}", socket.display(), guests::VSOCK_HOST_PORT)).unwrap();
    let host_socket = socket.clone();
    let host = std::thread::spawn(move || {
        // The guest's connection: "hello" in, "world" out.
        let (mut from_guest, _) = listener.accept().unwrap();
        from_guest
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut hello = [0u8; 5];
        from_guest.read_exact(&mut hello).unwrap();
        from_guest.write_all(b"world").unwrap();
        // Our connection to the guest's port.
        let mut to_guest = UnixStream::connect(&host_socket).unwrap();
        to_guest
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        to_guest
            .write_all(format!("CONNECT {}\n", guests::VSOCK_GUEST_PORT).as_bytes())
            .unwrap();
        let mut reader = BufReader::new(to_guest);
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        let mut pong = [0u8; 4];
        reader.read_exact(&mut pong).unwrap();
        (hello, ok, pong)
    });
    let mut config = config_for("virtio_vsock", guests::vsock_workload(CID).unwrap());
    config.machine.vsock = Some(vmm::config::VsockSpec {
        cid: CID as u32,
        socket: Some(socket),
    });
    let outcome = run_config(&config, Duration::from_secs(60));
    assert!(
        outcome.output.contains("PASS virtio_vsock"),
        "{}\nexit: {}",
        outcome.output,
        outcome.report.exit
    );
    let (hello, ok, pong) = host.join().unwrap();
    assert_eq!(&hello, b"hello");
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    assert_eq!(&pong, b"pong");
    let counters = &outcome.report.devices[0].counters;
    assert_eq!(
        (
            counters["connections_from_guest"],
            counters["connections_from_host"]
        ),
        (1, 1),
        "{counters:?}"
    );
    assert_eq!(
        (counters["bytes_to_host"], counters["bytes_to_guest"]),
        (5 + 4, 5),
        "{counters:?}"
    );
}

/// The same guest driver writing to a read-only disk: every request comes
/// back with the virtio error status (the guest reports status 1), and the
/// host file is untouched.
#[test]
fn a_read_only_disk_refuses_a_tiny_guest_writes_with_the_error_status() {
    let dir = testkit::TempDir::new("tiny-blk-ro");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0x77u8; 1 << 20]).unwrap();
    let workload = guests::BlockWorkload {
        requests: 8,
        request_bytes: 4096,
        write: true,
        random: false,
        batch: 4,
        disk_sectors: (1 << 20) / 512,
        check_data: false,
    };
    let mut config = config_for("virtio_blk", guests::block_workload(workload).unwrap());
    config.machine.disks.push(vmm::config::DiskSpec {
        path: disk.clone(),
        readonly: true,
        id: None,
        rate_limit: Default::default(),
    });
    let outcome = run_config(&config, Duration::from_secs(60));
    assert!(
        outcome
            .output
            .contains("FAIL virtio_blk: status of the last request (got 0x0000000000000001)"),
        "{}",
        outcome.output
    );
    let counters = &outcome.report.devices[0].counters;
    assert_eq!(
        (
            counters["requests"],
            counters["errors"],
            counters["bytes_written"]
        ),
        (8, 8, 0),
        "{counters:?}"
    );
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x77));
}

/// Frames the host sends into the TAP reach a guest of our own through
/// virtio-net's receive queue; the guest gives its buffers back as it goes.
#[test]
fn virtio_net_delivers_frames_from_the_tap_to_a_tiny_guest() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let outcome = std::thread::spawn(|| {
        // SAFETY: unshare on this thread only; the VM's threads inherit it.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(unshared, 0, "needs root");
        let mut config = config_for("virtio_net", guests::net_receive_workload(200).unwrap());
        config.machine.nics.push(vmm::config::NicSpec {
            tap: "tinynet1".into(),
            mac: None,
            rate_limit: Default::default(),
        });
        let console = common::Capture::default();
        let vm = vmm::Vm::new(&config, Box::new(console.clone())).unwrap();
        let running = vm.start().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                vmm::devices::virtio::testing::inject_frames("tinynet1", 60, &stop).unwrap()
            })
        };
        let exit = running.exit_signal();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !exit.is_requested() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        running.stop();
        let report = running.wait();
        stop.store(true, Ordering::Relaxed);
        (report, sender.join().unwrap(), console.text())
    })
    .join()
    .unwrap();
    let (report, sent, console) = outcome;
    assert_eq!(
        report.exit,
        VmExit::PowerOff,
        "the guest did not receive 200 frames: {console}"
    );
    assert!(console.contains("PASS virtio_net"), "{console}");
    let counters = &report.devices[0].counters;
    assert!(
        counters["rx_frames"] >= 200 && sent >= counters["rx_frames"],
        "{counters:?}, sent {sent}"
    );
}
