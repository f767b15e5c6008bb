//! The hardware-KVM lane: tests that need guest user space.
//!
//! Those tests are the `hwkvm` test binary of the `bulkhead` crate
//! (`cli/tests/hwkvm/`); they are `#[ignore]`d in a plain `cargo test`
//! because a guest's user space cannot run on a software KVM like this
//! machine's `kvm_pvm` (docs/host-kvm.md). This lane runs them:
//!
//! - on a host whose KVM is hardware (kvm_intel / kvm_amd loaded), directly;
//! - elsewhere inside an L1 VM: Debian's stock kernel under QEMU's software
//!   emulation with `-cpu max` (AMD SVM with nested paging), whose `kvm_amd`
//!   gives a hardware-model KVM. The L1 image (an uncompressed initramfs:
//!   busybox, the kernel's KVM and TAP modules, the `bulkhead` binary, the test
//!   binary, the guest images, and e2fsprogs with its libraries) is cached by
//!   the hash of everything in it. L1 has no network device: everything the
//!   tests do stays inside it.
//!
//! Each test's result line is passed through as libtest prints it. A failure
//! that comes back when the test runs again, a test left without a result,
//! or L1 going down without giving any result fails the lane (L1 itself
//! crashes now and then under the emulator: it is booted again for the tests
//! that have no result yet; see `L1::run`).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{apt, cache, images, process, stock_kernel, workspace_root};

/// Bumped when the L1 recipe changes in a way its inputs do not show.
const L1_RECIPE_VERSION: &[u8] = b"1";
/// QEMU for L1, and the e2fsprogs the tests check guest disks with.
const PACKAGES: &[&str] = &["qemu-system-x86", "e2fsprogs"];
/// Programs from the host copied into L1 with their shared libraries:
/// e2fsprogs to check guest disks, QEMU as the reference VMM of the figures.
const HOST_PROGRAMS: &[&str] = &[
    "/sbin/e2fsck",
    "/sbin/debugfs",
    "/usr/bin/qemu-system-x86_64",
];
/// QEMU's firmware (BIOS, option ROMs), copied with it.
const HOST_DIRECTORIES: &[&str] = &[
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];
/// Left out of the lane's default run: the figures test, a benchmark
/// (`cargo xtask hwkvm figures --nocapture`).
const SKIPPED_BY_DEFAULT: &[&str] = &["--skip", "figures"];
/// Also left out in L1: the tiny guest that sets XCR0 and runs the XSAVE
/// family triple-faults in L2 before printing anything. QEMU 7.2's TCG does
/// not let L1 intercept XSETBV (every L2 boot warns "XSAVE consistency
/// problem"), the likely cause: the lane's emulator, not a KVM. It runs in
/// the host lane (finished by the VMM on kvm_pvm) and directly on hardware
/// KVM.
///
/// And the tiny guest whose second vCPU never gets its start-up IPI: it hung
/// L1 once (nothing printed, no soft lockup reported). It runs in the host
/// lane on kvm_pvm.
const SKIPPED_IN_L1: &[&str] = &[
    "--skip",
    "xsave_family_including_a_page_crossing_area",
    "--skip",
    "a_vcpu_waiting_for_its_start_up_ipi_is_not_halted",
];
/// The test binaries the lane runs with `--include-ignored`: the user-space
/// tests, and the tiny-guest tests, whose instruction checks (`lzcnt`,
/// `tzcnt`) only mean something where the CPU runs guest code.
const TEST_BINARIES: &[(&str, &str)] = &[("bulkhead", "hwkvm"), ("vmm", "tiny_guests")];
/// One L1 run must end within this (a whole lane takes 3–6 minutes); it
/// is short enough that L1_EXTRA_BOOTS more fit in CI's 90 minutes.
const L1_TIME_LIMIT: Duration = Duration::from_secs(12 * 60);
/// L1 prints each test's name and result; no line for this long means L1
/// has locked up. Seen (about one lane run in three, with guests of two
/// vCPUs): both of L1's CPUs stuck inside kvm_amd, soft lockups reported or
/// not; cause not found, presumed to be QEMU TCG's emulation of nested SVM.
/// The longest test takes about a minute.
const L1_STALL_LIMIT: Duration = Duration::from_secs(4 * 60);

