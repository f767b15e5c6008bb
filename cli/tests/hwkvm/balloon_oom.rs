//! `--balloon ...,deflate_on_oom` under memory pressure: with it, a guest
//! whose user space wants more than the inflated balloon left takes pages
//! back from the balloon (Linux's OOM notifier deflates it) and the program
//! lives; without it, the same program meets the OOM killer and the balloon
//! keeps every page.

use crate::support::{Kernel, TempDir, Vm};
use crate::EXIT_LIMIT;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Guest RAM, and the balloon the host asks for: half of it.
const MEMORY_MIB: u64 = 256;
const BALLOON_MIB: u64 = 128;
/// How much more than the guest has available its program asks for: the
/// balloon must give back at least this much for the program to live.
const OVER_MIB: u64 = 48;
/// Touching ~150 MiB under nested KVM, with an OOM round trip per MiB.
const PRESSURE_LIMIT: Duration = Duration::from_secs(300);

fn balloon_status(vm: &Vm) -> Value {
    let status: Value = serde_json::from_str(&vm.ctl(&["status"])).unwrap();
    status["balloon"].clone()
}

/// A number of KiB from /proc/meminfo (a kernel message may come first on
/// the output's line: the number after the label is read).
fn meminfo_kib(vm: &mut Vm, field: &str) -> u64 {
    let label = format!("{field}:");
    let output = vm.sh(&format!("grep {label} /proc/meminfo"));
    output
        .split(&label)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{field} in {output:?}"))
}

/// What happened when user space outgrew the guest's memory left beside a
/// full balloon.
struct Pressure {
    vm: Vm,
    /// The program's exit status in the shell (137: SIGKILL).
    status: i32,
    output: String,
    /// The balloon as the host saw it before and after.
    inflated: Value,
    after: Value,
    wanted_mib: u64,
}

/// Boots a 256 MiB guest with `--balloon=BALLOON_OPTIONS`, inflates the
/// balloon to 128 MiB, and runs a program that touches OVER_MIB more than
/// the guest then has available. Overcommit is on (`vm.overcommit_memory=1`)
/// so the program is not refused up front: it runs out of memory page by page.
fn outgrow_the_balloon(dir: &TempDir, balloon_options: &str) -> Pressure {
    let extra = vec![
        "--memory".to_string(),
        MEMORY_MIB.to_string(),
        format!("--balloon={balloon_options}"),
    ];
    let mut vm = Vm::boot(Kernel::Project, &extra, dir.path());
    vm.ctl(&["balloon", &BALLOON_MIB.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let inflated = loop {
        let balloon = balloon_status(&vm);
        if balloon["actual_mib"] == BALLOON_MIB {
            break balloon;
        }
        assert!(
            Instant::now() < deadline,
            "the balloon did not reach {BALLOON_MIB} MiB: {balloon}\n{}",
            vm.describe()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    vm.sh("echo 1 > /proc/sys/vm/overcommit_memory");
    let available_mib = meminfo_kib(&mut vm, "MemAvailable") >> 10;
    let wanted_mib = available_mib + OVER_MIB;
    assert!(
        wanted_mib + 16 < available_mib + BALLOON_MIB,
        "the balloon ({BALLOON_MIB} MiB) could not cover {wanted_mib} MiB \
         with {available_mib} MiB available"
    );
    let (status, output) = vm.shell_with_limit(
        &format!("bulkhead-guest-tool touch-memory {wanted_mib} 1"),
        PRESSURE_LIMIT,
    );
    let after = balloon_status(&vm);
    eprintln!(
        "hwkvm| {balloon_options}: {available_mib} MiB available beside the balloon, \
         {wanted_mib} MiB wanted: status {status}, balloon {inflated} → {after}"
    );
    Pressure {
        vm,
        status,
        output,
        inflated,
        after,
        wanted_mib,
    }
}

fn reboot(vm: &mut Vm) {
    vm.type_text("reboot -f\n");
    let (status, _) = vm.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "{status}\n{}", vm.describe());
}

/// With `deflate_on_oom` the guest deflates on its own, below the host's
/// target: the program lives, the balloon's `actual` falls (the device
/// served and counted the deflate) while the target stays, and no OOM kill
/// happens.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn with_deflate_on_oom_the_guest_takes_memory_back_from_the_balloon() {
    let dir = TempDir::new("hwkvm-deflate-on-oom");
    let mut run = outgrow_the_balloon(&dir, "deflate_on_oom");
    assert_eq!(
        run.status,
        0,
        "the program did not live through the pressure: {}\n{}",
        run.output,
        run.vm.describe()
    );
    assert!(
        run.output
            .contains(&format!("touched {} MiB", run.wanted_mib)),
        "{}",
        run.output
    );
    assert!(
        !run.vm.console().contains("Killed process"),
        "the OOM killer acted\n{}",
        run.vm.describe()
    );
    // MemAvailable is an estimate (the program may also dip into the
    // watermarks): at least half of what it lacked must have come back.
    let actual = run.after["actual_mib"].as_u64().unwrap();
    assert_eq!(run.after["target_mib"], BALLOON_MIB, "{}", run.after);
    assert!(
        actual + OVER_MIB / 2 <= BALLOON_MIB,
        "the balloon gave back only {} MiB: {}",
        BALLOON_MIB - actual,
        run.after
    );
    let deflated = run.after["deflated_pages"].as_u64().unwrap()
        - run.inflated["deflated_pages"].as_u64().unwrap();
    assert!(
        deflated >= OVER_MIB / 2 * 256,
        "{deflated} pages deflated: {}",
        run.after
    );
    reboot(&mut run.vm);
}

/// The control: without `deflate_on_oom` the same pressure ends in the OOM
/// killer (the program dies of SIGKILL) and the balloon keeps its pages.
#[test]
#[ignore = "needs guest user space: hardware KVM (cargo xtask hwkvm)"]
fn without_deflate_on_oom_the_oom_killer_acts_and_the_balloon_holds() {
    let dir = TempDir::new("hwkvm-no-deflate-on-oom");
    let mut run = outgrow_the_balloon(&dir, "target_mib=0");
    assert_eq!(
        run.status,
        128 + 9,
        "the program was not killed: {}\n{}",
        run.output,
        run.vm.describe()
    );
    assert!(
        run.vm.console().contains("Killed process"),
        "no OOM kill on the console\n{}",
        run.vm.describe()
    );
    assert_eq!(run.after["actual_mib"], BALLOON_MIB, "{}", run.after);
    assert_eq!(
        run.after["deflated_pages"], run.inflated["deflated_pages"],
        "{}",
        run.after
    );
    reboot(&mut run.vm);
}
