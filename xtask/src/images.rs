//! `cargo xtask images`: every guest image the tests and benchmarks boot.
//!
//! | file in target/images   | what it is |
//! | ----------------------- | ---------- |
//! | vmlinux, bzImage        | the project's kernel (linux-source + images/kernel/bulkhead.config) |
//! | kernel.config           | the full config it was built with |
//! | initramfs.cpio.gz       | `/init` = images/init/idle.c, a loop that never makes a system call |
//! | rootfs.ext4             | ext4 (mkfs.ext4 -d) holding the same init as /sbin/init |
//! | busybox.cpio.gz, busybox-root.ext4 | user space of the test guests (busybox, images/userspace, bulkhead-guest-tool) for the project kernel |
//! | stock-vmlinuz, stock-busybox.cpio.gz | Debian's stock linux-image-amd64 and the same user space with its modules |
//! | cloud-vmlinux, cloud-vmlinuz | Debian's stock linux-image-cloud-amd64 (vmlinux extracted) |

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use flate2::{write::GzEncoder, Compression};
use serde::Serialize;

use crate::cpio::{write_archive, Entry};
use crate::{apt, cache, kernel, process, stock_kernel, workspace_root};

/// Bumped when a recipe below changes in a way its inputs do not show.
const RECIPE_VERSION: &[u8] = b"1";
const CLOUD_META_PACKAGE: &str = "linux-image-cloud-amd64";

#[derive(Serialize)]
struct ManifestEntry {
    path: PathBuf,
    sha256: String,
    from: String,
}

pub fn main(args: &[String]) -> Result<()> {
    let json = match args {
        [] => false,
        [flag, value] if flag == "--output" && value == "json" => true,
        [flag, value] if flag == "--output" && value == "text" => false,
        _ => bail!("usage: cargo xtask images [--output text|json]"),
    };
    let manifest = build_all()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        for (name, entry) in &manifest {
            println!(
                "{name:<20} {}  {}",
                &entry.sha256[..12],
                entry.path.display()
            );
        }
    }
    Ok(())
}

/// Where the published images live; tests read `manifest.json` there.
pub fn images_dir() -> PathBuf {
    workspace_root().join("target/images")
}