/// How many times in one lane L1 is booted again after it crashed or
/// stopped making progress (each time for the tests that have no result yet,
/// and only while each boot gives at least one result).
const L1_EXTRA_BOOTS: usize = 5;
/// More failures than this in one L1 are not a stall: they are not run again.
const MAX_RETRIED: usize = 3;
/// L1's memory: guests of up to 512 MiB, a few at once, plus the images.
const L1_MEMORY: &str = "6G";

const L1_INIT: &str = r#"#!/bin/sh
# L1's /init: a hardware-model KVM (kvm_amd on QEMU's emulated SVM), then the
# user-space tests, then power off. /bulkhead/args filters the tests.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
if [ -z "$L1_ON_TMPFS" ]; then
	# The initramfs itself cannot be pivot_root'ed away from (a sandboxed
	# VMM does that): move everything onto a tmpfs first.
	mkdir -p /newroot
	mount -t tmpfs -o size=90% tmpfs /newroot
	for entry in bin bulkhead init lib lib64 sbin usr; do
		[ -e "/$entry" ] && cp -a "/$entry" /newroot/
	done
	mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/run
	export L1_ON_TMPFS=1
	exec switch_root /newroot /init "$@"
fi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run /dev/pts /sys/fs/cgroup /var/tmp
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t devpts devpts /dev/pts
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
for module in $(cat /lib/modules/load-order); do
	insmod "/lib/modules/$module.ko" || echo "l1: insmod $module failed"
done
ip link set lo up
# A flight recorder for guests that triple-fault: KVM's "shutdown" exits
# (SVM exit code 0x7f) only, each with the RIP and the event the CPU was
# delivering (intr_info, error_code). The tests show them when they fail.
if mount -t tracefs nodev /sys/kernel/tracing; then
	echo 'exit_reason == 127' > /sys/kernel/tracing/events/kvm/kvm_exit/filter
	echo 1 > /sys/kernel/tracing/events/kvm/kvm_exit/enable
fi
echo "l1: up after $(cut -d' ' -f1 /proc/uptime) s; KVM: $(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null | sed 's/Y/nested paging/')"
cd /tmp
# The test binaries' arguments, one per line (an archive appended to the
# initramfs for each boot: a kernel command line holds 2 KiB at most).
set --
if [ -f /bulkhead/args ]; then
	while IFS= read -r argument; do set -- "$@" "$argument"; done < /bulkhead/args
fi
export BULKHEAD_BIN=/bulkhead/bulkhead BULKHEAD_IMAGES=/bulkhead/images BULKHEAD_REQUIRE_IMAGES=1
status=0
for binary in /bulkhead/tests/*; do
	echo "l1: running ${binary##*/}"
	"$binary" --include-ignored --test-threads=1 "$@" || status=1
done
echo "l1: tests exited with $status"
grep 'reason shutdown' /sys/kernel/tracing/trace | sed 's/^ */l1: KVM shutdown exit (a triple fault; tiny_guests makes some on purpose): /'
poweroff -f
"#;

/// `cargo xtask hwkvm [ARGS]...`: ARGS go to the test binary (name filters,
/// `--nocapture`, `--exact`, ...).
pub fn main(args: &[String]) -> Result<()> {
    run(args).map(|_| ())
}

/// Whether this host's KVM is a hardware one (Intel VT-x or AMD SVM).
pub fn host_has_hardware_kvm() -> bool {
    Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists()
}

