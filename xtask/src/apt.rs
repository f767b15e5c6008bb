//! Debian packages the image build needs, installed when missing.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::process;

/// Everything `images` runs or reads: the kernel source and its build tools,
/// the static busybox, mkfs.ext4, and dpkg/apt for the stock cloud kernel.
pub const BUILD_PACKAGES: &[&str] = &[
    "linux-source-6.1",
    "make",
    "gcc",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "lz4",
    "xz-utils",
    "zstd",
    "e2fsprogs",
    "busybox-static",
    // Network tests: namespaces, TAP addresses, ping.
    "iproute2",
    "iputils-ping",
];

/// The installed version of a package, if it is installed.
pub fn installed_version(package: &str) -> Option<String> {
    let out = process::output(Command::new("dpkg-query").args([
        "-W",
        "-f=${Status} ${Version}",
        package,
    ]))
    .ok()?;
    let version = out.strip_prefix("install ok installed ")?;
    Some(version.trim().to_string())
}

/// The kernel package a meta-package (`linux-image-amd64`,
/// `linux-image-cloud-amd64`) points at now, and its version; the package
/// lists are refreshed once if the look-up fails.
pub fn kernel_package_of(meta_package: &str) -> Result<(String, String)> {
    let lookup = || -> Result<(String, String)> {
        let depends = process::output(Command::new("apt-cache").args(["depends", meta_package]))?;
        let package = depends
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Depends: "))
            .find(|dep| dep.starts_with("linux-image-"))
            .with_context(|| format!("{meta_package} depends on no linux-image package"))?
            .trim()
            .to_string();
        let show = process::output(Command::new("apt-cache").args([
            "show",
            "--no-all-versions",
            &package,
        ]))?;
        let version = show
            .lines()
            .find_map(|line| line.strip_prefix("Version: "))
            .with_context(|| format!("apt-cache shows no version of {package}"))?
            .trim()
            .to_string();
        Ok((package, version))
    };
    lookup().or_else(|_| {
        update()?;
        lookup()
    })
}

/// Runs apt-get as root (directly, or through sudo).
fn apt_get(args: &[&str]) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut command = if root {
        Command::new("apt-get")
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg("apt-get");
        sudo
    };
    command.env("DEBIAN_FRONTEND", "noninteractive").args(args);
    process::run(&mut command)
}

/// Refreshes the package lists.
pub fn update() -> Result<()> {
    apt_get(&["update", "-q"])
}

/// Installs the packages that are not installed yet.
pub fn ensure_installed(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| installed_version(p).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    // Package lists on a fresh machine may be stale or absent: update once on failure.
    if apt_get(&install).is_err() {
        update()?;
        apt_get(&install)?;
    }
    for package in &missing {
        if installed_version(package).is_none() {
            bail!("Debian package {package} is still not installed");
        }
    }
    Ok(())
}
