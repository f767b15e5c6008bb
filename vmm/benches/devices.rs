//! Device figures (`cargo bench -p vmm --bench devices`):
//! - virtio-blk sequential MB/s and random 4 KiB IOPS, driven by a guest of
//!   our own (`guests::block_workload`) through virtio-mmio, ioeventfd and
//!   the device thread, next to the same workload on the host file directly;
//! - virtio-net packets/s and MB/s from a guest of our own to a TAP
//!   (`guests::net_workload`) and from a TAP into it
//!   (`guests::net_receive_workload`), next to UDP over host loopback;
//! - the VMM's cost per descriptor chain, driving device queues from the
//!   host side (no guest): block 4 KiB read, rng 64 bytes, net 64-byte
//!   frame to a TAP (in a network namespace of the bench's own).
//!
//! Machines are noisy: compare figures from one run with each other.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::config::{DiskSpec, NicSpec};
use vmm::devices::virtio::testing::{TestQueue, DATA};
use vmm::devices::virtio::{
    block::Block, net::Net, rng::Rng, Activation, DetachedEvents, Interrupt, VirtioDevice,
};
use vmm::{KernelSource, Vm, VmConfig, VmExit};

const DISK_BYTES: u64 = 64 << 20;

fn main() {
    println!(
        "bulkhead device figures (host KVM: {:?})",
        vmm::host::KvmFlavour::detect()
    );
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0x5au8; DISK_BYTES as usize]).unwrap();
    block_through_guest(&disk);
    net_through_guest();
    per_chain_costs(&disk);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VM for one of our guests, 64 MiB, no command line.
fn guest_config(name: &str, image: Vec<u8>) -> VmConfig {
    let mut config = VmConfig::new(KernelSource::Bytes {
        name: name.into(),
        image: image.into(),
    });
    config.machine.cmdline = Some(String::new());
    config.machine.memory_mib = 64;
    config
}

/// Runs `config` to its end; checks the guest powered off after printing
/// PASS; returns the VM's wall time and report.
fn run_guest(config: &VmConfig) -> (Duration, vmm::VmReport) {
    let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let started = Instant::now();
    let vm = Vm::new(config, Box::new(Sink(output.clone()))).unwrap();
    let report = vm.start().unwrap().wait();
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    assert!(
        report.exit == VmExit::PowerOff && text.contains("PASS"),
        "{text} {}",
        report.exit
    );
    (elapsed, report)
}

/// Runs `f` on a thread in a network namespace of its own (TAPs made there
/// vanish with it; threads it starts share it).
fn in_own_network_namespace<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare on this thread only; it takes flags only.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(unshared, 0, "needs root");
        f()
    })
    .join()
    .unwrap()
}

fn tap(name: &str) -> NicSpec {
    NicSpec {
        tap: name.into(),
        mac: None,
        rate_limit: Default::default(),
    }
}

/// Runs a block workload guest; returns the wall time of the VM.
fn run_block_guest(disk: &Path, workload: guests::BlockWorkload) -> Duration {
    let mut config = guest_config("virtio_blk", guests::block_workload(workload).unwrap());
    config.machine.disks.push(DiskSpec {
        path: disk.to_path_buf(),
        readonly: false,
        id: None,
        rate_limit: Default::default(),
    });
    run_guest(&config).0
}

/// The same requests on the host file with pread/pwrite.
fn run_on_host_file(disk: &Path, w: guests::BlockWorkload) -> Duration {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let mut buffer = vec![0u8; w.request_bytes as usize];
    let slots = DISK_BYTES / u64::from(w.request_bytes);
    let mut state = 0u64;
    let started = Instant::now();
    for i in 0..u64::from(w.requests) {
        let slot = if w.random {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) & (slots - 1)
        } else {
            i % slots
        };
        let offset = slot * u64::from(w.request_bytes);
        if w.write {
            file.write_all_at(&buffer, offset).unwrap();
        } else {
            file.read_exact_at(&mut buffer, offset).unwrap();
        }
    }
    started.elapsed()
}