/// Runs the lane; `filters` are more arguments for the test binary (test
/// name filters, `--nocapture`). Returns how many tests passed in L1 (None
/// when they ran directly on this host: their binaries print their counts).
pub fn run(filters: &[String]) -> Result<Option<usize>> {
    let started = Instant::now();
    let defaults = filters.is_empty();
    let mut filters = filters.to_vec();
    if defaults {
        filters.extend(SKIPPED_BY_DEFAULT.iter().map(|s| s.to_string()));
    }
    let root = workspace_root();
    images::main(&[])?;
    let test_binaries = build_test_binaries(&root)?;
    let bulkhead = root.join("target/x86_64-unknown-linux-gnu/release/bulkhead");
    let images_dir = images::images_dir();

    if host_has_hardware_kvm() {
        eprintln!("xtask: hwkvm: this host's KVM is hardware; running the lane directly");
        for binary in &test_binaries {
            let mut command = Command::new(binary);
            command
                .env("BULKHEAD_BIN", &bulkhead)
                .env("BULKHEAD_IMAGES", &images_dir)
                .env("BULKHEAD_REQUIRE_IMAGES", "1")
                .args(["--include-ignored", "--test-threads=1"])
                .args(&filters);
            process::run(&mut command)?;
        }
        return Ok(None);
    }

    apt::ensure_installed(PACKAGES)?;
    let image_started = Instant::now();
    let (l1_kernel, l1_initrd) = l1_image(&bulkhead, &test_binaries, &images_dir)?;
    let image_secs = image_started.elapsed().as_secs_f64();
    if defaults {
        filters.extend(SKIPPED_IN_L1.iter().map(|s| s.to_string()));
    }
    let expected = list_tests(&test_binaries, &filters)?;
    // Options that shape the output, kept when tests are named one by one.
    let output_options: Vec<String> = filters
        .iter()
        .filter(|f| ["--nocapture", "--show-output"].contains(&f.as_str()))
        .cloned()
        .collect();
    let mut l1 = L1 {
        boot: Box::new(|args: &[String]| boot_l1(&l1_kernel, &l1_initrd, args)),
        extra_boots_left: L1_EXTRA_BOOTS,
        interruptions: Vec::new(),
    };
    let mut outcome = l1.run(&filters, &expected, &output_options)?;
    // A test that fails in L1 runs once more, alone, in a fresh L1. Guests
    // nested under QEMU's emulation fail now and then (see docs/host-kvm.md);
    // a failure that comes back is the lane's verdict, one that does not is
    // named loudly, with the first failure's whole output above it in the log.
    let mut passed_on_retry = Vec::new();
    if !outcome.failed.is_empty() && outcome.failed.len() <= MAX_RETRIED {
        eprintln!(
            "xtask: hwkvm: FAILED in L1: {}; each runs once more in a fresh L1 (its first \
             output is above)",
            outcome.failed.join(", ")
        );
        let again = std::mem::take(&mut outcome.failed);
        let retry = l1.run(&exactly(&output_options, &again), &again, &output_options)?;
        for name in &again {
            if retry.passed.contains(name) {
                passed_on_retry.push(name.clone());
                outcome.passed.push(name.clone());
            } else {
                outcome.failed.push(name.clone());
            }
        }
    }
    eprintln!(
        "xtask: hwkvm lane: {} passed, {} failed, {} ignored; L1 image {image_secs:.1} s, \
         L1 boot {:.1} s, whole lane {:.1} s",
        outcome.passed.len(),
        outcome.failed.len(),
        outcome.ignored.len(),
        outcome.l1_boot_secs.unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64()
    );
    for why in &l1.interruptions {
        eprintln!("xtask: hwkvm lane: WARNING: L1 was booted again after: {why}");
    }
    if !passed_on_retry.is_empty() {
        eprintln!(
            "xtask: hwkvm lane: WARNING: passed only when run again: {}",
            passed_on_retry.join(", ")
        );
    }
    if !outcome.failed.is_empty() {
        bail!("hwkvm lane: failed: {}", outcome.failed.join(", "));
    }
    Ok(Some(outcome.passed.len()))
}

/// The test binaries' arguments that run exactly `tests`.
fn exactly(output_options: &[String], tests: &[String]) -> Vec<String> {
    let mut args = output_options.to_vec();
    args.push("--exact".into());
    args.extend(tests.iter().cloned());
    args
}

/// The names of the tests `filters` selects, across the test binaries (each
/// lists its own on this host; listing runs nothing).
fn list_tests(test_binaries: &[PathBuf], filters: &[String]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for binary in test_binaries {
        let listing = process::output(
            Command::new(binary)
                .args(["--list", "--format", "terse", "--include-ignored"])
                .args(filters),
        )?;
        names.extend(
            listing
                .lines()
                .filter_map(|line| line.strip_suffix(": test"))
                .map(str::to_string),
        );
    }
    if names.is_empty() {
        bail!("hwkvm: no test matches {filters:?}");
    }
    Ok(names)
}

/// Boots L1 once with these test arguments.
type BootL1<'a> = Box<dyn FnMut(&[String]) -> Result<Outcome> + 'a>;

/// Boots of L1 for one lane.
struct L1<'a> {
    boot: BootL1<'a>,
    extra_boots_left: usize,
    /// Why L1 was booted again, for the lane's summary.
    interruptions: Vec<String>,
}