fn build_all() -> Result<BTreeMap<String, ManifestEntry>> {
    apt::ensure_installed(apt::BUILD_PACKAGES)?;
    let root = workspace_root();
    let cache_root = cache::root();
    let mut published = BTreeMap::new();

    let fragment_path = root.join("images/kernel/bulkhead.config");
    let fragment = fs::read(&fragment_path)?;
    let source_version = apt::installed_version(kernel::SOURCE_PACKAGE).unwrap_or_default();
    let tree = kernel::source_tree(&cache_root)?;
    let kernel_dir = cache::entry(
        "kernel",
        &cache::key(&[RECIPE_VERSION, &fragment, source_version.as_bytes()]),
        |out| kernel::build(&tree, &fragment_path, out),
    )?;
    let kernel_from = format!("{} + images/kernel/bulkhead.config", kernel::SOURCE_PACKAGE);
    published.insert("vmlinux", (kernel_dir.join("vmlinux"), kernel_from.clone()));
    published.insert("bzImage", (kernel_dir.join("bzImage"), kernel_from.clone()));
    published.insert("kernel.config", (kernel_dir.join("config"), kernel_from));

    let init_source = fs::read(root.join("images/init/idle.c"))?;
    let gcc_version = process::output(Command::new("gcc").arg("-dumpfullversion"))?;
    let idle_dir = cache::entry(
        "idle-init",
        &cache::key(&[RECIPE_VERSION, &init_source, gcc_version.as_bytes()]),
        |out| build_idle_images(&root.join("images/init/idle.c"), out),
    )?;
    let idle_from = "images/init/idle.c".to_string();
    published.insert(
        "initramfs.cpio.gz",
        (idle_dir.join("initramfs.cpio.gz"), idle_from.clone()),
    );
    published.insert("rootfs.ext4", (idle_dir.join("rootfs.ext4"), idle_from));

    let busybox_version = apt::installed_version("busybox-static").unwrap_or_default();
    let tool = build_guest_tool(&root)?;
    let tool_bytes = fs::read(&tool)?;
    let userspace_files = tree_digest(&root.join(USERSPACE_DIR))?;
    let userspace_key = [
        RECIPE_VERSION,
        busybox_version.as_bytes(),
        &tool_bytes,
        userspace_files.as_bytes(),
    ];
    let userspace_dir = cache::entry("userspace", &cache::key(&userspace_key), |out| {
        build_userspace_images(&root.join(USERSPACE_DIR), &tool, out)
    })?;
    let userspace_from = format!("busybox-static {busybox_version} + {USERSPACE_DIR} + guest-tool");
    published.insert(
        "busybox.cpio.gz",
        (
            userspace_dir.join("busybox.cpio.gz"),
            userspace_from.clone(),
        ),
    );
    published.insert(
        "busybox-root.ext4",
        (
            userspace_dir.join("busybox-root.ext4"),
            userspace_from.clone(),
        ),
    );

    let (stock_package, stock_version) = stock_kernel::package()?;
    // Names the package, its version and the modules kept.
    let stock_key = stock_kernel_key(&stock_package, &stock_version);
    let stock_dir = cache::entry("stock-kernel", &stock_key, |out| {
        stock_kernel::build(&stock_package, out)
    })?;
    let stock_from = format!("{stock_package} {stock_version}");
    published.insert(
        "stock-vmlinuz",
        (stock_dir.join("vmlinuz"), stock_from.clone()),
    );
    let stock_initramfs_dir = cache::entry(
        "stock-userspace",
        &cache::key(&[&userspace_key.concat(), stock_key.as_bytes()]),
        |out| build_stock_initramfs(&root.join(USERSPACE_DIR), &tool, &stock_dir, out),
    )?;
    published.insert(
        "stock-busybox.cpio.gz",
        (
            stock_initramfs_dir.join("stock-busybox.cpio.gz"),
            format!("{userspace_from} + modules of {stock_from}"),
        ),
    );

    let (cloud_package, cloud_version) = apt::kernel_package_of(CLOUD_META_PACKAGE)?;
    let cloud_dir = cache::entry(
        "cloud-kernel",
        &cache::key(&[
            RECIPE_VERSION,
            cloud_package.as_bytes(),
            cloud_version.as_bytes(),
        ]),
        |out| build_cloud_kernel(&tree, &cloud_package, out),
    )?;
    let cloud_from = format!("{cloud_package} {cloud_version}");
    published.insert(
        "cloud-vmlinux",
        (cloud_dir.join("vmlinux"), cloud_from.clone()),
    );
    published.insert("cloud-vmlinuz", (cloud_dir.join("vmlinuz"), cloud_from));

    publish(published)
}

/// Copies the images into target/images and writes manifest.json, each file
/// replaced atomically.
fn publish(images: BTreeMap<&str, (PathBuf, String)>) -> Result<BTreeMap<String, ManifestEntry>> {
    let dir = images_dir();
    fs::create_dir_all(&dir)?;
    let mut manifest = BTreeMap::new();
    for (name, (source, from)) in images {
        let target = dir.join(name);
        let partial = dir.join(format!(".{name}.partial"));
        fs::copy(&source, &partial)
            .with_context(|| format!("copy {} to {}", source.display(), partial.display()))?;
        fs::rename(&partial, &target)?;
        let sha256 = cache::file_sha256(&target)?;
        manifest.insert(
            name.to_string(),
            ManifestEntry {
                path: target,
                sha256,
                from,
            },
        );
    }
    let partial = dir.join(".manifest.json.partial");
    fs::write(&partial, serde_json::to_vec_pretty(&manifest)?)?;
    fs::rename(&partial, dir.join("manifest.json"))?;
    Ok(manifest)
}