fn block_through_guest(disk: &Path) {
    let workload = |requests, request_bytes, write, random| guests::BlockWorkload {
        requests,
        request_bytes,
        write,
        random,
        batch: 8,
        disk_sectors: DISK_BYTES / 512,
        check_data: false,
    };
    // Start-up and power-off alone, subtracted from every run.
    let baseline = (0..3)
        .map(|_| run_block_guest(disk, workload(0, 4096, false, false)))
        .min()
        .unwrap();
    println!("  virtio-blk driven by a guest of our own (batches of 8), page-cached 64 MiB file:");
    println!(
        "    {:<34} {:>14} {:>14} {:>7}",
        "", "through device", "host file", "ratio"
    );
    for (label, requests, bytes, write, random) in [
        (
            "sequential read, 64 KiB requests",
            4096u32,
            65536u32,
            false,
            false,
        ),
        (
            "sequential write, 64 KiB requests",
            4096,
            65536,
            true,
            false,
        ),
        ("random read, 4 KiB", 16384, 4096, false, true),
        ("random write, 4 KiB", 16384, 4096, true, true),
    ] {
        let w = workload(requests, bytes, write, random);
        // Best of three: the work is short next to a noisy VM start-up.
        let guest = (0..3)
            .map(|_| run_block_guest(disk, w).saturating_sub(baseline))
            .min()
            .unwrap()
            .as_secs_f64();
        let host = (0..3)
            .map(|_| run_on_host_file(disk, w))
            .min()
            .unwrap()
            .as_secs_f64();
        let total = f64::from(requests) * f64::from(bytes);
        let (through, direct, unit) = if random {
            (
                f64::from(requests) / guest,
                f64::from(requests) / host,
                "IOPS",
            )
        } else {
            (total / guest / 1e6, total / host / 1e6, "MB/s")
        };
        println!(
            "    {label:<34} {through:>9.0} {unit:<4} {direct:>9.0} {unit:<4} {:>6.1}%",
            100.0 * through / direct
        );
    }
}

/// Runs a transmit workload guest in a network namespace of its own; returns
/// the VM's wall time.
fn run_net_guest(workload: guests::NetWorkload) -> Duration {
    in_own_network_namespace(move || {
        let mut config = guest_config("virtio_net", guests::net_workload(workload).unwrap());
        config.machine.nics.push(tap("bench0"));
        let (elapsed, report) = run_guest(&config);
        let whole_batches = workload.frames / u32::from(workload.batch) * u32::from(workload.batch);
        assert_eq!(
            report.devices[0].counters["tx_frames"],
            u64::from(whole_batches)
        );
        elapsed
    })
}

/// Frames per second of `frames` UDP datagrams of `bytes` over loopback.
fn loopback_udp(frames: u32, bytes: usize) -> f64 {
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sender.connect(receiver.local_addr().unwrap()).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let payload = vec![0u8; bytes];
    let mut buffer = vec![0u8; 2048];
    let started = Instant::now();
    for _ in 0..frames {
        sender.send(&payload).unwrap();
        let _ = receiver.recv(&mut buffer);
    }
    f64::from(frames) / started.elapsed().as_secs_f64()
}

/// Runs the receive workload guest while a thread sends frames into its TAP;
/// returns the VM's wall time.
fn run_net_receive_guest(frames: u32, frame_bytes: usize) -> Duration {
    in_own_network_namespace(move || {
        let mut config = guest_config("virtio_net", guests::net_receive_workload(frames).unwrap());
        config.machine.nics.push(tap("bench1"));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The TAP exists once the VM is built; until then the sender retries.
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || loop {
                match vmm::devices::virtio::testing::inject_frames("bench1", frame_bytes, &stop) {
                    Ok(sent) => return sent,
                    Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => return 0,
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            })
        };
        let (elapsed, _) = run_guest(&config);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sender.join().unwrap();
        elapsed
    })
}

/// One row of packet rates: through the device, and UDP over loopback with
/// datagrams that make Ethernet frames of the same size.
fn print_packet_rates(frames: u32, frame_bytes: u32, guest: Duration) {
    let pps = f64::from(frames) / guest.as_secs_f64();
    // 14 + 20 + 8 bytes of Ethernet, IP and UDP headers.
    let host = loopback_udp(frames, frame_bytes as usize - 42);
    println!(
        "    {:<34} {:>10.0} pps {:>10.0} pps {:>6.1}%",
        format!("{frame_bytes}-byte frames"),
        pps,
        host,
        100.0 * pps / host
    );
    println!(
        "    {:<34} {:>9.1} MB/s {:>9.1} MB/s",
        "",
        pps * f64::from(frame_bytes) / 1e6,
        host * f64::from(frame_bytes) / 1e6
    );
}