impl L1<'_> {
    /// Runs the tests `args` select (`expected` names them) and returns
    /// their results. L1 itself sometimes crashes or locks up (QEMU TCG's
    /// nested SVM, see L1_STALL_LIMIT and docs/host-kvm.md): then it is booted
    /// again, loudly, for the tests that have no result yet, while boots are
    /// left and the last one gave at least one result. A test that brings L1
    /// down every time thus fails the lane.
    fn run(
        &mut self,
        args: &[String],
        expected: &[String],
        output_options: &[String],
    ) -> Result<Outcome> {
        let mut total = Outcome::default();
        let mut boot = (self.boot)(args)?;
        loop {
            let results = boot.results();
            let interrupted = boot.interrupted.take();
            total.merge(boot);
            let remaining: Vec<String> = expected
                .iter()
                .filter(|name| !total.has_result(name))
                .cloned()
                .collect();
            let Some(why) = interrupted else {
                // L1 ended by itself: a test without a result had its binary
                // end under it.
                if let Some(status) = total.exit_status.filter(|status| *status != 0) {
                    if total.failed.is_empty() && remaining.is_empty() {
                        bail!("hwkvm: the test binaries in L1 exited with {status}");
                    }
                }
                total.failed.extend(remaining);
                return Ok(total);
            };
            if remaining.is_empty() {
                return Ok(total);
            }
            if results == 0 || self.extra_boots_left == 0 {
                bail!(
                    "{why}; {} tests have no result ({}), and {}",
                    remaining.len(),
                    remaining.join(", "),
                    if results == 0 {
                        "this boot gave none"
                    } else {
                        "no more boots are left"
                    }
                );
            }
            self.extra_boots_left -= 1;
            eprintln!(
                "xtask: hwkvm: {why}; booting L1 again for the {} tests without a result \
                 ({} more boots left)",
                remaining.len(),
                self.extra_boots_left
            );
            self.interruptions.push(why);
            boot = (self.boot)(&exactly(output_options, &remaining))?;
        }
    }
}

/// Builds the lane's test binaries (and with them the `bulkhead` binary);
/// returns their paths, each named after its test target.
fn build_test_binaries(root: &Path) -> Result<Vec<PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(root)
        .args(["test", "--release", "--no-run", "--message-format=json"]);
    for (package, test) in TEST_BINARIES {
        command.args(["-p", package, "--test", test]);
    }
    // Cargo's progress goes to the terminal; its messages are read here.
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start cargo test --no-run")?;
    if !output.status.success() {
        bail!(
            "building the lane's test binaries failed ({})",
            output.status
        );
    }
    let mut found = Vec::new();
    for (_, test) in TEST_BINARIES {
        let executable = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == *test)
            .and_then(|m| m["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo did not report the {test} test executable"))?;
        found.push(executable);
    }
    Ok(found)
}

/// The L1 kernel and initramfs, built into the cache when their inputs changed.
fn l1_image(
    bulkhead: &Path,
    test_binaries: &[PathBuf],
    images_dir: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let (package, version) = stock_kernel::package()?;
    let stock_dir = cache::entry(
        "stock-kernel",
        &images::stock_kernel_key(&package, &version),
        |out| stock_kernel::build(&package, out),
    )?;
    let mut key_parts: Vec<Vec<u8>> = vec![
        L1_RECIPE_VERSION.to_vec(),
        // Names the package, its version and the modules kept.
        images::stock_kernel_key(&package, &version).into_bytes(),
        L1_INIT.as_bytes().to_vec(),
        cache::file_sha256(bulkhead)?.into_bytes(),
        cache::file_sha256(&bulkhead.with_file_name("bulkhead-vmm"))?.into_bytes(),
        test_binaries
            .iter()
            .map(|binary| cache::file_sha256(binary))
            .collect::<Result<Vec<_>>>()?
            .concat()
            .into_bytes(),
        fs::read(images_dir.join("manifest.json"))?,
        apt::installed_version("busybox-static")
            .unwrap_or_default()
            .into_bytes(),
        apt::installed_version("e2fsprogs")
            .unwrap_or_default()
            .into_bytes(),
        apt::installed_version("qemu-system-x86")
            .unwrap_or_default()
            .into_bytes(),
    ];
    key_parts.sort();
    let refs: Vec<&[u8]> = key_parts.iter().map(Vec::as_slice).collect();
    let key = cache::key(&refs);
    // Every change of the code makes a new L1 image (~150 MiB): keep one.
    cache::remove_others("l1", &key)?;
    let l1_dir = cache::entry("l1", &key, |out| {
        build_l1_initramfs(bulkhead, test_binaries, images_dir, &stock_dir, out)
    })?;
    Ok((stock_dir.join("vmlinuz"), l1_dir.join("l1.cpio")))
}