/// The syscall-free init, as an initramfs and as an ext4 root disk.
fn build_idle_images(source: &Path, out: &Path) -> Result<()> {
    let init = out.join("init");
    process::run(
        Command::new("gcc")
            .args(["-static", "-nostdlib", "-nostartfiles", "-O2", "-o"])
            .arg(&init)
            .arg(source),
    )?;
    let init_bytes = fs::read(&init)?;
    write_initramfs(
        &out.join("initramfs.cpio.gz"),
        &[
            Entry::Directory { path: "dev" },
            console_node(),
            Entry::Directory { path: "proc" },
            Entry::Directory { path: "sys" },
            Entry::File {
                path: "init",
                mode: 0o755,
                data: &init_bytes,
            },
        ],
    )?;

    // The root disk: /sbin/init and /init. /dev stays empty: the kernel mounts
    // devtmpfs on it (CONFIG_DEVTMPFS_MOUNT) before running init.
    let tree = out.join("rootfs");
    for dir in ["dev", "proc", "sys", "sbin"] {
        fs::create_dir_all(tree.join(dir))?;
    }
    for path in ["init", "sbin/init"] {
        fs::write(tree.join(path), &init_bytes)?;
        set_mode(&tree.join(path), 0o755)?;
    }
    process::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "bulkhead-root", "-E", "root_owner=0:0"])
            .arg("-d")
            .arg(&tree)
            .arg(out.join("rootfs.ext4"))
            .arg("32M"),
    )?;
    fs::remove_dir_all(&tree)?;
    // The init on the disk must be the one just built, byte for byte.
    let on_disk = process::output_bytes(
        Command::new("debugfs")
            .args(["-R", "cat /sbin/init"])
            .arg(out.join("rootfs.ext4")),
    )?;
    if on_disk != init_bytes {
        bail!("rootfs.ext4: /sbin/init differs from the init that was built");
    }
    Ok(())
}

/// The cache key of the stock kernel's entry (the kernel and the modules kept).
pub fn stock_kernel_key(package: &str, version: &str) -> String {
    cache::key(&[
        RECIPE_VERSION,
        package.as_bytes(),
        version.as_bytes(),
        stock_kernel::GUEST_MODULES.join(",").as_bytes(),
        stock_kernel::L1_MODULES.join(",").as_bytes(),
    ])
}

/// The test guests' user space: scripts and configuration in this folder of
/// the repository, busybox, and our guest tool.
const USERSPACE_DIR: &str = "images/userspace";

/// Builds `bulkhead-guest-tool` (static, like every binary of the
/// workspace) and returns its path.
fn build_guest_tool(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    process::run(Command::new(cargo).current_dir(root).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "guest-tool",
    ]))?;
    Ok(root.join("target/x86_64-unknown-linux-gnu/release/bulkhead-guest-tool"))
}

/// A digest of every file under `dir` (path, mode and contents).
fn tree_digest(dir: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut parts = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in fs::read_dir(&next)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let mode = fs::metadata(&path)?.permissions().mode();
                let relative = path.strip_prefix(dir)?.to_string_lossy().into_owned();
                parts.push((relative, mode, fs::read(&path)?));
            }
        }
    }
    parts.sort();
    let flat: Vec<Vec<u8>> = parts
        .into_iter()
        .map(|(path, mode, data)| [path.as_bytes(), &mode.to_le_bytes(), &data].concat())
        .collect();
    let refs: Vec<&[u8]> = flat.iter().map(Vec::as_slice).collect();
    Ok(cache::key(&refs))
}

/// Lays out the guests' root file system in `tree`: busybox with a link per
/// applet, busybox init at /sbin/init, the guest tool, and the files of
/// [`USERSPACE_DIR`].
fn stage_userspace(source: &Path, tool: &Path, tree: &Path) -> Result<()> {
    for dir in [
        "bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "mnt", "var/log",
    ] {
        fs::create_dir_all(tree.join(dir))?;
    }
    install_busybox(tree)?;
    std::os::unix::fs::symlink("../bin/busybox", tree.join("sbin/init"))?;
    fs::copy(tool, tree.join("bin/bulkhead-guest-tool"))?;
    process::run(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", source.display()))
            .arg(tree),
    )?;
    Ok(())
}