fn net_through_guest() {
    const SIZES: [(u32, u32); 2] = [(32768, 60), (16384, 1514)];
    let workload = |frames, frame_bytes| guests::NetWorkload {
        frames,
        frame_bytes,
        batch: 32,
    };
    let baseline = (0..3)
        .map(|_| run_net_guest(workload(0, 60)))
        .min()
        .unwrap();
    println!("  virtio-net transmit driven by a guest of our own (batches of 32) to a TAP:");
    println!(
        "    {:<34} {:>14} {:>14} {:>7}",
        "", "through device", "host loopback", "ratio"
    );
    for (frames, bytes) in SIZES {
        // Best of three: the work is short next to a noisy VM start-up.
        let guest = (0..3)
            .map(|_| run_net_guest(workload(frames, bytes)).saturating_sub(baseline))
            .min()
            .unwrap();
        print_packet_rates(frames, bytes, guest);
    }
    let baseline = (0..3).map(|_| run_net_receive_guest(0, 60)).min().unwrap();
    println!(
        "  virtio-net receive into a guest of our own (buffers given back in 16s), from a TAP:"
    );
    for (frames, bytes) in SIZES {
        let guest = (0..3)
            .map(|_| run_net_receive_guest(frames, bytes as usize).saturating_sub(baseline))
            .min()
            .unwrap();
        print_packet_rates(frames, bytes, guest);
    }
}

/// ns per chain for `device`, `offer` putting one request on the queue.
fn per_chain(
    device: &mut dyn VirtioDevice,
    queue_index: usize,
    iterations: u32,
    mut offer: impl FnMut(&mut TestQueue),
) -> f64 {
    let mut q = TestQueue::new();
    // Every queue gets the same rings; only `queue_index` is ever notified.
    let queues = (0..device.queue_max_sizes().len())
        .map(|_| vmm::devices::virtio::testing::device_queue())
        .collect();
    device
        .activate(Activation {
            memory: q.memory.clone(),
            queues,
            interrupt: Interrupt::new(
                vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ),
            features: 0,
        })
        .unwrap();
    let started = Instant::now();
    for _ in 0..iterations {
        offer(&mut q);
        device.queue_notified(queue_index, &mut DetachedEvents);
    }
    started.elapsed().as_nanos() as f64 / f64::from(iterations)
}

fn per_chain_costs(disk: &Path) {
    println!("  VMM cost per descriptor chain, queues driven from the host side:");
    let config = DiskSpec {
        path: disk.to_path_buf(),
        readonly: false,
        id: None,
        rate_limit: Default::default(),
    };
    let mut block = Block::new(&config, Block::open_file(&config).unwrap(), "vda").unwrap();
    let header = DATA;
    let ns = per_chain(&mut block, 0, 100_000, |q| {
        q.memory
            .write_slice(&[0u8; 16], GuestAddress(header))
            .unwrap();
        q.offer_chain(&[
            (header, 16, false),
            (DATA + 0x1000, 4096, true),
            (DATA + 0x100, 1, true),
        ]);
    });
    println!("    block, 4 KiB read (page cache)          {ns:8.0} ns");
    let ns = per_chain(&mut Rng::new(), 0, 100_000, |q| {
        q.offer_chain(&[(DATA, 64, true)]);
    });
    println!("    rng, 64 bytes                           {ns:8.0} ns");
    // The TAP lives in a namespace this thread creates; it disappears with it.
    let net = in_own_network_namespace(|| {
        let config = tap("bench2");
        let attached = vmm::devices::virtio::net::tap::Tap::open(&config.tap).ok()?;
        let mut net = Net::new(&config, attached, "eth0").ok()?;
        Some(per_chain(&mut net, 1, 100_000, |q| {
            q.offer_chain(&[(DATA, 12 + 64, false)]);
        }))
    });
    match net {
        Some(ns) => println!("    net transmit, 64-byte frame to a TAP    {ns:8.0} ns"),
        None => println!("    net transmit: skipped (needs root for a TAP in its own namespace)"),
    }
}