fn build_l1_initramfs(
    bulkhead: &Path,
    test_binaries: &[PathBuf],
    images_dir: &Path,
    stock_dir: &Path,
    out: &Path,
) -> Result<()> {
    let tree = out.join("tree");
    for dir in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "bulkhead/images",
        "bulkhead/tests",
    ] {
        fs::create_dir_all(tree.join(dir))?;
    }
    images::install_busybox(&tree)?;
    write_executable(&tree.join("init"), L1_INIT.as_bytes())?;

    let modules = tree.join("lib/modules");
    fs::create_dir_all(&modules)?;
    let order = stock_kernel::load_order(&stock_dir.join("modules"), stock_kernel::L1_MODULES)?;
    for name in &order {
        fs::copy(
            stock_dir.join("modules").join(format!("{name}.ko")),
            modules.join(format!("{name}.ko")),
        )?;
    }
    fs::write(modules.join("load-order"), order.join("\n") + "\n")?;

    fs::copy(bulkhead, tree.join("bulkhead/bulkhead"))?;
    // The VMM program the daemon (and `bulkhead run`) starts VMs with.
    fs::copy(
        bulkhead.with_file_name("bulkhead-vmm"),
        tree.join("bulkhead/bulkhead-vmm"),
    )?;
    for ((_, test), binary) in TEST_BINARIES.iter().zip(test_binaries) {
        fs::copy(binary, tree.join("bulkhead/tests").join(test))?;
    }
    for entry in fs::read_dir(images_dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // The kvm_pvm lane's images stay out: L1 has no use for them.
        if path.is_file() && !name.starts_with("cloud-") && !name.starts_with('.') {
            fs::copy(&path, tree.join("bulkhead/images").join(&*name))?;
        }
    }
    for program in HOST_PROGRAMS {
        copy_with_libraries(Path::new(program), &tree)?;
    }
    for dir in HOST_DIRECTORIES {
        let target = tree.join(dir.trim_start_matches('/'));
        let parent = target.parent().expect("a folder below the root");
        fs::create_dir_all(parent)?;
        process::run(Command::new("cp").args(["-a", dir]).arg(parent))?;
    }

    let mut cpio = fs::File::create(out.join("l1.cpio"))?;
    let mut buffered = std::io::BufWriter::new(&mut cpio);
    crate::cpio::write_tree(&mut buffered, &tree, &[])?;
    buffered.flush()?;
    drop(buffered);
    fs::remove_dir_all(&tree)?;
    Ok(())
}

/// Copies a dynamically linked host program and the libraries `ldd` names
/// into `tree` at the same paths.
fn copy_with_libraries(program: &Path, tree: &Path) -> Result<()> {
    let listing = process::output(Command::new("ldd").arg(program))?;
    let mut files = vec![program.to_path_buf()];
    for line in listing.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            files.push(PathBuf::from(path));
        }
    }
    for file in files {
        let target = tree.join(file.strip_prefix("/")?);
        fs::create_dir_all(target.parent().expect("a file has a parent"))?;
        fs::copy(&file, &target).with_context(|| format!("copy {}", file.display()))?;
    }
    Ok(())
}

fn write_executable(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, data)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// What L1 printed about the tests.
#[derive(Default, Debug)]
pub struct Outcome {
    pub passed: Vec<String>,
    pub ignored: Vec<String>,
    pub failed: Vec<String>,
    pub summary_seen: bool,
    pub exit_status: Option<i32>,
    pub l1_boot_secs: Option<f64>,
    /// L1's own kernel failed: the first line that said so (a CPU of L1
    /// locked up, or L1 panicked). Not a test's verdict: a process of L1
    /// cannot bring down a correct kernel.
    pub l1_crashed: Option<String>,
    /// Why L1 ended before its tests did (it crashed or stopped printing).
    pub interrupted: Option<String>,
    /// A test whose result has not been printed yet (a message may have
    /// come between its name and its result).
    pending: Option<String>,
}