/// Debian's static busybox at `tree/bin/busybox`, with a link per applet
/// beside it.
pub fn install_busybox(tree: &Path) -> Result<()> {
    fs::create_dir_all(tree.join("bin"))?;
    fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("copy /bin/busybox (busybox-static)")?;
    let applets = process::output(Command::new("/bin/busybox").arg("--list"))?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))?;
    }
    Ok(())
}

/// The project kernel's user space, as an initramfs and as an ext4 root disk.
fn build_userspace_images(source: &Path, tool: &Path, out: &Path) -> Result<()> {
    let tree = out.join("tree");
    stage_userspace(source, tool, &tree)?;
    write_tree_initramfs(&out.join("busybox.cpio.gz"), &tree, Compression::best())?;
    process::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "bulkhead-busybox", "-E", "root_owner=0:0"])
            .arg("-d")
            .arg(&tree)
            .arg(out.join("busybox-root.ext4"))
            .arg("64M"),
    )?;
    fs::remove_dir_all(&tree)?;
    Ok(())
}

/// The stock kernel's initramfs: the same user space plus the modules its
/// /init loads, in dependency order.
fn build_stock_initramfs(source: &Path, tool: &Path, stock: &Path, out: &Path) -> Result<()> {
    let tree = out.join("tree");
    stage_userspace(source, tool, &tree)?;
    let modules = tree.join("lib/modules");
    fs::create_dir_all(&modules)?;
    let order = stock_kernel::load_order(&stock.join("modules"), stock_kernel::GUEST_MODULES)?;
    for name in &order {
        fs::copy(
            stock.join("modules").join(format!("{name}.ko")),
            modules.join(format!("{name}.ko")),
        )?;
    }
    fs::write(modules.join("load-order"), order.join("\n") + "\n")?;
    write_tree_initramfs(
        &out.join("stock-busybox.cpio.gz"),
        &tree,
        Compression::fast(),
    )?;
    fs::remove_dir_all(&tree)?;
    Ok(())
}

fn write_tree_initramfs(path: &Path, tree: &Path, level: Compression) -> Result<()> {
    let mut gz = GzEncoder::new(Vec::new(), level);
    crate::cpio::write_tree(&mut gz, tree, &[console_node()])?;
    fs::write(path, gz.finish()?)?;
    Ok(())
}

fn console_node() -> Entry<'static> {
    Entry::CharDevice {
        path: "dev/console",
        mode: 0o600,
        major: 5,
        minor: 1,
    }
}

fn write_initramfs(path: &Path, entries: &[Entry]) -> Result<()> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    write_archive(&mut gz, entries)?;
    let mut file = fs::File::create(path)?;
    file.write_all(&gz.finish()?)?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Downloads the stock kernel package (apt-get download: no install) and
/// extracts its bzImage, and the vmlinux inside it with the kernel tree's
/// `scripts/extract-vmlinux`: decompressing a bzImage in KVM's emulator takes
/// minutes on kvm_pvm hosts, the ELF boots directly.
fn build_cloud_kernel(tree: &Path, package: &str, out: &Path) -> Result<()> {
    let unpacked = stock_kernel::download_kernel_package(package, out)?;
    let vmlinuz = out.join("vmlinuz");
    let vmlinux =
        process::output_bytes(Command::new(tree.join("scripts/extract-vmlinux")).arg(&vmlinuz))?;
    if !vmlinux.starts_with(b"\x7fELF") {
        bail!(
            "extract-vmlinux did not produce an ELF from {}",
            vmlinuz.display()
        );
    }
    fs::write(out.join("vmlinux"), vmlinux)?;
    fs::remove_dir_all(&unpacked)?;
    Ok(())
}