impl Outcome {
    /// Takes in one line of L1's console.
    pub fn observe(&mut self, line: &str) {
        let line = line.trim_end_matches('\r');
        let (name, result) = match line
            .strip_prefix("test ")
            .and_then(|r| r.split_once(" ... "))
        {
            Some((name, result)) => (Some(name.to_string()), result),
            None => (self.pending.take(), line),
        };
        if let Some(name) = name {
            let result = result.split_whitespace().last().unwrap_or("");
            match result {
                "ok" => self.passed.push(name),
                "ignored" => self.ignored.push(name),
                "FAILED" => self.failed.push(name),
                _ => self.pending = Some(name),
            }
        }
        if line.starts_with("test result: ") {
            self.summary_seen = true;
        }
        if self.l1_crashed.is_none() {
            let crash = ["watchdog: BUG: soft lockup", "Kernel panic - not syncing"]
                .iter()
                .find_map(|sign| line.find(sign));
            if let Some(start) = crash {
                self.l1_crashed = Some(line[start..].to_string());
            }
        }
        if let Some(code) = line.strip_prefix("l1: tests exited with ") {
            self.exit_status = code.trim().parse().ok();
        }
        if let Some(rest) = line.strip_prefix("l1: up after ") {
            self.l1_boot_secs = rest.split_whitespace().next().and_then(|s| s.parse().ok());
        }
    }

    /// How many tests have a result.
    fn results(&self) -> usize {
        self.passed.len() + self.ignored.len() + self.failed.len()
    }

    fn has_result(&self, name: &str) -> bool {
        [&self.passed, &self.ignored, &self.failed]
            .iter()
            .any(|names| names.iter().any(|n| n == name))
    }

    /// Adds a later boot's results (its exit status is the one that counts).
    fn merge(&mut self, later: Outcome) {
        self.passed.extend(later.passed);
        self.ignored.extend(later.ignored);
        self.failed.extend(later.failed);
        self.exit_status = later.exit_status;
        self.l1_boot_secs = self.l1_boot_secs.or(later.l1_boot_secs);
        self.l1_crashed = self.l1_crashed.take().or(later.l1_crashed);
    }
}

/// The cached L1 initramfs with one more archive appended (the kernel
/// unpacks concatenated archives in order): `/bulkhead/args`, the test
/// binaries' arguments, one per line.
fn with_test_arguments(initrd: &Path, args: &[String], dir: &Path) -> Result<PathBuf> {
    if let Some(bad) = args.iter().find(|a| a.contains('\n')) {
        bail!("hwkvm: a test argument cannot hold a line break: {bad:?}");
    }
    let path = dir.join("l1-boot.cpio");
    fs::copy(initrd, &path).with_context(|| format!("copy {}", initrd.display()))?;
    let listed: String = args.iter().map(|a| format!("{a}\n")).collect();
    let mut out = fs::OpenOptions::new().append(true).open(&path)?;
    crate::cpio::write_archive(
        &mut out,
        &[
            crate::cpio::Entry::Directory { path: "bulkhead" },
            crate::cpio::Entry::File {
                path: "bulkhead/args",
                mode: 0o644,
                data: listed.as_bytes(),
            },
        ],
    )?;
    Ok(path)
}

/// Boots L1, streams its console (kept in target/hwkvm/l1-console.log), and
/// collects the test results.
fn boot_l1(kernel: &Path, initrd: &Path, args: &[String]) -> Result<Outcome> {
    let log_dir = workspace_root().join("target/hwkvm");
    fs::create_dir_all(&log_dir)?;
    let log_path = log_dir.join("l1-console.log");
    // A first L1 that locked up keeps its log for whoever reads the second's.
    if log_path.exists() {
        fs::rename(&log_path, log_dir.join("l1-console.previous.log"))?;
    }
    let mut log = fs::File::create(&log_path)?;
    // loglevel=1: L1's kernel messages (kvm_amd warns of every unhandled
    // MSR) would interleave with the test results.
    // softlockup_panic: a CPU of L1 stuck in its kernel ends L1 at once (the
    // lane fails, its console log says where) instead of hanging it.
    let append = "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=1 softlockup_panic=1";
    let initrd = with_test_arguments(initrd, args, &log_dir)?;
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", L1_MEMORY])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!(
        "xtask: hwkvm: booting L1 (QEMU TCG, -cpu max, 2 vCPUs, {L1_MEMORY}); console log: {}",
        log_path.display()
    );
    let mut child = command.spawn().context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (lines, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if lines
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let deadline = Instant::now() + L1_TIME_LIMIT;
    let mut outcome = Outcome::default();
    let mut last_line = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline || now >= last_line + L1_STALL_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let why = if now >= deadline {
                format!("did not finish within {} s", L1_TIME_LIMIT.as_secs())
            } else {
                format!("printed nothing for {} s", L1_STALL_LIMIT.as_secs())
            };
            outcome.interrupted = Some(format!(
                "hwkvm: L1 {why} (console log: {})",
                log_path.display()
            ));
            return Ok(outcome);
        }
        match receive.recv_timeout((deadline - now).min(Duration::from_secs(1))) {
            Ok(line) => {
                last_line = Instant::now();
                writeln!(log, "{line}")?;
                println!("hwkvm| {}", line.trim_end_matches('\r'));
                outcome.observe(&line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "hwkvm: QEMU exited with {status} (console log: {})",
            log_path.display()
        );
    }
    if !outcome.summary_seen || outcome.exit_status.is_none() {
        let why = format!(
            "hwkvm: L1 ended without the tests' summary (console log: {})",
            log_path.display()
        );
        // L1's own kernel failed (softlockup_panic turns a lockup into a
        // panic), not a test.
        if let Some(crash) = &outcome.l1_crashed {
            outcome.interrupted = Some(format!("{why}: L1's kernel crashed: {crash}"));
            return Ok(outcome);
        }
        bail!(why);
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_read_from_libtest_lines() {
        let mut outcome = Outcome::default();
        for line in [
            "l1: up after 6.93 s; KVM: nested paging",
            "running 3 tests",
            "test console::shell ... ok\r",
            "test net::ping ... FAILED",
            "test slow ... ignored",
            "test split ... [ 4.8] kvm: a message",
            "ok",
            "test result: FAILED. 1 passed; 1 failed; 1 ignored",
            "l1: tests exited with 101",
        ] {
            outcome.observe(line);
        }
        assert_eq!(outcome.passed, ["console::shell", "split"]);
        assert_eq!(outcome.ignored, ["slow"]);
        assert_eq!(outcome.failed, ["net::ping"]);
        assert!(outcome.summary_seen);
        assert_eq!(outcome.exit_status, Some(101));
        assert_eq!(outcome.l1_boot_secs, Some(6.93));
        assert_eq!(outcome.l1_crashed, None);
    }

    #[test]
    fn a_soft_lockup_of_l1_is_seen_even_inside_a_test_line() {
        let mut outcome = Outcome::default();
        outcome.observe(
            "test smp ... [   52.676058] watchdog: BUG: soft lockup - CPU#1 stuck for 27s! [vcpu0:164]",
        );
        assert_eq!(
            outcome.l1_crashed.as_deref(),
            Some("watchdog: BUG: soft lockup - CPU#1 stuck for 27s! [vcpu0:164]")
        );
        assert!(outcome.failed.is_empty());
    }

    #[test]
    fn a_panic_of_l1_is_a_crash_and_its_first_sign_is_kept() {
        let mut outcome = Outcome::default();
        for line in [
            "test daemon::linux ... [  299.1] BUG: unable to handle page fault",
            "[  299.142229] Kernel panic - not syncing: Fatal exception in interrupt",
            "[  299.2] Kernel panic - not syncing: a later one",
        ] {
            outcome.observe(line);
        }
        assert_eq!(
            outcome.l1_crashed.as_deref(),
            Some("Kernel panic - not syncing: Fatal exception in interrupt")
        );
        assert!(outcome.failed.is_empty());
    }

    /// What one boot of L1 printed: test lines, then maybe a crash.
    fn printed(lines: &[&str], crashed: bool) -> Outcome {
        let mut outcome = Outcome::default();
        for line in lines {
            outcome.observe(line);
        }
        if crashed {
            outcome.interrupted = Some("L1's kernel crashed".into());
        } else {
            outcome.observe("l1: tests exited with 0");
        }
        outcome
    }

    /// Runs the lane's boot policy over scripted boots; returns the outcome
    /// and the arguments each boot was given.
    fn run_scripted(
        boots: Vec<Outcome>,
        expected: &[&str],
    ) -> (Result<Outcome>, Vec<Vec<String>>, usize) {
        let mut boots = boots.into_iter();
        let mut given = Vec::new();
        let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        let (result, interruptions) = {
            let mut l1 = L1 {
                boot: Box::new(|args: &[String]| {
                    given.push(args.to_vec());
                    boots.next().context("no more scripted boots")
                }),
                extra_boots_left: 2,
                interruptions: Vec::new(),
            };
            let result = l1.run(&["--skip".into(), "figures".into()], &expected, &[]);
            (result, l1.interruptions.len())
        };
        (result, given, interruptions)
    }

    #[test]
    fn after_l1_crashes_only_the_tests_without_a_result_run_again() {
        let (result, given, interruptions) = run_scripted(
            vec![
                printed(&["test a ... ok", "test b ... FAILED", "test c ... "], true),
                printed(&["test c ... ok", "test d ... ok"], false),
            ],
            &["a", "b", "c", "d"],
        );
        let outcome = result.unwrap();
        assert_eq!(outcome.passed, ["a", "c", "d"]);
        assert_eq!(outcome.failed, ["b"]);
        assert_eq!(given[1], ["--exact", "c", "d"]);
        assert_eq!(interruptions, 1);
    }

    #[test]
    fn a_boot_that_gives_no_result_ends_the_lane() {
        let (result, given, _) = run_scripted(
            vec![
                printed(&["test a ... ok", "test b ... "], true),
                printed(&["test b ... "], true),
                printed(&["test b ... ok"], false),
            ],
            &["a", "b"],
        );
        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("1 tests have no result (b)"), "{error}");
        assert!(error.contains("this boot gave none"), "{error}");
        assert_eq!(given.len(), 2);
    }

    #[test]
    fn boots_again_at_most_as_often_as_allowed() {
        let (result, given, _) = run_scripted(
            vec![
                printed(&["test a ... ok"], true),
                printed(&["test b ... ok"], true),
                printed(&["test c ... ok"], true),
                printed(&["test d ... ok"], false),
            ],
            &["a", "b", "c", "d"],
        );
        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("no more boots are left"), "{error}");
        assert_eq!(given.len(), 3);
    }

    #[test]
    fn any_result_is_progress() {
        for results in [
            &["test a ... FAILED"][..],
            &["test a ... ok", "test b ... ignored"],
        ] {
            let (result, given, _) = run_scripted(
                vec![printed(results, true), printed(&["test c ... ok"], false)],
                &["a", "b", "c"],
            );
            assert!(result.is_ok(), "{results:?}: {result:?}");
            assert_eq!(given.len(), 2, "{results:?}");
        }
    }

    #[test]
    fn a_failed_test_is_a_result_for_the_retry_not_an_error() {
        let mut boot = printed(&["test a ... FAILED", "test b ... ok"], true);
        boot.interrupted = None;
        boot.observe("l1: tests exited with 101");
        let (result, _, _) = run_scripted(vec![boot], &["a", "b"]);
        assert_eq!(result.unwrap().failed, ["a"]);
    }

    #[test]
    fn test_arguments_ride_in_an_archive_after_the_image() {
        let dir = std::env::temp_dir().join(format!("hwkvm-args-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let image = dir.join("l1.cpio");
        fs::write(&image, b"the cached image").unwrap();
        let args = ["--exact".to_string(), "daemon::linux".to_string()];
        let boot = with_test_arguments(&image, &args, &dir).unwrap();
        let bytes = fs::read(&boot).unwrap();
        assert!(bytes.starts_with(b"the cached image"));
        let appended = String::from_utf8_lossy(&bytes[16..]);
        assert!(appended.starts_with("070701"), "{appended}");
        assert!(appended.contains("bulkhead/args"), "{appended}");
        assert!(appended.contains("--exact\ndaemon::linux\n"), "{appended}");
        assert!(appended.contains("TRAILER!!!"), "{appended}");
        let bad = with_test_arguments(&image, &["a\nb".to_string()], &dir);
        assert!(bad.is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_crash_after_every_result_is_not_a_failure() {
        let (result, given, _) = run_scripted(vec![printed(&["test a ... ok"], true)], &["a"]);
        assert_eq!(result.unwrap().passed, ["a"]);
        assert_eq!(given.len(), 1);
    }

    #[test]
    fn a_test_without_a_result_when_l1_ends_by_itself_has_failed() {
        let (result, _, _) = run_scripted(
            vec![printed(&["test a ... ok", "test b ... "], false)],
            &["a", "b", "c"],
        );
        assert_eq!(result.unwrap().failed, ["b", "c"]);
    }

    #[test]
    fn a_test_binary_that_exits_badly_with_every_result_fails_the_lane() {
        let mut boot = printed(&["test a ... ok"], true);
        boot.interrupted = None;
        boot.observe("l1: tests exited with 1");
        let (result, _, _) = run_scripted(vec![boot], &["a"]);
        assert!(format!("{:#}", result.unwrap_err()).contains("exited with 1"));
    }
}
